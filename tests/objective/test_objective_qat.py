"""The objective on fake-quantized students: pd, rounding, and a few training steps of the lot."""

import copy

import pytest
import torch

from distiq.distill import FeatureCapture, prediction_difference
from distiq.objective import QuantDistillObjective
from distiq.quant import (
    PerToken,
    QuantConfig,
    QuantSpec,
    fake_quant_disabled,
    fake_quant_modules,
    quantize_,
)

W4 = QuantSpec(bits=4, learnable=True)  # per-channel LSQ scales
A8 = QuantSpec(bits=8, symmetric=False, granularity=PerToken(), dynamic=True)


def fake_quantize_model(model, weight_spec=W4, activation_spec=A8):
    """Every nn.Linear but lm_head becomes a FakeQuantLinear sharing its parameters."""
    config = QuantConfig(weight=weight_spec, activation=activation_spec, exclude=("lm_head",))
    report = quantize_(model, config, step="prepare")
    assert len(report.changes) == 2 * 6  # 2 layers x (q, k, v, o, mlp.0, mlp.2)
    return model


@pytest.fixture
def pair(tiny_lm):
    torch.manual_seed(0)
    teacher = tiny_lm(depth=2).eval()
    student = fake_quantize_model(copy.deepcopy(teacher))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, student


def test_pd_reruns_the_student_in_full_precision_without_touching_captures(
    pair, make_batch, one_thread
):
    teacher, student = pair
    inputs, labels = make_batch()
    objective = QuantDistillObjective(
        {
            "terms": {
                "pd": {"weight": 0.5},
                "feat": {"student_layers": ["layers.*"], "teacher_layers": ["layers.*"]},
            }
        }
    ).attach(student=student, teacher=teacher)
    teacher(**inputs)
    quant_logits = student(**inputs)
    captured = [f.detach().clone() for f in objective._captured("feat.student")]
    out = objective(step=0, student_logits=quant_logits, labels=labels, student_inputs=inputs)
    for before, after in zip(captured, objective._captured("feat.student")):
        assert torch.equal(before, after)  # the fp rerun did not overwrite the quantized features
    objective.remove_hooks()
    with torch.no_grad(), fake_quant_disabled(student):
        fp_logits = student(**inputs)
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    torch.testing.assert_close(
        out.raw["pd"], prediction_difference(fp_logits, quant_logits, mask=mask).detach()
    )
    assert out.raw["pd"] > 0  # 4-bit weights do change the prediction
    assert all(m.fake_quant_enabled for _, m in fake_quant_modules(student))
    # pd off-steps are skipped, and a float student is refused
    every = QuantDistillObjective({"terms": {"pd": {"every": 2}}})
    assert (
        "pd"
        not in every(
            step=1,
            student_logits=quant_logits,
            labels=labels,
            student=student,
            student_inputs=inputs,
        ).terms
    )
    with pytest.raises(ValueError, match="no fake-quantized module"):
        every(
            step=0,
            student_logits=quant_logits,
            labels=labels,
            student=teacher,
            student_inputs=inputs,
        )


def test_rounding_term_is_the_mean_weight_quantization_error(pair):
    _, student = pair
    out = QuantDistillObjective({"terms": {"rounding": {"weight": 2.0}}}).attach(student=student)(
        step=0
    )
    errors = [
        ((m.weight - m.quantized_weight()) ** 2).mean() for _, m in fake_quant_modules(student)
    ]
    torch.testing.assert_close(out.raw["rounding"], torch.stack(errors).mean().detach())
    torch.testing.assert_close(out.total.detach(), 2.0 * out.raw["rounding"])
    out.total.backward()
    q_proj = student.layers[0].self_attn.q_proj
    assert q_proj.weight.grad.abs().sum() > 0
    assert q_proj.weight_quant.lsq.scale.grad.abs().sum() > 0  # reaches the learnable scales


def test_full_objective_trains_a_fake_quantized_transformer(pair, make_batch, one_thread):
    teacher, student = pair
    inputs, labels = make_batch(batch=4, seq=8)
    config = {
        "terms": {
            "task": {"weight": 1.0},
            "kd": {"weight": 1.0, "temperature": 2.0, "schedule": {"kind": "warmup", "steps": 3}},
            "feat": {"weight": 0.5, "student_layers": ["layers.*"], "teacher_layers": ["layers.*"]},
            "attn": {
                "weight": 0.1,
                "student_layers": ["layers.*.self_attn"],
                "teacher_layers": ["layers.*.self_attn"],
            },
            "pd": {"weight": 0.1},
            "qk_entropy": {"weight": 0.01},
            "rounding": {"weight": 1.0e-2},
        }
    }
    objective = QuantDistillObjective(config).attach(student=student, teacher=teacher)
    scales = {n: m.weight_quant.lsq.scale.detach().clone() for n, m in fake_quant_modules(student)}
    optimizer = torch.optim.Adam([*student.parameters(), *objective.parameters()], lr=1e-2)
    totals = []
    for step in range(12):
        with torch.no_grad():
            teacher_logits = teacher(**inputs)
        student_logits = student(**inputs)
        out = objective(
            step=step,
            student_logits=student_logits,
            teacher_logits=teacher_logits,
            labels=labels,
            attention_mask=inputs["attention_mask"],
            student_inputs=inputs,
        )
        assert set(out.terms) == {"task", "kd", "feat", "attn", "pd", "qk_entropy", "rounding"}
        assert out.non_finite() == []
        optimizer.zero_grad()
        out.total.backward()
        optimizer.step()
        totals.append(out.total.item())
    assert totals[-1] < 0.8 * totals[3], totals  # after the kd warm-up, the loss goes down
    moved = [
        n
        for n, m in fake_quant_modules(student)
        if not torch.equal(m.weight_quant.lsq.scale, scales[n])
    ]
    assert len(moved) == len(scales)  # every learnable quantizer scale moved
    objective.remove_hooks()
    with FeatureCapture(student, "layers.*"):
        pass
    for module in student.modules():
        assert not module._forward_hooks


def test_rounding_modules_select_subtrees(pair):
    _, student = pair
    first_layer = QuantDistillObjective({"terms": {"rounding": {"modules": ["layers.0"]}}}).attach(
        student=student
    )
    first_layer(step=0)
    names = [n for n, _ in first_layer._rounding_cache[1]]
    assert len(names) == 6 and all(n.startswith("layers.0.") for n in names)
    with pytest.raises(ValueError, match="no fake-quantized module"):
        QuantDistillObjective({"terms": {"rounding": {"modules": ["lm_head"]}}})(
            step=0, student=student
        )
