"""Grounded auxiliary targets of the teacher: which question words name objects and what the
scene says about them, checked on hand-made scenes."""

from __future__ import annotations

import pytest
import torch

from distiq.data import vocabulary
from distiq.demo.grounding import GroundingHeads, SceneVocabulary
from distiq.models import build_word_tokenizer

COLOURS = ("red", "green", "blue", "yellow", "purple")
CATEGORIES = ("circle", "square", "triangle", "0", "1", "4")


@pytest.fixture(scope="module")
def heads():
    words = vocabulary()
    tokenizer = build_word_tokenizer(words)
    vocab = SceneVocabulary.from_meta(
        {"colours": COLOURS, "categories": CATEGORIES, "vocabulary": words}
    )
    objects = {
        # image 7: a red circle on the left, a blue square on the right, a green 4 (a digit)
        7: [(0, 0, 0.2, 0.3), (2, 1, 0.8, 0.6), (1, 5, 0.5, 0.9)],
        # image 8: two red circles
        8: [(0, 0, 0.1, 0.1), (0, 0, 0.9, 0.9)],
    }
    return GroundingHeads(vocab, tokenizer, 16, 8, (4, 4), objects), tokenizer


def _batch(tokenizer, questions, images):
    ids = [tokenizer(q, add_special_tokens=False)["input_ids"] for q in questions]
    length = max(map(len, ids))
    suffix = torch.zeros(len(ids), length, dtype=torch.long)
    mask = torch.zeros_like(suffix)
    for i, row in enumerate(ids):
        suffix[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {
        "suffix_ids": suffix,
        "suffix_mask": mask,
        "question_image": torch.arange(len(questions)),
        "image_id": torch.tensor(images),
    }


def test_vocabulary_nouns():
    vocab = SceneVocabulary.from_meta(
        {"colours": COLOURS, "categories": CATEGORIES, "vocabulary": vocabulary()}
    )
    assert vocab.nouns["circles"] == (0,) and vocab.nouns["square"] == (1,)
    assert vocab.nouns["digits"] == (3, 4, 5) and vocab.nouns["objects"] is None


def test_references_and_targets(heads):
    grounding, tokenizer = heads
    batch = _batch(
        tokenizer,
        [
            "is the red circle to the left of the blue square?",
            "how many red objects are there?",
            "what digit is the green object?",
        ],
        [7, 8, 7],
    )
    refs = grounding.references(batch["suffix_ids"], batch["suffix_mask"])
    words = [tokenizer.convert_ids_to_tokens(int(batch["suffix_ids"][q, t])) for q, t, *_ in refs]
    assert words == ["circle", "square", "objects", "object"]
    assert [(r[2], r[3]) for r in refs] == [(0, (0,)), (2, (1,)), (0, None), (1, None)]
    count, colour, category, xbin, ybin, side, amount, xy, weight = grounding.question_targets(
        batch, refs
    )
    assert count.tolist() == [1, 1, 2, 1]
    assert colour.tolist() == [0, 2, -100, 1]
    assert category.tolist() == [0, 1, -100, 5]
    assert xbin.tolist() == [1, 6, -100, 4]
    assert ybin.tolist() == [2, 4, -100, 7]
    # the blue square is right of the red circle; as many objects (one each)
    assert side.tolist() == [-100, 1, -100, -100]
    assert amount.tolist() == [-100, 1, -100, -100]
    torch.testing.assert_close(xy[0], torch.tensor([0.2, 0.3]))
    assert weight.tolist() == [1.0, 1.0, 0.0, 1.0]
    grounding.side_target = False  # teacher.side_target: false: no left/right, the rest unchanged
    _, _, _, _, _, side, amount, *_ = grounding.question_targets(batch, refs)
    assert side.tolist() == [-100] * 4
    assert amount.tolist() == [-100, 1, -100, -100]


def test_centre_targets_mark_one_patch_per_object(heads):
    grounding, tokenizer = heads
    batch = _batch(tokenizer, ["how many objects are there?"] * 2, [7, 8])
    targets = grounding.centre_targets(batch)
    assert targets.shape == (2, 16)
    categories = len(CATEGORIES)
    # red circle at (0.2, 0.3) -> row 1, column 0
    assert targets[0, 1 * 4 + 0] == 1 + 0 * categories + 0
    assert targets[0, 2 * 4 + 3] == 1 + 2 * categories + 1  # blue square at (0.8, 0.6)
    assert int((targets[0] > 0).sum()) == 3 and int((targets[1] > 0).sum()) == 2


def test_loss_terms_are_finite_and_train(heads):
    grounding, tokenizer = heads
    batch = _batch(tokenizer, ["is there a red circle?", "how many circles are there?"], [7, 8])
    hidden = torch.randn(2, batch["suffix_ids"].shape[1], 16, requires_grad=True)
    patches = torch.randn(2, 16, 8, requires_grad=True)
    terms = grounding.loss(batch, hidden, patches)
    assert set(terms) == {"grounding", "centres"}
    total = sum(terms.values())
    assert torch.isfinite(total)
    total.backward()
    assert hidden.grad.abs().sum() > 0 and patches.grad.abs().sum() > 0


def test_separate_side_head_reads_the_side_layer(heads):
    """``teacher.side_layer``: the left/right target is read from ``side_hidden`` by its own
    head, and only through it (the shared head's side logits get no gradient)."""
    grounding, tokenizer = heads
    separate = GroundingHeads(
        grounding.vocabulary, tokenizer, 16, 8, (4, 4), grounding.objects, separate_side=True
    )
    batch = _batch(tokenizer, ["is the red circle to the left of the blue square?"], [7])
    hidden = torch.randn(1, batch["suffix_ids"].shape[1], 16, requires_grad=True)
    side_hidden = torch.randn(1, batch["suffix_ids"].shape[1], 16, requires_grad=True)
    patches = torch.randn(1, 16, 8)
    with pytest.raises(ValueError, match="side_hidden"):
        separate.loss(batch, hidden, patches)
    separate.loss(batch, hidden, patches, side_hidden=side_hidden)["grounding"].backward()
    assert side_hidden.grad.abs().sum() > 0 and separate.side.weight.grad.abs().sum() > 0
    side_rows = slice(sum(separate.sizes[:5]), sum(separate.sizes[:6]))
    assert separate.question.weight.grad[side_rows].abs().sum() == 0
    # only the side target reads side_hidden: the square's state, nothing else
    assert side_hidden.grad[0].abs().sum(dim=-1).nonzero().flatten().tolist() == [10]
    # off: the default heads, no extra head
    assert grounding.side is None
