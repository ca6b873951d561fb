"""Training throughput on CPU: `python -m train` vs TRL's SFTTrainer (padding-free), same model, same data.

Both train the tiny SmolLM3 (`train.model.TINY`, same seed, so the same initial weights) on the same
packed rows of `prep build` shards, in the same order (our loader's; TRL with sequential sampling and
the rows' `seq_lengths`, which its padding-free collator turns into restarting position_ids), with
the same recipe settings: AdamW, cosine_with_min_lr, warmup, grad clip 0.2, activation checkpointing,
batch 1, grad accumulation 2, fp32. Each runs in its own process; over the steps after the first two we
report real (non-padding) tokens per wall-clock second and per CPU-second of the process (the second
barely moves when other jobs share the machine; the first does), the peak RSS of the training process,
and the losses, which should agree closely since data, model and optimizer are the same.

    pip install trl "torch==2.13.0"     # the bench extra; pinning torch keeps the CPU build
    python scripts/bench_train.py                      # builds sample shards at seq-len 1024, 20 steps
    python scripts/bench_train.py --repeats 3 --steps 30

Not part of the test suite.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = 2  # warm-up steps left out of tokens/s (allocator, first-touch of the memory map)


def build_shards(out: Path, seq_len: int) -> None:
    subprocess.run([sys.executable, "-m", "prep.cli", "build", "--mix", "nemotron=0.5,ot3=0.5", "--sample",
                    "--out", str(out), "--seq-len", str(seq_len), "--max-tokens", str(300 * seq_len), "--overwrite"],
                   check=True, cwd=ROOT, capture_output=True)


def run_worker(name: str, args, shards: Path, work: Path) -> dict:
    out = work / f"{name}-{time.time_ns()}.json"
    subprocess.run([sys.executable, __file__, "--worker", name, "--shards", str(shards), "--steps", str(args.steps),
                    "--lr", str(args.lr), "--grad-accum", str(args.grad_accum), "--result", str(out)],
                   check=True, cwd=ROOT, capture_output=True)
    return json.loads(out.read_text())


def summary(step_tokens: list[int], wall: list[float], cpu: list[float], losses: list[float]) -> dict:
    tokens = sum(step_tokens[SKIP:])
    return {"tokens_per_s": tokens / sum(wall[SKIP:]), "tokens_per_cpu_s": tokens / sum(cpu[SKIP:]),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "losses": losses}


def ours_worker(args) -> None:
    """In its own process: `python -m train`, with the wall and CPU time of each step recorded."""
    import train.__main__ as story

    marks = []  # the loop reads perf_counter at the start and at the end of each logged step

    class Clock:
        @staticmethod
        def perf_counter():
            marks.append((time.perf_counter(), time.process_time()))
            return marks[-1][0]

    story.time = Clock  # the trainer's `time` module, as far as the loop is concerned
    output = Path(args.result).with_suffix("")
    assert story.main(["--shards", args.shards, "--model-config", "tiny", "--max-steps", str(args.steps),
                       "--lr", str(args.lr), "--grad-accum", str(args.grad_accum), "--save-every", "0",
                       "--output", str(output)]) == 0
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    starts, ends = marks[0::2], marks[1::2]
    result = summary([r["tokens"] for r in rows], [e[0] - s[0] for s, e in zip(starts, ends)],
                     [e[1] - s[1] for s, e in zip(starts, ends)], [r["loss"] for r in rows])
    Path(args.result).write_text(json.dumps(result))


def trl_worker(args) -> None:
    """In its own process: SFTTrainer on our rows, in our order, with the same per-step clocks."""
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from prep.tokenizer import load_hf_tokenizer
    from train.config import TrainConfig
    from train.data import Loader, PackedShards
    from transformers import AutoModelForCausalLM

    from train.model import model_config

    cfg = TrainConfig(shards=args.shards, model_config="tiny", lr=args.lr, grad_accum=args.grad_accum,
                      activation_checkpointing=False)  # SFTConfig switches it on, the Trainer's way
    shards = PackedShards(args.shards)
    loader = Loader(shards, 1, args.grad_accum, 0, 1, cfg.seed)
    order = [i for step in range(args.steps) for micro in loader.rows_of_step(step) for i in micro]
    rows = [shards[i] for i in order]
    dataset = Dataset.from_dict({
        "input_ids": [r.input_ids[: int(r.doc_lens.sum())].astype(np.int64).tolist() for r in rows],
        "seq_lengths": [r.doc_lens.astype(np.int64).tolist() for r in rows],
    })
    step_tokens = [sum(int(r.doc_lens.sum()) for r in rows[s * args.grad_accum:(s + 1) * args.grad_accum])
                   for s in range(args.steps)]
    torch.manual_seed(cfg.seed)  # the seeded init of train.model.full_weights: the same weights as ours
    model = AutoModelForCausalLM.from_config(model_config(cfg), attn_implementation="sdpa", dtype=torch.float32)
    tokenizer = load_hf_tokenizer(shards.manifest["tokenizer"]["name"])

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends, self.losses = [], []

        def on_train_begin(self, *a, **k):
            self.ends.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, *a, **k):
            self.ends.append((time.perf_counter(), time.process_time()))

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    clock = Clock()
    config = SFTConfig(
        output_dir=str(Path(args.result).with_suffix("")), max_steps=args.steps, per_device_train_batch_size=1,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": cfg.min_lr_ratio}, warmup_steps=cfg.warmup_ratio,  # transformers 5: a float < 1 is a ratio
       
        max_grad_norm=cfg.grad_clip, weight_decay=cfg.weight_decay, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, padding_free=True, max_length=None,
        dataset_kwargs={"skip_prepare_dataset": True}, train_sampling_strategy="sequential", use_cpu=True,
        bf16=False, logging_steps=1, save_strategy="no", report_to="none", seed=cfg.seed, dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    steps = list(zip(clock.ends, clock.ends[1:]))
    result = summary(step_tokens, [b[0] - a[0] for a, b in steps], [b[1] - a[1] for a, b in steps], clock.losses)
    Path(args.result).write_text(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="shards to train on (default: build the sample at --seq-len into a temp dir)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="runs of each, median reported")
    p.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        return {"ours": ours_worker, "trl": trl_worker}[args.worker](args)

    import torch
    import transformers
    import trl

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = Path(args.shards) if args.shards else work / "shards"
        if not args.shards:
            build_shards(shards, args.seq_len)
        manifest = json.loads((shards / "manifest.json").read_text())
        print(f"machine: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; "
              f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
        print(f"data: {manifest['counts']['sequences']} sequences x {manifest['seq_len']} tokens; tiny SmolLM3, "
              f"{args.steps} steps x {args.grad_accum} sequences, fp32, activation checkpointing; {args.repeats} repeat(s)")
        results = {"ours": [], "trl": []}
        for _ in range(args.repeats):  # interleaved, so a busy moment of the machine hits both
            results["ours"].append(run_worker("ours", args, shards, work))
            results["trl"].append(run_worker("trl", args, shards, work))
    keys = ("tokens_per_s", "tokens_per_cpu_s", "peak_rss_gb")
    med = {name: {k: statistics.median(r[k] for r in runs) for k in keys} for name, runs in results.items()}
    print(f"{'':6} {'tokens/s':>9} {'tokens/CPU-s':>13} {'peak RSS':>9}  {'loss, first -> last':>20}  tokens/s of each run")
    for name, m in med.items():
        losses = results[name][0]["losses"]
        each = ", ".join(f"{r['tokens_per_s']:,.0f}" for r in results[name])
        print(f"{name:6} {m['tokens_per_s']:>9,.0f} {m['tokens_per_cpu_s']:>13,.0f} {m['peak_rss_gb']:>6.2f} GB"
              f"  {losses[0]:>9.4f} -> {losses[-1]:.4f}  {each}")
    ratio = {k: med["ours"][k] / med["trl"][k] for k in keys}
    gap = max(abs(a - b) for a, b in zip(results["ours"][0]["losses"], results["trl"][0]["losses"]))
    print(f"ours / TRL: {ratio['tokens_per_s']:.2f}x tokens/s, {ratio['tokens_per_cpu_s']:.2f}x tokens per CPU-second "
          f"(goal >= 1.2x), {ratio['peak_rss_gb']:.2f}x peak RSS (goal <= 1.0x); "
          f"largest per-step loss difference {gap:.1e}")

if __name__ == "__main__":
    main()
