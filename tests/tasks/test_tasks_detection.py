"""Detection: focal loss against its formula, FCOS assignment against a brute-force reference,
loss reductions, decoding, and the task end to end (train free outputs -> decode -> mAP)."""

import math

import pytest
import torch

from distiq.tasks.detection import (
    DetectionTask,
    assign_points,
    decode_detections,
    detection_losses,
    sigmoid_focal_loss,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: intra-op threads only add synchronisation (milliseconds per op when
    the machine's cores are busy), so the tests run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _grid(size=32, stride=8):
    centres = torch.arange(stride / 2, size, stride)
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)  # (P, 2), row-major like patches


def test_focal_loss_against_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, 3, generator=g, dtype=torch.float64) * 3
    targets = (torch.rand(4, 9, 3, generator=g) < 0.3).double()
    p = torch.sigmoid(logits)
    expected = -(
        targets * 0.25 * (1 - p) ** 2 * torch.log(p)
        + (1 - targets) * 0.75 * p**2 * torch.log(1 - p)
    )
    ours = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="none")
    assert torch.allclose(ours, expected, atol=1e-12, rtol=1e-10)
    assert torch.allclose(sigmoid_focal_loss(logits, targets), expected.sum())
    # gamma 0 and no alpha is plain binary cross-entropy
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert torch.allclose(
        sigmoid_focal_loss(logits, targets, alpha=None, gamma=0.0, reduction="mean"), bce
    )
    with pytest.raises(ValueError, match="reduction"):
        sigmoid_focal_loss(logits, targets, reduction="avg")


def _assign_reference(points, boxes, stride, center_sampling, radius):
    out = []
    for x, y in points.tolist():
        best, best_area = -1, math.inf
        for n, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
            rx1, ry1, rx2, ry2 = x1, y1, x2, y2
            if center_sampling:
                cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
                rx1, ry1 = max(x1, cx - radius * stride), max(y1, cy - radius * stride)
                rx2, ry2 = min(x2, cx + radius * stride), min(y2, cy + radius * stride)
            if min(x - rx1, y - ry1, rx2 - x, ry2 - y) > 0:
                area = (x2 - x1) * (y2 - y1)
                if area < best_area:
                    best, best_area = n, area
        out.append(best)
    return out


def test_assignment_hand_case():
    points = _grid()  # x, y in {4, 12, 20, 28}
    big, small = [0.0, 0.0, 32.0, 32.0], [8.0, 8.0, 24.0, 24.0]
    matched = assign_points(points, torch.tensor([big, small]), stride=8, center_sampling=False)
    grid = matched.reshape(4, 4)
    assert grid[1:3, 1:3].eq(1).all()  # the smaller box wins where both contain the point
    assert grid[0].eq(0).all() and grid[:, 0].eq(0).all()
    wide = torch.tensor([[0.0, 0.0, 30.0, 14.0]])  # centre (15, 7), region ±12 px
    without = assign_points(points, wide, stride=8, center_sampling=False).reshape(4, 4)
    with_centre = assign_points(points, wide, stride=8, center_radius=1.5).reshape(4, 4)
    assert without[:2].eq(0).all() and without[2:].eq(-1).all()
    assert with_centre[:2, :3].eq(0).all() and with_centre[:2, 3].eq(-1).all()  # x = 28 > 27
    assert assign_points(points, torch.zeros(0, 4), stride=8).eq(-1).all()


@pytest.mark.parametrize("center_sampling", [False, True])
def test_assignment_against_brute_force(center_sampling):
    g = torch.Generator().manual_seed(1)
    points = _grid(64, 8)
    for _ in range(5):
        xy = torch.rand(6, 2, generator=g) * 48
        boxes = torch.cat([xy, xy + 4 + torch.rand(6, 2, generator=g) * 30], 1).round()
        ours = assign_points(
            points, boxes, stride=8, center_sampling=center_sampling, center_radius=1.0
        )
        assert ours.tolist() == _assign_reference(points, boxes, 8, center_sampling, 1.0)


def _outputs_for(gt_boxes, gt_labels, num_classes=3, size=32, stride=8, logit=6.0):
    """Outputs that predict the ground truth exactly at every positive point."""
    points = _grid(size, stride)
    cls_logits = torch.full((len(gt_boxes), len(points), num_classes), -logit)
    ltrb = torch.full((len(gt_boxes), len(points), 4), 2.0)
    for i, (boxes, labels) in enumerate(zip(gt_boxes, gt_labels)):
        matched = assign_points(points, boxes, stride=stride)
        for p in torch.nonzero(matched >= 0).squeeze(1).tolist():
            box = boxes[matched[p]]
            cls_logits[i, p, labels[matched[p]]] = logit
            x, y = points[p].tolist()
            ltrb[i, p] = torch.tensor([x - box[0], y - box[1], box[2] - x, box[3] - y])
    return {"cls_logits": cls_logits, "box_ltrb": ltrb, "points": points, "stride": stride}


def test_losses_zero_box_error_for_exact_boxes_and_focal_normalisation():
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 20.0], [16.0, 16.0, 32.0, 32.0]]), torch.zeros(0, 4)]
    labels = [torch.tensor([0, 2]), torch.zeros(0, dtype=torch.long)]
    outputs = _outputs_for(boxes, labels)
    losses, positive = detection_losses(outputs, list(zip(boxes, labels)), num_classes=3)
    num_pos = int(positive.sum())
    assert num_pos > 0 and not positive[1].any()
    assert losses["l1"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["giou"].item() == pytest.approx(0.0, abs=1e-5)
    targets = (outputs["cls_logits"] > 0).float()
    expected = sigmoid_focal_loss(outputs["cls_logits"], targets) / num_pos
    assert losses["focal"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_l1_is_in_strides_and_giou_matches_decoded_boxes():
    boxes, labels = [torch.tensor([[4.0, 4.0, 28.0, 28.0]])], [torch.tensor([1])]
    outputs = _outputs_for(boxes, labels)
    positive = assign_points(outputs["points"], boxes[0], stride=8) >= 0
    outputs["box_ltrb"] = outputs["box_ltrb"].clone()
    outputs["box_ltrb"][0, positive, 2] += 4.0  # every positive box 4 px too wide on the right
    losses, _ = detection_losses(outputs, list(zip(boxes, labels)), num_classes=3)
    assert losses["l1"].item() == pytest.approx(4.0 / 4 / 8)  # one side of four, in strides
    assert losses["giou"].item() == pytest.approx(1 - 24 * 24 / (28 * 24), abs=1e-6)


def test_no_ground_truth_gives_finite_loss_and_gradient():
    task = DetectionTask(num_classes=3)
    cls_logits = torch.randn(2, 16, 3, requires_grad=True)
    box_ltrb = torch.rand(2, 16, 4, requires_grad=True)
    outputs = {"cls_logits": cls_logits, "box_ltrb": box_ltrb, "points": _grid(), "stride": 8}
    empty = {"boxes": [torch.zeros(0, 4)] * 2, "labels": [torch.zeros(0, dtype=torch.long)] * 2}
    out = task.loss(outputs, empty)
    out.total.backward()
    assert out.stats["num_positive"] == 0 and torch.isfinite(out.total)
    assert torch.isfinite(cls_logits.grad).all() and box_ltrb.grad.abs().sum() == 0


def test_padded_ground_truth_equals_lists_and_bad_labels_raise():
    task = DetectionTask(num_classes=3)
    boxes = [
        torch.tensor([[0.0, 0.0, 20.0, 20.0], [16.0, 16.0, 32.0, 32.0]]),
        torch.tensor([[8.0, 8.0, 24.0, 24.0]]),
    ]
    labels = [torch.tensor([0, 2]), torch.tensor([1])]
    g = torch.Generator().manual_seed(2)
    outputs = {
        "cls_logits": torch.randn(2, 16, 3, generator=g),
        "box_ltrb": torch.rand(2, 16, 4, generator=g) * 10,
        "points": _grid(),
        "stride": 8,
    }
    as_lists = task.loss(outputs, {"boxes": boxes, "labels": labels})
    padded = {
        "boxes": torch.stack([boxes[0], torch.cat([boxes[1], torch.zeros(1, 4)])]),
        "labels": torch.tensor([[0, 2], [1, -1]]),
    }
    assert torch.equal(task.loss(outputs, padded).total, as_lists.total)
    assert torch.equal(as_lists.total, sum(as_lists.terms.values()))
    with pytest.raises(ValueError, match="outside"):
        task.loss(outputs, {"boxes": boxes, "labels": [torch.tensor([0, 3]), labels[1]]})
    with pytest.raises(ValueError, match="num_classes"):
        DetectionTask(num_classes=4).loss(outputs, {"boxes": boxes, "labels": labels})
    with pytest.raises(KeyError, match="points"):
        task.loss({"cls_logits": outputs["cls_logits"]}, {"boxes": boxes, "labels": labels})
    with pytest.raises(ValueError, match="focal_alpha"):
        DetectionTask(num_classes=3, focal_alpha=2.0)


def test_decode_keeps_one_box_per_object_and_scores_perfect_map():
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 20.0], [16.0, 16.0, 32.0, 32.0]])]
    labels = [torch.tensor([0, 2])]
    outputs = _outputs_for(boxes, labels)
    detections = decode_detections(outputs, image_size=(32, 32))
    assert len(detections) == 1
    found = detections[0]
    assert sorted(found["labels"].tolist()) == [0, 2]  # duplicates from several points suppressed
    assert torch.allclose(found["boxes"][found["labels"].argsort()], boxes[0])
    assert bool((found["scores"][:-1] >= found["scores"][1:]).all())
    task = DetectionTask(num_classes=3)
    metric = task.metric()
    metric.update(task.predict(outputs), {"boxes": boxes, "labels": labels})
    assert metric.compute()["map"] == pytest.approx(1.0)
    few = decode_detections(outputs, score_threshold=0.999)
    assert few[0]["boxes"].shape == (0, 4)


def test_distill_view_binary_distributions():
    task = DetectionTask(num_classes=3)
    g = torch.Generator().manual_seed(3)
    outputs = {
        "cls_logits": torch.randn(2, 16, 3, generator=g),
        "box_ltrb": torch.rand(2, 16, 4, generator=g),
        "points": _grid(),
        "stride": 8,
    }
    view = task.distill_view(outputs)
    binary = view["distributions"]["cls"]["logits"]
    assert binary.shape == (2, 16, 3, 2)
    assert torch.allclose(torch.softmax(binary, -1)[..., 1], torch.sigmoid(outputs["cls_logits"]))
    assert torch.allclose(view["regressions"]["box_ltrb"]["values"], outputs["box_ltrb"] / 8)
    assert view["regressions"]["box_ltrb"]["mask"] is None
    batch = {
        "boxes": [torch.tensor([[0.0, 0.0, 20.0, 20.0]]), torch.zeros(0, 4)],
        "labels": [torch.tensor([1]), torch.zeros(0, dtype=torch.long)],
    }
    mask = task.distill_view(outputs, batch)["regressions"]["box_ltrb"]["mask"]
    assert mask.shape == (2, 16) and mask[0].any() and not mask[1].any()


def test_fitting_free_outputs_lowers_loss_and_recovers_the_box():
    task = DetectionTask(num_classes=2)
    points = _grid()
    batch = {"boxes": [torch.tensor([[6.0, 5.0, 27.0, 22.0]])], "labels": [torch.tensor([1])]}
    cls_logits = torch.zeros(1, 16, 2, requires_grad=True)
    raw_ltrb = torch.zeros(1, 16, 4, requires_grad=True)
    losses = []
    for _ in range(60):  # plain gradient descent (torch.optim would import torch._dynamo: seconds)
        outputs = {
            "cls_logits": cls_logits,
            "box_ltrb": torch.nn.functional.softplus(raw_ltrb) * 8,
            "points": points,
            "stride": 8,
        }
        loss = task.loss(outputs, batch).total
        grads = torch.autograd.grad(loss, [cls_logits, raw_ltrb])
        with torch.no_grad():
            cls_logits -= grads[0]
            raw_ltrb -= grads[1]
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    best = task.predict(outputs)[0]
    assert best["labels"][0] == 1
    assert torch.allclose(best["boxes"][0], batch["boxes"][0][0], atol=0.5)
