"""The QDQ forms for the dynamo-based exporter (``export_onnx(..., exporter="dynamo")``).

The TorchScript exporter (distiq's default) turns the ``symbolic`` methods of
``distiq.export.onnx_quant`` into ONNX nodes. The dynamo exporter instead traces with
``torch.export`` and needs the same three operations as registered operators
(``torch.ops.distiq.act_qdq`` / ``dq_weight`` / ``dq_block``, eager forward = the same arithmetic)
plus onnxscript translations emitting the same nodes — so both exporters write the same graphs
and ``finalize_graph`` post-processes either. Registration happens on first use (importing
``distiq.export`` registers nothing).
"""

from __future__ import annotations

import functools

import torch

NAMESPACE = "distiq"


@functools.cache
def register() -> dict:
    """Register the operators (once) and return the exporter's ``custom_translation_table``."""
    from onnxscript import opset21 as op

    @torch.library.custom_op(f"{NAMESPACE}::act_qdq", mutates_args=())
    def act_qdq(
        x: torch.Tensor,
        inv_scale: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        qmin: int,
        qmax: int,
        axis: int,
    ) -> torch.Tensor:
        # inv_scale broadcasts against x; scale / zero_point are () or (C,) along ``axis``
        # (axis 0 means per tensor: distiq's per-channel activations are on axis -1 or 1)
        z = zero_point.to(torch.float32).reshape(inv_scale.shape)
        q = torch.clamp(torch.round(x * inv_scale) + z, qmin, qmax)
        return (q - z) * scale.reshape(inv_scale.shape)

    @act_qdq.register_fake
    def _(x, inv_scale, scale, zero_point, qmin, qmax, axis):
        return torch.empty_like(x)

    @torch.library.custom_op(f"{NAMESPACE}::dq_weight", mutates_args=())
    def dq_weight(
        codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
    ) -> torch.Tensor:
        return (codes.to(torch.float32) - zero_point.to(torch.float32)) * scale

    @dq_weight.register_fake
    def _(codes, scale, zero_point):
        return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)

    @torch.library.custom_op(f"{NAMESPACE}::dq_block", mutates_args=())
    def dq_block(
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor | None,
        block_size: int,
        signed: bool,
    ) -> torch.Tensor:
        s = scale.repeat_interleave(block_size, dim=0)
        if zero_point is None:
            return codes.to(torch.float32) * s
        z = zero_point.to(torch.float32).repeat_interleave(block_size, dim=0)
        return (codes.to(torch.float32) - z) * s

    @dq_block.register_fake
    def _(codes, scale, zero_point, block_size, signed):
        return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)

    def act_qdq_onnx(x, inv_scale, scale, zero_point, qmin: int, qmax: int, axis: int):
        ones = op.Expand(op.Constant(value_float=1.0), op.Shape(scale))
        if axis != 0:
            q = op.QuantizeLinear(op.Mul(x, inv_scale), ones, zero_point, axis=axis)
            return op.DequantizeLinear(q, scale, zero_point, axis=axis)
        q = op.QuantizeLinear(op.Mul(x, inv_scale), ones, zero_point)
        return op.DequantizeLinear(q, scale, zero_point)

    def dq_weight_onnx(codes, scale, zero_point):
        return op.DequantizeLinear(codes, scale, zero_point, axis=1)

    def dq_block_onnx(codes, scale, zero_point, block_size: int, signed: bool):
        # 4-bit values in an int8 / uint8 carrier; finalize_graph rewrites them as INT4 / UINT4
        if zero_point is None:
            return op.DequantizeLinear(codes, scale, axis=0, block_size=block_size)
        return op.DequantizeLinear(codes, scale, zero_point, axis=0, block_size=block_size)

    return {
        torch.ops.distiq.act_qdq.default: act_qdq_onnx,
        torch.ops.distiq.dq_weight.default: dq_weight_onnx,
        torch.ops.distiq.dq_block.default: dq_block_onnx,
    }
