"""The collectives of a step, in one place: used by the module, the update and the callbacks.

Every function is a no-op (or returns its input) without an initialised process group of
more than one process, so the same code runs on one CPU and under DDP. Each is a
collective under DDP: every process must call it, in the same order.

Under parameter sharding (:func:`shards_parameters`: FSDP, DeepSpeed ZeRO-3) every forward of the
policy is a collective too (each layer gathers its parameters from the other processes), so the
passes run in lockstep: the decoders step until no process has a row left (one all-reduce of a
"still running" flag per step, :func:`any_process`), and each pass makes as many forwards as the
busiest process (:func:`most`). Under DDP and on one process none of that runs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shards_parameters(trainer_or_strategy) -> bool:
    """Whether the strategy shards the policy's parameters over processes, so that each forward is a collective:
    Lightning's ``FSDPStrategy`` and ``ModelParallelStrategy`` (FSDP2), and ``DeepSpeedStrategy`` at ZeRO stage 3.
    False for one process, DDP and ZeRO-1/2 (whose forwards see full parameters), and for None (no trainer)."""
    strategy = getattr(trainer_or_strategy, "strategy", trainer_or_strategy)
    if strategy is None:
        return False
    names = {cls.__name__ for cls in type(strategy).__mro__}
    if names & {"FSDPStrategy", "ModelParallelStrategy"}:
        return True
    if "DeepSpeedStrategy" in names:
        config = getattr(strategy, "config", None)
        return isinstance(config, dict) and (config.get("zero_optimization") or {}).get("stage") == 3
    return False


def most(count: int, device: torch.device | str) -> int:
    """The largest ``count`` over processes (one all-reduce); ``count`` without a process group."""
    if not is_distributed():
        return int(count)
    return int(global_max(torch.tensor(float(count), device=device)))


def global_sum(value: Tensor) -> Tensor:
    """The sum of ``value`` over processes (a detached copy)."""
    value = value.detach().clone()
    if is_distributed():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def global_max(value: Tensor) -> Tensor:
    """The element-wise maximum of ``value`` over processes (a detached copy)."""
    value = value.detach().clone()
    if is_distributed():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def any_process(flag: bool | Tensor, device: torch.device | str) -> bool:
    """Whether ``flag`` is set on any process (one all-reduce, one host sync)."""
    value = torch.as_tensor(flag, dtype=torch.float32, device=device).reshape(())
    return bool(global_max(value) > 0)


def gather(value: Tensor) -> Tensor:
    """Every process's ``value`` stacked in rank order: [W, *value.shape] (all processes get it)."""
    if not is_distributed():
        return value.detach().unsqueeze(0)
    parts = [torch.empty_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, value.detach().contiguous())
    return torch.stack(parts)


def gather_flat(values: Tensor) -> Tensor:
    """Every process's ``values`` [N] one after another: [W * N] (equal N on every process)."""
    return gather(values).reshape(-1)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Process ``src``'s ``obj`` on every process (a picklable value)."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order, on every process; ``[obj]`` without a process group."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_per_rank(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (index = rank), None elsewhere; ``[obj]`` without a process group.

    Lightning builds a checkpoint on every rank and writes rank 0's: state that differs between
    processes (each rank's replay buffer, its generators) is gathered here when saved.
    """
    if not is_distributed():
        return [obj]
    rank, world = rank_and_world()
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def rank_share(per_rank: list[Any], rank: int, world_size: int) -> list[Any]:
    """The saved ranks' states this rank takes over: its own when the world size is unchanged,
    else saved ranks ``rank, rank + world_size, ...`` (every saved state goes to exactly one rank)."""
    return [per_rank[i] for i in range(rank, len(per_rank), world_size)]
