"""Data parallelism with torch.distributed: which process this is, its shard of each batch, DDP and FSDP.

A launcher (`torchrun --nproc-per-node N`, `accelerate launch`) starts N copies of the same command and
tells each its RANK, LOCAL_RANK and WORLD_SIZE in the environment. Each copy holds the whole model, takes
its shard of every global batch, and DDP averages the gradients so every copy takes the same step.
Processes talk over gloo on CPU and NCCL on GPU. Without a launcher everything here is a no-op.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from labkit import LabkitError


class ShardError(LabkitError):
    """A batch cannot be shared out among the processes."""


# ---------------------------------------------------------------- which process this is


def launched() -> bool:
    """True when a launcher started several processes (WORLD_SIZE > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """True when this process is one of several joined in a process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """How many processes share the run (1 without a launcher)."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's number, 0 to world_size() - 1 (0 without a launcher)."""
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """True on the process that writes checkpoints, logs and plots (rank 0)."""
    return rank() == 0


def backend_for(device: str) -> str:
    """The collective backend for a device: NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


def start(device: str, timeout_s: float = 600) -> str:
    """Join the launcher's process group (if launched) and return this process's device ('cuda:LOCAL_RANK' on GPU)."""
    if not launched():
        return device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), timeout=timedelta(seconds=timeout_s))
    return device


def stop() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- sharing out the work


def shard(indices: list[int], rank_: int | None = None, world: int | None = None) -> list[int]:
    """This process's contiguous share of a global batch's example indices (all of them when alone)."""
    rank_, world = rank() if rank_ is None else rank_, world_size() if world is None else world
    if world == 1:
        return indices
    if len(indices) < world:
        raise ShardError(f"a batch of {len(indices)} example(s) cannot be shared among {world} processes. "
                         f"Fix: use batch_size >= {world} (the global batch; each process takes a share)")
    n = len(indices)
    return indices[rank_ * n // world : (rank_ + 1) * n // world]


SIMULATED = {"processes": 1}  # set by simulate(): one process that plays N, for checking a distributed run


@contextmanager
def simulate(processes: int):
    """Alone, take every global batch as `processes` processes would: each shard a micro-batch, one after another.

    DDP averages the processes' gradients; accumulating the same shards in one process sums the same
    numbers (halving is exact in floating point), so with 2 processes and grad_accum=1 the step is
    bit-identical: the reference a distributed run is checked against.
    """
    if active():
        raise ShardError("simulate() is for a single process; this one is one of several already")
    SIMULATED["processes"] = processes
    try:
        yield
    finally:
        SIMULATED["processes"] = 1


def my_shards(indices: list[int]) -> list[list[int]]:
    """The parts of a global batch this process runs: its shard, or every shard in turn under simulate()."""
    world = SIMULATED["processes"]
    if world > 1:
        return [shard(indices, r, world) for r in range(world)]
    return [shard(indices)]


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum of a list of numbers over all processes (the list itself when alone)."""
    if not active():
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


class ObjectiveLoss(torch.nn.Module):
    """An objective's loss as a module, so DistributedDataParallel's forward and backward hooks run around it."""

    def __init__(self, model: torch.nn.Module, loss: Callable[[Any, dict], tuple[torch.Tensor, dict]]) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        return self.loss(self.model, batch)


def data_parallel(model: torch.nn.Module, loss: Callable) -> torch.nn.parallel.DistributedDataParallel | None:
    """DDP around `loss(model, batch)` when several processes share the run, else None.

    DDP checks at start that every process holds the same weights (it broadcasts rank 0's), then averages
    the gradients of the trainable (adapter) parameters over the processes during backward.
    """
    if not active():
        return None
    device = next(p for p in model.parameters() if p.requires_grad).device
    return torch.nn.parallel.DistributedDataParallel(ObjectiveLoss(model, loss),
                                                     device_ids=[device] if device.type == "cuda" else None)


def sync_unless(skip: bool, ddp: torch.nn.Module | None):
    """A context in which DDP does not average gradients (for all but the last micro-batch of a step).

    FSDP (fully_sharded) has no such context: it reduces after every micro-batch, which sums the same."""
    return ddp.no_sync() if skip and hasattr(ddp, "no_sync") else nullcontext()


# ---------------------------------------------------------------- sharding the model (FSDP)


def fsdp_plan(model: torch.nn.Module, device: str) -> dict[str, Any]:
    """How fully_shard is applied: each decoder layer, then the loss module around the whole model.

    The root is the loss module, not the model: the loss calls the decoder and the output head directly
    (labkit.sft.labelled_logits), so only a root around it gathers the embeddings, final norm and head.
    On GPU the weights are gathered in bf16 and gradients reduced in fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    gpu = str(device).startswith("cuda")
    return {
        "layers": list(base.model.layers),  # inner units first: one layer's weights gathered at a time
        "mesh": "cuda" if gpu else "cpu",
        "backend": backend_for(device),
        "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if gpu
                     else MixedPrecisionPolicy(),
        "reshard_after_forward": True,  # ZeRO-3: free a layer's gathered weights after its forward
    }


def fully_sharded(model: torch.nn.Module, loss: Callable) -> torch.nn.Module | None:
    """FSDP2 (fully_shard, ZeRO-3) around `loss(model, batch)`: each process keeps 1/world of every weight; None alone.

    A drop-in for data_parallel: like DDP, FSDP averages the gradients over the processes. Checkpoints and
    saved adapters would need the shards gathered first (DTensor.full_tensor), which labkit does not do.
    """
    if not active():
        return None
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device
    plan = fsdp_plan(model, str(device))
    mesh = init_device_mesh(plan["mesh"], (world_size(),))
    for layer in plan["layers"]:
        fully_shard(layer, mesh=mesh, mp_policy=plan["mp_policy"], reshard_after_forward=plan["reshard_after_forward"])
    return fully_shard(ObjectiveLoss(model, loss), mesh=mesh, mp_policy=plan["mp_policy"])
