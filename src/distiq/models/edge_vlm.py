"""The built-in edge VLM: a small LLaVA built from a config, with an offline tokenizer.

It *is* a transformers ``LlavaForConditionalGeneration`` (CLIP-style ViT, 2-layer MLP
projector, Llama-style decoder), with a word-level tokenizer over the caller's vocabulary and a
``LlavaProcessor`` (PIL image processor, no torchvision). So it saves and loads with
``save_pretrained`` / ``from_pretrained`` and goes through ``LlavaAdapter`` exactly as a real
LLaVA does.

Prompt format (stored as the processor's chat template, so it travels with the model)::

    <s> <image> x N \\n {question} answer: {answer} </s>

N = (image_size / patch_size)^2 image tokens (the class token is dropped:
``vision_feature_select_strategy="default"``). Images are resized (not cropped) to
``image_size`` x ``image_size`` and normalised with CLIP's mean/std.

Presets (``EDGE_PRESETS``), sized by what trains where:

- ``tiny``  64 px / patch 8 (64 image tokens), ViT 128x3, LM 128x3: ~1 M parameters; the
  default, trains on 2 CPU cores.
- ``small`` 128 px / patch 16 (64 tokens), ViT 256x6, LM 256x6: ~10 M.
- ``base``  224 px / patch 16 (196 tokens), ViT 384x8, LM 512x8: ~40 M, for a GPU.

Conditioning: both towers are pre-norm (CLIP applies LayerNorm before attention/MLP and after
the embeddings; Llama uses RMSNorm before each block). The ViT's position embeddings start as a
2-D sine-cosine table (MAE's) at the scale of the patch embeddings' output, instead of
N(0, 0.02) noise about 14x weaker than the patch content (for unit-variance pixels), so patch
positions are distinguishable from the first step (``sincos_position_init=False`` restores
the transformers default). In a 400-step run (batch 32, VQA + segmentation loss) the two
initialisations reached the same accuracy within noise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from distiq.config import from_dict, to_dict
from distiq.models.llava import LlavaAdapter
from distiq.models.loading import LoadedVLM
from distiq.models.tokenizer import IMAGE, build_word_tokenizer
from distiq.util import suggest

EDGE_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' %} answer: {% endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}<image>{{ '\\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}</s>{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %} answer:{% endif -%}"
)


@dataclass(frozen=True)
class EdgeVLMConfig:
    """Sizes of the built-in edge VLM (a preset plus overrides; YAML-friendly).

    ``*_intermediate_size`` are the MLP widths (the Llama MLP is gated: 3 matrices).
    ``attn_implementation``: ``eager`` (default: as fast as SDPA at the tiny size on CPU, and
    its attention modules return probabilities for attention distillation) or ``sdpa``.
    """

    image_size: int = 64
    patch_size: int = 8
    vision_hidden_size: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    vision_intermediate_size: int = 256
    text_hidden_size: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_kv_heads: int = 4
    text_intermediate_size: int = 256
    max_length: int = 128
    attn_implementation: Literal["eager", "sdpa"] = "eager"
    initializer_range: float = 0.02
    sincos_position_init: bool = True

    def _validate(self) -> list[str]:
        errors = []
        if self.image_size % self.patch_size:
            errors.append(
                f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}"
            )
        for prefix in ("vision", "text"):
            hidden, heads = getattr(self, f"{prefix}_hidden_size"), getattr(self, f"{prefix}_heads")
            if hidden % heads:
                errors.append(
                    f"{prefix}_hidden_size {hidden} must be divisible by {prefix}_heads {heads}"
                )
        if self.text_heads % self.text_kv_heads:
            errors.append(f"text_heads {self.text_heads} must be a multiple of text_kv_heads")
        if self.max_length <= self.num_image_tokens:
            errors.append(
                f"max_length {self.max_length} leaves no room for text after "
                f"{self.num_image_tokens} image tokens"
            )
        return errors

    def __post_init__(self) -> None:
        errors = self._validate()
        if errors:
            raise ValueError("; ".join(errors))

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, data: dict) -> EdgeVLMConfig:
        return from_dict(cls, data)

    def to_dict(self) -> dict:
        return to_dict(self)


EDGE_PRESETS: dict[str, EdgeVLMConfig] = {
    "tiny": EdgeVLMConfig(),
    "small": EdgeVLMConfig(
        image_size=128,
        patch_size=16,
        vision_hidden_size=256,
        vision_layers=6,
        vision_heads=4,
        vision_intermediate_size=1024,
        text_hidden_size=256,
        text_layers=6,
        text_heads=4,
        text_kv_heads=4,
        text_intermediate_size=768,
        max_length=256,
    ),
    "base": EdgeVLMConfig(
        image_size=224,
        patch_size=16,
        vision_hidden_size=384,
        vision_layers=8,
        vision_heads=6,
        vision_intermediate_size=1536,
        text_hidden_size=512,
        text_layers=8,
        text_heads=8,
        text_kv_heads=4,
        text_intermediate_size=1536,
        max_length=512,
        attn_implementation="sdpa",
    ),
}


def edge_vlm_config(preset: str = "tiny", **overrides: Any) -> EdgeVLMConfig:
    """A preset (``tiny``, ``small``, ``base``) with field overrides."""
    if preset not in EDGE_PRESETS:
        known = list(EDGE_PRESETS)
        raise ValueError(
            f"unknown edge VLM preset {preset!r}{suggest(preset, known)}; presets: {', '.join(known)}"
        )
    fields = {f.name for f in dataclasses.fields(EdgeVLMConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        hints = "".join(suggest(u, sorted(fields)) for u in unknown)
        raise ValueError(
            f"unknown edge VLM setting(s) {unknown}{hints}; settings: {', '.join(sorted(fields))}"
        )
    return dataclasses.replace(EDGE_PRESETS[preset], **overrides)


def build_edge_processor(vocabulary: Iterable[str], config: EdgeVLMConfig) -> Any:
    """The ``LlavaProcessor`` (word tokenizer + ``CLIPImageProcessorPil``) for ``config``."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    tokenizer = build_word_tokenizer(vocabulary)
    size = {"height": config.image_size, "width": config.image_size}
    image_processor = CLIPImageProcessorPil(size=size, crop_size=size, do_center_crop=False)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token (dropped by "default")
        chat_template=EDGE_CHAT_TEMPLATE,
    )


def build_edge_vlm(
    vocabulary: Iterable[str],
    preset: str | EdgeVLMConfig = "tiny",
    *,
    seed: int = 0,
    **overrides: Any,
) -> LoadedVLM:
    """Build the built-in edge VLM (random weights) and its adapter.

    Args:
        vocabulary: every word the questions and answers use (``distiq.data`` gives it).
        preset: ``tiny`` / ``small`` / ``base`` or an ``EdgeVLMConfig``.
        seed: initialisation seed (the global RNG is left untouched).
        overrides: ``EdgeVLMConfig`` fields, e.g. ``image_size=48``.

    Returns:
        ``LoadedVLM(model, adapter)``; ``model`` a ``LlavaForConditionalGeneration`` in train
        mode; ``LoadedVLM.save_pretrained(dir)`` writes model, tokenizer and processor.
    """
    from transformers import LlavaForConditionalGeneration

    if isinstance(preset, EdgeVLMConfig):
        config = dataclasses.replace(preset, **overrides) if overrides else preset
    else:
        config = edge_vlm_config(preset, **overrides)
    processor = build_edge_processor(vocabulary, config)
    tokenizer = processor.tokenizer
    llava = edge_llava_config(config, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(llava)
        if config.sincos_position_init:
            _init_sincos_positions(model, config)
    model.set_attn_implementation(config.attn_implementation)
    generation = model.generation_config
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    model.train()
    adapter = LlavaAdapter(
        model.config,
        tokenizer,
        processor.image_processor,
        processor=processor,
        chat_template=processor.chat_template,
    )
    return LoadedVLM(model, adapter)


def import_edge_vlm_code() -> None:
    """Import the transformers code the built-in edge VLM runs on (model classes, tokenizer,
    image processor, the Auto loaders) without computing anything (the model is built on the
    ``meta`` device). Processes forked afterwards (the demo's workers) then start without paying
    for those imports (``benchmarks/demo_setup_costs.py`` measures them)."""
    import transformers.models.auto.modeling_auto  # noqa: F401  (the Auto loaders, for the forks)
    from transformers import LlavaForConditionalGeneration

    config = EDGE_PRESETS["tiny"]
    processor = build_edge_processor(["word"], config)
    with torch.device("meta"):
        LlavaForConditionalGeneration(edge_llava_config(config, processor.tokenizer))


def edge_llava_config(config: EdgeVLMConfig, tokenizer: Any) -> Any:
    """The transformers ``LlavaConfig`` for ``config`` and the edge tokenizer."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=config.vision_hidden_size,
        intermediate_size=config.vision_intermediate_size,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        projection_dim=config.vision_hidden_size,
        hidden_act="gelu",
        initializer_range=config.initializer_range,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden_size,
        intermediate_size=config.text_intermediate_size,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        num_key_value_heads=config.text_kv_heads,
        max_position_embeddings=config.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
        initializer_range=config.initializer_range,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=config.num_image_tokens,
        tie_word_embeddings=False,
    )


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """MAE's fixed 2-D sine-cosine position table: (grid*grid, dim), row-major patches.

    Half the channels encode the row, half the column; each half is [sin, cos] of the
    coordinate times ``1 / 10000^(2i/(dim/2))``.
    """
    if dim % 4:
        raise ValueError(f"2-D sine-cosine positions need a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(values: torch.Tensor) -> torch.Tensor:  # (P,) -> (P, dim/2)
        angles = values.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def _init_sincos_positions(model: torch.nn.Module, config: EdgeVLMConfig) -> None:
    """Position embeddings := sin-cos table scaled to the patch embeddings' output std."""
    embeddings = model.model.vision_tower.embeddings
    grid = config.image_size // config.patch_size
    table = sincos_2d(grid, config.vision_hidden_size)  # (P, D), entries of std 1/sqrt(2)
    fan_in = embeddings.patch_embedding.weight[0].numel()
    patch_std = embeddings.patch_embedding.weight.std().item() * math.sqrt(fan_in)
    with torch.no_grad():
        weight = embeddings.position_embedding.weight  # (1 + P, D): class token first
        weight[0].zero_()
        weight[1:] = table * (patch_std * math.sqrt(2.0))
