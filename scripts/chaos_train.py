"""Chaos tests for the trainer: the faults a cluster throws, at random moments, each followed by
`--resume` and compared with an uninterrupted run.

    .venv/bin/python scripts/chaos_train.py --fault kill --trials 10       # SIGKILL torchrun and both ranks
    .venv/bin/python scripts/chaos_train.py --fault term --trials 10       # SIGTERM to torchrun (preemption)
    .venv/bin/python scripts/chaos_train.py --fault dead-rank --trials 5   # SIGKILL rank 1 only
    .venv/bin/python scripts/chaos_train.py --fault enospc --trials 5      # a full disk at a checkpoint (tmpfs, root)
    .venv/bin/python scripts/chaos_train.py --fault damage --trials 20     # truncate, flip, delete a checkpoint file

A reference run (`torchrun --nproc-per-node 2 -m train`, tiny SmolLM3, FSDP2 over gloo, 16 steps, a
checkpoint every 2) goes uninterrupted. Each trial then runs the same command into a fresh output,
hits it with the fault after a random delay (start-up, a step, or a checkpoint write), and resumes it
with `--resume` to the end: the per-step losses in metrics.jsonl and the exported weights must equal
the reference's exactly. `term` and `dead-rank` also time the exit of every process from the fault.
`enospc` runs on a tmpfs whose ballast leaves room for a random number of checkpoints and a random
part of the next one, then removes the ballast. `damage` damages a random file of a random
checkpoint of a finished run: `--verify-checkpoints` must catch it, and when it hit the newest
checkpoint, `--resume` must fall back and still end identical. Prints one summary line:
fault, trials, survived identical, time to exit.
"""

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
STEPS = 16
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_shards(work: Path) -> Path:
    out = work / "shards"
    subprocess.run([sys.executable, "-m", "prep.cli", "build", "--mix", "nemotron=0.5,ot3=0.5", "--sample",
                    "--seq-len", "256", "--max-tokens", "60000", "--rows-per-shard", "16", "--no-progress",
                    "--out", str(out)], cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
    return out


def train(shards: Path, output: Path, resume: bool, keep_last: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "train", "--shards", str(shards), "--model-config", "tiny", "--max-steps", str(STEPS),
           "--save-every", "2", "--keep-last", str(keep_last), "--lr", "3e-3", "--output", str(output)]
    if resume:
        cmd.append("--resume")
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_tree(pid: int) -> None:
    """SIGKILL torchrun and every rank at once, as a preempted node loses them. torchrun starts its
    workers in their own sessions, so killing its process group would leave the ranks running."""
    parent = psutil.Process(pid)
    for proc in [*parent.children(recursive=True), parent]:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def rank_process(pid: int, rank: int) -> psutil.Process | None:
    for proc in psutil.Process(pid).children(recursive=True):
        try:
            if proc.environ().get("RANK") == str(rank):
                return proc
        except psutil.NoSuchProcess:
            pass
    return None


def wait_all(proc: subprocess.Popen, timeout: float = 300) -> float:
    """Wait for torchrun and every rank it started; returns the seconds it took."""
    started = time.perf_counter()
    try:
        ranks = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        ranks = []
    proc.communicate(timeout=timeout)
    psutil.wait_procs(ranks, timeout=max(1.0, timeout - (time.perf_counter() - started)))
    return time.perf_counter() - started


def outcome(output: Path) -> tuple[list, bytes]:
    losses = [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines())]
    weights = b"".join(p.read_bytes() for p in sorted((output / "model").glob("*.safetensors")))
    return losses, weights


def resume_identical(shards: Path, output: Path, want, keep_last: int = 2) -> tuple[bool, str]:
    final = train(shards, output, resume=True, keep_last=keep_last)
    _, err = final.communicate(timeout=600)
    return final.returncode == 0 and outcome(output) == want, err


def trial_kill(rng, shards, output, want, duration, log) -> tuple[bool, float | None]:
    landed = 0
    for attempt in range(rng.choice([1, 1, 2])):
        proc = train(shards, output, resume=attempt > 0)
        time.sleep(rng.uniform(0.3, 1.0) * duration)
        if proc.poll() is None:
            kill_tree(proc.pid)
            landed += 1
        wait_all(proc)
    if not landed:
        return None, None
    ok, _ = resume_identical(shards, output, want)
    return ok, None


def trial_term(rng, shards, output, want, duration, log) -> tuple[bool, float | None]:
    proc = train(shards, output, resume=False)
    time.sleep(rng.uniform(0.2, 0.9) * duration)
    if proc.poll() is not None:
        return None, None
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    seconds = wait_all(proc)
    ok, err = resume_identical(shards, output, want)
    log(f"  SIGTERM: exit after {seconds:.1f} s" + ("" if ok else "\n" + err[-2000:]))
    return ok, seconds


def trial_dead_rank(rng, shards, output, want, duration, log) -> tuple[bool, float | None]:
    proc = train(shards, output, resume=False)
    time.sleep(rng.uniform(0.3, 0.9) * duration)
    victim = rank_process(proc.pid, 1)
    if proc.poll() is not None or victim is None:
        return None, None
    victim.send_signal(signal.SIGKILL)
    seconds = wait_all(proc)
    ok, err = resume_identical(shards, output, want)
    log(f"  rank 1 killed: torchrun and rank 0 gone after {seconds:.1f} s" + ("" if ok else "\n" + err[-2000:]))
    return ok, seconds


CHECKPOINT_BYTES = 135_000_000  # the tiny model's parameters and AdamW state in fp32, both ranks together


def trial_enospc(rng, shards, output, want, duration, log) -> tuple[bool, float | None]:
    disk = output.parent / (output.name + "-disk")
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200m", "tmpfs", str(disk)], check=True)
    try:
        run = disk / "run"
        room = int((rng.randint(0, 4) + rng.random()) * CHECKPOINT_BYTES)
        free = shutil.disk_usage(disk).free
        with open(disk / "ballast", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, free - room)
        proc = train(shards, run, resume=False, keep_last=0)  # every checkpoint kept: the disk fills up
        _, err = proc.communicate(timeout=600)
        lines = [line for line in err.splitlines() if line.startswith("error: could not write")]
        if proc.returncode == 0:
            log(f"  room for {room / 1e6:.0f} MB: the run fit")
            return None, None
        (disk / "ballast").unlink()
        ok, resume_err = resume_identical(shards, run, want, keep_last=0)
        log(f"  room for {room / 1e6:.0f} MB: {lines[0] if lines else 'NO ONE-LINE ERROR: ' + err[-1500:]}")
        if not ok:
            log(resume_err[-2000:])
        return ok and len(lines) == 1, None  # one line for the whole run, not one per rank
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def damage_file(rng, checkpoint: Path) -> str:
    files = sorted(p for p in checkpoint.iterdir() if p.is_file())
    target = rng.choice(files)
    size = target.stat().st_size
    kind = rng.choice(["truncate", "flip", "delete", "append"])
    if kind == "truncate":
        os.truncate(target, rng.randrange(size))
    elif kind == "flip":
        offset = rng.randrange(size)
        with open(target, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ (1 << rng.randrange(8))]))
    elif kind == "delete":
        target.unlink()
    else:
        with open(target, "ab") as f:
            f.write(b"\0")
    return f"{kind} {target.name}"


def trial_damage(rng, shards, output, want, duration, log, finished: Path) -> tuple[bool, float | None]:
    shutil.copytree(finished, output)
    checkpoints = sorted((output / "checkpoints").iterdir())
    victim = rng.choice(checkpoints)
    what = damage_file(rng, victim)
    verify = subprocess.run([sys.executable, "-m", "train", "--verify-checkpoints", str(output)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True)
    caught = f"{victim}: damaged" in verify.stdout
    ok = caught
    if victim == checkpoints[-1]:  # --resume must fall back to the one before and end identical
        shutil.rmtree(output / "model")
        resumed, err = resume_identical(shards, output, want)
        ok = caught and resumed
    log(f"  {what} in {victim.name}: {'caught' if caught else 'NOT CAUGHT'}"
        + (", resumed identical" if ok and victim == checkpoints[-1] else ""))
    return ok, None


TRIALS = {"kill": trial_kill, "term": trial_term, "dead-rank": trial_dead_rank, "enospc": trial_enospc,
          "damage": trial_damage}


def chaos(fault: str, num_trials: int, seed: int = 0, log=print) -> tuple[int, int, list[float]]:
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="chaos-train-"))
    shards = build_shards(work)
    start = time.perf_counter()
    ref = train(shards, work / "reference", resume=False)
    _, err = ref.communicate()
    assert ref.returncode == 0, err
    duration = time.perf_counter() - start
    want = outcome(work / "reference")
    log(f"reference: {STEPS} steps in {duration:.0f} s, final loss {want[0][-1][1]:.4f}")
    trial = TRIALS[fault]
    if fault == "damage":  # a finished run with its checkpoints at steps 12, 14 (keep-last 2) to damage
        trial = lambda *args: trial_damage(*args, finished=work / "reference")  # noqa: E731
    trials = survived = run = 0
    seconds = []
    while trials < num_trials:
        output = work / f"run-{run}"
        run += 1
        ok, took = trial(rng, shards, output, want, duration, log)
        if ok is None:  # the fault landed after the run had ended: not a trial
            continue
        trials += 1
        survived += ok
        if took is not None:
            seconds.append(took)
        log(f"trial {trials}: {'identical' if ok else 'FAILED'}")
        shutil.rmtree(output, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return trials, survived, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fault", choices=sorted(TRIALS), default="kill")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    trials, survived, seconds = chaos(args.fault, args.trials, args.seed)
    timing = (f"; time to exit min {min(seconds):.1f} s, median {statistics.median(seconds):.1f} s, "
              f"max {max(seconds):.1f} s" if seconds else "")
    print(f"{args.fault}: {trials} trials, {survived} survived identical{timing}")
    sys.exit(0 if trials == survived else 1)


if __name__ == "__main__":
    main()
