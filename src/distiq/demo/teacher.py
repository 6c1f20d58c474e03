"""Training the demo's teacher: the built-in edge VLM on the synthetic scenes (``method: teacher``).

The teacher is the built-in edge VLM (``distiq.models.build_edge_vlm``) with a detection and a
segmentation head on its vision tower (``distiq.models.VLMWithHeads``), trained from scratch
with one multi-task loss per batch of images (every term a mean over its own elements)::

    L = w_vqa · CE(answer tokens)                          the VQA answers (and eos)
      + w_det · (focal + L1 + GIoU)                         distiq.tasks detection head
      + w_seg · (CE + Dice)                                 distiq.tasks segmentation head
      + w_grounding · CE/MSE at the question words          distiq.demo.grounding (not saved)
      + w_centres · CE of object centres per patch          distiq.demo.grounding (not saved)
      + w_counts · CE of the scene's counts per image token  distiq.demo.grounding (optional)

Why so much supervision: a one-word answer teaches little per question, and from it alone a
small VLM learns, within minutes on a CPU, hardly more than the question prior. The heads give
the vision tower dense targets (which object, where); the grounded targets teach the language
model, at the words that name objects, the lookups and comparisons the answers need; the
PCA-whitened patch stem (:func:`init_patch_embedding_pca`) lets the ViT tell shapes and digits
apart much sooner. The first :data:`VISION_WARMUP` of the steps train the vision side alone
(heads and object centres, no language model, about half a step's time): the language model
then starts from features that already tell objects apart. Heads whose loss weight is 0 are
not built, so no untrained head is saved. Validation accuracy (generation on the val split)
picks the best checkpoint; the test split is scored once at the end, next to the
question-only (blind) baseline. docs/experiments/ has the measurements behind these choices.

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
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from distiq.demo.recipe import TeacherRecipe, load_teacher_recipe
from distiq.results import ResultRecord, upsert_records
from distiq.train.distributed import barrier, is_main_process
from distiq.train.engines import accuracy_by_type, evaluate_vqa
from distiq.train.loop import train
from distiq.train.prefix_engine import SharedPrefixEngine
from distiq.train.runs import RESULTS_FILE

if TYPE_CHECKING:
    from distiq.train.data_setup import EngineData

logger = logging.getLogger(__name__)

VISION_WARMUP = 0.2
"""Fraction of ``train.steps`` that train the vision side alone (heads and object centres, no
language model: about half a full step's time) before the full multi-task loss. A recipe's
``teacher.vision_steps`` overrides the fraction."""


class TeacherModel(nn.Module):
    """What the teacher's training loop optimises: the engine model (the saved teacher) and,
    optionally, the grounded auxiliary heads (:mod:`distiq.demo.grounding`, not saved).

    ``forward(batch, heads)`` returns ``(VQAOutputs, {aux term: loss})``; the language model's
    hidden state after layer ``grounding_layer`` (and after ``side_layer``, when set) is captured
    by a forward hook for the grounding heads (removed by :meth:`remove_hooks`).
    """

    def __init__(
        self,
        engine: SharedPrefixEngine,
        grounding: nn.Module | None,
        layer: int,
        counts: bool = False,
        side_layer: int | None = None,
    ) -> None:
        super().__init__()
        self.engine = engine
        self.grounding = grounding
        self.counts = counts
        self._hidden: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        if grounding is not None:
            self._hook("h", layer, "grounding_layer")
            if side_layer is not None:
                self._hook("side", side_layer, "side_layer")

    def _hook(self, key: str, layer: int, name: str) -> None:
        """Capture the output of language-model layer ``layer`` as ``self._hidden[key]``."""
        layers = self.engine.vlm.model.language_model.layers
        if not -len(layers) <= layer < len(layers):
            raise ValueError(f"teacher.{name} {layer} is out of range for {len(layers)} layers")

        def capture(module: nn.Module, args: Any, output: Any) -> None:
            self._hidden[key] = output[0] if isinstance(output, tuple) else output

        self._handles.append(layers[layer].register_forward_hook(capture))

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def forward(
        self, batch: dict, heads: bool = True, language: bool = True
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        self._hidden.clear()
        out = self.engine(batch, heads=heads or self.grounding is not None, language=language)
        aux = {}
        if self.grounding is not None:
            embeds = None
            if self.counts and language:
                embeds = self.engine.vlm.model.multi_modal_projector(out.patch_features)
            aux = self.grounding.loss(
                batch,
                self._hidden.pop("h", None),
                out.patch_features,
                embeds,
                side_hidden=self._hidden.pop("side", None),
            )
        return out, aux


def teacher_step_fn(
    weights: Any,
    num_detection_classes: int | None,
    num_segmentation_classes: int | None,
    vision_steps: int = 0,
) -> Callable:
    """``step_fn(model, batch, step)`` of the teacher's multi-task loss (see the module doc);
    ``model`` is a :class:`TeacherModel`. Returns ``(total, {"vqa", "detection",
    "segmentation", "grounding", "centres"})`` (each term already weighted). The first
    ``vision_steps`` steps train the vision side alone (heads and object centres; the
    language model does not run), a cheap warm-up of the vision features."""
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
        language = step >= vision_steps
        out, aux = model(batch, heads=use_heads, language=language)
        terms = {}
        if language:
            terms["vqa"] = weights.vqa * vqa.loss(out.logits, batch).total
        if detection is not None and weights.detection > 0 and out.detection is not None:
            targets = {"boxes": batch["boxes"], "labels": batch["labels_det"]}
            terms["detection"] = weights.detection * detection.loss(out.detection, targets).total
        if segmentation is not None and weights.segmentation > 0 and out.segmentation is not None:
            terms["segmentation"] = (
                weights.segmentation * segmentation.loss(out.segmentation, batch).total
            )
        for name, value in aux.items():
            weight = getattr(weights, name)
            if weight > 0:
                terms[name] = weight * value
        total = sum(terms.values())
        return total, terms

    return step_fn


@torch.no_grad()
def init_patch_embedding_pca(vlm: nn.Module, pixel_values: torch.Tensor) -> float:
    """A better-conditioned vision stem: set the ViT's patch embedding (a linear map of each
    ``3·p·p`` pixel patch, no bias) to the PCA whitening of patches of ``pixel_values``
    (B, 3, H, W), so each token starts as decorrelated, unit-variance coordinates of its pixels,
    and rescale the sine-cosine position table to that variance. Returns the fraction of the
    patch variance the kept components explain. (Measured on the scenes: the category of an
    object at its centre patch is 63 % right after 400 vision-only steps, 47 % from the default
    random stem.)"""
    from distiq.models.edge_vlm import sincos_2d

    embeddings = vlm.model.vision_tower.embeddings
    conv = embeddings.patch_embedding
    patch = conv.kernel_size[0]
    width = conv.out_channels
    patches = torch.nn.functional.unfold(pixel_values.double(), patch, stride=patch)
    patches = patches.transpose(1, 2).reshape(-1, conv.in_channels * patch * patch)
    if patches.shape[0] <= patches.shape[1] or patches.shape[1] < width:
        raise ValueError(
            f"PCA stem: {patches.shape[0]} patches of {patches.shape[1]} values cannot give "
            f"{width} components"
        )
    covariance = torch.cov((patches - patches.mean(0)).T)
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    values, vectors = values.flip(0), vectors.flip(1)
    whitening = vectors[:, :width] / values[:width].clamp(min=1e-6).sqrt()  # (3pp, D)
    conv.weight.copy_(whitening.T.reshape_as(conv.weight).to(conv.weight.dtype))
    grid = round((embeddings.position_embedding.weight.shape[0] - 1) ** 0.5)
    table = sincos_2d(grid, width)  # entries of std 1/sqrt(2)
    embeddings.position_embedding.weight[1:] = table * (2.0**0.5)
    return float(values[:width].sum() / values.sum())


def build_teacher_model(
    recipe: TeacherRecipe, vocabulary: list[str], train_data: Any
) -> torch.nn.Module:
    """A fresh edge VLM (with heads when the recipe and the data have them)."""
    from distiq.models import VLMWithHeads, build_edge_vlm

    teacher = recipe.teacher
    vlm, adapter = build_edge_vlm(vocabulary, teacher.preset, seed=recipe.seed, **teacher.model)
    if teacher.pca_stem and train_data is not None:
        count = min(512, len(train_data))
        images = train_data.collate([train_data[i] for i in range(count)])["pixel_values"]
        explained = init_patch_embedding_pca(vlm, images)
        logger.info("teacher: PCA patch stem (%.1f %% of the patch variance)", 100 * explained)
    if not teacher.heads or not (train_data is None or train_data.has_detection):
        return vlm
    # A head whose loss weight is 0 would be saved untrained: build only the trained ones.
    detection = train_data.num_detection_classes if teacher.weights.detection > 0 else None
    segmentation = train_data.num_segmentation_classes if teacher.weights.segmentation > 0 else None
    if detection is None and segmentation is None:
        return vlm
    return VLMWithHeads(
        vlm,
        adapter,
        num_detection_classes=detection,
        num_segmentation_classes=segmentation,
    )


def load_teacher_training_data(recipe: TeacherRecipe) -> EngineData:
    """The splits :func:`train_teacher` trains and evaluates on (tokenized for the teacher to be
    built; the train split with the heads' targets when ``teacher.heads``). Loaded once before
    forking, they serve the teacher's data-parallel processes and, through
    ``EngineData.without_heads``, the runs that compress it (``distiq demo``): the batches are
    the same as those of ``distiq.train.run_data`` once the teacher is saved."""
    from distiq.demo.scenes import scene_vocabulary
    from distiq.models import build_edge_processor, edge_vlm_config
    from distiq.train.data_setup import check_data, load_data

    check_data(recipe.data)
    vocabulary = scene_vocabulary(recipe.data)
    config = edge_vlm_config(recipe.teacher.preset, **recipe.teacher.model)
    processor = build_edge_processor(vocabulary, config)
    adapter = _processor_adapter(processor, config, vocabulary)
    return load_data(recipe, adapter, heads=recipe.teacher.heads)


def check_teacher_data(recipe: TeacherRecipe, data: EngineData) -> None:
    """Refuse splits loaded for a compression run (no heads' targets) where the teacher's heads
    need them: a teacher trained on them would silently come without heads."""
    if recipe.teacher.heads and recipe.data.scenes is not None and not data.train.has_detection:
        raise ValueError(
            "the teacher's data: its train split has no detection or segmentation targets, which "
            "the teacher's heads train on; pass load_teacher_training_data(recipe)"
        )


def train_teacher(
    recipe: TeacherRecipe | str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    on_step: Callable | None = None,
    on_eval: Callable | None = None,
    data: EngineData | None = None,
) -> Path:
    """Train the teacher of ``recipe`` (a :class:`TeacherRecipe` or a YAML path) into
    ``recipe.output`` and return that directory (see the module docstring).

    Args:
        overwrite / resume: replace a previous run there / continue it from its checkpoint.
        on_step / on_eval: progress callbacks of the training loop.
        data: its splits loaded already (:func:`load_teacher_training_data`; their train and
            val images get cached in them).
    Raises:
        ConfigError, FileNotFoundError, FileExistsError: bad input, found before any work.
    """
    from distiq.config import dump_yaml
    from distiq.train.data_setup import check_data
    from distiq.train.distributed import launched_rank
    from distiq.train.lock import RunLock
    from distiq.train.runs import RECIPE_FILE, prepare_run_dir

    if not isinstance(recipe, TeacherRecipe):
        recipe = load_teacher_recipe(recipe)
    check_data(recipe.data)
    if data is not None:
        check_teacher_data(recipe, data)  # before the run directory is touched
    run_dir = Path(recipe.output)
    prepare_run_dir(run_dir, overwrite=overwrite, resume=resume, empty=False)
    with RunLock(run_dir):
        prepare_run_dir(run_dir, overwrite=overwrite, resume=resume)
        if launched_rank() == 0:  # data-parallel: one process writes the run directory
            dump_yaml(recipe, run_dir / RECIPE_FILE)
        torch.manual_seed(recipe.seed)
        return _train(recipe, not resume, resume, on_step, on_eval, data)


def _train(
    recipe: TeacherRecipe,
    overwrite: bool,
    resume: bool,
    on_step: Callable | None,
    on_eval: Callable | None,
    data: EngineData | None,
) -> Path:
    """:func:`train_teacher` once the directory is locked and prepared."""
    from distiq.demo.scenes import blind_baseline, scene_vocabulary
    from distiq.models import VLMWithHeads

    run_dir = Path(recipe.output)
    started = time.perf_counter()
    vocabulary = scene_vocabulary(recipe.data)
    if data is None:
        data = load_teacher_training_data(recipe)
    check_teacher_data(recipe, data)
    adapter = data.train.adapter
    blind = blind_baseline(data)
    data.train.cache_images()  # every epoch after the first reads no files
    data.val.cache_images()  # evaluated every eval_every steps
    model = build_teacher_model(recipe, vocabulary, data.train)
    engine = SharedPrefixEngine(model, adapter)
    grounding = _grounding_heads(recipe, engine, adapter)
    trainer = TeacherModel(
        engine,
        grounding,
        _layer(recipe, engine),
        counts=grounding is not None and recipe.teacher.weights.counts > 0,
        side_layer=recipe.teacher.side_layer,
    )
    step_fn = teacher_step_fn(
        recipe.teacher.weights,
        data.train.num_detection_classes if _has(model, "detection_head") else None,
        data.train.num_segmentation_classes if _has(model, "segmentation_head") else None,
        vision_steps=_vision_steps(recipe, model, trainer),
    )

    def eval_fn(module: Any) -> dict[str, float]:
        metrics = evaluate_vqa(  # data-parallel: each process answers its share of the images
            module.engine, data.val, max_new_tokens=recipe.eval.max_new_tokens, shard=True
        )
        return {"vqa_accuracy": 100.0 * metrics["vqa_accuracy"]}

    result = train(
        trainer,
        step_fn,
        data.train,
        config=recipe.train,
        run_dir=run_dir,
        eval_fn=eval_fn,
        collate_fn=data.train.collate,
        resume=resume,
        overwrite=overwrite,
        on_step=on_step,
        on_eval=on_eval,
    )
    trainer.remove_hooks()
    train_seconds = time.perf_counter() - started
    engine.eval()
    if is_main_process():  # data-parallel: one process writes the run directory
        model.save_pretrained(run_dir)  # with heads: model, processor and heads
        if not isinstance(model, VLMWithHeads):
            adapter.save_pretrained(run_dir)
        from distiq.integrity import record_hashes

        record_hashes(run_dir, sorted(p.name for p in run_dir.glob("*.safetensors")))
    answers: list[dict] = []
    test = evaluate_vqa(  # data-parallel: each process answers its share of the images
        engine,
        data.test,
        max_new_tokens=recipe.eval.max_new_tokens,
        batch_images=recipe.eval.batch_images,
        shard=True,
        per_question=answers,
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
            "by_question_type": accuracy_by_type(test),
            "num_questions": int(test["num_questions"]),
            "blind_baseline": blind,
            "best_val_accuracy": result.best_value,
            "best_step": result.best_step,
            "train_seconds": round(train_seconds, 1),
        },
    )
    if is_main_process():
        from distiq.train.methods.common import write_predictions

        upsert_records(run_dir / RESULTS_FILE, [record])
        write_predictions(run_dir, answers)
    barrier()
    logger.info(
        "teacher: test VQA accuracy %.2f %% (blind baseline %.2f %%) in %.0f s",
        record.value,
        blind["accuracy"],
        train_seconds,
    )
    return run_dir


def _has(model: nn.Module, head: str) -> bool:
    return getattr(model, head, None) is not None


def _vision_steps(recipe: TeacherRecipe, model: nn.Module, trainer: TeacherModel) -> int:
    """Steps of vision-only warm-up (:data:`VISION_WARMUP`); 0 when nothing supervises the
    vision side alone (no trained head, no object-centre term)."""
    weights = recipe.teacher.weights
    supervised = (
        (_has(model, "detection_head") and weights.detection > 0)
        or (_has(model, "segmentation_head") and weights.segmentation > 0)
        or (trainer.grounding is not None and weights.centres > 0)
    )
    if not supervised:
        return 0
    steps = recipe.teacher.vision_steps
    if steps is None:
        steps = int(VISION_WARMUP * recipe.train.steps)
    if not 0 <= steps < recipe.train.steps:
        raise ValueError(
            f"teacher.vision_steps {steps} must be >= 0 and below train.steps {recipe.train.steps}"
        )
    return steps


def _layer(recipe: TeacherRecipe, engine: SharedPrefixEngine) -> int:
    """The language-model layer the grounding head reads (default: the second to last)."""
    if recipe.teacher.grounding_layer is not None:
        return recipe.teacher.grounding_layer
    return max(0, engine.vlm.config.text_config.num_hidden_layers - 2)


def _grounding_heads(
    recipe: TeacherRecipe, engine: SharedPrefixEngine, adapter: Any
) -> nn.Module | None:
    """The grounded auxiliary heads when the recipe weights them and the data is a scene set."""
    import json

    from distiq.demo.grounding import GroundingHeads, SceneVocabulary, load_scene_objects

    weights = recipe.teacher.weights
    if recipe.data.scenes is None or max(weights.grounding, weights.centres, weights.counts) <= 0:
        return None
    root = Path(recipe.data.scenes)
    vocabulary = SceneVocabulary.from_meta(json.loads((root / "meta.json").read_text()))
    config = engine.vlm.config
    vision = config.vision_config
    grid = (vision.image_size // vision.patch_size, vision.image_size // vision.patch_size)
    return GroundingHeads(
        vocabulary,
        adapter.tokenizer,
        config.text_config.hidden_size,
        vision.hidden_size,
        grid,
        load_scene_objects(root, recipe.data.train_split),
        side_target=recipe.teacher.side_target,
        separate_side=recipe.teacher.side_layer is not None,
    )


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
