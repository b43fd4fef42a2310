"""torch.distributed set-up for ``torchrun`` launches (gloo on CPU, nccl on GPU)."""

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

import fastpref


@dataclass(frozen=True)
class DistState:
    """Rank, world size and device of this process."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Only the main process writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def select_device(local_rank: int, local_world_size: int, cuda_available: bool, device_count: int) -> torch.device:
    """The device of local process ``local_rank`` of ``local_world_size`` on this node: ``cuda:local_rank``
    when every local process has its own GPU, the CPU when there is no GPU. Fewer visible GPUs
    than local processes is a ValueError (two processes on one GPU would contend for its memory
    and NCCL refuses them): it says how to run on the CPU with gloo instead."""
    if not cuda_available or device_count == 0:
        return torch.device("cpu")
    if local_world_size > device_count:
        raise ValueError(
            f"torchrun --nproc_per_node: expected at most one process per GPU, got {local_world_size} "
            f"processes on this node and {device_count} visible GPU(s); start at most {device_count} "
            f"processes per node, or run every process on the CPU (gloo) with CUDA_VISIBLE_DEVICES=''"
        )
    return torch.device("cuda", local_rank % device_count)


def init_distributed() -> DistState:
    """Join the process group torchrun describes in the environment (or run alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    cuda = torch.cuda.is_available()
    device = select_device(local_rank, local_world_size, cuda, torch.cuda.device_count() if cuda else 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistState(rank, world_size, local_rank, device)


def barrier(state: DistState) -> None:
    """Wait for every process (no-op alone)."""
    if state.enabled:
        dist.barrier()


def read_metrics(values: dict[str, torch.Tensor], state: DistState) -> dict[str, float]:
    """Scalar device metrics averaged over processes and read on the host in one transfer
    (the only host sync of a logging step)."""
    if not values:
        return {}
    keys = list(values)  # same insertion order on every rank (same metrics dict)
    stacked = torch.stack([values[k].detach().to(torch.float64) for k in keys])
    if state.enabled:
        dist.all_reduce(stacked)
        stacked /= state.world_size
    return dict(zip(keys, stacked.tolist(), strict=True))  # host-ok: logging step


def kto_global_baseline(state: DistState):
    """KTO's baseline over the global batch of a multi-process run (docs/methods.md §2.7): z = max(0,
    mean over every process's rows of r_k - m_k), detached and all-reduced on the device.
    None alone, where the loss's own per-batch baseline is the same thing."""
    if not state.enabled:
        return None

    def mean_over_processes(value: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(value)
        return value / state.world_size

    def baseline(model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return fastpref.kto_baseline(model_pred, target, ref_pred=ref_pred, reduce=mean_over_processes)

    return baseline


def cleanup(state: DistState, model: torch.nn.Module | None = None) -> None:
    """Leave the process group, in the order that cannot hang: first drop ``model``'s DDP
    Reducer (and the Logger holding it) while the group still exists, collect it, wait for
    every rank, then destroy the group. Freeing a Reducer after ``destroy_process_group`` can
    deadlock (a gloo worker thread waiting for the GIL); ``model`` stays usable as a module."""
    if not (state.enabled and dist.is_initialized()):
        return
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        for name in ("logger", "reducer"):  # the Logger holds the Reducer: drop it first
            model.__dict__.pop(name, None)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
