"""The adapter registry and ``load``: a local Hugging Face VLM directory -> (model, adapter).

Adapters register by ``config.model_type`` (``llava``, ``qwen2_vl``, ...) and are also found by
architecture name (``LlavaForConditionalGeneration``). To support another family, subclass
``VLMAdapter`` and register it::

    from distiq.models import VLMAdapter, register_adapter

    @register_adapter
    class MyVLMAdapter(VLMAdapter):
        family = "my_vlm"
        model_types = ("my_vlm",)
        vision_module, projector_module, language_module = "model.vision", "model.proj", "model.lm"
        def image_inputs(self, images): ...
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from distiq.models.adapter import VLMAdapter
from distiq.registry import Registry
from distiq.util import suggest

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

ADAPTERS: Registry[type[VLMAdapter]] = Registry("VLM adapter")
_BY_ARCHITECTURE: dict[str, type[VLMAdapter]] = {}

HOW_TO_REGISTER = (
    "to add a family, subclass distiq.models.VLMAdapter (module names, image_inputs) and "
    "decorate it with @distiq.models.register_adapter"
)


class UnsupportedModelError(ValueError):
    """No adapter is registered for a model type."""


def register_adapter(cls: type[VLMAdapter]) -> type[VLMAdapter]:
    """Class decorator: register ``cls`` under each of its ``model_types`` and architectures."""
    if not (isinstance(cls, type) and issubclass(cls, VLMAdapter)):
        raise TypeError(f"register_adapter expects a VLMAdapter subclass, got {cls!r}")
    if not cls.model_types:
        raise ValueError(f"{cls.__name__}.model_types is empty: name the config.model_type(s)")
    for model_type in cls.model_types:
        ADAPTERS.register(model_type, cls)
    for architecture in cls.architectures:
        _BY_ARCHITECTURE[architecture] = cls
    return cls


def supported_model_types() -> list[str]:
    return ADAPTERS.names()


def adapter_class(config_or_model: Any) -> type[VLMAdapter]:
    """The adapter class for a config (or a model with ``.config``), by model_type first, then
    by architecture name; an unsupported one raises ``UnsupportedModelError``."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    if model_type in ADAPTERS:
        return ADAPTERS.get(model_type)
    for architecture in getattr(config, "architectures", None) or ():
        if architecture in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[architecture]
    known = supported_model_types()
    found = ", ".join(getattr(config, "architectures", None) or ()) or type(config).__name__
    raise UnsupportedModelError(
        f"no distiq adapter for model_type {model_type!r} ({found})"
        f"{suggest(str(model_type), known)}; supported: {', '.join(known)}; {HOW_TO_REGISTER}"
    )


class LoadedVLM(NamedTuple):
    """A model and its adapter, as ``load`` returns them."""

    model: nn.Module
    adapter: VLMAdapter

    def save_pretrained(self, path: str | Path) -> None:
        """Save weights, config and processing so that ``load(path)`` gives this back."""
        self.model.save_pretrained(path)
        self.adapter.save_pretrained(path)


def load(
    path: str | Path,
    *,
    trust_remote_code: bool = False,
    dtype: Any = None,
    attn_implementation: str | None = None,
    prompt_template: str | None = None,
) -> LoadedVLM:
    """Load a VLM and its processing from the local directory ``path``.

    Args:
        path: a directory written by ``save_pretrained`` (config.json, weights, tokenizer,
            image processor). Nothing is downloaded.
        trust_remote_code: run model code shipped in the directory; off unless you trust it.
        dtype: the weights' dtype (default: as saved, float32 for the built-in model).
        attn_implementation: ``eager`` (attention probabilities available), ``sdpa``, ...;
            default: transformers' choice (``sdpa``). It is not stored in the directory.
        prompt_template: overrides the chat template / family default prompt
            (``"{image} {question} answer:"`` style, see ``VLMAdapter``).

    Returns:
        ``LoadedVLM(model, adapter)``; the model in eval mode.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    path = Path(path)
    config_file = _config_file(path)
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in ADAPTERS:
        # Fail before loading weights, with the list of what is supported.
        adapter_class(_RawConfig(model_type, json.loads(config_file.read_text())))
    try:
        config = AutoConfig.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except ValueError as error:
        hint = "" if trust_remote_code else " (custom code needs trust_remote_code=True)"
        raise ValueError(f"cannot read the config in {path}: {error}{hint}") from error
    cls = adapter_class(config)
    model_kwargs: dict[str, Any] = {
        "local_files_only": True,
        "trust_remote_code": trust_remote_code,
    }
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    if attn_implementation is not None:
        model_kwargs["attn_implementation"] = attn_implementation
    from distiq.integrity import check_safetensors

    for weights in sorted(path.glob("*.safetensors")):  # a damaged file: said, by name
        check_safetensors(weights, "the model's weights")
    model = AutoModelForImageTextToText.from_pretrained(path, **model_kwargs)
    model.eval()
    adapter = cls.from_pretrained(
        path, model.config, trust_remote_code=trust_remote_code, prompt_template=prompt_template
    )
    logger.info("loaded %s (%s adapter) from %s", type(model).__name__, cls.family, path)
    return LoadedVLM(model, adapter)


def load_adapter(
    path: str | Path, *, trust_remote_code: bool = False, prompt_template: str | None = None
) -> VLMAdapter:
    """The adapter (tokenizer, image processor, prompt format) of the model saved in ``path``,
    without loading its weights: what preparing data for that model needs."""
    from transformers import AutoConfig

    path = Path(path)
    _config_file(path)
    config = AutoConfig.from_pretrained(
        path, local_files_only=True, trust_remote_code=trust_remote_code
    )
    return adapter_class(config).from_pretrained(
        path, config, trust_remote_code=trust_remote_code, prompt_template=prompt_template
    )


def _config_file(path: Path) -> Path:
    """``path/config.json``; a clear error when ``path`` is not a saved model directory."""
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is not a directory; distiq loads models from a local directory written by "
            "save_pretrained (nothing is downloaded)"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{path} has no config.json, so it is not a saved Hugging Face model; point to the "
            "directory that model.save_pretrained(...) wrote"
        )
    return config_file


class _RawConfig:
    """Just enough of a config (model_type, architectures) for ``adapter_class``."""

    def __init__(self, model_type: str | None, data: dict) -> None:
        self.model_type = model_type
        self.architectures = data.get("architectures")
