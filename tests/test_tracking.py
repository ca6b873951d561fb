"""train/tracking.py: --report-to through accelerate's trackers, read back with each backend's own reader
(TensorBoard's EventAccumulator, wandb's protobuf records, trackio's SQLite file) and compared with
metrics.jsonl; a resumed run continues the same tracker run; the step lines' elapsed time and ETA."""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train.__main__ import main
from train.config import parse_args
from train.tracking import Clock, backends, read_metrics

RUN = ["--model-config", "tiny", "--lr", "3e-3", "--warmup-ratio", "0.1"]


def run_cli(args: list[str], env: dict) -> None:
    out = subprocess.run([sys.executable, "-m", "train", *args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.fixture(scope="module")
def tensorboard_run(shards, tmp_path_factory):
    """4 steps with a checkpoint every 2 and a stop after step 3; the checkpoint of step 3 is then deleted, as
    if the process had been killed after logging step 3 but before saving it, so the resume from step 2
    logs step 3 a second time. Returns (output, the printed lines of both processes)."""
    output = tmp_path_factory.mktemp("tb") / "run"
    args = ["--shards", str(shards), *RUN, "--max-steps", "4", "--save-every", "2", "--output", str(output),
            "--report-to", "tensorboard"]
    os.environ["HF_HUB_OFFLINE"] = "1"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(args + ["--stop-after", "3"]) == 0
        shutil.rmtree(output / "checkpoints" / "step-00000003")
        assert main(args + ["--resume"]) == 0
    return output, printed.getvalue()


def test_tensorboard_holds_every_logged_number_once_per_step_across_a_resume(tensorboard_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output, _ = tensorboard_run
    rows = read_metrics(output)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()

    def scalars(tag):
        return {e.step: e.value for e in events.Scalars(tag)}

    # purge_step dropped the stopped process's step 3: each step has exactly one point
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert scalars("train/loss") == {r["step"]: pytest.approx(r["loss"], rel=1e-6) for r in rows}
    assert scalars("train/learning_rate") == {r["step"]: pytest.approx(r["lr"], rel=1e-6) for r in rows}
    assert scalars("train/grad_norm") == {r["step"]: pytest.approx(r["grad_norm"], rel=1e-6) for r in rows}
    for source in ("nemotron", "ot3"):
        logged = {r["step"]: pytest.approx(r["loss_per_source"][source], rel=1e-6)
                  for r in rows if r["loss_per_source"][source] is not None}
        assert logged and scalars(f"train/loss_per_source/{source}") == logged
    # the resolved settings went in as the run's config, at each start
    configs = [yaml.safe_load(p.read_text()) for p in (output / "tensorboard").glob("*/hparams.yml")]
    assert sorted(config["resume"] for config in configs) == [False, True]
    for config in configs:
        assert config["lr"] == 3e-3 and config["report_to"] == "tensorboard" and config["world_size"] == 1
        assert config["dist"] == "none" and config["total_steps"] == 4


def test_step_lines_show_elapsed_time_and_an_eta_and_the_clock_goes_on_across_a_resume(tensorboard_run):
    output, printed = tensorboard_run
    lines = [line for line in printed.splitlines() if line.startswith("step ")]
    assert len(lines) == 5  # 1-3, then 3 and 4 after the resume
    for line in lines:
        assert re.search(r"\| \d+:\d\d:\d\d elapsed, eta \d+:\d\d:\d\d$", line), line
    assert lines[-1].startswith("step 4/4") and lines[-1].endswith("eta 0:00:00")
    elapsed = [r["elapsed_s"] for r in read_metrics(output)]
    assert all(a < b for a, b in zip(elapsed, elapsed[1:])), elapsed  # no restart from 0 at the resume


def test_clock_eta_is_this_process_pace_times_the_steps_left():
    clock = Clock(start_step=10, earlier_s=100.0)
    clock.started -= 20.0  # 20 s ago, at step 10
    assert clock.elapsed() == pytest.approx(120.0, abs=0.5)
    assert clock.eta(step=20, total_steps=30) == pytest.approx(20.0, abs=0.5)  # 2 s a step, 10 steps left


def test_clock_goes_on_from_the_last_logged_line_at_a_resume(tmp_path):
    assert Clock.resumed(str(tmp_path), 5).earlier_s == 0.0  # --log-every 10, checkpoint at 5: no line yet
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 4, "elapsed_s": 12.5}) + "\n")
    assert Clock.resumed(str(tmp_path), 4).earlier_s == 12.5
    assert Clock.resumed(str(tmp_path), 0).earlier_s == 0.0  # a run that starts over


def read_wandb(path: Path):
    """The records of a .wandb file: LevelDB's log format (32 KiB blocks of chunks with a 7-byte header:
    crc, length, type) after wandb's 7-byte file header, each record one of wandb's protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, chunk = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        chunk += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


@pytest.mark.slow
def test_wandb_offline_and_trackio_write_local_runs_and_a_resume_continues_trackios(shards, tmp_path):
    """In fresh processes: trackio reads TRACKIO_DIR when it is imported, and wandb's run ends at exit."""
    import sqlite3

    output = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(tmp_path / "trackio"),
           "TRACKIO_PROJECT": "test-project"}
    args = ["--shards", str(shards), *RUN, "--max-steps", "4", "--save-every", "0", "--output", str(output),
            "--report-to", "wandb,trackio"]
    run_cli(args + ["--stop-after", "2"], env)
    ids = json.loads((output / "trackers.json").read_text())
    run_cli(args + ["--resume"], env)
    assert json.loads((output / "trackers.json").read_text()) == ids
    rows = read_metrics(output)

    # wandb offline can't resume: two local runs under --output with the one id, which `wandb sync` joins
    runs = sorted((output / "wandb").glob(f"offline-run-*-{ids['wandb']}*/run-{ids['wandb']}.wandb"))
    assert len(runs) == 2
    history, config = {}, {}
    for run in runs:
        for record in read_wandb(run):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                history[record.history.step.num] = items
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    assert sorted(history) == [1, 2, 3, 4]
    for r in rows:
        assert history[r["step"]]["train/loss"] == pytest.approx(r["loss"], rel=1e-12)
        assert history[r["step"]]["train/learning_rate"] == pytest.approx(r["lr"], rel=1e-12)
    assert config["lr"] == 3e-3 and config["report_to"] == "wandb,trackio"

    # trackio: one run in its local SQLite file, steps 1-2 from the first process and 3-4 from the resume
    db = sqlite3.connect(tmp_path / "trackio" / "test-project.db")
    logged = db.execute("SELECT run_name, step, metrics FROM metrics ORDER BY step").fetchall()
    assert {name for name, _, _ in logged} == {ids["trackio"]}
    assert [step for _, step, _ in logged] == [1, 2, 3, 4]
    for (_, _, metrics), r in zip(logged, rows):
        assert json.loads(metrics)["train/loss"] == pytest.approx(r["loss"], rel=1e-12)
    (config,) = db.execute("SELECT config FROM configs WHERE run_name = ?", (ids["trackio"],)).fetchone()
    assert json.loads(config)["lr"] == 3e-3


@pytest.mark.parametrize("report_to, blocked, message", [
    ("wandb", ["wandb"], "error: --report-to wandb: not installed; pip install wandb"),
    ("tensorboard,trackio", ["trackio"], "error: --report-to trackio: not installed; pip install trackio"),
    ("all", ["tensorboard", "tensorboardX", "wandb", "trackio", "mlflow"], "pip install 'midtrain[track]'"),
    ("tensorbord", [], "error: --report-to: tensorbord is not one of none, all, tensorboard, wandb, trackio, mlflow"),
])
def test_a_missing_or_unknown_backend_is_one_line_before_any_work(shards, tmp_path, capsys, monkeypatch,
                                                                    report_to, blocked, message):
    for module in blocked:  # None in sys.modules: Python's import system treats the package as absent
        monkeypatch.setitem(sys.modules, module, None)
    output = tmp_path / "run"
    assert main(["--shards", str(shards), *RUN, "--output", str(output), "--report-to", report_to]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not output.exists()  # refused before the output directory, the shards or the model


def test_report_to_names_and_the_recipe_key(tmp_path, monkeypatch):
    assert backends("none") == [] and backends("") == []
    assert backends("wandb, tensorboard,wandb") == ["wandb", "tensorboard"]
    monkeypatch.setitem(sys.modules, "mlflow", None)
    assert backends("all") == ["tensorboard", "wandb", "trackio"]  # the test extra's, in that order
    recipe = tmp_path / "mid.yaml"
    recipe.write_text("report_to:\n- wandb\n- tensorboard\n")
    assert parse_args(["--shards", "s", "--recipe", str(recipe)]).report_to == "wandb,tensorboard"
    assert parse_args(["--shards", "s", "--recipe", str(recipe), "--report-to", "none"]).report_to == "none"
