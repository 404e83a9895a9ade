"""What the library needs to run on several processes with FSDP2 (`torch.distributed.fsdp.fully_shard`).

Under FSDP2 every parameter is a `DTensor` holding one shard; a module's shards are gathered by the pre-forward hook of
its `fully_shard` unit and freed after. Code that reads weights outside a forward (the LM head for a chunked loss, the
scored weights for `|grad * W|`) must therefore run inside the root module's forward ([`call_through_forward`]) or
gather explicitly ([`full_tensor`]). Work split over ranks must give every rank the same number of collective steps
([`rank_share`]). Nothing here is needed, or does anything, in a single process.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def rank_and_world() -> tuple[int, int]:
    """`(rank, world_size)` of the initialized default process group, `(0, 1)` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_from_environment() -> tuple[int, int]:
    """Join the process group `torchrun` / `accelerate launch` describe in the environment (`WORLD_SIZE`, `RANK`,
    `MASTER_ADDR`, ...) unless one is initialized: NCCL with one GPU per `LOCAL_RANK`, gloo on CPU. Returns
    `(rank, world_size)`; a plain single process stays as it is, `(0, 1)`."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank_and_world()


def destroy_process_group() -> None:
    """
    Destroy the default process group and free it now, on this rank, so its threads end before the interpreter does.

    `torch.distributed.destroy_process_group` drops torch's own references to the group, but every `DeviceMesh` of an
    FSDP2-sharded model keeps the group in its registry, and DTensor's sharding caches keep those meshes alive until
    exit. The group's gloo worker threads then outlive `main`, and one that frees a tensor while the interpreter shuts
    down aborts the process ("terminate called without an active exception") after the work succeeded, so `torchrun`
    reports a finished job as failed. Detaching the group from every live mesh destroys it here, joining its threads.
    Nothing happens without an initialized group.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    torch.distributed.destroy_process_group()
    gc.collect()  # sharded models are reference cycles: free those no longer used, with their meshes
    mesh_class = getattr(sys.modules.get("torch.distributed.device_mesh"), "DeviceMesh", None)
    for obj in gc.get_objects() if mesh_class is not None else ():
        registry = getattr(obj, "_pg_registry", None) if type(obj) is mesh_class else None
        if isinstance(registry, dict):  # torch's per-mesh {group name: group}; the group is destroyed already
            registry.clear()
    gc.collect()


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


def is_sharded(module: nn.Module) -> bool:
    """Whether `module`'s parameters are FSDP2 shards (`DTensor`s) in an initialized process group."""
    if rank_and_world()[1] == 1:
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def fsdp_requested(training_args=None) -> bool:
    """Whether training will shard with FSDP: `training_args.fsdp` is set, or `accelerate launch` was given an FSDP
    config (it exports `ACCELERATE_USE_FSDP=true`)."""
    if training_args is not None and getattr(training_args, "fsdp", None):
        return True
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def use_fsdp_on_cpu_ranks(accelerator, plugin_args: dict | None = None) -> bool:
    """
    Make `accelerator` run FSDP2 on CPU ranks (gloo) when FSDP was asked for; returns whether it does now.

    accelerate 1.16 makes a run FSDP only from a GPU-like distributed type (`AcceleratorState.__init__`, the
    `MULTI_GPU` / `MULTI_NPU` / ... branch): on CPU ranks it stays `MULTI_CPU`, drops the FSDP plugin, and the Trainer
    wraps the model in DDP. FSDP2 itself (`fully_shard`, its collectives, `torch.distributed.checkpoint`) runs on gloo,
    and accelerate's FSDP2 code paths (`fsdp2_prepare_model`, full state dicts, FSDP checkpoints) only use
    `accelerator.device`, so this sets what the GPU branch would have set: the distributed type (in accelerate's shared
    state, which every `AcceleratorState` / `PartialState` reads) and the plugin, built from `plugin_args` (the
    Trainer's `args.fsdp_plugin_args`) or from the `FSDP_*` variables `accelerate launch` exports. Call it right after
    the accelerator is created, before anything is prepared. Nothing changes on GPU ranks, without FSDP, or with
    `fsdp_version: 1` (FSDP1 places modules on CUDA devices: that run keeps DDP, with a warning).
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or not (plugin_args is not None or fsdp_requested()):
        return False
    plugin = FullyShardedDataParallelPlugin(**(plugin_args or {}))
    if plugin.fsdp_version != 2:
        logger.warning("FSDP version %s does not run on CPU ranks; training with DDP. Set fsdp_version: 2 to shard.",
                       plugin.fsdp_version)
        return False
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    logger.info("The Trainer shards with FSDP2 on CPU rank %d (accelerate alone would use DDP here).",
                state.process_index)
    return True


def shard_decoder_layers(model: nn.Module) -> nn.Module:
    """Apply FSDP2 in place: one `fully_shard` unit per decoder layer (the `layers` of the model's decoder, any family),
    then the root (embeddings, final norm, LM head). Returns `model`, whose parameters are now `DTensor` shards over the
    default process group."""
    from torch.distributed.fsdp import fully_shard

    from .modeling import backbone

    layers = getattr(backbone(model), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}'s decoder has no `layers`: cannot shard it one decoder layer per unit.")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def call_through_forward(module: nn.Module, function: Callable, *args: Any, **kwargs: Any) -> Any:
    """`function(*args, **kwargs)`, run inside `module`'s forward when `module` is an FSDP2 unit (so its shards are
    gathered for the call and its gradients reduce-scattered after the backward), directly otherwise."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        return function(*args, **kwargs)
    original = module.forward

    def forward(*_args, **_kwargs):
        module.forward = original
        return function(*_args, **_kwargs)

    module.forward = forward
    try:
        return module(*args, **kwargs)
    finally:
        module.forward = original


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a `DTensor` shard (a collective: every rank must call it), else `tensor` itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def all_reduce_sum(value: float) -> float:
    """Sum of `value` over all ranks (itself in a single process)."""
    return _all_reduce(value, "SUM")


def all_reduce_max(value: float) -> float:
    """Largest `value` of all ranks (itself in a single process)."""
    return _all_reduce(value, "MAX")


def _all_reduce(value: float, op: str) -> float:
    if rank_and_world()[1] == 1:
        return value
    total = torch.tensor([float(value)], dtype=torch.float64)
    torch.distributed.all_reduce(total, op=getattr(torch.distributed.ReduceOp, op))
    return total.item()


def rank_share(items: Sequence) -> list[tuple[Any, bool]]:
    """This rank's share of `items` (`items[rank::world]`) as `(item, counted)` pairs, padded with `(items[0], False)`
    so that every rank takes the same number of steps (FSDP collectives run in lockstep); a step with
    `counted=False` must run but contribute nothing."""
    rank, world = rank_and_world()
    mine = [(item, True) for item in items[rank::world]]
    steps = (len(items) + world - 1) // world
    return mine + [(items[0], False)] * (steps - len(mine))


__all__ = [
    "rank_and_world",
    "init_from_environment",
    "destroy_process_group",
    "barrier",
    "is_sharded",
    "fsdp_requested",
    "use_fsdp_on_cpu_ranks",
    "shard_decoder_layers",
    "call_through_forward",
    "full_tensor",
    "all_reduce_sum",
    "all_reduce_max",
    "rank_share",
]
