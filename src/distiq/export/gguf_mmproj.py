"""The vision side of a VLM as llama.cpp's multimodal projector file (``mmproj``, arch ``clip``).

llama.cpp's multimodal library (``tools/mtmd``, ``clip.cpp``) runs the vision encoder and the
projector from one GGUF file; the language model GGUF then receives its image embeddings. Which
families it covers and how distiq writes them (``clip.projector_type`` and the conventions of
llama.cpp's converters):

    llava (CLIP tower)     mlp                the tower up to the feature layer (HF
                                              ``vision_feature_layer``, written as
                                              ``clip.vision.feature_layer``; later layers and
                                              the unused post-layernorm dropped), projector
                                              ``linear_1`` / ``linear_2`` as ``mm.0`` / ``mm.2``
    idefics3, smolvlm      idefics3           SigLIP-style tower, ``mm.model.fc``,
                                              ``projector.scale_factor`` (pixel shuffle)
    qwen2_vl               qwen2vl_merger     fused qkv split into q / k / v, the Conv3d patch
    qwen2_5_vl             qwen2.5vl_merger   embedding split into its two temporal slices
                                              (``v.patch_embd.weight`` / ``.weight.1``), merger
                                              ``mm.0`` / ``mm.2``; 2.5: SiLU gated MLP and the
                                              window-attention pattern ``n_wa_pattern``
    gemma3                 gemma3             SigLIP tower, ``mm.soft_emb_norm`` (+1, Gemma's
                                              RMSNorm), ``mm.input_projection``

Other families (PaliGemma, LLaVA-NeXT, distiq's own heads) have no llama.cpp projector: the
export then holds the language model only and says so. Settings llama.cpp hard-codes are
checked, and a model that differs is refused (it would run a different network): LLaVA's
projector activation (GELU) and feature selection (class token dropped), Qwen2.5-VL's attention
window (112 pixels).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

from distiq.export.gguf_text import ArchitectureError, Mapped

MMPROJ_FAMILIES = ("llava", "idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl", "gemma3")
PROJECTOR_TYPES = {
    "llava": "mlp",
    "idefics3": "idefics3",
    "smolvlm": "idefics3",
    "qwen2_vl": "qwen2vl_merger",
    "qwen2_5_vl": "qwen2.5vl_merger",
    "gemma3": "gemma3",
}


# Texts llama.cpp's multimodal library looks up as single tokens to lay out a family's images
# (mtmd.cpp); it aborts when one is missing from the vocabulary.
SINGLE_TOKENS = {
    "idefics3": ("\n\n", "\n", "<fake_token_around_image>", "<global-img>"),
    "smolvlm": ("\n\n", "\n", "<fake_token_around_image>", "<global-img>"),
}


def check_single_tokens(family: str, tokenizer: Any) -> None:
    """Raise ArchitectureError when a text llama.cpp looks up for ``family`` (``SINGLE_TOKENS``)
    is not one token of ``tokenizer``."""
    missing = [
        text
        for text in SINGLE_TOKENS.get(family, ())
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) != 1
    ]
    if missing:
        raise ArchitectureError(
            f"llama.cpp lays out {family} images with the tokens {list(SINGLE_TOKENS[family])!r} "
            f"and aborts when one is missing; this tokenizer has no single token for "
            f"{missing!r}"
        )


class MmprojSpec:
    """The projector file of one VLM: its metadata and its tensors' mapping.

    Args:
        config: the VLM's Hugging Face config.
        image_processor: the run's image processor (mean, std, sizes).
        vision_prefix, projector_prefix: module names of the vision tower and projector.
    """

    def __init__(self, config: Any, image_processor: Any, vision_prefix: str, projector_prefix):
        self.config = config
        self.family = config.model_type
        self.vision = config.vision_config
        self.image_processor = image_processor
        self.vision_prefix = vision_prefix
        self.projector_prefix = projector_prefix
        self.metadata: dict[str, Any] = {}
        builder = getattr(self, f"_{self.family}", None)
        if builder is None:
            raise ArchitectureError(f"llama.cpp has no projector for {self.family!r}")
        self.block_count = int(getattr(self.vision, "num_hidden_layers", None) or self.vision.depth)
        builder()

    # ------------------------------------------------------------------ metadata per family
    def _common(self, hidden: int, ffn: int, heads: int, image_size: int, eps: float) -> None:
        self.metadata.update(
            projector_type=PROJECTOR_TYPES[self.family],
            embedding_length=hidden,
            feed_forward_length=ffn,
            head_count=heads,
            image_size=image_size,
            patch_size=int(self.vision.patch_size),
            layernorm_eps=eps,
            projection_dim=int(self.config.text_config.hidden_size),
        )

    def _gelu(self, allowed: tuple[str, ...]) -> None:
        act = getattr(self.vision, "hidden_act", "gelu")
        if act not in allowed:
            raise ArchitectureError(
                f"the vision tower uses {act!r}; llama.cpp's {self.family} encoder runs "
                f"{' / '.join(allowed)}"
            )
        self.metadata["use_gelu"] = act != "quick_gelu"

    def _llava(self) -> None:
        cfg, vision = self.config, self.vision
        if vision.model_type not in ("clip_vision_model", "clip"):
            raise ArchitectureError(
                f"llama.cpp's LLaVA projector takes a CLIP tower, not {vision.model_type!r}"
            )
        if cfg.vision_feature_select_strategy != "default":
            raise ArchitectureError(
                "llama.cpp's LLaVA drops the class token (vision_feature_select_strategy "
                f"'default'); this model uses {cfg.vision_feature_select_strategy!r}"
            )
        if cfg.projector_hidden_act != "gelu" or not getattr(cfg, "multimodal_projector_bias", 1):
            raise ArchitectureError(
                "llama.cpp's LLaVA projector is linear + bias, GELU, linear + bias; this one "
                f"uses {cfg.projector_hidden_act!r}"
                + ("" if getattr(cfg, "multimodal_projector_bias", 1) else " without biases")
            )
        layers = cfg.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        n = int(vision.num_hidden_layers)
        feature = [layer if layer >= 0 else n + layer + 1 for layer in layers]
        self.block_count = max(feature)  # the layers after the deepest feature are never used
        self._common(
            int(vision.hidden_size), int(vision.intermediate_size),
            int(vision.num_attention_heads), int(vision.image_size), float(vision.layer_norm_eps),
        )  # fmt: skip
        self.metadata["feature_layer"] = feature
        self._gelu(("gelu", "quick_gelu"))

    def _idefics3(self) -> None:
        vision = self.vision
        self._common(
            int(vision.hidden_size), int(vision.intermediate_size),
            int(vision.num_attention_heads), int(vision.image_size), float(vision.layer_norm_eps),
        )  # fmt: skip
        self._gelu(("gelu_pytorch_tanh", "gelu"))
        self.metadata["scale_factor"] = int(getattr(self.config, "scale_factor", 2))
        size = getattr(self.image_processor, "size", None) or {}
        self.metadata["preproc_image_size"] = int(size.get("longest_edge", vision.image_size))

    _smolvlm = _idefics3

    def _qwen2_vl(self) -> None:
        vision = self.vision
        if int(getattr(vision, "temporal_patch_size", 2)) != 2:
            raise ArchitectureError("llama.cpp's Qwen2-VL encoder takes temporal_patch_size 2")
        qwen25 = self.family == "qwen2_5_vl"
        hidden = int(vision.hidden_size if qwen25 else vision.embed_dim)
        ffn = int(vision.intermediate_size if qwen25 else vision.embed_dim * vision.mlp_ratio)
        self._common(
            hidden, ffn, int(vision.num_heads), int(getattr(vision, "image_size", 560)), 1e-6
        )
        self.metadata["spatial_merge_size"] = int(vision.spatial_merge_size)
        if not qwen25:
            self._gelu(("quick_gelu",))
            return
        if getattr(vision, "hidden_act", "silu") != "silu":
            raise ArchitectureError("llama.cpp's Qwen2.5-VL encoder runs a SiLU gated MLP")
        self.metadata["use_silu"] = True
        full = list(vision.fullatt_block_indexes)
        pattern = full[0] + 1
        if any(b - a != pattern for a, b in itertools.pairwise(full)):
            raise ArchitectureError(f"fullatt_block_indexes {full} is not a regular pattern")
        self.metadata["n_wa_pattern"] = pattern
        if int(vision.window_size) != 112:
            raise ArchitectureError(
                f"llama.cpp's Qwen2.5-VL encoder attends in windows of 112 pixels; this model's "
                f"window_size is {vision.window_size}"
            )

    _qwen2_5_vl = _qwen2_vl

    def _gemma3(self) -> None:
        vision = self.vision
        self._common(
            int(vision.hidden_size), int(vision.intermediate_size),
            int(vision.num_attention_heads), int(vision.image_size), float(vision.layer_norm_eps),
        )  # fmt: skip
        self._gelu(("gelu_pytorch_tanh", "gelu"))
        tokens = int(self.config.mm_tokens_per_image)
        side = math.isqrt(tokens)
        patches = int(vision.image_size) // int(vision.patch_size)
        if side * side != tokens or patches % side:
            raise ArchitectureError(
                f"{tokens} image tokens do not pool a {patches}x{patches} patch grid evenly"
            )
        self.metadata["scale_factor"] = patches // side

    # ------------------------------------------------------------------ writing
    def write(self, writer: Any) -> None:
        """Add the ``clip.*`` metadata to a ``gguf.GGUFWriter`` (arch ``clip``)."""
        import gguf

        m = self.metadata
        writer.add_type(gguf.GGUFType.MMPROJ)
        writer.add_clip_has_vision_encoder(True)
        writer.add_clip_projector_type(m["projector_type"])
        writer.add_vision_projection_dim(m["projection_dim"])
        writer.add_vision_image_size(m["image_size"])
        writer.add_vision_patch_size(m["patch_size"])
        writer.add_vision_embedding_length(m["embedding_length"])
        writer.add_vision_feed_forward_length(m["feed_forward_length"])
        writer.add_vision_block_count(self.block_count)
        writer.add_vision_head_count(m["head_count"])
        writer.add_vision_attention_layernorm_eps(m["layernorm_eps"])
        writer.add_vision_image_mean([float(v) for v in self.image_processor.image_mean])
        writer.add_vision_image_std([float(v) for v in self.image_processor.image_std])
        if m.get("use_gelu"):
            writer.add_vision_use_gelu(True)
        if m.get("use_silu"):
            writer.add_vision_use_silu(True)
        if "feature_layer" in m:
            writer.add_array("clip.vision.feature_layer", m["feature_layer"])
            writer.add_bool("clip.has_llava_projector", True)  # read by older clip.cpp
        if "scale_factor" in m and (self.family != "gemma3" or m["scale_factor"] != 4):
            writer.add_vision_projector_scale_factor(m["scale_factor"])
        if "preproc_image_size" in m:
            writer.add_vision_preproc_image_size(m["preproc_image_size"])
        if "spatial_merge_size" in m:
            writer.add_vision_spatial_merge_size(m["spatial_merge_size"])
        if "n_wa_pattern" in m:
            writer.add_vision_n_wa_pattern(m["n_wa_pattern"])
            writer.add_vision_window_size(112)

    # ------------------------------------------------------------------ tensors
    def map_tensors(self, names: list[str], shapes: dict[str, tuple[int, ...]]) -> list[Mapped]:
        """``Mapped`` entries for the vision tower's and projector's tensors among ``names``;
        raises ArchitectureError for one it cannot place."""
        import gguf

        tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, self.block_count)
        mapped, unplaced = [], []
        for name in names:
            entries = self._special(name, shapes.get(name, ()))
            if entries is None:
                hf = self._hf_name(name)
                if not hf:
                    continue  # not a vision tensor, or one llama.cpp does not use
                found = tensor_map.get_type_and_name(hf, try_suffixes=(".weight", ".bias"))
                if found is None:
                    unplaced.append(name)
                    continue
                entries = [Mapped(found[1], name)]  # the map keeps .weight / .bias
            mapped.extend(entries)
        if unplaced:
            raise ArchitectureError(
                f"no llama.cpp {PROJECTOR_TYPES[self.family]} projector tensor for: "
                + ", ".join(unplaced[:8])
                + (f" (+{len(unplaced) - 8} more)" if len(unplaced) > 8 else "")
            )
        return mapped

    def _hf_name(self, name: str) -> str | None:
        """The name gguf-py's TensorNameMap knows for a vision tensor, "" for one llama.cpp does
        not use, None for a tensor outside the vision side."""
        vision, rest = self.vision_prefix + ".", None
        if name.startswith(vision):
            rest = name[len(vision) :]
        elif not name.startswith(self.projector_prefix + "."):
            return None
        if self.family in ("qwen2_vl", "qwen2_5_vl"):
            return "visual." + (rest if rest is not None else name.split("visual.", 1)[1])
        if rest is None:  # a projector tensor without a special mapping
            rest = name[len(self.projector_prefix) + 1 :]
            if self.family in ("idefics3", "smolvlm"):
                return "model.connector." + rest
            return "multi_modal_projector." + rest
        if self.family == "llava":
            layer = rest.split(".")
            if rest.startswith("post_layernorm."):
                return ""  # LLaVA reads hidden states before the final layer norm
            if layer[:2] == ["encoder", "layers"] and int(layer[2]) >= self.block_count:
                return ""  # after the deepest feature layer
        if rest.startswith("head."):
            return ""  # SigLIP's pooling head: not part of a VLM's image features
        if self.family in ("idefics3", "smolvlm"):
            return "model.vision_model." + rest
        return "vision_tower.vision_model." + rest

    def _special(self, name: str, shape: tuple[int, ...]) -> list[Mapped] | None:
        """Entries for tensors whose llama.cpp form is not a plain rename (None otherwise)."""
        projector = self.projector_prefix + "."
        suffix = name.rsplit(".", 1)[1]
        if self.family == "llava" and name.startswith(projector):
            index = {"linear_1": 0, "linear_2": 2}.get(name[len(projector) :].split(".")[0])
            return [Mapped(f"mm.{index}.{suffix}", name)] if index is not None else None
        if self.family == "gemma3" and name.startswith(projector):
            rest = name[len(projector) :]
            if rest == "mm_input_projection_weight":
                return [Mapped("mm.input_projection.weight", name)]
            if rest == "mm_soft_emb_norm.weight":
                return [Mapped("mm.soft_emb_norm.weight", name, shift=1.0)]
            return None
        if self.family not in ("qwen2_vl", "qwen2_5_vl"):
            return None
        if name.startswith(projector + "mlp."):
            index = int(name[len(projector) + 4 :].split(".")[0])
            return [Mapped(f"mm.{index}.{suffix}", name)]
        if name.endswith("patch_embed.proj.weight"):  # Conv3d (out, in, t=2, kh, kw)
            return [
                Mapped("v.patch_embd.weight", name, transform=lambda w: w[:, :, 0].contiguous()),
                Mapped("v.patch_embd.weight.1", name, transform=lambda w: w[:, :, 1].contiguous()),
            ]
        if ".attn.qkv." in name:  # fused (3·C, ...) -> q, k, v rows
            third = shape[0] // 3
            block = name.split(".blocks.", 1)[1].split(".")[0]
            return [
                Mapped(
                    f"v.blk.{block}.attn_{part}.{suffix}",
                    name,
                    rows=torch.arange(i * third, (i + 1) * third),
                )
                for i, part in enumerate("qkv")
            ]
        return None
