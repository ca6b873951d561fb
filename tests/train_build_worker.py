"""Run by tests/test_train_build.py under `torchrun --nproc-per-node 2`: builds modules the trainer's way
(build_module, then parallelize with rank 0's weights) and writes what the test checks into OUT."""

import gc
import json
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from train.__main__ import Plan, build_module, peak_memory_gb, train_step
from train.config import TrainConfig
from train.data import Batch
from train.model import full_weights, model_config
from train.parallel import all_reduce_sum, parallelize

CPU = torch.device("cpu")


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def build(cfg: TrainConfig, precision: str = "fp32", rss: dict | None = None):
    """The trainer's build; with `rss`, this rank's peak RSS growth from just before the weights are allocated."""
    config = model_config(cfg)
    module, _ = build_module(cfg, config, "sdpa", 1, CPU)
    gc.collect()
    before = current_rss()
    module = parallelize(module, "fsdp", precision, CPU, dist.get_rank(), dist.get_world_size(),
                         lambda: full_weights(cfg, config, "sdpa"))
    if rss is not None:
        rss["peak_growth"] = int(peak_memory_gb(CPU) * 1e9) - before
    return module


def losses(precision: str, steps: int = 3) -> list[float]:
    """The global loss of `steps` AdamW steps of the seeded tiny model on fixed rows, one per rank."""
    module = build(TrainConfig(model_config="tiny", seed=42), precision)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    plan = Plan(dist.get_rank(), 2, CPU, "fsdp", precision, False, 0, steps, 0, None, ["a"], None, "")
    T = 128
    ids = torch.randint(0, 128256, (1, T), generator=torch.Generator().manual_seed(dist.get_rank()))
    labels = ids.roll(-1, 1)
    labels[0, -1] = -100
    sources = (labels >= 0).long() - 1
    batch = Batch(ids, torch.arange(T)[None], labels, sources, torch.tensor([T - 1]).numpy(), T, T * T)
    out = []
    for _ in range(steps):
        loss_sums, _ = train_step(module, optimizer, [batch], plan, grad_clip=1.0)
        out.append(all_reduce_sum(loss_sums.float()).item() / (2 * (T - 1)))
    return out


def main(out: Path, pretrained: str, large: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # First, while this process's peak RSS is still its import-time one: --model of ~100M parameters.
    rss = {}
    module = build(TrainConfig(model=large), rss=rss)
    rss["local_params"] = sum(p.to_local().numel() * p.element_size() for p in module.parameters())
    (out / f"rss-{rank}.json").write_text(json.dumps(rss))
    del module
    gc.collect()

    for name, cfg in (("pretrained", TrainConfig(model=pretrained)), ("random", TrainConfig(model_config="tiny", seed=42))):
        full = get_model_state_dict(build(cfg).model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            save_file({k: v.clone() for k, v in full.items()}, out / f"{name}.safetensors")
    result = {"fp32": losses("fp32"), "bf16": losses("bf16")}
    if rank == 0:
        (out / "losses.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
