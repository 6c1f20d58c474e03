"""Bad input gets a clear message: directories, architectures, images, prompts, samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from distiq.models import (
    UnsupportedModelError,
    VLMAdapter,
    adapter_class,
    load,
    register_adapter,
    supported_model_types,
    to_rgb,
)


@pytest.fixture(scope="module")
def llava(family_dirs):
    return load(family_dirs("llava"))


def test_supported_families_are_registered():
    assert {"llava", "idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl", "paligemma"} <= set(
        supported_model_types()
    )


def test_missing_directory_and_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load(tmp_path / "nope")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load(tmp_path)


def test_unsupported_architecture_lists_supported_and_how_to_add(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llava_onevision", "architectures": ["LlavaOnevisionModel"]})
    )
    with pytest.raises(UnsupportedModelError) as error:
        load(tmp_path)
    message = str(error.value)
    assert "'llava_onevision' (LlavaOnevisionModel)" in message and "did you mean 'llava" in message
    assert "qwen2_vl" in message and "register_adapter" in message


def test_architecture_name_finds_the_adapter_and_custom_adapters_register():
    class Config:
        model_type = "my_llava_fork"
        architectures = ("LlavaForConditionalGeneration",)

    assert adapter_class(Config()).family == "llava"

    @register_adapter
    class ToyAdapter(VLMAdapter):
        family = "toy"
        model_types = ("distiq_test_toy",)
        vision_module, projector_module, language_module = "v", "p", "l"

    class ToyConfig:
        model_type = "distiq_test_toy"

    assert adapter_class(ToyConfig()) is ToyAdapter
    with pytest.raises(TypeError, match="VLMAdapter subclass"):
        register_adapter(object)


def test_images_are_converted_to_rgb():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # composited over white
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)
    assert to_rgb(Image.new("L", (4, 4), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(Image.new("1", (4, 4), 1)).mode == "RGB"
    with pytest.raises(TypeError, match=r"PIL\.Image\.fromarray"):
        to_rgb(np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="empty"):
        to_rgb(Image.new("RGB", (0, 4)))


def test_rgba_grayscale_and_odd_sizes_go_through_the_model(llava, make_samples):
    model, adapter = llava
    base = make_samples(1)[0]
    rgb = base["image"]
    rgba = rgb.convert("RGBA")
    gray = rgb.convert("L")
    odd = rgb.resize((57, 23))
    batch = adapter.build_inputs([dict(base, image=im) for im in (rgb, rgba, gray, odd)])
    size = model.config.vision_config.image_size
    assert batch["pixel_values"].shape == (4, 3, size, size)
    assert torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])  # opaque RGBA == RGB
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_prompt_longer_than_the_context_is_a_clear_error(llava, make_samples):
    _, adapter = llava
    sample = dict(make_samples(1)[0], question=" ".join(["how many"] * 140))
    with pytest.raises(ValueError, match="exceed the model's context of 256 tokens"):
        adapter.build_inputs([sample])
    short = make_samples(1)
    n = adapter.build_inputs(short, with_answers=False)["input_ids"].shape[1]
    with pytest.raises(ValueError, match="new tokens"):
        adapter.build_inputs(short, with_answers=False, reserve=256 - n + 1)


def test_bad_samples(llava, make_samples):
    _, adapter = llava
    sample = make_samples(1)[0]
    without_answer = {k: v for k, v in sample.items() if k != "answer"}
    with pytest.raises(KeyError, match="'answer'"):
        adapter.build_inputs([without_answer])
    assert adapter.build_inputs([without_answer], with_answers=False)["input_ids"].shape[0] == 1
    with pytest.raises(TypeError, match="'question' must be str"):
        adapter.build_inputs([dict(sample, question=3)])
    with pytest.raises(TypeError, match="must be a dict"):
        adapter.build_inputs([("image", "question")])
    with pytest.raises(ValueError, match="at least one sample"):
        adapter.build_inputs([])


def test_prompt_template_override(family_dirs, make_samples):
    _, adapter = load(family_dirs("llava"), prompt_template="{image} question: {question} answer:")
    prompt = adapter.format_prompt("how many?")
    assert prompt == "<image> question: how many? answer:"
    with pytest.raises(ValueError, match="exactly once"):
        load(family_dirs("llava"), prompt_template="{question} answer:").adapter.format_prompt("x")
