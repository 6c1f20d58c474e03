"""Exact packed checkpoints with 16-bit scales: specs with ``scale_dtype="float16"`` train with
float16 scales, so ``save_packed`` stores them in 16 bits and ``load_packed`` computes exactly
what the fake-quant model computes; ONNX int8 / int4 graphs carry the same scales."""

import logging

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from distiq.export import load_packed, read_manifest, save_packed
from distiq.export.onnx import export_module
from distiq.quant import (
    FakeQuantLinear,
    PerChannel,
    PerGroup,
    PerTensor,
    QuantConfig,
    QuantizedLinear,
    QuantSpec,
    calibration,
    quantize_,
)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))


A8 = QuantSpec(bits=8, symmetric=False, granularity=PerTensor(), scale_dtype="float16")
WEIGHTS = {
    "sym-g64": QuantSpec(bits=4, granularity=PerGroup(64), scale_dtype="float16"),
    "asym-g64": QuantSpec(bits=4, symmetric=False, granularity=PerGroup(64), scale_dtype="float16"),
    "sym-channel": QuantSpec(bits=4, granularity=PerChannel(0), scale_dtype="float16"),
    "asym-channel": QuantSpec(
        bits=4, symmetric=False, granularity=PerChannel(0), scale_dtype="float16"
    ),
}


def _stored_scale_dtypes(path) -> set:
    tensors = load_file(str(path / "packed.safetensors"))
    return {value.dtype for key, value in tensors.items() if key.endswith(".scales")}


def _round_trip(model, x, path):
    with torch.no_grad():
        expected = model(x)
    sizes = save_packed(model, path)
    loaded = load_packed(path, model=_mlp())
    with torch.no_grad():
        got = loaded(x)
    return expected, got, sizes


@pytest.mark.parametrize("method", ["observer", "lsq-trained", "rtn", "gptq"])
@pytest.mark.parametrize("name", list(WEIGHTS))
def test_float16_scale_checkpoints_are_exact(name, method, tmp_path):
    spec = WEIGHTS[name]
    x = torch.randn(8, 128)
    model = _mlp()
    if method in ("observer", "lsq-trained"):
        weight = spec.replace(learnable=method == "lsq-trained")
        activation = A8.replace(learnable=method == "lsq-trained")
        quantize_(model, QuantConfig(weight=weight, activation=activation))
        with calibration(model):
            model(x)
        if method == "lsq-trained":  # a few steps move the scales off their initial values
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
            for _ in range(3):
                optimizer.zero_grad()
                model(x).square().mean().backward()
                optimizer.step()
    else:
        from distiq.ptq import quantize_model

        fake = _mlp()  # the RTN reference: fake quantization of the same float weights
        quantize_(fake, QuantConfig(weight=spec))
        quantize_model(model, [(x,)], QuantConfig(weight=spec), method=method, convert=True)
        if method == "rtn":
            with torch.no_grad():
                assert torch.equal(model(x), fake(x))
    model.eval()
    expected, got, sizes = _round_trip(model, x, tmp_path / "p")
    assert torch.equal(got, expected)
    assert _stored_scale_dtypes(tmp_path / "p") == {torch.float16}
    manifest = read_manifest(tmp_path / "p")
    assert manifest["scale_dtype"] == "float16"
    assert {e["scale_dtype"] for e in manifest["modules"].values()} == {"float16"}
    groups = 128 // 64 * 64 + 64 // 64 * 32 if spec.group_size else 64 + 32
    assert sizes.scale_bytes == 2 * groups


def test_float32_scale_specs_keep_float32_and_explicit_casts_stay_exact(tmp_path):
    x = torch.randn(4, 128)
    model = _mlp()
    quantize_(model, QuantConfig(weight=QuantSpec(bits=4, granularity=PerGroup(64))))
    save_packed(model, tmp_path / "a")
    assert _stored_scale_dtypes(tmp_path / "a") == {torch.float32}
    assert read_manifest(tmp_path / "a")["scale_dtype"] == "float32"
    half = _mlp()
    quantize_(half, QuantConfig(weight=WEIGHTS["sym-g64"]))
    for dtype in ("float32", "float16"):  # an explicit dtype that holds the scales exactly
        save_packed(half, tmp_path / dtype, scale_dtype=dtype)
        loaded = load_packed(tmp_path / dtype, model=_mlp())
        with torch.no_grad():
            assert torch.equal(loaded(x), half(x))


def test_mixed_scale_dtypes_are_recorded_per_layer(tmp_path):
    model = _mlp()
    quantize_(
        model,
        QuantConfig(
            weight=WEIGHTS["sym-g64"], overrides={"2": {"weight": {"scale_dtype": "bfloat16"}}}
        ),
    )
    save_packed(model, tmp_path / "p")
    manifest = read_manifest(tmp_path / "p")
    assert manifest["modules"]["0"]["scale_dtype"] == "float16"
    assert manifest["modules"]["2"]["scale_dtype"] == "bfloat16"
    assert manifest["scale_dtype"] == "float32"  # no common dtype
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "p", model=_mlp())(x), model(x))


def test_scales_off_the_spec_grid_fall_back_to_float32(tmp_path, caplog):
    """A layer built by hand with float32 scales under a float16 spec stays exact."""
    spec = WEIGHTS["sym-channel"]
    codes = torch.randint(-8, 8, (16, 64))
    scale = torch.rand(16, 1) + 0.01  # not float16 values
    layer = QuantizedLinear.from_quantized(codes, scale, torch.zeros(16, 1), spec)
    model = nn.Sequential(layer)
    with caplog.at_level(logging.WARNING, logger="distiq.export.scales"):
        save_packed(model, tmp_path / "p")
    assert "storing them as float32" in caplog.text
    assert read_manifest(tmp_path / "p")["modules"]["0"]["scale_dtype"] == "float32"
    loaded = load_packed(tmp_path / "p", model=nn.Sequential(nn.Linear(64, 16, bias=False)))
    x = torch.randn(2, 64)
    assert torch.equal(loaded(x), model(x))


# -- ONNX ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("precision", "weight"),
    [
        ("int8", QuantSpec(bits=8, granularity=PerChannel(0), scale_dtype="float16")),
        ("int4", WEIGHTS["asym-g64"]),
    ],
)
def test_onnx_graphs_carry_the_float16_scales(precision, weight, tmp_path):
    import onnxruntime as ort

    from distiq.export.ort import session_options

    torch.manual_seed(1)
    model = nn.Sequential(
        FakeQuantLinear.from_float(nn.Linear(128, 64), weight, A8),
        nn.GELU(),
        FakeQuantLinear.from_float(nn.Linear(64, 16), weight, A8),
    ).eval()
    x = torch.randn(5, 128)
    with calibration(model):
        model(x)
    file = tmp_path / f"{precision}.onnx"
    export_module(
        model, (x,), file, input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "n"}}, precision=precision,
    )  # fmt: skip
    scales = {
        t.name: onnx.numpy_helper.to_array(t)
        for t in onnx.load(str(file)).graph.initializer
        if t.name.endswith("scale") and not t.name.endswith("inv_scale")
    }
    assert len(scales) >= 4  # weight and activation scales of both layers
    for name, value in scales.items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value.astype(np.float16).astype(np.float32), value, name)
    for index in (0, 2):
        act_scale = model[index].act_quant.qparams()[0]
        np.testing.assert_array_equal(scales[f"{index}.act_scale"].reshape(-1), act_scale.numpy())
    # int8: the graph as written; int4: MatMulNBits at accuracy level 0 (float arithmetic)
    level, optimize = (None, False) if precision == "int8" else (0, True)
    session = ort.InferenceSession(str(file), session_options(1, level, optimize))
    x2 = torch.randn(7, 128)
    got = session.run(None, {"x": x2.numpy()})[0]
    with torch.no_grad():  # equal up to the matmul's float summation order
        np.testing.assert_allclose(got, model(x2).numpy(), atol=1e-5, rtol=0)
