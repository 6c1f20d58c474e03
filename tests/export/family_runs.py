"""Run directories of tiny models of every VLM family, made the way distiq.train makes them.

A run is built without the engine: the family's tiny model (tests/models/conftest.py) is
loaded through ``distiq.models.load``, its language model's linear layers are quantized with
``quantize_`` (one ``QuantConfig`` per part pattern, so one run can mix schemes), static
activation quantizers are calibrated, and ``distiq.train.runs.bake_quantized`` +
``save_run_model`` write the run directory. The fake-quant student's logits on a batch are
the reference every export is compared with.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from distiq.quant import QuantConfig, QuantSpec, calibration, quantize_

FAMILIES = ("llava", "idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl", "paligemma")


def family_models():
    """tests/models/conftest.py as a module (``build_family``, ``vqa_samples``)."""
    name = "distiq_family_test_models"
    if name not in sys.modules:
        path = Path(__file__).parents[1] / "models" / "conftest.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@dataclass
class FamilyRun:
    """A run directory and what it was made from.

    Attributes:
        path: the run directory.
        student: the fake-quant model before baking (eval mode, eager attention).
        adapter: its adapter.
        batch: model inputs (3 VQA samples on drawn scenes).
        expected: ``student(**batch).logits``.
    """

    path: Path
    student: torch.nn.Module
    adapter: object
    batch: dict
    expected: torch.Tensor


def base_model(family: str, root: Path) -> Path:
    """The family's tiny model saved as a Hugging Face folder under ``root`` (cached)."""
    path = root / f"{family}-base"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        model, tokenizer, processor = family_models().build_family(family)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        processor.save_pretrained(path)
    return path


def make_run(
    family: str,
    root: Path,
    name: str,
    schemes: dict[str, tuple[QuantSpec | None, QuantSpec | None]],
) -> FamilyRun:
    """A run directory ``root/name`` of ``family`` whose language-model linear layers matching
    each glob of ``schemes`` (relative to the language model, e.g. ``"*.self_attn.*"``; ``"*"``
    for all) get its ``(weight spec, activation spec)``."""
    from distiq.models import load
    from distiq.train.runs import bake_quantized, save_run_model

    model, adapter = load(base_model(family, root), attn_implementation="eager")
    target = adapter.quant_targets()["language_model"]
    (language_model,) = target.include
    for pattern, (weight, activation) in schemes.items():
        include = (language_model if pattern == "*" else f"{language_model}.{pattern}",)
        config = QuantConfig(
            weight=weight, activation=activation, include=include, exclude=target.exclude
        )
        quantize_(model, config)
    samples = family_models().vqa_samples(3)
    batch = adapter.build_inputs(samples)
    if any(a is not None and not a.dynamic for _, a in schemes.values()):
        calibration_batch = adapter.build_inputs(family_models().vqa_samples(3, size=48))
        with calibration(model), torch.no_grad():
            model(**calibration_batch)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    baked = copy.deepcopy(model)
    save_run_model(root / name, baked, adapter, bake_quantized(baked, method="qat"))
    return FamilyRun(root / name, model, adapter, batch, expected)
