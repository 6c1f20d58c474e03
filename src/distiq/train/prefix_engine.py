"""The shared-prefix forward path: LLaVA-architecture models with a fixed-size image processor.

Such a model's prompt starts with the same tokens for every question of an image (``<s>`` and
the image tokens, or whatever the chat template puts before the image), so
:class:`SharedPrefixEngine` runs

1. the vision tower once per image; its patch features (B, Hp*Wp, D) feed the heads (the
   built-in VLM's) and, through the projector, the image embeddings;
2. the language model once per image on the shared prefix, keeping its key/value cache;
3. the cache gathered to the questions (Q rows, ``batch["question_image"]``) and the language
   model on each question's suffix (prompt, answer, eos).

Because the prefix comes first and attention is causal, the suffix logits equal those of the
plain full-sequence forward ``model(**adapter.build_inputs(samples))`` (checked in the tests),
while the vision tower and the image tokens cost one pass per image instead of one per
question. :meth:`SharedPrefixEngine.answers` decodes the same way (prefix once, the prompt
suffixes, then greedy steps with the cache) and matches ``adapter.generate_answers``.

Every question is tokenized once, when its split is built (:func:`tokenize_questions`, with the
adapter's own prompt format, so the ids are those ``adapter.build_inputs`` produces); pixel
values are normalised as the image processor does (a fast path for images already at the
model's resolution, checked against the processor in the tests).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from distiq.models.inputs import IGNORE_INDEX, tokenize_prompts_and_answers
from distiq.train.engine_base import EngineModel, VQAOutputs, question_metadata

_TOKENIZE_CHUNK = 2048


@dataclass
class QuestionTokens:
    """Token ids of every question of a split, split into the shared prefix and a suffix.

    Attributes:
        prefix_ids: ``(P,)`` the tokens every prompt starts with, up to and including the last
            image token (``<s> <image> x N`` for the built-in edge VLM).
        image_positions: ``(P,)`` bool, True where ``prefix_ids`` holds an image token.
        suffix: per question, the token ids after the prefix: question prompt, answer tokens,
            eos (the answer and eos only when the split has answers).
        prompt_lengths: per question, how many of its ``suffix`` ids are the prompt (the rest
            is answer + eos).
    """

    prefix_ids: torch.Tensor
    image_positions: torch.Tensor
    suffix: list[list[int]]
    prompt_lengths: list[int]


def fixed_image_size(adapter: Any) -> tuple[int, int] | None:
    """``(H, W)`` every image becomes in the adapter's image processor, or None when the size
    depends on the image (shortest-edge resizing without a crop, tiling, dynamic grids)."""
    processor = adapter.image_processor
    size = getattr(processor, "size", None) or {}
    if getattr(processor, "do_center_crop", False):
        size = getattr(processor, "crop_size", None) or {}

    def read(key: str) -> Any:
        value = getattr(size, key, None)
        return value if value is not None else (size.get(key) if hasattr(size, "get") else None)

    height, width = read("height"), read("width")
    if not height or not width:
        return None
    return int(height), int(width)


def image_expansion(adapter: Any) -> str:
    """The text that replaces the image placeholder for one image at the model's resolution."""
    from PIL import Image

    height, width = fixed_image_size(adapter)
    _, expansions = adapter.image_inputs([Image.new("RGB", (width, height))])
    return expansions[0]


def tokenize_questions(
    adapter: Any, questions: Sequence[str], answers: Sequence[str] | None
) -> QuestionTokens:
    """Tokenize every question (with its answer when given) in the adapter's prompt format and
    split off the prefix shared by all prompts (see :class:`QuestionTokens`). Each distinct
    (question, answer) text is tokenized once (VQA questions repeat a lot).

    Raises:
        ValueError: the prompts do not share a prefix that ends with the image tokens (a prompt
            format that puts text before the image differently per question).
    """
    if not questions:
        raise ValueError("no questions to tokenize: the split is empty")
    keys = list(zip(questions, answers)) if answers is not None else [(q, None) for q in questions]
    unique = list(dict.fromkeys(keys))
    expansion = image_expansion(adapter)
    image_token = adapter.image_token_id
    suffix_of: dict[tuple[str, str | None], tuple[list[int], int]] = {}
    prefix: list[int] | None = None
    for start in range(0, len(unique), _TOKENIZE_CHUNK):
        chunk = unique[start : start + _TOKENIZE_CHUNK]
        prompts = [
            adapter.format_prompt(q).replace(adapter.image_placeholder, expansion, 1)
            for q, _ in chunk
        ]
        tokens = tokenize_prompts_and_answers(
            adapter.tokenizer,
            prompts,
            None if answers is None else [a for _, a in chunk],
            answer_separator=adapter.answer_separator,
            add_special_tokens=adapter.add_special_tokens,
            max_length=adapter.max_length,
        )
        lengths = tokens.attention_mask.sum(dim=1).tolist()
        left = answers is None  # prompts alone are left-padded
        for row, (key, length, prompt_length) in enumerate(
            zip(chunk, lengths, tokens.prompt_lengths)
        ):
            ids = tokens.input_ids[row]
            ids = (ids[ids.shape[0] - length :] if left else ids[:length]).tolist()
            if prefix is None:
                image_at = [i for i, t in enumerate(ids) if t == image_token]
                if not image_at:
                    raise ValueError("the tokenized prompt holds no image token")
                prefix = ids[: image_at[-1] + 1]
            if ids[: len(prefix)] != prefix:
                raise ValueError(
                    f"the prompts of this model do not share their image prefix ({key[0]!r}); "
                    "the engine's shared-prefix forward needs the image first"
                )
            suffix_of[key] = (ids[len(prefix) :], prompt_length - len(prefix))
    assert prefix is not None
    prefix_ids = torch.tensor(prefix, dtype=torch.long)
    suffixes = [suffix_of[k][0] for k in keys]
    prompt_lengths = [suffix_of[k][1] for k in keys]
    return QuestionTokens(prefix_ids, prefix_ids == image_token, suffixes, prompt_lengths)


def _shares_prefix(adapter: Any) -> bool:
    """Whether two different questions' prompts share everything up to the image tokens."""
    try:
        tokenize_questions(adapter, ["what is it?", "how many are there?"], None)
    except ValueError:
        return False
    return True


class SharedPrefixEngine(EngineModel):
    """The shared-prefix path (see the module docstring) for a ``LlavaForConditionalGeneration``
    or the built-in edge VLM with heads (``VLMWithHeads``)."""

    name = "shared-prefix"

    def __init__(self, model: nn.Module, adapter: Any) -> None:
        super().__init__(model, adapter)
        config = self.vlm.config
        layer = config.vision_feature_layer
        self._feature_layers = [layer] if isinstance(layer, int) else list(layer)
        self._select = config.vision_feature_select_strategy
        self.patch_size = int(config.vision_config.patch_size)

    @classmethod
    def accepts(cls, adapter: Any) -> bool:
        return (
            getattr(adapter, "family", None) == "llava"
            and fixed_image_size(adapter) is not None
            and _shares_prefix(adapter)
        )

    # ------------------------------------------------------------------ data
    @classmethod
    def prepare(cls, dataset: Any) -> None:
        """Tokenize every question of ``dataset`` once (``dataset.tokens``) and keep the
        processor's normalisation for the fast pixel path."""
        records = dataset.questions
        answers = [r["answer"] for r in records]
        with_answers = all(isinstance(a, str) and a for a in answers)
        dataset.tokens = tokenize_questions(
            dataset.adapter, [r["question"] for r in records], answers if with_answers else None
        )
        processor = dataset.adapter.image_processor
        dataset.normalisation = (
            torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1),
            torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1),
            float(getattr(processor, "rescale_factor", 1 / 255)),
        )

    @staticmethod
    def pixel_values(dataset: Any, images: Sequence[Any]) -> torch.Tensor:
        """``(B, 3, H, W)`` float32 pixel values as the adapter's image processor makes them."""
        height, width = dataset.size
        if all(im.mode == "RGB" and im.size == (width, height) for im in images):
            mean, std, rescale = dataset.normalisation
            array = np.stack([np.asarray(im) for im in images])  # (B, H, W, 3) uint8
            x = torch.from_numpy(array).permute(0, 3, 1, 2).float()
            return (x * rescale - mean) / std
        inputs, _ = dataset.adapter.image_inputs(list(images))
        return inputs["pixel_values"]

    @classmethod
    def collate(cls, dataset: Any, items: Sequence[dict], *, with_answers: bool = True) -> dict:
        """Items -> one batch (``B`` images, ``Q`` questions over them).

        Keys:
            ``pixel_values`` (B, 3, H, W); ``prefix_ids`` (P,) shared by every prompt and
            ``image_positions`` (P,) bool; ``question_image`` (Q,) long: the image (row of
            ``pixel_values``) of each question; ``image_id`` (B,) long.
            With answers (training): ``suffix_ids`` (Q, S) right-padded, ``suffix_mask`` (Q, S),
            ``labels`` (Q, S): answer and eos ids, -100 elsewhere (Hugging Face convention,
            aligned with ``suffix_ids``).
            Without answers (generation): ``suffix_ids`` / ``suffix_mask`` hold the prompts
            only, left-padded.
            ``answers`` (list of Q lists of human answers), ``question_type`` (list of Q str),
            ``question_id`` (Q,) long; ``items`` (the B items); ``boxes`` / ``labels_det``
            (lists of B tensors) and ``mask`` (B, H, W) long when the data has them.
        """
        if not items:
            raise ValueError("collate: empty batch")
        tokens = dataset.tokens
        rows = [row for item in items for row in item["rows"]]
        question_image = [b for b, item in enumerate(items) for _ in item["rows"]]
        if with_answers:
            sequences = [tokens.suffix[r] for r in rows]
        else:
            sequences = [tokens.suffix[r][: tokens.prompt_lengths[r]] for r in rows]
        length = max(len(s) for s in sequences)
        pad_id = dataset.adapter.tokenizer.pad_token_id
        pad_id = pad_id if pad_id is not None else dataset.adapter.tokenizer.eos_token_id
        count = len(sequences)
        suffix_ids = torch.full((count, length), pad_id, dtype=torch.long)
        suffix_mask = torch.zeros((count, length), dtype=torch.long)
        labels = torch.full((count, length), IGNORE_INDEX, dtype=torch.long)
        for q, (row, seq) in enumerate(zip(rows, sequences)):
            ids = torch.tensor(seq, dtype=torch.long)
            start = 0 if with_answers else length - len(seq)
            suffix_ids[q, start : start + len(seq)] = ids
            suffix_mask[q, start : start + len(seq)] = 1
            if with_answers:
                answer_from = tokens.prompt_lengths[row]
                labels[q, answer_from : len(seq)] = ids[answer_from:]
        batch: dict[str, Any] = {
            "pixel_values": cls.pixel_values(dataset, [item["image"] for item in items]),
            "prefix_ids": tokens.prefix_ids,
            "image_positions": tokens.image_positions,
            "question_image": torch.tensor(question_image, dtype=torch.long),
            "image_id": torch.tensor([int(item["image_id"]) for item in items], dtype=torch.long),
            "suffix_ids": suffix_ids,
            "suffix_mask": suffix_mask,
            **question_metadata(dataset, rows),
            "items": list(items),
        }
        if with_answers:
            if not bool((labels != IGNORE_INDEX).any()):
                raise ValueError("the batch has no answer tokens: does the split have answers?")
            batch["labels"] = labels
        if items[0]["boxes"] is not None:
            batch["boxes"] = [item["boxes"] for item in items]
            batch["labels_det"] = [item["labels"] for item in items]
        if items[0]["mask"] is not None:
            batch["mask"] = torch.stack([item["mask"] for item in items])
        return batch

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

    # ------------------------------------------------------------------ running
    def forward(
        self, batch: Mapping[str, Any], heads: bool = True, language: bool = True
    ) -> VQAOutputs:
        """Run the model on a batch of :meth:`collate`; with ``heads`` also the detection /
        segmentation heads (when the model has them). ``language=False`` runs the vision tower
        (and heads) only: ``logits`` is then None."""
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

    @torch.no_grad()
    def answers(self, batch: Mapping[str, Any], *, max_new_tokens: int = 4) -> list[str]:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        tokenizer = self.adapter.tokenizer
        was_training = self.training
        self.eval()
        try:
            device = batch["pixel_values"].device
            patches, _ = self.vision_features(batch["pixel_values"])
            prefix = self.prefix_embeddings(patches, batch["prefix_ids"], batch["image_positions"])
            logits, (cache, attention, last) = self.language(
                prefix,
                batch["suffix_ids"],
                batch["suffix_mask"],
                batch["question_image"],
                keep_cache=True,
            )
            eos = tokenizer.eos_token_id
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
            lm = self.vlm.model.language_model
            embed = self.vlm.get_input_embeddings()
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
                next_logits = self.vlm.lm_head(out.last_hidden_state[:, -1])
        finally:
            self.train(was_training)
        tokens = torch.stack(generated, dim=1)
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return [t.strip() for t in texts]

    def model_inputs(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The same questions as plain ``model(**kwargs)`` inputs: the prefix repeated before
        every suffix (``input_ids``, ``attention_mask``) and each question's image."""
        input_ids = torch.cat(
            [batch["prefix_ids"].expand(batch["suffix_ids"].shape[0], -1), batch["suffix_ids"]],
            dim=1,
        )
        mask = torch.cat(
            [
                torch.ones_like(batch["prefix_ids"]).expand(input_ids.shape[0], -1),
                batch["suffix_mask"],
            ],
            dim=1,
        )
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "pixel_values": batch["pixel_values"][batch["question_image"]],
        }
