"""Tiny models of every supported family, built from config objects and saved to a temp dir.

Each family's directory is built once per session; tests load it through ``distiq.models.load``
exactly as a user loads a real checkpoint.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

WORDS = [
    *("how", "many", "red", "blue", "green", "squares", "circles", "are", "there", "what"),
    *("colour", "is", "the", "shape", "at", "top", "left", "right", "bottom", "yes", "no"),
    *("0", "1", "2", "3", "4", "user", "assistant", "en"),
]

QWEN_TOKENS = ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>"]
IDEFICS_TOKENS = [
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
]
GEMMA3_TOKENS = [
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
    "<start_of_turn>",
    "<end_of_turn>",
]
FAMILIES = [
    "llava",
    "llava_next",
    "idefics3",
    "smolvlm",
    "qwen2_vl",
    "qwen2_5_vl",
    "paligemma",
    "gemma3",
]

_TEXT_DEFAULTS = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def _ids(tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_family(name: str, **text_changes):
    """(model, tokenizer, image_processor) of a tiny ``name`` model with random weights;
    ``text_changes`` replace language-model config entries (e.g. ``hidden_size=48``)."""
    import transformers as tf

    _TEXT = {**_TEXT_DEFAULTS, **text_changes}

    from distiq.models import build_word_tokenizer

    if name in ("llava", "llava_next"):
        tok = build_word_tokenizer(WORDS)
        kwargs = dict(
            vision_config=dict(
                model_type="clip_vision_model", image_size=32, patch_size=8, **_VISION
            ),
            text_config=dict(
                model_type="llama",
                max_position_embeddings=256,
                num_key_value_heads=2,
                **_TEXT,
                **_ids(tok),
            ),
            image_token_index=tok.convert_tokens_to_ids("<image>"),
        )
        # llava-1.5's processing: shortest edge resized to the tower's size, then a centre crop
        size, crop = {"shortest_edge": 32}, {"height": 32, "width": 32}
        if name == "llava":
            processor = tf.CLIPImageProcessorPil(size=size, crop_size=crop, do_center_crop=True)
            return tf.LlavaForConditionalGeneration(tf.LlavaConfig(**kwargs)), tok, processor
        pinpoints = [[32, 64], [64, 32], [64, 64]]
        processor = tf.LlavaNextImageProcessorPil(
            size=size, crop_size=crop, image_grid_pinpoints=pinpoints
        )
        config = tf.LlavaNextConfig(image_grid_pinpoints=pinpoints, **kwargs)
        return tf.LlavaNextForConditionalGeneration(config), tok, processor
    if name in ("idefics3", "smolvlm"):
        tok = build_word_tokenizer(WORDS, extra_special_tokens=IDEFICS_TOKENS)
        kwargs = dict(
            vision_config=dict(image_size=32, patch_size=8, **_VISION),
            text_config=dict(
                model_type="llama",
                max_position_embeddings=256,
                num_key_value_heads=2,
                **_TEXT,
                **_ids(tok),
            ),
            image_token_id=tok.convert_tokens_to_ids("<image>"),
            scale_factor=2,
        )
        if name == "idefics3":  # with image splitting: 4 tiles + the global image
            model = tf.Idefics3ForConditionalGeneration(tf.Idefics3Config(**kwargs))
            processor = tf.Idefics3ImageProcessorPil(
                size={"longest_edge": 64},
                max_image_size={"longest_edge": 32},
                do_image_splitting=True,
            )
        else:
            model = tf.SmolVLMForConditionalGeneration(tf.SmolVLMConfig(**kwargs))
            processor = tf.SmolVLMImageProcessorPil(
                size={"longest_edge": 32},
                max_image_size={"longest_edge": 32},
                do_image_splitting=False,
            )
        return model, tok, processor
    if name in ("qwen2_vl", "qwen2_5_vl"):
        tok = build_word_tokenizer(WORDS, extra_special_tokens=QWEN_TOKENS)
        ids = tok.convert_tokens_to_ids
        text = dict(
            max_position_embeddings=128,
            num_key_value_heads=2,
            rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=10000.0),
            **_TEXT,
            **_ids(tok),
        )
        special = dict(
            image_token_id=ids("<|image_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"),
        )
        if name == "qwen2_vl":
            vision = dict(
                depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=8
            )
            model = tf.Qwen2VLForConditionalGeneration(
                tf.Qwen2VLConfig(vision_config=vision, text_config=text, **special)
            )
        else:
            vision = dict(
                depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=2,
                patch_size=8, window_size=32, fullatt_block_indexes=[1],
            )  # fmt: skip
            model = tf.Qwen2_5_VLForConditionalGeneration(
                tf.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **special)
            )
        processor = tf.Qwen2VLImageProcessorPil(
            min_pixels=32 * 32,
            max_pixels=48 * 48,
            patch_size=8,
            merge_size=2,
            temporal_patch_size=2,
        )
        return model, tok, processor
    if name == "paligemma":
        tok = build_word_tokenizer(WORDS)
        config = tf.PaliGemmaConfig(
            vision_config=dict(
                model_type="siglip_vision_model",
                image_size=32,
                patch_size=8,
                vision_use_head=False,
                **_VISION,
            ),
            text_config=dict(
                model_type="gemma",
                max_position_embeddings=128,
                num_key_value_heads=1,
                head_dim=16,
                **_TEXT,
                **_ids(tok),
            ),
            image_token_id=tok.convert_tokens_to_ids("<image>"),
            projection_dim=32,
        )
        processor = tf.SiglipImageProcessorPil(size={"height": 32, "width": 32})
        return tf.PaliGemmaForConditionalGeneration(config), tok, processor
    if name == "gemma3":
        tok = build_word_tokenizer(WORDS, extra_special_tokens=GEMMA3_TOKENS)
        ids = tok.convert_tokens_to_ids
        config = tf.Gemma3Config(
            vision_config=dict(
                model_type="siglip_vision_model",
                image_size=32,
                patch_size=8,
                vision_use_head=False,
                **_VISION,
            ),
            text_config=dict(
                model_type="gemma3_text",
                max_position_embeddings=256,
                num_key_value_heads=1,
                head_dim=16,
                sliding_window=64,
                **_TEXT,
                **_ids(tok),
            ),
            mm_tokens_per_image=4,
            image_token_index=ids("<image_soft_token>"),
            boi_token_index=ids("<start_of_image>"),
            eoi_token_index=ids("<end_of_image>"),
        )
        model = tf.Gemma3ForConditionalGeneration(config)
        with torch.no_grad():  # zero-initialised: a random Gemma 3 would ignore the image
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.5)
        processor = tf.Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
        return model, tok, processor
    raise ValueError(name)


def scene(seed: int, size: int = 40) -> Image.Image:
    """A random scene: a background and a few filled squares and circles."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 80, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = (int(v) for v in rng.integers(0, size - 10, 2))
        colour = tuple(int(v) for v in rng.integers(100, 256, 3))
        if rng.random() < 0.5:
            draw.rectangle([x, y, x + 9, y + 9], fill=colour)
        else:
            draw.ellipse([x, y, x + 9, y + 9], fill=colour)
    return image


def vqa_samples(n: int = 3, size: int = 40) -> list[dict]:
    questions = [
        "how many red squares are there?",
        "what colour is the shape?",
        "how many circles?",
    ]
    answers = ["3", "blue", "2"]
    return [
        {
            "image": scene(i, size),
            "question": questions[i % 3],
            "answer": answers[i % 3],
            "answers": [answers[i % 3]] * 10,
            "question_type": "how many",
            "question_id": i,
            "image_id": i,
        }
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """``{family: directory}``, each built and saved on first use."""
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            torch.manual_seed(0)
            model, tok, processor = build_family(name)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            tok.save_pretrained(path)
            processor.save_pretrained(path)
            cache[name] = path
        return cache[name]

    return get


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from a second thread, and on a busy machine two spinning
    threads make them up to 10x slower; restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_generate_tests(metafunc):
    """Any test in tests/models taking ``family`` runs once per supported family."""
    if "family" in metafunc.fixturenames:
        metafunc.parametrize("family", FAMILIES)


@pytest.fixture(scope="session")
def make_samples():
    """``make_samples(n=3, size=40)`` -> VQA sample dicts (contracts.md) on random scenes."""
    return vqa_samples


@pytest.fixture(scope="session")
def make_scene():
    """``make_scene(seed, size=40)`` -> an RGB PIL scene."""
    return scene


@pytest.fixture(scope="session")
def words():
    return list(WORDS)
