"""The language model of a VLM as a llama.cpp GGUF model: architecture, metadata, tensor names.

Which llama.cpp architecture runs which Hugging Face text model (``text_config.model_type``),
and what the conversion does to the tensors on the way (the conventions of llama.cpp's
``convert_hf_to_gguf.py``):

    llama, mistral (LLaVA, Idefics3, SmolVLM)   llama     q/k rows permuted from Hugging Face's
                                                          half-split RoPE layout to llama.cpp's
                                                          interleaved one; Llama 3 RoPE scaling
                                                          as a rope_freqs tensor
    qwen2                                        qwen2
    qwen2_vl_text, qwen2_5_vl_text               qwen2vl   + rope.dimension_sections (M-RoPE)
    gemma3_text (Gemma 3)                        gemma3    RMSNorm weights + 1 (Gemma stores
                                                          w for a (1 + w) scale), sliding-window
                                                          pattern per layer
    gemma (PaliGemma)                            gemma     RMSNorm weights + 1

Tensor names come from gguf-py's ``TensorNameMap`` for the architecture (``blk.N.attn_q``, ...)
after the language model's prefix (``model.language_model.``) is replaced by ``model.``. A row
permutation moves whole rows, so a quantized q/k projection keeps its codes and block scales.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


class ArchitectureError(ValueError):
    """A language model llama.cpp cannot run as it was trained."""


@dataclass(frozen=True)
class TextArch:
    """How one Hugging Face text model becomes a llama.cpp architecture."""

    gguf_name: str
    permute_qk: bool = False
    norm_shift: float = 0.0


TEXT_ARCHES = {
    "llama": TextArch("llama", permute_qk=True),
    "mistral": TextArch("llama", permute_qk=True),
    "qwen2": TextArch("qwen2"),
    "qwen2_vl_text": TextArch("qwen2vl"),
    "qwen2_vl": TextArch("qwen2vl"),
    "qwen2_5_vl_text": TextArch("qwen2vl"),
    "qwen2_5_vl": TextArch("qwen2vl"),
    "gemma3_text": TextArch("gemma3", norm_shift=1.0),
    "gemma": TextArch("gemma", norm_shift=1.0),
}


def text_config(config: Any) -> Any:
    """The language model's config of a VLM config (or the config itself)."""
    return getattr(config, "text_config", None) or config


def text_arch(config: Any) -> TextArch:
    """The llama.cpp architecture of ``config``'s language model; raises ArchitectureError."""
    model_type = text_config(config).model_type
    if model_type not in TEXT_ARCHES:
        raise ArchitectureError(
            f"the language model is a {model_type!r}, which distiq's GGUF writer does not map "
            f"to a llama.cpp architecture; supported: {', '.join(sorted(TEXT_ARCHES))}"
        )
    return TEXT_ARCHES[model_type]


def _rope(cfg: Any, kind: str | None = None) -> dict:
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    if kind is not None:
        params = dict(params.get(kind) or {})
    if "rope_theta" not in params and getattr(cfg, "rope_theta", None) is not None:
        params["rope_theta"] = cfg.rope_theta
    return params


def _write_rope_scaling(writer: Any, params: dict) -> None:
    import gguf

    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default", "llama3"):  # llama3: the rope_freqs tensor
        return
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
        return
    raise ArchitectureError(
        f"RoPE scaling {rope_type!r} is not written by distiq's GGUF writer (default and linear "
        "are); llama.cpp would run the model with different positions"
    )


def head_dim(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def write_text_metadata(writer: Any, config: Any, arch: TextArch, n_vocab: int) -> None:
    """The ``<arch>.*`` hyperparameters llama.cpp reads for ``config``'s language model."""
    cfg = text_config(config)
    n_head = int(cfg.num_attention_heads)
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(int(cfg.num_hidden_layers))
    writer.add_feed_forward_length(int(cfg.intermediate_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(getattr(cfg, "num_key_value_heads", None) or n_head))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_key_length(head_dim(cfg))
    writer.add_value_length(head_dim(cfg))
    writer.add_vocab_size(n_vocab)
    if arch.gguf_name == "gemma3":
        _gemma3_metadata(writer, cfg)
        return
    rope = _rope(cfg)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim(cfg))
    if arch.gguf_name == "qwen2vl":
        sections = list(rope.get("mrope_section") or [])
        if not sections:
            raise ArchitectureError("a Qwen2-VL language model needs rope mrope_section")
        writer.add_rope_dimension_sections([*sections, 0, 0, 0, 0][:4])
        rope = {k: v for k, v in rope.items() if k != "mrope_section"}
    _write_rope_scaling(writer, rope)


def _gemma3_metadata(writer: Any, cfg: Any) -> None:
    """Gemma 3: sliding window per layer, two RoPE bases, and the attention scale llama.cpp
    hard-codes (1/sqrt(head_dim)) checked against the model's ``query_pre_attn_scalar``."""
    scalar = getattr(cfg, "query_pre_attn_scalar", None)
    if scalar is not None and int(scalar) != head_dim(cfg):
        raise ArchitectureError(
            f"this Gemma 3 scales attention by 1/sqrt({scalar}) (query_pre_attn_scalar) but "
            f"llama.cpp's gemma3 uses 1/sqrt(head_dim) = 1/sqrt({head_dim(cfg)}): it would run "
            "a different model"
        )
    if getattr(cfg, "attn_logit_softcapping", None):
        raise ArchitectureError("Gemma 3 with attention logit soft-capping has no llama.cpp form")
    if getattr(cfg, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    full, sliding = _rope(cfg, "full_attention"), _rope(cfg, "sliding_attention")
    if not full:
        full = _rope(cfg)
    writer.add_rope_freq_base(float(full.get("rope_theta", 1_000_000.0)))
    _write_rope_scaling(writer, full)
    layer_types = list(getattr(cfg, "layer_types", None) or [])
    if any(t == "sliding_attention" for t in layer_types):
        writer.add_sliding_window(int(cfg.sliding_window))
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        if sliding.get("rope_theta") is not None:
            writer.add_rope_freq_base_swa(float(sliding["rope_theta"]))


def rope_freq_factors(config: Any) -> torch.Tensor | None:
    """Llama 3's RoPE scaling as llama.cpp takes it: ``rope_freqs.weight``, one divisor per
    rotary frequency (``theta_i / factor_i``), or None for other RoPE types. The factors are
    read off transformers' own llama3 frequencies, so they are those the model was trained with:
    ``default_inv_freq / llama3_inv_freq``."""
    cfg = text_config(config)
    rope = _rope(cfg)
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    if text_arch(config).gguf_name != "llama":
        raise ArchitectureError("llama3 RoPE scaling is written for llama architectures only")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    dim = head_dim(cfg)
    theta = float(rope["rope_theta"])
    default = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return (default / scaled.float()).to(torch.float32)


def permute_rows(rows: int, n_head: int) -> torch.Tensor:
    """The row order that turns a Hugging Face q/k projection (each head's rotary halves
    ``[x0..x_{d/2-1}, y0..y_{d/2-1}]``) into llama.cpp's interleaved ``[x0, y0, x1, y1, ...]``
    (``LlamaModel.permute`` of convert_hf_to_gguf.py), as an index: ``new = old[index]``."""
    head = rows // n_head
    index = torch.arange(rows).reshape(n_head, 2, head // 2).transpose(1, 2)
    return index.reshape(rows)


@dataclass
class Mapped:
    """One source tensor on its way into a GGUF file."""

    gguf_name: str
    source: str
    rows: torch.Tensor | None = None  # rows to take, in order (a permutation or a slice)
    shift: float = 0.0  # added to a float tensor (Gemma's norm weights)
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None  # float tensors only


def map_text_tensors(names: list[str], config: Any, language_prefix: str, lm_head: str) -> list:
    """``Mapped`` entries for the language model's tensors among ``names`` (every name under
    ``language_prefix`` or ``lm_head``); raises ArchitectureError for one it cannot place."""
    import gguf

    cfg = text_config(config)
    arch = text_arch(config)
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.gguf_name)
    tensor_map = gguf.get_tensor_name_map(arch_enum, int(cfg.num_hidden_layers))
    allowed = set(gguf.MODEL_TENSORS[arch_enum])
    n_head = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
    mapped, unplaced = [], []
    for name in names:
        if name.startswith(language_prefix + "."):
            hf = "model." + name[len(language_prefix) + 1 :]
        elif name.startswith(lm_head + "."):
            hf = "lm_head." + name[len(lm_head) + 1 :]
        else:
            continue
        found = tensor_map.get_type_and_name(hf, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in allowed:
            unplaced.append(name)
            continue
        entry = Mapped(found[1], name)  # the suffix (.weight / .bias) is kept by the map
        if arch.permute_qk and found[0] in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
            heads = n_head if found[0] == gguf.MODEL_TENSOR.ATTN_Q else n_kv
            entry.rows = permute_rows(heads * head_dim(cfg), heads)
        if arch.norm_shift and hf.endswith("norm.weight"):
            entry.shift = arch.norm_shift
        mapped.append(entry)
    if unplaced:
        raise ArchitectureError(
            f"no llama.cpp {arch.gguf_name} tensor for: {', '.join(unplaced[:8])}"
            + (f" (+{len(unplaced) - 8} more)" if len(unplaced) > 8 else "")
        )
    return mapped
