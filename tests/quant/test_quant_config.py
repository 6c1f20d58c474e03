"""Save / load of every quantization config: to_dict / from_dict and YAML, plus bad configs."""

import pytest

from distiq.config import ConfigError, dump_yaml, from_dict, load_yaml
from distiq.quant import PerChannel, PerGroup, PerTensor, PerToken, QuantConfig, QuantSpec

SPECS = [
    QuantSpec(),
    QuantSpec(bits=2, symmetric=False, granularity=PerGroup(32), observer="mse", mse_grid=50),
    QuantSpec(bits=3, granularity=PerChannel(1), learnable=True, signed=False),
    QuantSpec(
        bits=8, symmetric=False, granularity=PerTensor(), observer="percentile", percentile=99.9
    ),
    QuantSpec(bits=8, granularity=PerToken(), dynamic=True),
    QuantSpec(bits=4, format="nf4", granularity=PerGroup(64)),
    QuantSpec(bits=8, format="fp8_e4m3", granularity=PerChannel(0)),
]

CONFIGS = [
    QuantConfig(),
    QuantConfig(weight=None, activation=QuantSpec(bits=8, granularity=PerTensor())),
    QuantConfig(
        weight=QuantSpec(bits=4, granularity=PerGroup(64)),
        activation=QuantSpec(bits=8, dynamic=True, granularity=PerToken()),
        include=("model.layers.*",),
        exclude=("*.lm_head", "model.vision_tower"),
        overrides={
            "*embed*": {"weight": {"bits": 8}},
            "lm_head": {"weight": {"bits": 8}, "activation": None},
        },
        token_importance=True,
        low_bits=3,
    ),
]


@pytest.mark.parametrize(
    "spec", SPECS, ids=lambda s: f"{s.format}{s.bits}-{s.granularity._to_config()}"
)
def test_spec_round_trip_dict_and_yaml(spec, tmp_path):
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    path = dump_yaml(spec, tmp_path / "spec.yaml")
    assert QuantSpec.from_dict(load_yaml(path)) == spec


@pytest.mark.parametrize("config", CONFIGS)
def test_config_round_trip_dict_and_yaml(config, tmp_path):
    assert QuantConfig.from_dict(config.to_dict()) == config
    path = dump_yaml(config, tmp_path / "config.yaml")
    assert QuantConfig.from_dict(load_yaml(path)) == config


def test_yaml_written_by_hand(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text(
        "weight: {bits: 4, granularity: per_group(128)}\n"
        "activation: {bits: 8, dynamic: true, granularity: per_token}\n"
        "exclude: [lm_head]\n"
        "overrides:\n  '*.embed_tokens': {weight: {bits: 8, granularity: per_channel}}\n"
    )
    config = QuantConfig.from_dict(load_yaml(path))
    assert config.weight.granularity == PerGroup(128)
    assert config.activation.granularity == PerToken()
    assert config.exclude == ("lm_head",)


def test_bad_configs_list_every_problem():
    with pytest.raises(ConfigError) as err:
        from_dict(
            QuantConfig,
            {
                "weight": {"bits": 12, "granularity": "per_grop(64)"},
                "activation": {"observr": "minmax"},
                "low_bits": 1,
            },
        )
    message = str(err.value)
    assert "unknown granularity" in message
    assert "observr" in message and "did you mean 'observer'" in message
    with pytest.raises(ConfigError, match="outside 2-8"):
        from_dict(QuantConfig, {"low_bits": 9})
    with pytest.raises(ConfigError, match="token_importance .* set an activation spec"):
        from_dict(QuantConfig, {"token_importance": True})
    with pytest.raises(ConfigError, match=r"overrides\['lm_head'\]\.weight: .*outside 2-8"):
        from_dict(QuantConfig, {"overrides": {"lm_head": {"weight": {"bits": 1}}}})
    with pytest.raises(ValueError, match="keys 'weight' and/or 'activation'"):
        QuantConfig(overrides={"x": {"wieght": {}}})


def test_matching_patterns_equals_the_glob_rule_in_order():
    """The indexed lookup gives what ``name_matches`` gives pattern by pattern, in order."""
    from distiq.quant.spec import PatternSet, name_matches

    patterns = (
        "model.layers.1", "model.layers.*.mlp", "model.layers.1.mlp.up", "*", "model.layers.1",
        "model.lay?rs.0.attn.q", "model.layers.[01].attn", "other", "model",
    )  # fmt: skip
    names = [
        "model", "model.layers", "model.layers.0.attn.q", "model.layers.1.mlp.up",
        "model.layers.10.mlp.up", "model.layers.1.mlp.down", "other.x",
    ]  # fmt: skip
    for name in names:
        expected = [p for p in patterns if name_matches(name, p)]
        assert PatternSet(patterns).matching(name) == expected, name
    assert QuantConfig(include=("model.layers.1",), exclude=("model.layers.1.mlp",)).selects(
        "model.layers.1.attn.q"
    )
    assert not QuantConfig(include=("model.layers.1",), exclude=("*.mlp",)).selects(
        "model.layers.1.mlp.up"
    )
