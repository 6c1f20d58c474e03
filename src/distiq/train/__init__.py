"""The training loop of distiq: one explicit, readable loop (no trainer framework), used to train
the teacher and every student.

Public API::

    from distiq.train import TrainConfig, train, TrainResult, StepInfo
    from distiq.train import NonFiniteLossError, RunInterrupted
    from distiq.train import ResumableBatches, load_model_weights, read_metrics, unwrap_model
    from distiq.train import cache_teacher_outputs, TeacherCache
    from distiq.train.schedule import LRSchedule, build_scheduler
    from distiq.train.distributed import shard_range, gather_objects, get_rank, get_world_size

What the loop does (``train``): AdamW (weight decay on weights only), linear warm-up then
cosine/linear/constant decay, gradient accumulation, global-norm clipping, bf16 autocast on CUDA,
evaluation every N steps on a validation split with best-checkpoint selection by a named metric
(max or min), atomic checkpoints every N steps, at the end and on SIGTERM/SIGINT, exact resume
(model, optimizer, schedule, data position, RNG states), a clear error naming the step and the
loss term that became NaN/Inf (the last checkpoint stays intact), ``metrics.jsonl`` with every
loss term (optional TensorBoard), an ``on_step`` callback for progress bars, and multi-process
training through Hugging Face accelerate (DDP; FSDP from the launch config).

Example::

    import torch
    from torch.utils.data import TensorDataset
    from distiq.train import TrainConfig, train

    data = TensorDataset(torch.randn(256, 8), torch.randint(0, 3, (256,)))
    model = torch.nn.Linear(8, 3)

    def step_fn(model, batch, step):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(model(x), y)   # mean over the batch
        return loss, {"task": loss}                              # or a LossOutput(total, terms)

    def eval_fn(model):                                          # validation split, never test
        x, y = data.tensors
        return {"accuracy": (model(x).argmax(-1) == y).float().mean().item() * 100}

    config = TrainConfig(steps=100, lr=1e-2, warmup_steps=10, batch_size=32, eval_every=25,
                         checkpoint_every=25, best_metric="accuracy")
    result = train(model, step_fn, data, config=config, run_dir="runs/demo", eval_fn=eval_fn)
    # killed half-way? the same call with resume=True ends with the same parameters.

Distributed: ``accelerate launch --num_processes 2 [--cpu] script.py`` (or ``-m distiq ...``)
runs the same code as DDP; ``batch_size`` is the global micro-batch, split evenly across
processes, so the result matches a one-process run up to float rounding. FSDP: launch with
``accelerate launch --use_fsdp --fsdp_version 2 ...`` (or an ``accelerate config`` file); the FSDP
settings pass through to ``accelerate.Accelerator`` unchanged, checkpoints hold full (gathered)
state dicts through ``torch.distributed.checkpoint.state_dict``. FSDP1 (accelerate's default
version) also works but needs ``--fsdp_use_orig_params true``. FSDP needs GPUs (accelerate falls
back to DDP on CPU, with a warning); it was checked on one GPU, not in CPU CI.

Compression engine (imported lazily, on first use)::

    from distiq.train import compress, evaluate, load_recipe, recipe_from_dict, Recipe
    from distiq.train import check_recipe, load_compressed, run_data

``compress(recipe) -> run_dir`` runs a recipe (rtn | gptq | qat | kd | qad | qlora-kd, see
:mod:`distiq.train.methods`); ``evaluate(run_dir)`` re-scores a run (or any model directory) on
a test split; ``load_compressed(run_dir)`` gives back the evaluated model
(:mod:`distiq.train.runs`). Recipes: :mod:`distiq.train.recipe`; what a recipe quantizes:
:mod:`distiq.train.quant_plan`; how a model runs on the data: :mod:`distiq.train.engines`.
``distiq.compress`` (:mod:`distiq.train.api`) takes models and data held in memory too.

Teacher cache: ``cache_teacher_outputs(teacher_fn, batches, path, top_k=8)`` runs the teacher
once and stores its top-k log-probabilities per sample id; ``TeacherCache(path).get_batch(ids)``
gives ``(log_probs, indices)`` for a student's batch, for
``distiq.distill.sparse.topk_kl_divergence``; a recipe's ``teacher: {cache: ...}`` uses it.
"""

from distiq.train.batches import ReplayBatches, ResumableBatches, move_to_device
from distiq.train.checkpoint import load_checkpoint, load_model_weights
from distiq.train.config import TrainConfig
from distiq.train.loop import train, unwrap_model
from distiq.train.metrics import MetricsWriter, read_metrics
from distiq.train.state import (
    LossOutputLike,
    NonFiniteLossError,
    RunInterrupted,
    StepInfo,
    TrainResult,
)
from distiq.train.teacher_cache import TeacherCache, cache_teacher_outputs, teacher_topk

_LAZY = {
    "compress": "distiq.train.methods",
    "evaluate": "distiq.train.methods",
    "check_recipe": "distiq.train.methods",
    "run_data": "distiq.train.methods",
    "load_recipe": "distiq.train.recipe",
    "recipe_from_dict": "distiq.train.recipe",
    "recipe_to_dict": "distiq.train.recipe",
    "Recipe": "distiq.train.recipe",
    "load_compressed": "distiq.train.runs",
}


def __getattr__(name: str):
    """The compression engine's entry points, imported on first use (``import distiq.train``
    stays light)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'distiq.train' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "TrainConfig",
    "train",
    "TrainResult",
    "StepInfo",
    "LossOutputLike",
    "NonFiniteLossError",
    "RunInterrupted",
    "ResumableBatches",
    "ReplayBatches",
    "move_to_device",
    "load_checkpoint",
    "load_model_weights",
    "MetricsWriter",
    "read_metrics",
    "unwrap_model",
    "TeacherCache",
    "cache_teacher_outputs",
    "teacher_topk",
    *_LAZY,
]
