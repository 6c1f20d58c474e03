"""distiq bench on every VLM family: prefill and decode are timed in PyTorch and onnxruntime for
the families the ONNX export covers (elsewhere each row records the reason); the vision
workload, which feeds one fixed-size image, says why it is not timed where the processor makes
its own patches or tiles."""

from __future__ import annotations

import pytest

from distiq.bench import measure_model
from distiq.bench.backends import DEFAULT_PROMPT_TOKENS, VISION_ONLY_LLAVA
from distiq.models import load

from .conftest import FAMILIES

ONNX_FAMILIES = ("llava", "idefics3", "smolvlm", "qwen2_vl")  # what export_onnx writes


@pytest.mark.parametrize("name", FAMILIES)
def test_bench_times_prefill_and_decode_of_each_family(name, family_dirs):
    model, adapter = load(family_dirs(name))
    results = measure_model(
        model,
        adapter,
        backends=("pytorch-fp32", "ort-fp32"),
        workloads=("language_model", "decode", "vision"),
        threads=1,
        warmup=0,
        repeats=2,
        seq_len=24,
    )
    by_key = {(r.workload, r.backend): r for r in results}
    onnx = name in ONNX_FAMILIES
    for workload in ("language_model", "decode"):
        for backend in ("pytorch-fp32", "ort-fp32"):
            result = by_key[(workload, backend)]
            if not onnx:  # the timed parts are the export's: said, not a crash
                assert not result.available and "export_onnx writes" in result.reason
                continue
            assert result.available and result.timing.median_ms > 0, (workload, backend)
            assert result.detail["prompt_tokens"] == 24
    vision = by_key[("vision", "pytorch-fp32")]
    if name == "llava":
        assert vision.available and vision.timing is not None
    else:
        assert not vision.available and vision.reason == VISION_ONLY_LLAVA


def test_the_default_prompt_of_other_families(family_dirs):
    model, adapter = load(family_dirs("smolvlm"))
    (result,) = measure_model(
        model, adapter, backends=("pytorch-fp32",), threads=1, warmup=0, repeats=1
    )
    assert result.detail["prompt_tokens"] == min(DEFAULT_PROMPT_TOKENS, adapter.max_length)
