"""Training the built-in edge VLM teacher on the synthetic scenes (``method: teacher``).

The teacher is the built-in edge VLM (``distiq.models.build_edge_vlm``) with a detection and a
segmentation head on its vision tower (``distiq.models.VLMWithHeads``), trained from scratch
with one multi-task loss per batch of images::

    L = w_vqa · CE(answer tokens)                         mean over answer tokens (+ eos)
      + w_det · (focal + L1 + GIoU)                        distiq.tasks detection, per image set
      + w_seg · (CE + Dice)                                distiq.tasks segmentation, per pixel

The heads give the vision tower dense supervision (which object, which class, where) that the
one-word VQA answers alone teach far too slowly on a CPU budget (ENV.md's probe: a plain VQA
loss stalls at the question prior). Validation accuracy (generation on the val split) picks the
best checkpoint; the test split is scored once at the end, next to the question-only (blind)
baseline.

The run directory is the teacher directory: a Hugging Face model directory (config,
safetensors, tokenizer / processor, ``distiq_heads.*``) that ``distiq.models.load`` and
``VLMWithHeads.from_pretrained`` read, plus ``recipe.yaml``, ``metrics.jsonl``, checkpoints and
``results.json``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distiq.config import dump_yaml
from distiq.results import ResultRecord, upsert_records
from distiq.train.loop import train
from distiq.train.recipe import Recipe
from distiq.train.runs import RECIPE_FILE, RESULTS_FILE
from distiq.train.vlm import EngineModel, evaluate_vqa

logger = logging.getLogger(__name__)


def teacher_step_fn(
    weights: Any, num_detection_classes: int | None, num_segmentation_classes: int | None
) -> Callable:
    """``step_fn(model, batch, step)`` of the teacher's multi-task loss (see the module doc);
    returns ``(total, {"vqa", "detection", "segmentation"})``."""
    from distiq.tasks import build_task

    vqa = build_task("vqa")
    detection = (
        build_task("detection", num_classes=num_detection_classes)
        if num_detection_classes
        else None
    )
    segmentation = (
        build_task("segmentation", num_classes=num_segmentation_classes)
        if num_segmentation_classes
        else None
    )
    use_heads = (detection is not None and weights.detection > 0) or (
        segmentation is not None and weights.segmentation > 0
    )

    def step_fn(model: Any, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        out = model(batch, heads=use_heads)
        terms = {"vqa": weights.vqa * vqa.loss(out.logits, batch).total}
        if detection is not None and weights.detection > 0 and out.detection is not None:
            targets = {"boxes": batch["boxes"], "labels": batch["labels_det"]}
            terms["detection"] = weights.detection * detection.loss(out.detection, targets).total
        if segmentation is not None and weights.segmentation > 0 and out.segmentation is not None:
            terms["segmentation"] = (
                weights.segmentation * segmentation.loss(out.segmentation, batch).total
            )
        total = sum(terms.values())
        return total, terms

    return step_fn


def build_teacher_model(recipe: Recipe, vocabulary: list[str], train_data: Any) -> torch.nn.Module:
    """A fresh edge VLM (with heads when the recipe and the data have them)."""
    from distiq.models import VLMWithHeads, build_edge_vlm

    teacher = recipe.teacher
    vlm, adapter = build_edge_vlm(vocabulary, teacher.preset, seed=recipe.seed, **teacher.model)
    if not teacher.heads or not (train_data is None or train_data.has_detection):
        return vlm
    return VLMWithHeads(
        vlm,
        adapter,
        num_detection_classes=train_data.num_detection_classes,
        num_segmentation_classes=train_data.num_segmentation_classes,
    )


def train_teacher(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    resume: bool = False,
    on_step: Callable | None = None,
    on_eval: Callable | None = None,
) -> Path:
    """Train the teacher of ``recipe`` (``method: teacher``) into ``recipe.output`` and return
    that directory (see the module docstring). Call :func:`distiq.train.methods.check_recipe`
    first for the fast input checks (``compress`` does)."""
    from distiq.models import build_edge_processor, edge_vlm_config
    from distiq.train.data_setup import load_data, scene_vocabulary

    run_dir = Path(recipe.output)
    started = time.perf_counter()
    vocabulary = scene_vocabulary(recipe.data)
    config = edge_vlm_config(recipe.teacher.preset, **recipe.teacher.model)
    processor = build_edge_processor(vocabulary, config)
    adapter = _processor_adapter(processor, config, vocabulary)
    data = load_data(recipe, adapter, heads=recipe.teacher.heads)
    model = build_teacher_model(recipe, vocabulary, data.train)
    engine = EngineModel(model)
    dump_yaml(recipe, run_dir / RECIPE_FILE)
    step_fn = teacher_step_fn(
        recipe.teacher.weights,
        data.train.num_detection_classes if engine.has_heads else None,
        data.train.num_segmentation_classes if engine.has_heads else None,
    )

    def eval_fn(module: Any) -> dict[str, float]:
        metrics = evaluate_vqa(module, data.val, max_new_tokens=recipe.eval.max_new_tokens)
        return {"vqa_accuracy": 100.0 * metrics["vqa_accuracy"]}

    train_config = recipe.train
    result = train(
        engine,
        step_fn,
        data.train,
        config=train_config,
        run_dir=run_dir,
        eval_fn=eval_fn,
        collate_fn=data.train.collate,
        resume=resume,
        overwrite=overwrite,
        on_step=on_step,
        on_eval=on_eval,
    )
    train_seconds = time.perf_counter() - started
    engine.eval()
    model.save_pretrained(run_dir) if hasattr(model, "base_adapter") else _save_plain(
        model, adapter, run_dir
    )
    test = evaluate_vqa(
        engine,
        data.test,
        max_new_tokens=recipe.eval.max_new_tokens,
        batch_images=recipe.eval.batch_images,
    )
    record = ResultRecord(
        name=recipe.run_name,
        method="teacher",
        params=sum(p.numel() for p in model.parameters()),
        value=100.0 * test["vqa_accuracy"],
        retention=1.0,
        seed=recipe.seed,
        steps=result.step,
        extra={
            "by_question_type": _by_type(test),
            "num_questions": int(test["num_questions"]),
            "blind_baseline": data.blind_baseline,
            "best_val_accuracy": result.best_value,
            "best_step": result.best_step,
            "train_seconds": round(train_seconds, 1),
        },
    )
    upsert_records(run_dir / RESULTS_FILE, [record])
    logger.info(
        "teacher: test VQA accuracy %.2f %% (blind baseline %s) in %.0f s",
        record.value,
        data.blind_baseline,
        train_seconds,
    )
    return run_dir


def _by_type(metrics: dict[str, float]) -> dict[str, float]:
    prefix = "vqa_accuracy/question_type/"
    return {k[len(prefix) :]: 100.0 * v for k, v in metrics.items() if k.startswith(prefix)}


def _save_plain(model: Any, adapter: Any, run_dir: Path) -> None:
    model.save_pretrained(run_dir)
    adapter.save_pretrained(run_dir)


def _processor_adapter(processor: Any, config: Any, vocabulary: list[str]) -> Any:
    """The edge VLM's adapter without building weights (for tokenizing the data first)."""
    from distiq.models import LlavaAdapter
    from distiq.models.edge_vlm import edge_llava_config

    llava_config = edge_llava_config(config, processor.tokenizer)
    return LlavaAdapter(
        llava_config,
        processor.tokenizer,
        processor.image_processor,
        processor=processor,
        chat_template=processor.chat_template,
    )
