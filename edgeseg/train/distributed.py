"""Data-parallel training under `torchrun`: PyTorch's own engine (torch.distributed + DistributedDataParallel).

`torchrun --nproc-per-node N -m edgeseg train CONFIG --out RUN` starts N copies of the command;
torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. `setup` joins the process
group they describe (NCCL on CUDA, gloo on CPU) and returns this process's `DistContext`; outside
torchrun (or with one process) it is a no-op and every helper here reduces to the single-process
case, so the training loop has one code path.

Semantics the rest of the trainer relies on:
- `train.batch_size` is the *global* batch: each rank trains on batch_size / world_size samples,
  drawn so that the union over ranks is the batch a single process would draw (`BatchSampler.shard`);
  DDP averages gradients, so N processes follow the single-process run (exactly for losses that
  are means over samples, e.g. CE or Dice with dice_reduction=sample; batch-reduced Dice and batch
  norm see per-rank batches). On CUDA, batch norm becomes SyncBatchNorm (statistics over the global batch).
- Validation cases are split over the ranks and the per-case metrics gathered, so every rank sees
  the same summary (and takes the same "best" decision).
- Only rank 0 writes files (checkpoints, log, run.json); checkpoints hold the unwrapped module.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from edgeseg.errors import UserError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job: rank among world_size processes, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True in a process that torchrun (torch.distributed.run) started as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def prepare_process() -> None:
    """First thing a torchrun worker does (`python -m edgeseg`): rank > 0 stays quiet on stdout
    (errors still reach stderr), and a CUDA process pins its GPU to LOCAL_RANK before any tensor is made."""
    if not launched_by_torchrun():
        return
    if int(os.environ["RANK"]) != 0:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def setup(device: torch.device) -> DistContext:
    """Join torchrun's process group (once; later calls return the same context) and pick this rank's device.

    `device` is what the config asks for (cpu or cuda); with CUDA each rank takes GPU LOCAL_RANK and
    the NCCL backend, on the CPU the gloo backend.
    """
    if not launched_by_torchrun():
        return DistContext(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) on this node "
                            f"(use --nproc-per-node <= the number of GPUs)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
        atexit.register(_shutdown)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes a shared file), the others after it finished."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def _reduce_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU tensors."""
    if _active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_over_ranks(value: float | torch.Tensor) -> float:
    """The mean of a scalar over all ranks (the value itself in a single process)."""
    if not _active():
        return float(value)
    t = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1).to(_reduce_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / dist.get_world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on at least one (e.g. a Ctrl-C seen by one process)."""
    if not _active():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_reduce_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (e.g. batch-norm running statistics) to every rank.

    DDP does this before each forward; after the last step of an epoch the ranks' buffers differ
    again, so validation and checkpoints call this first.
    """
    if not _active():
        return
    for buf in module.buffers():
        if buf.dtype != torch.bool:
            dist.broadcast(buf.data, src=0)


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel around `model` when several processes train; `model` itself otherwise.

    The caller keeps `model` (the unwrapped module) for validation and checkpoints.
    """
    if not ctx.active:
        return model
    if ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index])
    return nn.parallel.DistributedDataParallel(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (checkpoints hold its state_dict)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
