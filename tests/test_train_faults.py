"""The trainer under the faults a cluster throws: preemption (SIGTERM, SIGUSR1), a full disk (a real
tmpfs with a ballast file), a dead rank, damaged checkpoints. Every run that survives must end with
the same per-step losses and the same exported weights as the uninterrupted references."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ENV, RUN, TORCHRUN, ballast, metrics, tmpfs, train_cli
from train.__main__ import main

KEYS = ("step", "loss", "loss_per_source", "lr", "grad_norm", "tokens")
WEIGHTS = "model.safetensors"
BOUND_S = 60  # from the signal (or the death of a rank) to the exit of every process, on this CPU


def same_run(output: Path, reference: Path) -> None:
    assert [{k: r[k] for k in KEYS} for r in metrics(output)] == [{k: r[k] for k in KEYS} for r in metrics(reference)]
    assert (output / "model" / WEIGHTS).read_bytes() == (reference / "model" / WEIGHTS).read_bytes()


def wait_for_step(output: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(metrics(output)) >= step:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"the run ended or hung before step {step}: {proc.poll()}")


def test_sigusr1_finishes_the_step_saves_exits_75_and_resumes_identically(shards, single_run, tmp_path):
    output = tmp_path / "run"
    args = ["--shards", str(shards), *RUN, "--max-steps", "8", "--save-every", "0", "--output", str(output)]
    proc = subprocess.Popen([sys.executable, "-m", "train", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_step(output, 3, proc)
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=BOUND_S)
    assert proc.returncode == 75, stderr[-2000:]
    stopped = metrics(output)[-1]["step"]
    assert 3 <= stopped < 8 and f"stopped after step {stopped} (SIGUSR1); continue with --resume" in stdout
    assert [p.name for p in (output / "checkpoints").iterdir()] == [f"step-{stopped:08d}"]  # --save-every 0: only this one
    assert "Traceback" not in stderr
    train_cli(args + ["--resume"])
    same_run(output, single_run)


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(TORCHRUN + args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_ranks_survive_sigkill_then_sigterm_then_a_dead_rank_and_end_identical(shards, fsdp_run, tmp_path):
    """One FSDP run over gloo, hit three times: SIGKILL of torchrun and both ranks; SIGTERM to torchrun
    (forwarded: both ranks agree on a step, save it, exit 75); SIGKILL of rank 1 alone (torchrun and
    rank 0 end within the bound). Each time `--resume` continues, and the end equals the reference."""
    output = tmp_path / "run"
    args = ["--shards", str(shards), *RUN, "--max-steps", "8", "--save-every", "2", "--dist", "fsdp",
            "--output", str(output)]

    proc = start(args)  # 1. SIGKILL everything once the first checkpoint is written
    wait_for_step(output, 2, proc)
    ranks = psutil.Process(proc.pid).children(recursive=True)  # own sessions: a group kill would miss them
    for process in [*ranks, psutil.Process(proc.pid)]:
        process.send_signal(signal.SIGKILL)
    proc.communicate()
    psutil.wait_procs(ranks, timeout=10)

    proc = start(args + ["--resume"])  # 2. preemption
    wait_for_step(output, 3, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=BOUND_S)
    stopped = metrics(output)[-1]["step"]
    assert f"stopped after step {stopped} (SIGTERM); continue with --resume" in stdout, stdout[-2000:] + stderr[-2000:]
    assert (output / "checkpoints" / f"step-{stopped:08d}").is_dir() and stopped < 8

    proc = start(args + ["--resume"])  # 3. a dead rank
    wait_for_step(output, stopped + 1, proc)
    rank1 = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    assert len(rank1) == 1
    rank1[0].send_signal(signal.SIGKILL)
    killed = time.time()
    stdout, stderr = proc.communicate(timeout=BOUND_S)
    assert time.time() - killed < BOUND_S and proc.returncode != 0
    assert "error: rank 0: a collective failed, another rank stopped" in stderr, stderr[-3000:]
    assert not (output / "model").exists()

    train_cli(args + ["--resume"], nproc=2)
    same_run(output, fsdp_run)


def test_a_full_disk_during_a_checkpoint_fails_in_one_line_and_resumes_identically(shards, single_run, tmp_path,
                                                                                    capsys):
    args = ["--shards", str(shards), *RUN, "--max-steps", "8", "--save-every", "3"]
    with tmpfs(tmp_path / "disk", 320) as disk:
        output = disk / "run"
        # a checkpoint of the tiny model is 135 MB: the first fits, the second (step 6) does not
        space = ballast(disk, 200_000_000)
        assert main(args + ["--output", str(output)]) == 74
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: could not write checkpoint step-00000006") and "no space left" in err[-1]
        assert "needs about 0.13 GB" in err[-1] and "Traceback" not in "\n".join(err)
        assert [p.name for p in (output / "checkpoints").iterdir()] == ["step-00000003"]  # the .tmp is gone
        assert main(["--verify-checkpoints", str(output)]) == 0
        space.unlink()
        assert main(args + ["--output", str(output), "--resume"]) == 0
        same_run(output, single_run)


def test_a_full_disk_while_logging_fails_in_one_line_and_a_rerun_is_identical(shards, single_run, tmp_path, capsys,
                                                                              monkeypatch):
    import train.__main__ as trainer

    args = ["--shards", str(shards), *RUN, "--max-steps", "8", "--save-every", "0"]
    write_settings = trainer.write_settings

    def then_fill_the_disk(output, settings, step):  # settings.json fits, the first metrics line does not
        write_settings(output, settings, step)
        ballast(Path(output).parent, 0)

    with tmpfs(tmp_path / "disk", 64) as disk:  # the export takes 17 MB
        output = disk / "run"
        monkeypatch.setattr(trainer, "write_settings", then_fill_the_disk)
        assert main(args + ["--output", str(output)]) == 74
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == (f"error: could not write metrics.jsonl to {output / 'metrics.jsonl'}: no space left on "
                           "device (0.00 MB free); make room, then rerun with --resume")
        monkeypatch.undo()
        (disk / "ballast").unlink()
        assert main(args + ["--output", str(output), "--resume"]) == 0
        same_run(output, single_run)


@pytest.fixture(scope="module")
def saved_run(shards, tmp_path_factory) -> Path:
    """Stopped after step 4, with checkpoints at steps 2 and 4."""
    output = tmp_path_factory.mktemp("saved") / "run"
    assert main(["--shards", str(shards), *RUN, "--max-steps", "8", "--save-every", "2", "--stop-after", "4",
                 "--output", str(output)]) == 0
    return output


def copy_run(run: Path, to: Path) -> Path:
    subprocess.run(["cp", "-a", str(run), str(to)], check=True)
    return to


def flip_byte(path: Path, offset: int = 1000) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))


def test_a_truncated_checkpoint_is_caught_and_resume_falls_back_to_the_one_before(shards, single_run, saved_run,
                                                                                  tmp_path, capsys):
    output = copy_run(saved_run, tmp_path / "run")
    newest = output / "checkpoints" / "step-00000004"
    tensors = sorted(newest.glob("*.distcp"))[0]
    os.truncate(tensors, tensors.stat().st_size // 2)  # a node failure after the rename
    assert main(["--verify-checkpoints", str(output)]) == 1
    report = capsys.readouterr().out
    assert f"{newest}: damaged: {tensors.name} is {tensors.stat().st_size:,} bytes, its record says" in report
    assert "--resume would continue from step-00000002" in report
    assert main(["--shards", str(shards), *RUN, "--max-steps", "8", "--save-every", "2", "--output", str(output),
                 "--resume"]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warning) == 1 and "is damaged" in warning[0] and "trying step-00000002" in warning[0]
    same_run(output, single_run)


@pytest.mark.parametrize("damage", ["flipped byte", "cut train_state.json", "missing rng file"])
def test_every_kind_of_damage_is_caught_and_none_intact_is_refused(shards, saved_run, tmp_path, capsys, damage):
    output = copy_run(saved_run, tmp_path / "run")
    for checkpoint in (output / "checkpoints").iterdir():
        if damage == "flipped byte":  # same size: only the hash can tell
            flip_byte(sorted(checkpoint.glob("*.distcp"))[0])
        elif damage == "cut train_state.json":
            state = checkpoint / "train_state.json"
            state.write_bytes(state.read_bytes()[:100])
        else:
            (checkpoint / "rng-00000.pt").unlink()
    assert main(["--verify-checkpoints", str(output)]) == 1
    report = capsys.readouterr().out.splitlines()
    assert sum(": damaged: " in line for line in report) == 2 and "--resume would refuse" in report[-1]
    assert main(["--shards", str(shards), *RUN, "--max-steps", "8", "--output", str(output), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no intact checkpoint in") and "--overwrite" in err[-1]


def test_a_failed_write_says_what_where_why_and_the_space(tmp_path):
    from train.faults import write_error

    # torch reports a full disk as a short write: more needed than free is a full disk whatever the error says
    line = str(write_error("checkpoint step-00000006", tmp_path, RuntimeError("unexpected pos 704 vs 598"),
                           needed=135_000_000, free=40_000_000))
    assert line == (f"could not write checkpoint step-00000006 to {tmp_path}: no space left on device "
                    "(it needs about 0.14 GB, 0.04 GB free); make room, then rerun with --resume")
    line = str(write_error("the exported model", tmp_path, PermissionError(13, "Permission denied"), free=10**12))
    assert ": [Errno 13] Permission denied (1000.00 GB free)" in line
    line = str(write_error("checkpoint step-00000002", tmp_path, None, needed=1_000_000, free=10**12))
    assert ": the write failed on another rank (its error is above)" in line
