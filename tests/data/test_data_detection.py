"""COCO instances JSON and Pascal VOC XML loaders on fixture files, every bad record in both
modes, and pycocotools reading the generator's COCO file."""

from __future__ import annotations

import json

import pytest
import torch

from distiq.data import BadRecordError, load_coco_detection, load_pascal_voc


def _coco_fixture(root, files):
    """Three images (16×12), sparse category ids 1, 5, 90 (COCO style), one crowd box."""
    for image_id in (1, 2, 3):
        files.write_image(root / "images" / f"{image_id:012d}.jpg", seed=image_id)
    doc = {
        "info": {}, "licenses": [],
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 16, "height": 12} for i in (1, 2, 3)],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 5, "bbox": [1.0, 2.0, 4.0, 3.0], "area": 12.0, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 90, "bbox": [0, 0, 16, 12], "area": 192, "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [2, 2, 2, 2], "area": 4, "iscrowd": 1},
            {"id": 4, "image_id": 3, "category_id": 1, "bbox": [10.5, 4, 5.5, 8], "area": 44, "iscrowd": 0},
        ],
        "categories": [{"id": 90, "name": "toothbrush", "supercategory": "indoor"},
                       {"id": 1, "name": "person", "supercategory": "person"},
                       {"id": 5, "name": "airplane", "supercategory": "vehicle"}],
    }  # fmt: skip
    return doc


def test_coco_detection_reads_boxes_and_maps_sparse_ids(tmp_path, files):
    doc = _coco_fixture(tmp_path, files)
    (tmp_path / "instances.json").write_text(json.dumps(doc))
    dataset = load_coco_detection(tmp_path / "instances.json", tmp_path / "images")
    assert dataset.classes == ("person", "airplane", "toothbrush") and dataset.category_ids == (
        1,
        5,
        90,
    )
    assert len(dataset) == 3  # image 2 has no boxes: kept as a negative
    sample = dataset[0]
    assert set(sample) == {"image", "boxes", "labels", "image_id"}
    assert sample["boxes"].dtype == torch.float32 and sample["labels"].dtype == torch.long
    assert sample["boxes"].tolist() == [
        [1.0, 2.0, 5.0, 5.0],
        [0.0, 0.0, 16.0, 12.0],
    ]  # xywh -> xyxy; crowd left out
    assert sample["labels"].tolist() == [1, 2]
    assert dataset[1]["boxes"].shape == (0, 4) and dataset[1]["labels"].shape == (0,)
    assert dataset[2]["boxes"].tolist() == [[10.5, 4.0, 16.0, 12.0]]
    with_crowd = load_coco_detection(
        tmp_path / "instances.json", tmp_path / "images", include_crowd=True, drop_empty=True
    )
    assert len(with_crowd) == 2 and with_crowd[0]["labels"].tolist() == [1, 2, 0]


def _bad_category(doc, root, files):
    doc["annotations"][3]["category_id"] = 7


def _bad_bbox_shape(doc, root, files):
    doc["annotations"][3]["bbox"] = [10, 4, 5]


def _bad_bbox_size(doc, root, files):
    doc["annotations"][3]["bbox"] = [10, 4, -5, 8]


def _bbox_outside(doc, root, files):
    doc["annotations"][3]["bbox"] = [10, 4, 9, 8]  # x1 = 19 > 16 + 1


def _missing_image(doc, root, files):
    (root / "images" / "000000000003.jpg").unlink()


def _corrupt_image(doc, root, files):
    files.corrupt(root / "images" / "000000000003.jpg")


def _wrong_size(doc, root, files):
    files.write_image(root / "images" / "000000000003.jpg", size=(20, 12))


def _malformed_image_entry(doc, root, files):
    doc["images"][2] = {"id": 3, "width": 16, "height": 12}
    del doc["annotations"][3]  # no annotation points to it any more


def _orphan_annotation(doc, root, files):
    doc["annotations"].append({"id": 9, "image_id": 77, "category_id": 1, "bbox": [0, 0, 1, 1]})
    files.write_image(root / "images" / "000000000003.jpg")  # image 3 still fine


COCO_CASES = [
    (_bad_category, "label outside map", "instances.json", 2),
    (_bad_bbox_shape, "malformed", "instances.json", 2),
    (_bad_bbox_size, "malformed", "instances.json", 2),
    (_bbox_outside, "malformed", "instances.json", 2),
    (_missing_image, "missing image", "000000000003.jpg", 2),
    (_corrupt_image, "corrupt image", "000000000003.jpg", 2),
    (_wrong_size, "malformed", "000000000003.jpg", 2),
    (_malformed_image_entry, "malformed", "instances.json", 2),
    (_orphan_annotation, "malformed", "instances.json", 3),
]


@pytest.mark.parametrize(
    "mutate, reason, file, kept", COCO_CASES, ids=[c[0].__name__ for c in COCO_CASES]
)
def test_coco_bad_records_in_both_modes(tmp_path, files, mutate, reason, file, kept):
    doc = _coco_fixture(tmp_path, files)
    mutate(doc, tmp_path, files)
    (tmp_path / "instances.json").write_text(json.dumps(doc))
    with pytest.raises(BadRecordError) as info:
        load_coco_detection(tmp_path / "instances.json", tmp_path / "images")
    assert info.value.reason == reason and info.value.file.endswith(file)
    dataset = load_coco_detection(
        tmp_path / "instances.json", tmp_path / "images", on_bad_record="skip"
    )
    assert len(dataset) == kept and dataset.summary.by_reason == {reason: 1}
    assert 3 not in {r["image_id"] for r in dataset.records} or kept == 3


def test_coco_rejects_a_broken_label_space(tmp_path, files):
    doc = _coco_fixture(tmp_path, files)
    doc["categories"][0] = {"name": "no id"}
    (tmp_path / "instances.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="category #0 needs an integer 'id'"):
        load_coco_detection(tmp_path / "instances.json", tmp_path / "images", on_bad_record="skip")


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_pycocotools_reads_the_generated_instances(scene_set):
    from pycocotools.coco import COCO

    paths = scene_set["train"]
    coco = COCO(str(paths.instances))
    dataset = load_coco_detection(paths.instances, paths.images)
    for record in dataset.records[:10]:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[record["image_id"]]))
        assert [
            [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
            for a in anns
        ] == record["boxes"]
        for ann in anns:
            assert coco.annToMask(ann).sum() == ann["area"]


VOC_XML = """<annotation>
  <folder>VOC2012</folder><filename>{name}.jpg</filename>
  <size><width>16</width><height>12</height><depth>3</depth></size>
  <object><name>dog</name><pose>Left</pose><truncated>0</truncated><difficult>0</difficult>
    <bndbox><xmin>2</xmin><ymin>3</ymin><xmax>10</xmax><ymax>12</ymax></bndbox></object>
  <object><name>{second}</name><difficult>1</difficult>
    <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>16</xmax><ymax>{ymax}</ymax></bndbox></object>
</annotation>"""


def _voc_fixture(root, files, second="person", ymax="5"):
    for name in ("2008_000001", "2008_000002"):
        files.write_image(root / "JPEGImages" / f"{name}.jpg", seed=len(name))
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{name}.xml").write_text(
            VOC_XML.format(
                name=name,
                second=second if name.endswith("2") else "person",
                ymax=ymax if name.endswith("2") else "5",
            )
        )
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("2008_000001\n2008_000002\n")


def test_pascal_voc_reads_boxes_and_difficult_flags(tmp_path, files):
    _voc_fixture(tmp_path, files)
    dataset = load_pascal_voc(tmp_path, "train")
    assert len(dataset) == 2 and dataset.classes[11] == "dog"
    sample = dataset[0]
    assert sample["boxes"].tolist() == [[1.0, 2.0, 10.0, 12.0]]  # 1-based corners -> pixel edges
    assert sample["labels"].tolist() == [11] and sample["image_id"] == 0
    assert dataset.records[1]["name"] == "2008_000002"
    with_difficult = load_pascal_voc(tmp_path, None, keep_difficult=True)
    assert with_difficult[1]["labels"].tolist() == [11, 14]
    assert with_difficult[1]["boxes"][1].tolist() == [0.0, 0.0, 16.0, 5.0]
    with pytest.raises(FileNotFoundError, match="split=None"):
        load_pascal_voc(tmp_path, "trainval")


def _voc_unknown_class(root, files):
    _voc_fixture(root, files, second="unicorn")


def _voc_bad_box(root, files):
    _voc_fixture(root, files, ymax="abc")


def _voc_box_outside(root, files):
    _voc_fixture(root, files, ymax="30")


def _voc_bad_xml(root, files):
    _voc_fixture(root, files)
    (root / "Annotations" / "2008_000002.xml").write_text("<annotation><object>")


def _voc_missing_xml(root, files):
    _voc_fixture(root, files)
    (root / "Annotations" / "2008_000002.xml").unlink()


def _voc_missing_image(root, files):
    _voc_fixture(root, files)
    (root / "JPEGImages" / "2008_000002.jpg").unlink()


def _voc_corrupt_image(root, files):
    _voc_fixture(root, files)
    files.corrupt(root / "JPEGImages" / "2008_000002.jpg", how="truncate")


VOC_CASES = [
    (_voc_unknown_class, "label outside map", "2008_000002.xml"),
    (_voc_bad_box, "malformed", "2008_000002.xml"),
    (_voc_box_outside, "malformed", "2008_000002.xml"),
    (_voc_bad_xml, "malformed", "2008_000002.xml"),
    (_voc_missing_xml, "missing annotation", "2008_000002.xml"),
    (_voc_missing_image, "missing image", "2008_000002.jpg"),
    (_voc_corrupt_image, "corrupt image", "2008_000002.jpg"),
]


@pytest.mark.parametrize("make, reason, file", VOC_CASES, ids=[c[0].__name__ for c in VOC_CASES])
def test_pascal_voc_bad_records_in_both_modes(tmp_path, files, make, reason, file):
    make(tmp_path, files)
    with pytest.raises(BadRecordError) as info:
        load_pascal_voc(tmp_path, "train")
    assert info.value.reason == reason and info.value.file.endswith(file)
    assert "2008_000002" in info.value.record
    dataset = load_pascal_voc(tmp_path, "train", on_bad_record="skip")
    assert [r["name"] for r in dataset.records] == ["2008_000001"]
    assert dataset.summary.by_reason == {reason: 1}
