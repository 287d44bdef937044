"""PyTorch's own distributed engine: who this process is, and the few collectives training needs.

Under ``torchrun --nproc-per-node N`` the environment names the rank and the world;
the process group uses gloo on CPU and nccl on GPU. Alone, the world is one process
and every collective is the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Placement:
    """This process's place in the run, and its device."""

    rank: int
    world: int
    local_world: int  # processes on this machine (they share its memory)
    device: torch.device

    @property
    def main(self) -> bool:
        """The process that writes files and shows progress."""
        return self.rank == 0


def start(device: str) -> Placement:
    """Join the process group when launched by torchrun; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    place = torch.device(device)
    if place.type == "cuda" and place.index is None:
        place = torch.device("cuda", local_rank)
    if world > 1:
        dist.init_process_group("nccl" if place.type == "cuda" else "gloo")
    if place.type == "cuda":
        torch.cuda.set_device(place)
    return Placement(rank, world, local_world, place)


def stop(placement: Placement) -> None:
    if placement.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def sum_all(values: Tensor, placement: Placement) -> Tensor:
    """``values`` summed over every process (a new tensor)."""
    values = values.clone()
    if placement.world > 1:
        dist.all_reduce(values)
    return values
