"""Single-process and Hugging Face accelerate (DDP, FSDP) execution behind one small interface.

``accelerate launch --num_processes N [--cpu] -m distiq ...`` (or ``torchrun``) starts N
processes; the loop then builds an ``accelerate.Accelerator`` (imported lazily), lets it wrap the
model and optimizer (DistributedDataParallel, or FSDP when the launch config asks for it —
``accelerate launch --use_fsdp ...`` or an ``accelerate config`` file: its settings pass through
untouched), and uses ``accelerator.backward``, ``accelerator.no_sync`` (skip the all-reduce on
accumulation micro-steps), ``accelerator.clip_grad_norm_`` and ``accelerator.unwrap_model``.
Mixed precision is the loop's own (``precision``), so accelerate runs with ``mixed_precision="no"``.

Helpers for evaluation functions, usable in any mode (they fall back to one process when
``torch.distributed`` is not initialised): :func:`get_rank`, :func:`get_world_size`,
:func:`is_main_process`, :func:`shard_range`, :func:`gather_objects`, :func:`all_reduce_sum`.
A typical distributed metric: each process scores ``shard_range(len(val_set))``, then
``gather_objects((correct, count))`` and sums.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from distiq.train.config import TrainConfig

logger = logging.getLogger(__name__)


def _initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def get_rank() -> int:
    """This process's rank (0 without ``torch.distributed``)."""
    return torch_dist.get_rank() if _initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 without ``torch.distributed``)."""
    return torch_dist.get_world_size() if _initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def shard_range(n: int) -> range:
    """The indices of ``range(n)`` this process handles: ``rank, rank + W, rank + 2W, …``."""
    return range(get_rank(), n, get_world_size())


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order, on every process: ``[obj]`` alone."""
    if not _initialized():
        return [obj]
    gathered: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of process ``src`` on every process."""
    if not _initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over processes (a new tensor; ``values`` is unchanged)."""
    out = values.clone()
    if _initialized():
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
    return out


def barrier() -> None:
    if _initialized():
        torch_dist.barrier()


def _launcher_int(variable: str, default: int) -> int:
    """The integer a launcher put in environment variable ``variable`` (``default`` when unset);
    a value that is no integer is an error, not a silent single-process run."""
    value = os.environ.get(variable)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"environment variable {variable}={value!r} is not an integer; a launcher such as "
            "accelerate or torchrun sets it: unset it to run in one process"
        ) from None


def launched_world_size() -> int:
    """Processes announced by a launcher (``WORLD_SIZE``), 1 when started plainly."""
    return _launcher_int("WORLD_SIZE", 1)


def launched_rank() -> int:
    """This process's rank as a launcher announced it (``RANK``), 0 when started plainly; known
    before the process group exists."""
    return _launcher_int("RANK", 0)


def resolve_device(name: str) -> torch.device:
    """``auto`` → ``cuda`` if available else ``cpu``; other names are checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {name!r} was asked for but CUDA is not available; use cpu or auto"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(
            f"device {name!r} was asked for but MPS is not available; use cpu or auto"
        )
    return device


@dataclass
class DistContext:
    """How this process runs: plain (``accelerator is None``) or through accelerate."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    accelerator: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_fsdp(self) -> bool:
        if self.accelerator is None:
            return False
        return "FSDP" in str(self.accelerator.distributed_type)

    @property
    def is_fsdp1(self) -> bool:
        return self.is_fsdp and not getattr(self.accelerator, "is_fsdp2", False)

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        """Wrap model and optimizer for distributed training (no-op in a plain run).

        accelerate re-points the optimizer at the new parameters itself for DDP and FSDP2, but
        not for FSDP1, which replaces every parameter: there the optimizer's parameter groups
        are re-pointed here by parameter name (FSDP1 needs ``use_orig_params``, accelerate's
        default)."""
        if self.accelerator is None:
            return model, optimizer
        if not self.is_fsdp1:
            return self.accelerator.prepare(model, optimizer)
        names = {id(p): name for name, p in model.named_parameters()}
        wrapped = self.accelerator.prepare(model)
        new_params = {_clean_fsdp_name(name): p for name, p in wrapped.named_parameters()}
        for group in optimizer.param_groups:
            try:
                group["params"] = [new_params[names[id(p)]] for p in group["params"]]
            except KeyError as exc:
                raise RuntimeError(
                    "cannot map the optimizer's parameters onto the FSDP1-wrapped model "
                    f"({exc}); launch with --fsdp_use_orig_params true (FSDP_USE_ORIG_PARAMS=true) "
                    "or --fsdp_version 2, and pass only parameters of the model being trained"
                ) from None
        return wrapped, self.accelerator.prepare(optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def no_sync(self, model: Any, skip: bool) -> contextlib.AbstractContextManager:
        """Inside: gradients accumulate locally without an all-reduce (when ``skip``)."""
        if self.accelerator is None or not skip or self.world_size == 1:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def clip_grad_norm(self, model: Any, max_norm: float | None) -> torch.Tensor:
        """Clip the global gradient L2 norm to ``max_norm`` (``None``: only measure); returns the
        norm before clipping, a 0-dim tensor."""
        limit = float("inf") if max_norm is None else float(max_norm)
        params = [p for p in model.parameters() if p.grad is not None]
        if self.accelerator is not None:
            norm = self.accelerator.clip_grad_norm_(model.parameters(), limit)
            if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
                norm = norm.full_tensor()
            return torch.as_tensor(norm)
        if not params:
            return torch.zeros(())
        return torch.nn.utils.clip_grad_norm_(params, limit)

    def unwrap(self, model: Any) -> nn.Module:
        if self.accelerator is None:
            return model
        return self.accelerator.unwrap_model(model)

    def mean_floats(self, values: list[float]) -> list[float]:
        """Mean of each value over processes (identity in one process)."""
        if self.world_size == 1 or not values:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        total = all_reduce_sum(tensor)
        return (total / self.world_size).tolist()

    def any_true(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process (identity in one process)."""
        if self.world_size == 1:
            return flag
        tensor = torch.tensor([1.0 if flag else 0.0], device=self._collective_device())
        return bool(all_reduce_sum(tensor).item() > 0)

    def _collective_device(self) -> torch.device:
        # NCCL needs CUDA tensors; gloo CPU ones.
        backend = torch_dist.get_backend() if _initialized() else "gloo"
        return self.device if "nccl" in str(backend) else torch.device("cpu")

    def model_state_dict(self, model: Any) -> dict[str, torch.Tensor]:
        """Full (unsharded) model state on every process that gets it (FSDP: collective)."""
        if self.is_fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_model_state_dict(model, options=options)
        return self.unwrap(model).state_dict()

    def optimizer_state_dict(self, model: Any, optimizer: Any) -> dict[str, Any]:
        if self.is_fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(model, _raw_optimizer(optimizer), options=options)
        return optimizer.state_dict()

    def load_model_state_dict(self, model: Any, state: dict[str, torch.Tensor]) -> None:
        if self.is_fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
            )

            set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
            return
        self.unwrap(model).load_state_dict(state)

    def load_optimizer_state_dict(self, model: Any, optimizer: Any, state: dict[str, Any]) -> None:
        if self.is_fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_optimizer_state_dict,
            )

            set_optimizer_state_dict(
                model,
                _raw_optimizer(optimizer),
                state,
                options=StateDictOptions(full_state_dict=True),
            )
            return
        optimizer.load_state_dict(state)


def _clean_fsdp_name(name: str) -> str:
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def _raw_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


def setup_distributed(config: TrainConfig) -> DistContext:
    """Decide how to run (see ``TrainConfig.distributed``) and build the context."""
    world = launched_world_size()
    use_accelerate = config.distributed == "accelerate" or (
        config.distributed == "auto" and world > 1
    )
    if config.distributed == "none" and world > 1:
        raise RuntimeError(
            f"the process was launched as one of {world} (WORLD_SIZE), but the config says "
            "distributed: none; set distributed: auto (or accelerate), or launch one process"
        )
    if not use_accelerate:
        return DistContext(device=resolve_device(config.device))
    try:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs
    except ImportError as exc:
        raise RuntimeError(
            "distributed training needs Hugging Face accelerate, a dependency of distiq that "
            "is not installed here: pip install accelerate"
        ) from exc
    wanted = config.device
    cpu = wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available())
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no") not in ("no", ""):
        logger.warning(
            "accelerate's mixed precision (%s) is ignored: distiq autocasts itself, "
            "set precision in the training config",
            os.environ["ACCELERATE_MIXED_PRECISION"],
        )
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision="no",
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=config.ddp_find_unused_parameters)
        ],
    )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and "FSDP" not in str(
        accelerator.distributed_type
    ):
        logger.warning(
            "FSDP was asked for (ACCELERATE_USE_FSDP) but accelerate runs %s: FSDP needs GPUs, so "
            "this run is plain data-parallel (DDP)",
            accelerator.distributed_type,
        )
    context = DistContext(
        device=accelerator.device,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        accelerator=accelerator,
    )
    logger.info(
        "accelerate: %s, process %d of %d on %s",
        accelerator.distributed_type,
        context.rank,
        context.world_size,
        context.device,
    )
    return context


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """bf16 autocast on CUDA for ``precision`` ``bf16``/``auto``; a no-op for fp32."""
    if resolve_precision(device, precision) == "bf16":
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def resolve_precision(device: torch.device, precision: str) -> str:
    """``fp32`` or ``bf16``; ``bf16`` anywhere but on a bf16-capable CUDA device is an error."""
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not cuda_bf16:
        raise RuntimeError(
            f"precision: bf16 needs a CUDA device with bf16 support, this run is on {device}; "
            "use precision: fp32 (or auto, which picks bf16 only where it is supported)"
        )
    if precision == "auto":
        return "bf16" if cuda_bf16 else "fp32"
    return precision
