"""torch.distributed set-up for ``torchrun`` launches (gloo on CPU, nccl on GPU)."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def init_distributed() -> DistState:
    """Join the process group torchrun describes in the environment (or run alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistState(rank, world_size, local_rank, device)


def barrier(state: DistState) -> None:
    """Wait for every process (no-op alone)."""
    if state.enabled:
        dist.barrier()


def mean_across_ranks(values: dict[str, float], state: DistState) -> dict[str, float]:
    """Average scalar metrics over processes (identity alone)."""
    if not state.enabled or not values:
        return values
    keys = list(values)  # same insertion order on every rank (same metrics dict)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=state.device)
    dist.all_reduce(tensor)
    tensor /= state.world_size
    return dict(zip(keys, tensor.tolist()))


def cleanup(state: DistState) -> None:
    """Leave the process group."""
    if state.enabled and dist.is_initialized():
        dist.destroy_process_group()
