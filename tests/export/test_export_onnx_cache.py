"""The decoder's KV cache: a decoding step feeds one token and the cache (not the sequence), its
logits equal the whole sequence's, Qwen2-VL's 3-D positions equal Hugging Face's, and what the
export refuses."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from distiq.export import export_onnx
from distiq.export.onnx_inputs import mrope_positions
from distiq.export.ort import OrtVLM

HAS_GENAI = importlib.util.find_spec("onnxruntime_genai") is not None


@pytest.fixture(scope="module")
def float_exports(families, tmp_path_factory):
    """``get(family)`` -> (model, adapter, export folder) of the family's float model."""
    from distiq.models import load

    root = tmp_path_factory.mktemp("onnx-cache")
    cache = {}

    def get(family: str):
        if family not in cache:
            model, adapter = load(families.module.base_model(family, families.root))
            folder = export_onnx(model, root / family, adapter=adapter, precision="fp32")
            cache[family] = (model, adapter, folder.path)
        return cache[family]

    return get


def _sample(families, question):
    sample = families.module.family_models().vqa_samples(1)[0]
    return {**sample, "question": question}


SHORT = "how many circles?"
LONG = "what colour is the shape at the top left and how many red squares are there?"


@pytest.mark.parametrize("family", ["llava", "idefics3", "qwen2_vl"])
def test_decoding_feeds_one_token_whatever_the_prompt(float_exports, families, family):
    _, _, folder = float_exports(family)
    runner = OrtVLM(folder, threads=1)
    prompts = {}
    for question in (SHORT, LONG):
        sample = _sample(families, question)
        new, _ = runner.generate_ids(sample["image"], question, max_new_tokens=6)
        prompt = runner.inputs.prepare(sample["image"], question).input_ids.shape[1]
        prompts[question] = prompt
        steps = runner.steps
        assert len(new) >= 3 and len(steps) == len(new)  # the last token needs no decoder call
        assert (steps[0].tokens, steps[0].past) == (prompt, 0)  # the prompt, empty cache
        for index, step in enumerate(steps[1:]):
            assert (step.tokens, step.past) == (1, prompt + index)  # one token after the cache
        cached = new
        again, _ = runner.generate_ids(sample["image"], question, max_new_tokens=6, use_cache=False)
        assert again == cached
        assert [s.tokens for s in runner.steps] == [prompt + i for i in range(len(again))]
        assert all(s.past == 0 for s in runner.steps)  # no cache: the sequence every time
    assert prompts[LONG] > prompts[SHORT] + 5


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_cached_step_logits_equal_the_whole_sequence(float_exports, families, family):
    """Decoding with the cache gives, at every new position, the logits of running the whole
    sequence (Qwen2-VL: its positions continue after the image with the rope delta)."""
    model, adapter, folder = float_exports(family)
    runner = OrtVLM(folder, threads=1)
    sample = _sample(families, SHORT)
    prompt = runner.inputs.prepare(sample["image"], SHORT)
    features = runner.image_features(prompt.vision)
    logits, past = runner.decode(runner.embed(prompt.input_ids, features), prompt.position_ids)
    ids = prompt.input_ids[0].tolist()
    stepwise = []
    for _ in range(4):
        token = int(np.argmax(logits[0, -1]))
        ids.append(token)
        step = runner.embed(np.asarray([[token]]))
        logits, past = runner.decode(step, prompt.next_positions(len(ids) - 1), past)
        stepwise.append(logits[0, -1])
        assert past[0].shape[2] == len(ids)
    whole, _ = runner.decode(
        runner.embed(np.asarray([ids]), features), prompt.positions_until(len(ids))
    )
    np.testing.assert_allclose(np.stack(stepwise), whole[0, -4:], atol=1e-5, rtol=0)
    batch = adapter.build_inputs([sample], with_answers=False)  # and PyTorch agrees
    batch["input_ids"] = torch.tensor([ids])
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    if "mm_token_type_ids" in batch:
        batch["mm_token_type_ids"] = (batch["input_ids"] == adapter.image_token_id).int()
    with torch.no_grad():
        expected = model(**batch).logits[0, -4:].numpy()
    np.testing.assert_allclose(np.stack(stepwise), expected, atol=1e-5, rtol=0)


def test_mrope_positions_equal_hugging_faces(float_exports, families):
    model, adapter, _ = float_exports("qwen2_vl")
    samples = families.module.family_models().vqa_samples(1, size=48)
    batch = adapter.build_inputs(samples, with_answers=False)
    expected, delta = model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"]
    )
    got, got_delta = mrope_positions(
        batch["input_ids"][0].numpy(), batch["image_grid_thw"].numpy(), adapter.image_token_id,
        model.config.vision_config.spatial_merge_size,
    )  # fmt: skip
    np.testing.assert_array_equal(got, expected[:, 0].numpy())
    assert got_delta == int(delta[0]) and got_delta < 0  # image tokens share positions
    with pytest.raises(ValueError, match="image tokens but its grid"):
        mrope_positions(
            batch["input_ids"][0].numpy(), batch["image_grid_thw"].numpy() * 2,
            adapter.image_token_id, 2,
        )  # fmt: skip


def test_decoder_graph_takes_a_cache(float_exports):
    """The decoder's signature: one new token with a past of any length, presents one longer."""
    import onnxruntime as ort

    _, _, folder = float_exports("llava")
    session = ort.InferenceSession(str(folder / "language_model.onnx"))
    inputs = {i.name: i.shape for i in session.get_inputs()}
    assert inputs["inputs_embeds"] == ["batch", "sequence", 32]
    assert inputs["attention_mask"] == ["batch", "total_sequence"]
    assert inputs["past_key_values.1.value"] == ["batch", 2, "past_sequence", 16]
    outputs = {o.name: o.shape for o in session.get_outputs()}
    assert outputs["present.1.value"] == ["batch", 2, "total_sequence", 16]
    past = [np.random.default_rng(0).normal(size=(1, 2, 40, 16)).astype(np.float32)] * 4
    feed = {
        "inputs_embeds": np.zeros((1, 1, 32), np.float32),
        "attention_mask": np.ones((1, 41), np.int64),
        "position_ids": np.asarray([[40]], np.int64),
        **{f"past_key_values.{i}.{k}": past[0] for i in range(2) for k in ("key", "value")},
    }
    logits, *present = session.run(None, feed)
    assert logits.shape[:2] == (1, 1) and all(p.shape == (1, 2, 41, 16) for p in present)


# -- what the export refuses ----------------------------------------------------------------------
def test_other_families_and_sliding_windows_are_refused(families, tmp_path):
    from distiq.models import load

    model, adapter = load(families.module.base_model("qwen2_5_vl", families.root))
    with pytest.raises(ValueError, match="'qwen2_5_vl' model"):
        export_onnx(model, tmp_path / "x", adapter=adapter, precision="fp32")
    model, adapter = load(families.module.base_model("qwen2_vl", families.root))
    text = model.config.get_text_config()
    text.layer_types = ["sliding_attention"] * len(text.layer_types)
    model.model.language_model.config = text
    with pytest.raises(ValueError, match="sliding-window attention"):
        export_onnx(model, tmp_path / "x", adapter=adapter, precision="fp32")
    assert list(tmp_path.iterdir()) == []


def test_earlier_exports_and_padded_tiles_are_refused(float_exports, tmp_path):
    from distiq.export.onnx import read_onnx_manifest
    from distiq.export.onnx_inputs import ExportInputs

    _, _, folder = float_exports("llava")
    manifest = json.loads((folder / "manifest.json").read_text())
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(ValueError, match="earlier distiq .* export the model again"):
        read_onnx_manifest(old)
    pixels = np.zeros((1, 2, 3, 32, 32), np.float32)
    mask = torch.ones(1, 2, 32, 32, dtype=torch.bool)
    assert ExportInputs._tiles(pixels, mask).shape == (2, 3, 32, 32)
    mask[0, 1, 20:] = False
    with pytest.raises(ValueError, match="padded part of a tile"):
        ExportInputs._tiles(pixels, mask)


@pytest.mark.skipif(not HAS_GENAI, reason="onnxruntime-genai is not installed")
def test_genai_reads_the_tokenizer_of_a_bpe_model(families, tmp_path):
    """A byte-level BPE tokenizer (as real LLaVA / SmolVLM / Qwen checkpoints have) is copied
    next to genai_config.json, where onnxruntime_genai.Tokenizer reads it."""
    from unittest import mock

    import onnxruntime_genai as og
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import distiq.models

    def bpe(words, extra_special_tokens=()):
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        special = ["<pad>", "<s>", "</s>", "<unk>", "<image>", *extra_special_tokens]
        trainer = trainers.BpeTrainer(
            vocab_size=len(special) + 256 + 40, special_tokens=special, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )  # fmt: skip
        backend.train_from_iterator([" ".join(words)] * 8, trainer)
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
            pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
        )  # fmt: skip

    torch.manual_seed(0)
    with mock.patch.object(distiq.models, "build_word_tokenizer", bpe):
        model, tokenizer, processor = families.module.family_models().build_family("llava")
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    vlm, adapter = distiq.models.load(tmp_path / "base")
    folder = export_onnx(vlm, tmp_path / "onnx", adapter=adapter, precision="fp32").path
    genai_tokenizer = og.Tokenizer(og.Model(str(folder)))
    text = "how many red squares are there"
    assert (
        list(genai_tokenizer.encode(text)) == tokenizer(text, add_special_tokens=False)["input_ids"]
    )
    assert genai_tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
