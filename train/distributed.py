"""One process or many (torchrun): rank, world size, device, and the few collectives training needs."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


__all__ = ["Process", "all_reduce_sum", "barrier", "broadcast_object", "cleanup", "elastic_restart_count",
           "elastic_agents", "elastic_run_id", "setup"]


@dataclass(frozen=True)
class Process:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup() -> Process:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*), if any.

    nccl on GPUs, gloo on CPUs; each process drives the GPU of its local rank.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Process(rank, world, local_rank, device)


def elastic_run_id() -> str | None:
    """torchrun's run id (its --rdzv-id; a fresh id per --standalone launch), the same on every node and restart."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or None


def elastic_agents() -> list[str]:
    """The torchrun agents of this job as "host:pid" (each worker's parent process), from every process.

    A restart keeps the agents (on the machines that survived); a new launch has new ones, even with
    the same --rdzv-id, so a checkpoint that names one of them was written by this job.
    """
    own = f"{socket.gethostname()}:{os.getppid()}"
    if not dist.is_initialized():
        return [own]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, own)
    return sorted(set(gathered))


def elastic_restart_count(device: torch.device) -> int:
    """How many times torchrun's agent has restarted the workers (TORCHELASTIC_RESTART_COUNT), the most any
    node reports: an agent that restarts its workers only because another node failed keeps its count."""
    try:
        own = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    except ValueError:
        own = 0
    tensor = torch.tensor([own], dtype=torch.int64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all processes (float64, so counts stay exact)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank src's Python object on every process (errors found on rank 0 reach every rank)."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
