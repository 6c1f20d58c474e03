"""Building the models a recipe names: the teacher and the student.

- :func:`resolve_model_dir` — a teacher / run directory -> the Hugging Face directory in it.
- :func:`load_vlm` — a saved model (with heads when it has them) and its adapter.
- :func:`build_student` — a copy of the teacher (optionally with layers dropped, for any
  family: :mod:`distiq.models.depth`), a smaller checkpoint of any supported family with the
  teacher's tokenizer, or a built-in edge VLM from a preset whose layers start from the
  teacher's where the shapes allow (evenly spaced layers when the depths differ, as DistilBERT
  initialises its student).
- :func:`same_processing` — whether two adapters turn a question into the same tokens.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distiq.models import VLMWithHeads, build_edge_vlm, edge_vlm_config, load, unwrap_vlm
from distiq.models.depth import evenly_spaced, keep_layers, layer_count
from distiq.models.multitask import HEADS_CONFIG

logger = logging.getLogger(__name__)

VISION_LAYERS = "model.vision_tower.encoder.layers."
TEXT_LAYERS = "model.language_model.layers."


def resolve_model_dir(path: str | Path) -> Path:
    """The Hugging Face model directory at ``path`` (it holds ``config.json``).

    Raises:
        FileNotFoundError: nothing loadable there, with what to do about it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"teacher directory {path} does not exist (relative paths start from the directory "
            f"distiq runs in, here {Path.cwd()}); point teacher: at a Hugging Face model folder "
            "(save_pretrained with its processor), or train one with `distiq teacher RECIPE`"
        )
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(
        f"{path} holds no saved model (no config.json); point to the directory that "
        "save_pretrained wrote (a teacher or compressed run directory)"
    )


def load_vlm(path: str | Path) -> tuple[nn.Module, Any]:
    """``(model, adapter)`` from a model directory: a ``VLMWithHeads`` when the directory has
    distiq heads, else the bare Hugging Face model; the adapter is unprefixed. The model is in
    eval mode, float32."""
    path = resolve_model_dir(path)
    if (path / HEADS_CONFIG).is_file():
        model = VLMWithHeads.from_pretrained(path, attn_implementation="eager")
        return model, model.base_adapter
    vlm, adapter = load(path, attn_implementation="eager")
    return vlm, adapter


def load_model(path: str | Path) -> tuple[nn.Module, Any]:
    """``(model, adapter)`` of any model directory distiq runs: a dense vision model
    (``distiq.models.load_dense``) or a VLM (:func:`load_vlm`)."""
    from distiq.models import dense_model_type, load_dense

    path = resolve_model_dir(path)
    if dense_model_type(path) is not None:
        return load_dense(path)
    return load_vlm(path)


def _edge_config_of(vlm: nn.Module) -> dict[str, Any]:
    """EdgeVLMConfig fields read back from a LLaVA config built by ``build_edge_vlm``."""
    config = vlm.config
    vision, text = config.vision_config, config.text_config
    return {
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "vision_hidden_size": vision.hidden_size,
        "vision_layers": vision.num_hidden_layers,
        "vision_heads": vision.num_attention_heads,
        "vision_intermediate_size": vision.intermediate_size,
        "text_hidden_size": text.hidden_size,
        "text_layers": text.num_hidden_layers,
        "text_heads": text.num_attention_heads,
        "text_kv_heads": text.num_key_value_heads,
        "text_intermediate_size": text.intermediate_size,
        "max_length": text.max_position_embeddings,
    }


def _layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer for each student layer: evenly spaced, first and last kept (a preset
    deeper than the teacher repeats layers)."""
    if student_layers == 1:
        return [teacher_layers - 1]
    step = (teacher_layers - 1) / (student_layers - 1)
    return [round(i * step) for i in range(student_layers)]


def _copy_matching(student: nn.Module, teacher: nn.Module, rename: dict[str, str]) -> int:
    """Copy every teacher tensor whose (renamed) name and shape match; returns the count."""
    teacher_state = teacher.state_dict()
    copied = 0
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            source = name
            for prefix, replacement in rename.items():
                if name.startswith(prefix):
                    source = replacement + name[len(prefix) :]
                    break
            value = teacher_state.get(source)
            if value is not None and value.shape == tensor.shape:
                tensor.copy_(value)
                copied += 1
    return copied


def build_student(
    teacher: nn.Module,
    teacher_adapter: Any,
    student_config: Any,
    *,
    vocabulary: list[str] | None = None,
    seed: int = 0,
) -> tuple[nn.Module, Any]:
    """The student of a recipe (``StudentConfig``) as ``(model, adapter)``.

    ``init: teacher`` deep-copies the teacher (heads included) and drops the layers
    ``depth`` / ``keep_layers`` (``vision_depth`` / ``vision_keep_layers``) leave out.
    ``init: checkpoint`` loads ``path`` (any supported family; its tokenizer must be the
    teacher's, because distillation compares the two models' outputs token by token).
    ``init: preset`` builds an edge VLM from ``preset`` (default: the teacher's sizes) with
    ``model`` overrides and the teacher's tokenizer; with ``copy_teacher_layers`` every tensor
    whose shape matches is copied from the teacher, decoder / encoder layers from evenly spaced
    teacher layers.

    Raises:
        ValueError: the student's tokenizer differs from the teacher's; bad layer choices.
    """
    if student_config.init == "teacher":
        student = copy.deepcopy(teacher)
        for part, depth, keep in (
            ("language_model", student_config.depth, student_config.keep_layers),
            ("vision", student_config.vision_depth, student_config.vision_keep_layers),
        ):
            if depth is None and keep is None:
                continue
            adapter = _part_adapter(student, teacher_adapter)
            if keep is None:
                keep = evenly_spaced(depth, layer_count(student, adapter, part))
            student = keep_layers(student, adapter, keep, part=part)
        student.train()
        return student, teacher_adapter
    if student_config.init == "checkpoint":
        student, adapter = load_vlm(student_config.path)
        check_same_tokenizer(adapter, teacher_adapter, f"the student {student_config.path}")
        student.train()
        return student, adapter
    return _preset_student(teacher, teacher_adapter, student_config, vocabulary, seed)


def _part_adapter(model: nn.Module, adapter: Any) -> Any:
    """The adapter whose module names are ``model``'s (prefixed ``vlm.`` for heads)."""
    return model.adapter if isinstance(model, VLMWithHeads) else adapter


def check_same_tokenizer(adapter: Any, teacher_adapter: Any, what: str) -> None:
    """Raise unless ``adapter``'s tokenizer has the teacher's vocabulary (same ids)."""
    if adapter.tokenizer.get_vocab() != teacher_adapter.tokenizer.get_vocab():
        raise ValueError(
            f"{what} has another tokenizer than the teacher; distillation compares logits "
            "token by token, so teacher and student need the same vocabulary (the same ids)"
        )


def same_processing(adapter: Any, other: Any) -> bool:
    """Whether ``adapter`` and ``other`` turn a question and an image into the same model
    inputs: the same family, tokenizer vocabulary, image processing and prompt format."""
    if adapter is other:
        return True
    if type(adapter) is not type(other):
        return False
    processors = [a.image_processor for a in (adapter, other)]
    return (
        adapter.tokenizer.get_vocab() == other.tokenizer.get_vocab()
        and type(processors[0]) is type(processors[1])
        and processors[0].to_dict() == processors[1].to_dict()
        and adapter.format_prompt("?") == other.format_prompt("?")
        and adapter.image_inputs.__func__ is other.image_inputs.__func__
        and adapter.config.to_dict().get("image_token_id")
        == other.config.to_dict().get("image_token_id")
    )


def _preset_student(
    teacher: nn.Module,
    teacher_adapter: Any,
    student_config: Any,
    vocabulary: list[str] | None,
    seed: int,
) -> tuple[nn.Module, Any]:
    """``init: preset``: a built-in edge VLM (see :func:`build_student`)."""
    teacher_vlm = unwrap_vlm(teacher)
    if not hasattr(teacher_vlm.config, "vision_feature_layer"):
        raise ValueError(
            "student.init: preset builds the built-in edge VLM (LLaVA architecture); the teacher "
            f"is a {type(teacher_vlm).__name__}: use student.depth / keep_layers or a student "
            "checkpoint instead"
        )
    sizes = _edge_config_of(teacher_vlm)
    if student_config.preset is not None:
        preset = edge_vlm_config(student_config.preset).to_dict()
        sizes = {k: preset[k] for k in sizes}
    sizes.update(student_config.model)
    words = vocabulary or _tokenizer_words(teacher_adapter)
    config = edge_vlm_config("tiny", **sizes)
    vlm, adapter = build_edge_vlm(words, config, seed=seed)
    if len(adapter.tokenizer) != len(teacher_adapter.tokenizer) or (
        adapter.tokenizer.get_vocab() != teacher_adapter.tokenizer.get_vocab()
    ):
        raise ValueError(
            "the student's tokenizer differs from the teacher's; distillation compares logits "
            "token by token, so build the student from the teacher's vocabulary"
        )
    student: nn.Module = vlm
    if isinstance(teacher, VLMWithHeads):
        det = teacher.detection_head
        seg = teacher.segmentation_head
        student = VLMWithHeads(
            vlm,
            adapter,
            num_detection_classes=det.num_classes if det is not None else None,
            num_segmentation_classes=seg.num_classes if seg is not None else None,
            detection_kwargs=_head_kwargs(det),
            segmentation_kwargs=_head_kwargs(seg),
        )
    if student_config.copy_teacher_layers:
        prefix = "vlm." if isinstance(teacher, VLMWithHeads) else ""
        teacher_sizes = _edge_config_of(teacher_vlm)
        rename = {}
        for part, attr in (
            (VISION_LAYERS, "vision_layers"),
            (TEXT_LAYERS, "text_layers"),
        ):
            mapping = _layer_map(getattr(config, attr), teacher_sizes[attr])
            for i, j in enumerate(mapping):
                rename[f"{prefix}{part}{i}."] = f"{prefix}{part}{j}."
        copied = _copy_matching(student, teacher, rename)
        logger.info("student: copied %d tensors from the teacher", copied)
    student.train()
    return student, adapter


def _head_kwargs(head: nn.Module | None) -> dict | None:
    if head is None:
        return None
    return {k: v for k, v in head.settings.items() if k not in ("in_dim", "num_classes")}


def _tokenizer_words(adapter: Any) -> list[str]:
    """The word list of an edge VLM tokenizer (its vocabulary without special tokens, in id
    order), so a student built from it has identical token ids."""
    from distiq.models.tokenizer import PROMPT_WORDS, SPECIAL_TOKENS

    vocab = adapter.tokenizer.get_vocab()
    skip = set(SPECIAL_TOKENS) | set(PROMPT_WORDS)
    return [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if w not in skip]
