"""The ``decode`` workload: the cost of ONE new token with the KV cache of a prompt.

A VLM answers in two phases: the *prefill* runs the prompt (image tokens + text tokens, L in
all) through the language model once and fills the KV cache; each answer token is then one
*decode* step: one token through the language model, attending over the L cached keys and
values. Decode is what a user waits for token after token; it reads every weight for one row
of activations, so it is bound by memory traffic, where prefill is bound by arithmetic. The
two are timed apart (the ``language_model`` workload of ``distiq.bench.backends`` is the
prefill).

Each backend decodes with its own cache, filled once by its own prefill of the prompt before
timing (so a quantized export attends over its own keys, as deployed):

- :class:`TorchDecodeStep`: the Hugging Face language model with a ``DynamicCache`` (the
  model's own decoding path, as ``generate`` runs it) and the ``lm_head``; after each step the
  new token is cropped off the cache, so every timed call sees the same L cached tokens;
- :class:`OrtDecodeStep`: the exported ``language_model.onnx`` decoder with
  ``past_key_values.N.key/value`` of length L, fetching ``logits`` and every
  ``present.N.key/value`` (length L + 1): the work of one step of ``OrtVLM`` or
  onnxruntime-genai.

Both return the new token's logits ``(1, 1, V)``.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from torch import nn


def step_embedding(model: nn.Module, seed: int = 1) -> torch.Tensor:
    """``(1, 1, D)`` float32 embedding of one random token of ``model``'s vocabulary (the new
    token of a decode step)."""
    from distiq.models.multitask import unwrap_vlm

    embeddings = unwrap_vlm(model).get_input_embeddings()
    generator = torch.Generator().manual_seed(seed)
    token = torch.randint(0, embeddings.weight.shape[0], (1, 1), generator=generator)
    with torch.no_grad():
        return embeddings(token).float()


def _cache_keyword(language_model: nn.Module) -> str:
    """``cache`` (current transformers) or ``past_key_values`` (earlier releases)."""
    parameters = inspect.signature(language_model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _positions(start: int, length: int, mrope: bool) -> torch.Tensor:
    positions = torch.arange(start, start + length).unsqueeze(0)  # (1, length)
    return positions[None].expand(3, 1, length) if mrope else positions


class TorchDecodeStep:
    """One decode step of a model's language model in eager PyTorch (see the module docstring).

    Args:
        model: a VLM or ``VLMWithHeads`` (float, fake-quant or with ``QuantizedLinear`` layers).
        adapter: its adapter.
        prompt_embeds: ``(1, L, D)`` the prompt's input embeddings (filled into the cache once).
        step_embeds: ``(1, 1, D)`` the new token's embedding.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: Any,
        prompt_embeds: torch.Tensor,
        step_embeds: torch.Tensor,
    ) -> None:
        from transformers import DynamicCache

        from distiq.export.onnx_parts import MROPE_FAMILIES, language_parts, resolve_vlm

        vlm, adapter, _ = resolve_vlm(model, adapter)
        self.language_model, self.lm_head = language_parts(vlm, adapter)
        mrope = adapter.family in MROPE_FAMILIES
        self.prompt_length = int(prompt_embeds.shape[1])
        self.cache = DynamicCache()
        self._keyword = _cache_keyword(self.language_model)
        with torch.inference_mode():
            self.language_model(
                inputs_embeds=prompt_embeds,
                attention_mask=torch.ones(1, self.prompt_length, dtype=torch.long),
                position_ids=_positions(0, self.prompt_length, mrope),
                use_cache=True,
                **{self._keyword: self.cache},
            )
        self.step_embeds = step_embeds
        self.attention_mask = torch.ones(1, self.prompt_length + 1, dtype=torch.long)
        self.position_ids = _positions(self.prompt_length, 1, mrope)

    def cached_length(self) -> int:
        """Tokens in the cache (L between calls)."""
        return int(self.cache.get_seq_length())

    def __call__(self) -> torch.Tensor:
        """The new token's logits ``(1, 1, V)``; the cache is back to L tokens afterwards."""
        with torch.inference_mode():
            hidden = self.language_model(
                inputs_embeds=self.step_embeds,
                attention_mask=self.attention_mask,
                position_ids=self.position_ids,
                use_cache=True,
                **{self._keyword: self.cache},
            ).last_hidden_state
            logits = self.lm_head(hidden)
        self.cache.crop(-1)  # drop the new token: the next call decodes after L tokens again
        return logits


class OrtDecodeStep:
    """One decode step of an exported ``language_model.onnx`` in onnxruntime (see the module
    docstring).

    Args:
        session: an onnxruntime ``InferenceSession`` of the decoder.
        prompt_embeds: ``(1, L, D)`` float32, run once as the prefill to fill the cache.
        step_embeds: ``(1, 1, D)`` float32, the new token.

    ``feed`` holds the step's inputs: ``inputs_embeds (1, 1, D)``, ``attention_mask (1, L + 1)``,
    ``position_ids`` ``[[L]]`` (``(3, 1, 1)`` for multimodal RoPE) and
    ``past_key_values.N.key/value (1, Hkv, L, hd)``.
    """

    def __init__(self, session: Any, prompt_embeds: np.ndarray, step_embeds: np.ndarray) -> None:
        from distiq.export.ort import decoder_feed

        self.session = session
        self.prompt_length = int(prompt_embeds.shape[1])
        prefill = session.run(None, decoder_feed(session, prompt_embeds))
        past = prefill[1:]
        rank = len(next(i for i in session.get_inputs() if i.name == "position_ids").shape)
        positions = np.full((1, 1), self.prompt_length, dtype=np.int64)
        if rank == 3:
            positions = np.ascontiguousarray(np.broadcast_to(positions[None], (3, 1, 1)))
        self.feed = decoder_feed(session, step_embeds, position_ids=positions, past=past)
        self.output_names = [o.name for o in session.get_outputs()]

    def outputs(self) -> dict[str, np.ndarray]:
        """Every output of one step by name: ``logits (1, 1, V)`` and
        ``present.N.key/value (1, Hkv, L + 1, hd)``."""
        return dict(zip(self.output_names, self.session.run(None, self.feed), strict=True))

    def __call__(self) -> np.ndarray:
        """The new token's logits ``(1, 1, V)`` (the presents are computed too, as in a real
        step)."""
        return self.session.run(None, self.feed)[0]
