"""``OrtVLM``: answer a question about an image with the exported graphs and onnxruntime alone.

    from distiq.export.ort import OrtVLM
    vlm = OrtVLM("out/onnx-int8", threads=2)
    vlm.answer(PIL.Image.open("scene.png"), "how many red squares are there")

Every tensor operation of the model runs in onnxruntime; Python does the stitching, as
onnxruntime-genai does (``distiq.export.onnx_genai.GenaiVLM`` runs the same export in genai):

1. inputs: the export's processor prepares the prompt (image tokens expanded), the pixels and the
   position ids exactly as the model's adapter does (``distiq.export.onnx_inputs``);
2. ``vision`` gives the image features, ``embedding`` writes them over the image tokens;
3. the prompt runs ``language_model`` once with an empty KV cache; each new token (greedy: the
   argmax of the last logits) then runs ``embedding`` and ``language_model`` on that one token,
   feeding the previous step's ``present.N.*`` back as ``past_key_values.N.*``; decoding stops at
   an eos id or after ``max_new_tokens``. ``use_cache=False`` re-runs the whole sequence every
   step instead (the reference for the cache, and the benchmark's baseline).

``OrtVLM.steps`` records, for the last answer, how many tokens each decoder call took and how
long its past was: with the cache every call after the prompt takes one token.

Sessions use ``intra_op_num_threads = threads`` (and one inter-op thread) so timings are
reproducible. ``int4_accuracy_level`` sets onnxruntime's ``MatMulNBits`` accuracy level (the
kernel onnxruntime runs INT4 layers and weight-only int8 layers with): None keeps onnxruntime's
default (4: activations quantized to int8 per block inside the kernel, fastest), ``0`` keeps
float activations (the exported model's arithmetic up to float rounding).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distiq.export.onnx import read_onnx_manifest


def session_options(
    threads: int | None = None,
    int4_accuracy_level: int | None = None,
    optimize: bool = True,
    spinning: bool = True,
) -> Any:
    """onnxruntime ``SessionOptions`` with fixed thread counts (see the module docstring).

    ``spinning=False`` stops idle intra-op threads from busy-waiting after a run (onnxruntime's
    default keeps them spinning, which takes the cores from whatever runs next: the benchmark
    turns it off when it interleaves backends)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if int4_accuracy_level is not None:
        options.add_session_config_entry(
            "session.qdq_matmulnbits_accuracy_level", str(int(int4_accuracy_level))
        )
    return options


def decoder_feed(
    session: Any,
    inputs_embeds: np.ndarray,
    *,
    attention_mask: np.ndarray | None = None,
    position_ids: np.ndarray | None = None,
    past: list[np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The inputs of a ``language_model.onnx`` session for ``inputs_embeds (B, L, D)``: by default
    the prompt step (no padding, positions ``0..L-1`` — on all three axes for multimodal
    RoPE — and an empty cache of the session's geometry)."""
    batch, length = inputs_embeds.shape[:2]
    feed = {"inputs_embeds": inputs_embeds}
    past_inputs = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    past_length = 0 if past is None else past[0].shape[2]
    if attention_mask is None:
        attention_mask = np.ones((batch, past_length + length), dtype=np.int64)
    feed["attention_mask"] = attention_mask
    if position_ids is None:
        position_ids = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length))
        rank = len(next(i for i in session.get_inputs() if i.name == "position_ids").shape)
        if rank == 3:
            position_ids = np.broadcast_to(position_ids[None], (3, batch, length))
        position_ids = np.ascontiguousarray(position_ids)
    feed["position_ids"] = position_ids
    for index, spec in enumerate(past_inputs):
        if past is None:
            heads, head_size = spec.shape[1], spec.shape[3]
            feed[spec.name] = np.zeros((batch, heads, 0, head_size), dtype=np.float32)
        else:
            feed[spec.name] = past[index]
    return feed


@dataclass
class DecoderStep:
    """One ``language_model`` call: tokens fed, and the cached tokens it attended to."""

    tokens: int
    past: int


class OrtVLM:
    """The exported VLM in onnxruntime (see the module docstring).

    Args:
        path: a directory written by ``export_onnx``.
        threads: intra-op threads per session (None: onnxruntime's default).
        int4_accuracy_level: ``MatMulNBits`` accuracy level (INT4 and weight-only int8 layers;
            None: onnxruntime's default).
        optimize: onnxruntime graph optimizations (False runs the graph as written: slower,
            the reference semantics of the QDQ nodes).
        providers: onnxruntime execution providers.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        threads: int | None = None,
        int4_accuracy_level: int | None = None,
        optimize: bool = True,
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
    ) -> None:
        import onnxruntime as ort

        from distiq.export.onnx_inputs import ExportInputs

        self.path = Path(path)
        self.manifest = read_onnx_manifest(self.path)
        self.facts = self.manifest["vlm"]
        options = session_options(threads, int4_accuracy_level, optimize)
        self.sessions = {
            name: ort.InferenceSession(
                str(self.path / entry["file"]), options, providers=list(providers)
            )
            for name, entry in self.manifest["graphs"].items()
        }
        self.inputs = ExportInputs(self.path, self.manifest)
        self.tokenizer = self.inputs.tokenizer
        self.hidden_size = int(self.facts["hidden_size"])
        self.steps: list[DecoderStep] = []

    # -- pieces -------------------------------------------------------------------------------
    def run(self, graph: str, **inputs: np.ndarray) -> list[np.ndarray]:
        """Run one graph by name with its named inputs."""
        if graph not in self.sessions:
            raise KeyError(f"no graph {graph!r}; this export has {', '.join(self.sessions)}")
        return self.sessions[graph].run(None, inputs)

    def image_features(self, vision_inputs: dict[str, np.ndarray]) -> np.ndarray:
        """``(N, D)`` image features: the rows the embedding graph writes over image tokens."""
        return self.run("vision", **vision_inputs)[0]

    def embed(self, input_ids: np.ndarray, image_features: np.ndarray | None = None):
        """``(B, L, D)`` inputs_embeds of ``input_ids (B, L)``; ``image_features (N, D)`` replace
        the image tokens (None: no image tokens, as in a decoding step)."""
        if image_features is None:
            image_features = np.zeros((0, self.hidden_size), dtype=np.float32)
        count = int((input_ids == self.facts["image_token_id"]).sum())
        if count != image_features.shape[0]:
            raise ValueError(
                f"{count} image tokens in the prompt but {image_features.shape[0]} image "
                "features: the prompt and the export disagree"
            )
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        return self.run("embedding", input_ids=ids, image_features=image_features)[0]

    def decode(
        self,
        inputs_embeds: np.ndarray,
        position_ids: np.ndarray,
        past: list[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One ``language_model`` call: ``(logits (B, L, V), presents)`` for new tokens after
        ``past`` (None: the empty cache)."""
        session = self.sessions["language_model"]
        feed = decoder_feed(session, inputs_embeds, position_ids=position_ids, past=past)
        outputs = session.run(None, feed)
        self.steps.append(
            DecoderStep(inputs_embeds.shape[1], 0 if past is None else past[0].shape[2])
        )
        return outputs[0], outputs[1:]

    def logits(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray | None = None):
        """``(B, L, V)`` logits of ``inputs_embeds (B, L, D)`` (the prompt step; left padding
        in ``attention_mask`` shifts the positions as the model's own count does)."""
        session = self.sessions["language_model"]
        positions = None
        if attention_mask is not None:
            positions = np.clip(np.cumsum(attention_mask, axis=-1) - 1, 0, None).astype(np.int64)
            if self.facts.get("mrope"):
                positions = np.broadcast_to(positions[None], (3, *positions.shape)).copy()
        feed = decoder_feed(
            session, inputs_embeds, attention_mask=attention_mask, position_ids=positions
        )
        return session.run(["logits"], feed)[0]

    # -- answers ------------------------------------------------------------------------------
    def generate_ids(
        self, image: Any, question: str, *, max_new_tokens: int = 8, use_cache: bool = True
    ) -> tuple[list[int], np.ndarray]:
        """Greedy new token ids for one question, and the prompt's logits ``(1, L, V)``."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        prompt = self.inputs.prepare(image, question, reserve=max_new_tokens)
        features = self.image_features(prompt.vision)
        self.steps = []
        logits, past = self.decode(self.embed(prompt.input_ids, features), prompt.position_ids)
        prompt_logits = logits
        eos = set(self.facts["eos_token_ids"])
        ids = [int(i) for i in prompt.input_ids[0]]
        new: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(logits[0, -1]))
            if token in eos:
                break
            new.append(token)
            if len(new) == max_new_tokens:
                break
            ids.append(token)
            if use_cache:
                step = self.embed(np.asarray([[token]], dtype=np.int64))
                logits, past = self.decode(step, prompt.next_positions(len(ids) - 1), past)
            else:  # the whole sequence again, cache discarded
                embeds = self.embed(np.asarray([ids], dtype=np.int64), features)
                logits, _ = self.decode(embeds, prompt.positions_until(len(ids)))
        return new, prompt_logits

    def answer(self, image: Any, question: str, *, max_new_tokens: int = 8) -> str:
        """The greedy answer, special tokens removed, stripped."""
        new, _ = self.generate_ids(image, question, max_new_tokens=max_new_tokens)
        return self.inputs.decode(new)

    def answers(self, samples: list[dict], *, max_new_tokens: int = 8) -> list[str]:
        """Answers for VQA samples (dicts with ``image`` and ``question``)."""
        return [
            self.answer(s["image"], s["question"], max_new_tokens=max_new_tokens) for s in samples
        ]

    def heads(self, image: Any) -> dict[str, np.ndarray]:
        """Raw task-head outputs for one image: ``cls_logits`` (1, N, C), ``box_ltrb``
        (1, N, 4) and/or ``seg_logits`` (1, C, H, W)."""
        if "detection_head" not in self.sessions and "segmentation_head" not in self.sessions:
            raise ValueError(f"{self.path} was exported without task heads")
        pixels = self.pixel_values(image)
        features = self.run("vision", pixel_values=pixels)[1]  # vision_features (1, N, Dv)
        out = {}
        if "detection_head" in self.sessions:
            cls_logits, box = self.run("detection_head", vision_features=features)
            out.update(cls_logits=cls_logits, box_ltrb=box)
        if "segmentation_head" in self.sessions:
            out["seg_logits"] = self.run("segmentation_head", vision_features=features)[0]
        return out

    def pixel_values(self, image: Any) -> np.ndarray:
        """``(1, 3, H, W)`` float32 pixels of a PIL image (LLaVA exports)."""
        from distiq.models.inputs import to_rgb

        if self.facts["family"] != "llava":
            raise ValueError("pixel_values of one image are the LLaVA layout; use inputs.prepare")
        out = self.inputs.adapter.image_processor(images=[to_rgb(image)], return_tensors="np")
        return np.ascontiguousarray(out["pixel_values"], dtype=np.float32)
