"""GGUF export: llama.cpp files whose weights are the run's, code for code.

Runs are built the way distiq.train builds them, without the engine: a tiny model of each
family (tests/models/conftest.py, with a byte-level BPE tokenizer in place of the word-level
one, since llama.cpp has no word-level tokenizer), ``quantize_`` on its linear layers, then
``bake_quantized`` + ``save_run_model``. Every check reads the files back with gguf-py's reader
and dequantizer (the reference implementation of ggml's formats in Python) and compares with
the run's effective weights, loaded independently with ``distiq.models.load``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
import gguf

from distiq.quant import QuantSpec, quantize_

Q4 = QuantSpec(bits=4, symmetric=True, granularity="per_group(32)", scale_dtype="float16")
Q8 = QuantSpec(bits=8, symmetric=True, granularity="per_group(32)", scale_dtype="float16")


def family_module():
    name = "distiq_gguf_family_models"
    if name not in sys.modules:
        path = Path(__file__).parents[1] / "models" / "conftest.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def bpe_tokenizer(words, *, extra_special_tokens=(), chat_template=None):
    """A byte-level BPE tokenizer (GPT-2 pre-tokenizer) with the special tokens of
    ``distiq.models.build_word_tokenizer``, trained offline on ``words``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    extra = list(extra_special_tokens)
    special = ["<pad>", "<s>", "</s>", "<unk>", "<image>", *extra]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=len(special) + 256 + 40,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # "\n\n" becomes one token, as in real vocabularies (llama.cpp's SmolVLM layout needs it)
    backend.train_from_iterator([" ".join(words)] * 8 + list(words) + ["\n\n"] * 64, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
        additional_special_tokens=extra or None, chat_template=chat_template,
        clean_up_tokenization_spaces=False,
    )  # fmt: skip


# Settings llama.cpp hard-codes, given to the tiny models so that they are runnable there.
LLAMA_CPP_SETTINGS = {
    "gemma3": lambda config: setattr(config.text_config, "query_pre_attn_scalar", 16),
    "qwen2_5_vl": lambda config: setattr(config.vision_config, "window_size", 112),
}


def make_run(root: Path, family: str, weight: QuantSpec, parts=("language_model",), *,
             word_level: bool = False, name: str | None = None, train=None,
             configure=None) -> Path:  # fmt: skip
    """A run directory of ``family`` with ``weight`` on the linear layers of ``parts``
    (``configure(config)`` changes the new model's config before it is saved; ``train(model)``
    changes the fake-quant model before it is baked)."""
    import distiq.models
    from distiq.train.runs import bake_quantized, save_run_model

    base = root / f"{family}-{'word' if word_level else 'bpe'}-base"
    if configure is not None:
        base = base.with_name(f"{base.name}-{name}")
    if not base.is_dir():
        torch.manual_seed(0)
        builder = distiq.models.build_word_tokenizer if word_level else bpe_tokenizer
        with mock.patch.object(distiq.models, "build_word_tokenizer", builder):
            model, tokenizer, processor = family_module().build_family(family)
        if not word_level and family in LLAMA_CPP_SETTINGS:
            LLAMA_CPP_SETTINGS[family](model.config)
        if configure is not None:
            configure(model.config)
        if family == "paligemma":  # its processor adds <locNNNN> / <segNNN>: give them rows
            from transformers import PaliGemmaProcessor

            PaliGemmaProcessor(image_processor=processor, tokenizer=tokenizer)
            model.resize_token_embeddings(len(tokenizer))
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
        processor.save_pretrained(base)
    vlm, adapter = distiq.models.load(base, attn_implementation="eager")
    for part in parts:
        quantize_(vlm, adapter.quant_config(part, weight=weight, activation=None, model=vlm))
    if train is not None:
        train(vlm)
    run = root / (name or f"{family}-{weight.bits}b-{'-'.join(parts)}")
    save_run_model(run, vlm, adapter, bake_quantized(vlm, method="qad"))
    return run


def export(run: Path, out: Path, **options) -> dict:
    from distiq.export import load_run
    from distiq.export.gguf import export_gguf

    loaded = load_run(run)
    return export_gguf(loaded.model, out, adapter=loaded.adapter, overwrite=True, **options)


def effective_weights(run: Path) -> dict[str, torch.Tensor]:
    """The run's weights as its Hugging Face model holds them (module names)."""
    from distiq.models import load

    model, _ = load(run)
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def permuted(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py's LlamaModel.permute)."""
    shape = weight.shape
    return (
        weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


def reference(name: str, source: torch.Tensor, manifest: dict, config) -> torch.Tensor:
    """What llama.cpp must read for GGUF tensor ``name``, from the run's tensor ``source``."""
    text = config.text_config
    if manifest["architecture"] == "llama" and name.startswith("blk."):
        if ".attn_q." in name:
            source = permuted(source, text.num_attention_heads)
        if ".attn_k." in name:
            source = permuted(source, text.num_key_value_heads)
    gemma = manifest["architecture"] in ("gemma3", "gemma")
    if gemma and name.endswith("norm.weight") and not name.startswith(("v.", "mm.")):
        source = source + 1  # text norms: Gemma's (1 + w)
    if name == "mm.soft_emb_norm.weight":
        source = source + 1
    if manifest["family"] in ("qwen2_vl", "qwen2_5_vl") and name.startswith("v.blk."):
        for i, part in enumerate("qkv"):  # the fused qkv projection, split
            if f".attn_{part}." in name:
                third = source.shape[0] // 3
                source = source[i * third : (i + 1) * third]
    if name.startswith("v.patch_embd.weight") and source.dim() == 5:
        source = source[:, :, 1 if name.endswith(".1") else 0]
    return source


def read(path: Path) -> tuple[gguf.GGUFReader, dict]:
    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


FAMILIES = ["llava", "smolvlm", "idefics3", "qwen2_vl", "qwen2_5_vl", "gemma3"]
PROJECTORS = {
    "llava": "mlp", "smolvlm": "idefics3", "idefics3": "idefics3",
    "qwen2_vl": "qwen2vl_merger", "qwen2_5_vl": "qwen2.5vl_merger", "gemma3": "gemma3",
}  # fmt: skip
ARCHES = {"llava": "llama", "smolvlm": "llama", "idefics3": "llama", "qwen2_vl": "qwen2vl",
          "qwen2_5_vl": "qwen2vl", "gemma3": "gemma3"}  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_q4_0_weights_are_the_runs_bit_for_bit(root, family):
    run = make_run(root, family, Q4, parts=("language_model", "vision"))
    out = root / f"{family}-gguf"
    manifest = export(run, out)
    assert manifest["format"] == "distiq.gguf"
    assert json.loads((out / "manifest.json").read_text())["summary"] == manifest["summary"]
    assert manifest["summary"]["all_exact"] and manifest["projector_type"] == PROJECTORS[family]
    weights = effective_weights(run)
    from distiq.models import load

    config = load(run)[0].config
    quantized = set(json.loads((run / "quantization.json").read_text())["modules"])
    q4_0_sources = set()
    for file in ("model.gguf", "mmproj.gguf"):
        _, tensors = read(out / file)
        for name, tensor in tensors.items():
            info = manifest["tensors"][name]
            expected = reference(name, weights[info["source"]], manifest, config)
            got = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            assert np.array_equal(got.reshape(expected.shape), expected.numpy()), name
            from_quantized = info["source"].removesuffix(".weight") in quantized
            assert (tensor.tensor_type.name == "Q4_0") == from_quantized, name
            if from_quantized:
                q4_0_sources.add(info["source"].removesuffix(".weight"))
    # every quantized layer is a Q4_0 tensor, but LLaVA's last vision layer (after the feature
    # layer, vision_feature_layer -2), which llama.cpp never runs
    unused = {n for n in quantized if family == "llava" and ".encoder.layers.1." in n}
    assert q4_0_sources == quantized - unused and (family != "llava" or unused)


def test_q4_0_blocks_hold_the_runs_codes_and_scales(root):
    """Code for code: each block's float16 d is the run's stored scale and its nibbles minus 8
    are the codes ``load_run`` rebuilds (not a re-quantization of the dequantized weight)."""
    from safetensors.torch import load_file

    from distiq.export import load_run
    from distiq.export.layers import quantized_weight

    run = make_run(root, "qwen2_vl", Q4)
    manifest = export(run, root / "codes-gguf")
    state = load_file(run / "quant_state.safetensors")
    model = load_run(run).model
    _, tensors = read(root / "codes-gguf" / "model.gguf")
    name = "blk.1.ffn_down.weight"  # qwen2vl: no row permutation
    source = manifest["tensors"][name]["source"].removesuffix(".weight")
    blocks = tensors[name].data.reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32).reshape(-1)
    scale = state[f"{source}.weight_scale"].reshape(-1).numpy()
    assert np.array_equal(d, scale)
    nibbles = blocks[:, 2:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.int32) - 8
    codes = quantized_weight(model.get_submodule(source)).codes
    assert np.array_equal(q.reshape(codes.shape), codes.numpy())


def test_q8_0_and_the_wider_exact_grids(root):
    asym2 = QuantSpec(bits=2, symmetric=False, granularity="per_group(64)", scale_dtype="float16")
    q5 = QuantSpec(bits=5, symmetric=True, granularity="per_channel(0)", scale_dtype="float16")
    for spec, ggml_type in ((Q8, "Q8_0"), (q5, "Q5_0"), (asym2, "Q4_0")):
        run = make_run(root, "llava", spec, name=f"llava-grid-{ggml_type}-{spec.bits}")
        manifest = export(run, root / f"grid-{spec.bits}-gguf")
        assert manifest["summary"]["all_exact"]
        weights = effective_weights(run)
        _, tensors = read(root / f"grid-{spec.bits}-gguf" / "model.gguf")
        tensor = tensors["blk.0.ffn_down.weight"]  # 64 inputs: per_group(64) applies
        assert tensor.tensor_type.name == ggml_type
        expected = weights[manifest["tensors"]["blk.0.ffn_down.weight"]["source"]]
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        assert np.array_equal(got, expected.numpy())


def test_learned_scales_stay_on_the_float16_grid(root):
    """LSQ scales moved off float16 values are rounded by the forward (scale_dtype float16):
    the run stores the rounded ones, and the export is still exact."""

    def train(model):
        with torch.no_grad():
            for module in model.modules():
                if getattr(module, "lsq", None) is not None:
                    module.lsq.scale.mul_(1.0123)

    spec = Q4.replace(learnable=True)
    run = make_run(root, "smolvlm", spec, name="smolvlm-lsq", train=train)
    manifest = export(run, root / "lsq-gguf")
    assert manifest["summary"]["all_exact"]
    assert manifest["summary"]["ggml_types"]["Q4_0"] == 14
    weights = effective_weights(run)
    _, tensors = read(root / "lsq-gguf" / "model.gguf")
    tensor = tensors["blk.1.ffn_gate.weight"]
    source = manifest["tensors"]["blk.1.ffn_gate.weight"]["source"]
    got = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    assert np.array_equal(got, weights[source].numpy())


@pytest.mark.parametrize(
    "spec, reason",
    [
        (QuantSpec(bits=4, granularity="per_group(32)"), "not float16 values"),
        (QuantSpec(bits=8, symmetric=False, granularity="per_channel(0)", scale_dtype="float16"),
         "more than Q8_0"),
        (QuantSpec(bits=4, granularity="per_group(16)", scale_dtype="float16"), "blocks of 32"),
        (QuantSpec(bits=4, format="nf4", granularity="per_group(64)"), "no llama.cpp block"),
    ],
)  # fmt: skip
def test_other_grids_are_refused_with_the_exact_ones(root, spec, reason):
    from distiq.export.gguf_grid import GridError

    run = make_run(root, "llava", spec, name=f"llava-refused-{spec.format}-{spec.bits}")
    out = root / "refused-gguf"
    with pytest.raises(GridError) as err:
        export(run, out)
    message = str(err.value)
    layers = len(json.loads((run / "quantization.json").read_text())["modules"])
    assert reason in message and f"{layers} quantized layer(s)" in message
    for listed in ("Q4_0", "Q5_0", "Q8_0", "float16", "--gguf-fallback"):
        assert listed in message
    assert not out.exists()


def test_fallbacks_are_float_and_say_so(root):
    spec = QuantSpec(bits=4, granularity="per_group(32)")  # float32 scales: no block form
    run = make_run(root, "llava", spec, name="llava-fallback")
    weights = effective_weights(run)
    for fallback, ggml_type in (("f32", "F32"), ("f16", "F16")):
        out = root / f"fallback-{fallback}"
        manifest = export(run, out, fallback=fallback)
        assert manifest["fallback"] == fallback
        assert len(manifest["summary"]["fallback_tensors"]) == 14
        _, tensors = read(out / "model.gguf")
        tensor = tensors["blk.0.ffn_down.weight"]
        assert tensor.tensor_type.name == ggml_type
        expected = weights[manifest["tensors"]["blk.0.ffn_down.weight"]["source"]].numpy()
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if fallback == "f32":
            assert manifest["summary"]["all_exact"] and np.array_equal(got, expected)
        else:
            assert "blk.0.ffn_down.weight" in manifest["summary"]["not_exact"]
            assert np.array_equal(got, expected.astype(np.float16).astype(np.float32))


def test_metadata_and_tokenizer(root):
    from transformers import AutoTokenizer

    run = make_run(root, "llava", Q4)
    manifest = export(run, root / "meta-gguf")
    tokenizer = AutoTokenizer.from_pretrained(run)
    from distiq.models import load

    config = load(run)[0].config
    text, vision = config.text_config, config.vision_config
    reader, tensors = read(root / "meta-gguf" / "model.gguf")
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_0
    assert field(reader, "llama.block_count") == text.num_hidden_layers
    assert field(reader, "llama.embedding_length") == text.hidden_size
    assert field(reader, "llama.feed_forward_length") == text.intermediate_size
    assert field(reader, "llama.attention.head_count") == text.num_attention_heads
    assert field(reader, "llama.attention.head_count_kv") == text.num_key_value_heads
    assert (
        field(reader, "llama.rope.dimension_count") == text.hidden_size // text.num_attention_heads
    )
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(
        text.rms_norm_eps
    )
    assert field(reader, "llama.context_length") == text.max_position_embeddings
    # the tokenizer: ids in order, types, merges, special ids, BOS added as the tokenizer does
    vocab = tokenizer.get_vocab()
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == tensors["token_embd.weight"].shape[1]
    assert all(tokens[i] == text_ for text_, i in vocab.items())
    types = field(reader, "tokenizer.ggml.token_type")
    special = set(tokenizer.all_special_ids)
    assert all(types[i] == (3 if i in special else 1) for i in vocab.values())
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(m) for m in merges] and merges
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert manifest["tokenizer"]["tokens"] == len(tokens)
    # the projector file
    reader, _ = read(root / "meta-gguf" / "mmproj.gguf")
    assert field(reader, "general.architecture") == "clip"
    assert field(reader, "clip.projector_type") == "mlp"
    assert field(reader, "clip.has_vision_encoder") is True
    assert field(reader, "clip.vision.embedding_length") == vision.hidden_size
    assert field(reader, "clip.vision.projection_dim") == text.hidden_size
    assert field(reader, "clip.vision.image_size") == vision.image_size
    assert field(reader, "clip.vision.patch_size") == vision.patch_size
    # vision_feature_layer -2: the layers up to the penultimate hidden state
    assert field(reader, "clip.vision.block_count") == vision.num_hidden_layers - 1
    assert field(reader, "clip.vision.feature_layer") == [vision.num_hidden_layers - 1]
    processor = json.loads((run / "processor_config.json").read_text())["image_processor"]
    mean = field(reader, "clip.vision.image_mean")
    assert mean == pytest.approx(processor["image_mean"])


def test_word_level_tokenizer_is_refused(root):
    from distiq.export.gguf_vocab import TokenizerError

    run = make_run(root, "llava", Q4, word_level=True, name="llava-word")
    with pytest.raises(TokenizerError, match="word-level") as err:
        export(run, root / "word-gguf")
    assert "no word-level vocabulary" in str(err.value)
    assert not (root / "word-gguf").exists()


def test_llama3_rope_scaling_is_a_rope_freqs_tensor(root):
    """Llama 3's RoPE scaling: llama.cpp divides each rotary frequency by rope_freqs[i]; the
    run's model rotates by its rotary embedding's inv_freq."""
    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=64)  # fmt: skip

    def configure(config):
        config.text_config.rope_parameters = rope

    run = make_run(root, "llava", Q4, name="llava-llama3", configure=configure)
    manifest = export(run, root / "llama3-gguf")
    reader, tensors = read(root / "llama3-gguf" / "model.gguf")
    factors = gguf.quants.dequantize(
        tensors["rope_freqs.weight"].data, gguf.GGMLQuantizationType.F32
    )
    from distiq.models import load

    model, _ = load(run)
    text = model.config.text_config
    inv_freq = model.model.language_model.rotary_emb.inv_freq.float().numpy()
    dim = text.hidden_size // text.num_attention_heads
    default = 1.0 / (500000.0 ** (np.arange(0, dim, 2) / dim))
    np.testing.assert_allclose(default / factors, inv_freq, rtol=1e-6)
    assert factors.max() == pytest.approx(8.0) and factors.min() == pytest.approx(1.0)
    assert field(reader, "llama.rope.freq_base") == 500000.0
    assert manifest["tensors"]["rope_freqs.weight"]["exact"]


def test_bpe_without_merges_is_refused():
    """llama.cpp does not load a gpt2 vocabulary without merges."""
    from tokenizers import models

    from distiq.export.gguf_vocab import TokenizerError, build_vocab

    tokenizer = bpe_tokenizer(["a"])
    tokenizer.backend_tokenizer.model = models.BPE(vocab=tokenizer.get_vocab(), merges=[])
    with pytest.raises(TokenizerError, match="no merges"):
        build_vocab(tokenizer, len(tokenizer))


@pytest.mark.parametrize("family, arch", [("llava_next", "llama"), ("paligemma", "gemma")])
def test_family_without_projector_writes_the_language_model(root, family, arch):
    run = make_run(root, family, Q4)
    out = root / f"{family}-lm-gguf"
    manifest = export(run, out)
    assert manifest["files"]["mmproj"] is None and family in manifest["mmproj_missing_reason"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.gguf"]
    assert manifest["architecture"] == arch and manifest["summary"]["all_exact"]
    from distiq.models import load

    config = load(run)[0].config
    weights = effective_weights(run)
    _, tensors = read(out / "model.gguf")
    assert "output.weight" not in tensors or not config.text_config.tie_word_embeddings
    for name, tensor in tensors.items():
        expected = reference(name, weights[manifest["tensors"][name]["source"]], manifest, config)
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        assert np.array_equal(got.reshape(expected.shape), expected.numpy()), name


def test_settings_llama_cpp_hard_codes_are_checked(root):
    from distiq.export.gguf_mmproj import check_single_tokens
    from distiq.export.gguf_text import ArchitectureError

    with pytest.raises(ArchitectureError, match="aborts when one is missing"):
        check_single_tokens("smolvlm", bpe_tokenizer(["a"], extra_special_tokens=["<global-img>"]))

    run = make_run(root, "gemma3", Q4)
    config = json.loads((run / "config.json").read_text())
    config["text_config"]["query_pre_attn_scalar"] = 256
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArchitectureError, match="query_pre_attn_scalar"):
        export(run, root / "gemma-gguf")


def test_export_run_and_cli(root):
    from typer.testing import CliRunner

    from distiq.cli import app
    from distiq.export import export_run

    run = make_run(root, "smolvlm", Q4, name="smolvlm-cli")
    target = export_run(run, "gguf")
    assert target == run / "export" / "gguf"
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["verification"]["model"]["read_back_identical"]
    result = CliRunner().invoke(app, ["export", str(run), "--format", "gguf", "--out",
                                      str(root / "cli-gguf")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (root / "cli-gguf" / "mmproj.gguf").is_file()
