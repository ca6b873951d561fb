"""train/memory.py: `--estimate-memory` against a real run's measured peak, and its command line.

The measured side trains the same settings for real in a fresh process (the trainer's build_module,
parallelize and train_step) and takes the growth of its peak RSS from just before the weights were
allocated. glibc's mmap threshold is fixed, so every large tensor is its own mapping that is handed
back when freed, and RSS follows the bytes alive."""

import json
import os
import subprocess
import sys

import pytest

from train.__main__ import main
from train.config import TrainConfig

SETTINGS = dict(model_config="tiny", seq_len=1024, precision="fp32", grad_accum=2, lr=1e-3)


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_peak() -> int:
    """Bytes: peak RSS of two real optimizer steps of SETTINGS on CPU, above the RSS before the weights."""
    import gc

    import numpy as np
    import torch

    from train.__main__ import Plan, build_module, peak_memory_gb, train_step
    from train.data import Batch
    from train.model import full_weights, model_config
    from train.parallel import parallelize

    cfg = TrainConfig(**SETTINGS)
    cpu = torch.device("cpu")
    config = model_config(cfg)
    module, _ = build_module(cfg, config, "sdpa", 1, cpu)
    T = cfg.seq_len
    ids = torch.randint(0, config.vocab_size, (1, T))
    batch = Batch(ids, torch.arange(T)[None], ids.roll(-1, 1), torch.zeros(1, T, dtype=torch.long),
                  np.array([T]), T, T * T)
    gc.collect()
    before = current_rss()
    module = parallelize(module, "none", "fp32", cpu, 0, 1, lambda: full_weights(cfg, config, "sdpa"))
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr)
    plan = Plan(0, 1, cpu, "none", "fp32", False, 0, 2, 0, None, ["a"], None, "")
    for _ in range(2):
        train_step(module, optimizer, [batch] * cfg.grad_accum, plan, cfg.grad_clip)
    return int(peak_memory_gb(cpu) * 1e9) - before  # the trainer's own reading: this process's VmHWM


@pytest.mark.slow
def test_the_estimate_is_within_15_percent_of_the_measured_peak():
    from train.memory import estimate_memory

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    measured = int(out.stdout.strip().splitlines()[-1]) / 1e9
    estimate = estimate_memory(TrainConfig(**SETTINGS, world_size=1))
    assert estimate["peak_gb"] == pytest.approx(measured, rel=0.15), (estimate, measured)
    parts = ("parameters_gb", "gradients_gb", "optimizer_gb", "activations_gb")
    assert sum(estimate[p] for p in parts) == pytest.approx(estimate["peak_gb"], rel=1e-9)
    # 8.5M fp32 parameters: 34 MB each of weights and gradients, twice that of AdamW state
    assert estimate["parameters_gb"] == pytest.approx(8_454_720 * 4 / 1e9, rel=0.01)
    assert estimate["optimizer_gb"] == pytest.approx(2 * 8_454_720 * 4 / 1e9, rel=0.01)


def test_fsdp_shards_the_static_memory_and_the_cli_prints_json(capsys):
    assert main(["--estimate-memory", "--json", "--model-config", "tiny", "--seq-len", "512", "--world-size", "4",
                 "--gpu-memory", "0.1"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["mode"] == "fsdp" and plan["precision"] == "bf16" and plan["fits"] is False
    assert plan["optimizer_gb"] == pytest.approx(2 * 8_454_720 * 4 / 4 / 1e9, rel=0.02)  # a quarter of AdamW's state
    assert main(["--estimate-memory", "--model-config", "tiny"]) == 2
    assert "--seq-len" in capsys.readouterr().err


if __name__ == "__main__":
    print(measure_peak())
