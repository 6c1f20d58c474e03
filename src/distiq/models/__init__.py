"""Model adapters, the built-in edge VLM, and detection / segmentation heads.

- ``load(path)`` -> ``LoadedVLM(model, adapter)`` for a local Hugging Face VLM directory
  (LLaVA, LLaVA-NeXT, Idefics3 / SmolVLM, Qwen2-VL / Qwen2.5-VL, PaliGemma, Gemma 3;
  ``register_adapter`` adds more).
- ``VLMAdapter``: module names, default quantization targets, feature-capture points,
  ``build_inputs(samples)``, ``generate_answers(model, samples)``.
- ``build_edge_vlm(vocabulary, preset)``: the built-in LLaVA-architecture edge VLM.
- ``DetectionHead``, ``SegmentationHead``, ``VLMWithHeads``; ``describe(model)``.
- Dense vision models (:mod:`distiq.models.dense`): ``DenseAdapter`` for SegFormer, RT-DETR,
  DETR, Depth Anything and DPT checkpoints; ``load_dense(path)``, ``build_dense(family)``.

Importing this package does not import transformers (that happens on first use).
"""

from distiq.models import (  # noqa: F401  (register adapters)
    depth_estimation,
    detr,
    gemma3,
    idefics3,
    llava,
    llava_next,
    paligemma,
    qwen2_vl,
    segformer,
)
from distiq.models.adapter import DEFAULT_PARTS, PARTS, VLMAdapter
from distiq.models.dense import (
    DENSE_ADAPTERS,
    DenseAdapter,
    DenseOutputs,
    build_dense,
    dense_families,
    dense_model_type,
    is_dense_model,
    load_dense,
    load_dense_adapter,
    register_dense,
)
from distiq.models.describe import ModelDescription, describe
from distiq.models.edge_vlm import (
    EDGE_PRESETS,
    EdgeVLMConfig,
    build_edge_processor,
    build_edge_vlm,
    edge_vlm_config,
    import_edge_vlm_code,
)
from distiq.models.gemma3 import Gemma3Adapter
from distiq.models.heads import DetectionHead, SegmentationHead
from distiq.models.idefics3 import Idefics3Adapter
from distiq.models.inputs import IGNORE_INDEX, to_rgb
from distiq.models.llava import LlavaAdapter
from distiq.models.llava_next import LlavaNextAdapter
from distiq.models.loading import (
    ADAPTERS,
    LoadedVLM,
    UnsupportedModelError,
    adapter_class,
    load,
    load_adapter,
    register_adapter,
    supported_model_types,
)
from distiq.models.multitask import MultiTaskOutput, VLMWithHeads, unwrap_vlm
from distiq.models.paligemma import PaliGemmaAdapter
from distiq.models.parts import (
    FeaturePoints,
    ModuleNames,
    QuantTarget,
    attention_probs_available,
    narrow_layers,
)
from distiq.models.qwen2_vl import Qwen2VLAdapter
from distiq.models.tokenizer import build_word_tokenizer

__all__ = [
    "ADAPTERS",
    "DENSE_ADAPTERS",
    "DEFAULT_PARTS",
    "EDGE_PRESETS",
    "IGNORE_INDEX",
    "PARTS",
    "DenseAdapter",
    "DenseOutputs",
    "DetectionHead",
    "EdgeVLMConfig",
    "FeaturePoints",
    "Gemma3Adapter",
    "Idefics3Adapter",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "LoadedVLM",
    "ModelDescription",
    "ModuleNames",
    "MultiTaskOutput",
    "PaliGemmaAdapter",
    "QuantTarget",
    "Qwen2VLAdapter",
    "SegmentationHead",
    "UnsupportedModelError",
    "VLMAdapter",
    "VLMWithHeads",
    "adapter_class",
    "attention_probs_available",
    "build_dense",
    "build_edge_processor",
    "build_edge_vlm",
    "build_word_tokenizer",
    "dense_families",
    "dense_model_type",
    "describe",
    "edge_vlm_config",
    "import_edge_vlm_code",
    "is_dense_model",
    "load",
    "load_adapter",
    "load_dense",
    "load_dense_adapter",
    "narrow_layers",
    "register_adapter",
    "register_dense",
    "supported_model_types",
    "to_rgb",
    "unwrap_vlm",
]
