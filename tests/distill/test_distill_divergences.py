"""Logit divergences against float64 references written from their definitions."""

import math

import pytest
import torch
import torch.nn.functional as F

from distiq.distill import (
    confidence_aware_kl,
    cross_entropy,
    js_divergence,
    kl_divergence,
    reduce_masked,
    sigmoid_as_categorical,
    soft_cross_entropy,
    teacher_confidence,
    teacher_topk,
    topk_kl_divergence,
    tv_distance,
)

B, T, V = 3, 5, 11


# ---- float64 references, straight from the definitions -------------------------------------
def ref_softmax(z, tau):
    z = z.double() / tau
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def ref_kl(p, q):  # Σ p log(p/q) per position
    return (p * (torch.log(p) - torch.log(q))).sum(-1)


def ref_masked_mean(values, mask):
    return values[mask].sum() / mask.sum()


def ref_divergence(name, s, t, tau, beta=0.5, gamma=0.3):
    p, q = ref_softmax(t, tau), ref_softmax(s, tau)
    if name == "forward":
        return ref_kl(p, q)
    if name == "reverse":
        return ref_kl(q, p)
    if name == "js":
        m = beta * p + (1 - beta) * q
        return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
    if name == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "cakl":
        return gamma * ref_kl(q, p) + (1 - gamma) * ref_kl(p, q)
    raise AssertionError(name)


def ours(name, s, t, **kw):
    if name in ("forward", "reverse"):
        return kl_divergence(s, t, direction=name, **kw)
    if name == "js":
        return js_divergence(s, t, beta=0.5, **kw)
    if name == "tv":
        return tv_distance(s, t, **kw)
    return confidence_aware_kl(s, t, confidence=0.3, **kw)


NAMES = ["forward", "reverse", "js", "tv", "cakl"]


@pytest.fixture
def logits():
    s = torch.randn(B, T, V) * 3
    t = torch.randn(B, T, V) * 3
    mask = torch.rand(B, T) > 0.4
    mask[0, 0] = True
    return s, t, mask


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_matches_float64_reference_with_mask(name, tau, logits):
    s, t, mask = logits
    got = ours(name, s, t, temperature=tau, mask=mask)
    want = ref_masked_mean(ref_divergence(name, s, t, tau), mask)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    per_pos = ours(name, s, t, temperature=tau, reduction="none")
    torch.testing.assert_close(
        per_pos.double(), ref_divergence(name, s, t, tau), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name", NAMES)
def test_zero_for_equal_and_non_negative(name):
    for seed in range(5):
        torch.manual_seed(seed)
        s, t = torch.randn(4, V) * 4, torch.randn(4, V) * 4
        assert ours(name, s, t, reduction="none").min() >= -1e-6
        torch.testing.assert_close(ours(name, s, s.clone()), torch.tensor(0.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_finite_even_for_extreme_logits(name, logits):
    s, t, mask = logits
    big = (s * 1e3).requires_grad_()  # saturated softmax: the gradient may vanish, never blow up
    ours(name, big, t * 1e3, temperature=2.0, mask=mask).backward()
    assert torch.isfinite(big.grad).all()
    s = s.clone().requires_grad_()
    ours(name, s, t, temperature=2.0, mask=mask).backward()
    assert torch.isfinite(s.grad).all() and s.grad[mask].abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_masked_positions_change_nothing(name, logits):
    s, t, mask = logits
    s1 = s.clone().requires_grad_()
    v1 = ours(name, s1, t, mask=mask)
    v1.backward()
    s2 = s.clone()
    t2 = t.clone()
    s2[~mask] = torch.randn(int((~mask).sum()), V) * 50
    t2[~mask] = torch.randn(int((~mask).sum()), V) * 50
    s2.requires_grad_()
    v2 = ours(name, s2, t2, mask=mask)
    v2.backward()
    torch.testing.assert_close(v1, v2)
    assert torch.equal(s1.grad[~mask], torch.zeros_like(s1.grad[~mask]))
    torch.testing.assert_close(s1.grad[mask], s2.grad[mask])


def test_reductions_equal_their_definitions(logits):
    s, t, mask = logits
    per_pos = kl_divergence(s, t, reduction="none", mask=mask)
    assert per_pos.shape == (B, T)
    assert torch.equal(per_pos[~mask], torch.zeros(int((~mask).sum())))
    n_valid = mask.sum()
    mean = kl_divergence(s, t, mask=mask)
    total = kl_divergence(s, t, mask=mask, reduction="sum")
    batchmean = kl_divergence(s, t, mask=mask, reduction="batchmean")
    torch.testing.assert_close(total, mean * n_valid)
    torch.testing.assert_close(batchmean, total / B)
    # the batchmean vs token-mean relation: batchmean = mean · (valid tokens) / (batch size)
    torch.testing.assert_close(batchmean, mean * n_valid / B)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
def test_reductions_match_torch_kl_div_including_the_element_mean_quirk(logits):
    s, t, _ = logits
    tau = 2.0
    log_q = F.log_softmax(s / tau, -1)
    p = F.softmax(t / tau, -1)
    # 3-D logits (B, T, V): torch's batchmean divides by B only, not by the B·T tokens
    torch.testing.assert_close(
        kl_divergence(s, t, temperature=tau, reduction="batchmean"),
        F.kl_div(log_q, p, reduction="batchmean"),
    )
    torch.testing.assert_close(
        kl_divergence(s, t, temperature=tau, reduction="sum"), F.kl_div(log_q, p, reduction="sum")
    )
    # torch's reduction="mean" is an element mean: it also divides by the V classes
    torch.testing.assert_close(
        kl_divergence(s, t, temperature=tau) / V, F.kl_div(log_q, p, reduction="mean")
    )
    # 2-D logits (N, V): token mean == batchmean
    s2, t2 = s[0], t[0]
    torch.testing.assert_close(
        kl_divergence(s2, t2),
        F.kl_div(F.log_softmax(s2, -1), F.softmax(t2, -1), reduction="batchmean"),
    )


def test_js_limits_recover_forward_and_reverse_kl():
    s, t = torch.randn(4, V, dtype=torch.float64), torch.randn(4, V, dtype=torch.float64)
    beta = 1e-6
    forward = kl_divergence(s, t, direction="forward")
    reverse = kl_divergence(s, t, direction="reverse")
    torch.testing.assert_close(js_divergence(s, t, beta=beta) / beta, forward, rtol=1e-4, atol=0)
    torch.testing.assert_close(
        js_divergence(s, t, beta=1 - beta) / beta, reverse, rtol=1e-4, atol=0
    )
    half = js_divergence(s, t, beta=0.5, reduction="none")
    assert (half <= math.log(2) + 1e-12).all()
    torch.testing.assert_close(half, js_divergence(t, s, beta=0.5, reduction="none"))
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        js_divergence(s, t, beta=0.0)


def test_tv_is_bounded_and_cakl_endpoints():
    s, t = torch.randn(6, V) * 5, torch.randn(6, V) * 5
    tv = tv_distance(s, t, reduction="none")
    assert ((tv >= 0) & (tv <= 1)).all()
    torch.testing.assert_close(
        confidence_aware_kl(s, t, confidence=0.0), kl_divergence(s, t, direction="forward")
    )
    torch.testing.assert_close(
        confidence_aware_kl(s, t, confidence=1.0), kl_divergence(s, t, direction="reverse")
    )


def test_cakl_estimates_teacher_confidence_from_labels(logits):
    s, t, mask = logits
    labels = torch.randint(0, V, (B, T))
    labels[~mask] = -100
    gamma = (
        ref_softmax(t, 1.0).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)[mask].mean()
    )
    torch.testing.assert_close(teacher_confidence(t, labels).double(), gamma)
    got = confidence_aware_kl(s, t, labels=labels, mask=mask)
    want = confidence_aware_kl(s, t, confidence=float(gamma), mask=mask)
    torch.testing.assert_close(got, want)
    top1 = ref_softmax(t, 1.0).max(-1).values.mean()
    torch.testing.assert_close(teacher_confidence(t).double(), top1)
    with pytest.raises(ValueError, match="confidence must lie"):
        confidence_aware_kl(s, t, confidence=1.5)


def test_cross_entropy_matches_torch_with_ignore_index_and_smoothing(logits):
    s, _, mask = logits
    labels = torch.randint(0, V, (B, T))
    labels[~mask] = -100
    for smoothing in (0.0, 0.1):
        want = F.cross_entropy(s.reshape(-1, V), labels.reshape(-1), label_smoothing=smoothing)
        torch.testing.assert_close(cross_entropy(s, labels, label_smoothing=smoothing), want)
    labels_all_ignored = torch.full((B, T), -100)
    assert cross_entropy(s, labels_all_ignored).item() == 0.0


def test_soft_cross_entropy_is_kl_plus_target_entropy(logits):
    s, t, mask = logits
    p = ref_softmax(t, 2.0)
    entropy = -(p * torch.log(p)).sum(-1)
    got = soft_cross_entropy(s, p.float(), temperature=2.0, mask=mask)
    want = ref_masked_mean(ref_kl(p, ref_softmax(s, 2.0)) + entropy, mask)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_vocabulary_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="vocabularies differ"):
        kl_divergence(torch.randn(2, 5), torch.randn(2, 6))
    with pytest.raises(ValueError, match="reduction"):
        kl_divergence(torch.randn(2, 5), torch.randn(2, 5), reduction="avg")
    with pytest.raises(ValueError, match="mask"):
        kl_divergence(
            torch.randn(2, 3, 5), torch.randn(2, 3, 5), mask=torch.ones(3, 2, dtype=torch.bool)
        )


def test_half_precision_logits_are_upcast():
    s, t = torch.randn(4, V), torch.randn(4, V)
    got = kl_divergence(s.bfloat16(), t.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, kl_divergence(s.bfloat16().float(), t.bfloat16().float()))


def test_sigmoid_as_categorical_is_bernoulli_kl():
    s, t = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    ps, pt = torch.sigmoid(s), torch.sigmoid(t)
    want = (pt * torch.log(pt / ps) + (1 - pt) * torch.log((1 - pt) / (1 - ps))).sum(-1)
    got = kl_divergence(sigmoid_as_categorical(s), sigmoid_as_categorical(t), reduction="none")
    torch.testing.assert_close(got.sum(-1), want)


# ---- sparse / top-k --------------------------------------------------------------------------
def ref_topk_kl(s, t, k, tau):
    p, q = ref_softmax(t, tau), ref_softmax(s, tau)
    idx = p.topk(k, -1).indices
    pk, qk = p.gather(-1, idx), q.gather(-1, idx)
    outside = torch.ones_like(p, dtype=torch.bool).scatter(-1, idx, False)
    rp, rq = (p * outside).sum(-1), (q * outside).sum(-1)  # the rest buckets, summed explicitly
    head = (pk * torch.log(pk / qk)).sum(-1)
    rest = torch.where(rp > 0, rp * torch.log(rp / rq), torch.zeros_like(rp))
    return head + rest


def test_topk_kl_matches_coarsened_reference_and_bounds(logits):
    s, t, mask = logits
    s, t = s.double(), t.double()
    full = kl_divergence(s, t, temperature=2.0, reduction="none")
    for k in (1, 3, V):
        values, indices = teacher_topk(t, k, temperature=2.0)
        got = topk_kl_divergence(s, values, indices, temperature=2.0, reduction="none")
        torch.testing.assert_close(got, ref_topk_kl(s, t, k, 2.0), rtol=1e-7, atol=1e-9)
        assert (got >= -1e-12).all() and (got <= full + 1e-9).all()
    values, indices = teacher_topk(t, V, temperature=2.0)
    torch.testing.assert_close(
        topk_kl_divergence(s, values, indices, temperature=2.0, mask=mask),
        kl_divergence(s, t, temperature=2.0, mask=mask),
    )
    values, indices = teacher_topk(t, 3)
    assert topk_kl_divergence(t, values, indices).abs() < 1e-12


def test_topk_kl_keeps_the_rest_mass():
    # the student copies the teacher's top-2 probabilities but puts almost nothing elsewhere;
    # renormalising over the top-k would call that perfect, the rest bucket does not
    teacher = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.1]], dtype=torch.float64))
    student = torch.log(torch.tensor([[0.62, 0.37, 0.005, 0.005]], dtype=torch.float64))
    values, indices = teacher_topk(teacher, 2)
    got = topk_kl_divergence(student, values, indices)
    want = 0.5 * math.log(0.5 / 0.62) + 0.3 * math.log(0.3 / 0.37) + 0.2 * math.log(0.2 / 0.01)
    assert got.item() == pytest.approx(want, rel=1e-9)
    s = student.clone().requires_grad_()
    topk_kl_divergence(s, values, indices).backward()
    assert torch.isfinite(s.grad).all()
    with pytest.raises(ValueError, match="vocabulary"):
        topk_kl_divergence(student[:, :2], values, indices + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_kl_gradient_is_finite_with_every_class_cached(dtype):
    """k = V: the teacher has no rest mass, so the student's rest (log of about 0) must enter
    neither the value nor the gradient; the gradient equals full KL's."""
    torch.manual_seed(0)
    teacher = torch.randn(5, V, dtype=dtype)
    student = torch.randn(5, V, dtype=dtype, requires_grad=True)
    values, indices = teacher_topk(teacher, V, temperature=2.0)
    topk_kl_divergence(student, values, indices, temperature=2.0).backward()
    sparse = student.grad.clone()
    student.grad = None
    kl_divergence(student, teacher, temperature=2.0).backward()
    assert torch.isfinite(sparse).all()
    torch.testing.assert_close(sparse, student.grad, rtol=1e-3, atol=1e-5)


def test_reduce_masked_all_masked_is_zero_not_nan():
    values = torch.randn(2, 3)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    assert reduce_masked(values, mask).item() == 0.0
    weights = torch.tensor([[1.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    want = (values[0, 0] * 1 + values[0, 2] * 3) / 4
    torch.testing.assert_close(reduce_masked(values, None, weights=weights), want)
