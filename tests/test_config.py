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


@dataclass(frozen=True)
class Seeded:
    seed: int = 0
    rate: float = 0.1
    inner: Outer | None = None


def test_integers_beyond_64_bits_name_their_key():
    with pytest.raises(ConfigError) as info:
        from_dict(Seeded, {"seed": 2**70}, source="recipe.yaml")
    assert info.value.errors == [
        "seed: 1180591620717411303424 is out of range; integer settings must lie between "
        "-9223372036854775808 and 9223372036854775807 (64-bit)"
    ]
    # nested, negative, optional, and a number too big for a float: each names its key
    with pytest.raises(ConfigError) as info:
        from_dict(
            Seeded, {"seed": -(2**63) - 1, "rate": 10**400, "inner": {"name": "x", "maybe": 2**64}}
        )
    text = str(info.value)
    assert "seed: -9223372036854775809 is out of range" in text
    assert "rate: 1000" in text and "out of range for a number" in text
    with pytest.raises(ConfigError, match="seed: an integer of 20000 bits is out of range"):
        from_dict(Seeded, {"seed": 2**19999})
    assert "inner.maybe: 18446744073709551616 is out of range" in text
    # the edges of the range are accepted
    assert from_dict(Seeded, {"seed": 2**63 - 1}).seed == 2**63 - 1
    assert from_dict(Seeded, {"seed": -(2**63)}).seed == -(2**63)


def test_a_recipe_with_a_huge_seed_names_the_key(tmp_path):
    from distiq.train.recipe import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text("method: qad\nseed: 1180591620717411303424\ndata:\n  scenes: data\n")
    with pytest.raises(ConfigError, match=r"seed: 1180591620717411303424 is out of range"):
        load_recipe(path)


def test_non_utf8_yaml_names_the_file_and_the_byte(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes("method: teacher\nname: café\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    text = str(info.value)
    assert str(path) in text and "not UTF-8" in text and "must be UTF-8" in text
    assert "byte 0xe9 on line 2" in text
    # UTF-8, with or without a byte-order mark, reads
    path.write_bytes("\ufeffmethod: teacher\nname: café\n".encode())
    assert load_yaml(path) == {"method": "teacher", "name": "café"}
