"""The ``vqa`` task: a vision-language model answering questions about images.

Data: ``ImageQuestions`` splits (generated scenes, VQA v2 files, a ``datasets`` folder or
samples in memory: :mod:`distiq.train.data_setup`); forward paths: :mod:`distiq.train.engines`
(the shared-prefix fast path, the generic path); the step: answer-token logits of the student
and the teacher (or its cache) into the objective (:mod:`distiq.train.student`); the metric:
the official VQA accuracy by greedy generation (:func:`distiq.train.engines.evaluate_vqa`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import nn

from distiq.train.engine_tasks.base import EngineTask, TaskEvaluation

logger = logging.getLogger(__name__)


def metric_extras(metrics: dict[str, float]) -> dict[str, Any]:
    """Per question type accuracy (%) and the question count, for a record's ``extra``."""
    from distiq.train.engines import accuracy_by_type

    return {
        "by_question_type": accuracy_by_type(metrics),
        "num_questions": int(metrics["num_questions"]),
    }


class VQAEngineTask(EngineTask):
    """Visual question answering (see the module docstring)."""

    name = "vqa"
    metric = "vqa_accuracy"
    best_key = "best_val_accuracy"

    # ------------------------------------------------------------------ models
    def load_model(self, path: Any) -> tuple[nn.Module, Any]:
        from distiq.train.modeling import load_vlm

        return load_vlm(path)

    def load_adapter(self, path: Any) -> Any:
        from distiq.models import load_adapter
        from distiq.train.modeling import resolve_model_dir

        return load_adapter(resolve_model_dir(path))

    def check_model(self, path: Any) -> None:
        from distiq.train.modeling import resolve_model_dir

        resolve_model_dir(path)

    def build_student(self, ctx: Any) -> tuple[nn.Module, Any]:
        from distiq.train.modeling import build_student

        return build_student(
            ctx.teacher, ctx.teacher_adapter, ctx.recipe.student, seed=ctx.recipe.seed
        )

    # ------------------------------------------------------------------ data
    def check_data(self, data: Any) -> None:
        from distiq.train.data_setup import check_data

        check_data(data)

    def load_data(self, recipe: Any, adapter: Any) -> Any:
        from distiq.train.data_setup import load_data

        return load_data(recipe, adapter)

    def load_test(self, recipe: Any, adapter: Any) -> Any:
        from distiq.train.data_setup import load_split

        data = recipe.data
        return load_split(data, data.test_split, adapter).limit_questions(data.test_questions)

    def data_paths(self, data: Any) -> list[tuple[str, Any]]:
        paths = [("data.scenes", data.scenes), ("data.hf", data.hf.path if data.hf else None)]
        for split, files in (data.vqa or {}).items():
            paths += [(f"data.vqa.{split}.{k}", getattr(files, k)) for k in ("questions", "images")]
        return paths

    # ------------------------------------------------------------------ running
    def engine_for(self, model: nn.Module, adapter: Any, split: Any) -> nn.Module:
        from distiq.train.engines import engine_for

        return engine_for(model, adapter, split.path if split is not None else None)

    def objective_config(self, ctx: Any, student: nn.Module, student_adapter: Any) -> Any:
        """The recipe's objective with part names in its layer lists resolved through the two
        models' adapters (:mod:`distiq.train.objective_layers`)."""
        from distiq.train.objective_layers import resolve_layer_names

        return resolve_layer_names(
            ctx.recipe.objective, student, student_adapter, ctx.teacher, ctx.teacher_adapter
        )

    def teacher_side(self, ctx: Any, student_adapter: Any) -> Any:
        """The teacher's side of the steps (``distiq.train.student.TeacherSide``): the teacher
        on the student's batches, on its own batches when its processing differs, or a cache of
        its outputs when the recipe asks for one."""
        from distiq.train.engines import GenericEngine, engine_for
        from distiq.train.modeling import same_processing
        from distiq.train.student import TeacherSide
        from distiq.train.teacher_outputs import processing_view

        recipe, data = ctx.recipe, ctx.data
        teacher = ctx.teacher
        teacher.eval()
        for param in teacher.parameters():
            param.requires_grad_(False)
        if same_processing(student_adapter, ctx.teacher_adapter):
            engine = engine_for(teacher, ctx.teacher_adapter, data.train.path)
            collate = None
        else:
            if {"feat", "attn"} & set(recipe.objective.terms.active()):
                raise ValueError(
                    "the feat / attn terms compare hidden states position by position, which "
                    "needs teacher and student to see the same tokens (the same processing); "
                    "this teacher and student process images and prompts differently"
                )
            engine = GenericEngine(teacher, ctx.teacher_adapter)
            view = processing_view(data.train, ctx.teacher_adapter)

            def collate(items: list) -> dict:
                return GenericEngine.collate(view, items)

        if recipe.teacher.cache is None:
            return TeacherSide(engine=engine, collate=collate)
        return TeacherSide(cache=self._cache(ctx, engine, collate))

    @staticmethod
    def _cache(ctx: Any, engine: Any, collate: Any) -> Any:
        """The teacher cache of the images this run visits (built or reused)."""
        from distiq.train.teacher_outputs import (
            build_teacher_cache,
            teacher_fingerprint,
            visited_images,
        )

        recipe, train = ctx.recipe, ctx.data.train
        indices = visited_images(train, recipe.train)
        question_ids = [
            int(train.questions[r]["question_id"]) for i in indices for r in train.rows[i]
        ]
        kd = recipe.objective.terms.kd
        settings = f"{type(ctx.teacher_adapter).__name__}:{kd.temperature}"
        fingerprint = teacher_fingerprint(recipe.teacher.path, question_ids, settings)
        return build_teacher_cache(
            engine,
            train,
            indices,
            recipe.teacher.cache.path,
            top_k=recipe.teacher.cache.top_k,
            temperature=kd.temperature,
            batch_images=recipe.eval.batch_images,
            fingerprint=fingerprint,
            collate=collate or train.collate,
        )

    def step_fn(
        self, objective: Any, side: Any, student: nn.Module, student_adapter: Any, ctx: Any
    ) -> Callable:
        from distiq.train.student import student_step_fn

        return student_step_fn(objective, side, student)

    # ------------------------------------------------------------------ evaluation
    def validation_fn(self, split: Any, recipe: Any) -> Callable[[nn.Module], dict[str, float]]:
        from distiq.train.engines import evaluate_vqa

        def eval_fn(module: nn.Module) -> dict[str, float]:
            metrics = evaluate_vqa(module, split, max_new_tokens=recipe.eval.max_new_tokens)
            return {"vqa_accuracy": 100.0 * metrics["vqa_accuracy"]}

        return eval_fn

    def evaluate(
        self, engine: nn.Module, split: Any, recipe: Any, *, shard: bool = False
    ) -> TaskEvaluation:
        from distiq.train.engines import evaluate_vqa

        answers: list[dict] = []
        metrics = evaluate_vqa(
            engine,
            split,
            max_new_tokens=recipe.eval.max_new_tokens,
            batch_images=recipe.eval.batch_images,
            shard=shard,
            per_question=answers,
        )
        return TaskEvaluation(
            value=100.0 * metrics["vqa_accuracy"],
            metrics=metrics,
            extra=metric_extras(metrics),
            items=answers,
        )

    def teacher_record_value(self, records: list[Any], test: Any) -> float | None:
        questions = test.question_count()
        for record in records:
            if record.method == "teacher" and record.extra.get("num_questions") in (
                None,
                questions,
            ):
                return record.value
        return None

    def describe(self, evaluation: TaskEvaluation) -> str:
        return f"test VQA accuracy {evaluation.value:.2f} %"
