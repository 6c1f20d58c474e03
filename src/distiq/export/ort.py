"""``OrtVLM``: answer a question about an image with the exported graphs and onnxruntime alone.

    from distiq.export.ort import OrtVLM
    vlm = OrtVLM("out/onnx-int8", threads=2)
    vlm.answer(PIL.Image.open("scene.png"), "how many red squares are there")

Every tensor operation of the model runs in onnxruntime; Python does the stitching:

1. the prompt: the exported template with the question, the image placeholder expanded to the
   image-token count, tokenized by the saved tokenizer (as ``VLMAdapter.build_inputs`` does);
2. pixels: the saved image processor (RGBA composited over white, resized, normalised);
3. ``vision`` -> ``projector`` give the image embeddings; ``embed_tokens`` embeds the prompt and
   the image embeddings replace the ``<image>`` positions, in order;
4. greedy decoding: ``language_model`` on the whole sequence, argmax of the last position,
   append, stop at an eos id or ``max_new_tokens`` (no KV cache: each step re-runs the prefix).

Sessions use ``intra_op_num_threads = threads`` (and one inter-op thread) so timings are
reproducible. ``int4_accuracy_level`` sets onnxruntime's ``MatMulNBits`` accuracy level for
INT4 graphs: None keeps onnxruntime's default (4: activations quantized to int8 per block inside
the kernel, fastest), ``0`` keeps float activations (the exported model's arithmetic up to float
rounding).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from distiq.export.onnx import PROCESSOR_DIR, read_onnx_manifest


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


class OrtVLM:
    """The exported VLM in onnxruntime (see the module docstring).

    Args:
        path: a directory written by ``export_onnx``.
        threads: intra-op threads per session (None: onnxruntime's default).
        int4_accuracy_level: ``MatMulNBits`` accuracy level for INT4 graphs (None: default).
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
        from transformers import AutoImageProcessor, AutoTokenizer

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
        processor = self.path / PROCESSOR_DIR
        self.tokenizer = AutoTokenizer.from_pretrained(processor, local_files_only=True)
        self.image_processor = AutoImageProcessor.from_pretrained(processor, local_files_only=True)

    # -- pieces -------------------------------------------------------------------------------
    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of the prompt for ``question``, image tokens expanded."""
        facts = self.facts
        placeholder = facts["image_placeholder"]
        text = facts["prompt_template"].replace("{question}", question)
        text = text.replace(placeholder, placeholder * facts["num_image_tokens"], 1)
        ids = self.tokenizer(text, add_special_tokens=facts["add_special_tokens"])["input_ids"]
        eos = self.tokenizer.eos_token_id
        return list(ids[:-1]) if ids and ids[-1] == eos else list(ids)

    def pixel_values(self, image: Any) -> np.ndarray:
        """``(1, 3, H, W)`` float32 pixels of a PIL image."""
        from distiq.models.inputs import to_rgb

        out = self.image_processor(images=[to_rgb(image)], return_tensors="np")
        return np.ascontiguousarray(out["pixel_values"], dtype=np.float32)

    def run(self, graph: str, **inputs: np.ndarray) -> list[np.ndarray]:
        """Run one graph by name with its named inputs."""
        if graph not in self.sessions:
            raise KeyError(f"no graph {graph!r}; this export has {', '.join(self.sessions)}")
        return self.sessions[graph].run(None, inputs)

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        """``(B, P, Dv)`` features of ``pixel_values (B, 3, H, W)``."""
        return self.run("vision", pixel_values=pixel_values)[0]

    def inputs_embeds(self, input_ids: list[int], image_features: np.ndarray) -> np.ndarray:
        """``(1, L, D)`` embeddings with the image embeddings at the ``<image>`` positions."""
        ids = np.asarray([input_ids], dtype=np.int64)
        embeds = self.run("embed_tokens", input_ids=ids)[0]
        image_embeds = self.run("projector", image_features=image_features)[0]  # (1, P, D)
        positions = np.nonzero(ids[0] == self.facts["image_token_id"])[0]
        if positions.size != image_embeds.shape[1]:
            raise ValueError(
                f"{positions.size} image tokens in the prompt but {image_embeds.shape[1]} image "
                "embeddings: the prompt template and the export disagree"
            )
        embeds[0, positions] = image_embeds[0]
        return embeds

    def logits(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray | None = None):
        """``(B, L, V)`` logits of ``inputs_embeds (B, L, D)``."""
        if attention_mask is None:
            attention_mask = np.ones(inputs_embeds.shape[:2], dtype=np.int64)
        return self.run(
            "language_model", inputs_embeds=inputs_embeds, attention_mask=attention_mask
        )[0]

    # -- answers ------------------------------------------------------------------------------
    def generate_ids(
        self, image: Any, question: str, *, max_new_tokens: int = 8
    ) -> tuple[list[int], np.ndarray]:
        """Greedy new token ids for one question, and the prompt's logits ``(1, L, V)``."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids = self.prompt_ids(question)
        if len(ids) + max_new_tokens > self.facts["max_length"]:
            raise ValueError(
                f"{len(ids)} prompt tokens + {max_new_tokens} new tokens exceed the model's "
                f"context of {self.facts['max_length']} tokens; shorten the question"
            )
        embeds = self.inputs_embeds(ids, self.image_features(self.pixel_values(image)))
        eos = set(self.facts["eos_token_ids"])
        new: list[int] = []
        prompt_logits = None
        for _ in range(max_new_tokens):
            logits = self.logits(embeds)
            if prompt_logits is None:
                prompt_logits = logits
            token = int(np.argmax(logits[0, -1]))
            if token in eos:
                break
            new.append(token)
            step = self.run("embed_tokens", input_ids=np.asarray([[token]], dtype=np.int64))[0]
            embeds = np.concatenate([embeds, step], axis=1)
        return new, prompt_logits

    def answer(self, image: Any, question: str, *, max_new_tokens: int = 8) -> str:
        """The greedy answer, special tokens removed, stripped."""
        new, _ = self.generate_ids(image, question, max_new_tokens=max_new_tokens)
        return self.tokenizer.decode(new, skip_special_tokens=True).strip()

    def answers(self, samples: list[dict], *, max_new_tokens: int = 8) -> list[str]:
        """Answers for VQA samples (dicts with ``image`` and ``question``)."""
        return [
            self.answer(s["image"], s["question"], max_new_tokens=max_new_tokens) for s in samples
        ]

    def heads(self, image: Any) -> dict[str, np.ndarray]:
        """Raw task-head outputs for one image: ``cls_logits`` (1, N, C), ``box_ltrb``
        (1, N, 4) and/or ``seg_logits`` (1, C, H, W)."""
        features = self.image_features(self.pixel_values(image))
        out = {}
        if "detection_head" in self.sessions:
            cls_logits, box = self.run("detection_head", image_features=features)
            out.update(cls_logits=cls_logits, box_ltrb=box)
        if "segmentation_head" in self.sessions:
            out["seg_logits"] = self.run("segmentation_head", image_features=features)[0]
        if not out:
            raise ValueError(f"{self.path} was exported without task heads")
        return out
