"""Chaos test for the trainer: SIGKILL a 2-process CPU run at random moments, resume, compare.

    .venv/bin/python scripts/chaos_train.py              # 10 kills, about 10 minutes on 2 cores
    .venv/bin/python scripts/chaos_train.py --kills 3

A reference run (`torchrun --nproc-per-node 2 -m train`, tiny SmolLM3, FSDP2 over gloo, a
checkpoint every 2 steps) goes uninterrupted. Then each chaos run is killed with SIGKILL (the
whole process group: torchrun and both ranks) after a random delay, which lands in start-up, in a
step or in a checkpoint write, is sometimes killed again while resuming, and is finally resumed
with `--resume` to the end. The per-step losses in metrics.jsonl and the exported weights must
equal the reference's exactly. Prints `N kills, N identical`.
"""

import argparse
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = 16


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


def train(shards: Path, output: Path, resume: bool) -> subprocess.Popen:
    cmd = [str(ROOT / ".venv/bin/torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "train", "--shards", str(shards), "--model-config", "tiny", "--max-steps", str(STEPS),
           "--save-every", "2", "--keep-last", "2", "--lr", "3e-3", "--output", str(output)]
    if resume:
        cmd.append("--resume")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_tree(pid: int) -> None:
    """SIGKILL torchrun and every rank at once, as a preempted node loses them. torchrun starts its
    workers in their own sessions, so killing its process group would leave the ranks running."""
    import psutil

    parent = psutil.Process(pid)
    for proc in [*parent.children(recursive=True), parent]:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def outcome(output: Path) -> tuple[list, bytes]:
    losses = [(r["step"], r["loss"]) for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines())]
    weights = b"".join(p.read_bytes() for p in sorted((output / "model").glob("*.safetensors")))
    return losses, weights


def chaos(num_kills: int, seed: int = 0, log=print) -> tuple[int, int]:
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="chaos-train-"))
    shards = build_shards(work)
    start = time.perf_counter()
    ref = train(shards, work / "reference", resume=False)
    assert ref.wait() == 0, ref.stderr.read().decode()
    duration = time.perf_counter() - start
    want = outcome(work / "reference")
    log(f"reference: {STEPS} steps in {duration:.0f} s, final loss {want[0][-1][1]:.4f}")

    kills = identical = run = 0
    while kills < num_kills:
        output = work / f"run-{run}"
        run += 1
        landed = 0
        for attempt in range(rng.choice([1, 1, 2])):
            proc = train(shards, output, resume=attempt > 0)
            time.sleep(rng.uniform(0.3, 1.0) * duration)
            if proc.poll() is None:
                kill_tree(proc.pid)
                landed += 1
            proc.wait()
        if not landed:
            continue
        final = train(shards, output, resume=True)
        err = final.stderr.read().decode()
        ok = final.wait() == 0 and outcome(output) == want
        kills += landed
        identical += landed if ok else 0
        log(f"run {run}: {landed} kill(s), {'identical' if ok else 'DIFFERENT'}" + ("" if ok else "\n" + err[-2000:]))
    return kills, identical


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    kills, identical = chaos(args.kills, args.seed)
    print(f"{kills} kills, {identical} identical (per-step losses and final weights)")
    sys.exit(0 if kills == identical else 1)


if __name__ == "__main__":
    main()
