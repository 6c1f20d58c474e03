"""What each of the demo's compression runs used to repeat before it did any work, each part
timed in a fresh Python process (one torch thread):

- ``import_model_code``: ``distiq.models.import_edge_vlm_code()`` (transformers' model,
  tokenizer and processor code of the built-in edge VLM), after ``import distiq.train``;
- ``load_vqa_train``: ``load_vqa_v2`` of the scene set's train split (``check_images=False``, as
  the engine loads it);
- ``run_data``: ``distiq.train.run_data(recipe)`` for a compression recipe on
  that scene set and teacher (three splits, tokenized, and the blind baseline).

    .venv/bin/python benchmarks/demo_setup_costs.py --scenes DATA_DIR --teacher TEACHER_DIR
        [--repeats 3] [--json benchmarks/results/demo_setup_costs.json]

Each part is timed ``--repeats`` times (a new process each) and the median is reported. Run it
with ``PYTHONPATH=OTHER_CHECKOUT/src`` to time another version of the code (a part its code does
not have is reported as missing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from _machine import machine_info  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]

PARTS = {
    "import_model_code": (
        "import distiq.train\n"
        "from distiq.models import import_edge_vlm_code\n"
        "t = time.perf_counter(); import_edge_vlm_code(); seconds = time.perf_counter() - t\n"
    ),
    "load_vqa_train": (
        "from distiq.data.scenes import ScenePaths\n"
        "t = time.perf_counter(); ScenePaths.at(SCENES).vqa('train', check_images=False)\n"
        "seconds = time.perf_counter() - t\n"
    ),
    "run_data": (
        "from distiq.train import run_data\n"
        "from distiq.train.recipe import recipe_from_dict\n"
        "recipe = recipe_from_dict({'method': 'rtn', 'teacher': TEACHER, 'output': '/tmp/unused',"
        " 'data': {'scenes': SCENES, 'val_questions': 600},"
        " 'quantization': {'weight': {'bits': 4}}})\n"
        "import distiq.models, transformers\n"
        "t = time.perf_counter(); run_data(recipe); seconds = time.perf_counter() - t\n"
    ),
}


def _time_part(name: str, scenes: Path, teacher: Path) -> float | None:
    code = (
        "import json, time, torch\n"
        "torch.set_num_threads(1)\n"
        f"SCENES, TEACHER = {str(scenes)!r}, {str(teacher)!r}\n"
        "try:\n"
        + "".join(f"    {line}\n" for line in PARTS[name].splitlines())
        + "except ImportError:  # a part this version of the code does not have\n"
        "    seconds = None\n"
        "print('RESULT', json.dumps(seconds))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line.split(" ", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=Path, required=True, help="a generated scene set")
    parser.add_argument("--teacher", type=Path, required=True, help="a teacher directory")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "demo_setup_costs.json"
    )
    args = parser.parse_args()
    import distiq

    results = {}
    for name in PARTS:
        times = [_time_part(name, args.scenes, args.teacher) for _ in range(args.repeats)]
        measured = [t for t in times if t is not None]
        results[name] = {
            "median_seconds": round(statistics.median(measured), 2) if measured else None,
            "seconds": [None if t is None else round(t, 2) for t in times],
        }
        shown = "missing in this code" if not measured else f"{statistics.median(measured):.2f} s"
        print(f"{name:<20} {shown}", flush=True)
    report = {
        "benchmark": "demo_setup_costs",
        "machine": machine_info(),
        "command": " ".join(["python", *sys.argv]),
        "distiq": str(Path(distiq.__file__).resolve().parent),
        "scenes": str(args.scenes),
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
