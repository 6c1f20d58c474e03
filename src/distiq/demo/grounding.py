"""Grounded auxiliary supervision for training the teacher on the synthetic scenes.

A one-word answer is one bit of supervision per question; from it alone a small VLM learns,
within a CPU budget, little more than the question prior. The synthetic scenes know much more about every image: each object's
colour, category and position (the COCO annotations carry ``"color"``). Two auxiliary heads turn
that into dense targets during teacher training (they are not part of the saved teacher):

- **question references** (:class:`GroundingHeads.question`): at every question token that names
  objects — a noun (``circle``, ``digits``, ``objects``) with the colour word before it, or a
  lone colour word — a linear head on the language model's hidden state after layer
  ``layer`` predicts, for the objects that match the words so far: their number (0..6, 7
  classes) and, when exactly one matches, its colour, its category, its x and y (8 bins each)
  and its centre (regression); at every reference after the first, also how many objects it
  names against the previous one (fewer, as many or more) and, with ``side_target`` (the
  default), whether its object is left or right of the previous one's (when both are single
  objects). By default that side target is read after layer ``layer`` too (layer 1 of 3),
  where the previous reference's position is not known yet, so the best a model can do there is
  guess from its own object's side; ``side_layer`` reads it from a later layer through its own
  linear head instead (docs/experiments/ has the measurements). This teaches the language model
  the lookups and comparisons the answers need (find the red circle; count the digits; is it
  left of the blue square) directly at the words, a layer before the answer.
- **object centres** (:class:`GroundingHeads.centres`): a linear head on each vision patch
  feature predicts which (colour, category) object has its centre in that patch, or none — a
  per-object marker that makes counting a sum over patches.
- **scene counts** (:class:`GroundingHeads.counts`, optional): a linear head on every image
  token the language model receives (the projector's output) predicts the scene's counts — of
  each colour, of each noun (shape or digit) and of all objects (0..6 each) — so a count is a
  single-word lookup in any image token.

Both are cross-entropies (mean over their targets) plus a mean squared error for the centres'
coordinates (scaled to [0, 2]); :meth:`GroundingHeads.loss` returns them as separate terms.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MAX_COUNT = 6
BINS = 8
XY_SCALE = 2.0


@dataclass(frozen=True)
class SceneVocabulary:
    """How questions name objects: colours, categories (shapes then digits), and each noun
    word's categories (``None`` = any object)."""

    colours: tuple[str, ...]
    categories: tuple[str, ...]
    nouns: dict[str, tuple[int, ...] | None]

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> SceneVocabulary:
        colours = tuple(meta["colours"])
        categories = tuple(meta["categories"])
        words = set(meta.get("vocabulary", ()))
        nouns: dict[str, tuple[int, ...] | None] = {"object": None, "objects": None}
        digits = tuple(i for i, c in enumerate(categories) if c.isdigit())
        if digits:
            nouns["digit"] = nouns["digits"] = digits
        for index, name in enumerate(categories):
            if name.isdigit():
                continue
            for form in (name, name + "s", name + "es"):
                if form == name or form in words:
                    nouns[form] = (index,)
        return cls(colours, categories, nouns)


def load_scene_objects(
    root: str | Path, split: str
) -> dict[int, list[tuple[int, int, float, float]]]:
    """``{image_id: [(colour, category, x, y), ...]}`` from a scene set's COCO instances of
    ``split`` (x, y: the visible box centre as a fraction of the image size)."""
    root = Path(root)
    meta = json.loads((root / "meta.json").read_text())
    colours = list(meta["colours"])
    instances = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
    sizes = {im["id"]: (im["width"], im["height"]) for im in instances["images"]}
    categories = sorted(c["id"] for c in instances["categories"])
    objects: dict[int, list[tuple[int, int, float, float]]] = {i: [] for i in sizes}
    for ann in instances["annotations"]:
        if "color" not in ann:
            raise ValueError(
                f"{root}: instance annotations carry no 'color'; grounding targets need the "
                "synthetic scenes' annotations (set teacher.weights.grounding: 0)"
            )
        width, height = sizes[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        objects[ann["image_id"]].append(
            (
                colours.index(ann["color"]),
                categories.index(ann["category_id"]),
                (x + w / 2) / width,
                (y + h / 2) / height,
            )
        )
    return objects


class GroundingHeads(nn.Module):
    """The two auxiliary heads (see the module docstring).

    Args:
        vocabulary: the scenes' :class:`SceneVocabulary`.
        tokenizer: the model's tokenizer (question ids -> words).
        text_dim, vision_dim: hidden widths of the language model and the vision tower.
        grid: (Hp, Wp) patch grid of the vision tower.
        objects: ``{image_id: objects}`` of the training split (:func:`load_scene_objects`).
        side_target: also train the left / right-of-the-previous-reference target (see the
            module docstring; ``teacher.side_target`` in a recipe).
        separate_side: read the side target with its own linear head from the hidden states
            that :meth:`loss` gets as ``side_hidden`` (``teacher.side_layer``) instead of with
            :attr:`question` from ``hidden``.
    """

    def __init__(
        self,
        vocabulary: SceneVocabulary,
        tokenizer: Any,
        text_dim: int,
        vision_dim: int,
        grid: tuple[int, int],
        objects: dict[int, list[tuple[int, int, float, float]]],
        side_target: bool = True,
        separate_side: bool = False,
    ) -> None:
        super().__init__()
        self.side_target = side_target
        self.vocabulary = vocabulary
        self.objects = objects
        self.grid = grid
        colours, categories = len(vocabulary.colours), len(vocabulary.categories)
        # count, colour, category, x bin, y bin, left/right of the previous reference,
        # fewer/as many/more objects than the previous reference
        self.sizes = (MAX_COUNT + 1, colours, categories, BINS, BINS, 2, 3)
        self.question = nn.Linear(text_dim, sum(self.sizes) + 2)
        self.centres = nn.Linear(vision_dim, 1 + colours * categories)
        noun_groups = sorted({v for v in vocabulary.nouns.values() if v is not None})
        self._count_groups = (
            [(c, None) for c in range(colours)] + [(None, g) for g in noun_groups] + [(None, None)]
        )
        self.counts = nn.Linear(text_dim, len(self._count_groups) * (MAX_COUNT + 1))
        words = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        colour_of = {w: i for i, w in enumerate(vocabulary.colours)}
        self._colour = torch.tensor([colour_of.get(w, -1) for w in words])
        self._what = [
            w == "what" for w in words
        ]  # "what digit is ..." asks (a list: read per token)
        self._noun = [vocabulary.nouns.get(w, ()) for w in words]  # () = not a noun
        self._is_noun = torch.tensor([w in vocabulary.nouns for w in words])
        # created last, so that the default heads start from the same random numbers
        self.side = nn.Linear(text_dim, 2) if separate_side and side_target else None

    # ------------------------------------------------------------------ targets
    def references(self, suffix_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[tuple]:
        """``[(q, t, colour | None, categories | None)]``: the question tokens that name
        objects (see the module docstring): nouns (with the colour word before them) and lone
        colour words; a noun right after "what" asks for the kind of answer and is skipped."""
        ids = suffix_ids.cpu()
        colour_t = self._colour[ids]  # (Q, S)
        noun_t = self._is_noun[ids]
        picked = (prompt_mask.cpu().bool() & ((colour_t >= 0) | noun_t)).nonzero().tolist()
        # plain lists from here: indexing a tensor element by element costs ~100x more
        ids_l, colour, noun = ids.tolist(), colour_t.tolist(), noun_t.tolist()
        what = self._what
        width = ids.shape[1]
        refs = []
        for q, t in picked:
            if noun[q][t] and t > 0 and what[ids_l[q][t - 1]]:
                continue  # "what digit is the red object?": the kind of answer, not an object
            if noun[q][t]:
                before = colour[q][t - 1] if t > 0 else -1
                refs.append((q, t, before if before >= 0 else None, self._noun[ids_l[q][t]]))
            elif not (t + 1 < width and noun[q][t + 1]):
                refs.append((q, t, colour[q][t], None))
        return refs

    def question_targets(self, batch: dict, refs: list[tuple]) -> tuple[torch.Tensor, ...]:
        """Targets of ``refs``: count (R,), colour, category, x bin, y bin (R,) with -100 where
        the words do not pick exactly one object, side (R,): 0 left / 1 right of the previous
        reference's object (-100 unless both are single objects and ``side_target``), amount
        (R,): 0 fewer / 1 as many / 2 more objects than the previous reference (-100 for a
        question's first reference), and xy (R, 2) with a weight (R,)."""
        image_ids = batch["image_id"].tolist()
        question_image = batch["question_image"].tolist()
        count, colour, category, xbin, ybin, xy, weight = [], [], [], [], [], [], []
        side, amount = [], []
        previous: tuple[int, list] | None = None
        for q, _, want_colour, want_categories in refs:
            objects = self.objects.get(image_ids[question_image[q]], [])
            match = [
                o
                for o in objects
                if (want_colour is None or o[0] == want_colour)
                and (want_categories is None or o[1] in want_categories)
            ]
            count.append(min(len(match), MAX_COUNT))
            if previous is not None and previous[0] == q:
                before = previous[1]
                amount.append(
                    0 if len(match) < len(before) else 1 if len(match) == len(before) else 2
                )
                single = len(match) == 1 and len(before) == 1
                side.append(
                    int(match[0][2] > before[0][2]) if single and self.side_target else -100
                )
            else:
                amount.append(-100)
                side.append(-100)
            previous = (q, match)
            if len(match) == 1:
                c, k, x, y = match[0]
                colour.append(c)
                category.append(k)
                xbin.append(min(int(x * BINS), BINS - 1))
                ybin.append(min(int(y * BINS), BINS - 1))
                xy.append((x, y))
                weight.append(1.0)
            else:
                colour.append(-100)
                category.append(-100)
                xbin.append(-100)
                ybin.append(-100)
                xy.append((0.0, 0.0))
                weight.append(0.0)
        longs = [
            torch.tensor(v, dtype=torch.long)
            for v in (count, colour, category, xbin, ybin, side, amount)
        ]
        return (*longs, torch.tensor(xy, dtype=torch.float32), torch.tensor(weight))

    def centre_targets(self, batch: dict) -> torch.Tensor:
        """(B, Hp*Wp) long: ``1 + colour * categories + category`` of the object whose centre is
        in the patch (0 = none)."""
        height, width = self.grid
        categories = len(self.vocabulary.categories)
        out = torch.zeros(len(batch["image_id"]), height * width, dtype=torch.long)
        for b, image_id in enumerate(batch["image_id"].tolist()):
            for c, k, x, y in self.objects.get(image_id, []):
                row = min(int(y * height), height - 1)
                col = min(int(x * width), width - 1)
                out[b, row * width + col] = 1 + c * categories + k
        return out

    def count_targets(self, batch: dict) -> torch.Tensor:
        """(B, G) long: the scene's count (0..6) of each count group (colours, nouns, all)."""
        rows = []
        for image_id in batch["image_id"].tolist():
            objects = self.objects.get(image_id, [])
            rows.append(
                [
                    min(
                        sum(
                            1
                            for o in objects
                            if (c is None or o[0] == c) and (g is None or o[1] in g)
                        ),
                        MAX_COUNT,
                    )
                    for c, g in self._count_groups
                ]
            )
        return torch.tensor(rows, dtype=torch.long)

    # ------------------------------------------------------------------ loss
    def loss(
        self,
        batch: dict,
        hidden: torch.Tensor | None,
        patches: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        side_hidden: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"grounding", "centres"[, "counts"]}`` for a batch. ``hidden``: (Q, S, D_text) the
        language model's suffix states after layer ``layer``; ``patches``: (B, P, D_vision);
        ``image_embeds``: (B, P, D_text) the projected image tokens (for ``counts``);
        ``side_hidden``: (Q, S, D_text) the states after layer ``side_layer`` (with
        ``separate_side``)."""
        terms = {}
        if image_embeds is not None:
            logits = self.counts(image_embeds).float()  # (B, P, G * 7)
            targets = self.count_targets(batch).to(logits.device)  # (B, G)
            targets = targets[:, None, :].expand(-1, logits.shape[1], -1)
            terms["counts"] = F.cross_entropy(
                logits.reshape(-1, MAX_COUNT + 1), targets.reshape(-1)
            )
        centre_logits = self.centres(patches)  # (B, P, 1 + C*K)
        targets = self.centre_targets(batch).to(patches.device)
        terms["centres"] = F.cross_entropy(
            centre_logits.reshape(-1, centre_logits.shape[-1]).float(), targets.reshape(-1)
        )
        if hidden is None:
            return terms
        prompt_mask = batch["suffix_mask"].bool()
        if "labels" in batch:  # answer tokens (labels != -100) are not question words
            prompt_mask = prompt_mask & (batch["labels"] == -100)
        refs = self.references(batch["suffix_ids"], prompt_mask)
        if not refs:
            return terms
        count, *classes, xy, weight = (
            t.to(hidden.device) for t in self.question_targets(batch, refs)
        )
        rows = torch.tensor([r[0] for r in refs], device=hidden.device)
        cols = torch.tensor([r[1] for r in refs], device=hidden.device)
        logits = self.question(hidden[rows, cols]).float()  # (R, sum(sizes) + 2)
        parts = list(torch.split(logits, [*self.sizes, 2], dim=-1))
        if self.side is not None:
            if side_hidden is None:
                raise ValueError("separate_side: loss() needs side_hidden (teacher.side_layer)")
            parts[5] = self.side(side_hidden[rows, cols]).float()  # (R, 2): left / right
        total = F.cross_entropy(parts[0], count)
        for part, target in zip(parts[1 : len(self.sizes)], classes):
            if bool((target != -100).any()):
                total = total + F.cross_entropy(part, target, ignore_index=-100)
        if float(weight.sum()) > 0:
            error = ((parts[-1] - xy * XY_SCALE) ** 2).sum(dim=-1)  # the centre (x, y)
            total = total + (error * weight).sum() / weight.sum()
        terms["grounding"] = total
        return terms
