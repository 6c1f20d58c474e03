"""Recipes: every shipped recipe loads and round-trips; bad recipes and bad paths fail early,
with every problem at once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from distiq.config import ConfigError
from distiq.quant import PerGroup
from distiq.train.methods import check_recipe
from distiq.train.recipe import load_recipe, recipe_from_dict, recipe_to_dict

RECIPES = sorted(
    p
    for p in (Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml")
    # teacher recipes: the demo's (tests/demo/test_demo_recipe.py) and the dense tasks'
    # (tests/train/test_engine_dense.py)
    if not p.stem.startswith("teacher")
)


def test_recipes_are_shipped():
    names = {p.stem for p in RECIPES}
    assert {"rtn-w4a8", "gptq-w4a8", "qat-w4a8", "qad-w4a8", "kd-small"} <= names
    assert {"qat-w2a16-g64", "qad-w2a16-g64", "gptq-w2a16-g64", "qlora-kd-nf4"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_loads_and_round_trips(path, tmp_path):
    recipe = load_recipe(path)
    assert recipe.method in path.stem or recipe.method == "qlora-kd"
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    assert load_recipe(again) == recipe


def test_same_schedule_for_every_trained_method():
    """Same data order, steps and batch size for every trained student recipe of a task."""
    trained = [load_recipe(p) for p in RECIPES]
    trained = [r for r in trained if r.method in ("qat", "qad", "kd", "qlora-kd")]
    for task in {r.task.name for r in trained}:
        schedules = {
            (r.train.steps, r.train.batch_size, r.train.seed)
            for r in trained
            if r.task.name == task
        }
        assert len(schedules) == 1, (task, schedules)


def test_invalid_recipe_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        recipe_from_dict(
            {
                "method": "qadd",
                "teachr": "runs/teacher",
                "quantization": {"weight": {"bits": 9}, "targets": ["vison"]},
                "train": {"stepz": 3},
                "objective": {"terms": {"kd": {"temprature": 2.0}}},
            }
        )
    message = str(info.value)
    errors = info.value.errors
    assert len(errors) >= 6, errors
    assert "did you mean 'qad'" in message
    assert "did you mean 'teacher'" in message
    assert "did you mean 'steps'" in message
    assert "did you mean 'temperature'" in message
    assert "quantization.weight: bits=9" in message


def test_scene_generation_needs_its_folder_and_sane_settings():
    with pytest.raises(ConfigError) as info:
        recipe_from_dict(
            {"method": "rtn", "data": {"generate": {"count": 10, "image_size": 8, "seed": -1}}}
        )
    message = str(info.value)
    assert "data.generate: count must be >= 30" in message
    assert "data.generate: image_size must be in [32, 1024]" in message
    assert "data.generate: seed must be >= 0" in message
    with pytest.raises(ConfigError, match="generate makes a scene set: it needs scenes"):
        recipe_from_dict({"method": "rtn", "data": {"generate": {"count": 100}}})
    recipe = recipe_from_dict(
        {
            "method": "rtn",
            "quantization": {"scheme": "W4A16"},
            "data": {"scenes": "d", "generate": {}},
        }
    )
    assert (recipe.data.generate.count, recipe.data.generate.image_size) == (3000, 64)


def test_cross_section_checks():
    with pytest.raises(ConfigError) as info:
        recipe_from_dict(
            {
                "method": "qat",
                "data": {"scenes": "d"},
                "objective": {"terms": {"task": {}, "kd": {}}},
                "init": "gptq",
            }
        )
    text = str(info.value)
    assert "needs a quantization section" in text
    assert "task loss only" in text
    assert "init: gptq applies" not in text  # qat may start from a PTQ solution, as qad
    with pytest.raises(ConfigError, match="init: gptq applies to methods qad and qat only"):
        recipe_from_dict(
            {
                "method": "kd",
                "teacher": "t",
                "student": {"init": "preset", "preset": "tiny"},
                "objective": {"terms": {"task": {}, "kd": {}}},
                "init": "gptq",
            }
        )
    with pytest.raises(ConfigError, match="needs a kd term"):
        recipe_from_dict(
            {"method": "kd", "teacher": "t", "student": {"init": "preset", "preset": "tiny"}}
        )


def test_a_teacher_recipe_is_sent_to_distiq_teacher():
    with pytest.raises(ConfigError, match="run it with `distiq teacher RECIPE`"):
        recipe_from_dict({"method": "teacher", "data": {"scenes": "d"}})


def test_scheme_fields_and_overrides():
    recipe = recipe_from_dict(
        {
            "method": "qad",
            "teacher": "t",
            "objective": {"terms": {"task": {}, "kd": {}}},
            "quantization": {
                "scheme": "W4A8",
                "weight": {"learnable": True},
                "targets": ["vision", "model.language_model.*"],
                "overrides": {"vision": {"weight": {"bits": 8}, "activation": None}},
                "ignore": ["*.lm_head"],
            },
        }
    )
    quant = recipe.quantization
    assert (quant.weight.bits, quant.weight.learnable, quant.activation.dynamic) == (4, True, True)
    assert quant.override_spec("vision", "weight").bits == 8
    assert quant.override_spec("vision", "weight").learnable  # on top of the recipe's spec
    assert quant.override_spec("vision", "activation") is None
    assert (quant.w_bits, quant.a_bits) == (4, 8)
    with pytest.raises(ConfigError, match="unknown quantization scheme 'W4A9'.*did you mean"):
        recipe_from_dict({"method": "rtn", "teacher": "t", "quantization": {"scheme": "W4A9"}})
    with pytest.raises(ConfigError, match="neither a part.*did you mean 'vision'"):
        recipe_from_dict(
            {"method": "rtn", "teacher": "t", "quantization": {"overrides": {"visoin": {}}}}
        )


def test_granularity_reads_from_yaml_text():
    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "qad-w2a16-g64.yaml")
    assert recipe.quantization.weight.granularity == PerGroup(64)
    assert recipe.quantization.group_size == 64


# ---------------------------------------------------------------------- early path checks
def _recipe(tmp_path: Path, **changes) -> object:
    scenes = tmp_path / "scenes"
    scenes.mkdir(exist_ok=True)
    (scenes / "meta.json").write_text("{}")
    teacher = tmp_path / "teacher"
    teacher.mkdir(exist_ok=True)
    (teacher / "config.json").write_text("{}")
    data = {
        "method": "rtn",
        "teacher": str(teacher),
        "output": str(tmp_path / "run"),
        "data": {"scenes": str(scenes)},
        "quantization": {"weight": {"bits": 4}},
        **changes,
    }
    return recipe_from_dict(data)


def test_check_recipe_accepts_good_paths(tmp_path):
    check_recipe(_recipe(tmp_path))
    assert (tmp_path / "run").is_dir()


def test_missing_teacher_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher directory .* does not exist"):
        check_recipe(_recipe(tmp_path, teacher=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        check_recipe(_recipe(tmp_path, teacher=str(tmp_path / "empty")))


def test_empty_or_missing_dataset(tmp_path):
    (tmp_path / "nodata").mkdir()
    with pytest.raises(FileNotFoundError, match="is empty"):
        check_recipe(_recipe(tmp_path, data={"scenes": str(tmp_path / "nodata")}))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_recipe(_recipe(tmp_path, data={"scenes": str(tmp_path / "missing")}))


def test_existing_run_is_refused_unless_overwrite_or_resume(tmp_path):
    recipe = _recipe(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("method: rtn\n")
    (run / "results.json").write_text("[]")
    with pytest.raises(FileExistsError, match="already holds a run"):
        check_recipe(recipe)
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        check_recipe(recipe, resume=True)
    check_recipe(recipe, overwrite=True)  # the verdict only: nothing is deleted by a check
    assert (run / "results.json").exists()
    from distiq.train.runs import prepare_run_dir

    prepare_run_dir(run, overwrite=True, resume=False)  # what compress does, holding the lock
    assert not any(run.iterdir())
    # A folder that is not a distiq run is never deleted.
    (run / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="refusing to delete"):
        check_recipe(recipe, overwrite=True)
    assert (run / "precious.txt").is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes everywhere")
def test_unwritable_output(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="cannot write"):
            check_recipe(_recipe(tmp_path, output=str(locked / "run")))
    finally:
        locked.chmod(0o700)


def test_output_under_a_file_is_unwritable(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="cannot write the run to .*: Not a directory"):
        check_recipe(_recipe(tmp_path, output=str(tmp_path / "file" / "run")))


def test_output_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        check_recipe(_recipe(tmp_path, output=str(tmp_path / "file")))
