"""onnxruntime-genai: the ``genai_config.json`` of an ONNX export, and ``GenaiVLM``, which answers
questions with ``onnxruntime_genai`` driving the exported graphs.

onnxruntime-genai runs a vision-language model as a pipeline of three ONNX models that
``genai_config.json`` names: ``vision`` (pixels -> ``image_features``), ``embedding``
(``input_ids`` + ``image_features`` -> ``inputs_embeds``) and ``decoder`` (``inputs_embeds``,
``attention_mask``, ``position_ids``, ``past_key_values.%d.key/value`` -> ``logits``,
``present.%d.key/value``). It runs vision and embedding on the prompt, then the decoder once
per token with its own KV cache, computing ``attention_mask`` and ``position_ids`` itself.

Its multimodal model types are a fixed list (``phi3v``, ``gemma3``, ``qwen2_5_vl``, ...), and
the type selects the runtime's behaviour, not the graphs' contents. distiq uses:

- LLaVA, Idefics3 / SmolVLM -> ``gemma3``: the plain pipeline (vision once per prompt,
  1-D positions counted from the attention mask, rewinding allowed). Nothing Gemma-specific
  runs outside the graphs.
- Qwen2-VL -> ``qwen2_5_vl``: genai computes Qwen's 3-D multimodal positions itself from
  ``input_ids`` (``vision_start_token_id`` followed by ``image_token_id``) and
  ``image_grid_thw``, as Hugging Face's ``get_rope_index`` does, and calls the vision graph once
  per image. The language model of Qwen2-VL and Qwen2.5-VL is the same architecture; only the
  vision tower differs, and that is the exported graph.

What genai cannot do with these exports: its multimodal *processors*
(``model.create_multimodal_processor()``) are written per model type (Gemma's expands an image
into 256 Gemma tokens, Phi's reads Phi's processor config), so they cannot prepare LLaVA /
Idefics3 prompts, and no processor config is written. The caller prepares ``input_ids``,
``pixel_values`` (``image_grid_thw`` for Qwen2-VL) and ``num_image_tokens`` — ``GenaiVLM``
does, with the export's Hugging Face processor — and passes them as ``NamedTensors`` to
``generator.set_inputs``; everything after that runs in genai.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

GENAI_MODEL_TYPES = {"llava": "gemma3", "idefics3": "gemma3", "qwen2_vl": "qwen2_5_vl"}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def _session_options(int4_accuracy_level: int | None) -> dict:
    options: dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": []}
    if int4_accuracy_level is not None:
        options["session.qdq_matmulnbits_accuracy_level"] = str(int(int4_accuracy_level))
    return options


def genai_config(
    facts: dict, vision: Any, files: dict[str, str], int4_accuracy_level: int | None = None
) -> dict:
    """The ``genai_config.json`` content of an export.

    Args:
        facts: the manifest's ``vlm`` facts (family, token ids, vocabulary, context, cache).
        vision: the ``VisionPart`` (its input names and genai vision keys).
        files: graph name -> file name (``vision``, ``embedding``, ``language_model``).
        int4_accuracy_level: onnxruntime's ``MatMulNBits`` accuracy level for every session
            (None: onnxruntime's default).
    """
    cache = facts["kv_cache"]
    eos = list(facts["eos_token_ids"])
    pad = facts["pad_token_id"] if facts["pad_token_id"] is not None else eos[0]
    options = _session_options(int4_accuracy_level)
    decoder_inputs = {
        "inputs_embeds": "inputs_embeds",
        "attention_mask": "attention_mask",
        "position_ids": "position_ids",
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
    }
    model: dict[str, Any] = {
        "type": GENAI_MODEL_TYPES[facts["family"]],
        "bos_token_id": facts["bos_token_id"] if facts["bos_token_id"] is not None else pad,
        "eos_token_id": eos if len(eos) > 1 else eos[0],
        "pad_token_id": pad,
        "vocab_size": facts["vocab_size"],
        "context_length": facts["max_length"],
        "decoder": {
            "filename": files["language_model"],
            **{k: cache[k] for k in ("hidden_size", "head_size", "num_attention_heads")},
            **{k: cache[k] for k in ("num_key_value_heads", "num_hidden_layers")},
            "inputs": decoder_inputs,
            "outputs": {
                "logits": "logits",
                "present_key_names": "present.%d.key",
                "present_value_names": "present.%d.value",
            },
            "session_options": options,
        },
        "embedding": {
            "filename": files["embedding"],
            "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
            "outputs": {"inputs_embeds": "inputs_embeds"},
            "session_options": options,
        },
        "vision": {
            "filename": files["vision"],
            **vision.genai,
            "inputs": {name: name for name in vision.input_names},
            "outputs": {"image_features": "image_features"},
            "session_options": options,
        },
    }
    if facts["family"] == "qwen2_vl":
        model["image_token_id"] = facts["image_token_id"]
        model["vision_start_token_id"] = facts["vision_start_token_id"]
        model["video_token_id"] = facts["video_token_id"]
    search = {
        "diversity_penalty": 0.0,
        "do_sample": False,
        "early_stopping": True,
        "length_penalty": 1.0,
        "max_length": facts["max_length"],
        "min_length": 0,
        "no_repeat_ngram_size": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        "past_present_share_buffer": False,
        "repetition_penalty": 1.0,
        "temperature": 1.0,
        "top_k": 1,
        "top_p": 1.0,
    }
    return {"model": model, "search": search}


def write_genai_files(path: Path, config: dict, processor_dir: Path) -> None:
    """Write ``genai_config.json`` into ``path`` and copy the tokenizer files there (where
    ``onnxruntime_genai.Tokenizer(model)`` looks for them)."""
    (path / "genai_config.json").write_text(json.dumps(config, indent=1))
    for name in TOKENIZER_FILES:
        if (processor_dir / name).is_file():
            shutil.copyfile(processor_dir / name, path / name)


def import_genai():
    """``onnxruntime_genai``, or an ImportError that says how to install it."""
    try:
        import onnxruntime_genai
    except ImportError as error:
        raise ImportError(
            "running an ONNX export with onnxruntime-genai needs the package onnxruntime-genai "
            "(pip install 'distiq[genai]')"
        ) from error
    return onnxruntime_genai


class GenaiVLM:
    """An ONNX export run by onnxruntime-genai (see the module docstring).

    Args:
        path: a directory written by ``export_onnx``.
        config_overlay: a dict merged into ``genai_config.json`` at load time (e.g. session
            options), through ``onnxruntime_genai.Config.overlay``.
    """

    def __init__(self, path: str | os.PathLike, *, config_overlay: dict | None = None) -> None:
        from distiq.export.onnx import read_onnx_manifest
        from distiq.export.onnx_inputs import ExportInputs

        og = import_genai()
        self.path = Path(path)
        self.manifest = read_onnx_manifest(self.path)
        config = og.Config(str(self.path))
        if config_overlay:
            config.overlay(json.dumps(config_overlay))
        self.og = og
        self.model = og.Model(config)
        self.inputs = ExportInputs(self.path, self.manifest)
        self.eos = set(self.manifest["vlm"]["eos_token_ids"])
        self.last_generator = None

    def named_tensors(self, prompt: Any) -> Any:
        """The ``NamedTensors`` genai's ``set_inputs`` takes for a prepared prompt."""
        named = self.og.NamedTensors()
        named["input_ids"] = prompt.input_ids.astype(np.int32)
        for name, value in prompt.vision.items():
            named[name] = value
        named["num_image_tokens"] = np.asarray([prompt.num_image_tokens], dtype=np.int64)
        return named

    def generate_ids(self, image: Any, question: str, *, max_new_tokens: int = 8) -> list[int]:
        """Greedy new token ids for one question, generated by onnxruntime-genai."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        prompt = self.inputs.prepare(image, question, reserve=max_new_tokens)
        params = self.og.GeneratorParams(self.model)
        length = prompt.input_ids.shape[1]
        params.set_search_options(do_sample=False, max_length=length + max_new_tokens)
        generator = self.og.Generator(self.model, params)
        generator.set_inputs(self.named_tensors(prompt))
        new: list[int] = []
        while not generator.is_done() and len(new) < max_new_tokens:
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in self.eos:
                break
            new.append(token)
        self.last_generator = generator
        return new

    def answer(self, image: Any, question: str, *, max_new_tokens: int = 8) -> str:
        """The greedy answer, special tokens removed, stripped."""
        new = self.generate_ids(image, question, max_new_tokens=max_new_tokens)
        return self.inputs.decode(new)

    def answers(self, samples: list[dict], *, max_new_tokens: int = 8) -> list[str]:
        """Answers for VQA samples (dicts with ``image`` and ``question``)."""
        return [
            self.answer(s["image"], s["question"], max_new_tokens=max_new_tokens) for s in samples
        ]


def accuracy_overlay(int4_accuracy_level: int | None) -> dict | None:
    """A ``genai_config.json`` overlay setting onnxruntime's ``MatMulNBits`` accuracy level in
    every session (None: no overlay)."""
    if int4_accuracy_level is None:
        return None
    entry = {"session.qdq_matmulnbits_accuracy_level": str(int(int4_accuracy_level))}
    sections = ("decoder", "embedding", "vision")
    return {"model": {name: {"session_options": dict(entry)} for name in sections}}
