"""``SizeBreakdown``: what a packed checkpoint's bytes are spent on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class SizeBreakdown:
    """Bytes of a packed checkpoint by kind, and the fp32 size of the same model.

    ``fp32_bytes`` counts every tensor of the float model at 4 bytes per value (what a float32
    safetensors file of it holds, header aside). ``header_bytes`` is the safetensors header plus
    the manifest; ``processor_bytes`` the config, tokenizer and processor files, which a float
    checkpoint ships too, so ``ratio = total_bytes / fp32_bytes`` leaves them out.
    """

    codes_bytes: int = 0
    scale_bytes: int = 0
    zero_point_bytes: int = 0
    index_bytes: int = 0
    activation_bytes: int = 0
    fp_bytes: int = 0
    header_bytes: int = 0
    processor_bytes: int = 0
    fp32_bytes: int = 0
    quantized_params: int = 0
    fp_params: int = 0

    @property
    def total_bytes(self) -> int:
        return (
            self.codes_bytes + self.scale_bytes + self.zero_point_bytes + self.index_bytes
            + self.activation_bytes + self.fp_bytes + self.header_bytes
        )  # fmt: skip

    @property
    def ratio(self) -> float:
        return self.total_bytes / self.fp32_bytes if self.fp32_bytes else float("nan")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes, "ratio": self.ratio}

    def table(self) -> str:
        rows = [
            ("codes (packed)", self.codes_bytes),
            ("scales", self.scale_bytes),
            ("zero-points", self.zero_point_bytes),
            ("group index (act-order)", self.index_bytes),
            ("activation qparams", self.activation_bytes),
            ("fp leftovers", self.fp_bytes),
            ("header + manifest", self.header_bytes),
            ("total (weights + manifest)", self.total_bytes),
            ("fp32 model", self.fp32_bytes),
            ("config + processor files", self.processor_bytes),
        ]
        total = self.total_bytes or 1
        lines = [f"{'part':<28}{'bytes':>12}{'share':>9}"]
        for label, value in rows:
            share = f"{100 * value / total:.1f}%" if value <= total and "fp32" not in label else ""
            lines.append(f"{label:<28}{value:>12,}{share:>9}")
        lines.append(
            f"ratio to fp32: {self.ratio:.4f}x  ({self.quantized_params:,} quantized weights, "
            f"{self.fp_params:,} full-precision values)"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
