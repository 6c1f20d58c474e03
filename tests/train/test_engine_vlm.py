"""The engine's forward paths on the built-in VLM: image-grouped data, the shared-prefix forward,
greedy decoding and the VQA evaluation, each checked against the plain Hugging Face path
(``adapter.build_inputs``, ``model(...)``, ``adapter.generate_answers``) — which is the generic
path, so the two paths are checked against each other too."""

from __future__ import annotations

import pytest
import torch

from distiq.data import generate_scenes
from distiq.models import VLMWithHeads, build_edge_vlm
from distiq.tasks.vqa import vqa_accuracy
from distiq.train.engines import GenericEngine, SharedPrefixEngine, engine_class, evaluate_vqa
from distiq.train.prefix_engine import tokenize_questions
from distiq.train.vqa_data import load_scene_split


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return generate_scenes(tmp_path_factory.mktemp("scenes"), count=30, image_size=32, workers=1)


@pytest.fixture(scope="module")
def model_and_data(scenes, toys):
    import json

    words = json.loads(scenes.meta.read_text())["vocabulary"]
    vlm, adapter = build_edge_vlm(words, "tiny", seed=3, **toys.TINY_EDGE_VLM)
    train = load_scene_split(scenes.root, "train", adapter)
    model = VLMWithHeads(
        vlm,
        adapter,
        num_detection_classes=train.num_detection_classes,
        num_segmentation_classes=train.num_segmentation_classes,
    ).eval()
    with torch.no_grad():  # larger logits than the initialisation's, so argmaxes are clear
        vlm.lm_head.weight.mul_(20.0)
    return model, adapter, train


def _samples(dataset, items):
    out = []
    for item in items:
        for row in item["rows"]:
            record = dataset.questions[row]
            out.append({"image": item["image"], **record})
    return out


def test_the_built_in_vlm_takes_the_shared_prefix_path(model_and_data):
    _, adapter, train = model_and_data
    assert engine_class(adapter) is SharedPrefixEngine and train.path is SharedPrefixEngine


def test_the_generic_path_gives_the_prefix_paths_answers_and_scores(model_and_data):
    """The same model on the generic path (one sequence per question, the model's own forward
    and generate): the answer logits and the evaluation equal the shared-prefix path's."""
    model, adapter, train = model_and_data
    subset = train.subset(range(5))
    generic = subset.for_adapter(adapter)
    assert generic is subset  # the same processing: the dataset itself
    view = __import__("copy").copy(subset)
    view.path = GenericEngine
    items = [subset[i] for i in range(len(subset))]
    prefix_engine, generic_engine = (
        SharedPrefixEngine(model, adapter),
        GenericEngine(model, adapter),
    )
    with torch.no_grad():
        fast = prefix_engine(subset.collate(items), heads=False)
        slow = generic_engine(view.collate(items))
    from distiq.train.teacher_outputs import answer_logits

    for a, b in zip(
        answer_logits(fast.logits, fast.labels), answer_logits(slow.logits, slow.labels)
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert evaluate_vqa(prefix_engine, subset) == evaluate_vqa(generic_engine, view)


def test_tokens_match_build_inputs(model_and_data):
    _, adapter, train = model_and_data
    items = [train[i] for i in range(3)]
    samples = _samples(train, items)
    reference = adapter.build_inputs(samples)
    batch = train.collate(items)
    prefix = batch["prefix_ids"]
    assert int(batch["image_positions"].sum()) == 16  # (32 / 8)^2 image tokens
    for q in range(len(samples)):
        length = int(batch["suffix_mask"][q].sum())
        ids = torch.cat([prefix, batch["suffix_ids"][q, :length]])
        ref_length = int(reference["attention_mask"][q].sum())
        assert torch.equal(ids, reference["input_ids"][q, :ref_length])
        labels = torch.cat([torch.full_like(prefix, -100), batch["labels"][q, :length]])
        assert torch.equal(labels, reference["labels"][q, :ref_length])


def test_pixel_values_match_the_image_processor(model_and_data):
    _, adapter, train = model_and_data
    items = [train[i] for i in range(4)]
    fast = SharedPrefixEngine.pixel_values(train, [item["image"] for item in items])
    slow, _ = adapter.image_inputs([item["image"] for item in items])
    torch.testing.assert_close(fast, slow["pixel_values"], atol=1e-6, rtol=0)


def test_tokenize_questions_rejects_empty(model_and_data):
    _, adapter, _ = model_and_data
    with pytest.raises(ValueError, match="empty"):
        tokenize_questions(adapter, [], None)


def test_shared_prefix_forward_equals_full_forward(model_and_data):
    model, adapter, train = model_and_data
    items = [train[i] for i in range(4)]
    samples = _samples(train, items)
    engine = SharedPrefixEngine(model, adapter).eval()
    batch = train.collate(items)
    with torch.no_grad():
        out = engine(batch)
        reference = model.vlm(**adapter.build_inputs(samples)).logits
    prefix = batch["prefix_ids"].shape[0]
    for q in range(len(samples)):
        length = int(batch["suffix_mask"][q].sum())
        torch.testing.assert_close(
            out.logits[q, :length], reference[q, prefix : prefix + length], atol=1e-5, rtol=1e-5
        )
    # The heads ran once per image on the same patch features as VLMWithHeads' forward.
    with torch.no_grad():
        full = model(batch["pixel_values"])
    torch.testing.assert_close(out.segmentation, full.segmentation)
    torch.testing.assert_close(out.detection["cls_logits"], full.detection["cls_logits"])


def test_shared_prefix_forward_gradients_match(model_and_data):
    """The loss and every parameter gradient equal those of the plain forward."""
    from distiq.tasks.vqa import answer_token_loss

    model, adapter, train = model_and_data
    items = [train[i] for i in range(3)]
    samples = _samples(train, items)
    engine = SharedPrefixEngine(model, adapter).train()
    batch = train.collate(items)
    model.zero_grad()
    loss = answer_token_loss(engine(batch, heads=False).logits, batch["labels"])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.vlm.named_parameters() if p.grad is not None}
    model.zero_grad()
    inputs = adapter.build_inputs(samples)
    reference = answer_token_loss(model.vlm(**inputs).logits, inputs["labels"])
    reference.backward()
    torch.testing.assert_close(loss, reference, atol=1e-6, rtol=1e-5)
    for name, param in model.vlm.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name], param.grad, atol=1e-6, rtol=1e-4)
    model.zero_grad()
    model.eval()


def test_greedy_answers_equal_generate(model_and_data):
    model, adapter, train = model_and_data
    items = [train[i] for i in range(5)]
    samples = _samples(train, items)
    engine = SharedPrefixEngine(model, adapter)
    answers = engine.answers(train.generation_collate(items))
    reference = adapter.generate_answers(model.vlm, samples, max_new_tokens=4)
    assert answers == reference
    assert len(set(answers)) > 1  # not a degenerate constant answer


def test_evaluate_vqa_scores_the_generated_answers(model_and_data):
    model, adapter, train = model_and_data
    subset = train.subset(range(6))
    engine = SharedPrefixEngine(model, adapter)
    metrics = evaluate_vqa(engine, subset, batch_images=4)
    items = [subset[i] for i in range(len(subset))]
    answers = engine.answers(subset.generation_collate(items))
    records = [subset.questions[r] for item in items for r in item["rows"]]
    expected = sum(vqa_accuracy(a, r["answers"]) for a, r in zip(answers, records)) / len(records)
    assert metrics["vqa_accuracy"] == pytest.approx(expected)
    assert metrics["num_questions"] == len(records)
    types = {r["question_type"] for r in records}
    assert {k.split("/")[-1] for k in metrics if "/question_type/" in k} == types


def _sharded_eval_job(recipe, *, overwrite, resume, on_step, on_eval, data=None):
    """In each forked process of run_distributed: join the group, evaluate sharded; rank 0
    also evaluates everything alone and writes both."""
    import json
    from pathlib import Path

    from distiq.train.config import TrainConfig
    from distiq.train.distributed import setup_distributed

    engine, dataset, out = recipe
    ctx = setup_distributed(TrainConfig(steps=1, batch_size=2))
    sharded = evaluate_vqa(engine, dataset, batch_images=4, shard=True)
    if ctx.rank == 0:
        whole = evaluate_vqa(engine, dataset, batch_images=4)
        record = {"world": ctx.world_size, "sharded": sharded, "whole": whole}
        Path(out).write_text(json.dumps(record))


def test_sharded_evaluation_equals_the_whole(model_and_data, tmp_path):
    # Data-parallel (the demo teacher's test evaluation): each of 2 processes answers every
    # second image; the gathered metrics are those of one process answering all.
    import json
    import multiprocessing

    from distiq.demo.jobs import Job, run_distributed

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork")
    model, adapter, train = model_and_data
    out = tmp_path / "metrics.json"
    subset = train.subset(range(9))
    job = Job(
        "eval", _sharded_eval_job, (SharedPrefixEngine(model, adapter), subset, str(out)), "run"
    )
    run_distributed(job, world_size=2)
    record = json.loads(out.read_text())
    assert record["world"] == 2
    assert record["sharded"] == pytest.approx(record["whole"], rel=1e-12)
    assert record["sharded"]["num_questions"] == subset.question_count()


def test_limit_questions_is_fixed_and_bounded(model_and_data):
    _, _, train = model_and_data
    limited = train.limit_questions(10)
    assert 10 <= limited.question_count() < 10 + 4
    assert limited.images == train.limit_questions(10).images
    assert train.limit_questions(None) is train


def test_batch_keeps_detection_and_masks(model_and_data):
    _, _, train = model_and_data
    batch = train.collate([train[0], train[1]])
    assert batch["mask"].shape == (2, 32, 32)
    assert batch["mask"].max() < train.num_segmentation_classes
    assert len(batch["boxes"]) == 2 and batch["boxes"][0].shape[1] == 4
    assert batch["question_image"].tolist() == [0] * len(train.rows[0]) + [1] * len(train.rows[1])


def test_boxes_and_masks_follow_the_model_resolution(scenes, toys):
    """Heads see the model's input pixels: a 16 px model on 32 px scenes gets halved boxes and
    nearest-resized masks."""
    import json

    words = json.loads(scenes.meta.read_text())["vocabulary"]
    _, adapter = build_edge_vlm(words, "tiny", **{**toys.TINY_EDGE_VLM, "image_size": 16})
    small = load_scene_split(scenes.root, "train", adapter)
    full = load_scene_split(
        scenes.root, "train", build_edge_vlm(words, "tiny", **toys.TINY_EDGE_VLM)[1]
    )
    item, reference = small[0], full[0]
    torch.testing.assert_close(item["boxes"], reference["boxes"] / 2)
    assert item["mask"].shape == (16, 16)
    assert torch.equal(item["mask"], reference["mask"][1::2, 1::2])  # nearest: pixel centres
    batch = small.collate([item])
    assert batch["pixel_values"].shape[-2:] == (16, 16)


def test_cached_items_give_the_same_batches(scenes, toys):
    """cache_images keeps resized images and masks in memory: the first (filling) and the second
    (cached) read collate to the uncached batch (pixels within the processor's float rounding),
    on a model at another resolution than the files (16 px on 32 px scenes)."""
    import json

    words = json.loads(scenes.meta.read_text())["vocabulary"]
    _, adapter = build_edge_vlm(words, "tiny", **{**toys.TINY_EDGE_VLM, "image_size": 16})
    plain = load_scene_split(scenes.root, "train", adapter)
    cached = load_scene_split(scenes.root, "train", adapter).cache_images()
    reference = plain.collate([plain[i] for i in range(3)])
    for _ in range(2):  # filling the cache, then reading from it
        batch = cached.collate([cached[i] for i in range(3)])
        torch.testing.assert_close(
            batch["pixel_values"], reference["pixel_values"], atol=1e-5, rtol=0
        )
        assert torch.equal(batch["mask"], reference["mask"])
        for got, want in zip(batch["boxes"], reference["boxes"]):
            torch.testing.assert_close(got, want)
        assert torch.equal(batch["suffix_ids"], reference["suffix_ids"])
    assert len(cached._cache) == 3
    assert cached[0]["image"].size == (16, 16)  # stored at the model's resolution
    assert cached.subset([0])._cache is cached._cache  # views share it
