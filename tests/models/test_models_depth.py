"""Shallower students for every family: layers dropped, renumbered, saved and loaded."""

from __future__ import annotations

import pytest
import torch

from distiq.models import load
from distiq.models.depth import evenly_spaced, keep_layers, layer_count

_LOADED: dict = {}


@pytest.fixture
def loaded(family, family_dirs):
    if family not in _LOADED:
        _LOADED[family] = load(family_dirs(family), attn_implementation="eager")
    return _LOADED[family]


def test_evenly_spaced_keeps_first_and_last():
    assert evenly_spaced(2, 3) == [0, 2]
    assert evenly_spaced(3, 7) == [0, 3, 6]
    assert evenly_spaced(1, 4) == [3]
    with pytest.raises(ValueError, match="depth must lie in 1..4"):
        evenly_spaced(5, 4)


@pytest.mark.parametrize("part", ["language_model", "vision"])
def test_dropped_layers_run_generate_and_round_trip(family, loaded, part, make_samples, tmp_path):
    model, adapter = loaded
    total = layer_count(model, adapter, part)
    student = keep_layers(model, adapter, [total - 1], part=part)
    assert layer_count(student, adapter, part) == 1
    assert layer_count(model, adapter, part) == total  # the teacher is untouched
    for name, module in student.named_modules():
        index = getattr(module, "layer_idx", None)
        if isinstance(index, int) and part == "language_model":
            assert index == 0, name  # indexes the key/value cache of the one layer left
    # the kept layer is the teacher's last one
    names = adapter.module_names()
    root = names.language_model if part == "language_model" else names.vision
    kept = [p for n, p in student.named_parameters() if n.startswith(root) and ".0." in n]
    source = [
        p for n, p in model.named_parameters() if n.startswith(root) and f".{total - 1}." in n
    ]
    assert kept and all(torch.equal(a, b) for a, b in zip(kept, source))

    samples = make_samples()
    batch = adapter.build_inputs(samples)
    student.eval()
    with torch.no_grad():
        before = student(**batch).logits
    answers = adapter.generate_answers(student, samples, max_new_tokens=3)
    assert len(answers) == len(samples)
    student.save_pretrained(tmp_path)
    adapter.save_pretrained(tmp_path)
    again = load(tmp_path, attn_implementation="eager")
    assert layer_count(again.model, again.adapter, part) == 1
    with torch.no_grad():
        assert torch.equal(again.model(**batch).logits, before)


def test_bad_layer_lists_are_clear_errors(loaded):
    model, adapter = loaded
    with pytest.raises(ValueError, match="out of range"):
        keep_layers(model, adapter, [0, 7])
    with pytest.raises(ValueError, match="increasing"):
        keep_layers(model, adapter, [1, 0])
    with pytest.raises(ValueError, match="empty"):
        keep_layers(model, adapter, [])
    with pytest.raises(ValueError, match="'language_model' or 'vision'"):
        keep_layers(model, adapter, [0], part="projector")
