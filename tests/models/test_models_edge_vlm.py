"""The built-in edge VLM: presets, tokenizer, save/load as a Hugging Face model, heads, describe."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from distiq.models import (
    EDGE_PRESETS,
    LlavaAdapter,
    VLMWithHeads,
    build_edge_vlm,
    build_word_tokenizer,
    describe,
    edge_vlm_config,
    load,
)
from distiq.models.edge_vlm import build_edge_processor, edge_llava_config, sincos_2d
from distiq.quant import PerGroup, QuantConfig, QuantSpec, quantize_


@pytest.fixture(scope="module")
def edge(words):
    return build_edge_vlm(words, "tiny", seed=0)


@pytest.fixture(scope="module")
def scene_samples(make_samples):
    return make_samples(4, size=64)


def test_tokenizer_maps_every_word_and_round_trips(words, tmp_path):
    from transformers import AutoTokenizer

    tok = build_word_tokenizer(words)
    ids = tok(" ".join(words), add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and len(set(ids)) == len(set(words))
    assert tok("red", add_special_tokens=True)["input_ids"][0] == tok.bos_token_id
    assert tok("PURPLE", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    assert tok.convert_tokens_to_ids("<image>") == 4 and tok.image_token == "<image>"
    assert tok("<image><image>red", add_special_tokens=False)["input_ids"][:2] == [4, 4]
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "<image> how many red squares are there? answer: 3"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    with pytest.raises(ValueError, match="at least one word"):
        build_word_tokenizer([])


def test_presets_sizes_and_validation(words):
    from transformers import LlavaForConditionalGeneration

    tok = build_word_tokenizer(words)
    counts = {}
    for name, config in EDGE_PRESETS.items():
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(edge_llava_config(config, tok))
        counts[name] = describe(model).total
    assert 0.5e6 < counts["tiny"] < 3e6  # "a few million at most" for 2 CPU cores
    assert counts["tiny"] < counts["small"] < counts["base"]
    assert edge_vlm_config("tiny", image_size=48).num_image_tokens == 36
    with pytest.raises(ValueError, match="multiple of patch_size"):
        edge_vlm_config("tiny", image_size=60)
    with pytest.raises(ValueError, match="did you mean 'tiny'"):
        edge_vlm_config("tiyn")
    with pytest.raises(ValueError, match="did you mean 'image_size'"):
        edge_vlm_config("tiny", image_sise=32)
    assert type(edge_vlm_config()).from_dict(edge_vlm_config().to_dict()) == edge_vlm_config()


def test_prompt_layout_and_labels(edge, scene_samples):
    _, adapter = edge
    batch = adapter.build_inputs(scene_samples[:1])
    tokens = adapter.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    n_image = edge_vlm_config().num_image_tokens
    question = ["how", "many", "red", "squares", "are", "there", "?"]
    assert tokens == ["<s>", *["<image>"] * n_image, *question, "answer", ":", "3", "</s>"]
    labels = batch["labels"][0]
    assert (labels[:-2] == -100).all() and labels[-2:].tolist() == batch["input_ids"][
        0, -2:
    ].tolist()


def test_save_load_through_the_llava_adapter(edge, scene_samples, tmp_path):
    model, adapter = edge
    model.eval()
    edge.save_pretrained(tmp_path)
    loaded_model, loaded_adapter = load(tmp_path, attn_implementation="eager")
    assert isinstance(loaded_adapter, LlavaAdapter)
    assert type(loaded_model).__name__ == "LlavaForConditionalGeneration"
    batch = adapter.build_inputs(scene_samples)
    assert all(
        torch.equal(v, loaded_adapter.build_inputs(scene_samples)[k]) for k, v in batch.items()
    )
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded_model(**batch).logits)
    assert adapter.generate_answers(model, scene_samples) == loaded_adapter.generate_answers(
        loaded_model, scene_samples
    )
    model.train()


def test_sincos_position_table():
    table = sincos_2d(4, 8)  # (16, 8): [sin, cos](row * w) | [sin, cos](col * w)
    assert table.shape == (16, 8)
    w = torch.tensor([1.0, 0.01], dtype=torch.float64)
    for index in range(16):
        row, col = divmod(index, 4)
        expected = torch.cat([(row * w).sin(), (row * w).cos(), (col * w).sin(), (col * w).cos()])
        torch.testing.assert_close(table[index], expected.float())
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(4, 6)


def test_heads_forward_backward_and_shapes(edge, scene_samples):
    """Contract shapes; the VQA path equals the plain model's; heads alone train the tower."""
    model, adapter = edge
    wrapped = VLMWithHeads(model, adapter, num_detection_classes=5, num_segmentation_classes=4)
    batch = adapter.build_inputs(scene_samples)
    out = wrapped(**batch)
    grid = edge_vlm_config().image_size // edge_vlm_config().patch_size
    det = out.detection
    assert det["cls_logits"].shape == (4, grid * grid, 5)
    assert det["box_ltrb"].shape == (4, grid * grid, 4) and (det["box_ltrb"] >= 0).all()
    assert det["points"].shape == (grid * grid, 2) and det["stride"] == 8
    assert det["points"][1].tolist() == [12.0, 4.0]  # row 0, column 1: x = 1.5 * 8, y = 0.5 * 8
    assert out.segmentation.shape == (4, 4, 64, 64)
    assert out.patch_features.shape == (4, grid * grid, 128)
    with torch.no_grad():
        reference = model(**batch)
    torch.testing.assert_close(out.logits, reference.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, reference.loss)

    model.zero_grad(set_to_none=True)
    heads_only = wrapped(pixel_values=batch["pixel_values"])
    assert heads_only.logits is None
    (
        heads_only.detection["cls_logits"].sigmoid().mean() + heads_only.segmentation.mean()
    ).backward()
    patch = model.model.vision_tower.embeddings.patch_embedding.weight
    assert patch.grad is not None and patch.grad.abs().sum() > 0
    assert model.lm_head.weight.grad is None
    model.zero_grad(set_to_none=True)


def test_heads_save_load_and_describe(edge, scene_samples, tmp_path):
    model, adapter = edge
    wrapped = VLMWithHeads(model, adapter, num_segmentation_classes=3)
    wrapped.eval()
    wrapped.save_pretrained(tmp_path)
    again = VLMWithHeads.from_pretrained(tmp_path, attn_implementation="eager")
    batch = adapter.build_inputs(scene_samples)
    with torch.no_grad():
        a, b = wrapped(**batch), again(**batch)
    assert torch.equal(a.segmentation, b.segmentation) and torch.equal(a.logits, b.logits)
    assert again.detection_head is None

    report = describe(wrapped)
    total = sum(p.numel() for p in wrapped.parameters())
    assert report.total == total == sum(report.params.values())
    heads = sum(p.numel() for p in wrapped.segmentation_head.parameters())
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    assert report.params["heads"] == heads and report.params["vision"] == vision
    assert report.params["lm_head"] == model.lm_head.weight.numel()
    table = report.table()
    assert "vision" in table and f"{total:,}" in table
    assert report.as_dict()["family"] == "llava"
    model.train()


def test_quant_configs_of_the_wrapped_model(edge, words):
    model, adapter = edge
    wrapped = VLMWithHeads(model, adapter, num_detection_classes=2, num_segmentation_classes=2)
    targets = wrapped.quant_targets()
    names = [n for n, m in wrapped.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    assert {n for n in names if targets["vision"].selects(n)} == {
        n for n in names if n.startswith("vlm.model.vision_tower.") and "embeddings" not in n
    }
    assert {n for n in names if targets["heads"].selects(n)} == {
        n for n in names if n.startswith(("detection_head.", "segmentation_head."))
    }
    student = copy.deepcopy(wrapped)
    heads = targets["heads"]
    report = quantize_(student, QuantConfig(weight=QuantSpec(bits=8), include=heads.include))
    assert {c.name for c in report.changes} == {n for n in names if heads.selects(n)}
    # NF4 on a 48-wide vision tower: every linear fed 48 features is too narrow for 64-blocks
    narrow_model, narrow_adapter = build_edge_vlm(
        words, "tiny", vision_hidden_size=48, vision_intermediate_size=128
    )
    nf4 = QuantSpec(bits=4, format="nf4", granularity=PerGroup(64))
    config = narrow_adapter.quant_config("vision", weight=nf4, model=narrow_model)
    excluded = set(config.exclude)
    for name, module in narrow_model.named_modules():
        if isinstance(module, nn.Linear) and narrow_adapter.quant_targets()["vision"].selects(name):
            assert (name in excluded) == (module.in_features == 48), name


def test_processor_resizes_without_cropping(words, make_scene):
    processor = build_edge_processor(words, edge_vlm_config())
    wide = make_scene(0, size=40).resize((80, 20))
    pixels = processor.image_processor(images=[wide], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 64, 64)


def test_import_edge_vlm_code_imports_without_computing():
    # The demo calls it before forking its workers, so that they inherit the model code.
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from distiq.models import import_edge_vlm_code\n"
        "before = torch.initial_seed(), torch.random.get_rng_state().clone()\n"
        "import_edge_vlm_code()\n"
        "assert 'transformers.models.llava.modeling_llava' in sys.modules\n"
        "assert 'transformers.models.clip.modeling_clip' in sys.modules\n"
        "assert 'transformers.models.llama.modeling_llama' in sys.modules\n"
        "assert torch.equal(before[1], torch.random.get_rng_state())  # nothing was drawn\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
