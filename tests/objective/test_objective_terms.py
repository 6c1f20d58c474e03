"""QuantDistillObjective on full-precision tiny models: sums, masks, T², Hinton, features."""

import logging

import pytest
import torch
import torch.nn.functional as F

from distiq.distill import kl_divergence, teacher_topk
from distiq.objective import LossOutput, QuantDistillObjective


def hinton_kd_loss(student_logits, teacher_logits, labels, temperature, alpha, kl_reduction):
    """The usual knowledge-distillation loss of KD codebases (Hinton et al. 2015)."""
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.softmax(teacher_logits / temperature, dim=-1),
        reduction=kl_reduction,
    ) * (temperature**2)
    hard = F.cross_entropy(student_logits, labels)
    return alpha * soft + (1.0 - alpha) * hard


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
def test_hinton_loss_is_reproduced_exactly():
    n, v, temperature, alpha = 8, 10, 4.0, 0.7
    student, teacher = torch.randn(n, v) * 3, torch.randn(n, v) * 3
    labels = torch.randint(0, v, (n,))
    # classification: no label shift, every sample counts
    config = {
        "shift_labels": False,
        "terms": {
            "task": {"weight": 1.0 - alpha},
            "kd": {"weight": alpha, "temperature": temperature, "tokens": "all"},
        },
    }
    out = QuantDistillObjective(config)(
        step=0, student_logits=student, teacher_logits=teacher, labels=labels
    )
    want = hinton_kd_loss(student, teacher, labels, temperature, alpha, "batchmean")
    torch.testing.assert_close(out.total, want)
    assert out.weights["kd"] == pytest.approx(alpha * temperature**2)  # T² applied here, once
    torch.testing.assert_close(
        out.raw["kd"], kl_divergence(student, teacher, temperature=temperature)
    )
    # implementations with F.kl_div(reduction="mean") divide the KL by the V classes as well:
    # the same number comes out of distiq with kd.weight = α / V
    config["terms"]["kd"]["weight"] = alpha / v
    quirk = QuantDistillObjective(config)(
        step=0, student_logits=student, teacher_logits=teacher, labels=labels
    )
    torch.testing.assert_close(
        quirk.total, hinton_kd_loss(student, teacher, labels, temperature, alpha, "mean")
    )


def test_total_is_the_sum_of_terms_and_token_terms_see_answers_only(tiny_lm, make_batch, hf_ce):
    torch.manual_seed(0)
    student, teacher = tiny_lm(), tiny_lm()
    inputs, labels = make_batch()
    config = {
        "terms": {
            "task": {"weight": 0.7},
            "kd": {"weight": 0.4, "temperature": 2.0, "divergence": "js", "beta": 0.3},
            "feat": {"weight": 0.2},
            "attn": {"weight": 0.3, "inputs": "logits"},
        }
    }
    objective = QuantDistillObjective(config)
    s_logits, t_logits = student(**inputs), teacher(**inputs)
    feats = [torch.randn(3, 7, 16, requires_grad=True) for _ in range(2)]
    t_feats = [torch.randn(3, 7, 16) for _ in range(4)]
    s_attn = [torch.randn(3, 2, 7, 7, requires_grad=True)]
    t_attn = [torch.randn(3, 2, 7, 7)]
    kwargs = dict(
        step=3,
        labels=labels,
        attention_mask=inputs["attention_mask"],
        student_features=feats,
        teacher_features=t_feats,
        student_attentions=s_attn,
        teacher_attentions=t_attn,
    )
    out = objective(student_logits=s_logits, teacher_logits=t_logits, **kwargs)
    assert isinstance(out, LossOutput) and set(out.terms) == {"task", "kd", "feat", "attn"}
    assert torch.equal(out.total, sum(out.terms.values(), torch.zeros(())))
    for name, weight in out.weights.items():
        torch.testing.assert_close(out.terms[name].detach(), weight * out.raw[name])
    torch.testing.assert_close(out.raw["task"], hf_ce(s_logits, labels))  # HF's causal-LM loss
    assert out.weights["kd"] == pytest.approx(0.4 * 4.0)
    # answer tokens only: logits at prompt and padding positions change nothing
    answer_pos = torch.zeros_like(labels, dtype=torch.bool)
    answer_pos[:, :-1] = labels[:, 1:] != -100
    s2, t2 = s_logits.detach().clone(), t_logits.detach().clone()
    s2[~answer_pos] = torch.randn(int((~answer_pos).sum()), 13) * 9
    t2[~answer_pos] = torch.randn(int((~answer_pos).sum()), 13) * 9
    out2 = objective(student_logits=s2, teacher_logits=t2, **kwargs)
    torch.testing.assert_close(out2.raw["kd"], out.raw["kd"])
    torch.testing.assert_close(out2.raw["task"], out.raw["task"])
    out.total.backward()
    assert all(torch.isfinite(f.grad).all() for f in feats)
    logs = out.log_dict()
    assert {"loss", "loss/kd", "raw/feat", "weight/attn", "temperature"} <= set(logs)
    assert out.non_finite() == []


def test_answer_mask_and_tokens_all(make_batch):
    inputs, labels = make_batch()
    s, t = torch.randn(3, 7, 13), torch.randn(3, 7, 13)
    by_labels = QuantDistillObjective({"terms": {"kd": {}}})(
        step=0, student_logits=s, teacher_logits=t, labels=labels
    )
    by_mask = QuantDistillObjective({"terms": {"kd": {}}})(
        step=0, student_logits=s, teacher_logits=t, answer_mask=labels != -100
    )
    torch.testing.assert_close(by_labels.total, by_mask.total)
    every = QuantDistillObjective({"terms": {"kd": {"tokens": "all"}}})(
        step=0, student_logits=s, teacher_logits=t, attention_mask=inputs["attention_mask"]
    )
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(every.total, kl_divergence(s, t, mask=valid))
    with pytest.raises(ValueError, match="neither labels nor answer_mask"):
        QuantDistillObjective({"terms": {"kd": {}}})(step=0, student_logits=s, teacher_logits=t)


def test_vocabulary_mismatch_is_reported_clearly():
    objective = QuantDistillObjective({"terms": {"kd": {"tokens": "all"}}})
    with pytest.raises(ValueError, match="student predicts 13 classes but the teacher 15"):
        objective(step=0, student_logits=torch.randn(2, 13), teacher_logits=torch.randn(2, 15))


def test_cached_topk_teacher_equals_full_teacher_when_k_is_v(make_batch):
    _, labels = make_batch()
    s, t = torch.randn(3, 7, 13, dtype=torch.float64), torch.randn(3, 7, 13, dtype=torch.float64)
    objective = QuantDistillObjective({"terms": {"kd": {"temperature": 2.0}}})
    full = objective(step=0, student_logits=s, teacher_logits=t, labels=labels)
    cached = objective(
        step=0, student_logits=s, teacher_topk=teacher_topk(t, 13, temperature=2.0), labels=labels
    )
    torch.testing.assert_close(cached.total, full.total)
    sparse = objective(
        step=0, student_logits=s, teacher_topk=teacher_topk(t, 3, temperature=2.0), labels=labels
    )
    assert 0 < sparse.total < full.total


def test_sigmoid_distribution_and_confidence_aware_kd():
    s, t = torch.randn(2, 5, 4), torch.randn(2, 5, 4)  # detection: (B, points, classes)
    out = QuantDistillObjective({"terms": {"kd": {"distribution": "sigmoid", "tokens": "all"}}})(
        step=0, student_logits=s, teacher_logits=t
    )
    ps, pt = torch.sigmoid(s.double()), torch.sigmoid(t.double())
    bern = (pt * torch.log(pt / ps) + (1 - pt) * torch.log((1 - pt) / (1 - ps))).sum(-1).mean()
    torch.testing.assert_close(out.total.double(), bern)
    cakl = QuantDistillObjective(
        {"terms": {"kd": {"divergence": "confidence_aware_kl", "tokens": "all"}}}
    )(step=0, student_logits=s, teacher_logits=t)
    assert 0 < float(cakl.extras["kd_confidence"]) < 1


def test_feature_term_projects_maps_layers_and_weights_modalities(caplog):
    torch.manual_seed(0)
    student_feats = [torch.randn(2, 5, 6, requires_grad=True) for _ in range(2)]
    teacher_feats = [torch.randn(2, 5, 8) for _ in range(4)]
    visual = torch.zeros(2, 5, dtype=torch.bool)
    visual[:, :2] = True
    config = {
        "terms": {"feat": {"visual_weight": 0.0, "text_weight": 1.0, "layer_weights": [1.0, 3.0]}}
    }
    objective = QuantDistillObjective(config)
    with caplog.at_level(logging.INFO, logger="distiq.objective"):
        names = objective.prepare(
            step=0,
            student_features=student_feats,
            teacher_features=teacher_feats,
            visual_mask=visual,
        )
    assert names == ["projections.pair0.linear.weight", "projections.pair1.linear.weight"]
    assert "created a learned projection 6 -> 8" in caplog.text
    out = objective(
        step=0, student_features=student_feats, teacher_features=teacher_feats, visual_mask=visual
    )
    # uniform map 2 -> 4 layers pairs (0, 1), (1, 3); visual tokens weigh nothing
    want = 0.0
    for k, (i, j) in enumerate([(0, 1), (1, 3)]):
        projected = objective.projections[f"pair{k}"](student_feats[i])
        want = want + [1.0, 3.0][k] * F.mse_loss(projected[:, 2:], teacher_feats[j][:, 2:])
    torch.testing.assert_close(out.total, want)
    out.total.backward()
    assert objective.projections["pair1"].linear.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="project is false"):
        QuantDistillObjective({"terms": {"feat": {"project": False}}})(
            step=0, student_features=student_feats, teacher_features=teacher_feats
        )
    with pytest.raises(ValueError, match="layer_weights has 1 entries but 2"):
        QuantDistillObjective({"terms": {"feat": {"layer_weights": [1.0]}}})(
            step=0, student_features=student_feats, teacher_features=teacher_feats
        )
    with pytest.raises(ValueError, match="disagree in their token dimensions"):
        QuantDistillObjective({"terms": {"feat": {}}})(
            step=0, student_features=[torch.randn(2, 4, 8)], teacher_features=[torch.randn(2, 5, 8)]
        )


def test_attached_hooks_supply_features_attention_and_qk(tiny_lm, make_batch):
    torch.manual_seed(0)
    student, teacher = tiny_lm(depth=2), tiny_lm(depth=4)
    inputs, _ = make_batch()
    config = {
        "terms": {
            "feat": {"student_layers": ["layers.*"], "teacher_layers": ["layers.*"]},
            "attn": {
                "student_layers": ["layers.*.self_attn"],
                "teacher_layers": ["layers.*.self_attn"],
            },
            "qk_entropy": {"weight": 0.01},
        }
    }
    plain_logits = student(**inputs)
    with QuantDistillObjective(config).attach(student=student, teacher=teacher) as objective:
        with torch.no_grad():
            teacher(**inputs)
        hooked_logits = student(**inputs)
        out = objective(step=0, attention_mask=inputs["attention_mask"])
        assert torch.equal(plain_logits, hooked_logits)  # hooks never change outputs
        # the same numbers from explicitly passed features
        s_h, t_h = objective._captured("feat.student"), objective._captured("feat.teacher")
        explicit = QuantDistillObjective({"terms": {"feat": {}}})(
            step=0,
            student_features=s_h,
            teacher_features=t_h,
            attention_mask=inputs["attention_mask"],
        )
        torch.testing.assert_close(out.raw["feat"], explicit.total.detach())
        assert out.raw["qk_entropy"] < 0
        out.total.backward()
        assert student.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in teacher.parameters())
    for module in [*student.modules(), *teacher.modules()]:
        assert not module._forward_hooks


def test_uncertainty_balancing_is_learned_and_logged(make_batch):
    _, labels = make_batch()
    objective = QuantDistillObjective(
        {"balancing": "uncertainty", "terms": {"task": {}, "kd": {"temperature": 2.0}}}
    )
    assert sorted(n for n, _ in objective.named_parameters()) == [
        "balancer.log_vars.kd",
        "balancer.log_vars.task",
    ]
    with torch.no_grad():
        objective.balancer.log_vars["kd"].fill_(0.5)
    s = torch.randn(3, 7, 13, requires_grad=True)
    t = torch.randn(3, 7, 13)
    out = objective(step=0, student_logits=s, teacher_logits=t, labels=labels)
    kd_raw = out.raw["kd"]
    want_kd = 4.0 * (torch.exp(torch.tensor(-0.5)) * kd_raw + 0.5)
    torch.testing.assert_close(out.terms["kd"].detach(), want_kd)
    torch.testing.assert_close(out.total, out.terms["task"] + out.terms["kd"])
    logs = out.log_dict()
    assert logs["log_var/kd"] == pytest.approx(0.5)
    assert logs["weight/kd"] == pytest.approx(4.0 * torch.exp(torch.tensor(-0.5)).item())
    out.total.backward()
    assert objective.balancer.log_vars["task"].grad is not None


def test_state_dict_round_trip_recreates_projections():
    student_feats = [torch.randn(2, 5, 6)]
    teacher_feats = [torch.randn(2, 5, 8)]
    config = {"balancing": "uncertainty", "terms": {"feat": {}, "task": {}}}
    trained = QuantDistillObjective(config)
    trained.prepare(
        step=0,
        student_features=student_feats,
        teacher_features=teacher_feats,
        task_loss=torch.tensor(1.0),
    )
    with torch.no_grad():
        trained.projections["pair0"].linear.weight.add_(0.5)
        trained.balancer.log_vars["feat"].fill_(0.25)
    fresh = QuantDistillObjective(config)
    fresh.load_state_dict(trained.state_dict())
    kwargs = dict(
        step=1,
        student_features=student_feats,
        teacher_features=teacher_feats,
        task_loss=torch.tensor(1.0),
    )
    torch.testing.assert_close(fresh(**kwargs).total, trained(**kwargs).total)
