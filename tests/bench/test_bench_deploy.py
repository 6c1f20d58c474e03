"""Benchmark machinery: interleaved timing, peak memory, backends on a tiny W8A8 model, and
bench_run's records. Speed itself is never asserted."""

import copy
import json
import sys

import pytest
import torch

from distiq.bench import bench_exports, bench_run, measure_model, peak_memory, time_interleaved
from distiq.bench.timing import Timing
from distiq.export import RunDirError
from distiq.results import ResultRecord, read_records, write_records


def test_time_interleaved_counts_and_order():
    calls = []
    functions = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    timings = time_interleaved(functions, warmup=2, repeats=7, chunk=3)
    assert calls[:4] == ["a", "a", "b", "b"]  # warm-up, each in turn
    assert calls[4:] == list("aaabbbaaabbbab")  # timed rounds of 3, interleaved
    for timing in timings.values():
        assert isinstance(timing, Timing) and timing.repeats == 7 and timing.warmup == 2
        assert timing.min_ms <= timing.median_ms <= timing.p90_ms
    with pytest.raises(ValueError):
        time_interleaved(functions, repeats=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_peak_memory_sees_a_block_allocation():
    with peak_memory() as memory:
        block = bytearray(64 * 2**20)
        block[::4096] = b"\1" * len(block[::4096])  # touch every page
    del block
    assert memory.method == "VmHWM"
    assert memory.delta_mb >= 48
    with peak_memory() as small:
        pass
    assert small.delta_mb < 48  # the peak was reset: the earlier block does not count


@pytest.fixture(scope="module")
def w8a8(deploy):
    model, adapter = deploy.tiny_vlm()
    return deploy.quantized(model, adapter, deploy.W8, deploy.A8, deploy.samples(3)), adapter


def test_measure_model_backends(w8a8):
    model, adapter = w8a8
    results = measure_model(
        model, adapter, workloads=("language_model", "vision"), threads=1, warmup=1, repeats=3
    )
    by = {(r.workload, r.backend): r for r in results}
    assert len(by) == 10
    for workload in ("language_model", "vision"):
        for backend in ("pytorch-fp32", "pytorch-w8a8", "ort-fp32", "ort-int8"):
            result = by[(workload, backend)]
            assert result.available and result.timing.repeats == 3, backend
            assert result.memory["peak_mb"] > 0 and result.size_bytes > 0
        int4 = by[(workload, "ort-int4")]
        assert not int4.available and "8-bit weights" in int4.reason
        assert by[(workload, "ort-int8")].size_bytes < by[(workload, "ort-fp32")].size_bytes
    # parity with the fake-quant model (float baselines are not compared: they are not it)
    assert by[("language_model", "ort-int8")].max_abs_diff <= 1e-3
    assert by[("language_model", "pytorch-w8a8")].max_abs_diff <= 1e-3
    assert by[("language_model", "pytorch-fp32")].max_abs_diff is None
    assert by[("language_model", "pytorch-w8a8")].detail["int8_layers"] == 7 + 6 + 2
    with pytest.raises(ValueError, match="unknown backend"):
        measure_model(model, adapter, backends=("tensorrt",))


def _run_dir(deploy, w8a8, path):
    from distiq.train.runs import bake_quantized, save_run_model

    model, adapter = w8a8
    baked = copy.deepcopy(model)
    save_run_model(path, baked, adapter, bake_quantized(baked, method="qad"))
    return path


def test_bench_run_fills_the_run_records(deploy, w8a8, tmp_path):
    run = _run_dir(deploy, w8a8, tmp_path / "qad-w8a8")
    accuracy = ResultRecord(name="qad-w8a8", method="qad", w_bits=8, a_bits=8, value=55.0)
    write_records(run / "results.json", [accuracy])
    records = bench_run(
        run, backends=("pytorch-fp32", "ort-fp32", "ort-int8"), workloads=("language_model",),
        threads=1, warmup=1, repeats=3,
    )  # fmt: skip
    (stored,) = read_records(run / "results.json")
    assert stored == records[0]
    assert stored.value == 55.0 and stored.method == "qad" and stored.w_bits == 8  # kept
    assert stored.latency_backend == "ort-int8" and stored.latency_ms > 0
    bench = stored.extra["bench"]
    assert bench["threads"] == 1 and bench["batch_size"] == 1 and "cpu" in bench["machine"]
    assert set(bench["language_model"]) == {"pytorch-fp32", "ort-fp32", "ort-int8"}
    packed = bench["packed"]
    assert stored.size_mb == pytest.approx(packed["total_bytes"] / 2**20)
    assert 0 < packed["ratio"] < 1  # 8-bit codes; a tiny model is mostly embeddings
    json.dumps(stored.to_dict())  # plain JSON all the way down


def test_bench_run_with_exports_made_ahead(deploy, w8a8, tmp_path, monkeypatch):
    # distiq demo exports in its workers (bench_exports), then bench_run only measures
    import distiq.export.onnx

    run = _run_dir(deploy, w8a8, tmp_path / "qad-w8a8")
    backends = ("ort-fp32", "ort-int8", "ort-int4")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo's workers export
    try:
        exports = bench_exports(run, tmp_path / "onnx", backends=backends)
    finally:
        torch.set_num_threads(threads)
    assert exports["ort-fp32"] == tmp_path / "onnx" / "onnx-fp32"
    assert exports["ort-int8"] == tmp_path / "onnx" / "onnx-int8"
    assert "8-bit weights" in exports["ort-int4"]  # why it cannot export, as measure_model says
    fresh = bench_run(run, backends=backends, workloads=("language_model",), threads=2,
                      warmup=0, repeats=2)  # fmt: skip

    def no_export(*args, **kwargs):
        raise AssertionError("bench_run exported although the exports were given")

    monkeypatch.setattr(distiq.export.onnx, "export_onnx", no_export)
    ahead = bench_run(run, backends=backends, workloads=("language_model",), threads=2,
                      warmup=0, repeats=2, exports=exports)  # fmt: skip
    assert (tmp_path / "onnx" / "onnx-int8").is_dir()  # the caller's files: left in place
    old, new = (r[0].extra["bench"]["language_model"] for r in (fresh, ahead))
    for backend in backends:
        for key in ("available", "reason", "size_bytes", "max_abs_diff"):
            assert old[backend][key] == new[backend][key], (backend, key)
    assert ahead[0].size_mb == fresh[0].size_mb and ahead[0].latency_backend == "ort-int8"


def test_bench_run_without_records_and_bad_input(deploy, w8a8, tmp_path):
    run = _run_dir(deploy, w8a8, tmp_path / "w8a8-run")
    (record,) = bench_run(
        run, backends=("ort-fp32",), workloads=("language_model",), threads=1, warmup=0,
        repeats=2,
    )  # fmt: skip
    assert record.name == "w8a8-run" and record.method == "qad"
    assert (record.w_bits, record.a_bits, record.group_size) == (8, 8, None)
    assert record.latency_backend == "ort-fp32"
    (tmp_path / "nothing").mkdir()
    with pytest.raises(RunDirError, match="holds no model"):
        bench_run(tmp_path / "nothing")
    assert not (tmp_path / "nothing" / "results.json").exists()


def test_bench_never_writes_into_a_users_checkpoint(deploy, w8a8, tmp_path):
    """A plain Hugging Face directory (not a distiq run) is measured, not written into."""
    import shutil

    run = _run_dir(deploy, w8a8, tmp_path / "run")
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(run / name, checkpoint / name)
    for path in run.iterdir():  # the processing files
        if path.suffix in (".json", ".jinja", ".txt") and path.name not in (
            "quantization.json",
            "results.json",
            "checksums.json",
        ):
            shutil.copy(path, checkpoint / path.name)
    before = sorted(p.name for p in checkpoint.iterdir())
    (record,) = bench_run(
        checkpoint, backends=("ort-fp32",), workloads=("language_model",), threads=1, warmup=0,
        repeats=2,
    )  # fmt: skip
    assert record.method == "teacher" and record.latency_ms > 0
    assert sorted(p.name for p in checkpoint.iterdir()) == before
    out = tmp_path / "scores.json"
    bench_run(checkpoint, backends=("ort-fp32",), workloads=("language_model",), threads=1,
              warmup=0, repeats=2, results=out)  # fmt: skip
    assert read_records(out)[0].latency_ms > 0
