"""Where models and data come from: a student checkpoint of another size, a teacher with other
processing, a cached teacher, a ``datasets`` folder, models and samples held in memory
(``distiq.compress``), and any model directory scored by ``evaluate`` — each through the engine
on tiny checkpoints (tests/models/conftest.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from distiq.results import read_records
from distiq.train import read_metrics
from distiq.train.methods import compress, evaluate
from distiq.train.recipe import recipe_from_dict


def _load(file: str, name: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(file))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


vqa_files = _load("vqa_files.py", "distiq_train_test_vqa_files")
TRAIN = {"steps": 2, "batch_size": 4, "lr": 1.0e-3, "warmup_steps": 1, "log_every": 1}
KD = {"terms": {"task": {}, "kd": {"temperature": 2.0}}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {
        "root": root,
        "data": vqa_files.write_splits(root / "vqa"),
        "llava": vqa_files.save_family("llava", root / "llava"),
    }


def _recipe(world, name: str, **changes) -> dict:
    return {
        "teacher": str(world["llava"]),
        "output": str(world["root"] / "runs" / name),
        "data": {**world["data"], "val_questions": 4, "test_questions": 6},
        "train": TRAIN,
        "calibration": {"samples": 4, "batch_size": 4},
        "eval": {"max_new_tokens": 3, "batch_images": 4},
        **changes,
    }


def test_a_student_checkpoint_of_another_width_distils_through_projections(world):
    """A narrower, shallower LLaVA student (hidden 48 vs 32, one layer) learns from the
    teacher's logits and, through a learned projection, from its hidden states."""
    student = vqa_files.save_family(
        "llava", world["root"] / "student", hidden_size=48, num_hidden_layers=1
    )
    objective = {
        "terms": {
            "task": {},
            "kd": {"temperature": 2.0},
            "feat": {
                "weight": 0.1,
                "student_layers": ["model.language_model.layers.0"],
                "teacher_layers": ["model.language_model.layers.1"],
            },
        }
    }
    recipe = recipe_from_dict(
        _recipe(
            world,
            "kd-checkpoint",
            method="kd",
            student={"init": "checkpoint", "path": str(student)},
            objective=objective,
        )
    )
    run = compress(recipe)
    (record,) = read_records(run / "results.json")
    config = json.loads((run / "config.json").read_text())["text_config"]
    assert (config["hidden_size"], config["num_hidden_layers"]) == (48, 1)
    lines = [line for line in read_metrics(run / "metrics.jsonl") if line["kind"] == "train"]
    assert set(lines[-1]["terms"]) == {"task", "kd", "feat"}
    assert all(torch.isfinite(torch.tensor(v)) for v in lines[-1]["terms"].values())
    assert record.params != read_records(run / "results.json")[0].extra.get("teacher_params", 0)


def test_a_student_with_another_tokenizer_is_refused_before_training(world):
    other = vqa_files.save_family("qwen2_vl", world["root"] / "qwen")  # its own special tokens
    recipe = recipe_from_dict(
        _recipe(
            world,
            "kd-qwen",
            method="kd",
            student={"init": "checkpoint", "path": str(other)},
            objective=KD,
        )
    )
    with pytest.raises(ValueError, match="another tokenizer than the teacher"):
        compress(recipe)


def test_a_teacher_with_other_processing_is_aligned_at_the_answers(world):
    """A LLaVA-NeXT student (tiles, its own token count) of the LLaVA teacher: the teacher runs
    on its own batches of the same questions and is compared at the answer tokens."""
    from distiq.models import load
    from distiq.train.data_setup import samples_split
    from distiq.train.student import TeacherSide
    from distiq.train.teacher_outputs import answer_logits, processing_view

    student_dir = vqa_files.save_family("llava_next", world["root"] / "next")
    recipe = recipe_from_dict(
        _recipe(
            world,
            "kd-next",
            method="qad",
            quantization={"scheme": "W4A8"},
            student={"init": "checkpoint", "path": str(student_dir)},
            objective=KD,
        )
    )
    run = compress(recipe)
    lines = [line for line in read_metrics(run / "metrics.jsonl") if line["kind"] == "train"]
    assert set(lines[-1]["terms"]) == {"task", "kd"}
    # the alignment itself: the teacher's answer logits on its own batch land at the student's
    # answer positions unchanged
    from distiq.train.engines import GenericEngine

    teacher, teacher_adapter = load(world["llava"], attn_implementation="eager")
    _, student_adapter = load(student_dir)
    data = samples_split(vqa_files.family_models().vqa_samples(3), student_adapter)
    items = [data[i] for i in range(len(data))]
    batch = data.collate(items)
    view = processing_view(data, teacher_adapter)
    side = TeacherSide(
        engine=GenericEngine(teacher, teacher_adapter),
        collate=lambda chosen: GenericEngine.collate(view, chosen),
    )
    placed = side.outputs(batch)["teacher_logits"]
    assert placed.shape[:2] == batch["labels"].shape
    own = GenericEngine(teacher, teacher_adapter)(GenericEngine.collate(view, items))
    for got, want in zip(
        answer_logits(placed, batch["labels"]), answer_logits(own.logits, own.labels)
    ):
        assert torch.equal(got, want)


def test_a_cached_teacher_runs_once_and_gives_the_live_teachers_loss(world):
    """teacher.cache: the teacher runs once over the images the run visits; a second run
    reuses the cache; with every class kept (top_k = vocabulary) the kd term equals the live
    teacher's (where the teacher has no rest mass, the top-k KL's gradient stays finite)."""
    from distiq.models import load

    vocab = load(world["llava"]).model.config.text_config.vocab_size
    cache = world["root"] / "cache"
    quant = {"weight": {"bits": 4}}
    objective = {"terms": {"task": {}, "kd": {"temperature": 2.0}}}
    live = compress(recipe_from_dict(_recipe(world, "qad-live", method="qad",
                                             quantization=quant, objective=objective)))  # fmt: skip
    teacher = {"path": str(world["llava"]), "cache": {"path": str(cache), "top_k": vocab}}
    cached = compress(recipe_from_dict(_recipe(world, "qad-cached", method="qad", teacher=teacher,
                                               quantization=quant, objective=objective)))  # fmt: skip
    index = cache / "index.json"
    assert index.is_file() and json.loads(index.read_text())["complete"]
    stamp = index.stat().st_mtime_ns

    def kd(run):
        return [
            line["terms"]["kd"]
            for line in read_metrics(run / "metrics.jsonl")
            if line["kind"] == "train"
        ]

    # equal but for the teacher's float32 probabilities summing to 1 only within ~1e-7, which
    # the top-k KL keeps as a "rest" bucket (weighted by log ratios of up to ~80 nats)
    assert kd(cached) == pytest.approx(kd(live), rel=1e-2, abs=3e-5)
    again = compress(recipe_from_dict(_recipe(world, "qad-cached-2", method="qad", teacher=teacher,
                                              quantization=quant, objective=objective)))  # fmt: skip
    assert index.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert kd(again) == kd(cached)


def test_a_datasets_folder_with_bad_rows(world, tmp_path):
    datasets = pytest.importorskip("datasets")
    samples = vqa_files.family_models().vqa_samples(8)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answers": datasets.Sequence(datasets.Value("string")),
        }
    )

    def table(rows):
        return datasets.Dataset.from_dict(
            {
                "image": [s["image"] for s in rows],
                "question": [s["question"] for s in rows],
                "answers": [s["answers"] for s in rows],
            },
            features=features,
        )

    bad = dict(samples[0], question="")
    folder = tmp_path / "hf"
    datasets.DatasetDict(
        {"train": table(samples), "val": table(samples[:3]), "test": table([bad, *samples[3:]])}
    ).save_to_disk(str(folder))
    recipe = _recipe(world, "rtn-hf", method="rtn", quantization={"scheme": "W4A8"})
    recipe["data"] = {"hf": {"path": str(folder)}, "val_questions": 3}
    from distiq.data.records import BadRecordError

    with pytest.raises(BadRecordError, match="row 0.*empty or missing question"):
        compress(recipe_from_dict(recipe))
    recipe["data"]["on_bad_record"] = "skip"
    run = compress(recipe_from_dict(recipe), overwrite=True)
    (record,) = read_records(run / "results.json")
    assert record.extra["num_questions"] == 5  # 6 test rows, the bad one skipped


def test_compress_models_and_samples_held_in_memory(world):
    import distiq
    from distiq.models import load

    loaded = load(vqa_files.save_family("qwen2_vl", world["root"] / "qwen-mem"))
    samples = vqa_files.family_models().vqa_samples(6)
    result = distiq.compress(
        model=loaded,
        data={"train": samples, "val": samples[:2], "test": samples[2:]},
        recipe={
            "method": "qat",
            "quantization": {"scheme": "W4A8"},
            "train": {**TRAIN, "batch_size": 2},
            "calibration": {"samples": 2, "batch_size": 2},
            "eval": {"max_new_tokens": 2},
        },
    )
    assert result.run_dir is None  # a temporary run directory, gone
    (record,) = result.records
    assert record.method == "qat" and record.extra["num_questions"] == 4
    batch = loaded.adapter.build_inputs(samples[:2])
    with torch.no_grad():
        assert torch.isfinite(result.model(**batch).logits).all()
    with pytest.raises(ValueError, match="without its processing: pass processor="):
        distiq.compress(model=loaded.model, data={"train": samples, "val": samples, "test": samples},
                        recipe={"method": "rtn"})  # fmt: skip


def test_evaluate_scores_a_model_directory_without_writing_into_it(world, tmp_path):
    recipe_file = tmp_path / "data.yaml"
    import yaml

    recipe_file.write_text(
        yaml.safe_dump(_recipe(world, "unused", method="rtn", quantization={"scheme": "W4A8"}))
    )
    before = sorted(p.name for p in Path(world["llava"]).iterdir())
    (record,) = evaluate(world["llava"], recipe=recipe_file)
    assert record.method == "teacher" and record.retention == 1.0
    assert sorted(p.name for p in Path(world["llava"]).iterdir()) == before
    out = tmp_path / "scores"
    evaluate(world["llava"], recipe=recipe_file, out=out)
    assert read_records(out / "results.json")[0].value == record.value
    with pytest.raises(ValueError, match="holds no recipe.yaml"):
        evaluate(world["llava"])


def test_output_may_not_be_the_teacher_and_a_stopped_run_reruns(world):
    from distiq.train.methods import check_recipe

    recipe = recipe_from_dict(
        _recipe(
            world, "x", method="rtn", quantization={"scheme": "W4A8"}, output=str(world["llava"])
        )
    )
    with pytest.raises(ValueError, match="is or contains the teacher"):
        check_recipe(recipe, overwrite=True)
    # a run that stopped before its first checkpoint holds nothing to lose: it simply reruns
    run = world["root"] / "runs" / "stopped"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text("method: rtn\n")
    (run / "metrics.jsonl").write_text("")
    recipe = recipe_from_dict(
        _recipe(world, "stopped", method="rtn", quantization={"scheme": "W4A8"})
    )
    assert compress(recipe) == run
    assert read_records(run / "results.json")


def test_a_changed_weight_file_is_named_by_eval_and_export(world):
    """Flipped bits in a run's weights: eval and export refuse it, naming the file, instead of
    reporting another accuracy or an "identical" export."""
    from distiq.export import export_run
    from distiq.integrity import IntegrityError

    run = compress(recipe_from_dict(_recipe(world, "rtn-bits", method="rtn",
                                            quantization={"scheme": "W4A8"})))  # fmt: skip
    weights = run / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10
    weights.write_bytes(bytes(data))
    before = (run / "results.json").read_text()
    with pytest.raises(IntegrityError, match="model.safetensors changed since the run wrote it"):
        evaluate(run)
    with pytest.raises(IntegrityError, match="model.safetensors changed"):
        export_run(run, "packed")
    assert (run / "results.json").read_text() == before


def test_a_full_disk_at_the_final_save_leaves_no_config_without_weights(world, monkeypatch):
    import errno

    from safetensors import torch as safetensors_torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_torch, "save_file", full)
    run = world["root"] / "runs" / "full-disk"
    with pytest.raises(OSError, match="could not save the model.*No space left") as info:
        compress(recipe_from_dict(_recipe(world, "full-disk", method="rtn",
                                          quantization={"scheme": "W4A8"})))  # fmt: skip
    assert info.value.errno == errno.ENOSPC
    assert not (run / "config.json").exists() and not (run / "model.safetensors").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".saving-")]


def test_mixed_precision_fits_the_budget_and_estimates_the_packed_size(world):
    """quantization.budget: every part's width is chosen on calibration batches so that the
    packed model fits; the size estimate is the packed checkpoint's (weights, scales, float
    leftovers); an impossible budget is an error naming the smallest size there is."""
    from distiq.export import load_run, save_packed

    base = {"weight": {"bits": 4, "scale_dtype": "float16"}}
    sizes = {}
    for bits in (2, 8):
        run = compress(recipe_from_dict(_recipe(
            world, f"rtn-{bits}", method="rtn",
            quantization={"weight": {"bits": bits, "scale_dtype": "float16"}},
        )))  # fmt: skip
        loaded = load_run(run)
        sizes[bits] = save_packed(
            loaded.model, world["root"] / f"packed-{bits}", adapter=loaded.adapter
        )
    # weights, scales, zero-points and float leftovers (the manifest and header aside)
    low, high = ((sizes[b].total_bytes - sizes[b].header_bytes) / 2**20 for b in (2, 8))
    budget = (low + high) / 2
    run = compress(recipe_from_dict(_recipe(
        world, "rtn-budget", method="rtn",
        quantization={**base, "budget": {"size_mb": budget, "bits": [2, 4, 8]}},
    )))  # fmt: skip
    (record,) = read_records(run / "results.json")
    allocation = record.extra["bits_allocation"]
    assert set(allocation) == {"vision", "projector", "language_model"}
    assert set(allocation.values()) <= {2, 4, 8} and len(set(allocation.values())) > 1
    loaded = load_run(run)
    packed = save_packed(loaded.model, world["root"] / "packed-budget", adapter=loaded.adapter)
    header = packed.header_bytes
    # the estimate counts weights, scales, zero-points and float leftovers: all but the header
    assert record.extra["estimated_mb"] * 2**20 == pytest.approx(
        packed.total_bytes - header, rel=0.02
    )
    assert (packed.total_bytes - header) / 2**20 <= budget
    with pytest.raises(ValueError, match="no width of .* fits quantization.budget.size_mb"):
        compress(recipe_from_dict(_recipe(
            world, "rtn-too-small", method="rtn",
            quantization={**base, "budget": {"size_mb": low / 10}},
        )))  # fmt: skip


def test_objective_layers_named_by_part(world):
    """feat / attn / qk_entropy layers named by part: each decoder layer of each model (a
    shallower student's paired evenly with the teacher's), no module names in the recipe."""
    from distiq.config import from_dict
    from distiq.models import load
    from distiq.objective.config import ObjectiveConfig
    from distiq.train.modeling import build_student
    from distiq.train.objective_layers import resolve_layer_names
    from distiq.train.recipe import StudentConfig

    objective = {
        "terms": {
            "task": {},
            "kd": {"temperature": 2.0},
            "feat": {"weight": 0.1, "student_layers": ["language_model"],
                     "teacher_layers": ["language_model"]},
            "attn": {"weight": 0.1, "student_layers": ["language_model"],
                     "teacher_layers": ["language_model"]},
            "qk_entropy": {"weight": 1.0e-3, "query_modules": ["language_model"],
                           "key_modules": ["language_model"]},
        }
    }  # fmt: skip
    run = compress(recipe_from_dict(_recipe(
        world, "qad-parts", method="qad", student={"depth": 1}, objective=objective,
        quantization={"scheme": "W4A8"},
    )))  # fmt: skip
    lines = [line for line in read_metrics(run / "metrics.jsonl") if line["kind"] == "train"]
    assert {"feat", "attn", "qk_entropy"} <= set(lines[-1]["terms"])
    teacher, adapter = load(world["llava"], attn_implementation="eager")
    student, _ = build_student(teacher, adapter, StudentConfig(depth=1))
    config = resolve_layer_names(
        from_dict(ObjectiveConfig, objective), student, adapter, teacher, adapter
    )
    assert config.terms.feat.student_layers == ("model.language_model.layers.0",)
    assert config.terms.feat.teacher_layers == (
        "model.language_model.layers.0", "model.language_model.layers.1",
    )  # fmt: skip
    assert config.terms.attn.teacher_layers[1] == "model.language_model.layers.1.self_attn"
    assert config.terms.qk_entropy.query_modules == (
        "model.language_model.layers.0.self_attn.q_proj",
    )  # fmt: skip
