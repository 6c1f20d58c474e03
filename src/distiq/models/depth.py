"""Shallower students: a copy of a VLM with some of its decoder (or vision encoder) layers
dropped, for any supported family.

The kept layers keep their weights (the student starts from the teacher's layers, as
DistilBERT's student does); the layer list, the layers' ``layer_idx`` (which indexes the
key/value cache) and the config (``num_hidden_layers`` / ``depth``, per-layer lists such as
``layer_types`` and Qwen2.5-VL's ``fullatt_block_indexes``) are renumbered so that the model
runs, generates with a cache, and saves and loads with ``from_pretrained`` like any model of
its family.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

from torch import nn

from distiq.models.parts import layer_list

logger = logging.getLogger(__name__)

# Config entries holding one value per layer.
_PER_LAYER_LISTS = ("layer_types",)
# Config entries holding indices of layers.
_LAYER_INDEX_LISTS = ("fullatt_block_indexes",)
_DEPTH_KEYS = ("num_hidden_layers", "depth")


def evenly_spaced(keep: int, total: int) -> list[int]:
    """``keep`` layer indices out of ``total``, evenly spaced, first and last kept."""
    if not 1 <= keep <= total:
        raise ValueError(f"depth must lie in 1..{total} (the model's layers), got {keep}")
    if keep == 1:
        return [total - 1]
    step = (total - 1) / (keep - 1)
    return [round(i * step) for i in range(keep)]


def _config_of(model: nn.Module, part: str) -> Any:
    from distiq.models.multitask import unwrap_vlm

    config = unwrap_vlm(model).config
    if part == "language_model":
        return config.get_text_config()
    vision = getattr(config, "vision_config", None)
    if vision is None:
        raise ValueError(f"{type(model).__name__} has no vision_config")
    return vision


def layer_count(model: nn.Module, adapter: Any, part: str = "language_model") -> int:
    """How many layers ``part`` (``language_model`` or ``vision``) of ``model`` has."""
    return len(_layers(model, adapter, part)[1])


def _layers(model: nn.Module, adapter: Any, part: str) -> tuple[str, nn.ModuleList]:
    names = adapter.module_names()
    if part not in ("language_model", "vision"):
        raise ValueError(f"layers can be dropped from 'language_model' or 'vision', not {part!r}")
    root = names.language_model if part == "language_model" else names.vision
    first = layer_list(dict(model.named_modules()), root)[0]
    list_name = first.rsplit(".", 1)[0]
    return list_name, model.get_submodule(list_name)


def keep_layers(
    model: nn.Module, adapter: Any, keep: Sequence[int], *, part: str = "language_model"
) -> nn.Module:
    """A deep copy of ``model`` with only the layers ``keep`` (indices, in order) of ``part``.

    Args:
        model: a Hugging Face VLM of a supported family (or the adapter's prefixed wrapper).
        adapter: its adapter (module names).
        keep: increasing layer indices to keep, e.g. ``[0, 2, 5]``.
        part: ``language_model`` (the decoder) or ``vision`` (the vision encoder).

    Returns:
        The shallower copy; ``model`` itself is unchanged.

    Raises:
        ValueError: indices out of range, repeated or not increasing, or nothing kept.
    """
    _, layers = _layers(model, adapter, part)
    total = len(layers)
    keep = [int(i) for i in keep]
    if not keep:
        raise ValueError("keep_layers is empty: keep at least one layer")
    bad = [i for i in keep if not 0 <= i < total]
    if bad:
        raise ValueError(f"keep_layers {bad} out of range: the {part} has layers 0..{total - 1}")
    if sorted(set(keep)) != keep:
        raise ValueError(f"keep_layers must be increasing and without repeats, got {keep}")
    student = copy.deepcopy(model)
    list_name, layers = _layers(student, adapter, part)
    student.set_submodule(list_name, nn.ModuleList([layers[i] for i in keep]))
    for new_index, layer in enumerate(student.get_submodule(list_name)):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = _config_of(student, part)
    _renumber_config(config, keep, total)
    owner = student.get_submodule(list_name.rsplit(".", 1)[0]) if "." in list_name else student
    for key in _LAYER_INDEX_LISTS:  # modules that copied such a list at construction
        if isinstance(getattr(owner, key, None), list):
            setattr(owner, key, list(getattr(config, key)))
    logger.info("student: kept %s layers %s of %d", part, keep, total)
    return student


def _renumber_config(config: Any, keep: list[int], total: int) -> None:
    """Rewrite a (sub)config in place for the kept layers."""
    found = False
    for key in _DEPTH_KEYS:
        if getattr(config, key, None) == total:
            setattr(config, key, len(keep))
            found = True
    if not found:
        raise ValueError(
            f"{type(config).__name__} records no layer count of {total} "
            f"({' / '.join(_DEPTH_KEYS)}); this family's layers cannot be dropped"
        )
    for key in _PER_LAYER_LISTS:
        values = getattr(config, key, None)
        if isinstance(values, list | tuple) and len(values) == total:
            setattr(config, key, [values[i] for i in keep])
    for key in _LAYER_INDEX_LISTS:
        values = getattr(config, key, None)
        if isinstance(values, list | tuple):
            setattr(config, key, [keep.index(i) for i in values if i in keep])
