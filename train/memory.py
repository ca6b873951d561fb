"""The memory plan: peak GPU memory per rank of a run's settings, before 64 GPUs are queued.

    python -m train --estimate-memory --model-config smollm3-3b --seq-len 32768 --world-size 8 [--json]

It takes the settings of a run and allocates nothing. The run's own build (build_module, shard,
materialize, AdamW) runs on fake tensors (FakeTensorMode: shapes, dtypes, no storage) over a fake
process group of --world-size ranks, for two optimizer steps under torch's FSDPMemTracker (MemTracker
for one GPU), which counts the bytes of every live tensor by kind at the peak. The second step is
the one reported: the first has no AdamW state yet. torchtitan's estimator works the same way.

What the fake run models, and where it differs from a CUDA run:
- The fake tensors live on the CPU device, because a CPU-only torch can't run the backward of fake
  CUDA tensors. A tensor's bytes don't depend on its device.
- Attention is sdpa over one document per row (causal, no mask): output and logsumexp, what
  flex_attention keeps on CUDA. Its BlockMask (under 1 MB at 32k) is left out.
- The loss head is the chunked one. Liger's fused linear cross-entropy, used on CUDA, keeps its
  weight gradient in the weight's dtype instead of fp32, so it needs less. Liger's RMSNorm, SwiGLU
  and RoPE are not applied either; they keep fewer intermediates in the recomputed layer. Both make
  the estimate an upper bound.
- Not counted: the CUDA context and NCCL buffers (~1 GB together), allocator fragmentation.
"""

import json
from dataclasses import replace

import torch
import torch.distributed as dist
from train.model import chunked_linear_cross_entropy, model_config, num_params
from train.parallel import autocast, materialize, resolve_dist, resolve_precision, shard

GB = 1e9
PARTS = {  # the tracker's kinds of tensor -> the parts we report
    "parameters": ("Parameter", "Sharded Param", "Unsharded Param", "Buffer", "All Gather"),
    "gradients": ("Gradient", "Sharded Grad", "Unsharded Grad", "Reduce Scatter"),
    "optimizer": ("Optstate", "OptState"),
    "activations": ("Activation", "Temp", "Inputs", "Other"),
}


def estimate_memory(cfg) -> dict:
    """Peak memory of one rank in GB, and its parts at that moment, for the settings `cfg` on
    `cfg.world_size` GPUs. `loss_head_gb` is what the loss head adds on top of what it finds."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from train.__main__ import build_module

    seq_len = cfg.seq_len or shards_seq_len(cfg.shards)
    mode = resolve_dist(cfg.dist, cfg.world_size)
    if mode == "ddp":
        raise ValueError("--estimate-memory plans FSDP runs and one-GPU runs; drop --dist ddp")
    precision = resolve_precision(cfg.precision, torch.device("cuda"))
    config = model_config(cfg)
    cpu = torch.device("cpu")
    dist.init_process_group("fake", rank=0, world_size=cfg.world_size, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (cfg.world_size,)) if mode == "fsdp" else None  # outside the fake mode
        with FakeTensorMode():
            module, _ = build_module(replace(cfg, liger=False, compile=False), config, "sdpa", 1, cpu)
            if mode == "fsdp":
                shard(module, precision, mesh)
            materialize(module, cpu)
            # The single-tensor AdamW, not the run's fused one: fused AdamW on fake CPU DTensors allocates
            # full-size states, and with foreach the tracker put AdamW's part at 3B over 8 ranks at 41.5 GB,
            # above even the unsharded state (24.6 GB). The loop gives 3.1 GB, the sharded state.
            optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
            input_ids = torch.zeros(cfg.batch_size, seq_len, dtype=torch.long)
            if mode == "fsdp":
                tracker = FSDPMemTracker(module, optimizer)
                tracker.track_inputs((input_ids,))
            else:
                tracker = MemTracker()
                tracker.track_external(module, optimizer, input_ids)
            with tracker:
                for step in range(2):
                    train_step(module, optimizer, input_ids, mode, precision, cfg.grad_accum > 1, cfg.grad_clip)
                    if step == 0:
                        tracker.reset_mod_stats()
            peak = tracker.get_tracker_snapshot("peak")[cpu]
            head_peak = loss_head_peak(cfg.batch_size * seq_len, config, precision)
    finally:
        dist.destroy_process_group()
    parts = {f"{name}_gb": sum(peak.get(kind, 0) for kind in kinds) / GB for name, kinds in PARTS.items()}
    return {"peak_gb": peak["Total"] / GB, **parts, "loss_head_gb": head_peak / GB,
            "gpu_memory_gb": cfg.gpu_memory, "fits": peak["Total"] / GB <= cfg.gpu_memory,
            "world_size": cfg.world_size, "mode": mode, "precision": precision, "seq_len": seq_len,
            "batch_size": cfg.batch_size, "activation_checkpointing": cfg.activation_checkpointing,
            "parameters": num_params_of(config)}


def train_step(module, optimizer, input_ids, mode: str, precision: str, accumulating: bool, grad_clip: float) -> None:
    """train.__main__.train_step's tensors, without its host syncs (a fake tensor has no value). Every
    token is a target of one source: the loss head's largest case, and no data-dependent shapes. One
    micro-batch (the tracker follows one forward per step); with gradient accumulation the gradients
    are zeroed, not freed, so the next step meets them, as a step's second micro-batch does."""
    with autocast(mode, precision, input_ids.device):
        loss, _ = module(input_ids, None, input_ids, None)
    loss.backward()
    parameters = [p for p in module.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(parameters, grad_clip, norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=not accumulating)


def loss_head_peak(num_tokens: int, config, precision: str) -> int:
    """Bytes the loss head allocates on top of its inputs (hidden states and lm_head's weight, in the
    compute dtype), forward and backward, tracked alone on fake tensors."""
    from torch.distributed._tools.mem_tracker import MemTracker

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    hidden = torch.zeros(num_tokens, config.hidden_size, dtype=dtype, requires_grad=True)
    weight = torch.zeros(config.vocab_size, config.hidden_size, dtype=dtype, requires_grad=True)
    targets = torch.zeros(num_tokens, dtype=torch.long)
    tracker = MemTracker()
    tracker.track_external(hidden, weight, targets)
    with tracker:
        chunked_linear_cross_entropy(hidden, weight, targets).backward()
    inputs = (hidden.numel() + weight.numel()) * hidden.element_size() + targets.numel() * 8
    return tracker.get_tracker_snapshot("peak")[hidden.device]["Total"] - inputs


def num_params_of(config) -> int:
    from train.model import build_meta_model

    return num_params(build_meta_model(config, "sdpa"))


def shards_seq_len(shard_dir: str) -> int:
    from prep.shards import read_manifest

    if not shard_dir:
        raise ValueError("--estimate-memory needs the sequence length: pass --seq-len N (or --shards DIR)")
    return int(read_manifest(shard_dir)["seq_len"])


def print_estimate(cfg) -> int:
    """`python -m train --estimate-memory`: the table, or one JSON object with --json."""
    plan = estimate_memory(cfg)
    if cfg.json:
        print(json.dumps(plan))
        return 0
    verdict = "fits" if plan["fits"] else "does NOT fit: lower --batch-size, add GPUs, or keep activation checkpointing on"
    print(f"{plan['parameters'] / 1e9:.2f}B parameters, {plan['batch_size']} x {plan['seq_len']} tokens per micro-batch, "
          f"{plan['precision']}, {plan['mode']} over {plan['world_size']} GPU(s), activation checkpointing "
          f"{'on' if plan['activation_checkpointing'] else 'off'}")
    print(f"peak memory per GPU: {plan['peak_gb']:.1f} GB of {plan['gpu_memory_gb']:g} GB: {verdict}")
    for name in (*PARTS, "loss_head"):
        note = " (its own peak, on top of what it finds)" if name == "loss_head" else ""
        print(f"  {name.replace('_', ' '):<12} {plan[name + '_gb']:7.2f} GB{note}")
    return 0
