"""Turning VQA samples into token ids: image conversion, prompt + answer tokens, padding, labels.

Family-independent pieces of ``VLMAdapter.build_inputs``. The layout of one sequence is

    [prompt tokens (image tokens expanded)] [answer tokens] [eos]
     labels = -100 ...                      answer ids ...  eos id

padded on the right for training (``with_answers=True``: positions are 0..L-1 as in training
without padding) and on the left for generation (the next token follows the prompt directly;
``generate`` derives position ids from the attention mask).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def to_rgb(image: Any, *, where: str = "image") -> Image.Image:
    """Return ``image`` as an RGB ``PIL.Image``.

    RGBA / LA / transparent-palette images are composited over white (what a viewer shows);
    grayscale, palette and CMYK images are converted. Anything that is not a PIL image, or an
    empty image, raises with a message saying what was received.
    """
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(
            f"{where} must be a PIL.Image.Image, got {type(image).__name__}; "
            "load files with PIL.Image.open(path) and arrays with PIL.Image.fromarray(array)"
        )
    if image.width < 1 or image.height < 1:
        raise ValueError(f"{where} is empty ({image.width}x{image.height} pixels)")
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def sample_field(sample: Any, key: str, index: int, kind: type | tuple[type, ...]) -> Any:
    """``sample[key]`` with a clear error when the sample is not a dict or lacks the key."""
    if not isinstance(sample, dict):
        raise TypeError(
            f"sample {index} must be a dict (see the VQA sample format), got {type(sample).__name__}"
        )
    if key not in sample:
        raise KeyError(
            f"sample {index} has no {key!r}; VQA samples need 'image', 'question' and, for "
            f"training, 'answer' (it has {sorted(sample)})"
        )
    value = sample[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise TypeError(f"sample {index}: {key!r} must be {names}, got {type(value).__name__}")
    return value


@dataclass
class TokenizedBatch:
    """Padded token tensors of a batch.

    Attributes:
        input_ids: (B, L) token ids.
        attention_mask: (B, L) 1 for real tokens, 0 for padding.
        labels: (B, L) answer token ids (and eos) where the loss applies, -100 elsewhere;
            None without answers.
        answer_mask: (B, L) bool, True on answer tokens (and eos).
        prompt_lengths: tokens of each prompt (image tokens included), without padding.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    answer_mask: torch.Tensor
    prompt_lengths: list[int]


def tokenize_prompts_and_answers(
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str] | None,
    *,
    answer_separator: str,
    add_special_tokens: bool,
    max_length: int,
    reserve: int = 0,
) -> TokenizedBatch:
    """Tokenize ``prompts`` (+ ``answer_separator`` + ``answers`` + eos), pad, build labels.

    The answer's ids are taken from the tokenization of the whole text ``prompt + separator +
    answer`` when the prompt's own ids are a prefix of it (so merges across the boundary are
    what the tokenizer really produces); otherwise the answer is tokenized on its own.

    Args:
        prompts: B prompt strings with image tokens already expanded.
        answers: B answer strings, or None for generation (left padding, no labels).
        max_length: the model's context; a sequence longer than ``max_length - reserve`` raises.
        reserve: tokens kept free after the sequence (``max_new_tokens`` for generation).
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token before training")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    prompt_ids = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    prompt_ids = [_strip_trailing_eos(ids, eos_id) for ids in prompt_ids]

    sequences, answer_lengths = [], []
    if answers is None:
        sequences = [list(ids) for ids in prompt_ids]
        answer_lengths = [0] * len(sequences)
    else:
        full_texts = [p + answer_separator + a for p, a in zip(prompts, answers)]
        full_ids = tokenizer(full_texts, add_special_tokens=add_special_tokens)["input_ids"]
        for i, (p_ids, f_ids) in enumerate(zip(prompt_ids, full_ids)):
            f_ids = _strip_trailing_eos(f_ids, eos_id)
            if f_ids[: len(p_ids)] == p_ids:
                a_ids = f_ids[len(p_ids) :]
            else:
                a_ids = tokenizer(answer_separator + answers[i], add_special_tokens=False)[
                    "input_ids"
                ]
            if not a_ids:
                raise ValueError(f"sample {i}: the answer {answers[i]!r} tokenizes to nothing")
            sequences.append([*p_ids, *a_ids, eos_id])
            answer_lengths.append(len(a_ids) + 1)

    limit = max_length - reserve
    for i, seq in enumerate(sequences):
        if len(seq) > limit:
            n_prompt = len(prompt_ids[i])
            extra = f" + {reserve} new tokens" if reserve else ""
            raise ValueError(
                f"sample {i}: {len(seq)} tokens ({n_prompt} prompt tokens, image tokens included"
                f"{extra}) exceed the model's context of {max_length} tokens; shorten the "
                "question or the answer, use smaller images, or use a model with a longer "
                "context (text_config.max_position_embeddings)"
            )

    length = max(len(s) for s in sequences)
    batch = len(sequences)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    answer_mask = torch.zeros((batch, length), dtype=torch.bool)
    left = answers is None
    for i, (seq, n_answer) in enumerate(zip(sequences, answer_lengths)):
        start = length - len(seq) if left else 0
        input_ids[i, start : start + len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, start : start + len(seq)] = 1
        if n_answer:
            answer_mask[i, start + len(seq) - n_answer : start + len(seq)] = True
    labels = None
    if answers is not None:
        labels = torch.where(answer_mask, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return TokenizedBatch(
        input_ids, attention_mask, labels, answer_mask, [len(p) for p in prompt_ids]
    )


def _strip_trailing_eos(ids: list[int], eos_id: int) -> list[int]:
    """Drop an eos that a tokenizer's post-processor appends; the batch adds its own."""
    return list(ids[:-1]) if ids and ids[-1] == eos_id else list(ids)
