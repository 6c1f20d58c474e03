"""``distiq demo``'s work: the embedded example end to end, offline.

1. generate the synthetic edge scenes (cached under ``OUT/data``);
2. train the edge VLM teacher (cached in ``OUT/teacher``), data-parallel over the worker
   processes (``jobs``; :func:`distiq.demo.jobs.run_distributed`);
3. compress it with the engine (``distiq.train.compress``): rtn, gptq, qat and qad at W4A8
   and W2A16 (group 64), plus kd (a smaller full-precision student) — the shipped recipes,
   same data and steps for every trained method (each run evaluates on the test split; cached
   in ``OUT/runs/NAME``). They run longest first; the parent imports the model code before it
   forks and reads the splits once (:func:`distiq.demo.load_teacher_training_data` for a
   teacher it trains, whose splits then serve the runs too; else ``distiq.train.run_data``),
   so that no process repeats either. With more than one worker, each also exports its run's
   ONNX models for step 4 (``distiq.bench.bench_exports``);
4. measure every model (size, latency: ``distiq.bench``; timed after the workers stopped) and
   export the most accurate quantized one (packed and ONNX: ``distiq.export``);
5. gather the records in ``OUT/results.json`` and write ``OUT/report.md`` / ``report.html``.

Every recipe is validated and the output checked before any long work. Each stage says when it
starts and ends, with its time, and training runs show their progress (:mod:`distiq.progress`:
bars on a terminal, plain lines at a steady interval in a log). The wall time of each stage goes
to ``OUT/demo_times.json`` (with the command and the machine).

It runs on distiq's core install: without the ``onnx`` extra the benchmark times PyTorch alone
and the best model is exported packed only (each said in one line); without Hugging Face
accelerate the teacher trains in one process.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from distiq.demo.jobs import (
    Job,
    data_parallel_size,
    data_parallel_unavailable,
    run_distributed,
    run_jobs,
)
from distiq.demo.plan import (
    RUNS,
    TEACHER,
    DemoSettings,
    cache_action,
    longest_first,
    planned_recipe,
    recipes_dir,
    run_dir,
)
from distiq.progress import quiet_library_bars, stage, step_progress
from distiq.progress import say as _say

QUANTIZED = ("rtn", "gptq", "qat", "qad", "qlora-kd")
WARMUP_PHASE = "vision-only warm-up: the language model has not trained yet"


def teacher_phase(info: Any) -> str | None:
    """The phase of a demo teacher's training step (``distiq.progress``): its first
    ``teacher.vision_steps`` steps train the vision side alone, and their loss terms
    (``StepInfo.terms``) then hold no ``vqa`` term (:func:`distiq.demo.teacher.teacher_step_fn`),
    so a validation accuracy of 0 there is the warm-up, not a failure."""
    terms = getattr(info, "terms", None)
    return WARMUP_PHASE if terms is not None and "vqa" not in terms else None


class _Engine:
    """The library functions the demo drives (a seam the tests replace with fakes)."""

    def __init__(self) -> None:
        from distiq import bench, data, export, models, train
        from distiq.demo import recipe, teacher

        self.generate_scenes = data.generate_scenes
        self.recipe_from_dict = train.recipe_from_dict
        self.teacher_recipe_from_dict = recipe.teacher_recipe_from_dict
        self.recipe_to_dict = train.recipe_to_dict
        self.compress = train.compress
        self.train_teacher = teacher.train_teacher
        self.export_run = export.export_run
        self.bench_run = bench.bench_run
        self.bench_exports = bench.bench_exports
        self.import_model_code = models.import_edge_vlm_code
        self.load_teacher_data = train.run_data
        self.load_teacher_training_data = teacher.load_teacher_training_data


def _validated(engine: _Engine, names: list[str], settings: DemoSettings, out: Path, scenes: Path):
    """``{name: recipe}``: every planned recipe built and validated (all errors at once)."""
    recipes = {}
    for name in names:
        data = planned_recipe(name, settings, out, scenes)
        build = engine.teacher_recipe_from_dict if name == TEACHER else engine.recipe_from_dict
        recipes[name] = build(data, source=f"demo recipe {name}")
    return recipes


def _action(engine: _Engine, name: str, recipe: Any, reused: list, fresh: bool) -> str:
    """``run`` | ``resume`` | ``reuse`` (said and noted in ``reused``) for one recipe; ``fresh``
    forces a new run (its teacher changed)."""
    directory = Path(recipe.output)
    build = engine.teacher_recipe_from_dict if name == TEACHER else engine.recipe_from_dict
    action = (
        "run"
        if fresh
        else cache_action(
            directory,
            engine.recipe_to_dict(recipe),
            lambda written: engine.recipe_to_dict(build(written, source=str(directory))),
        )
    )
    if action == "reuse":
        say(f"{name}: reusing {directory}")
        reused.append(name)
    return action


def say(message: str) -> None:
    """One line for the person watching the demo (stderr, above any progress bar)."""
    _say(message)


def _run(
    engine: _Engine,
    name: str,
    recipe: Any,
    action: str,
    times: dict[str, float],
    jobs: int = 1,
    data: Any = None,
) -> None:
    """Run or resume (``action``) one recipe as a stage: data-parallel over up to ``jobs``
    forked processes when its global batch splits (:func:`~distiq.demo.jobs.run_distributed`)
    and accelerate is there (else in one process, said in one line), else in this process;
    with ``data``, its splits loaded already."""
    run, phase = (
        (engine.train_teacher, teacher_phase) if name == TEACHER else (engine.compress, None)
    )
    world = data_parallel_size(recipe.train.batch_size, jobs)
    unavailable = data_parallel_unavailable() if world > 1 else None
    if unavailable is not None:
        say(f"{name}: training in one process, not {world} data-parallel ones: {unavailable}")
        world = 1
    with stage(name) as timed:
        if world > 1:
            say(f"{name}: data-parallel over {world} processes")
            run_distributed(Job(name, run, recipe, action, data, phase=phase), world)
        else:
            with step_progress(name, phase) as progress:
                run(
                    recipe,
                    overwrite=action == "run",
                    resume=action == "resume",
                    on_step=progress.on_step,
                    on_eval=progress.on_eval,
                    data=data,
                )
    times[name] = round(timed.seconds, 1)


def _load(what: str, times: dict[str, float], load: Any, recipe: Any) -> Any:
    """``load(recipe)`` as a stage; its seconds go to ``times["data"]``."""
    with stage(f"loading {what}", status=f"Loading {what}…") as timed:
        data = load(recipe)
    times["data"] = round(times.get("data", 0.0) + timed.seconds, 1)
    return data


def _with_shared_data(
    engine: _Engine,
    todo: list[Job],
    times: dict[str, float],
    teacher: Any,
    teacher_data: Any = None,
) -> list[Job]:
    """``todo`` with the splits of the runs that share the first run's data and teacher loaded
    once, here (forked workers inherit them): the splits the ``teacher`` recipe trained on
    (``teacher_data``, already without the heads' targets) when the runs compress that teacher
    on the same data, else read now."""
    if not todo:
        return todo
    first = todo[0].recipe
    sharing = [
        job.recipe.data == first.data and job.recipe.teacher.path == first.teacher.path
        for job in todo
    ]
    if sum(sharing) < 2:
        return todo
    if (
        teacher_data is not None
        and first.data == teacher.data
        and Path(first.teacher.path) == Path(teacher.output)
    ):
        data = teacher_data
    else:
        data = _load("the runs' data", times, engine.load_teacher_data, first)
    return [dataclasses.replace(j, data=data) if s else j for j, s in zip(todo, sharing)]


# the name of the job that exports the teacher
_TEACHER_EXPORTS = f"{TEACHER} ONNX exports for bench"


def _measured(records: list) -> bool:
    """Whether a run's records carry its size and latency already (a cached run)."""
    return bool(records) and all(
        r.size_mb is not None and r.latency_ms is not None for r in records
    )


def _bench_exports(engine: _Engine, directory: Path, root: Path) -> Any:
    """``bench_exports`` in a worker; a failure comes back as its message (a ``str``), so that
    it leaves the exports to the benchmark step instead of stopping the runs not yet done."""
    try:
        return engine.bench_exports(directory, root)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _usable_exports(exports: dict[str, Any]) -> dict[str, Any]:
    """The workers' exports by run name; a failed one is said here and left out (``bench``
    exports that model itself)."""
    usable = {}
    for name, made in exports.items():
        name = TEACHER if name == _TEACHER_EXPORTS else name
        if isinstance(made, str):
            say(
                f"ONNX exports of {name} for bench failed in the worker ({made}); "
                "bench exports them itself"
            )
        elif made is not None:
            usable[name] = made
    return usable


def _with_bench_exports(engine: _Engine, todo: list[Job], out: Path, root: Path) -> list[Job]:
    """``todo`` whose workers also make each run's ONNX exports for the benchmark once the run
    is done (``distiq.bench.bench_exports``, under ``root``), plus a job of the teacher's own
    when it is not measured yet: the exports, most of a measurement's time, then run in the
    workers instead of one after the other in the benchmark step (whose timings start after
    every worker has stopped). ``run_jobs`` returns each job's exports by its name."""
    from distiq.results import read_records

    def exporter(name: str) -> Any:
        return functools.partial(_bench_exports, engine, run_dir(out, name), root / name)

    planned = [
        dataclasses.replace(
            job, after=exporter(job.name), after_stage=f"{job.name} ONNX exports for bench"
        )
        for job in todo
    ]
    if not _measured(read_records(run_dir(out, TEACHER) / "results.json")):
        planned.append(Job(_TEACHER_EXPORTS, None, None, "run", after=exporter(TEACHER)))
    return planned


def _code_version() -> dict[str, Any]:
    """distiq's version and, in a git checkout, its commit and whether tracked files differ from
    it (so that a recorded time names the code that took it)."""
    import subprocess

    import distiq

    info: dict[str, Any] = {"distiq": distiq.__version__, "git_commit": None}
    root = str(Path(distiq.__file__).resolve().parent)
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            info["git"] = f"not a git checkout ({head.stderr.strip()[:200]})"
        else:
            status = subprocess.run(
                ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            info["git_commit"] = head.stdout.strip()
            info["git_dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.TimeoutExpired) as exc:  # no git, or a slow file system
        info["git"] = f"git did not answer ({type(exc).__name__}: {exc})"
    return info


def run_demo(out: Path, settings: DemoSettings, jobs: int = 1) -> dict[str, Any]:
    """The whole demo into ``out``, the compression runs in ``jobs`` worker processes at once
    (see :mod:`distiq.demo.jobs`); returns ``{"report": ReportFiles, "times": {...},
    "records": [...], "goals": [GoalCheck], "best": record | None}``."""
    from distiq.bench.backends import missing_onnx_packages
    from distiq.config import check_writable
    from distiq.report import collect_inputs, write_report
    from distiq.results import read_records, upsert_records, with_retention

    total_started = time.perf_counter()
    load_at_start = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    code = _code_version()
    check_writable(out, "the demo", "choose a writable directory with --out")
    recipes_dir()  # the recipes are there
    engine = _Engine()
    names = [TEACHER, *RUNS]
    # validate every recipe before the long work (the scene folder is known only after step 1)
    _validated(engine, names, settings, out, out / "data" / "edge-scenes")
    times: dict[str, float] = {}
    quiet_library_bars()
    no_onnx = missing_onnx_packages()
    if no_onnx:
        say(
            f"{', '.join(no_onnx)} not installed: latency is timed in PyTorch only and the best "
            "model is exported packed only (pip install 'distiq[onnx]' adds the onnxruntime "
            "timings and the ONNX export)"
        )

    with stage("scenes", status=f"Generating {settings.scenes} scenes…") as timed:
        scenes = engine.generate_scenes(out / "data", count=settings.scenes, seed=0)
    times["scenes"] = round(timed.seconds, 1)
    recipes = _validated(engine, names, settings, out, Path(scenes.root))

    if jobs > 1:  # the forked processes inherit the model code instead of importing it each
        engine.import_model_code()
    reused: list[str] = []
    teacher = recipes[TEACHER]
    teacher_action = _action(engine, TEACHER, teacher, reused, fresh=False)
    teacher_ran = teacher_action != "reuse"
    teacher_data = None
    if teacher_ran:  # loaded once, for the teacher's processes and the runs after it
        loaded = _load("the data", times, engine.load_teacher_training_data, teacher)
        _run(engine, TEACHER, teacher, teacher_action, times, jobs=jobs, data=loaded)
        teacher_data = loaded.without_heads()  # the heads' targets and image caches go
        del loaded
    # a new teacher makes every run built on the old one stale
    actions = {name: _action(engine, name, recipes[name], reused, teacher_ran) for name in RUNS}
    order = longest_first({name: recipes[name] for name in RUNS})
    todo = [
        Job(name, engine.compress, recipes[name], actions[name])
        for name in order
        if actions[name] != "reuse"
    ]
    todo = _with_shared_data(engine, todo, times, teacher, teacher_data)
    workers = min(jobs, len(todo))
    with tempfile.TemporaryDirectory(prefix="distiq-demo-onnx-") as onnx_root:
        exports: dict[str, Any] = {}
        if workers > 1:
            if not no_onnx:  # else there is nothing to export
                todo = _with_bench_exports(engine, todo, out, Path(onnx_root))
            say(f"{sum(j.compress is not None for j in todo)} runs in {workers} worker processes")
            seconds, made = run_jobs(todo, workers)
            times.update(seconds)
            exports = _usable_exports(made)
        else:
            for job in todo:
                _run(engine, job.name, job.recipe, job.action, times, data=job.data)

        records = []
        with stage("bench") as timed:
            for name in names:
                directory = run_dir(out, name)
                existing = read_records(directory / "results.json")
                if _measured(existing):
                    records += existing  # measured before (cached run)
                    continue
                with stage(f"bench {name}", status=f"Measuring {name}…", part=True):
                    records += engine.bench_run(
                        directory,
                        repeats=settings.bench_repeats,
                        workloads=settings.bench_workloads,
                        exports=exports.get(name),
                    )
        times["bench"] = round(timed.seconds, 1)

    quantized = [r for r in records if r.method in QUANTIZED and r.value is not None]
    best = max(quantized, key=lambda r: r.value) if quantized else None
    with stage("export") as timed:
        if best is not None:
            directory = run_dir(out, best.name)
            exported = []
            for fmt in ("packed", "onnx"):
                if fmt == "onnx" and no_onnx:
                    say(f"export onnx of {best.name} skipped: needs {', '.join(no_onnx)}")
                    continue
                try:
                    with stage(
                        f"{best.name} as {fmt}", status=f"Exporting {best.name}…", part=True
                    ):
                        exported.append(str(engine.export_run(directory, fmt)))
                except ValueError as exc:  # what a format cannot hold (2-bit in ONNX)
                    say(f"export {fmt} of {best.name} skipped: {exc}")
            records = [
                r.replace(extra={**r.extra, "exported": exported}) if r.name == best.name else r
                for r in records
            ]
    times["export"] = round(timed.seconds, 1)

    results = out / "results.json"
    upsert_records(results, with_retention(records))
    with stage("report") as timed:
        inputs = collect_inputs([out, run_dir(out, TEACHER)])
        files = write_report(inputs, out)
    times["report"] = round(timed.seconds, 1)
    times["total"] = round(time.perf_counter() - total_started, 1)

    from distiq.bench.run import machine
    from distiq.config import atomic_write

    summary = {
        "seconds": times,
        "reused": reused,
        "jobs": jobs,
        "settings": dataclasses.asdict(settings),
        "command": " ".join(["distiq", *sys.argv[1:]]),
        "code": code,
        "machine": {**machine(), "load_average_at_start": load_at_start},
    }
    atomic_write(out / "demo_times.json", json.dumps(summary, indent=2) + "\n")
    return {
        "report": files,
        "times": times,
        "reused": reused,
        "records": inputs.records,
        "goals": files.goals,
        "best": best,
    }
