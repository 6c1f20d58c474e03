"""Box ops: IoU / GIoU against float64 references written from the definitions, NMS against a
brute-force greedy reference."""

import random

import pytest
import torch

from distiq.tasks.boxes import batched_nms, box_iou, elementwise_giou, nms


def _random_boxes(n, generator, size=50.0):
    xy = torch.rand(n, 2, generator=generator) * size
    wh = torch.rand(n, 2, generator=generator) * size / 2
    return torch.cat([xy, xy + wh], dim=1)


def _iou_ref(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0, union


def _giou_ref(a, b):
    iou, union = _iou_ref(a, b)
    enclose = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return iou - (enclose - union) / enclose


def test_giou_against_float64_reference():
    g = torch.Generator().manual_seed(0)
    a, b = _random_boxes(300, g).double(), _random_boxes(300, g).double()
    b[:10] = a[:10]  # identical boxes: GIoU 1
    ours = elementwise_giou(a, b, eps=0.0)
    ref = torch.tensor(
        [_giou_ref(x.tolist(), y.tolist()) for x, y in zip(a, b)], dtype=torch.float64
    )
    assert torch.allclose(ours, ref, atol=1e-12, rtol=0)
    assert torch.allclose(ours[:10], torch.ones(10, dtype=torch.float64))
    assert bool((ours >= -1).all() and (ours <= 1).all())
    # float32 with the default eps stays within float rounding of the reference
    assert torch.allclose(elementwise_giou(a.float(), b.float()).double(), ref, atol=1e-5)


def test_giou_hand_cases_and_gradient():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    # disjoint boxes: union 8, enclosing box 5x2 = 10: GIoU = 0 - 2/10
    assert elementwise_giou(a, torch.tensor([[3.0, 0.0, 5.0, 2.0]])).item() == pytest.approx(-0.2)
    # touching boxes: the enclosing box is the union: GIoU = 0
    assert elementwise_giou(a, torch.tensor([[2.0, 0.0, 4.0, 2.0]])).item() == pytest.approx(0.0)
    # half overlap: inter 2, union 6, enclosing 6: GIoU = 1/3
    assert elementwise_giou(a, torch.tensor([[1.0, 0.0, 3.0, 2.0]])).item() == pytest.approx(1 / 3)
    pred = torch.tensor([[0.0, 0.0, 0.0, 0.0]], requires_grad=True)  # degenerate box stays finite
    value = elementwise_giou(pred, a)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(pred.grad).all()


def test_box_iou_matrix_against_reference():
    g = torch.Generator().manual_seed(1)
    a, b = _random_boxes(20, g).double(), _random_boxes(30, g).double()
    ours = box_iou(a, b)
    for i in range(20):
        for j in range(30):
            assert ours[i, j].item() == pytest.approx(
                _iou_ref(a[i].tolist(), b[j].tolist())[0], abs=1e-12
            )


def _nms_reference(boxes, scores, threshold):
    remaining = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept = []
    while remaining:
        best = remaining.pop(0)
        kept.append(best)
        remaining = [i for i in remaining if _iou_ref(boxes[best], boxes[i])[0] <= threshold]
    return kept


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7])
def test_nms_against_brute_force(threshold):
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        boxes = _random_boxes(60, g, size=30.0).double()
        scores = torch.rand(60, generator=g, dtype=torch.float64)
        scores[5] = scores[6]  # a tie: the lower index goes first
        ours = nms(boxes, scores, threshold).tolist()
        assert ours == _nms_reference(boxes.tolist(), scores.tolist(), threshold)


def test_batched_nms_is_per_class():
    rng = random.Random(3)
    g = torch.Generator().manual_seed(3)
    boxes = _random_boxes(80, g, size=30.0).double()
    scores = torch.rand(80, generator=g, dtype=torch.float64)
    labels = torch.tensor([rng.randrange(3) for _ in range(80)])
    ours = batched_nms(boxes, scores, labels, 0.5)
    expected = []
    for c in range(3):
        idx = [i for i in range(80) if labels[i] == c]
        kept = _nms_reference(
            [boxes[i].tolist() for i in idx], [scores[i].item() for i in idx], 0.5
        )
        expected += [idx[k] for k in kept]
    assert sorted(ours.tolist()) == sorted(expected)
    assert bool((scores[ours][:-1] >= scores[ours][1:]).all())  # sorted by score
    # two identical boxes of different classes both survive
    same = torch.tensor([[0.0, 0.0, 5.0, 5.0]] * 2)
    assert len(batched_nms(same, torch.tensor([0.9, 0.8]), torch.tensor([0, 1]), 0.5)) == 2
    assert len(batched_nms(same, torch.tensor([0.9, 0.8]), torch.tensor([1, 1]), 0.5)) == 1
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0
