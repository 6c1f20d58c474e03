"""Objective config: validation with every problem at once, YAML round trip, schedules."""

import math

import pytest
import yaml

from distiq.config import ConfigError, dump_yaml, load_yaml
from distiq.objective import (
    KDTerm,
    ObjectiveConfig,
    QuantDistillObjective,
    Schedule,
    TaskTerm,
    Terms,
)

RECIPE = """
objective:
  balancing: uncertainty
  terms:
    task: {weight: 1.0}
    kd: {weight: 1.0, divergence: forward_kl, temperature: 2.0, schedule: {kind: warmup, steps: 100}}
    feat: {weight: 0.5, distance: mse, student_layers: ["layers.*"], teacher_layers: ["layers.*"]}
    pd: {weight: 0.1}
    qk_entropy: {weight: 0.01}
    rounding: {weight: 1.0e-4}
"""


def test_recipe_section_loads_and_round_trips(tmp_path):
    data = yaml.safe_load(RECIPE)["objective"]
    cfg = ObjectiveConfig.from_dict(data, where="objective")
    assert cfg.balancing == "uncertainty"
    assert cfg.terms.kd.temperature == 2.0 and cfg.terms.kd.schedule == Schedule(
        "warmup", steps=100
    )
    assert cfg.terms.feat.student_layers == ("layers.*",)
    assert cfg.terms.rounding.weight == 1e-4
    assert list(cfg.terms.active()) == ["task", "kd", "feat", "pd", "qk_entropy", "rounding"]
    dump_yaml(cfg, tmp_path / "objective.yaml")
    assert ObjectiveConfig.from_dict(load_yaml(tmp_path / "objective.yaml")) == cfg


def test_every_problem_is_reported_at_once_with_suggestions():
    data = {
        "balancing": "uncertain",
        "terms": {
            "kdd": {"weight": 1.0},
            "task": {"weight": -1.0, "schedul": {}},
            "kd": {"divergence": "forward", "schedule": {"kind": "warmup"}},
            "feat": {"student_layers": ["a"]},
            "pd": {"every": 0},
        },
    }
    with pytest.raises(ConfigError) as info:
        ObjectiveConfig.from_dict(data, source="recipe.yaml", where="objective")
    errors = info.value.errors
    text = str(info.value)
    assert "recipe.yaml" in text and len(errors) == 8, text
    assert any("terms.kdd" in e and "did you mean 'kd'" in e for e in errors)
    assert any("task.schedul" in e and "did you mean 'schedule'" in e for e in errors)
    assert any("task" in e and "weight must be >= 0" in e for e in errors)
    assert any("kd.divergence" in e and "did you mean 'forward_kl'" in e for e in errors)
    assert any("kd.schedule" in e and "steps >= 1" in e for e in errors)
    assert any("feat" in e and "both student_layers and teacher_layers" in e for e in errors)
    assert any("pd" in e and "every must be >= 1" in e for e in errors)
    assert any("balancing" in e and "did you mean 'uncertainty'" in e for e in errors)


def test_python_built_configs_are_validated_too():
    bad = ObjectiveConfig(terms=Terms(kd=KDTerm(temperature=0.0, beta=1.0)))
    with pytest.raises(ConfigError) as info:
        QuantDistillObjective(bad)
    assert len(info.value.errors) == 2
    with pytest.raises(ConfigError, match="no term is on"):
        QuantDistillObjective({"terms": {}})
    with pytest.raises(ConfigError, match="temperature_schedule values must stay > 0"):
        QuantDistillObjective(
            {
                "terms": {
                    "kd": {"temperature_schedule": {"kind": "linear", "start": 0.0, "steps": 5}}
                }
            }
        )
    with pytest.raises(ValueError, match="warmup schedule always starts at 0"):
        Schedule("warmup", start=0.5, steps=3)
    assert QuantDistillObjective({}).active == {"task": TaskTerm()}


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        (Schedule(), {0: 1.0, 50: 1.0, 10**6: 1.0}),
        (Schedule("constant", end=0.3), {0: 0.3, 7: 0.3}),
        (Schedule("warmup", steps=100), {0: 0.0, 25: 0.25, 100: 1.0, 500: 1.0}),
        (Schedule("warmup", steps=10, end=2.0, delay=5), {0: 0.0, 5: 0.0, 10: 1.0, 15: 2.0}),
        (Schedule("linear", start=1.0, end=0.0, steps=4), {0: 1.0, 1: 0.75, 3: 0.25, 9: 0.0}),
        (
            Schedule("cosine", start=4.0, end=1.0, steps=10),
            {0: 4.0, 5: 2.5, 10: 1.0, 20: 1.0, 2: 1.0 + 3.0 * (1 + math.cos(math.pi * 0.2)) / 2},
        ),
    ],
)
def test_schedules_give_the_right_values(schedule, expected):
    for step, value in expected.items():
        assert schedule.value(step) == pytest.approx(value, abs=1e-12), step


def test_objective_weights_and_temperature_follow_schedules():
    objective = QuantDistillObjective(
        {
            "terms": {
                "task": {
                    "weight": 0.5,
                    "schedule": {"kind": "linear", "start": 1.0, "end": 0.0, "steps": 10},
                },
                "kd": {
                    "weight": 2.0,
                    "schedule": {"kind": "warmup", "steps": 4},
                    "temperature_schedule": {
                        "kind": "linear",
                        "start": 4.0,
                        "end": 1.0,
                        "steps": 3,
                    },
                },
            }
        }
    )
    assert objective.term_weight("task", 0) == 0.5 and objective.term_weight("task", 5) == 0.25
    assert objective.term_weight("kd", 0) == 0.0 and objective.term_weight("kd", 2) == 1.0
    assert [objective.temperature(s) for s in range(5)] == [4.0, 3.0, 2.0, 1.0, 1.0]
