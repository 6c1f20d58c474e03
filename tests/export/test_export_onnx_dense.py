"""Dense ONNX exports (``distiq.export.onnx_dense``) loaded in onnxruntime: float graphs give
the model's outputs, the manifest describes the graph, a folder that is not one is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from distiq.export.onnx_dense import OrtDense, export_dense_onnx, read_dense_manifest
from distiq.models import build_dense


@pytest.mark.parametrize(
    ("family", "labels"), [("segformer", 5), ("detr", 3), ("depth_anything", 1)]
)
def test_float_export_runs_the_model_in_onnxruntime(family, labels, tmp_path):
    model, adapter = build_dense(family, num_labels=labels, image_size=32, seed=2)
    manifest = export_dense_onnx(model, tmp_path / "onnx", adapter=adapter, precision="fp32")
    assert manifest == read_dense_manifest(tmp_path / "onnx")
    assert manifest["input"]["shape"] == ["batch", 3, 32, 32]
    ort_model = OrtDense(tmp_path / "onnx", threads=1)
    assert ort_model.adapter.family == family and ort_model.adapter.input_size == (32, 32)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)) for _ in range(3)]
    pixels = ort_model.adapter.pixel_values(images)
    torch.testing.assert_close(pixels, adapter.pixel_values(images))
    with torch.no_grad():
        expected = adapter.forward(model, pixels)
    got = ort_model(pixels)  # batch 3 through a graph traced at batch 1
    for name in manifest["outputs"]:
        torch.testing.assert_close(
            getattr(got, name), getattr(expected, name), atol=1e-4, rtol=1e-4
        )


def test_a_folder_that_is_no_dense_export_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_dense_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "distiq.onnx"}))
    with pytest.raises(ValueError, match="not distiq.onnx-dense"):
        read_dense_manifest(tmp_path)
    model, adapter = build_dense("segformer", num_labels=2, image_size=32)
    with pytest.raises(ValueError, match="not empty"):
        export_dense_onnx(model, tmp_path, adapter=adapter, precision="fp32")
