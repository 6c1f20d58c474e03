"""Segmentation: mIoU / per-class IoU / pixel accuracy against a numpy reference with the ignore
index respected, the data-set accumulator, CE + Dice against float64 references."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distiq.tasks.segmentation import (
    ConfusionMatrix,
    SegmentationTask,
    confusion_matrix,
    dice_loss,
    mean_iou,
    per_class_iou,
    pixel_accuracy,
)


def _maps(seed, shape=(3, 17, 23), num_classes=5, ignore_fraction=0.2, absent=(3,)):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, num_classes, size=shape)
    for c in absent:  # a class missing from the ground truth
        target[target == c] = 0
    pred = np.where(rng.random(shape) < 0.6, target, rng.integers(0, num_classes, size=shape))
    target[rng.random(shape) < ignore_fraction] = 255
    return pred, target


def _reference(pred, target, num_classes, ignore_index=255):
    valid = target != ignore_index
    p, t = pred[valid], target[valid]
    ious = []
    for c in range(num_classes):
        inter = np.sum((p == c) & (t == c))
        union = np.sum((p == c) | (t == c))
        ious.append(inter / union if union else np.nan)
    ious = np.array(ious)
    return np.nanmean(ious), ious, np.mean(p == t)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mean_iou_against_numpy_reference(seed):
    pred, target = _maps(seed)
    miou, ious, accuracy = _reference(pred, target, 5)
    assert mean_iou(torch.from_numpy(pred), torch.from_numpy(target), 5) == pytest.approx(
        miou, abs=1e-12
    )
    assert mean_iou(pred, target, 5) == pytest.approx(miou, abs=1e-12)  # numpy input
    ours = per_class_iou(pred, target, 5).numpy()
    assert np.allclose(ours, ious, atol=1e-12, equal_nan=True)
    assert pixel_accuracy(pred, target, 5) == pytest.approx(accuracy, abs=1e-12)


def test_ignore_index_is_respected():
    pred, target = _maps(3)
    before = mean_iou(pred, target, 5)
    scrambled = pred.copy()
    ignored = target == 255
    scrambled[ignored] = (scrambled[ignored] + 1) % 5  # change predictions on ignored pixels only
    assert mean_iou(scrambled, target, 5) == before
    assert confusion_matrix(pred, target, 5).sum() == (~ignored).sum()
    # a custom ignore index
    other = np.where(target == 255, 7, target)
    assert mean_iou(pred, other, 5, ignore_index=7) == before
    assert math.isnan(mean_iou(pred, np.full_like(target, 255), 5))


def test_hand_case_and_undefined_classes():
    target = torch.tensor([[0, 0, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 2]])  # the 2 sits on an ignored pixel
    ious = per_class_iou(pred, target, 4)
    assert ious[0].item() == pytest.approx(0.5) and ious[1].item() == pytest.approx(0.5)
    assert math.isnan(ious[2]) and math.isnan(ious[3])  # in neither prediction nor truth
    assert mean_iou(pred, target, 4) == pytest.approx(0.5)
    assert pixel_accuracy(pred, target, 4) == pytest.approx(2 / 3)


def test_bad_label_maps_raise():
    with pytest.raises(ValueError, match="class 9"):
        mean_iou(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 9), 5)
    with pytest.raises(ValueError, match="pred holds"):
        mean_iou(torch.full((2, 2), 5), torch.zeros(2, 2, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="differ"):
        mean_iou(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long), 5)
    with pytest.raises(TypeError, match="integer"):
        mean_iou(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), 5)


def test_accumulator_sums_over_the_data_set_and_merges():
    pred, target = _maps(4, shape=(6, 9, 11))
    miou, ious, accuracy = _reference(pred, target, 5)
    first, second = (
        ConfusionMatrix(5, class_names=list("abcde")),
        ConfusionMatrix(5, class_names=list("abcde")),
    )
    first.update(torch.from_numpy(pred[:2]), {"mask": torch.from_numpy(target[:2])})
    first.update(torch.from_numpy(pred[2:4]), {"mask": torch.from_numpy(target[2:4])})
    second.update(torch.from_numpy(pred[4:]), {"mask": torch.from_numpy(target[4:])})
    first.merge(second)
    out = first.compute()
    assert out["miou"] == pytest.approx(miou, abs=1e-12)  # not a mean of per-batch mIoUs
    assert out["pixel_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    for name, iou in zip("abcde", ious):
        assert math.isnan(iou) == (f"iou/{name}" not in out)
        assert math.isnan(iou) or out[f"iou/{name}"] == pytest.approx(iou, abs=1e-12)
    first.reset()
    with pytest.raises(ValueError, match="no valid pixel"):
        first.compute()


def test_cross_entropy_and_dice_against_float64_references():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 4, 6, 7, generator=g, dtype=torch.float64)
    target = torch.randint(0, 4, (2, 6, 7), generator=g)
    target[0, :2] = 255
    task = SegmentationTask(num_classes=4, weight_ce=1.0, weight_dice=0.5)
    out = task.loss(logits, {"mask": target})
    log_probs = F.log_softmax(logits, dim=1)
    valid = target != 255
    ce_terms = [-log_probs[b, target[b, i, j], i, j] for b, i, j in torch.nonzero(valid).tolist()]
    assert out.terms["ce"].item() == pytest.approx(torch.stack(ce_terms).mean().item(), rel=1e-6)
    probs = torch.softmax(logits, dim=1)
    dices = []
    for c in range(4):
        p = probs[:, c][valid]
        t = (target[valid] == c).double()
        dices.append((2 * (p * t).sum() + 1.0) / (p.sum() + t.sum() + 1.0))
    expected_dice = 1 - torch.stack(dices).mean()
    assert out.terms["dice"].item() == pytest.approx(0.5 * expected_dice.item(), rel=1e-6)
    assert torch.equal(out.total, out.terms["ce"] + out.terms["dice"])
    assert out.stats["valid_pixels"] == int(valid.sum())


def test_perfect_logits_and_all_ignored_batches():
    target = torch.randint(0, 3, (1, 5, 5))
    perfect = F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 40.0
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    task = SegmentationTask(num_classes=3)
    logits = torch.randn(1, 3, 5, 5, requires_grad=True)
    out = task.loss({"logits": logits}, {"mask": torch.full((1, 5, 5), 255)})
    out.total.backward()
    assert out.terms["ce"].item() == 0.0 and torch.isfinite(out.total)
    assert torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="upsample"):
        task.loss(torch.randn(1, 3, 4, 4), {"mask": target})
    with pytest.raises(ValueError, match="outside"):
        task.loss(torch.randn(1, 3, 5, 5), {"mask": torch.full((1, 5, 5), 3)})
    with pytest.raises(ValueError, match="ignore_index"):
        SegmentationTask(num_classes=3, ignore_index=1)


def test_segmentation_task_view_predict_metric():
    task = SegmentationTask(num_classes=3, class_names=("road", "car", "sky"))
    logits = torch.randn(2, 3, 4, 5)
    view = task.distill_view(logits)
    pixel = view["distributions"]["pixel_classes"]
    assert pixel["logits"].shape == (2, 4, 5, 3) and pixel["mask"] is None
    assert torch.allclose(
        torch.softmax(pixel["logits"], -1), torch.softmax(logits, 1).permute(0, 2, 3, 1)
    )
    masked = SegmentationTask(num_classes=3, distill_mask_ignored=True)
    mask = torch.zeros(2, 4, 5, dtype=torch.long)
    mask[0, 0, 0] = 255
    assert (
        masked.distill_view(logits, {"mask": mask})["distributions"]["pixel_classes"]["mask"].sum()
        == 39
    )
    prediction = task.predict(logits)
    assert torch.equal(prediction, logits.argmax(1))
    metric = task.metric()
    metric.update(prediction, {"mask": prediction})
    out = metric.compute()
    assert out["miou"] == 1.0 and out["pixel_accuracy"] == 1.0
    assert set(out) >= {"iou/road", "iou/car", "iou/sky", "mean_accuracy"}
