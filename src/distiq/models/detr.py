"""Object detection adapters: the DETR-style task's shared targets and predictions, RT-DETR, and
DETR with its transformers ResNet backbone (no timm).

Both families predict a fixed set of Q queries, each with class logits and a box (cx, cy, w, h)
as fractions of the input image, and carry their own Hungarian-matched loss in transformers: the
adapter passes the targets to it (``labels=[{"class_labels", "boxes"}]``) and returns its loss
and parts, so the task term is the model's own loss, not a rewrite of it.

Class scores: DETR's are a softmax over ``C + 1`` logits (the last is "no object"), RT-DETR's are
C independent sigmoids (focal loss); :meth:`DetectionAdapter.scores` gives ``(B, Q, C)``
probabilities either way, and :meth:`DetectionAdapter.predict` turns queries into detections
as transformers' ``post_process_object_detection`` does (DETR: each query's best class; RT-DETR:
the best query-class pairs), in the original image's pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from distiq.models.dense import (
    DenseAdapter,
    DenseOutputs,
    cxcywh_to_xyxy,
    register_dense,
    xyxy_to_cxcywh,
)


class DetectionAdapter(DenseAdapter):
    """A DETR-style detection family (see the module docstring)."""

    task = "detection"
    # "softmax": C + 1 logits with no-object last; "sigmoid": C independent scores
    class_activation: ClassVar[str] = "softmax"

    def detection_targets(
        self,
        boxes: Sequence[torch.Tensor],
        labels: Sequence[torch.Tensor],
        sizes: Sequence[tuple[int, int]],
    ) -> list[dict[str, torch.Tensor]]:
        """The model's training targets: per image ``{"class_labels": (N,) int64, "boxes":
        (N, 4) (cx, cy, w, h) fractions}`` from xyxy pixel boxes of an image of size (H, W)."""
        out = []
        for image_boxes, image_labels, (height, width) in zip(boxes, labels, sizes):
            scale = torch.tensor([width, height, width, height], dtype=torch.float32)
            normalised = image_boxes.float().reshape(-1, 4) / scale.to(image_boxes.device)
            out.append(
                {
                    "class_labels": image_labels.long().reshape(-1),
                    "boxes": xyxy_to_cxcywh(normalised.clamp(0.0, 1.0)),
                }
            )
        return out

    def _run(self, model: nn.Module, pixel_values: torch.Tensor, targets: Any) -> DenseOutputs:
        if targets is not None:
            device = pixel_values.device
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        out = model(pixel_values=pixel_values, labels=targets)
        terms = {
            k: v
            for k, v in (getattr(out, "loss_dict", None) or {}).items()
            if isinstance(v, torch.Tensor) and v.dim() == 0 and v.requires_grad
        }
        logits, boxes = out.logits, out.pred_boxes
        meta = getattr(out, "denoising_meta_values", None)
        if meta:  # training with denoising: (B, dn + Q, ·), the denoising queries first
            queries = meta["dn_num_split"][1]
            logits, boxes = logits[:, -queries:], boxes[:, -queries:]
        return DenseOutputs(logits=logits, boxes=boxes, loss=out.loss, loss_terms=terms)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B, Q, C)`` class probabilities of each query."""
        if self.class_activation == "sigmoid":
            return torch.sigmoid(logits.float())
        return torch.softmax(logits.float(), dim=-1)[..., :-1]

    @torch.no_grad()
    def predict(
        self,
        outputs: DenseOutputs,
        sizes: Sequence[tuple[int, int]],
        *,
        max_detections: int = 100,
    ) -> list[dict[str, torch.Tensor]]:
        """Per image ``{"boxes": (K, 4) xyxy pixels of its original size, "scores": (K,),
        "labels": (K,)}``, best first, at most ``max_detections`` (no score threshold: COCO
        mAP ranks by score)."""
        scores = self.scores(outputs.logits)  # (B, Q, C)
        _, queries, classes = scores.shape
        results = []
        for i, (height, width) in enumerate(sizes):
            if self.class_activation == "sigmoid":
                k = min(max_detections, queries * classes)
                best, index = scores[i].reshape(-1).topk(k)
                query, label = index // classes, index % classes
            else:
                best, label = scores[i].max(-1)
                best, order = best.sort(descending=True)
                query, label = order[:max_detections], label[order][:max_detections]
                best = best[:max_detections]
            scale = torch.tensor([width, height, width, height], dtype=torch.float32)
            boxes = cxcywh_to_xyxy(outputs.boxes[i, query].float()).clamp(0.0, 1.0)
            results.append({"boxes": boxes * scale, "scores": best, "labels": label})
        return results


@register_dense
class RTDetrAdapter(DetectionAdapter):
    """RT-DETR (``RTDetrForObjectDetection``): a ResNet backbone, a hybrid encoder (attention on
    the coarsest level, a convolutional FPN / PAN) and a deformable-attention decoder. Parts:
    ``backbone`` (the ResNet, stem excluded), ``neck`` (the encoder and its input projections),
    ``head`` (query selection and the decoder with its class and box heads), ``patch_embedding``
    (the ResNet stem's convolutions)."""

    family = "rt_detr"
    model_types = ("rt_detr",)
    model_class = "RTDetrForObjectDetection"
    processor_class = "RTDetrImageProcessorPil"
    class_activation = "sigmoid"
    parts: ClassVar[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
        "backbone": (("model.backbone",), ("model.backbone.model.embedder",)),
        "neck": (("model.encoder_input_proj", "model.encoder"), ()),
        "head": (
            (
                "model.enc_output",
                "model.enc_score_head",
                "model.enc_bbox_head",
                "model.decoder_input_proj",
                "model.decoder",
            ),
            (),
        ),
        "patch_embedding": (("model.backbone.model.embedder",), ()),
    }
    feature_modules = ("model.encoder_input_proj.*",)

    @classmethod
    def tiny_config(cls, num_labels: int, image_size: int, **changes: Any) -> Any:
        from transformers import RTDetrConfig, RTDetrResNetConfig

        fields = dict(
            embedding_size=16,
            hidden_sizes=[16, 32, 64, 64],
            depths=[1, 1, 1, 1],
            layer_type="basic",
            out_features=["stage2", "stage3", "stage4"],
        )
        backbone = RTDetrResNetConfig(**{**fields, **changes.pop("backbone_config", {})})
        fields = dict(
            backbone_config=backbone,
            encoder_hidden_dim=32,
            encoder_in_channels=[32, 64, 64],
            feat_strides=[8, 16, 32],
            encoder_layers=1,
            encoder_ffn_dim=64,
            encoder_attention_heads=2,
            d_model=32,
            num_queries=20,
            decoder_layers=2,
            decoder_ffn_dim=64,
            decoder_attention_heads=2,
            decoder_in_channels=[32, 32, 32],
            num_feature_levels=3,
            decoder_n_points=2,
            num_labels=num_labels,
            num_denoising=0,
            anchor_image_size=None,
        )
        return RTDetrConfig(**{**fields, **changes})


@register_dense
class DetrAdapter(DetectionAdapter):
    """DETR (``DetrForObjectDetection``) with transformers' own ResNet backbone
    (``use_timm_backbone=False``). Parts: ``backbone`` (the ResNet, stem excluded), ``neck``
    (input projection and transformer encoder), ``head`` (decoder, class and box heads),
    ``patch_embedding`` (the ResNet stem's convolution)."""

    family = "detr"
    model_types = ("detr",)
    model_class = "DetrForObjectDetection"
    processor_class = "DetrImageProcessorPil"
    class_activation = "softmax"
    parts: ClassVar[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
        "backbone": (("model.backbone",), ("model.backbone.model.embedder",)),
        "neck": (("model.input_projection", "model.encoder"), ()),
        "head": (("model.decoder", "class_labels_classifier", "bbox_predictor"), ()),
        "patch_embedding": (("model.backbone.model.embedder",), ()),
    }
    feature_modules = ("model.input_projection",)

    @classmethod
    def tiny_config(cls, num_labels: int, image_size: int, **changes: Any) -> Any:
        from transformers import DetrConfig, ResNetConfig

        fields = dict(
            embedding_size=16,
            hidden_sizes=[16, 32],
            depths=[1, 1],
            layer_type="basic",
            out_features=["stage2"],
        )
        backbone = ResNetConfig(**{**fields, **changes.pop("backbone_config", {})})
        fields = dict(
            use_timm_backbone=False,
            use_pretrained_backbone=False,
            backbone_config=backbone,
            d_model=32,
            encoder_layers=1,
            decoder_layers=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            num_queries=20,
            num_labels=num_labels,
        )
        return DetrConfig(**{**fields, **changes})

    @classmethod
    def build_processor(cls, size: tuple[int, int], **changes: Any) -> Any:
        return super().build_processor(size, **{"do_pad": False, **changes})
