"""The language-side parts of a VLM that ``export_onnx`` traces, as modules.

Each wraps the model's own submodules (no copies), so the same module runs in PyTorch (the
benchmark's PyTorch backends use them) and is what the ONNX graph computes:

- ``EmbedGraph``: ``input_ids`` and the vision graph's ``image_features`` -> ``inputs_embeds``
  (token embeddings with the image features written over the image-token positions, in order);
- ``DecoderGraph``: ``inputs_embeds``, ``attention_mask``, ``position_ids`` and the KV cache
  ``past_key_values.N.key/value`` -> ``logits`` and ``present.N.key/value`` (the layout
  onnxruntime-genai drives);
- ``LanguageGraph``: the same decoder without a cache (``inputs_embeds``, ``attention_mask`` ->
  ``logits``), which the benchmark times in PyTorch against the decoder graph's prefill;
- the task heads of ``VLMWithHeads`` on the vision tower's features.

``embedding_part`` / ``decoder_part`` / ``head_parts`` give each traced module with its example
inputs, input / output names and dynamic axes. The vision graphs of each family live in
``distiq.export.onnx_vision``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Families whose parts export_onnx can trace (adapter.family).
ONNX_FAMILIES = ("llava", "idefics3", "qwen2_vl")
MROPE_FAMILIES = ("qwen2_vl",)  # 3-D (temporal, height, width) position ids


# -- the traced parts -----------------------------------------------------------------------------
class EmbedGraph(nn.Module):
    """input_ids (B, L) int64, image_features (N, D) -> inputs_embeds (B, L, D).

    The i-th image token (row-major over the batch) takes row i of ``image_features``, as the
    Hugging Face models' ``masked_scatter`` does. With N = 0 (decoding steps, text-only prompts)
    the graph is a plain embedding lookup: a zero row is appended so the gather never indexes an
    empty tensor."""

    def __init__(self, embedding: nn.Module, image_token_id: int) -> None:
        super().__init__()
        self.embedding = embedding
        self.image_token_id = int(image_token_id)

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(input_ids)  # (B, L, D)
        is_image = (input_ids == self.image_token_id).reshape(-1)  # (B*L,)
        count = image_features.shape[0]
        rows = torch.cat([image_features.to(embeds.dtype), embeds.new_zeros(1, embeds.shape[-1])])
        order = torch.cumsum(is_image.long(), 0) - 1  # which feature row each image token takes
        index = torch.where(is_image, order, torch.zeros_like(order) + count)
        gathered = rows.index_select(0, index).reshape(embeds.shape)
        return torch.where(is_image.reshape(input_ids.shape)[..., None], gathered, embeds)


class _ExportCache:
    """The ``cache`` object the decoder layers call: ``update`` appends this step's keys and
    values (B, Hkv, L, hd) to the layer's past and keeps the result as the layer's present."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(past)

    def update(self, key, value, layer_idx: int, *args, **kwargs):
        past_key, past_value = self.past[layer_idx]
        key = torch.cat([past_key.to(key.dtype), key], dim=2)
        value = torch.cat([past_value.to(value.dtype), value], dim=2)
        self.present[layer_idx] = (key, value)
        return key, value


def causal_mask(attention_mask: torch.Tensor, query_length: int, dtype: torch.dtype):
    """Additive mask (B, 1, L, P + L) from ``attention_mask (B, P + L)``: query i (at absolute
    position P + i) sees key j when j <= P + i and the key is not padding."""
    total = attention_mask.shape[1]
    key_positions = torch.arange(total, device=attention_mask.device)  # (P+L,)
    query_positions = torch.arange(query_length, device=attention_mask.device) + (
        total - query_length
    )  # (L,)
    keep = key_positions[None, :] <= query_positions[:, None]  # (L, P+L)
    keep = keep[None, None] & attention_mask[:, None, None, :].bool()  # (B, 1, L, P+L)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(keep, zero, blocked)


class DecoderGraph(nn.Module):
    """The language model with a KV cache, in onnxruntime-genai's decoder layout.

    Inputs: ``inputs_embeds (B, L, D)``, ``attention_mask (B, P + L)`` int64 (past and new
    tokens, 0 on padding), ``position_ids`` (B, L) int64 — (3, B, L) for multimodal RoPE — and per
    layer ``past_key_values.N.key/value (B, Hkv, P, hd)`` (P = 0 on the prompt). Outputs:
    ``logits (B, L, V)`` and ``present.N.key/value (B, Hkv, P + L, hd)``. A decoding step feeds
    one token (L = 1) and the previous step's presents as its pasts, so its work does not
    grow with the prompt beyond attending over the cached keys.

    The layers are the model's own, called as the Hugging Face model calls them (rotary
    embeddings from ``rotary_emb``, an explicit additive causal mask, a cache object whose
    ``update`` concatenates); eager and sdpa attention both trace.
    """

    def __init__(self, language_model: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        check_decoder(language_model)
        self.language_model, self.lm_head = language_model, lm_head
        self.cache_argument = _cache_argument(language_model.layers[0])

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past_key_values: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        model = self.language_model
        layers = len(model.layers)
        if len(past_key_values) != 2 * layers:
            raise ValueError(
                f"the decoder takes {2 * layers} past tensors (key and value of {layers} "
                f"layers), got {len(past_key_values)}"
            )
        cache = _ExportCache(
            [(past_key_values[2 * i], past_key_values[2 * i + 1]) for i in range(layers)]
        )
        mask = causal_mask(attention_mask, inputs_embeds.shape[1], inputs_embeds.dtype)
        position_embeddings = model.rotary_emb(inputs_embeds, position_ids)
        hidden = inputs_embeds
        for layer in model.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                use_cache=True,
                position_embeddings=position_embeddings,
                **{self.cache_argument: cache},
            )
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        logits = self.lm_head(model.norm(hidden))
        presents = [tensor for pair in cache.present for tensor in pair]
        return (logits, *presents)


class LanguageGraph(nn.Module):
    """inputs_embeds (B, L, D), attention_mask (B, L) -> logits (B, L, V): the decoder graph's
    prompt step (empty cache, positions 0..L-1), without the cache outputs."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Module, mrope: bool = False) -> None:
        super().__init__()
        self.decoder = DecoderGraph(language_model, lm_head)
        self.mrope = mrope

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch, length = inputs_embeds.shape[:2]
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L), left padding
        if self.mrope:
            positions = positions[None].expand(3, batch, length)
        past = empty_past(self.decoder.language_model, batch, inputs_embeds.dtype)
        return self.decoder(inputs_embeds, attention_mask, positions, *past)[0]


class DetectionGraph(nn.Module):
    """vision_features -> (cls_logits (B, N, C), box_ltrb (B, N, 4)); prefix tokens dropped."""

    def __init__(self, head, prefix: int, grid: tuple[int, int], stride: int) -> None:
        super().__init__()
        self.head, self.prefix, self.grid, self.stride = head, prefix, grid, stride

    def forward(self, vision_features: torch.Tensor):
        out = self.head(vision_features[:, self.prefix :], self.grid, self.stride)
        return out["cls_logits"], out["box_ltrb"]


class SegmentationGraph(nn.Module):
    """vision_features -> seg_logits (B, C, H, W) at the input resolution."""

    def __init__(self, head, prefix: int, grid: tuple[int, int], size: tuple[int, int]) -> None:
        super().__init__()
        self.head, self.prefix, self.grid, self.size = head, prefix, grid, size

    def forward(self, vision_features: torch.Tensor) -> torch.Tensor:
        return self.head(vision_features[:, self.prefix :], self.grid, self.size)


# -- the traced parts' signatures (what export_onnx traces) -------------------------------
def embedding_part(vlm: nn.Module, adapter: Any, hidden: int) -> tuple:
    """``embedding.onnx``: traced with 3 image tokens among 7 (the padded batch of 2 too)."""
    module = EmbedGraph(vlm.get_input_embeddings(), adapter.image_token_id)
    ids = torch.zeros(2, 7, dtype=torch.long)
    ids[0, 2:5] = adapter.image_token_id
    dynamic = {
        "input_ids": {0: "batch", 1: "sequence"},
        "image_features": {0: "num_image_tokens"},
        "inputs_embeds": {0: "batch", 1: "sequence"},
    }
    return (
        "embedding", module, (ids, torch.randn(3, hidden)), ["input_ids", "image_features"],
        ["inputs_embeds"], dynamic,
    )  # fmt: skip


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    """(past input names, present output names) in the decoder's order: key, value per layer."""
    past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return past, present


def decoder_part(decoder: DecoderGraph, geometry: dict, mrope: bool) -> tuple:
    """``language_model.onnx``: traced with batch 2, 5 new tokens after 3 cached ones, the first
    row left-padded (so no shape is a constant of the trace)."""
    batch, length, past_length = 2, 5, 3
    embeds = torch.randn(batch, length, geometry["hidden_size"])
    mask = torch.ones(batch, past_length + length, dtype=torch.long)
    mask[0, :2] = 0
    positions = torch.arange(past_length, past_length + length).expand(batch, length)
    if mrope:
        positions = positions[None].expand(3, batch, length)
    shape = (batch, geometry["num_key_value_heads"], past_length, geometry["head_size"])
    past = [torch.randn(shape) for _ in range(2 * geometry["num_hidden_layers"])]
    past_names, present_names = cache_names(geometry["num_hidden_layers"])
    dynamic = {
        "inputs_embeds": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {1: "batch", 2: "sequence"} if mrope else {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
        **{name: {0: "batch", 2: "past_sequence"} for name in past_names},
        **{name: {0: "batch", 2: "total_sequence"} for name in present_names},
    }
    return (
        "language_model", decoder, (embeds, mask, positions, *past),
        ["inputs_embeds", "attention_mask", "position_ids", *past_names],
        ["logits", *present_names], dynamic,
    )  # fmt: skip


def head_parts(heads: nn.Module | None, vision) -> list[tuple]:
    """The task heads' graphs on the vision graph's ``vision_features`` (VLMWithHeads)."""
    if heads is None:
        return []
    facts = vision.facts
    prefix = 0 if facts["drop_class_token"] else 1
    grid = tuple(facts["grid"])
    with torch.no_grad():
        features = vision.module(*vision.example)[1]
    dynamic = {"vision_features": {0: "num_images"}}
    parts = []
    if heads.detection_head is not None:
        module = DetectionGraph(heads.detection_head, prefix, grid, facts["patch_size"])
        parts.append(
            ("detection_head", module, (features,), ["vision_features"],
             ["cls_logits", "box_ltrb"],
             {**dynamic, "cls_logits": {0: "num_images"}, "box_ltrb": {0: "num_images"}})
        )  # fmt: skip
    if heads.segmentation_head is not None:
        module = SegmentationGraph(
            heads.segmentation_head, prefix, grid, tuple(facts["image_size"])
        )
        parts.append(
            ("segmentation_head", module, (features,), ["vision_features"], ["seg_logits"],
             {**dynamic, "seg_logits": {0: "num_images"}})
        )  # fmt: skip
    return parts


# -- the decoder's cache geometry ------------------------------------------------------------------
def kv_geometry(language_model: nn.Module) -> dict[str, int]:
    """Layers, attention heads, key/value heads and head size of the decoder's cache."""
    attention = language_model.layers[0].self_attn
    config = language_model.config
    heads = int(config.num_attention_heads)
    return {
        "num_hidden_layers": len(language_model.layers),
        "num_attention_heads": heads,
        "num_key_value_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_size": int(attention.head_dim),
        "hidden_size": int(config.hidden_size),
    }


def empty_past(language_model: nn.Module, batch: int, dtype=torch.float32) -> list[torch.Tensor]:
    """The cache of an empty context: per layer key and value (B, Hkv, 0, hd)."""
    geometry = kv_geometry(language_model)
    shape = (batch, geometry["num_key_value_heads"], 0, geometry["head_size"])
    return [torch.zeros(shape, dtype=dtype) for _ in range(2 * geometry["num_hidden_layers"])]


def _cache_argument(layer: nn.Module) -> str:
    """The name under which a decoder layer takes its cache (``cache`` in current transformers,
    ``past_key_values`` in earlier 5.x releases)."""
    import inspect

    parameters = inspect.signature(layer.forward).parameters
    for name in ("cache", "past_key_values", "past_key_value"):
        if name in parameters:
            return name
    raise ValueError(
        f"{type(layer).__name__}.forward takes no cache argument (cache / past_key_values); "
        "the ONNX decoder export needs a decoder layer that does"
    )


def check_decoder(language_model: nn.Module) -> None:
    """Raise ``ValueError`` when the language model is not a decoder ``DecoderGraph`` can trace:
    Llama / Qwen2-style (``layers``, ``norm``, ``rotary_emb``), full attention, eager or sdpa."""
    missing = [a for a in ("layers", "norm", "rotary_emb") if not hasattr(language_model, a)]
    if missing:
        raise ValueError(
            f"{type(language_model).__name__} has no {', '.join(missing)}: the ONNX decoder "
            "export supports Llama / Qwen2-style language models (layers, norm, rotary_emb)"
        )
    config = language_model.config
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        raise ValueError(
            f"{type(language_model).__name__} has sliding-window attention layers, which the "
            "ONNX decoder export does not write; export a model without sliding windows"
        )
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in ("eager", "sdpa"):
        raise ValueError(
            f"the language model uses {implementation!r} attention, which does not trace to "
            "ONNX; call model.set_attn_implementation('sdpa') (or 'eager') before exporting"
        )


# -- model checks and accessors --------------------------------------------------------------------
def resolve_vlm(model: nn.Module, adapter: Any):
    """(vlm, adapter, heads model or None) for a supported VLM or ``VLMWithHeads``; a clear
    error for a missing adapter or another family."""
    from distiq.models import VLMWithHeads

    heads = None
    if isinstance(model, VLMWithHeads):
        heads, vlm, adapter = model, model.vlm, adapter or model.base_adapter
    else:
        vlm = model
    if adapter is None:
        raise ValueError(
            "export_onnx needs the model's adapter (adapter=...; distiq.models.load and "
            "build_edge_vlm return it): the runner needs its tokenizer, image processor and prompt"
        )
    family = getattr(adapter, "family", None)
    model_type = getattr(getattr(vlm, "config", None), "model_type", None)
    if family not in ONNX_FAMILIES or model_type == "qwen2_5_vl":
        raise ValueError(
            f"export_onnx writes LLaVA (the built-in edge VLM, LlavaForConditionalGeneration, "
            f"VLMWithHeads), Idefics3 / SmolVLM and Qwen2-VL models; got a {model_type or family!r} "
            "model. Other families: export the packed, compressed-tensors or GGUF format"
        )
    return vlm, adapter, heads


def language_parts(vlm: nn.Module, adapter: Any) -> tuple[nn.Module, nn.Module]:
    """(language model, lm_head) modules of ``vlm``."""
    names = adapter.module_names()
    return vlm.get_submodule(names.language_model), vlm.get_submodule(names.lm_head)


def language_graph(model: nn.Module, adapter: Any = None) -> LanguageGraph:
    """The language model of a VLM (or ``VLMWithHeads``) as a module sharing the model's layers:
    the prompt step of ``language_model.onnx``."""
    vlm, adapter, _ = resolve_vlm(model, adapter)
    language_model, lm_head = language_parts(vlm, adapter)
    return LanguageGraph(language_model, lm_head, adapter.family in MROPE_FAMILIES)


def vision_graph(model: nn.Module, adapter: Any = None) -> nn.Module:
    """The vision part (tower, feature selection, projector) as a module: ``vision.onnx``'s
    ``image_features``."""
    from distiq.export.onnx_vision import vision_part

    vlm, adapter, _ = resolve_vlm(model, adapter)
    return vision_part(vlm, adapter).module


def image_facts(model: nn.Module, adapter: Any = None) -> dict:
    """Image size, patch size, grid and image-token count of a LLaVA VLM (manifest ``vlm``)."""
    from distiq.export.onnx_vision import llava_image_facts

    vlm, adapter, _ = resolve_vlm(model, adapter)
    if adapter.family != "llava":
        raise ValueError(f"image_facts describes LLaVA models, not {adapter.family!r} ones")
    return llava_image_facts(vlm, adapter)
