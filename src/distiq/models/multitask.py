"""``VLMWithHeads``: one vision pass feeding VQA, detection and segmentation.

Wraps a LLaVA-architecture model (the built-in edge VLM, or any ``LlavaForConditionalGeneration``
with a ViT-like tower) and heads on the patch features the projector sees. The vision tower
runs once per batch: its selected hidden state gives the heads' patch features and, through
the projector, the image embeddings placed at the ``<image>`` tokens. The VQA logits equal
``vlm(input_ids, pixel_values=...)``'s.

Module names inside the wrapper are the model's prefixed with ``vlm.`` (``self.adapter`` is the
model's adapter with that prefix) plus ``detection_head`` and ``segmentation_head``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distiq.models.adapter import VLMAdapter
from distiq.models.heads import DetectionHead, SegmentationHead
from distiq.models.parts import QuantTarget

HEADS_WEIGHTS = "distiq_heads.safetensors"
HEADS_CONFIG = "distiq_heads.json"


@dataclass
class MultiTaskOutput:
    """Outputs of ``VLMWithHeads``.

    Attributes:
        loss: the VQA answer-token cross-entropy (mean over label tokens) when labels were
            given, else None.
        logits: (B, L, V) VQA logits, None without ``input_ids``.
        detection: the detection head's dict (see ``distiq.models.heads``), or None.
        segmentation: (B, C, H, W) segmentation logits, or None.
        patch_features: (B, Hp*Wp, D) the vision features the heads and projector use.
        grid_size: (Hp, Wp).
    """

    loss: torch.Tensor | None
    logits: torch.Tensor | None
    detection: dict[str, Any] | None
    segmentation: torch.Tensor | None
    patch_features: torch.Tensor
    grid_size: tuple[int, int]


def unwrap_vlm(model: nn.Module) -> nn.Module:
    """The Hugging Face VLM of ``model``: ``VLMWithHeads.vlm``, or the model itself."""
    return getattr(model, "vlm", model)


class VLMWithHeads(nn.Module):
    """A LLaVA-architecture VLM plus detection / segmentation heads on its patch features.

    Args:
        vlm: a ``LlavaForConditionalGeneration``.
        adapter: its ``LlavaAdapter`` (unprefixed).
        num_detection_classes / num_segmentation_classes: classes of each head; None leaves
            that head out.
        detection_kwargs / segmentation_kwargs: extra ``DetectionHead`` /
            ``SegmentationHead`` arguments (``hidden_dim``, ...).
    """

    def __init__(
        self,
        vlm: nn.Module,
        adapter: VLMAdapter,
        *,
        num_detection_classes: int | None = None,
        num_segmentation_classes: int | None = None,
        detection_kwargs: dict | None = None,
        segmentation_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if adapter.family != "llava":
            raise ValueError(
                f"VLMWithHeads runs LLaVA-architecture models (the built-in edge VLM); got a "
                f"{adapter.family} model. For other towers, run DetectionHead / SegmentationHead "
                "on the tower's patch features yourself"
            )
        if num_detection_classes is None and num_segmentation_classes is None:
            raise ValueError("give num_detection_classes and/or num_segmentation_classes")
        self.vlm = vlm
        self.base_adapter = adapter
        self.adapter = adapter.with_prefix("vlm.")
        config = vlm.config
        layers = config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        self._feature_layers = layers
        self.patch_size = int(config.vision_config.patch_size)
        in_dim = int(config.vision_config.hidden_size) * len(layers)
        self.detection_head = (
            DetectionHead(in_dim, num_detection_classes, **(detection_kwargs or {}))
            if num_detection_classes is not None
            else None
        )
        self.segmentation_head = (
            SegmentationHead(in_dim, num_segmentation_classes, **(segmentation_kwargs or {}))
            if num_segmentation_classes is not None
            else None
        )

    def vision_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """pixel_values (B, 3, H, W) -> patch features (B, Hp*Wp, D), grid (Hp, Wp)."""
        tower = self.vlm.model.vision_tower
        out = tower(pixel_values, output_hidden_states=True, return_dict=True)
        selected = torch.cat([out.hidden_states[i] for i in self._feature_layers], dim=-1)
        grid = (
            pixel_values.shape[-2] // self.patch_size,
            pixel_values.shape[-1] // self.patch_size,
        )
        prefix = selected.shape[1] - grid[0] * grid[1]  # class token(s)
        if prefix < 0:
            raise ValueError(f"the tower returned {selected.shape[1]} tokens for a {grid} grid")
        return selected[:, prefix:], grid

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> MultiTaskOutput:
        """pixel_values (B, 3, H, W); input_ids, attention_mask, labels (B, L) from
        ``adapter.build_inputs`` (optional: without them only the heads run)."""
        patches, grid = self.vision_features(pixel_values)
        image_size = (pixel_values.shape[-2], pixel_values.shape[-1])
        detection = segmentation = None
        if self.detection_head is not None:
            detection = self.detection_head(patches, grid, self.patch_size)
        if self.segmentation_head is not None:
            segmentation = self.segmentation_head(patches, grid, image_size)
        loss = logits = None
        if input_ids is not None:
            image_embeds = self.vlm.model.multi_modal_projector(patches)  # (B, P, D_text)
            embeds = self.vlm.get_input_embeddings()(input_ids)
            mask = input_ids == self.vlm.config.image_token_id
            if int(mask.sum()) != image_embeds.shape[0] * image_embeds.shape[1]:
                raise ValueError(
                    f"{int(mask.sum())} image tokens in input_ids but {image_embeds.shape[0]} x "
                    f"{image_embeds.shape[1]} image features: build inputs with the adapter"
                )
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), image_embeds.to(embeds.dtype))
            out = self.vlm(
                inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs
            )
            loss, logits = out.loss, out.logits
        return MultiTaskOutput(loss, logits, detection, segmentation, patches, grid)

    def quant_targets(self) -> dict[str, QuantTarget]:
        """The VLM's parts (``vlm.``-prefixed) plus ``heads``."""
        targets = dict(self.adapter.quant_targets())
        heads = tuple(
            name
            for name in ("detection_head", "segmentation_head")
            if getattr(self, name) is not None
        )
        targets["heads"] = QuantTarget(heads)
        return targets

    def save_pretrained(self, path: str | Path) -> None:
        """The VLM as a Hugging Face directory, plus ``distiq_heads.safetensors`` / ``.json``."""
        from safetensors.torch import save_file

        path = Path(path)
        self.vlm.save_pretrained(path)
        self.base_adapter.save_pretrained(path)
        state, settings = {}, {}
        for name in ("detection_head", "segmentation_head"):
            head = getattr(self, name)
            if head is None:
                continue
            settings[name] = head.settings
            state.update({f"{name}.{k}": v.contiguous() for k, v in head.state_dict().items()})
        save_file(state, str(path / HEADS_WEIGHTS))
        (path / HEADS_CONFIG).write_text(json.dumps(settings, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, **load_kwargs: Any) -> VLMWithHeads:
        """Load what ``save_pretrained`` wrote (``load_kwargs`` go to ``distiq.models.load``)."""
        from safetensors.torch import load_file

        from distiq.models.loading import load

        path = Path(path)
        if not (path / HEADS_CONFIG).is_file():
            raise FileNotFoundError(
                f"{path} has no {HEADS_CONFIG}: it was not saved by VLMWithHeads"
            )
        vlm, adapter = load(path, **load_kwargs)
        settings = json.loads((path / HEADS_CONFIG).read_text())
        det = settings.get("detection_head")
        seg = settings.get("segmentation_head")
        model = cls(
            vlm,
            adapter,
            num_detection_classes=det["num_classes"] if det else None,
            num_segmentation_classes=seg["num_classes"] if seg else None,
            detection_kwargs={
                k: v for k, v in (det or {}).items() if k not in ("in_dim", "num_classes")
            },
            segmentation_kwargs={
                k: v for k, v in (seg or {}).items() if k not in ("in_dim", "num_classes")
            },
        )
        state = load_file(str(path / HEADS_WEIGHTS))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("vlm.")]
        if missing or unexpected:
            raise ValueError(
                f"head weights do not match: missing {missing}, unexpected {unexpected}"
            )
        model.eval()
        return model
