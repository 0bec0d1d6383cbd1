"""One process of a training job, alone or under ``torchrun`` (Part 07's pretraining command).

``DistributedProcess`` hides whether ``torch.distributed`` is in use: a lone process is rank 0 of
a world of 1, and its barrier, mean and any are the identity.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from helpers import runtime

__all__ = ["DistributedProcess"]


class DistributedProcess:
    """This process's place in a torchrun job (or a lone process): rank, world, device, collectives.

    Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set) it joins the process group (nccl on CUDA, gloo
    on the CPU, where the processes of one machine then share its cores); alone, every collective is
    the identity, so the same training code runs either way.
    """

    def __init__(self, requested_device: str | None):
        self.enabled = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device(requested_device) if requested_device else runtime.device()
        if device.type == "cuda" and self.enabled:
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        if self.enabled:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            if device.type == "cpu":  # processes on one machine share its cores
                local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def all_mean(self, value: float) -> float:
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item() / self.world

    def any(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        tensor = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(tensor)
        return bool(tensor.item())

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
