"""train/plot.py: `python -m train.plot RUN_DIR` on a metrics.jsonl of log_step's records, live (a last line
cut in half) and finished; the picture is a real image; the --json summary equals an independent count."""

import json
import random
import subprocess
import sys

import matplotlib.image
import pytest

from train.plot import epoch_starts, main, smooth


def records(num_steps: int, steps_per_epoch: int, on_gpu: bool) -> list[dict]:
    """What log_step appends, for a made-up run: loss falling with noise, a source missing on some steps."""
    rng, out = random.Random(0), []
    for step in range(1, num_steps + 1):
        per_source = {"nemotron": 11 - 6 * step / num_steps + rng.random(), "ot3": 10 - 5 * step / num_steps + rng.random()}
        if step % 7 == 0:
            per_source["ot3"] = None
        out.append({
            "step": step, "epoch": (step - 1) // steps_per_epoch, "loss": min(v for v in per_source.values() if v),
            "loss_per_source": per_source, "lr": 3e-3 * min(1, step / 4), "grad_norm": 1 + rng.random(),
            "tokens": 4000 + rng.randrange(96), "tokens_per_s": 900 + 50 * rng.random(),
            "mfu": 0.4 + 0.01 * rng.random() if on_gpu else None, "peak_mem_gb": 1.0, "step_s": 4.5,
            "elapsed_s": 4.6 * step,
        })
    return out


def write_run(run_dir, rows: list[dict], cut_last: bool = False):
    run_dir.mkdir()
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if cut_last:  # a live run: the trainer is in the middle of appending a line
        text += json.dumps(rows[-1] | {"step": rows[-1]["step"] + 1})[:37]
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


def plot_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.plot", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("on_gpu", [False, True])
def test_the_picture_is_written_and_is_an_image(tmp_path, on_gpu):
    run = write_run(tmp_path / "run", records(40, 20, on_gpu), cut_last=True)
    assert main([str(run), "-o", str(tmp_path / "out" / "curves.png")]) == 0
    height, width, _ = matplotlib.image.imread(tmp_path / "out" / "curves.png").shape
    assert height > 400 and width > 700
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["curves.png"]  # no temp file left
    assert main([str(run)]) == 0 and (run / "curves.png").stat().st_size > 0  # default: RUN_DIR/curves.png


def test_json_summary_of_a_live_run_equals_an_independent_count(tmp_path):
    rows = records(25, 10, on_gpu=False)
    run = write_run(tmp_path / "run", rows, cut_last=True)
    out = plot_cli(run, "--json")
    assert out.returncode == 0, out.stderr
    assert not (run / "curves.png").exists()  # --json alone draws nothing
    complete = [json.loads(line) for line in (run / "metrics.jsonl").read_text().split("\n")[:-1]]
    assert len(complete) == 25
    losses = [r["loss"] for r in complete]
    assert json.loads(out.stdout) == {
        "run": str(run), "step": 25, "epoch": 2, "last_loss": losses[-1], "best_loss": min(losses),
        "best_step": losses.index(min(losses)) + 1, "tokens_seen": sum(r["tokens"] for r in complete),
        "elapsed_s": complete[-1]["elapsed_s"],
    }


def test_tokens_seen_counts_the_steps_between_logged_lines(tmp_path):
    rows = records(12, 100, on_gpu=False)[2::3]  # --log-every 3: steps 3, 6, 9, 12
    run = write_run(tmp_path / "run", rows)
    out = plot_cli(run, "--json", "-o", tmp_path / "c.svg")
    assert out.returncode == 0 and (tmp_path / "c.svg").read_text().startswith("<?xml")
    assert json.loads(out.stdout)["tokens_seen"] == 3 * sum(r["tokens"] for r in rows)


def test_epoch_starts_and_smoothing(tmp_path):
    rows = records(45, 20, on_gpu=False)
    assert epoch_starts(rows) == [(21, 1), (41, 2)]
    assert smooth([5.0] * 30) == pytest.approx([5.0] * 30)  # debiased: no ramp up from 0 at the start
    noisy = [r["grad_norm"] for r in rows]
    assert max(smooth(noisy)) - min(smooth(noisy)) < max(noisy) - min(noisy)


def test_errors_are_one_line(tmp_path):
    out = plot_cli(tmp_path)
    assert out.returncode == 2 and out.stderr.strip() == \
        f"error: {tmp_path} has no metrics.jsonl: pass the --output directory of a training run"
    rows = records(5, 10, on_gpu=False)
    run = write_run(tmp_path / "bad", rows)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:20]  # not the last line: a damaged file, not a live one
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    out = plot_cli(run)
    assert out.returncode == 2 and out.stderr.strip() == f"error: {run}/metrics.jsonl: line 3 is not JSON"
