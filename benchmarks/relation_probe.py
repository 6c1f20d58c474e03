"""What a teacher's answers to relation questions depend on (a diagnostic for the demo teacher).

    python benchmarks/relation_probe.py TEACHER_DIR [--images 600] [--out FILE.json]

Relation questions ("is the red circle to the left of the blue square?") are the demo teacher's
weak spot: some runs answer them at 96 %, others at chance. This script answers the test split's
relation questions of the first ``--images`` images that have one with the teacher (greedy
generation, as the evaluation does) and reports how often the answer agrees with:

- the truth (the first object's centre left / right of the second's);
- the first object's side of the image alone (``left of`` → yes when it is in the left half);
- the second object's side alone (``left of`` → yes when it is in the right half);
- "yes" (the rate of yes answers), and the same per direction (``left of`` / ``right of``);

and, of the questions themselves, how often each one-object shortcut is right
(``shortcut_accuracy``): a teacher that agrees with a shortcut more often than that shortcut is
right has learned the shortcut rather than the comparison.

A teacher that uses the image at all for these questions agrees with one of the one-object
shortcuts well above 50 %; one at 50 % for all of them answers relation questions from the
words alone. The teacher directory's ``recipe.yaml`` names the scenes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _teacher(run: Path):
    from distiq.demo.recipe import load_teacher_recipe
    from distiq.demo.scenes import scene_vocabulary
    from distiq.demo.teacher import _processor_adapter
    from distiq.models import build_edge_processor, edge_vlm_config
    from distiq.models.multitask import VLMWithHeads
    from distiq.train.prefix_engine import SharedPrefixEngine

    recipe = load_teacher_recipe(run / "recipe.yaml")
    vocabulary = scene_vocabulary(recipe.data)
    config = edge_vlm_config(recipe.teacher.preset, **recipe.teacher.model)
    adapter = _processor_adapter(build_edge_processor(vocabulary, config), config, vocabulary)
    engine = SharedPrefixEngine(VLMWithHeads.from_pretrained(run), adapter).eval()
    return recipe, adapter, engine


def _centre(objects: list, colours: list, categories: list, colour: str, noun: str) -> float:
    """x of the one object called ``colour noun`` (the question generator's rule)."""
    index = colours.index(colour)
    found = [
        x
        for c, k, x, _ in objects
        if c == index and (categories[k] == noun or (noun == "digit" and categories[k].isdigit()))
    ]
    if len(found) != 1:
        raise ValueError(f"{colour} {noun}: {len(found)} objects match, the generator asks one")
    return found[0]


def probe(run: Path, images: int) -> dict:
    import torch

    from distiq.demo.grounding import load_scene_objects
    from distiq.train.data_setup import load_split

    recipe, adapter, engine = _teacher(run)
    split = load_split(recipe.data, "test", adapter)
    meta = json.loads((Path(recipe.data.scenes) / "meta.json").read_text())
    objects = load_scene_objects(recipe.data.scenes, "test")
    keep = [
        i for i in range(len(split))
        if any(split.questions[r]["question_type"] == "relation" for r in split.rows[i])
    ][:images]  # fmt: skip
    subset = split.subset(keep)
    counts: Counter[str] = Counter()
    with torch.no_grad():
        for start in range(0, len(subset), 64):
            items = [subset[i] for i in range(start, min(start + 64, len(subset)))]
            answers = engine.answers(subset.generation_collate(items))
            questions = [(subset.questions[r], it["image_id"]) for it in items for r in it["rows"]]
            for (question, image_id), answer in zip(questions, answers, strict=True):
                if question["question_type"] != "relation":
                    continue
                # "is the C1 N1 to the left|right of the C2 N2?"
                words = question["question"].rstrip("?").split()
                colour_a, noun_a, side, colour_b, noun_b = (words[i] for i in (2, 3, 6, 9, 10))
                scene = objects[image_id]
                xa = _centre(scene, meta["colours"], meta["categories"], colour_a, noun_a)
                xb = _centre(scene, meta["colours"], meta["categories"], colour_b, noun_b)
                left = side == "left"
                truth = (xa < xb) if left else (xa > xb)
                first_only = (xa < 0.5) if left else (xa > 0.5)
                second_only = (xb > 0.5) if left else (xb < 0.5)
                said_yes = answer == "yes"
                counts["questions"] += 1
                counts["truth"] += said_yes == truth
                counts["first_object_side"] += said_yes == first_only
                counts["second_object_side"] += said_yes == second_only
                counts["yes"] += said_yes
                counts["first_object_side_is_right"] += first_only == truth
                counts["second_object_side_is_right"] += second_only == truth
                counts[f"{side}_of"] += 1
                counts[f"yes_{side}_of"] += said_yes
    n = counts["questions"]
    return {
        "teacher": str(run),
        "questions": n,
        "agreement_with": {
            k: counts[k] / n for k in ("truth", "first_object_side", "second_object_side")
        },
        "shortcut_accuracy": {  # of the data: how often a one-object shortcut is right
            k: counts[f"{k}_is_right"] / n for k in ("first_object_side", "second_object_side")
        },
        "yes_rate": counts["yes"] / n,
        "yes_rate_by_direction": {
            d: counts[f"yes_{d}"] / counts[d] for d in ("left_of", "right_of") if counts[d]
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher", type=Path)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    result = probe(args.teacher, args.images)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
