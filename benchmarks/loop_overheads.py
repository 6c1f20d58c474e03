"""What one teacher step of the demo spends outside the model, per rank (one torch thread):

- ``adamw_per_tensor_ms`` / ``adamw_foreach_ms``: ``torch.optim.AdamW.step`` over the demo
  teacher's parameters (with its grounding heads), torch's per-tensor loop (its CPU default)
  against the multi-tensor one the training loop asks for on CPU; ``adamw_same_numbers``: both
  give bit-identical parameters after ``--steps`` steps on the same gradients;
- ``collate_ms``: ``ImageQuestions.collate`` of 16 cached scenes (a rank's share of batch 32);
- ``move_to_device_ms``: ``move_to_device`` of that batch (a walk over ~500 answer strings);
- ``grounding_references_ms`` / ``grounding_targets_ms``: ``GroundingHeads.references`` and
  ``question_targets`` + ``centre_targets`` of that batch.

    .venv/bin/python benchmarks/loop_overheads.py [--scenes 400] [--steps 50]
        [--json benchmarks/results/loop_overheads.json]

Scenes are generated into a temporary folder; the model is the shipped teacher recipe's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _machine import machine_info  # benchmarks/ is on sys.path when run as a script
from distiq.data.scenes import generate_scenes
from distiq.demo.recipe import load_teacher_recipe
from distiq.demo.scenes import scene_vocabulary
from distiq.demo.teacher import (
    _grounding_heads,
    build_teacher_model,
    load_teacher_training_data,
)
from distiq.train.batches import move_to_device
from distiq.train.prefix_engine import SharedPrefixEngine

ROOT = Path(__file__).resolve().parents[1]


def per_call_ms(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls (after one untimed call)."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def adamw(params: list[torch.Tensor], steps: int, foreach: bool) -> tuple[float, list]:
    """(median ms per step, final parameters) of AdamW on fixed random gradients."""
    params = [p.detach().clone().requires_grad_(True) for p in params]
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01, foreach=foreach)
    generator = torch.Generator().manual_seed(0)
    grads = [[torch.randn(p.shape, generator=generator) for p in params] for _ in range(4)]
    times = []
    for p in params:
        p.grad = torch.zeros_like(p)
    for step in range(steps):
        for p, g in zip(params, grads[step % 4]):
            p.grad.copy_(g)  # as a backward pass leaves them: just written
        started = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times[1:]), params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=400)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks/results/loop_overheads.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="distiq-loop-overheads-") as tmp:
        scenes = generate_scenes(Path(tmp) / "data", count=args.scenes, seed=0)
        recipe = load_teacher_recipe(ROOT / "recipes/teacher.yaml")
        recipe = dataclasses.replace(
            recipe, data=dataclasses.replace(recipe.data, scenes=Path(scenes.root))
        )
        data = load_teacher_training_data(recipe)
        data.train.cache_images()
        model = build_teacher_model(recipe, scene_vocabulary(recipe.data), data.train)
        engine = SharedPrefixEngine(model, data.train.adapter)
        grounding = _grounding_heads(recipe, engine, data.train.adapter)
        items = [data.train[i] for i in range(16)]
        batch = data.train.collate(items)
        mask = batch["suffix_mask"].bool() & (batch["labels"] == -100)
        refs = grounding.references(batch["suffix_ids"], mask)
        params = [p for m in (model, grounding) for p in m.parameters() if p.requires_grad]
        loop_ms, loop_params = adamw(params, args.steps, foreach=False)
        foreach_ms, foreach_params = adamw(params, args.steps, foreach=True)
        result = {
            "benchmark": "loop_overheads",
            "parameters": sum(p.numel() for p in params),
            "tensors": len(params),
            "adamw_per_tensor_ms": round(loop_ms, 3),
            "adamw_foreach_ms": round(foreach_ms, 3),
            "adamw_same_numbers": all(
                torch.equal(a, b) for a, b in zip(loop_params, foreach_params)
            ),
            "collate_ms": round(per_call_ms(lambda: data.train.collate(items), 50), 3),
            "move_to_device_ms": round(
                per_call_ms(lambda: move_to_device(batch, torch.device("cpu")), 200), 3
            ),
            "grounding_references_ms": round(
                per_call_ms(lambda: grounding.references(batch["suffix_ids"], mask), 200), 3
            ),
            "grounding_targets_ms": round(
                per_call_ms(
                    lambda: (
                        grounding.question_targets(batch, refs),
                        grounding.centre_targets(batch),
                    ),
                    200,
                ),
                3,
            ),
            "batch_images": len(items),
            "batch_questions": int(batch["suffix_ids"].shape[0]),
            "machine": machine_info(),
        }
    print(json.dumps(result, indent=1))
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
