"""``distiq.compress``: one call for people who already hold the model, the teacher and the data.

Example::

    import distiq
    from distiq.models import load

    teacher = load("checkpoints/smolvlm-256m")              # (model, adapter), offline
    result = distiq.compress(
        model=teacher,                                       # the model to compress
        data={"train": train_samples, "val": val_samples, "test": test_samples},
        recipe={"method": "qad", "quantization": {"scheme": "W4A8"},
                "objective": {"terms": {"task": {}, "kd": {"temperature": 2.0}}},
                "train": {"steps": 200, "batch_size": 8}},
        output="runs/smolvlm-w4a8",
    )
    result.model, result.records                             # the evaluated model, its records

``model`` is the student when ``teacher`` is given, else the teacher (the recipe's ``student``
section then makes the student from it). Each can be a model directory, a
``distiq.models.LoadedVLM`` ``(model, adapter)``, or a Hugging Face model with ``processor=``.
``data`` is an ``EngineData``, ``{"train" | "val" | "test": [VQA samples]}`` (dicts with
``image``, ``question``, ``answers``) or a recipe ``data`` section. With ``output`` (or a recipe
that names one) the run directory behaves as the command line's; without, the run goes to a
temporary directory that is deleted once the model is back in memory.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from distiq.results import ResultRecord, read_records


@dataclass
class CompressResult:
    """What :func:`compress` returns.

    Attributes:
        model: the compressed model as evaluated (activation quantizers restored).
        adapter: its adapter (processing).
        records: the run's result records (accuracy, retention, bits, ...).
        run_dir: the run directory, or None when it was temporary.
    """

    model: nn.Module
    adapter: Any
    records: list[ResultRecord]
    run_dir: Path | None


def _loaded(model: Any, processor: Any, what: str) -> tuple[nn.Module, Any]:
    """``(model, adapter)`` from a directory, a ``(model, adapter)`` pair or a model with its
    processor."""
    from distiq.models import LoadedVLM, adapter_class, is_dense_model, unwrap_vlm
    from distiq.train.modeling import load_model

    if isinstance(model, str | Path):
        return load_model(model)
    if isinstance(model, LoadedVLM | tuple):
        return model[0], model[1]
    if isinstance(model, nn.Module) and is_dense_model(model):
        from distiq.models.dense import DENSE_ADAPTERS

        if processor is None:
            raise ValueError(
                f"{what} is a dense vision model without its image processor: pass "
                "processor= (its *ImageProcessorPil), or a (model, adapter) pair"
            )
        image_processor = getattr(processor, "image_processor", processor)
        return model, DENSE_ADAPTERS.get(model.config.model_type)(model.config, image_processor)
    if isinstance(model, nn.Module):
        if processor is None:
            raise ValueError(
                f"{what} is a model without its processing: pass processor= (the model's "
                "processor, or (tokenizer, image_processor)), or a LoadedVLM from distiq.models.load"
            )
        tokenizer, image_processor = (
            processor
            if isinstance(processor, tuple)
            else (processor.tokenizer, processor.image_processor)
        )
        config = unwrap_vlm(model).config
        adapter = adapter_class(config)(
            config,
            tokenizer,
            image_processor,
            processor=None if isinstance(processor, tuple) else processor,
            chat_template=getattr(processor, "chat_template", None)
            or getattr(tokenizer, "chat_template", None),
        )
        return model, adapter
    raise TypeError(
        f"{what} must be a model directory, a (model, adapter) pair or a model with processor=; "
        f"got {type(model).__name__}"
    )


def _data(data: Any, recipe_data: dict, adapter: Any) -> tuple[Any, dict]:
    """``(EngineData | None, recipe data section)`` for the ``data`` argument."""
    from distiq.train.data_setup import EngineData, samples_split

    if data is None or isinstance(data, EngineData):
        return data, recipe_data
    if (
        isinstance(data, dict)
        and {"train", "val", "test"} <= set(data)
        and all(isinstance(data[k], list | tuple) for k in ("train", "val", "test"))
    ):
        splits = {k: samples_split(data[k], adapter) for k in ("train", "val", "test")}
        return EngineData(splits["train"], splits["val"], splits["test"]), recipe_data
    if isinstance(data, dict):  # a recipe data section
        return None, data
    raise TypeError(
        "data must be an EngineData, {'train': [...], 'val': [...], 'test': [...]} of VQA "
        f"samples, or a recipe data section; got {type(data).__name__}"
    )


def compress(
    recipe: Any = None,
    *,
    model: Any = None,
    teacher: Any = None,
    data: Any = None,
    processor: Any = None,
    teacher_processor: Any = None,
    output: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    on_step: Any = None,
    on_eval: Any = None,
) -> CompressResult | Path:
    """Compress a model (see the module docstring).

    Called with a recipe alone (a :class:`~distiq.train.recipe.Recipe` or a YAML path), it
    runs that recipe as ``distiq compress`` does and returns the run directory. With
    ``model=`` it returns a :class:`CompressResult`.

    Raises:
        ConfigError, FileNotFoundError, FileExistsError, TypeError, ValueError: bad input,
            found before any long work.
    """
    from distiq.config import load_yaml
    from distiq.train.methods import compress as run_compress
    from distiq.train.recipe import Recipe, recipe_from_dict, recipe_to_dict
    from distiq.train.runs import load_compressed

    if model is None:
        if recipe is None:
            raise TypeError("compress needs a recipe, or model= (and data=, recipe=)")
        return run_compress(
            recipe, overwrite=overwrite, resume=resume, on_step=on_step, on_eval=on_eval
        )
    if isinstance(recipe, Recipe):
        recipe_dict = recipe_to_dict(recipe)
    elif isinstance(recipe, str | Path):
        recipe_dict = load_yaml(recipe)
    elif isinstance(recipe, dict):
        recipe_dict = dict(recipe)
    else:
        raise TypeError("recipe must be a Recipe, a YAML path or a mapping")
    if teacher is None:
        teacher_pair, student_pair = _loaded(model, processor, "model"), None
    else:
        teacher_pair = _loaded(teacher, teacher_processor or processor, "teacher")
        student_pair = _loaded(model, processor, "model")
    loaded_data, data_section = _data(
        data, recipe_dict.get("data", {}), (student_pair or teacher_pair)[1]
    )
    recipe_dict["data"] = data_section
    if isinstance(teacher, str | Path):
        recipe_dict["teacher"] = str(teacher)
    elif isinstance(model, str | Path) and teacher is None:
        recipe_dict["teacher"] = str(model)
    temporary = None
    if output is not None:
        recipe_dict["output"] = str(output)
    elif "output" not in recipe_dict:
        temporary = tempfile.TemporaryDirectory(prefix="distiq-compress-")
        recipe_dict["output"] = str(Path(temporary.name) / "run")
    try:
        built = recipe_from_dict(recipe_dict, source="compress(recipe=...)")
        run_dir = run_compress(
            built,
            overwrite=overwrite,
            resume=resume,
            on_step=on_step,
            on_eval=on_eval,
            data=loaded_data,
            teacher=teacher_pair,
            student=student_pair,
        )
        compressed, adapter, _ = load_compressed(run_dir)
        records = read_records(Path(run_dir) / "results.json")
        return CompressResult(compressed, adapter, records, None if temporary else Path(run_dir))
    finally:
        if temporary is not None:
            temporary.cleanup()


__all__ = ["CompressResult", "compress"]
