"""Feature and attention losses against float64 references from their definitions."""

import pytest
import torch
import torch.nn.functional as F

from distiq.distill import (
    FeatureProjection,
    attention_alignment,
    feature_cosine,
    feature_mse,
    modality_weights,
)


@pytest.fixture
def feats():
    s = torch.randn(2, 6, 8, dtype=torch.float64)
    t = torch.randn(2, 6, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    return s, t, mask


def test_feature_mse_reference_mask_weights_and_normalisation(feats):
    s, t, mask = feats
    assert torch.allclose(feature_mse(s, t), F.mse_loss(s, t))
    per_tok = ((s - t) ** 2).mean(-1)
    torch.testing.assert_close(feature_mse(s, t, mask=mask), per_tok[mask].mean())
    w = torch.rand(2, 6, dtype=torch.float64)
    want = (per_tok * w)[mask].sum() / w[mask].sum()
    torch.testing.assert_close(feature_mse(s, t, mask=mask, weights=w), want)
    cos = F.cosine_similarity(s, t, dim=-1)
    torch.testing.assert_close(feature_mse(s, t, normalize="l2"), ((2 - 2 * cos) / 8).mean())

    def standard(x):
        centred = x - x.mean(-1, keepdim=True)
        return centred / torch.sqrt(x.var(-1, correction=0, keepdim=True) + 1e-5)

    torch.testing.assert_close(
        feature_mse(s, t, normalize="layer"), ((standard(s) - standard(t)) ** 2).mean()
    )
    assert feature_mse(s, s.clone()).item() == 0.0
    with pytest.raises(ValueError, match="widths differ"):
        feature_mse(s, t[..., :4])


def test_feature_cosine_reference(feats):
    s, t, mask = feats
    s64 = s / s.norm(dim=-1, keepdim=True)
    t64 = t / t.norm(dim=-1, keepdim=True)
    per_tok = 1 - (s64 * t64).sum(-1)
    torch.testing.assert_close(feature_cosine(s, t, mask=mask), per_tok[mask].mean())
    torch.testing.assert_close(feature_cosine(s, 3 * s), torch.tensor(0.0, dtype=torch.float64))
    x = s.clone().requires_grad_()
    feature_cosine(x, t, mask=mask).backward()
    assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()


def test_modality_weights_weight_visual_and_text_tokens(feats):
    s, t, _ = feats
    visual = torch.zeros(2, 6, dtype=torch.bool)
    visual[:, :3] = True
    w = modality_weights(visual, visual_weight=0.0, text_weight=1.0)
    only_text = feature_mse(s[:, 3:], t[:, 3:])
    torch.testing.assert_close(feature_mse(s, t, weights=w.double()), only_text)


def test_feature_projection_starts_identity_like_and_trains():
    proj = FeatureProjection(4, 6)
    x = torch.randn(2, 3, 4)
    y = proj(x)
    assert y.shape == (2, 3, 6)
    torch.testing.assert_close(y[..., :4], x)
    assert (y[..., 4:] == 0).all()
    target = torch.randn(2, 3, 6)
    feature_mse(proj(x), target).backward()
    assert proj.linear.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="width 4"):
        proj(torch.randn(2, 5))


def attn_probs(b, h, t, causal=True):
    scores = torch.randn(b, h, t, t, dtype=torch.float64) * 2
    if causal:
        scores = scores.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
    return scores, scores.softmax(-1)


def test_attention_kl_reference_and_logit_inputs():
    s_scores, s = attn_probs(2, 3, 5)
    t_scores, t = attn_probs(2, 3, 5)
    kl = torch.where(t > 0, t * (torch.log(t) - torch.log(s)), torch.zeros_like(t)).sum(-1)
    rows = kl.mean(1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(attention_alignment(s, t, mask=mask), rows[mask].mean())
    torch.testing.assert_close(
        attention_alignment(s_scores, t_scores, inputs="logits", mask=mask), rows[mask].mean()
    )
    mse = ((s - t) ** 2).mean(-1).mean(1)
    torch.testing.assert_close(attention_alignment(s, t, loss="mse"), mse.mean())
    assert attention_alignment(t, t.clone()).abs() < 1e-12


def test_attention_alignment_minimising_makes_maps_closer():
    # the sign: a gradient step on the student's scores must move its map toward the teacher's
    for loss in ("kl", "mse"):
        s_scores, _ = attn_probs(1, 2, 6)
        t_scores, t = attn_probs(1, 2, 6)
        s_scores = s_scores.clone().requires_grad_()
        before = (s_scores.softmax(-1) - t).abs().sum()
        values = []
        opt = torch.optim.Adam([s_scores], lr=0.3)
        for _ in range(40):
            opt.zero_grad()
            value = attention_alignment(s_scores, t_scores, loss=loss, inputs="logits")
            value.backward()
            values.append(value.item())
            opt.step()
        after = (s_scores.softmax(-1) - t).abs().sum()
        assert values[-1] < 0.1 * values[0], loss
        assert after < 0.3 * before, loss


def test_attention_head_mismatch_compares_head_means():
    _, s = attn_probs(2, 2, 4, causal=False)
    _, t = attn_probs(2, 4, 4, causal=False)
    got = attention_alignment(s, t)
    want = attention_alignment(s.mean(1, keepdim=True), t.mean(1, keepdim=True))
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="batch, queries and keys"):
        attention_alignment(s, t[:, :, :3])
