"""The vision graph of each family: pixels -> ``image_features (N, D)``, the rows the embedding
graph writes over the image tokens, in prompt order (onnxruntime-genai's ``vision`` model).

- LLaVA: ``pixel_values (I, 3, H, W)`` -> tower, LLaVA's layer / class-token selection,
  projector -> ``(I * P, D)``. With task heads the graph also returns the selected tower
  features ``vision_features (I, P', Dv)`` the heads read.
- Idefics3 / SmolVLM: ``pixel_values (T, 3, S, S)`` — the image's tiles (and global image),
  each a full ``S x S`` tile as the image processor makes them — -> SigLIP tower, pixel-shuffle
  connector -> ``(T * image_seq_len, D)``. The tower's patch positions are those of a full tile,
  computed once at export by the model's own position code.
- Qwen2-VL: ``pixel_values (P, C * t * p * p)`` (one image's flattened patches) and
  ``image_grid_thw (1, 3)`` -> ViT with 2-D rotary positions computed in the graph from the
  grid, patch merger -> ``(P / m², D)``. One image per call: onnxruntime-genai loops over images
  (its input ``image_grid_thw`` has a fixed first dimension of 1), as ``OrtVLM`` does.

Each graph calls the model's own submodules (quantized layers included), so what runs in PyTorch
is what the ONNX graph computes; where the Hugging Face forward has data-dependent Python (the
Qwen2-VL tower splits attention by image with ``tolist()``, Idefics3 drops padding images), the
graph computes the same thing for its single-image or full-tile input with tensor operations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class VisionPart:
    """A vision graph with what tracing and the configs need.

    Attributes:
        module: the graph as a module.
        example: example inputs for tracing (a real image through the adapter's processor).
        input_names, output_names, dynamic_axes: the ONNX signature.
        genai: extra keys of onnxruntime-genai's ``vision`` section (patch and merge sizes).
        facts: what the runner needs to know (written to the manifest's ``vlm`` facts).
    """

    module: nn.Module
    example: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict
    genai: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)


# -- LLaVA ----------------------------------------------------------------------------------------
class LlavaVisionGraph(nn.Module):
    """pixel_values (I, 3, H, W) -> image_features (I * P, D) [, vision_features (I, P', Dv)]."""

    def __init__(
        self,
        tower: nn.Module,
        projector: nn.Module,
        layers: list[int],
        drop_class_token: bool,
        tower_features: bool = False,
    ) -> None:
        super().__init__()
        self.tower, self.projector = tower, projector
        self.layers, self.drop, self.tower_features = layers, drop_class_token, tower_features

    def forward(self, pixel_values: torch.Tensor):
        out = self.tower(pixel_values, output_hidden_states=True, return_dict=True)
        selected = [out.hidden_states[i] for i in self.layers]
        if self.drop:
            selected = [h[:, 1:] for h in selected]
        features = torch.cat(selected, dim=-1) if len(selected) > 1 else selected[0]
        embeds = self.projector(features)  # (I, P, D)
        flat = embeds.reshape(-1, embeds.shape[-1])
        return (flat, features) if self.tower_features else flat


def llava_image_facts(vlm: nn.Module, adapter: Any) -> dict:
    """Image size, patch, grid, image-token count and feature selection of a LLaVA VLM."""
    from PIL import Image

    vision = vlm.config.vision_config
    size = int(vision.image_size)
    inputs, expansions = adapter.image_inputs([Image.new("RGB", (size, size))])
    height, width = inputs["pixel_values"].shape[-2:]
    patch = int(vision.patch_size)
    layers = vlm.config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    return {
        "image_size": [int(height), int(width)],
        "patch_size": patch,
        "grid": [int(height) // patch, int(width) // patch],
        "num_image_tokens": expansions[0].count(adapter.image_placeholder),
        "feature_layers": layers,
        "drop_class_token": vlm.config.vision_feature_select_strategy == "default",
    }


def _llava(vlm: nn.Module, adapter: Any, tower_features: bool) -> VisionPart:
    names = adapter.module_names()
    facts = llava_image_facts(vlm, adapter)
    module = LlavaVisionGraph(
        vlm.get_submodule(names.vision),
        vlm.get_submodule(names.projector),
        facts["feature_layers"],
        facts["drop_class_token"],
        tower_features,
    )
    height, width = facts["image_size"]
    outputs = ["image_features", "vision_features"] if tower_features else ["image_features"]
    dynamic = {"pixel_values": {0: "num_images"}, "image_features": {0: "num_image_tokens"}}
    if tower_features:
        dynamic["vision_features"] = {0: "num_images"}
    return VisionPart(
        module, (torch.randn(2, 3, height, width),), ["pixel_values"], outputs, dynamic,
        {"patch_size": facts["patch_size"]}, facts,
    )  # fmt: skip


# -- Idefics3 / SmolVLM ---------------------------------------------------------------------------
def _full_tile_positions(vision_model: nn.Module, size: int) -> torch.Tensor:
    """The position ids (1, n) the tower's own embedding code gives a full ``size x size`` tile
    (read off its position-embedding lookup)."""
    seen: list[torch.Tensor] = []
    embeddings = vision_model.embeddings
    hook = embeddings.position_embedding.register_forward_hook(
        lambda module, args, output: seen.append(args[0].detach().clone())
    )
    patches = size // int(vision_model.config.patch_size)
    try:
        with torch.no_grad():
            embeddings(
                pixel_values=torch.zeros(1, 3, size, size),
                patch_attention_mask=torch.ones(1, patches, patches, dtype=torch.bool),
            )
    finally:
        hook.remove()
    return seen[0].reshape(1, -1)


class Idefics3VisionGraph(nn.Module):
    """pixel_values (T, 3, S, S) full tiles -> image_features (T * image_seq_len, D)."""

    def __init__(self, vision_model: nn.Module, connector: nn.Module, size: int) -> None:
        super().__init__()
        self.vision_model, self.connector = vision_model, connector
        self.register_buffer("position_ids", _full_tile_positions(vision_model, size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vision = self.vision_model
        patches = vision.embeddings.patch_embedding(pixel_values)  # (T, E, S/p, S/p)
        hidden = patches.flatten(2).transpose(1, 2)  # (T, n, E)
        hidden = hidden + vision.embeddings.position_embedding(self.position_ids)
        hidden = vision.encoder(inputs_embeds=hidden).last_hidden_state  # full attention
        hidden = vision.post_layernorm(hidden)
        features = self.connector(hidden)  # (T, image_seq_len, D)
        return features.reshape(-1, features.shape[-1])


def _idefics3(vlm: nn.Module, adapter: Any) -> VisionPart:
    from PIL import Image

    names = adapter.module_names()
    vision_model = vlm.get_submodule(names.vision)
    size = int(vision_model.config.image_size)
    inputs, _ = adapter.image_inputs([Image.new("RGB", (size, size))])
    tile = tuple(int(v) for v in inputs["pixel_values"].shape[-2:])
    if tile != (size, size):
        raise ValueError(
            f"the image processor makes {tile[0]}x{tile[1]} tiles but the vision tower takes "
            f"{size}x{size} images; the ONNX vision graph needs full tiles of the tower's size "
            "(set the image processor's max_image_size to the tower's image_size)"
        )
    module = Idefics3VisionGraph(vision_model, vlm.get_submodule(names.projector), size)
    facts = {
        "image_size": [size, size],
        "patch_size": int(vision_model.config.patch_size),
        "image_seq_len": int(adapter.image_seq_len),
        "scale_factor": int(vlm.config.scale_factor),
    }
    return VisionPart(
        module, (torch.randn(3, 3, size, size),), ["pixel_values"], ["image_features"],
        {"pixel_values": {0: "num_images"}, "image_features": {0: "num_image_tokens"}},
        {"patch_size": facts["patch_size"]}, facts,
    )  # fmt: skip


# -- Qwen2-VL -------------------------------------------------------------------------------------
def vision_positions(grid_thw: torch.Tensor, count: int, merge: int) -> torch.Tensor:
    """(count, 2) row / column of each patch of one image with grid ``(t, h, w)``, in the order
    the image processor flattens patches (``m x m`` merge blocks, row-major), repeated per frame:
    what ``transformers.vision_utils.get_vision_position_ids`` computes, as tensor operations."""
    height, width = grid_thw[1], grid_thw[2]
    index = torch.arange(count, device=grid_thw.device)
    in_frame = index % (height * width)
    block, within = in_frame // (merge * merge), in_frame % (merge * merge)
    blocks_per_row = width // merge
    row = (block // blocks_per_row) * merge + within // merge
    column = (block % blocks_per_row) * merge + within % merge
    return torch.stack([row, column], dim=-1)


def _vision_attention(attention: nn.Module, hidden: torch.Tensor, cos, sin) -> torch.Tensor:
    """Qwen2-VL's ``VisionAttention`` over one image (full attention), eager arithmetic."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    length = hidden.shape[0]
    qkv = attention.qkv(hidden).reshape(length, 3, attention.num_heads, -1)
    query, key, value = qkv.permute(1, 0, 2, 3).unbind(0)  # (P, H, hd) each
    query, key = apply_rotary_pos_emb_vision(query, key, cos, sin)
    query, key, value = (t.transpose(0, 1) for t in (query, key, value))  # (H, P, hd)
    weights = torch.matmul(query, key.transpose(1, 2)) * attention.scaling
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights, value).transpose(0, 1).reshape(length, -1)  # (P, E)
    return attention.proj(out)


class Qwen2VLVisionGraph(nn.Module):
    """pixel_values (P, C*t*p*p), image_grid_thw (1, 3) -> image_features (P / m², D)."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual
        self.merge = int(visual.spatial_merge_size)

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        hidden = visual.patch_embed(pixel_values)  # (P, E)
        positions = vision_positions(image_grid_thw[0], hidden.shape[0], self.merge)
        cos, sin = visual.rotary_pos_emb(hidden, positions)  # (P, hd) each
        for block in visual.blocks:
            hidden = hidden + _vision_attention(block.attn, block.norm1(hidden), cos, sin)
            hidden = hidden + block.mlp(block.norm2(hidden))
        return visual.merger(hidden)


def _qwen2_vl(vlm: nn.Module, adapter: Any) -> VisionPart:
    from PIL import Image

    names = adapter.module_names()
    visual = vlm.get_submodule(names.vision)
    # a non-square example, so that height and width play distinct parts in the trace
    inputs, _ = adapter.image_inputs([Image.new("RGB", (64, 40))])
    merge = int(visual.spatial_merge_size)
    vision = vlm.config.vision_config
    facts = {
        "patch_size": int(vision.patch_size),
        "temporal_patch_size": int(vision.temporal_patch_size),
        "spatial_merge_size": merge,
        "vision_start_token_id": int(vlm.config.vision_start_token_id),
        "video_token_id": int(getattr(vlm.config, "video_token_id", -1) or -1),
    }
    genai = {"spatial_merge_size": merge, "patch_size": facts["patch_size"]}
    tokens_per_second = getattr(vision, "tokens_per_second", None)
    if tokens_per_second is not None:
        genai["tokens_per_second"] = float(tokens_per_second)
    return VisionPart(
        Qwen2VLVisionGraph(visual),
        (inputs["pixel_values"].float(), inputs["image_grid_thw"].long()),
        ["pixel_values", "image_grid_thw"],
        ["image_features"],
        {"pixel_values": {0: "num_patches"}, "image_features": {0: "num_image_tokens"}},
        genai,
        facts,
    )


def vision_part(vlm: nn.Module, adapter: Any, tower_features: bool = False) -> VisionPart:
    """The vision graph of ``vlm`` (family by ``adapter.family``); ``tower_features`` adds the
    tower features the task heads read (LLaVA only)."""
    if adapter.family == "llava":
        return _llava(vlm, adapter, tower_features)
    if tower_features:
        raise ValueError(f"task heads are exported for LLaVA models, not {adapter.family!r} ones")
    if adapter.family == "idefics3":
        return _idefics3(vlm, adapter)
    if adapter.family == "qwen2_vl":
        return _qwen2_vl(vlm, adapter)
    raise ValueError(f"no ONNX vision graph for the {adapter.family!r} family")
