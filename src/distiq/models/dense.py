"""``DenseAdapter``: what distiq needs to know about a dense vision model family — semantic
segmentation, object detection or monocular depth — loaded from a local Hugging Face folder.

In the spirit of :class:`distiq.models.VLMAdapter`, an adapter *describes* a model and never
changes it: its parts (``backbone``, ``neck``, ``head`` and the ``patch_embedding`` stem) for
quantization targets, the stages whose feature maps distillation compares, how images become
``pixel_values`` (the family's ``*ImageProcessorPil``, resized to one fixed input size so that a
model exports to a static ONNX graph), the training forward (:class:`DenseOutputs`: class logits,
boxes or depth, and the model's own loss where transformers has one — the Hungarian-matched
DETR losses), and predictions in the original image's pixels.

Families register by ``config.model_type`` in ``DENSE_ADAPTERS`` (:func:`register_dense`):
SegFormer (:mod:`distiq.models.segformer`), RT-DETR and DETR with its transformers ResNet
backbone (:mod:`distiq.models.detr`), Depth Anything and DPT
(:mod:`distiq.models.depth_estimation`). ``load_dense(path)`` gives ``(model, adapter)``;
``build_dense(family, ...)`` builds a model from a config (a ``tiny`` preset for tests and
teachers trained from scratch).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from distiq.models.inputs import to_rgb
from distiq.models.parts import QuantTarget
from distiq.registry import Registry
from distiq.util import suggest

logger = logging.getLogger(__name__)

DENSE_TASKS = ("segmentation", "detection", "depth")
DENSE_PARTS = ("backbone", "neck", "head", "patch_embedding")
DEFAULT_DENSE_TARGETS = ("backbone", "neck", "head")


@dataclass
class DenseOutputs:
    """What :meth:`DenseAdapter.forward` returns (one batch of B images).

    Attributes:
        logits: segmentation ``(B, C, h, w)`` class logits at the model's output resolution;
            detection ``(B, Q, K)`` per-query class logits (``K = C + 1`` with the no-object class
            last for softmax families, ``K = C`` sigmoid scores for RT-DETR); None for depth.
        boxes: detection ``(B, Q, 4)`` boxes as (cx, cy, w, h) fractions of the input image
            (the model's Q queries only: a training forward's denoising queries are dropped).
        depth: ``(B, h, w)`` predicted depth (the model's units: metres for metric models).
        loss: the model's own loss when targets were given (detection), else None.
        loss_terms: its parts (``loss_ce``, ``loss_bbox``, ``loss_giou``, ...), for logging.
    """

    logits: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    depth: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    loss_terms: dict[str, torch.Tensor] = field(default_factory=dict)


class DenseAdapter:
    """Describes one dense family; subclasses fill the class attributes and ``_run``."""

    family: ClassVar[str] = ""
    task: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    model_class: ClassVar[str] = ""  # the transformers class, e.g. SegformerForSemanticSegmentation
    processor_class: ClassVar[str] = ""  # the transformers *ImageProcessorPil class
    # part -> (include globs, exclude globs), module names relative to the model
    parts: ClassVar[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {}
    default_targets: ClassVar[tuple[str, ...]] = DEFAULT_DENSE_TARGETS
    unquantizable: ClassVar[dict[str, str]] = {}
    # globs of the modules whose outputs (feature maps (B, C, h, w) or tokens (B, N, D)) the
    # feature-distillation term compares by default
    feature_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any, image_processor: Any, *, prefix: str = "") -> None:
        if image_processor is None:
            raise ValueError(
                f"a {self.family} adapter needs an image processor (save it next to the model "
                "with image_processor.save_pretrained(path))"
            )
        self.config = config
        self.image_processor = image_processor
        self.prefix = prefix
        self.input_size  # noqa: B018  (checks the processor's size now)

    # ------------------------------------------------------------------ description
    @property
    def input_size(self) -> tuple[int, int]:
        """``(height, width)`` every image is resized to (the processor's ``size``)."""
        size = getattr(self.image_processor, "size", None) or {}
        if hasattr(size, "to_dict"):
            size = size.to_dict()
        size = {k: v for k, v in dict(size).items() if v is not None}
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        raise ValueError(
            f"the {self.family} image processor resizes to {size}; distiq runs dense models at one "
            "fixed input size (static ONNX graphs): save the processor with "
            "size={'height': H, 'width': W}"
        )

    @property
    def num_labels(self) -> int:
        return int(self.config.num_labels)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names by index (``config.id2label``)."""
        id2label = getattr(self.config, "id2label", None) or {}
        return tuple(str(id2label.get(i, id2label.get(str(i), i))) for i in range(self.num_labels))

    def quant_targets(self) -> dict[str, QuantTarget]:
        """``{part: QuantTarget}`` for ``backbone``, ``neck``, ``head`` and ``patch_embedding``
        (the first convolution on the image, kept in floating point unless a recipe asks)."""
        targets = {}
        for part, (include, exclude) in self.parts.items():
            targets[part] = QuantTarget(
                tuple(self.prefix + p for p in include), tuple(self.prefix + p for p in exclude)
            )
        for part in self.unquantizable:
            targets[part] = QuantTarget(())
        return targets

    def feature_patterns(self) -> tuple[str, ...]:
        """Module-name globs (``*`` within one dotted component) of the stages whose outputs the
        feature-distillation term compares by default: feature maps ``(B, C, h, w)`` or tokens
        ``(B, N, D)``."""
        return tuple(self.prefix + p for p in self.feature_modules)

    # ------------------------------------------------------------------ inputs
    def pixel_values(self, images: Sequence[Any]) -> torch.Tensor:
        """``(B, 3, H, W)`` float32 model inputs for PIL images (RGB; RGBA over white), resized
        to :attr:`input_size` and normalised by the family's image processor."""
        rgb = [to_rgb(image, where=f"image {i}") for i, image in enumerate(images)]
        height, width = self.input_size
        kwargs: dict[str, Any] = {"return_tensors": "pt"}
        if "do_pad" in self.image_processor.to_dict():
            kwargs["do_pad"] = False
        out = self.image_processor(images=rgb, size={"height": height, "width": width}, **kwargs)
        return out["pixel_values"].float()

    # ------------------------------------------------------------------ running
    def forward(
        self, model: nn.Module, pixel_values: torch.Tensor, *, targets: Any = None
    ) -> DenseOutputs:
        """The training forward (see :class:`DenseOutputs`); ``targets`` are the family's own
        training targets (detection: :meth:`detection_targets`), used by its built-in loss."""
        return self._run(model, pixel_values, targets)

    def _run(self, model: nn.Module, pixel_values: torch.Tensor, targets: Any) -> DenseOutputs:
        raise NotImplementedError(f"{type(self).__name__} must implement _run")

    def model_inputs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Keyword arguments of the Hugging Face model (what calibration feeds it)."""
        return {"pixel_values": pixel_values}

    # ------------------------------------------------------------------ saving / loading
    def save_pretrained(self, path: str | Path) -> None:
        """Save the processing (the image processor) next to the model."""
        Path(path).mkdir(parents=True, exist_ok=True)
        self.image_processor.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str | Path, config: Any) -> DenseAdapter:
        """The adapter of the model saved in the local directory ``path``."""
        import transformers

        processor_cls = getattr(transformers, cls.processor_class)
        try:
            processor = processor_cls.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as error:
            raise FileNotFoundError(
                f"{path} holds no usable image processor ({error}); save it next to the model "
                f"with {cls.processor_class}(...).save_pretrained(path)"
            ) from error
        return cls(config, processor)

    @classmethod
    def build_processor(cls, size: tuple[int, int], **changes: Any) -> Any:
        """The family's image processor resizing to ``size`` (height, width)."""
        import transformers

        height, width = size
        return getattr(transformers, cls.processor_class)(
            size={"height": height, "width": width}, **changes
        )

    @classmethod
    def tiny_config(cls, num_labels: int, image_size: int, **changes: Any) -> Any:
        """A small config of this family (a few hundred thousand parameters at most) for tests
        and teachers trained from scratch on small images; ``changes`` override its fields
        (``backbone_config``: a mapping of the backbone config's fields to override)."""
        raise NotImplementedError(f"{cls.__name__} has no tiny config")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r}, task={self.task!r})"


DENSE_ADAPTERS: Registry[type[DenseAdapter]] = Registry("dense model adapter")
_BY_FAMILY: dict[str, type[DenseAdapter]] = {}


def register_dense(cls: type[DenseAdapter]) -> type[DenseAdapter]:
    """Class decorator: register ``cls`` under each of its ``model_types`` and its family."""
    if not (isinstance(cls, type) and issubclass(cls, DenseAdapter)):
        raise TypeError(f"register_dense expects a DenseAdapter subclass, got {cls!r}")
    if cls.task not in DENSE_TASKS:
        raise ValueError(f"{cls.__name__}.task must be one of {DENSE_TASKS}, got {cls.task!r}")
    for model_type in cls.model_types:
        DENSE_ADAPTERS.register(model_type, cls)
    _BY_FAMILY[cls.family] = cls
    return cls


def dense_families() -> dict[str, type[DenseAdapter]]:
    """``{family: adapter class}`` of every registered dense family."""
    return dict(_BY_FAMILY)


def dense_family(name: str) -> type[DenseAdapter]:
    """The adapter class of family ``name`` (``segformer``, ``rt_detr``, ...)."""
    if name not in _BY_FAMILY:
        known = sorted(_BY_FAMILY)
        raise KeyError(
            f"unknown dense model family {name!r}{suggest(name, known)}; known: {', '.join(known)}"
        )
    return _BY_FAMILY[name]


def dense_model_type(path: str | Path) -> str | None:
    """The ``model_type`` of the model saved in ``path`` when a dense adapter handles it, else
    None (reads ``config.json`` only)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return model_type if model_type in DENSE_ADAPTERS else None


def is_dense_model(model_or_adapter: Any) -> bool:
    """Whether a model (by its config) or an adapter belongs to a dense family."""
    if isinstance(model_or_adapter, DenseAdapter):
        return True
    config = getattr(model_or_adapter, "config", None)
    return getattr(config, "model_type", None) in DENSE_ADAPTERS


def _adapter_class(path: Path) -> type[DenseAdapter]:
    model_type = dense_model_type(path)
    if model_type is None:
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json, so it is not a saved Hugging Face model; point to "
                "the directory that model.save_pretrained(...) wrote"
            )
        found = json.loads((path / "config.json").read_text()).get("model_type")
        known = DENSE_ADAPTERS.names()
        raise ValueError(
            f"no dense adapter for model_type {found!r} in {path}; supported: {', '.join(known)}"
        )
    return DENSE_ADAPTERS.get(model_type)


def load_dense_adapter(path: str | Path) -> DenseAdapter:
    """The adapter (config and image processor) of the dense model saved in ``path``, without
    loading its weights."""
    from transformers import AutoConfig

    path = Path(path)
    cls = _adapter_class(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    return cls.from_pretrained(path, config)


def load_dense(path: str | Path) -> tuple[nn.Module, DenseAdapter]:
    """``(model, adapter)`` of the dense model saved in the local directory ``path`` (eval mode,
    float32). Nothing is downloaded.

    Raises:
        FileNotFoundError: no saved model or no image processor there.
        ValueError: the model type has no dense adapter (the supported ones listed).
    """
    import transformers

    from distiq.integrity import check_safetensors

    path = Path(path)
    cls = _adapter_class(path)
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors(weights, "the model's weights")
    model = getattr(transformers, cls.model_class).from_pretrained(path, local_files_only=True)
    model.eval()
    adapter = cls.from_pretrained(path, model.config)
    logger.info("loaded %s (%s adapter) from %s", type(model).__name__, cls.family, path)
    return model, adapter


def build_dense(
    family: str,
    *,
    num_labels: int = 1,
    image_size: int = 64,
    class_names: Sequence[str] = (),
    config: dict[str, Any] | None = None,
    seed: int = 0,
) -> tuple[nn.Module, DenseAdapter]:
    """A freshly initialised model of ``family`` from its tiny config (``config`` overrides its
    fields), with an image processor resizing to ``image_size`` × ``image_size``.

    Args:
        num_labels: classes (segmentation, detection); 1 for depth.
        class_names: the classes' names (``id2label``), ``num_labels`` of them.
    """
    import transformers

    cls = dense_family(family)
    if class_names and len(class_names) != num_labels:
        raise ValueError(f"{len(class_names)} class names for {num_labels} classes")
    model_config = cls.tiny_config(num_labels, image_size, **(config or {}))
    if class_names:
        model_config.id2label = {i: str(n) for i, n in enumerate(class_names)}
        model_config.label2id = {str(n): i for i, n in enumerate(class_names)}
    torch.manual_seed(seed)
    model = getattr(transformers, cls.model_class)(model_config)
    model.eval()
    adapter = cls(model.config, cls.build_processor((image_size, image_size)))
    return model, adapter


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` (cx, cy, w, h) -> (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` (x0, y0, x1, y1) -> (cx, cy, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


__all__ = [
    "DENSE_ADAPTERS",
    "DENSE_PARTS",
    "DENSE_TASKS",
    "DEFAULT_DENSE_TARGETS",
    "DenseAdapter",
    "DenseOutputs",
    "build_dense",
    "cxcywh_to_xyxy",
    "dense_families",
    "dense_family",
    "dense_model_type",
    "is_dense_model",
    "load_dense",
    "load_dense_adapter",
    "register_dense",
    "xyxy_to_cxcywh",
]
