"""compressed-tensors checkpoints, loaded with plain transformers: weight-only schemes give the
run's logits bit for bit on every VLM family; activation schemes are refused unless asked for,
and then differ from distiq only at rounding ties; what has no exact form is refused before
anything is written."""

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForImageTextToText

from distiq.export import export_run, load_run
from distiq.export.compressed_plan import plan_layers
from distiq.quant import (
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    QuantConfig,
    QuantSpec,
    quantize_,
)

pytest.importorskip("compressed_tensors")

W4G16_F16 = QuantSpec(bits=4, granularity=PerGroup(16), scale_dtype="float16")
W3_ASYM = QuantSpec(bits=3, symmetric=False, granularity=PerChannel(0))
W8 = QuantSpec(bits=8, granularity=PerChannel(0))
A8 = QuantSpec(bits=8, granularity=PerTensor())
A8_ASYM = QuantSpec(bits=8, symmetric=False, granularity=PerTensor())
A8_TOKEN = QuantSpec(bits=8, granularity=PerToken(), dynamic=True)


def _plain_logits(path, batch):
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager")
    with torch.no_grad():
        return model(**batch).logits


def _config(path):
    return json.loads((path / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize(
    "family", ["llava", "idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl", "paligemma"]
)
def test_weight_only_runs_load_bit_exact_in_transformers(families, family):
    """4-bit symmetric groups with float16 scales (attention) and 3-bit asymmetric channels
    (MLP, written as 4-bit q - z): plain from_pretrained gives the student's logits exactly."""
    run = families.make_run(
        family, "w4w3", {"*.self_attn.*": (W4G16_F16, None), "*.mlp.*": (W3_ASYM, None)}
    )
    out = export_run(run.path, "compressed-tensors")
    assert out == run.path / "export" / "compressed-tensors"
    config = _config(out)
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    bits = sorted(group["weights"]["num_bits"] for group in config["config_groups"].values())
    assert bits == [4, 4] and all(
        g["input_activations"] is None for g in config["config_groups"].values()
    )
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        keys = set(weights.keys())
        scales = [weights.get_tensor(k) for k in keys if "self_attn.q_proj.weight_scale" in k]
    assert any(k.endswith("weight_packed") for k in keys)
    assert not any(k.endswith("weight_zero_point") for k in keys)  # q - z: no zero-points
    assert scales and all(s.dtype == torch.float16 for s in scales)  # 16 bits, widened exactly
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "distiq.compressed-tensors" and manifest["exact_by_construction"]
    assert manifest["verification"]["identical"] and manifest["verification"]["samples"] == 4
    assert torch.equal(_plain_logits(out, run.batch), run.expected)


def test_every_weight_scheme_is_exact(families):
    """One run, a scheme per projection: 2-bit, 8-bit with bfloat16 scales, 7-bit asymmetric
    groups (-> 8-bit), 4-bit per tensor, 5-bit unsigned symmetric groups."""
    schemes = {
        "*.q_proj": (QuantSpec(bits=2, granularity=PerChannel(0)), None),
        "*.k_proj": (QuantSpec(bits=8, granularity=PerChannel(0), scale_dtype="bfloat16"), None),
        "*.v_proj": (QuantSpec(bits=7, symmetric=False, granularity=PerGroup(16)), None),
        "*.o_proj": (QuantSpec(bits=4, granularity=PerTensor()), None),
        "*.mlp.*": (QuantSpec(bits=5, signed=False, granularity=PerGroup(32)), None),
    }
    run = families.make_run("llava", "schemes", schemes)
    out = export_run(run.path, "compressed-tensors")
    groups = _config(out)["config_groups"].values()
    found = {(g["weights"]["num_bits"], g["weights"]["strategy"]) for g in groups}
    assert found == {(2, "channel"), (8, "channel"), (8, "group"), (4, "tensor"), (5, "group")}
    assert torch.equal(_plain_logits(out, run.batch), run.expected)


def _input_codes_differ_only_at_ties(run_path, export_path, batch):
    """Feed each quantized layer's recorded input to both quantizers; return how many codes
    differ, asserting each is one step apart at a rounding tie (the mapping itself is right)."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    run = load_run(run_path)
    loaded = AutoModelForImageTextToText.from_pretrained(export_path, attn_implementation="eager")
    with torch.no_grad():
        loaded(**batch)  # decompress
    inputs = {}

    def record(name):
        def hook(_module, args, _output):
            inputs.setdefault(name, args[0])  # returns None: the output is kept

        return hook

    hooks = [
        module.register_forward_hook(record(name))
        for name, module in run.model.named_modules()
        if getattr(module, "act_quant", None) is not None
    ]
    with torch.no_grad():
        run.model(**batch)
    for hook in hooks:
        hook.remove()
    assert inputs
    differing = 0
    for name, x in inputs.items():
        ours = run.model.get_submodule(name).act_quant(x)
        module = loaded.get_submodule(name)
        args = module.quantization_scheme.input_activations
        theirs = forward_quantize(module, x, "input", args)
        if args.dynamic:
            scale, zero = compute_dynamic_scales_and_zp(x, args, module)
        else:
            scale, zero = module.input_scale, getattr(module, "input_zero_point", None)
        value = x / scale + (zero.float() if zero is not None else 0.0)
        moved = ours != theirs
        differing += int(moved.sum())
        steps = ((ours - theirs).abs() / scale.expand_as(x))[moved]
        torch.testing.assert_close(steps, torch.ones_like(steps), rtol=1e-3, atol=0)
        tie = ((value - value.floor()) - 0.5).abs()[moved]
        assert bool((tie < 1e-4).all()), f"{name}: codes differ away from a tie"
    return differing


def test_activation_layers_need_the_opt_in_and_differ_only_at_ties(families):
    run = families.make_run(
        "qwen2_vl",
        "w8a8",
        {
            "*.self_attn.*": (W8, A8),
            "*.mlp.up_proj": (W8, A8_ASYM),
            "*.mlp.gate_proj": (W8, A8_TOKEN),
            "*.mlp.down_proj": (None, A8),
        },
    )
    with pytest.raises(ValueError, match="quantized input activations") as info:
        export_run(run.path, "compressed-tensors")
    assert "allow_activation_ties" in str(info.value) and "Exact in transformers" in str(info.value)
    assert not (run.path / "export").exists()  # refused before anything was written
    out = export_run(run.path, "compressed-tensors", allow_activation_ties=True)
    config = _config(out)
    formats = {g.get("format") for g in config["config_groups"].values()}
    assert formats == {"int-quantized", "dense"}  # compressed-tensors' own choice per layer
    manifest = json.loads((out / "manifest.json").read_text())
    layers = {name.rsplit(".", 1)[-1]: e["format"] for name, e in manifest["layers"].items()}
    assert layers["down_proj"] == "dense" and layers["q_proj"] == "int-quantized"
    assert not manifest["exact_by_construction"] and "identical" in manifest["verification"]
    _input_codes_differ_only_at_ties(run.path, out, run.batch)


def test_dynamic_per_token_codes_move_at_their_extreme_tie(families):
    """Per token, the extreme value sits at ±127.5 by construction, where round(x / s) and
    round(x · (1/s)) often disagree in the last bit: codes move there, and only there."""
    run = families.make_run("llava", "a8tok", {"*": (W8, A8_TOKEN)})
    out = export_run(run.path, "compressed-tensors", allow_activation_ties=True)
    assert _input_codes_differ_only_at_ties(run.path, out, run.batch) > 0


def test_schemes_without_an_exact_form_are_refused(families):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), *[nn.Linear(32, 32) for _ in range(4)])
    specs = {
        "0": (W8, None),
        "2": (QuantSpec(bits=4, format="nf4", granularity=PerGroup(16)), None),
        "3": (QuantSpec(bits=8, symmetric=False, granularity=PerChannel(0)), None),
        "4": (QuantSpec(bits=8, format="fp8_e4m3", granularity=PerChannel(0)), None),
        "5": (W8, QuantSpec(bits=8, granularity=PerChannel(-1), dynamic=True)),
    }
    for name, (weight, activation) in specs.items():
        quantize_(model, QuantConfig(weight=weight, activation=activation, include=(name,)))
    with pytest.raises(ValueError) as info:
        plan_layers(model, allow_activation_ties=True)
    message = str(info.value)
    reasons = ("a convolution", "nf4 weights", "9 bits", "fp8_e4m3 weights", "PerChannel(axis=-1)")
    for reason in reasons:
        assert reason in message, reason
    assert message.startswith("5 layer(s)")
    assert "--format packed" in message and "Exact in transformers" in message
    run = families.make_run(
        "llava",
        "fp8",
        {"*.mlp.*": (QuantSpec(bits=8, format="fp8_e4m3", granularity=PerChannel(0)), None)},
    )
    with pytest.raises(ValueError, match="fp8_e4m3 weights"):
        export_run(run.path, "compressed-tensors")
    assert not (run.path / "export").exists()


def test_float_run_is_refused(families):
    path = families.module.base_model("llava", families.root)
    with pytest.raises(ValueError, match="float model"):
        export_run(path, "compressed-tensors")
    assert not (path / "export").exists()


def test_cli_writes_compressed_tensors(families):
    from typer.testing import CliRunner

    from distiq.cli import app

    run = families.make_run("smolvlm", "cli", {"*": (W4G16_F16, None)})
    runner = CliRunner()
    assert "compressed-tensors" in runner.invoke(app, ["export", "--help"]).stdout
    result = runner.invoke(app, ["export", str(run.path), "-f", "compressed-tensors"])
    assert result.exit_code == 0, result.output
    out = run.path / "export" / "compressed-tensors"
    assert f"exported: {out}" in result.stdout
    assert torch.equal(_plain_logits(out, run.batch), run.expected)
    result = runner.invoke(
        app, ["export", str(run.path), "-f", "packed", "--allow-activation-ties"]
    )
    assert result.exit_code == 1 and "compressed-tensors only" in result.stderr
