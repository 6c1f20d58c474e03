"""``describe(model)``: parameter counts per part (vision / projector / language model / heads)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from distiq.models.parts import ModuleNames, QuantTarget

PART_ORDER = ("vision", "projector", "language_model", "lm_head", "heads", "other")


@dataclass(frozen=True)
class ModelDescription:
    """Parameter counts of a model by part.

    Attributes:
        params: ``{part: count}`` over ``vision``, ``projector``, ``language_model``
            (embeddings included), ``lm_head`` (0 when tied to the embeddings), ``heads``,
            ``other``; parts a model lacks are left out. Shared (tied) tensors count once.
        total: all parameters (the sum of ``params``).
        trainable: parameters with ``requires_grad``.
        family: the adapter family, or None for a model no adapter describes.
    """

    params: dict[str, int]
    total: int
    trainable: int
    family: str | None = None

    def as_dict(self) -> dict:
        return {
            "family": self.family,
            "params": dict(self.params),
            "total": self.total,
            "trainable": self.trainable,
        }

    def table(self) -> str:
        """A fixed-width table: part, parameters, share, fp32 size."""
        rows = [("part", "params", "share", "fp32 MB")]
        for part, count in self.params.items():
            share = f"{100 * count / self.total:.1f}%" if self.total else "-"
            rows.append((part, f"{count:,}", share, f"{4 * count / 2**20:.2f}"))
        rows.append(("total", f"{self.total:,}", "100.0%", f"{4 * self.total / 2**20:.2f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = []
        for index, row in enumerate(rows):
            cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
            lines.append("  ".join(cells))
            if index == 0 or index == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def describe(model: nn.Module) -> ModelDescription:
    """Count ``model``'s parameters per part.

    Works on a Hugging Face VLM with a registered adapter, on ``VLMWithHeads``, and on any
    ``nn.Module`` (everything then counts as ``other``).
    """
    from distiq.models.loading import UnsupportedModelError, adapter_class
    from distiq.models.multitask import VLMWithHeads

    family = None
    targets: dict[str, QuantTarget] = {}
    extra: tuple[str, ...] = ()
    if isinstance(model, VLMWithHeads):
        targets = _part_targets(model.adapter.names_for(model.adapter.prefix))
        targets["heads"] = model.quant_targets()["heads"]
        extra = tuple(model.adapter.prefix + p for p in model.adapter.projector_parameters)
        family = model.adapter.family
    elif getattr(model, "config", None) is not None:
        try:
            cls = adapter_class(model)
        except UnsupportedModelError:
            cls = None
        if cls is not None:
            targets = _part_targets(cls.names_for(""))
            extra = cls.projector_parameters
            family = cls.family

    counts = {part: 0 for part in PART_ORDER}
    trainable = 0
    for name, param in model.named_parameters():  # tied parameters appear once
        module_name = name.rsplit(".", 1)[0]
        part = next((p for p, t in targets.items() if t.selects(module_name)), "other")
        if name in extra:
            part = "projector"
        counts[part] += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    params = {p: c for p, c in counts.items() if c or p in targets}
    return ModelDescription(
        params=params, total=sum(counts.values()), trainable=trainable, family=family
    )


def _part_targets(names: ModuleNames) -> dict[str, QuantTarget]:
    """Part membership for counting: each part's whole module (embeddings included); a
    projector nested in the vision tower (Qwen2-VL's merger) counts as projector."""
    return {
        # The projector is matched first so a projector nested in the tower counts as projector.
        "projector": QuantTarget((names.projector,)),
        "vision": QuantTarget((names.vision,), (names.projector,)),
        "language_model": QuantTarget((names.language_model,)),
        "lm_head": QuantTarget((names.lm_head,)),
    }
