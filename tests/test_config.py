"""distiq.config and distiq.registry: validation that reports every problem, round trips."""

import os
from dataclasses import dataclass, field
from typing import Literal

import pytest

from distiq.config import ConfigError, atomic_write, dump_yaml, from_dict, load_yaml, to_dict
from distiq.registry import Registry


@dataclass(frozen=True)
class Inner:
    rate: float = 0.1
    mode: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Outer:
    name: str
    steps: int = 10
    inner: Inner = field(default_factory=Inner)
    tags: tuple[str, ...] = ()
    extra: dict[str, int] = field(default_factory=dict)
    maybe: int | None = None


def test_round_trip_through_yaml(tmp_path):
    cfg = Outer(name="x", steps=3, inner=Inner(rate=2.0, mode="b"), tags=("p", "q"), extra={"k": 1})
    dump_yaml(cfg, tmp_path / "c.yaml")
    back = from_dict(Outer, load_yaml(tmp_path / "c.yaml"))
    assert back == cfg
    assert to_dict(back)["inner"] == {"rate": 2.0, "mode": "b"}


def test_every_problem_is_reported_at_once():
    data = {"steps": "ten", "inner": {"rte": 1, "mode": "c"}, "tagz": [], "extra": {"k": "v"}}
    with pytest.raises(ConfigError) as info:
        from_dict(Outer, data, source="recipe.yaml")
    errors = info.value.errors
    text = str(info.value)
    assert "recipe.yaml" in text
    assert any("steps" in e and "integer" in e for e in errors)
    assert any("inner.rte" in e and "did you mean 'rate'" in e for e in errors)
    assert any("inner.mode" in e and "'c'" in e for e in errors)
    assert any("tagz" in e and "did you mean 'tags'" in e for e in errors)
    assert any("extra.k" in e for e in errors)
    assert any(e.startswith("name") and "missing" in e for e in errors)
    assert len(errors) == 6


def test_int_is_accepted_for_float_and_none_for_optional():
    cfg = from_dict(Outer, {"name": "n", "inner": {"rate": 1}, "maybe": None})
    assert cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)
    assert cfg.maybe is None


def test_load_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_yaml(bad)


def test_atomic_write_leaves_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")

    with pytest.raises(TypeError):
        atomic_write(target, 123)  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    atomic_write(target, "new")
    assert target.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_registry_suggests_close_names():
    reg: Registry = Registry("loss")
    reg.register("forward_kl", 1)
    reg.register("reverse_kl", 2)
    assert reg.get("forward_kl") == 1
    with pytest.raises(KeyError, match="did you mean 'forward_kl'"):
        reg.get("forwrd_kl")
    with pytest.raises(ValueError, match="twice"):
        reg.register("forward_kl", 3)
    assert reg.names() == ["forward_kl", "reverse_kl"]


def test_yaml_reads_exponent_floats(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text("a: 1e-4\nb: 3E5\nc: 1.5\nd: 7\ne: .inf\nf: text\n")
    assert load_yaml(path) == {
        "a": 1e-4,
        "b": 3e5,
        "c": 1.5,
        "d": 7,
        "e": float("inf"),
        "f": "text",
    }


def test_is_atomic_temp_names_atomic_writes_temporary_file(tmp_path, monkeypatch):
    import os

    from distiq.config import is_atomic_temp

    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    atomic_write(tmp_path / "recipe.yaml", "x")
    assert len(seen) == 1 and is_atomic_temp(seen[0])
    assert not is_atomic_temp("recipe.yaml") and not is_atomic_temp(".hidden")
