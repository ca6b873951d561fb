"""Processes, devices and data parallelism: torchrun's environment -> process group; DDP or FSDP2.

The model arrives with its parameters on the meta device. FSDP2 (`fully_shard`) goes on each decoder
layer, then on the root module (embedding, final norm and the tied lm_head, plus the loss head that
uses it), in torchtitan's order; only then is memory allocated, and rank 0's weights are broadcast
into the shards. Parameters are kept in fp32 and sharded; with bf16 each layer's are all-gathered in
bf16 and gradients reduce-scattered in fp32. DDP keeps a full fp32 copy per rank and runs the forward under bf16 autocast: fine for small
models, and the reference FSDP is tested against.
"""

import os
from contextlib import nullcontext
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel


def init_distributed(timeout_s: int = 600) -> tuple[int, int, torch.device]:
    """(rank, world size, device): torchrun's variables when present, else one process. `timeout_s`
    bounds every collective: past it, a rank whose peer died fails instead of waiting."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None,
                                timeout=timedelta(seconds=timeout_s))
        return dist.get_rank(), world_size, device
    return 0, 1, device


def resolve_precision(precision: str, device: torch.device) -> str:
    # CPU: bf16 autocast made the tiny model's step 25x slower than fp32 on this 2-core machine (0.9 s -> 23 s).
    return ("bf16" if device.type == "cuda" else "fp32") if precision == "auto" else precision


def resolve_dist(mode: str, world_size: int) -> str:
    if world_size == 1:
        return "none"
    return "fsdp" if mode == "auto" else mode


def parallelize(module: torch.nn.Module, mode: str, precision: str, device: torch.device, rank: int, world_size: int,
                full_state: Callable[[], dict]) -> torch.nn.Module:
    """From a module whose parameters are on the meta device to one ready to train, in torchtitan's order:
    FSDP2 per decoder layer and on the root (fsdp), materialization on `device`, the weights, then DDP.
    Only rank 0 calls `full_state()`; every other rank receives its shard (fsdp) or its copy (ddp) of
    each tensor by broadcast, one tensor at a time, so it never holds the whole model in host memory."""
    if mode == "fsdp":
        shard(module, precision)
    materialize(module, device)
    hf_model = module.model
    if world_size == 1:
        hf_model.load_state_dict(full_state())
    else:
        set_model_state_dict(hf_model, full_state() if rank == 0 else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    if mode == "ddp":
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    return module


def shard(module: torch.nn.Module, precision: str, mesh=None) -> None:
    """FSDP2 on each decoder layer, then on the root; `mesh`: the default one of the process group."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None, reduce_dtype=torch.float32)
    for layer in module.model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    # The root's parameters (embedding = lm_head, 263M of SmolLM3-3B's 3.1B) are needed again right at
    # the start of backward by the loss head, so they stay gathered between forward and backward.
    fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=False)


def materialize(module: torch.nn.Module, device: torch.device) -> None:
    """Allocate the meta parameters on `device`, uninitialized (the weights come next). `to_empty` also
    empties the buffers, which were built real (the rotary frequencies), so they are put back; and
    outside FSDP it allocates lm_head and the embedding apart, so they are tied again."""
    buffers = {name: buffer.detach().clone() for name, buffer in module.named_buffers()}
    if isinstance(module, FSDPModule):
        module.to_empty(device=device)
    else:  # what to_empty does, without the tensor swap that fake tensors (train.memory) refuse
        for owner in module.modules():
            for name, param in owner.named_parameters(recurse=False):
                setattr(owner, name, torch.nn.Parameter(torch.empty_like(param, device=device), param.requires_grad))
    module.model.tie_weights()
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            buffer.copy_(buffers[name])


def autocast(mode: str, precision: str, device: torch.device):
    """bf16 autocast for one process and DDP; FSDP2 casts through its MixedPrecisionPolicy instead."""
    if precision == "bf16" and mode != "fsdp":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def grad_sync(module: torch.nn.Module, last_micro_batch: bool):
    """DDP: all-reduce only after the last micro-batch. FSDP2 reduce-scatters every micro-batch into
    sharded gradients, which costs bandwidth but never holds a full unsharded gradient (6 GB at 3B)."""
    if isinstance(module, DistributedDataParallel) and not last_micro_batch:
        return module.no_sync()
    return nullcontext()


def clip_grad_norm(parameters, max_norm: float) -> float:
    """Global L2 norm of all gradients (DTensor shards included), clipped to max_norm when > 0."""
    parameters = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters], norm_type=2.0)
    if isinstance(norm, DTensor):  # FSDP2: per-shard partial norms -> the global one
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm.item()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module
