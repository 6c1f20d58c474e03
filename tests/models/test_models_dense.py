"""Dense vision adapters (SegFormer, RT-DETR, DETR, Depth Anything, DPT) on tiny models built
from config and saved to a folder, loaded back as a user loads a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from distiq.models import build_dense, dense_model_type, is_dense_model, load_dense
from distiq.models.dense import cxcywh_to_xyxy, xyxy_to_cxcywh

FAMILIES = {
    "segformer": ("segmentation", 5),
    "rt_detr": ("detection", 4),
    "detr": ("detection", 4),
    "depth_anything": ("depth", 1),
    "dpt": ("depth", 1),
}


def _images(count: int = 2, size: tuple[int, int] = (40, 56)) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family's tiny model saved with its image processor (built once)."""
    out = {}
    for family, (_task, labels) in FAMILIES.items():
        model, adapter = build_dense(family, num_labels=labels, image_size=32, seed=1)
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path)
        adapter.save_pretrained(path)
        out[family] = path
    return out


@pytest.mark.parametrize("dense_family", FAMILIES)
def test_load_gives_the_saved_model_and_its_processing(dense_family, saved):
    path = saved[dense_family]
    assert dense_model_type(path) is not None
    model, adapter = load_dense(path)
    assert is_dense_model(model) and adapter.family == dense_family
    assert adapter.task == FAMILIES[dense_family][0]
    assert adapter.input_size == (32, 32)
    pixels = adapter.pixel_values(_images())
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
    again, _ = load_dense(path)
    with torch.no_grad():
        first = adapter.forward(model, pixels)
        second = adapter.forward(again, pixels)
    for name in ("logits", "boxes", "depth"):
        a, b = getattr(first, name), getattr(second, name)
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("dense_family", FAMILIES)
def test_quant_parts_name_existing_layers(dense_family, saved):
    model, adapter = load_dense(saved[dense_family])
    names = [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
    ]
    targets = adapter.quant_targets()
    for part in adapter.default_targets:
        assert any(targets[part].selects(n) for n in names), part
    stem = targets["patch_embedding"]
    stems = [n for n in names if stem.selects(n)]
    assert stems and not any(targets["backbone"].selects(n) for n in stems)
    for pattern in adapter.feature_patterns():
        assert pattern.replace(".*", "") in dict(model.named_modules())


def test_segmentation_predictions_are_at_each_original_size(saved):
    model, adapter = load_dense(saved["segformer"])
    images = [_images(1, (40, 56))[0], _images(1, (20, 24))[0]]
    with torch.no_grad():
        out = adapter.forward(model, adapter.pixel_values(images))
    maps = adapter.predict(out, [(40, 56), (20, 24)])
    assert [tuple(m.shape) for m in maps] == [(40, 56), (20, 24)]
    upsampled = adapter.upsampled_logits(out.logits[:1], (40, 56))
    assert torch.equal(maps[0], upsampled[0].argmax(0))


@pytest.mark.parametrize("dense_family", ["rt_detr", "detr"])
def test_detection_loss_is_the_models_own(dense_family, saved):
    """The task term is transformers' Hungarian-matched loss for the targets, unchanged."""
    model, adapter = load_dense(saved[dense_family])
    model.train()
    boxes = [torch.tensor([[4.0, 6.0, 30.0, 28.0]]), torch.tensor([[0.0, 0.0, 10.0, 12.0]])]
    labels = [torch.tensor([2]), torch.tensor([0])]
    targets = adapter.detection_targets(boxes, labels, [(40, 56), (40, 56)])
    torch.testing.assert_close(
        targets[0]["boxes"], torch.tensor([[17 / 56, 17 / 40, 26 / 56, 22 / 40]])
    )
    pixels = adapter.pixel_values(_images())
    torch.manual_seed(0)
    ours = adapter.forward(model, pixels, targets=targets)
    torch.manual_seed(0)
    theirs = model(pixel_values=pixels, labels=targets)
    torch.testing.assert_close(ours.loss, theirs.loss)
    assert ours.loss.requires_grad and set(ours.loss_terms) >= {"loss_bbox", "loss_giou"}


def test_rtdetr_training_forward_drops_its_denoising_queries():
    """With denoising queries (training with targets), RT-DETR's outputs put them before the
    model's Q queries; the adapter returns the Q queries, equal to the same forward's last Q."""
    model, adapter = build_dense(
        "rt_detr", num_labels=4, image_size=32, seed=1, config={"num_denoising": 6}
    )
    model.train()
    boxes = [torch.tensor([[4.0, 6.0, 30.0, 28.0]]), torch.tensor([[0.0, 0.0, 10.0, 12.0]])]
    targets = adapter.detection_targets(
        boxes, [torch.tensor([2]), torch.tensor([0])], [(32, 32)] * 2
    )
    pixels = adapter.pixel_values(_images(size=(32, 32)))
    torch.manual_seed(0)
    ours = adapter.forward(model, pixels, targets=targets)
    torch.manual_seed(0)
    theirs = model(pixel_values=pixels, labels=targets)
    queries = model.config.num_queries
    assert theirs.logits.shape[1] > queries  # the denoising queries are there
    assert ours.logits.shape[:2] == ours.boxes.shape[:2] == (2, queries)
    torch.testing.assert_close(ours.logits, theirs.logits[:, -queries:])
    torch.testing.assert_close(ours.boxes, theirs.pred_boxes[:, -queries:])


@pytest.mark.parametrize("dense_family", ["rt_detr", "detr"])
def test_detections_are_pixel_boxes_best_first(dense_family, saved):
    model, adapter = load_dense(saved[dense_family])
    with torch.no_grad():
        out = adapter.forward(model, adapter.pixel_values(_images()))
    found = adapter.predict(out, [(40, 56), (10, 20)], max_detections=7)
    for detections, (height, width) in zip(found, [(40, 56), (10, 20)]):
        assert len(detections["scores"]) == 7
        assert torch.all(detections["scores"][:-1] >= detections["scores"][1:])
        boxes = detections["boxes"]
        assert boxes[:, 0::2].max() <= width and boxes[:, 1::2].max() <= height
        assert int(detections["labels"].max()) < adapter.num_labels
    scores = adapter.scores(out.logits)
    assert scores.shape[-1] == adapter.num_labels
    if adapter.class_activation == "softmax":  # no-object left out of the class scores
        assert torch.all(scores.sum(-1) <= 1 + 1e-6)


@pytest.mark.parametrize("dense_family", ["depth_anything", "dpt"])
def test_depth_predictions_are_resized_maps(dense_family, saved):
    model, adapter = load_dense(saved[dense_family])
    with torch.no_grad():
        out = adapter.forward(model, adapter.pixel_values(_images()))
    maps = adapter.predict(out, [(40, 56), (12, 16)])
    assert [tuple(m.shape) for m in maps] == [(40, 56), (12, 16)]
    assert all(torch.isfinite(m).all() for m in maps)


def test_box_conversions_round_trip():
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.9], [0.0, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(cxcywh_to_xyxy(xyxy_to_cxcywh(boxes)), boxes)


def test_bad_folders_are_named(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_dense(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(ValueError, match="no dense adapter for model_type 'llava'.*segformer"):
        load_dense(tmp_path)
    with pytest.raises(KeyError, match="did you mean 'segformer'"):
        build_dense("segfromer")
