"""Records and helpers that describe a model's parts: module names, quantization targets,
feature-capture points, and the module scans behind them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from distiq.quant.spec import PatternSelection


@dataclass(frozen=True)
class ModuleNames:
    """Fully qualified module names of a VLM's parts."""

    vision: str
    projector: str
    language_model: str
    lm_head: str


@dataclass(frozen=True)
class QuantTarget(PatternSelection):
    """Glob patterns (``fnmatch`` over fully qualified module names) selecting one part.

    ``include``/``exclude`` plug straight into ``QuantConfig(include=..., exclude=...)`` and
    mean what they mean to ``quantize_``: a pattern matches a module when it matches its name
    or an ancestor's (``"model.vision_tower"`` is the whole tower). ``exclude`` holds the
    modules kept at higher precision by default (patch/position and token embeddings) and
    modules of other parts nested inside this one (Qwen2-VL's merger).
    """

    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class FeaturePoints:
    """Module names whose forward outputs are features to distil.

    Attributes:
        vision_layers: the vision encoder's layers; output (B, N_v, D_v) (or a tuple whose
            first element is), N_v the patch tokens (+ class token). Qwen2-VL packs all images
            into one sequence: (N_patches_total, D_v).
        language_layers: the decoder layers; output (B, L, D_t).
        projector: the projector; output the image embeddings fed to the language model.
            Idefics3/SmolVLM run the tower on tiles: (B * tiles, N_v, D_v).
        vision_attention / language_attention: the attention modules of those layers that can
            return probabilities: with eager attention their output is
            ``(attn_output, attn_probs)``, attn_probs (B, heads, L_q, L_k), rows summing to 1
            (other implementations return None there). Empty when the family's modules never
            return them (Qwen2-VL's vision blocks).
        attention_probs: whether those modules return probabilities now
            (``VLMAdapter.enable_attention_probs(model)`` switches to eager attention).
    """

    vision_layers: tuple[str, ...]
    language_layers: tuple[str, ...]
    projector: str
    vision_attention: tuple[str, ...]
    language_attention: tuple[str, ...]
    attention_probs: bool


def attention_probs_available(model: nn.Module) -> bool:
    """True when every attention implementation in ``model``'s configs is ``eager``."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    implementations = []
    for sub in (config, *(getattr(config, k, None) for k in ("vision_config", "text_config"))):
        if sub is not None and getattr(sub, "_attn_implementation", None):
            implementations.append(sub._attn_implementation)
    return bool(implementations) and all(i == "eager" for i in implementations)


def narrow_layers(model: nn.Module, block_size: int) -> list[str]:
    """Names of ``nn.Linear`` / ``nn.Conv2d`` modules whose input width (per output channel)
    is not a multiple of ``block_size`` (e.g. narrower than 64 for NF4 blocks)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            width = module.in_features
        elif isinstance(module, nn.Conv2d):
            width = module.weight[0].numel()
        else:
            continue
        if width % block_size:
            names.append(name)
    return names


def layer_list(modules: dict[str, nn.Module], root: str) -> tuple[str, ...]:
    """The children of the longest ``nn.ModuleList`` under ``root`` named ``layers``/``blocks``."""
    best: tuple[str, ...] = ()
    for name, module in modules.items():
        if not name.startswith(root + ".") or not isinstance(module, nn.ModuleList):
            continue
        if name.rsplit(".", 1)[-1] not in ("layers", "blocks", "layer", "h"):
            continue
        if len(module) > len(best):
            best = tuple(f"{name}.{i}" for i in range(len(module)))
    if not best:
        raise ValueError(f"found no layer list (…layers / …blocks) under {root!r}")
    return best


def attention_modules(modules: dict[str, nn.Module], layers: Sequence[str]) -> tuple[str, ...]:
    """Each layer's attention child (``self_attn`` / ``attn`` / ``attention``), where present."""
    found = []
    for layer in layers:
        for child in ("self_attn", "attn", "attention", "self_attention"):
            if f"{layer}.{child}" in modules:
                found.append(f"{layer}.{child}")
                break
    return tuple(found)
