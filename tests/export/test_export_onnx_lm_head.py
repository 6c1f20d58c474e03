"""A quantized lm_head is exported in its quantized form (MatMulNBits), not as the float
fake-quant ops of the layer it replaced."""

import collections

import numpy as np
import onnx
import onnxruntime as ort
import torch

from distiq.export import export_onnx
from distiq.export.onnx_parts import language_graph
from distiq.export.ort import decoder_feed, session_options


def test_int4_lm_head_runs_matmulnbits(deploy, tmp_path):
    model, adapter = deploy.tiny_vlm()
    quantized = deploy.quantized(model, adapter, deploy.W4G32, parts=("language_model", "lm_head"))
    export_onnx(quantized, tmp_path / "int4", adapter=adapter, precision="int4")
    file = tmp_path / "int4" / "language_model.onnx"
    options = session_options(1, 0)  # accuracy level 0: float activations, the model's math
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(file), options, ["CPUExecutionProvider"])
    ops = collections.Counter(
        n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node
    )
    assert ops["MatMulNBits"] == 7 + 1  # one layer's 4 attention + 3 MLP matrices, the lm_head
    embeds = torch.randn(
        1, 9, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = language_graph(quantized, adapter)(embeds, torch.ones(1, 9, dtype=torch.long))
    logits = session.run(["logits"], decoder_feed(session, embeds.numpy()))[0]
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=0)
