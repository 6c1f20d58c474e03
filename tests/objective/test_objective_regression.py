"""The ``reg`` term (regression distillation: boxes of matched queries, depth maps) and ``pd`` on
outputs without a class distribution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distiq.objective import QuantDistillObjective


def _giou_reference(a: list[float], b: list[float]) -> float:
    """GIoU of two xyxy boxes, from its definition."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


@pytest.mark.parametrize(
    ("loss", "reference"),
    [("l1", F.l1_loss), ("mse", F.mse_loss), ("smooth_l1", F.smooth_l1_loss)],
)
def test_reg_is_the_mean_distance_weighted(loss, reference):
    torch.manual_seed(0)
    student = torch.randn(6, 1, requires_grad=True)
    teacher = torch.randn(6, 1)
    objective = QuantDistillObjective({"terms": {"reg": {"weight": 0.5, "loss": loss}}})
    out = objective(
        step=0,
        student_regressions={"log_depth": student},
        teacher_regressions={"log_depth": teacher},
    )
    expected = reference(student, teacher)
    assert float(out.raw["reg"]) == pytest.approx(float(expected))
    assert float(out.terms["reg"]) == pytest.approx(0.5 * float(expected))
    out.total.backward()
    assert student.grad is not None


def test_reg_adds_giou_for_boxes():
    student = torch.tensor([[0.5, 0.5, 0.4, 0.2], [0.3, 0.3, 0.2, 0.2]])
    teacher = torch.tensor([[0.55, 0.45, 0.3, 0.3], [0.7, 0.7, 0.2, 0.2]])
    objective = QuantDistillObjective({"terms": {"reg": {"giou_weight": 2.0}}})
    out = objective(
        step=0, student_regressions={"boxes": student}, teacher_regressions={"boxes": teacher}
    )

    def xyxy(box):
        cx, cy, w, h = box.tolist()
        return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]

    gious = [_giou_reference(xyxy(s), xyxy(t)) for s, t in zip(student, teacher)]
    expected = float(F.l1_loss(student, teacher)) + 2.0 * sum(1 - g for g in gious) / 2
    assert float(out.raw["reg"]) == pytest.approx(expected, rel=1e-5)


def test_reg_needs_both_sides_and_matching_names():
    objective = QuantDistillObjective({"terms": {"reg": {}}})
    with pytest.raises(ValueError, match="student_regressions and teacher_regressions"):
        objective(step=0, student_regressions={"boxes": torch.zeros(1, 4)})
    with pytest.raises(ValueError, match="student \\['a'\\] and teacher \\['b'\\]"):
        objective(
            step=0,
            student_regressions={"a": torch.zeros(1, 1)},
            teacher_regressions={"b": torch.zeros(1, 1)},
        )


def test_pd_on_regressions_is_the_fp_to_quantized_l1():
    quant = torch.tensor([[1.0], [2.0], [4.0]], requires_grad=True)
    fp = torch.tensor([[1.5], [2.0], [3.0]])
    objective = QuantDistillObjective({"terms": {"pd": {"weight": 2.0}}})
    out = objective(
        step=0,
        student_regressions={"log_depth": quant},
        student_fp_regressions={"log_depth": fp},
    )
    assert float(out.raw["pd"]) == pytest.approx(0.5)
    assert float(out.terms["pd"]) == pytest.approx(1.0)
