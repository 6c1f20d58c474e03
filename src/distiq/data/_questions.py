"""Question templates, candidate questions of a scene, and answer balancing (for
:mod:`distiq.data.scenes`).

Every question is lower-case words separated by single spaces, ending in ``"?"`` glued to the
last word; every answer is one word. The templates (``{ref}`` is ``"{colour} {noun}"``, e.g.
``"red circle"`` or ``"blue digit"``, used only when exactly one object matches it):

============ ======================================================== =======================
type         templates                                                answers
============ ======================================================== =======================
count        how many objects are there? / how many {colour} objects  ``"0"``..``"6"``
             are there? / how many {plural} are there?
color        what color is the {noun}?  (the only {noun} in the scene) colour names
identity     what shape is the {colour} object? / what digit is the   shape names, digits
             {colour} object?  (the only {colour} object)
position     is the {ref} on the left or the right? / is the {ref} at  left, right, top,
             the top or the bottom?                                   bottom
relation     is the {ref} to the left of the {ref}? / ... to the      yes, no
             right of the {ref}?
exist        is there a {colour} {noun}?                              yes, no
compare      are there more {plural} than {plural}? / are there more  yes, no (equal: no)
             {colour} objects than {colour} objects?
============ ======================================================== =======================

Position and relation questions are asked only when the object centres (centres of the visible
boxes) are at least ``margin`` pixels from the image's midline / from each other, so that every
answer is unambiguous.

Balancing: a scene offers many candidate questions. :class:`Balancer` picks, for each of a
scene's questions, the least-asked question type that the scene supports, then the candidate of
that type whose answer is rarest *for its exact question text* so far (ties broken at random).
So every question text's answers tend to the uniform distribution over the answers that scenes
can give, and a model that reads only the question cannot do much better than that prior (see
``scenes.blind_baseline_accuracy``). Counters are local to a chunk of scenes, so generation is
deterministic by seed whatever the number of worker processes.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from distiq.data._render import SHAPE_PLURALS

QUESTION_TYPES: tuple[str, ...] = (
    "count",
    "color",
    "identity",
    "position",
    "relation",
    "exist",
    "compare",
)
ANSWER_TYPES: dict[str, str] = {
    "count": "number",
    "color": "other",
    "identity": "other",
    "position": "other",
    "relation": "yes/no",
    "exist": "yes/no",
    "compare": "yes/no",
}
POSITION_WORDS: tuple[str, ...] = ("left", "right", "top", "bottom")


@dataclass(frozen=True)
class QuestionObject:
    """What the questions know of an object: its colour name, category name (``"circle"``,
    ``"4"``), noun (``"circle"``, ``"digit"``) and visible-box centre in pixels."""

    colour: str
    category: str
    noun: str
    cx: float
    cy: float


def _ref(colour: str, noun: str) -> str:
    return f"{colour} {noun}"


def candidates(
    objects: list[QuestionObject],
    *,
    size: int,
    colours: tuple[str, ...],
    nouns: tuple[str, ...],
    margin: float,
) -> dict[str, list[tuple[str, str]]]:
    """All ``(question, answer)`` pairs that ``objects`` support, by question type."""
    out: dict[str, list[tuple[str, str]]] = {t: [] for t in QUESTION_TYPES}
    by_colour = Counter(o.colour for o in objects)
    by_noun = Counter(o.noun for o in objects)
    by_ref = Counter(_ref(o.colour, o.noun) for o in objects)

    out["count"].append(("how many objects are there?", str(len(objects))))
    for colour in colours:
        out["count"].append((f"how many {colour} objects are there?", str(by_colour[colour])))
    for noun in nouns:
        out["count"].append((f"how many {SHAPE_PLURALS[noun]} are there?", str(by_noun[noun])))

    for o in objects:
        if by_noun[o.noun] == 1:
            out["color"].append((f"what color is the {o.noun}?", o.colour))
        if by_colour[o.colour] == 1:
            kind = "digit" if o.noun == "digit" else "shape"
            out["identity"].append((f"what {kind} is the {o.colour} object?", o.category))

    unique = [o for o in objects if by_ref[_ref(o.colour, o.noun)] == 1]
    half = size / 2.0
    for o in unique:
        ref = _ref(o.colour, o.noun)
        if abs(o.cx - half) >= margin:
            answer = "left" if o.cx < half else "right"
            out["position"].append((f"is the {ref} on the left or the right?", answer))
        if abs(o.cy - half) >= margin:
            answer = "top" if o.cy < half else "bottom"
            out["position"].append((f"is the {ref} at the top or the bottom?", answer))
    for a, b in itertools.permutations(unique, 2):
        if abs(a.cx - b.cx) < margin:
            continue
        ref_a, ref_b = _ref(a.colour, a.noun), _ref(b.colour, b.noun)
        left = "yes" if a.cx < b.cx else "no"
        right = "yes" if a.cx > b.cx else "no"
        out["relation"].append((f"is the {ref_a} to the left of the {ref_b}?", left))
        out["relation"].append((f"is the {ref_a} to the right of the {ref_b}?", right))

    for colour in colours:
        for noun in nouns:
            answer = "yes" if by_ref[_ref(colour, noun)] else "no"
            out["exist"].append((f"is there a {colour} {noun}?", answer))

    for n1, n2 in itertools.permutations(nouns, 2):
        if by_noun[n1] or by_noun[n2]:
            answer = "yes" if by_noun[n1] > by_noun[n2] else "no"
            text = f"are there more {SHAPE_PLURALS[n1]} than {SHAPE_PLURALS[n2]}?"
            out["compare"].append((text, answer))
    for c1, c2 in itertools.permutations(colours, 2):
        if by_colour[c1] or by_colour[c2]:
            answer = "yes" if by_colour[c1] > by_colour[c2] else "no"
            out["compare"].append((f"are there more {c1} objects than {c2} objects?", answer))
    return out


class Balancer:
    """Chooses a scene's questions so that question types and, per question text, answers stay
    balanced (see the module docstring). State is per chunk of scenes."""

    def __init__(self, question_types: tuple[str, ...], rng: np.random.Generator) -> None:
        self.question_types = question_types
        self.rng = rng
        self.type_counts: Counter[str] = Counter()
        self.answer_counts: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.totals: Counter[str] = Counter()

    def choose(
        self, options: dict[str, list[tuple[str, str]]], k: int
    ) -> list[tuple[str, str, str]]:
        """Pick up to ``k`` distinct questions; returns ``(question_type, question, answer)``."""
        chosen: list[tuple[str, str, str]] = []
        used_texts: set[str] = set()
        used_types: set[str] = set()
        for _ in range(k):
            available = [
                t
                for t in self.question_types
                if any(text not in used_texts for text, _ in options[t])
            ]
            if not available:
                break
            fresh = [t for t in available if t not in used_types] or available
            noise = self.rng.random(len(fresh))
            qtype = fresh[
                min(range(len(fresh)), key=lambda i: (self.type_counts[fresh[i]], noise[i]))
            ]
            pool = [(text, ans) for text, ans in options[qtype] if text not in used_texts]
            noise = self.rng.random(len(pool)).tolist()
            # Rarity of each candidate's answer among the answers its text has had so far.
            rarity = [
                (self.answer_counts[text][ans] / (1.0 + self.totals[text]), tie)
                for (text, ans), tie in zip(pool, noise)
            ]
            text, answer = pool[min(range(len(pool)), key=rarity.__getitem__)]
            self.type_counts[qtype] += 1
            self.answer_counts[text][answer] += 1
            self.totals[text] += 1
            used_texts.add(text)
            used_types.add(qtype)
            chosen.append((qtype, text, answer))
        return chosen


def template_words(
    colours: tuple[str, ...], nouns: tuple[str, ...], max_objects: int, categories: tuple[str, ...]
) -> set[str]:
    """Every word (and ``"?"``) that :func:`candidates` can put in a question or an answer."""
    fixed = (
        "how many objects are there what color is the shape digit object on left or right at "
        "top bottom to of a more than yes no"
    )
    words = set(fixed.split()) | {"?"}
    words |= set(colours) | set(nouns) | {SHAPE_PLURALS[n] for n in nouns}
    words |= {str(i) for i in range(max_objects + 1)} | set(categories) | set(POSITION_WORDS)
    return words


def split_words(text: str) -> list[str]:
    """Split a question or answer into vocabulary items: words, with ``"?"`` on its own."""
    return text.replace("?", " ?").split()
