"""Collate functions, calibration subsets, and the format writers (PNG, COCO RLE, VQA entries)
checked against PIL and pycocotools."""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from distiq.data import (
    calibration_indices,
    calibration_subset,
    collate_detection,
    collate_segmentation,
    collate_vqa,
)
from distiq.data.formats import coco_rle, encode_png, vqa_annotation
from distiq.data.scenes import load_digit_images


def test_collate_vqa_through_a_dataloader(scene_set):
    dataset = scene_set.vqa("val")
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_vqa)
    batch = next(iter(loader))
    assert (
        batch["pixel_values"].shape == (4, 3, 64, 64)
        and batch["pixel_values"].dtype == torch.float32
    )
    first = np.asarray(dataset[0]["image"], dtype=np.float32) / 255.0
    assert torch.equal(batch["pixel_values"][0], torch.from_numpy(first).permute(2, 0, 1))
    assert batch["question_id"].dtype == torch.long and batch["question_id"].shape == (4,)
    assert batch["question"] == [dataset[i]["question"] for i in range(4)]
    assert batch["answers"][0] == dataset[0]["answers"] and len(batch["image"]) == 4


def test_collate_detection_and_segmentation_resize(scene_set):
    detection = scene_set.detection("val")
    samples = [detection[0], detection[1]]
    batch = collate_detection(samples, image_size=32)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert torch.allclose(batch["boxes"][0], samples[0]["boxes"] / 2)
    assert batch["labels"][1].tolist() == samples[1]["labels"].tolist()
    assert torch.equal(collate_detection(samples)["boxes"][0], samples[0]["boxes"])

    segmentation = scene_set.segmentation("val")
    samples = [segmentation[0], segmentation[1]]
    batch = collate_segmentation(samples)
    assert batch["mask"].shape == (2, 64, 64) and torch.equal(batch["mask"][1], samples[1]["mask"])
    small = collate_segmentation(samples, image_size=(32, 16))
    assert small["pixel_values"].shape == (2, 3, 32, 16) and small["mask"].shape == (2, 32, 16)
    assert set(small["mask"].unique().tolist()) <= set(samples[0]["mask"].unique().tolist()) | set(
        samples[1]["mask"].unique().tolist()
    )  # nearest neighbour: no new class values
    odd = dict(samples[1], image=samples[1]["image"].resize((48, 48)))
    with pytest.raises(ValueError, match="different sizes"):
        collate_segmentation([samples[0], odd])
    with pytest.raises(ValueError, match="lack"):
        collate_vqa(samples)
    loader = torch.utils.data.DataLoader(
        segmentation,
        batch_size=3,
        collate_fn=functools.partial(collate_segmentation, image_size=48),
    )
    assert next(iter(loader))["mask"].shape == (3, 48, 48)


def test_calibration_indices_are_stratified_and_seeded():
    data = [{"question_type": t} for t in ["a"] * 50 + ["b"] * 30 + ["c"] * 20]
    picked = calibration_indices(data, 10)
    assert Counter(data[i]["question_type"] for i in picked) == {"a": 5, "b": 3, "c": 2}
    assert picked == sorted(set(picked)) and picked == calibration_indices(data, 10)
    assert picked != calibration_indices(data, 10, seed=1)
    rare = [{"question_type": t} for t in ["a"] * 98 + ["b", "c"]]
    assert Counter(rare[i]["question_type"] for i in calibration_indices(rare, 3)) == {
        "a": 1,
        "b": 1,
        "c": 1,
    }
    assert Counter(rare[i]["question_type"] for i in calibration_indices(rare, 2)) == {"a": 2}
    assert len(calibration_indices(rare, 100)) == 100
    with pytest.raises(ValueError, match="only 100"):
        calibration_indices(rare, 101)
    assert calibration_subset(data, 4)[0] == {"question_type": "a"}


def test_calibration_subset_of_a_loaded_dataset(scene_set):
    train = scene_set.vqa("train")
    subset = calibration_subset(train, 21)
    assert type(subset) is type(train) and len(subset) == 21
    types = Counter(r["question_type"] for r in subset.records)
    assert set(types) == {r["question_type"] for r in train.records}  # every type represented
    assert subset[0]["image"].size == (64, 64)


@pytest.mark.parametrize("shape", [(7, 5), (64, 64, 3), (3, 11, 3)])
def test_encode_png_round_trips_through_pil(tmp_path, shape):
    array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    (tmp_path / "x.png").write_bytes(encode_png(array))
    with Image.open(tmp_path / "x.png") as image:
        assert image.mode == ("L" if len(shape) == 2 else "RGB")
        assert np.array_equal(np.asarray(image), array)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(array.astype(np.int32))


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("first_pixel", [0, 1])
def test_coco_rle_matches_pycocotools(first_pixel):
    from pycocotools import mask as mask_utils

    mask = np.random.default_rng(first_pixel).random((9, 13)) > 0.6
    mask[0, 0] = bool(first_pixel)
    rle = coco_rle(mask)
    assert rle["size"] == [9, 13] and sum(rle["counts"]) == mask.size
    decoded = mask_utils.decode(mask_utils.frPyObjects(rle, 9, 13)).astype(bool)
    assert np.array_equal(decoded, mask)
    reference = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert mask_utils.area(reference) == mask.sum()
    assert np.array_equal(mask_utils.decode(reference).astype(bool), decoded)


def test_vqa_annotation_entry():
    entry = vqa_annotation(
        7, 3, ["2", "two", "2", "two"], question_type="how many", answer_type="number"
    )
    assert entry["multiple_choice_answer"] == "2"  # tie: first given
    assert [a["answer_id"] for a in entry["answers"]] == [1, 2, 3, 4]
    assert {a["answer_confidence"] for a in entry["answers"]} == {"yes"}
    with pytest.raises(ValueError, match="no answers"):
        vqa_annotation(7, 3, [], question_type="x", answer_type="other")


def test_digit_images_equal_scikit_learns():
    from sklearn.datasets import load_digits

    images, targets = load_digit_images()
    reference = load_digits()
    assert np.array_equal(images, reference.images.astype(np.float32))
    assert np.array_equal(targets, reference.target)


def test_importing_the_data_layer_is_light():
    import subprocess
    import sys

    code = "import sys, distiq.data; print(sorted(m for m in ('torch', 'sklearn', 'pycocotools') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_label_map_file_must_be_utf8(tmp_path):
    from distiq.data.formats import LabelMap, load_label_map, write_label_map

    path = tmp_path / "labels.json"
    write_label_map(path, LabelMap.identity(["fond", "café"]))
    assert load_label_map(path).classes == ("fond", "café")
    path.write_bytes('{"classes": ["fond", "café"]}'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"labels.json: not UTF-8 text .* label map must be UTF-8"):
        load_label_map(path)
