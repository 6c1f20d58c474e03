"""The parts of a LLaVA-architecture VLM that ``export_onnx`` traces, as modules.

Each wraps the model's own submodules (no copies), so the same module runs in PyTorch (the
benchmark's PyTorch backends use them) and is what the ONNX graph computes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


# -- the traced parts -----------------------------------------------------------------------------
class EmbedGraph(nn.Module):
    """input_ids (B, L) -> inputs_embeds (B, L, D)."""

    def __init__(self, embedding: nn.Module) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)


class VisionGraph(nn.Module):
    """pixel_values (B, 3, H, W) -> the projector's input (LLaVA's feature selection)."""

    def __init__(self, tower: nn.Module, layers: list[int], drop_class_token: bool) -> None:
        super().__init__()
        self.tower, self.layers, self.drop = tower, layers, drop_class_token

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixel_values, output_hidden_states=True, return_dict=True)
        selected = [out.hidden_states[i] for i in self.layers]
        if self.drop:
            selected = [h[:, 1:] for h in selected]
        return torch.cat(selected, dim=-1) if len(selected) > 1 else selected[0]


class LanguageGraph(nn.Module):
    """inputs_embeds (B, L, D), attention_mask (B, L) -> logits (B, L, V); no KV cache."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.language_model, self.lm_head = language_model, lm_head

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False
        )
        return self.lm_head(out.last_hidden_state)


class DetectionGraph(nn.Module):
    """image_features -> (cls_logits (B, N, C), box_ltrb (B, N, 4)); prefix tokens dropped."""

    def __init__(self, head, prefix: int, grid: tuple[int, int], stride: int) -> None:
        super().__init__()
        self.head, self.prefix, self.grid, self.stride = head, prefix, grid, stride

    def forward(self, image_features: torch.Tensor):
        out = self.head(image_features[:, self.prefix :], self.grid, self.stride)
        return out["cls_logits"], out["box_ltrb"]


class SegmentationGraph(nn.Module):
    """image_features -> seg_logits (B, C, H, W) at the input resolution."""

    def __init__(self, head, prefix: int, grid: tuple[int, int], size: tuple[int, int]) -> None:
        super().__init__()
        self.head, self.prefix, self.grid, self.size = head, prefix, grid, size

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.head(image_features[:, self.prefix :], self.grid, self.size)


# -- checks ---------------------------------------------------------------------------------------
def resolve_vlm(model: nn.Module, adapter: Any):
    """(vlm, adapter, heads model or None) for a LLaVA VLM or ``VLMWithHeads``; a clear error
    for a missing adapter or another family."""
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
    if getattr(adapter, "family", None) != "llava":
        raise ValueError(
            f"export_onnx splits LLaVA-architecture VLMs (the built-in edge VLM, "
            f"LlavaForConditionalGeneration, VLMWithHeads); got a {adapter.family!r} model. Other "
            "families: export the packed format, or trace their parts with torch.onnx yourself"
        )
    return vlm, adapter, heads


def vlm_image_facts(vlm: nn.Module, adapter: Any) -> dict:
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


def language_graph(model: nn.Module, adapter: Any = None) -> LanguageGraph:
    """The language-model part of a LLaVA VLM (or ``VLMWithHeads``) as a module (it shares the
    model's layers): what ``language_model.onnx`` computes."""
    vlm, adapter, _ = resolve_vlm(model, adapter)
    names = adapter.module_names()
    return LanguageGraph(vlm.get_submodule(names.language_model), vlm.get_submodule(names.lm_head))


def vision_graph(model: nn.Module, adapter: Any = None) -> VisionGraph:
    """The vision part (tower + LLaVA's feature selection) as a module: ``vision.onnx``."""
    vlm, adapter, _ = resolve_vlm(model, adapter)
    facts = vlm_image_facts(vlm, adapter)
    tower = vlm.get_submodule(adapter.module_names().vision)
    return VisionGraph(tower, facts["feature_layers"], facts["drop_class_token"])


def image_facts(model: nn.Module, adapter: Any = None) -> dict:
    """Image size, patch size, grid and image-token count of a LLaVA VLM (manifest ``vlm``)."""
    vlm, adapter, _ = resolve_vlm(model, adapter)
    return vlm_image_facts(vlm, adapter)


class ProjectorGraph(nn.Module):
    """image_features (B, P, Dv) -> image_embeds (B, P, D): the projector as one graph."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)
