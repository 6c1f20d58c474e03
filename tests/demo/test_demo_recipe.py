"""The demo's teacher recipe: the shipped one loads and round-trips; bad ones fail with every
problem at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distiq.config import ConfigError
from distiq.demo.recipe import load_teacher_recipe, teacher_recipe_from_dict
from distiq.train.config import TrainConfig

TEACHER = Path(__file__).resolve().parents[2] / "recipes" / "teacher.yaml"


def test_shipped_teacher_recipe_loads_and_round_trips(tmp_path):
    from distiq.config import to_dict

    recipe = load_teacher_recipe(TEACHER)
    assert recipe.method == "teacher" and isinstance(recipe.train, TrainConfig)
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
    assert load_teacher_recipe(again) == recipe


def test_teacher_section_checks():
    with pytest.raises(ConfigError) as info:
        teacher_recipe_from_dict(
            {
                "method": "teacher",
                "data": {"scenes": "d"},
                "teacher": {"preset": "tinny", "side_target": False, "side_layer": -1},
            }
        )
    text = str(info.value)
    assert "did you mean 'tiny'" in text
    assert "side_layer reads the side target" in text
    with pytest.raises(ConfigError, match="trains on a generated scene set"):
        teacher_recipe_from_dict({"method": "teacher"})
    with pytest.raises(ConfigError, match="run it with `distiq compress RECIPE`"):
        teacher_recipe_from_dict({"method": "qad"})
