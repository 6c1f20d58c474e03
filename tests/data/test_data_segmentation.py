"""Segmentation folder loaders on fixture files in each data set's layout (masks mapped through
label maps checked against numpy references), every bad record in both modes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from distiq.data import BadRecordError, LabelMap, load_label_map, write_label_map
from distiq.data.segmentation import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    CITYSCAPES_TRAIN_IDS,
    SCANNET_NYU40_CLASSES,
    load_ade20k,
    load_bdd100k,
    load_cityscapes,
    load_kitti_semantic,
    load_scannet_frames,
    load_segmentation_folder,
)

H, W = 12, 16


def _labels(seed: int, values) -> np.ndarray:
    return np.random.default_rng(seed).choice(np.asarray(values), size=(H, W))


def test_generic_folder_with_a_label_map_file(tmp_path, files):
    label_map = LabelMap(("background", "car", "road"), {0: 0, 10: 1, 20: 2, 255: 255})
    write_label_map(tmp_path / "labels.json", label_map)
    raw = {}
    for k in (3, 1, 2):
        files.write_image(tmp_path / "img" / f"frame_{k:04d}.png", seed=k)
        raw[k] = _labels(k, [0, 10, 20, 255])
        files.write_mask(tmp_path / "ann" / f"frame_{k:04d}.png", raw[k])
    dataset = load_segmentation_folder(tmp_path / "img", tmp_path / "ann", tmp_path / "labels.json")
    assert dataset.classes == ("background", "car", "road") and dataset.num_classes == 3
    assert [r["image_id"] for r in dataset.records] == [1, 2, 3]  # trailing numbers of the stems
    for i, k in enumerate((1, 2, 3)):
        sample = dataset[i]
        expected = np.select([raw[k] == 0, raw[k] == 10, raw[k] == 20], [0, 1, 2], 255)
        assert sample["mask"].dtype == torch.long and np.array_equal(
            sample["mask"].numpy(), expected
        )
        assert sample["image"].size == (W, H) and sample["image_id"] == k


def test_colour_coded_masks(tmp_path, files):
    doc = {"classes": ["road", "car"], "values": {"128,64,128": 0, "0,0,142": 1, "0,0,0": 255}}
    colours = np.array([[128, 64, 128], [0, 0, 142], [0, 0, 0]], dtype=np.uint8)
    pick = _labels(0, [0, 1, 2])
    files.write_image(tmp_path / "img" / "a.png")
    files.write_mask(tmp_path / "ann" / "a.png", colours[pick])
    dataset = load_segmentation_folder(tmp_path / "img", tmp_path / "ann", doc)
    assert np.array_equal(dataset[0]["mask"].numpy(), np.array([0, 1, 255])[pick])
    # an integer map on RGB masks is a malformed record, not a silent misreading
    with pytest.raises(BadRecordError, match="colour \\(RGB\\) mask"):
        load_segmentation_folder(tmp_path / "img", tmp_path / "ann", LabelMap.identity(["a", "b"]))


def test_label_map_files_round_trip_and_reject_mistakes(tmp_path):
    label_map = LabelMap(("x", "y"), {(1, 2, 3): 0, (4, 5, 6): 255})
    write_label_map(tmp_path / "m.json", label_map)
    assert load_label_map(tmp_path / "m.json") == label_map
    assert LabelMap.from_json({"classes": ["a", "b"]}).values == {0: 0, 1: 1, 255: 255}
    with pytest.raises(ValueError, match=r"class index in \[0, 2\) or to 255"):
        LabelMap(("a", "b"), {0: 0, 1: 7})
    with pytest.raises(ValueError, match="neither a pixel value nor 'r,g,b'"):
        LabelMap.from_json({"classes": ["a"], "values": {"road": 0}})
    (tmp_path / "bad.json").write_text(json.dumps({"names": []}))
    with pytest.raises(ValueError, match="'classes' list"):
        load_label_map(tmp_path / "bad.json")


def test_cityscapes_label_ids_to_train_ids(tmp_path, files):
    label_ids = list(range(34))
    raw = {}
    for city, stem in (("aachen", "aachen_000000_000019"), ("bremen", "bremen_000001_000019")):
        files.write_image(
            tmp_path / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", seed=len(city)
        )
        raw[stem] = _labels(len(stem) + len(city), label_ids)
        files.write_mask(
            tmp_path / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png", raw[stem]
        )
    dataset = load_cityscapes(tmp_path, "val")
    assert dataset.classes == CITYSCAPES_CLASSES and len(CITYSCAPES_CLASSES) == 19
    # numpy reference: the official table (id -> trainId), everything else ignored
    reference = np.full(256, 255)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        reference[label_id] = train_id
    assert reference[7] == 0 and reference[26] == 13 and reference[33] == 18 and reference[6] == 255
    for i, stem in enumerate(sorted(raw)):
        assert dataset.records[i]["name"] == stem
        assert np.array_equal(dataset[i]["mask"].numpy(), reference[raw[stem]])


def test_kitti_bdd_ade_and_scannet_layouts(tmp_path, files):
    # KITTI: Cityscapes labelIds
    files.write_image(tmp_path / "kitti" / "training" / "image_2" / "000000_10.png")
    kitti_raw = _labels(1, [7, 26, 0])
    files.write_mask(tmp_path / "kitti" / "training" / "semantic" / "000000_10.png", kitti_raw)
    kitti = load_kitti_semantic(tmp_path / "kitti")
    assert np.array_equal(
        kitti[0]["mask"].numpy(), np.select([kitti_raw == 7, kitti_raw == 26], [0, 13], 255)
    )

    # BDD100K, current layout and the older seg/ layout: trainIds with 255 ignore
    bdd_raw = _labels(2, [0, 5, 18, 255])
    files.write_image(tmp_path / "bdd" / "images" / "10k" / "val" / "7d06fefd-f7be05a6.jpg")
    files.write_mask(
        tmp_path / "bdd" / "labels" / "sem_seg" / "masks" / "val" / "7d06fefd-f7be05a6.png", bdd_raw
    )
    assert np.array_equal(load_bdd100k(tmp_path / "bdd", "val")[0]["mask"].numpy(), bdd_raw)
    files.write_image(tmp_path / "bdd_old" / "seg" / "images" / "train" / "0a0a0b1a-7c39d841.jpg")
    files.write_mask(
        tmp_path / "bdd_old" / "seg" / "labels" / "train" / "0a0a0b1a-7c39d841_train_id.png",
        bdd_raw,
    )
    assert np.array_equal(load_bdd100k(tmp_path / "bdd_old", "train")[0]["mask"].numpy(), bdd_raw)

    # ADE20K: 0 -> ignore, k -> k - 1
    ade_raw = _labels(3, [0, 1, 150, 75])
    files.write_image(tmp_path / "ade" / "images" / "validation" / "ADE_val_00000001.jpg")
    files.write_mask(
        tmp_path / "ade" / "annotations" / "validation" / "ADE_val_00000001.png", ade_raw
    )
    ade = load_ade20k(tmp_path / "ade", "validation")
    assert len(ADE20K_CLASSES) == 150 and ade.num_classes == 150
    assert np.array_equal(ade[0]["mask"].numpy(), np.where(ade_raw == 0, 255, ade_raw - 1))

    # ScanNet: 16-bit NYU40 labels, larger colour frames resized to the label size
    scannet_raw = _labels(4, [0, 1, 2, 13, 39, 40])
    files.write_image(
        tmp_path / "scannet" / "scene0000_00" / "color" / "0.jpg", size=(2 * W, 2 * H)
    )
    files.write_mask(
        tmp_path / "scannet" / "scene0000_00" / "label-filt" / "0.png", scannet_raw, bits=16
    )
    assert Image.open(
        tmp_path / "scannet" / "scene0000_00" / "label-filt" / "0.png"
    ).mode.startswith("I")
    scannet = load_scannet_frames(tmp_path / "scannet")
    assert scannet.num_classes == 20 and scannet.classes[-1] == "otherfurniture"
    index = {nyu: i for i, nyu in enumerate(SCANNET_NYU40_CLASSES)}
    expected = np.vectorize(lambda v: index.get(v, 255))(scannet_raw)
    sample = scannet[0]
    assert np.array_equal(sample["mask"].numpy(), expected) and sample["image"].size == (W, H)
    big = _labels(5, [1, 2, 1000])  # 16-bit value outside NYU40
    files.write_mask(tmp_path / "scannet" / "scene0000_00" / "label-filt" / "0.png", big)
    with pytest.raises(BadRecordError, match="mask values 1000 are not in the label map"):
        load_scannet_frames(tmp_path / "scannet")


def _folder(tmp_path, files):
    for k in (1, 2):
        files.write_image(tmp_path / "img" / f"{k}.png", seed=k)
        files.write_mask(tmp_path / "ann" / f"{k}.png", _labels(k, [0, 1]))
    return LabelMap.identity(["a", "b"])


def _outside_map(tmp_path, files):
    files.write_mask(tmp_path / "ann" / "2.png", _labels(9, [0, 1, 7]))


def _missing_mask(tmp_path, files):
    (tmp_path / "ann" / "2.png").unlink()


def _corrupt_mask(tmp_path, files):
    files.corrupt(tmp_path / "ann" / "2.png", how="truncate")


def _corrupt_image(tmp_path, files):
    files.corrupt(tmp_path / "img" / "2.png")


def _size_mismatch(tmp_path, files):
    files.write_image(tmp_path / "img" / "2.png", size=(W + 1, H))


SEG_CASES = [
    (_outside_map, "label outside map", "ann/2.png"),
    (_missing_mask, "missing annotation", "ann/2.png"),
    (_corrupt_mask, "corrupt image", "ann/2.png"),
    (_corrupt_image, "corrupt image", "img/2.png"),
    (_size_mismatch, "malformed", "ann/2.png"),
]


@pytest.mark.parametrize("mutate, reason, file", SEG_CASES, ids=[c[0].__name__ for c in SEG_CASES])
def test_segmentation_bad_records_in_both_modes(tmp_path, files, mutate, reason, file):
    label_map = _folder(tmp_path, files)
    mutate(tmp_path, files)
    with pytest.raises(BadRecordError) as info:
        load_segmentation_folder(tmp_path / "img", tmp_path / "ann", label_map)
    assert info.value.reason == reason and info.value.file.endswith(file)
    dataset = load_segmentation_folder(
        tmp_path / "img", tmp_path / "ann", label_map, on_bad_record="skip"
    )
    assert [r["name"] for r in dataset.records] == ["1"]
    assert dataset.summary.by_reason == {reason: 1}


def test_a_file_broken_after_loading_raises_when_read(tmp_path, files):
    label_map = _folder(tmp_path, files)
    dataset = load_segmentation_folder(
        tmp_path / "img", tmp_path / "ann", label_map, check_images=False
    )
    files.write_mask(tmp_path / "ann" / "2.png", _labels(9, [0, 1, 7]))
    assert dataset[0]["mask"].shape == (H, W)
    with pytest.raises(BadRecordError, match="label outside map"):
        dataset[1]
    files.corrupt(tmp_path / "img" / "1.png")
    with pytest.raises(BadRecordError, match="corrupt image"):
        dataset[0]
    image = Image.open(tmp_path / "img" / "2.png")
    assert image.size == (W, H)
