"""GPU acceptance in one command: the CUDA paths that CPU tests can't run, and SmolLM3-3B at 32k.

    python scripts/gpu_check.py --out gpu_check.json          # one H200: under 8 minutes
    python scripts/gpu_check.py --dry-run --out /tmp/dry.json  # CPU: the tiny model, 256 tokens, no CUDA checks

It writes one JSON object with:
  isolation   flex_attention on CUDA: document 2's logits packed after document 1 equal its standalone forward
  liger       Liger's fused linear cross-entropy vs the chunked head (loss and gradients, bf16), and the
              model's logits with Liger's kernels on vs off
  runs        a random-init SmolLM3-3B (`--model-config smollm3-3b`) at 32k, ~20 steps, eager and --compile:
              tokens/s and MFU (document-masked attention counted) over the steps after warm-up, peak
              memory next to `--estimate-memory`'s figure for the same settings
Goals (issue 12): MFU >= 45% at 32k on one H200; peak memory within 10% of the estimate.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 3  # steps left out of tokens/s and MFU: allocator, compilation


def check_isolation(device: torch.device) -> dict:
    from transformers import AutoModelForCausalLM, SmolLM3Config

    from train.model import TINY

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(SmolLM3Config(**TINY), attn_implementation="flex_attention").to(device).eval()
    doc1, doc2 = list(range(11, 18)), list(range(21, 27))
    ids = torch.tensor([doc1 + doc2], device=device)
    positions = torch.tensor([list(range(len(doc1))) + list(range(len(doc2)))], device=device)
    with torch.no_grad():
        hidden = model.model(input_ids=ids, position_ids=positions, attention_mask=None, use_cache=False)
        packed = (hidden.last_hidden_state @ model.lm_head.weight.T)[0, len(doc1):]
        alone = model(input_ids=torch.tensor([doc2], device=device), use_cache=False).logits[0]
    gap = (packed - alone).abs().max().item()
    return {"max_abs_diff": gap, "ok": gap < 1e-4}


def check_liger(device: torch.device) -> dict:
    from transformers import AutoModelForCausalLM, SmolLM3Config

    from train.model import TINY, apply_liger, chunked_linear_cross_entropy, liger_linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(4096, 2048, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(128256, 2048, device=device) * 0.02).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 128256, (4096,), device=device)
    losses, grads = [], []
    for head in (chunked_linear_cross_entropy, liger_linear_cross_entropy()):
        loss = head(hidden, weight, targets).float()
        losses.append(loss.item())
        grads.append(torch.autograd.grad(loss, (hidden, weight)))
    grad_gap = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(*grads))
    loss_gap = abs(losses[0] - losses[1]) / abs(losses[0])

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(SmolLM3Config(**TINY), attn_implementation="sdpa",
                                             dtype=torch.bfloat16).to(device).eval()
    ids = torch.randint(0, 128256, (1, 512), device=device)
    with torch.no_grad():
        off = model(input_ids=ids, use_cache=False).logits.float()
        apply_liger(model)
        on = model(input_ids=ids, use_cache=False).logits.float()
    kernel_gap = ((on - off).norm() / off.norm()).item()
    tolerance = 2e-2  # bf16: 8 bits of mantissa
    return {"loss_rel_diff": loss_gap, "grad_rel_diff": grad_gap, "kernels_on_off_rel_diff": kernel_gap,
            "ok": max(loss_gap, grad_gap, kernel_gap) < tolerance}


def train_run(shards: Path, work: Path, args, compiled: bool) -> dict:
    """`python -m train` as a user runs it; the steps after warm-up, and the estimate for the same settings."""
    settings = ["--model-config", args.model_config, "--max-steps", str(args.steps), "--save-every", "0"]
    if compiled:
        settings.append("--compile")
    output = work / ("compiled" if compiled else "eager")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.time()
    subprocess.run([sys.executable, "-m", "train", "--shards", str(shards), "--output", str(output), "--overwrite",
                    *settings, *args.train_args], check=True, cwd=ROOT, env=env)
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()][WARMUP:]
    estimate = subprocess.run([sys.executable, "-m", "train", "--estimate-memory", "--json", "--shards", str(shards),
                               *settings, *args.train_args], check=True, cwd=ROOT, env=env, capture_output=True,
                              text=True)
    estimate = json.loads(estimate.stdout.strip().splitlines()[-1])
    peak = max(r["peak_mem_gb"] for r in rows)
    mfu = [r["mfu"] for r in rows if r["mfu"] is not None]
    return {"compile": compiled, "seconds": time.time() - started,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
            "mfu": statistics.median(mfu) if mfu else None, "peak_mem_gb": peak,
            "estimate_peak_gb": estimate["peak_gb"], "peak_vs_estimate": peak / estimate["peak_gb"],
            "losses": [r["loss"] for r in rows]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--model-config", default="smollm3-3b")
    p.add_argument("--dry-run", action="store_true", help="CPU: tiny model, 256 tokens, 4 steps, eager only")
    p.add_argument("train_args", nargs="*", help="more flags for `python -m train`, after --")
    args = p.parse_args()
    if args.dry_run:
        args.steps, args.seq_len, args.model_config = WARMUP + 1, 256, "tiny"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert device.type == "cuda" or args.dry_run, "no GPU here: pass --dry-run to check the script on CPU"
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
              "torch": torch.__version__}
    if device.type == "cuda":
        report["isolation"] = check_isolation(device)
        report["liger"] = check_liger(device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = work / "shards"
        # The embedded sample packed at the run's length; steps past its end wrap into the next epoch.
        subprocess.run([sys.executable, "-m", "prep.cli", "build", "--mix", "nemotron=0.5,ot3=0.5", "--sample",
                        "--seq-len", str(args.seq_len), "--out", str(shards), "--overwrite"], check=True, cwd=ROOT,
                       capture_output=True)
        report["runs"] = [train_run(shards, work, args, compiled) for compiled in
                          ((False,) if args.dry_run else (False, True))]
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
