"""ONNX export: exact activation codes, int8 / int4 / fp32 parity with the fake-quant model in
onnxruntime (logits and answers), the fused kernels onnxruntime runs, heads, and bad input."""

import collections
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from distiq.export import check_parity, export_onnx
from distiq.export.onnx import export_module
from distiq.export.onnx_quant import plan_layer
from distiq.export.ort import OrtVLM
from distiq.quant import (
    FakeQuantLinear,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    QuantizedLinear,
    QuantSpec,
    calibration,
)


def _session(path, optimize=True, level=None):
    from distiq.export.ort import session_options

    return ort.InferenceSession(str(path), session_options(1, level, optimize))


def _optimized_ops(path) -> collections.Counter:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path) + ".opt"
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options)
    return collections.Counter(
        n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node
    )


def _tie_inputs(scale: float, n: int = 64 * 200) -> torch.Tensor:
    """Values at and next to the rounding ties (k + 1/2)·s, where x/s and x·(1/s) round apart."""
    k = torch.arange(-60, 60, dtype=torch.float64).repeat(n // 120 + 1)[:n]
    x = ((k + 0.5) * scale).float()
    up, down = torch.nextafter(x, torch.tensor(1e9)), torch.nextafter(x, torch.tensor(-1e9))
    return torch.cat([x, up, down]).reshape(-1, 64)


@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel(-1)], ids=["tensor", "channel"])
@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_activation_codes_are_bit_exact(precision, granularity, tmp_path):
    """Identity weights make each output one product x̂_i·Ŵ_ii, so onnxruntime (graph as
    written) must give torch's fake-quant output bit for bit: the activation codes agree."""
    layer = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(64))
    weight = QuantSpec(bits=8, granularity=PerChannel(0)) if precision == "int8" else None
    fake = FakeQuantLinear.from_float(layer, weight, QuantSpec(bits=8, granularity=granularity))
    with calibration(fake):
        fake(torch.randn(32, 64) * 2.3)
    scale = float(fake.act_quant.scale[0])
    x = _tie_inputs(scale)
    # the test is not vacuous: dividing by s (QuantizeLinear's way) rounds differently
    s = fake.act_quant.scale
    assert (torch.round(x / s) != torch.round(x * (1.0 / s))).any()
    model = nn.Sequential(fake).eval()
    file = tmp_path / "layer.onnx"
    export_module(
        model, (x,), file, input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "n"}}, precision=precision,
    )  # fmt: skip
    got = _session(file, optimize=False).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_array_equal(got, expected)


def test_per_channel_conv_activations(tmp_path):
    from distiq.quant import FakeQuantConv2d

    conv = nn.Conv2d(4, 6, 3, padding=1)
    spec = QuantSpec(bits=8, symmetric=False, granularity=PerChannel(1))
    fake = FakeQuantConv2d.from_float(conv, QuantSpec(bits=8), spec)
    a8 = QuantSpec(bits=8, symmetric=False, granularity=PerTensor())
    head = FakeQuantLinear.from_float(nn.Linear(6 * 5 * 7, 8), QuantSpec(bits=8), a8)
    model = nn.Sequential(fake, nn.Flatten(), head).eval()
    x = torch.randn(2, 4, 5, 7)
    with calibration(model):
        model(x)
    for precision in ("fp32", "int8"):  # conv activations: float ops / QDQ along axis 1
        file = tmp_path / f"{precision}.onnx"
        export_module(model, (x,), file, input_names=["x"], output_names=["y"], precision=precision)
        got = _session(file, optimize=False).run(None, {"x": x.numpy()})[0]
        np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-5, rtol=0)


def test_int8_weight_type_avoids_u8s8_saturation():
    layer = nn.Linear(32, 8)
    fake = FakeQuantLinear.from_float(layer, QuantSpec(bits=8))
    assert plan_layer("l", fake, "int8", "auto").weight == "uint8"  # full [-128, 127] range
    assert plan_layer("l", fake, "int8", "int8").weight == "int8"
    packed = QuantizedLinear.from_fake_quant(fake)
    codes = packed.weight_codes().clamp(-64, 63)
    small = QuantizedLinear.from_quantized(
        codes, packed.weight_scale, packed.weight_zero_point, packed.weight_spec
    )
    assert plan_layer("l", small, "int8", "auto").weight == "int8"
    seven = FakeQuantLinear.from_float(nn.Linear(32, 8), QuantSpec(bits=7))  # reduced range
    assert plan_layer("l", seven, "int8", "auto").weight == "int8"


@pytest.mark.slow
def test_dynamo_exporter_writes_the_same_forms(tmp_path):
    """exporter="dynamo" (torch.export + onnxscript translations) gives the same QDQ / INT4
    graphs, equal to the fake-quant model up to float reassociation when run as written."""
    a8 = QuantSpec(bits=8, symmetric=False, granularity=PerTensor())
    for precision, weight in (
        ("int8", QuantSpec(bits=8)),
        ("int4", QuantSpec(bits=4, granularity=PerGroup(16))),
    ):
        model = nn.Sequential(
            FakeQuantLinear.from_float(nn.Linear(32, 48), weight, a8),
            nn.GELU(),
            FakeQuantLinear.from_float(nn.Linear(48, 16), weight, a8),
        ).eval()
        x = torch.randn(3, 5, 32)
        with calibration(model):
            model(x)
        file = tmp_path / f"{precision}.onnx"
        export_module(
            model, (x,), file, input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "batch", 1: "tokens"}}, precision=precision, exporter="dynamo",
        )  # fmt: skip
        x2 = torch.randn(2, 7, 32)
        got = _session(file, optimize=False).run(None, {"x": x2.numpy()})[0]
        np.testing.assert_allclose(got, model(x2).detach().numpy(), atol=1e-5, rtol=0)
        kernel = "MatMulIntegerToFloat" if precision == "int8" else "MatMulNBits"
        assert _optimized_ops(file)[kernel] == 2


def test_act_order_int4_layer(tmp_path):
    from distiq.ptq import gptq_quantize

    spec = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(16))
    weight, inputs = torch.randn(24, 64), torch.randn(256, 64)
    result = gptq_quantize(weight, 2 * inputs.T @ inputs / 256, spec, act_order=True)
    layer = QuantizedLinear.from_quantized(
        result.codes, result.scale, result.zero_point, spec, torch.randn(24), result.g_idx
    )
    model = nn.Sequential(layer).eval()
    x = torch.randn(3, 64)
    file = tmp_path / "g.onnx"
    export_module(model, (x,), file, input_names=["x"], output_names=["y"], precision="int4")
    got = _session(file, level=0).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-5, rtol=0)
    assert _optimized_ops(file)["MatMulNBits"] == 1


@pytest.fixture(scope="module")
def vlm_setup(deploy, tmp_path_factory):
    model, adapter = deploy.tiny_vlm()
    data = deploy.samples(6, seed=1)
    w8a8 = deploy.quantized(model, adapter, deploy.W8, deploy.A8, data[:4])
    w4a8 = deploy.quantized(model, adapter, deploy.W4G32, deploy.A8, data[:4])
    root = tmp_path_factory.mktemp("onnx")
    exports = {
        "int8": export_onnx(w8a8, root / "int8", adapter=adapter, precision="int8"),
        "int4": export_onnx(w4a8, root / "int4", adapter=adapter, precision="int4"),
        "fp32": export_onnx(model, root / "fp32", adapter=adapter, precision="fp32"),
    }
    models = {"int8": w8a8, "int4": w4a8, "fp32": model}
    return adapter, data, models, exports


@pytest.mark.parametrize(
    ("precision", "level", "bound"),
    [("fp32", None, 1e-5), ("int8", None, 2e-3), ("int4", 0, 1e-5), ("int4", None, 0.05)],
    ids=["fp32", "int8", "int4-exact", "int4-default"],
)
def test_vlm_parity(vlm_setup, precision, level, bound):
    """Logits within the stated bound; greedy answers identical to the PyTorch model's."""
    adapter, data, models, exports = vlm_setup
    report = check_parity(
        models[precision], exports[precision].path, data, adapter=adapter, max_new_tokens=3,
        threads=1, int4_accuracy_level=level,
    )  # fmt: skip
    assert report.max_abs_logit_diff <= bound
    assert len(report.answers_onnx) == len(data)
    if precision != "int4" or level == 0:
        assert report.answers_identical, (report.answers_torch, report.answers_onnx)


def test_onnxruntime_runs_integer_kernels(vlm_setup):
    _, _, _, exports = vlm_setup
    int8 = _optimized_ops(exports["int8"].graphs["language_model"])
    assert int8["MatMulIntegerToFloat"] == 7 and int8["DequantizeLinear"] == 0  # 4 attn + 3 mlp
    int4 = _optimized_ops(exports["int4"].graphs["language_model"])
    assert int4["MatMulNBits"] == 7
    model = onnx.load(str(exports["int4"].graphs["language_model"]))
    types = {t.data_type for t in model.graph.initializer}
    assert onnx.TensorProto.INT4 in types and model.opset_import[0].version == 21
    weight_bytes = {}
    for precision in ("int8", "int4"):
        graph = onnx.load(str(exports[precision].graphs["language_model"])).graph
        integer = (onnx.TensorProto.INT4, onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
        weight_bytes[precision] = sum(
            len(t.raw_data)
            for t in graph.initializer
            if t.data_type in integer and len(t.dims) == 2  # codes, not zero-points
        )
    assert weight_bytes["int8"] == 4 * 32 * 32 + 3 * 32 * 64  # one byte per weight
    assert weight_bytes["int4"] == weight_bytes["int8"] // 2  # two per byte
    sizes = {p: e.size_bytes["language_model"] for p, e in exports.items()}
    assert sizes["int4"] < sizes["fp32"] and sizes["int8"] < sizes["fp32"]


def test_heads_export(deploy, tmp_path):
    model, adapter = deploy.tiny_vlm_with_heads()
    student = deploy.quantized(model, adapter, deploy.W8, deploy.A8)
    export_onnx(student, tmp_path / "h", precision="int8")
    runner = OrtVLM(tmp_path / "h", threads=1)
    image = deploy.samples(1)[0]["image"]
    out = runner.heads(image)
    pixels = torch.from_numpy(runner.pixel_values(image))
    with torch.no_grad():
        expected = student(pixels)
    np.testing.assert_allclose(out["seg_logits"], expected.segmentation.numpy(), atol=2e-3)
    np.testing.assert_allclose(
        out["cls_logits"], expected.detection["cls_logits"].numpy(), atol=2e-3
    )
    assert runner.manifest["heads"]["detection"]["num_classes"] == 3
    # the vision graph's second output (the heads' input) does not disturb the VLM's answers
    report = check_parity(student, tmp_path / "h", deploy.samples(3), max_new_tokens=3, threads=1)
    assert report.answers_identical and report.genai_answers_identical in (None, True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dynamo_exporter_writes_the_whole_vlm(deploy, tmp_path):
    """exporter="dynamo" traces the three graphs with the KV cache and the same QDQ forms."""
    model, adapter = deploy.tiny_vlm()
    data = deploy.samples(4, seed=2)
    student = deploy.quantized(model, adapter, deploy.W8, deploy.A8, data)
    export = export_onnx(student, tmp_path / "d", adapter=adapter, exporter="dynamo")
    report = check_parity(student, export.path, data, adapter=adapter, max_new_tokens=3, threads=1)
    assert report.answers_identical and report.max_abs_logit_diff <= 2e-3
    assert report.genai_answers_identical in (None, True)
    assert _optimized_ops(export.graphs["language_model"])["MatMulIntegerToFloat"] == 7


# -- bad input -------------------------------------------------------------------------------------
def test_unsupported_bits_and_formats(deploy, tmp_path):
    model, adapter = deploy.tiny_vlm()
    w3 = deploy.quantized(model, adapter, QuantSpec(bits=3, granularity=PerGroup(32)))
    for precision in ("int8", "int4"):
        with pytest.raises(ValueError, match="3-bit weights are not supported"):
            export_onnx(w3, tmp_path / "x", adapter=adapter, precision=precision)
    nf4 = deploy.quantized(
        model, adapter, QuantSpec(bits=4, format="nf4", granularity=PerGroup(32))
    )
    with pytest.raises(ValueError, match="nf4 weights have no int4"):
        export_onnx(nf4, tmp_path / "x", adapter=adapter, precision="int4")
    w8g = deploy.quantized(model, adapter, QuantSpec(bits=8, granularity=PerGroup(32)))
    with pytest.raises(ValueError, match="per-group 8-bit"):
        export_onnx(w8g, tmp_path / "x", adapter=adapter, precision="int8")
    dynamic = QuantSpec(bits=8, dynamic=True, granularity=PerToken())
    w8dyn = deploy.quantized(model, adapter, deploy.W8, dynamic)
    with pytest.raises(ValueError, match="dynamic activation"):
        export_onnx(w8dyn, tmp_path / "x", adapter=adapter)
    with pytest.raises(ValueError, match="precision"):
        export_onnx(model, tmp_path / "x", adapter=adapter, precision="int2")
    with pytest.raises(ValueError, match="needs quantized weights"):
        export_onnx(model, tmp_path / "x", adapter=adapter, precision="int8")
    assert not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == []


def test_uncalibrated_and_other_models(deploy, tmp_path):
    from distiq.quant import QuantConfig, quantize_

    model, adapter = deploy.tiny_vlm()
    raw = deploy.quantized(model, adapter, deploy.W8, parts=("vision", "language_model"))
    projector = QuantConfig(
        weight=deploy.W8, activation=deploy.A8, include=("model.multi_modal_projector",)
    )
    quantize_(raw, projector)  # and never calibrated
    with pytest.raises(ValueError, match="never calibrated"):
        export_onnx(raw, tmp_path / "x", adapter=adapter)
    with pytest.raises(ValueError, match="adapter"):
        export_onnx(model, tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        export_onnx(model, tmp_path / "full", adapter=adapter, precision="fp32")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_manifest_graph_files_must_stay_inside(tmp_path):
    from distiq.export.onnx import ONNX_FORMAT, ONNX_VERSION, read_onnx_manifest

    (tmp_path / "outside.onnx").write_bytes(b"not read")
    export = tmp_path / "onnx"
    export.mkdir()
    names = ("vision", "embedding", "language_model")
    graphs = {name: {"file": f"{name}.onnx"} for name in names}
    for name in names:
        (export / f"{name}.onnx").write_bytes(b"")
    manifest = {"format": ONNX_FORMAT, "format_version": ONNX_VERSION, "graphs": graphs, "vlm": {}}
    (export / "manifest.json").write_text(json.dumps(manifest))
    assert read_onnx_manifest(export)["graphs"] == graphs
    for bad in ("../outside.onnx", str(tmp_path / "outside.onnx"), "sub/x.onnx", None):
        graphs["vision"] = {"file": bad}
        (export / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match="graphs\\['vision'\\].file"):
            read_onnx_manifest(export)


def test_graphs_too_large_for_one_protobuf_keep_their_weights_beside_them(
    vlm_setup, tmp_path, monkeypatch
):
    """Above the protobuf limit (lowered here) each graph is written with one external data
    file, the tracer's own external files are gone, and the export answers as before."""
    import distiq.export.onnx as onnx_export

    adapter, data, models, _ = vlm_setup
    monkeypatch.setattr(onnx_export, "LARGE_GRAPH_BYTES", 0)
    export = export_onnx(models["int4"], tmp_path / "big", adapter=adapter, precision="int4")
    for graph in export.graphs.values():
        assert Path(f"{graph}.data").is_file(), graph
    assert not [p for p in (tmp_path / "big").iterdir() if p.name.startswith(".")]
    onnx_files = {p.name for p in (tmp_path / "big").glob("*.onnx*")}
    assert onnx_files == {Path(g).name for g in export.graphs.values()} | {
        f"{Path(g).name}.data" for g in export.graphs.values()
    }
    report = check_parity(
        models["int4"], export.path, data, adapter=adapter, max_new_tokens=3, threads=1,
        int4_accuracy_level=0,
    )  # fmt: skip
    assert report.max_abs_logit_diff <= 1e-5 and report.answers_identical
    module = torch.nn.Linear(64, 32)  # weights above onnx's 1 KiB external-data threshold
    file = onnx_export.export_module(
        module, (torch.randn(2, 64),), tmp_path / "one" / "linear.onnx", input_names=["x"],
        output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, precision="fp32",
    )  # fmt: skip
    assert (tmp_path / "one" / "linear.onnx.data").is_file() and file is not None
    x = torch.randn(3, 64)
    (got,) = _session(tmp_path / "one" / "linear.onnx").run(None, {"x": x.numpy()})
    np.testing.assert_allclose(got, module(x).detach().numpy(), atol=1e-6, rtol=0)
