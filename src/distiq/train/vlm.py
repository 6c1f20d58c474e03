"""The engine's VLM glue: a shared-prefix forward, multi-task losses and VQA evaluation.

:class:`EngineModel` wraps a LLaVA-architecture model — the built-in edge VLM with its
detection / segmentation heads (``distiq.models.VLMWithHeads``), or a bare
``LlavaForConditionalGeneration`` — and runs it on the batches of
:class:`distiq.train.vqa_data.ImageQuestions`:

1. the vision tower runs once per image; its patch features (B, Hp*Wp, D) feed the heads and,
   through the projector, the image embeddings;
2. the language model runs once per image on the shared prefix (``<s>`` + image tokens) and
   keeps its key/value cache;
3. the cache is gathered to the questions (Q rows, ``batch["question_image"]``) and the language
   model runs on each question's suffix (prompt, answer, eos).

Because the prefix comes first and attention is causal, the suffix logits equal those of the
plain full-sequence forward ``model(input_ids, pixel_values, ...)`` on ``adapter.build_inputs``
(checked in the tests), while the vision tower and the image tokens cost one pass per image
instead of one per question (three questions per synthetic scene).

:func:`greedy_answers` decodes answers the same way (prefix once, then the prompt suffixes,
then greedy steps with the cache) and matches ``adapter.generate_answers``.
:func:`evaluate_vqa` scores a dataset with the official VQA accuracy, overall and per question
type (:class:`distiq.tasks.vqa.VQAAccuracy`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class VQAOutputs:
    """What :meth:`EngineModel.forward` returns.

    Attributes:
        logits: (Q, S, V) language-model logits at the suffix positions (``logits[:, t]``
            predicts suffix token ``t + 1``, Hugging Face convention); None when the forward
            ran the vision side only.
        labels: (Q, S) answer/eos ids at their positions, -100 elsewhere (None without).
        detection: the detection head's dict (``cls_logits`` (B, P, C), ``box_ltrb`` (B, P, 4),
            ``points``, ``stride``) or None.
        segmentation: (B, C, H, W) segmentation logits or None.
        patch_features: (B, Hp*Wp, D) the vision features the projector and heads see.
        suffix_mask: (Q, S) 1 on real suffix tokens.
    """

    logits: torch.Tensor | None
    labels: torch.Tensor | None
    detection: dict[str, Any] | None
    segmentation: torch.Tensor | None
    patch_features: torch.Tensor
    suffix_mask: torch.Tensor


def _vlm_of(model: nn.Module) -> nn.Module:
    """The ``LlavaForConditionalGeneration`` inside ``model`` (itself, or ``VLMWithHeads.vlm``)."""
    vlm = getattr(model, "vlm", model)
    if not hasattr(vlm, "model") or not hasattr(vlm.model, "language_model"):
        raise TypeError(
            f"the engine runs LLaVA-architecture models (the built-in edge VLM); got "
            f"{type(vlm).__name__}"
        )
    return vlm


class EngineModel(nn.Module):
    """A LLaVA-architecture VLM (with or without heads) run on engine batches.

    Args:
        model: a ``VLMWithHeads`` (heads run when asked) or a ``LlavaForConditionalGeneration``.

    The wrapped model is ``self.inner``; quantize, attach hooks to, and save ``inner``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model
        self.vlm = _vlm_of(model)
        config = self.vlm.config
        layer = config.vision_feature_layer
        self._feature_layers = [layer] if isinstance(layer, int) else list(layer)
        self._select = config.vision_feature_select_strategy
        self.patch_size = int(config.vision_config.patch_size)

    @property
    def has_heads(self) -> bool:
        return getattr(self.inner, "detection_head", None) is not None or (
            getattr(self.inner, "segmentation_head", None) is not None
        )

    # ------------------------------------------------------------------ pieces
    def vision_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """pixel_values (B, 3, H, W) -> patch features (B, Hp*Wp, D) and the grid (Hp, Wp)."""
        if hasattr(self.inner, "vision_features"):
            return self.inner.vision_features(pixel_values)
        tower = self.vlm.model.vision_tower
        out = tower(pixel_values, output_hidden_states=True, return_dict=True)
        selected = torch.cat([out.hidden_states[i] for i in self._feature_layers], dim=-1)
        if self._select == "default":
            selected = selected[:, 1:]
        grid = (
            pixel_values.shape[-2] // self.patch_size,
            pixel_values.shape[-1] // self.patch_size,
        )
        return selected, grid

    def prefix_embeddings(
        self, patches: torch.Tensor, prefix_ids: torch.Tensor, image_positions: torch.Tensor
    ) -> torch.Tensor:
        """(B, P_img, D_vision) patches -> (B, P, D_text) prefix embeddings with the projected
        image features at ``image_positions`` (P,) and the embedded prefix tokens elsewhere."""
        image_embeds = self.vlm.model.multi_modal_projector(patches)  # (B, N, D_text)
        count = int(image_positions.sum())
        if image_embeds.shape[1] != count:
            raise ValueError(
                f"{count} image tokens in the prefix but {image_embeds.shape[1]} image features "
                "per image: the data was tokenized for another model or resolution"
            )
        batch = patches.shape[0]
        tokens = self.vlm.get_input_embeddings()(prefix_ids.to(patches.device))  # (P, D)
        embeds = tokens.unsqueeze(0).expand(batch, -1, -1).clone()
        embeds[:, image_positions.to(patches.device)] = image_embeds.to(embeds.dtype)
        return embeds

    def language(
        self,
        prefix_embeds: torch.Tensor,
        suffix_ids: torch.Tensor,
        suffix_mask: torch.Tensor,
        question_image: torch.Tensor,
        *,
        keep_cache: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        """Run the language model: prefix (B, P, D) once per image, then the suffixes (Q, S) on
        the prefix cache gathered by ``question_image`` (Q,). Returns the suffix logits
        (Q, S, V) and the cache (None unless ``keep_cache``). Suffixes may be right-padded
        (training) or left-padded (generation); positions follow ``suffix_mask``."""
        from transformers import DynamicCache

        lm = self.vlm.model.language_model
        cache = DynamicCache(config=lm.config)
        lm(inputs_embeds=prefix_embeds, cache=cache, use_cache=True)
        cache.batch_select_indices(question_image.to(prefix_embeds.device))
        prefix_length = prefix_embeds.shape[1]
        mask = suffix_mask.to(prefix_embeds.device)
        positions = prefix_length + (mask.cumsum(dim=1) - 1).clamp(min=0)  # (Q, S)
        attention = torch.cat(
            [torch.ones(mask.shape[0], prefix_length, dtype=mask.dtype, device=mask.device), mask],
            dim=1,
        )
        embeds = self.vlm.get_input_embeddings()(suffix_ids.to(prefix_embeds.device))
        out = lm(
            inputs_embeds=embeds,
            attention_mask=attention,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        )
        logits = self.vlm.lm_head(out.last_hidden_state)
        return logits, (cache, attention, positions[:, -1]) if keep_cache else None

    # ------------------------------------------------------------------ forward
    def forward(
        self, batch: Mapping[str, Any], heads: bool = True, language: bool = True
    ) -> VQAOutputs:
        """Run the model on an engine batch (see ``ImageQuestions.collate``); with ``heads``
        also the detection / segmentation heads (when the model has them). ``language=False``
        runs the vision tower (and heads) only: ``logits`` is then None."""
        pixel_values = batch["pixel_values"]
        patches, grid = self.vision_features(pixel_values)
        detection = segmentation = None
        if heads:
            inner = self.inner
            if getattr(inner, "detection_head", None) is not None:
                detection = inner.detection_head(patches, grid, self.patch_size)
            if getattr(inner, "segmentation_head", None) is not None:
                segmentation = inner.segmentation_head(
                    patches, grid, (pixel_values.shape[-2], pixel_values.shape[-1])
                )
        logits = None
        if language:
            prefix = self.prefix_embeddings(patches, batch["prefix_ids"], batch["image_positions"])
            logits, _ = self.language(
                prefix, batch["suffix_ids"], batch["suffix_mask"], batch["question_image"]
            )
        return VQAOutputs(
            logits=logits,
            labels=batch.get("labels"),
            detection=detection,
            segmentation=segmentation,
            patch_features=patches,
            suffix_mask=batch["suffix_mask"],
        )


# ---------------------------------------------------------------------- decoding & evaluation
@torch.no_grad()
def greedy_answers(
    engine: EngineModel, batch: Mapping[str, Any], tokenizer: Any, *, max_new_tokens: int = 4
) -> list[str]:
    """Greedy answers (stripped strings, special tokens removed) for a generation batch
    (``ImageQuestions.generation_collate``: left-padded prompt suffixes); the same tokens as
    ``adapter.generate_answers`` with ``max_new_tokens``."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    was_training = engine.training
    engine.eval()
    try:
        device = batch["pixel_values"].device
        patches, _ = engine.vision_features(batch["pixel_values"])
        prefix = engine.prefix_embeddings(patches, batch["prefix_ids"], batch["image_positions"])
        logits, (cache, attention, last) = engine.language(
            prefix,
            batch["suffix_ids"],
            batch["suffix_mask"],
            batch["question_image"],
            keep_cache=True,
        )
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        lm = engine.vlm.model.language_model
        embed = engine.vlm.get_input_embeddings()
        count = logits.shape[0]
        done = torch.zeros(count, dtype=torch.bool, device=device)
        generated = []
        next_logits = logits[:, -1]
        for step in range(max_new_tokens):
            token = next_logits.argmax(dim=-1)
            token = torch.where(done, torch.full_like(token, pad), token)
            generated.append(token)
            done |= token == eos
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            last = last + 1
            out = lm(
                inputs_embeds=embed(token[:, None]),
                attention_mask=attention,
                position_ids=last[:, None],
                cache=cache,
                use_cache=True,
            )
            next_logits = engine.vlm.lm_head(out.last_hidden_state[:, -1])
    finally:
        engine.train(was_training)
    tokens = torch.stack(generated, dim=1)
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return [t.strip() for t in texts]


@torch.no_grad()
def evaluate_vqa(
    engine: EngineModel,
    dataset: Any,
    *,
    batch_images: int = 64,
    max_new_tokens: int = 4,
    device: torch.device | str | None = None,
    shard: bool = False,
) -> dict[str, float]:
    """VQA accuracy of ``engine`` on ``dataset`` (an ``ImageQuestions``), by greedy generation.

    With ``shard`` and ``torch.distributed`` initialised, each of the W processes answers every
    W-th image (:func:`~distiq.train.distributed.shard_range`) and the scores are gathered, so
    every process returns the metrics of the whole dataset in about 1/W of the time (an image's
    answers do not depend on which images share its batch: the demo teacher's sharded test
    accuracies equal the unsharded ones to the last digit, and a 2-process test compares the
    two). Every process must call it then.

    Returns fractions in [0, 1]: ``vqa_accuracy``, ``vqa_accuracy/question_type/<type>``,
    ``vqa_accuracy/answer_type/<type>``, and ``num_questions`` (the official VQA accuracy of
    ``distiq.tasks.vqa``: mean over questions).
    """
    from distiq.tasks.vqa import VQAAccuracy
    from distiq.train.batches import move_to_device
    from distiq.train.distributed import gather_objects, get_world_size, shard_range

    if device is None:
        device = next(engine.parameters()).device
    sharded = shard and get_world_size() > 1
    if sharded:
        dataset = dataset.subset(list(shard_range(len(dataset))))
    metric = VQAAccuracy()
    tokenizer = dataset.adapter.tokenizer
    for start in range(0, len(dataset), batch_images):
        items = [dataset[i] for i in range(start, min(start + batch_images, len(dataset)))]
        batch = move_to_device(dataset.generation_collate(items), torch.device(device))
        predictions = greedy_answers(engine, batch, tokenizer, max_new_tokens=max_new_tokens)
        metric.update(predictions, batch)
    if sharded:
        parts = gather_objects(metric)
        metric = VQAAccuracy()
        for part in parts:
            metric.merge(part)
    return metric.compute()
