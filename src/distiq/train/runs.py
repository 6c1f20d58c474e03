"""Run directories: what a compression run leaves on disk, and how to load it back.

A run directory (``recipe.output``) holds::

    recipe.yaml                 the recipe, as run (validated)
    metrics.jsonl               every objective term per logged step (trained methods)
    train_config.yaml           the training loop's settings (trained methods)
    checkpoints/                last.pt / best.pt of the training loop (resume)
    config.json, model.safetensors, tokenizer / processor files
                                the model as a Hugging Face directory, with its *effective*
                                weights: a quantized layer's weight is stored dequantized
                                (``(codes - zero_point) * scale``), exactly what the evaluated
                                model multiplies with
    distiq_heads.json / .safetensors    detection / segmentation heads (when the model has them)
    quantization.json           per quantized module: weight spec, activation spec (null = float
                                activations) and what the weights came from (method)
    quant_state.safetensors     per quantized module: ``<name>.weight_scale`` and
                                ``<name>.weight_zero_point`` (so the integer codes are
                                ``round(W / scale) + zero_point``, exactly), and the static
                                activation qparams ``<name>.act.scale`` / ``.zero_point``
    results.json                ``distiq.results`` records (accuracy on the test split, per
                                question type in ``extra``)

``distiq.models.load(run_dir)`` (or ``VLMWithHeads.from_pretrained``) loads the model with its
quantized weights; :func:`load_compressed` also restores the activation quantizers, giving
exactly the model that was evaluated. Export (``distiq.export``) reads ``quantization.json`` and
``quant_state.safetensors`` to pack the codes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distiq import config
from distiq.config import atomic_write, to_dict
from distiq.quant import QuantConfig, QuantSpec, fake_quant_modules, quantize_
from distiq.train.distributed import launched_rank
from distiq.util import option_hint

logger = logging.getLogger(__name__)

MANIFEST = "quantization.json"
QUANT_STATE = "quant_state.safetensors"
RECIPE_FILE = "recipe.yaml"
RESULTS_FILE = "results.json"
MANIFEST_VERSION = 1


def weight_qparams(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (scale, zero_point) a fake-quant module's weight quantizer uses now (LSQ: learned),
    shaped as ``distiq.quant.choose_qparams`` returns them for the 2-D weight view; None for
    formats without an integer grid (nf4, fp8) or no weight spec."""
    quantizer = getattr(module, "weight_quant", None)
    if quantizer is None or quantizer.spec.format != "int":
        return None
    weight = module.weight.detach().reshape(module.weight.shape[0], -1)
    scale, zero = quantizer.qparams(weight)
    return scale.detach().float(), zero.detach().float()


@torch.no_grad()
def bake_quantized(model: nn.Module, *, method: str) -> dict[str, Any]:
    """Replace every fake-quant module of ``model`` by its effective form, in place: the weight
    becomes its fake-quantized value and the weight spec is dropped (the layer keeps only its
    activation quantizer, frozen to static qparams when it was learnable). Returns the manifest
    ``{"modules": {name: {...}}, "state": {tensor name: tensor}}`` for :func:`save_run_model`.
    """
    modules: dict[str, Any] = {}
    state: dict[str, torch.Tensor] = {}
    for name, module in fake_quant_modules(model):
        weight_spec = module.weight_spec
        entry: dict[str, Any] = {
            "type": type(module).__name__,
            "weight": to_dict(weight_spec) if weight_spec is not None else None,
            "activation": None,
            "weights_from": method,
        }
        if weight_spec is not None:
            qparams = weight_qparams(module)
            if qparams is not None:
                state[f"{name}.weight_scale"], state[f"{name}.weight_zero_point"] = qparams
            effective = module.quantized_weight().detach().clone()
            module.weight.data.copy_(effective)
            module.weight_quant = None
            module.weight_spec = None
        act = module.act_quant
        if act is not None:
            frozen = act.frozen() if act.spec.learnable else act
            module.act_quant = frozen
            module.activation_spec = frozen.spec
            entry["activation"] = to_dict(frozen.spec)
            if frozen.static:
                state[f"{name}.act.scale"] = frozen.scale.detach().float().clone()
                state[f"{name}.act.zero_point"] = frozen.zero_point.detach().float().clone()
        modules[name] = entry
    return {"modules": modules, "state": state}


def save_run_model(run_dir: str | Path, model: nn.Module, adapter: Any, manifest: dict) -> None:
    """Save the (baked) model as a Hugging Face directory in ``run_dir`` with its quantization
    manifest and state (see the module docstring), and record the SHA-256 of every weight file
    (``distiq.integrity``: eval, export and bench check them).

    Everything is written into a staging folder inside ``run_dir`` first and moved into place
    only when all of it is written: a full disk leaves no ``config.json`` without its weights
    (and an ``OSError`` naming the file and the cause)."""
    import tempfile

    from safetensors.torch import save_file

    from distiq.integrity import record_hashes

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    float_model = _float_copy_for_saving(model)
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=run_dir))
    try:
        try:
            float_model.save_pretrained(staging)
            if not hasattr(float_model, "base_adapter"):  # VLMWithHeads saves its processing
                adapter.save_pretrained(staging)
            state = {k: v.contiguous() for k, v in manifest.get("state", {}).items()}
            save_file(state, str(staging / QUANT_STATE))
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"could not save the model into {run_dir} ({exc.strerror or exc}); nothing of it "
                "was put in place: free space and run again",
            ) from None
        weights = sorted(p.name for p in staging.iterdir() if p.suffix == ".safetensors")
        for path in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):
            os.replace(path, run_dir / path.name)  # config.json last: the weights come first
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    body = {"version": MANIFEST_VERSION, "modules": manifest.get("modules", {})}
    if manifest.get("skipped"):
        body["skipped"] = manifest["skipped"]
    atomic_write(run_dir / MANIFEST, json.dumps(body, indent=1) + "\n")
    record_hashes(run_dir, weights)


def _float_copy_for_saving(model: nn.Module) -> nn.Module:
    """``model`` with fake-quant modules swapped back to ``nn.Linear`` / ``nn.Conv2d`` sharing
    their (baked) parameters, so ``save_pretrained`` writes plain weights."""
    import copy

    clone = copy.deepcopy(model)
    for name, module in fake_quant_modules(clone):
        clone.set_submodule(name, module.to_float())
    return clone


def load_compressed(run_dir: str | Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    """``(model, adapter, manifest)`` of a run directory: the saved model with its activation
    quantizers restored (static qparams loaded), in eval mode — the model that was evaluated."""
    from distiq.integrity import load_safetensors, verify_hashes
    from distiq.train.modeling import load_model

    run_dir = Path(run_dir)
    verify_hashes(run_dir)  # a weight file changed since the run wrote it: said, not evaluated
    model, adapter = load_model(run_dir)
    manifest: dict[str, Any] = {"modules": {}}
    if (run_dir / MANIFEST).is_file():
        manifest = json.loads((run_dir / MANIFEST).read_text())
    state = {}
    if (run_dir / QUANT_STATE).is_file():
        state = load_safetensors(run_dir / QUANT_STATE, what="the run's quantization state")
    for name, entry in manifest["modules"].items():
        if entry.get("activation") is None:
            continue
        spec = QuantSpec.from_dict(entry["activation"])
        quantize_(model, QuantConfig(weight=None, activation=spec, include=(name,)))
        quantizer = model.get_submodule(name).act_quant
        if quantizer.static:
            with torch.no_grad():
                quantizer.scale.copy_(state[f"{name}.act.scale"])
                quantizer.zero_point.copy_(state[f"{name}.act.zero_point"])
                quantizer.calibrated.fill_(True)
                quantizer.num_batches.fill_(1)
    model.eval()
    return model, adapter, manifest


def prepare_run_dir(run_dir: Path, *, overwrite: bool, resume: bool, empty: bool = True) -> None:
    """Refuse to clobber a run: a directory that holds files is an error unless ``overwrite``
    (a distiq run's directory is emptied) or ``resume``; check that it can be written. A run
    that stopped before its first checkpoint (``recipe.yaml``, no result, no checkpoint) holds
    nothing to lose: it is started again without ``overwrite``, and the log says what was
    there.

    Take the directory's ``RunLock`` first (``compress`` does): the directory is then emptied
    without ever letting the lock go. ``empty=False`` gives the verdict only (an early check
    outside the lock; a directory another process holds is refused then too). Data-parallel
    (every launched process calls this): only rank 0 (``RANK``) empties the directory, renaming
    it aside first, so another rank sees either the old run whole (and reaches the same verdict)
    or an empty directory."""
    if overwrite and resume:
        raise ValueError("overwrite and resume exclude each other: pick one")
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"output {run_dir} exists and is not a directory")
    if run_dir.is_dir() and _holds_files(run_dir, resume):
        if resume:
            if not (run_dir / "checkpoints" / "last.pt").is_file():
                raise FileNotFoundError(
                    f"cannot resume {run_dir}: it has no checkpoints/last.pt; start it anew with "
                    f"{option_hint('overwrite')}"
                )
            if not empty:
                _check_not_in_use(run_dir)
            return
        if not (run_dir / RECIPE_FILE).is_file():
            raise FileExistsError(
                f"{run_dir} is not empty and holds no distiq run ({RECIPE_FILE} missing); "
                "refusing to delete it: choose another output"
            )
        if not overwrite:
            if not _stopped_early(run_dir):
                raise FileExistsError(
                    f"{run_dir} already holds a run; pass {option_hint('overwrite')} to replace "
                    f"it, {option_hint('resume')} to continue it, or choose another output"
                )
            logger.warning(
                "%s holds a run that stopped before its first checkpoint (%s): starting it again",
                run_dir,
                ", ".join(sorted(_names(run_dir))),
            )
        if not empty:
            _check_not_in_use(run_dir)
        elif launched_rank() == 0:
            _empty_run_dir(run_dir)
    elif resume:
        raise FileNotFoundError(f"cannot resume {run_dir}: there is no run there")
    config.check_writable(run_dir, "the run", "choose a writable output directory")


def _check_not_in_use(run_dir: Path) -> None:
    """Raise ``RunDirectoryInUse`` when another process holds ``run_dir``'s lock."""
    from distiq.train.lock import RunLock

    with RunLock(run_dir):
        pass


# What a run writes before its first checkpoint: a directory holding only these has nothing
# to lose.
_EARLY_FILES = frozenset({RECIPE_FILE, "metrics.jsonl", "train_config.yaml", "tensorboard"})


def _stopped_early(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that stopped before its first checkpoint: nothing but
    what such a run writes (no result, no checkpoint, no model, no file of anyone else's)."""
    names = set(_names(run_dir))
    checkpoints = run_dir / "checkpoints"
    if "checkpoints" in names:
        if any(not config.is_atomic_temp(p.name) for p in checkpoints.iterdir()):
            return False
        names.discard("checkpoints")
    return names <= _EARLY_FILES


def _names(run_dir: Path) -> list[str]:
    """What ``run_dir`` holds (files being written atomically and the run lock not counted)."""
    from distiq.train.lock import LOCK_FILE

    return [
        p.name
        for p in run_dir.iterdir()
        if not config.is_atomic_temp(p.name) and p.name != LOCK_FILE
    ]


def check_resumable(run_dir: Path, recipe: Any) -> None:
    """Resuming continues the same run: every recipe setting but ``output`` and the training
    loop's own (``distiq.train`` compares those: more steps are fine) must equal the one the
    run started with.

    Raises:
        ValueError: the settings that differ, and what to do.
    """
    from distiq.config import load_yaml, to_dict

    saved = load_yaml(run_dir / RECIPE_FILE)
    current = to_dict(recipe)
    if isinstance(saved, dict) and saved.get("method") == "teacher":
        return  # a teacher recipe: its own schema, compared by its trainer
    if isinstance(saved, dict):
        from distiq.train.recipe import recipe_from_dict

        with contextlib.suppress(ValueError):  # else compared as written, each difference named
            saved = to_dict(recipe_from_dict(saved))  # keys added since then take defaults
    differences = [
        key
        for key in sorted(set(saved) | set(current))
        if key not in ("output", "train") and saved.get(key) != current.get(key)
    ]
    if differences:
        raise ValueError(
            f"cannot resume {run_dir} with a changed recipe: {', '.join(differences)} differ from "
            f"the run's {RECIPE_FILE}; resume with the same recipe, or start anew with "
            f"{option_hint('overwrite')}"
        )


def _holds_files(run_dir: Path, resume: bool) -> bool:
    """Whether ``run_dir`` holds anything, as this process can judge it. Not counted: files
    being written atomically (``distiq.config.is_atomic_temp``) and, for a
    launched rank other than 0 that does not resume, a lone ``recipe.yaml``: rank 0 writes the
    run's recipe right after its own check, so another rank may see it (or its temporary file)
    in a directory that was empty. Counting them failed data-parallel runs into fresh
    directories ("not empty and holds no distiq run") now and then."""
    names = _names(run_dir)
    if names == [RECIPE_FILE] and launched_rank() != 0 and not resume:
        return False
    return bool(names)


def _empty_run_dir(run_dir: Path) -> None:
    """Leave ``run_dir`` empty: keeping its lock when this process holds it
    (``replace_with_empty_dir``), else renamed aside (atomic), recreated, the old one
    deleted."""
    from distiq.train.lock import holds_lock, replace_with_empty_dir

    if holds_lock(run_dir):
        replace_with_empty_dir(run_dir)
        return
    aside = run_dir.with_name(f".{run_dir.name}.replaced-{os.getpid()}")
    run_dir.rename(aside)
    run_dir.mkdir(exist_ok=True)  # another rank's writability check may have made it
    shutil.rmtree(aside)
