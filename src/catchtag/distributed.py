"""Data parallel scans under torchrun: each rank scans its shard of the prompts into the shared run folder.

`torchrun --nproc-per-node N -m catchtag scan ...` sets RANK / WORLD_SIZE / LOCAL_RANK; a plain run is rank 0 of 1.
Prompts go to ranks round-robin by position; every rank writes its own part files, and rank 0 assembles the
tables once all ranks are done. torchrun's agent stops every rank when one fails, with that rank's message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from catchtag.errors import CatchtagError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        return items[self.rank::self.world]

    def barrier(self) -> None:
        """Wait for every rank; a rank that died on the way becomes one clear error here, not a traceback."""
        if self.world > 1:
            try:
                torch.distributed.barrier()
            except RuntimeError as err:  # gloo: "Connection closed by peer"; NCCL: DistBackendError (a RuntimeError)
                raise CatchtagError(f"rank {self.rank} of {self.world} stops: another rank failed before this point "
                                    f"(its own error is printed above). ({str(err).splitlines()[0][:200]})") from None

    def device(self, device: str) -> str:
        """cuda -> this rank's GPU; anything else unchanged."""
        if self.world > 1 and device == "cuda":
            return f"cuda:{self.local_rank}"
        return device


def world_size() -> int:
    """How many processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: str = "cpu") -> Dist:
    """Join the torchrun process group if there is one (gloo on CPU, nccl on CUDA)."""
    world = world_size()
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        torch.distributed.init_process_group(backend, timeout=timedelta(hours=6))
    return Dist(rank, world, local)


def finish(dist: Dist) -> None:
    if dist.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
