"""`python -m train.plot RUN_DIR -o curves.png`: one picture of a training run, from its metrics.jsonl.

  python -m train.plot runs/mid -o curves.png     # loss, lr, grad norm, throughput against step
  python -m train.plot runs/mid --json            # {"last_loss": ..., "best_loss": ..., "tokens_seen": ...}

It reads only metrics.jsonl, so it works on a live run too (a last line still being written is left
out). Four panels against step: loss, total and per source, raw (faint) and smoothed; learning rate;
gradient norm; tokens/s and MFU. Dotted lines mark where each epoch starts.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

from train.tracking import hms, read_metrics


def summary(run_dir, records: list[dict]) -> dict:
    """The run in numbers: last and best loss, tokens seen, training time. Each logged step's token
    count stands for the steps since the line before it, so tokens_seen is exact with --log-every 1."""
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl has no step yet")
    best = min(records, key=lambda r: r["loss"])
    steps = [0] + [r["step"] for r in records]
    return {
        "run": str(run_dir), "step": records[-1]["step"], "epoch": records[-1]["epoch"],
        "last_loss": records[-1]["loss"], "best_loss": best["loss"], "best_step": best["step"],
        "tokens_seen": sum(r["tokens"] * (step - before) for r, before, step in zip(records, steps, steps[1:])),
        "elapsed_s": records[-1]["elapsed_s"],
    }


def epoch_starts(records: list[dict]) -> list[tuple[int, int]]:
    """(step, epoch) of the first logged step of every epoch after the first."""
    return [(r["step"], r["epoch"]) for before, r in zip(records, records[1:]) if r["epoch"] != before["epoch"]]


def smooth(values: list[float]) -> list[float]:
    """TensorBoard's debiased exponential moving average, over ~5% of the points (at least 3)."""
    weight = 1 - 1 / max(3.0, len(values) / 20)
    average, out = 0.0, []
    for count, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** count))
    return out


def plot(run_dir, png) -> Path:
    """Write the picture of the run in RUN_DIR to `png` (written whole, then renamed); returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    stats = summary(run_dir, records)
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex=True)
    fig.suptitle(f"{run_dir}: step {stats['step']}, epoch {stats['epoch']}, loss {stats['last_loss']:.3f} "
                 f"(best {stats['best_loss']:.3f} at step {stats['best_step']}), "
                 f"{stats['tokens_seen']:,} tokens in {hms(stats['elapsed_s'])}", fontsize=11)

    ax = axes[0, 0]
    sources = list(records[0]["loss_per_source"])
    curves = [("total", [r["loss"] for r in records])]
    curves += [(name, [r["loss_per_source"][name] for r in records]) for name in sources]
    for i, (name, values) in enumerate(curves):
        # a source with no target on a step has no loss there (None): its line joins the steps that have one
        points = [(step, value) for step, value in zip(steps, values) if value is not None]
        if not points:  # a small source may not have come up yet
            continue
        x, y = zip(*points)
        ax.plot(x, y, color=f"C{i}", alpha=0.25, linewidth=0.8)
        ax.plot(x, smooth(y), color=f"C{i}", linewidth=2 if name == "total" else 1.4, label=name)
    ax.set(title="Loss (faint: raw, solid: smoothed)", ylabel="cross-entropy per target token")
    ax.legend(fontsize=9)

    ax = axes[0, 1]
    ax.plot(steps, [r["lr"] for r in records], color="C0")
    ax.set(title="Learning rate", ylabel="lr")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))

    ax = axes[1, 0]
    grad_norms = [r["grad_norm"] for r in records]
    ax.plot(steps, grad_norms, color="C0", alpha=0.25, linewidth=0.8)
    ax.plot(steps, smooth(grad_norms), color="C0")
    ax.set(title="Gradient norm (before clipping)", xlabel="step", ylabel="global L2 norm")

    ax = axes[1, 1]
    ax.plot(steps, [r["tokens_per_s"] for r in records], color="C0")
    ax.set(title="Throughput", xlabel="step", ylabel="tokens/s")
    ax.set_ylim(bottom=0)
    mfu = [r["mfu"] for r in records]
    if any(m is not None for m in mfu):
        right = ax.twinx()
        right.plot(steps, [math.nan if m is None else 100 * m for m in mfu], color="C1")
        right.set_ylabel("MFU (%)", color="C1")
        right.set_ylim(bottom=0)
    else:
        ax.text(0.5, 0.08, "MFU: none (no peak FLOP/s for this device: CPU, or pass --peak-tflops)",
                transform=ax.transAxes, ha="center", fontsize=9, color="C1")

    for step, epoch in epoch_starts(records):
        for ax in axes.flat:
            ax.axvline(step, color="gray", linestyle=":", linewidth=1)
        axes[0, 0].annotate(f"epoch {epoch}", (step, 1), xycoords=("data", "axes fraction"), fontsize=8,
                            color="gray", xytext=(2, -10), textcoords="offset points")
    for ax in axes.flat:
        ax.grid(alpha=0.3)

    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp")
    fig.savefig(tmp, dpi=80, format=png.suffix.lstrip(".") or "png")
    plt.close(fig)
    os.replace(tmp, png)
    return png


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.plot", description="One picture of a training run, from its metrics.jsonl (a live run too).",
        epilog="examples:\n  python -m train.plot runs/mid -o curves.png\n  python -m train.plot runs/mid --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the --output of a training run (it holds metrics.jsonl)")
    parser.add_argument("-o", "--output", help="picture to write (.png, .svg, .pdf); default RUN_DIR/curves.png, "
                                               "none with --json")
    parser.add_argument("--json", action="store_true", help="print the summary: last and best loss, tokens seen, time")
    args = parser.parse_args(argv)
    try:
        if args.json:
            print(json.dumps(summary(args.run_dir, read_metrics(args.run_dir)), indent=2))
        if args.output or not args.json:
            path = plot(args.run_dir, args.output or Path(args.run_dir) / "curves.png")
            print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)  # stdout stays JSON
    except FileNotFoundError:
        print(f"error: {args.run_dir} has no metrics.jsonl: pass the --output directory of a training run",
              file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
