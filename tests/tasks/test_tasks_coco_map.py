"""COCO mAP: equal to pycocotools' own file-based path on fixtures, and hand-checkable cases."""

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch

from distiq.tasks.coco_eval import COCO_STAT_NAMES, COCOMeanAP


def _fixture(seed, num_images=6, num_classes=3):
    """Ground truth and noisy detections (some missed, some duplicated, some false)."""
    rng = np.random.default_rng(seed)
    gt, dt = [], []
    for _ in range(num_images):
        n = int(rng.integers(0, 6))
        xy = rng.uniform(0, 80, size=(n, 2))
        wh = rng.uniform(4, 60, size=(n, 2))  # small, medium and large areas
        boxes = np.concatenate([xy, xy + wh], 1).round(1)
        labels = rng.integers(0, num_classes, size=n)
        gt.append((boxes, labels))
        keep = rng.random(n) > 0.2
        det = boxes[keep] + rng.normal(0, 3, size=(int(keep.sum()), 4))
        det_labels = labels[keep].copy()
        flip = rng.random(len(det_labels)) < 0.15
        det_labels[flip] = rng.integers(0, num_classes, size=int(flip.sum()))
        extra = int(rng.integers(0, 4))
        fxy = rng.uniform(0, 80, size=(extra, 2))
        fake = np.concatenate([fxy, fxy + rng.uniform(4, 40, size=(extra, 2))], 1)
        det = np.concatenate([det, fake, det[:1] + 1.0])  # + a near-duplicate
        det_labels = np.concatenate(
            [det_labels, rng.integers(0, num_classes, extra), det_labels[:1]]
        )
        det[:, 2:] = np.maximum(det[:, 2:], det[:, :2] + 0.5)
        scores = rng.uniform(0.05, 1.0, size=len(det)).round(4)
        dt.append((det, scores, det_labels))
    return gt, dt


def _pycocotools_from_files(tmp_path, gt, dt, num_classes):
    """The standard pycocotools route: COCO JSON on disk, COCO(file), loadRes(file)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, results = [], [], []
    for image_id, ((boxes, labels), (dboxes, scores, dlabels)) in enumerate(zip(gt, dt), start=7):
        images.append({"id": image_id, "width": 200, "height": 200, "file_name": f"{image_id}.png"})
        for box, label in zip(boxes.tolist(), labels.tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        for box, score, label in zip(dboxes.tolist(), scores.tolist(), dlabels.tolist()):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": label + 1,
                    "score": score,
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                }
            )
    cats = [{"id": c + 1, "name": f"class{c}"} for c in range(num_classes)]
    (tmp_path / "gt.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats})
    )
    (tmp_path / "dt.json").write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(tmp_path / "gt.json"))
        coco_dt = coco_gt.loadRes(str(tmp_path / "dt.json"))
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def _ours(gt, dt, num_classes, split=2):
    metric = COCOMeanAP(num_classes)
    for start in range(0, len(gt), split):  # several update() calls, tensors and arrays mixed
        batch = {
            "boxes": [torch.tensor(b) for b, _ in gt[start : start + split]],
            "labels": [labels for _, labels in gt[start : start + split]],
        }
        preds = [
            {"boxes": torch.tensor(b), "scores": s, "labels": torch.tensor(c)}
            for b, s, c in dt[start : start + split]
        ]
        metric.update(preds, batch)
    return metric.compute()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_equals_pycocotools_file_route(tmp_path, seed):
    gt, dt = _fixture(seed)
    reference = _pycocotools_from_files(tmp_path, gt, dt, 3)
    ours = _ours(gt, dt, 3)
    assert 0.05 < ours["map"] < 0.95  # a non-trivial case
    for name, value in zip(COCO_STAT_NAMES, reference):
        if value < 0:
            assert math.isnan(ours[name])
        else:
            assert ours[name] == pytest.approx(value, abs=1e-12), name


def _single(det_boxes, det_scores=None, det_labels=None, gt_box=(10.0, 10.0, 30.0, 30.0)):
    metric = COCOMeanAP(num_classes=2)
    det_boxes = torch.tensor(det_boxes, dtype=torch.float32).reshape(-1, 4)
    n = det_boxes.shape[0]
    metric.update(
        [
            {
                "boxes": det_boxes,
                "scores": torch.tensor(det_scores if det_scores is not None else [0.9] * n),
                "labels": torch.tensor(det_labels if det_labels is not None else [0] * n),
            }
        ],
        {"boxes": [torch.tensor([gt_box])], "labels": [torch.tensor([0])]},
    )
    return metric.compute()


def test_perfect_detections_score_one():
    gt, _ = _fixture(4)
    perfect = [(b, np.ones(len(b)), c) for b, c in gt]
    out = _ours(gt, perfect, 3)
    assert out["map"] == out["ap50"] == out["ap75"] == pytest.approx(1.0)


def test_no_detections_score_zero():
    out = _single([])
    assert out["map"] == 0.0 and out["ap50"] == 0.0 and out["ar100"] == 0.0


def test_wrong_class_scores_zero():
    assert _single([[10.0, 10.0, 30.0, 30.0]], det_labels=[1])["map"] == 0.0


def test_shifted_box_iou_thresholds():
    # shift 2 px on a 20x20 box: IoU = 360/440 = 0.818 -> matched at IoU .50 ... .80 (7 of 10)
    out = _single([[12.0, 10.0, 32.0, 30.0]])
    assert out["map"] == pytest.approx(0.7)
    assert out["ap50"] == out["ap75"] == pytest.approx(1.0)
    # shift 6 px: IoU = 280/520 = 0.538 -> matched only at .50
    out = _single([[16.0, 10.0, 36.0, 30.0]])
    assert out["map"] == pytest.approx(0.1)
    assert out["ap50"] == pytest.approx(1.0) and out["ap75"] == 0.0
    assert out["ap_small"] == pytest.approx(0.1) and math.isnan(out["ap_large"])  # 400 px² is small


def test_false_positive_above_the_true_one_halves_precision():
    # a higher-scored false box first: precision at recall 1 is 1/2 -> AP 0.5 at every IoU
    out = _single([[60.0, 60.0, 80.0, 80.0], [10.0, 10.0, 30.0, 30.0]], det_scores=[0.9, 0.5])
    assert out["map"] == pytest.approx(0.5, abs=0.01)  # 101-point interpolation


def test_bad_inputs_and_merge():
    metric = COCOMeanAP(2)
    with pytest.raises(ValueError, match="update"):
        metric.compute()
    with pytest.raises(ValueError, match="outside"):
        metric.update(
            [{"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([5])}],
            {"boxes": [torch.zeros(0, 4)], "labels": [torch.zeros(0, dtype=torch.long)]},
        )
    with pytest.raises(ValueError, match="num_classes"):
        metric.update(
            [{"boxes": torch.zeros(0, 4), "scores": torch.ones(0), "labels": torch.zeros(0)}],
            {"boxes": [torch.tensor([[0.0, 0, 4, 4]])], "labels": [torch.tensor([2])]},
        )
    gt, dt = _fixture(5)
    whole = _ours(gt, dt, 3)
    first, second = COCOMeanAP(3), COCOMeanAP(3)
    for metric, part in ((first, slice(0, 3)), (second, slice(3, None))):
        metric.update(
            [{"boxes": b, "scores": s, "labels": c} for b, s, c in dt[part]],
            {"boxes": [b for b, _ in gt[part]], "labels": [c for _, c in gt[part]]},
        )
    first.merge(second)
    assert first.compute() == pytest.approx(whole, nan_ok=True)
