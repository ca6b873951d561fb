"""Chaos test for `prep build`: SIGKILL it at random moments, rerun, and compare with an uninterrupted build.

    .venv/bin/python scripts/chaos_prep.py              # 20 kills, about 3 minutes on 2 cores
    .venv/bin/python scripts/chaos_prep.py --kills 5

A reference build of the embedded sample runs once, uninterrupted. Then, for each kill, a fresh
output directory is built by a `prep build` that is killed with SIGKILL after a random delay
(anywhere from start-up to the manifest), sometimes killed again while resuming, and finally rerun
with the same arguments to completion. Every file in the directory must equal the reference byte
for byte, and no temp or state file may be left. Small shards (4 sequences of 4096 tokens) make
shard boundaries, and so resume points, frequent. Prints `N kills, N identical` and the phase each
kill hit (judged from the files present at the moment of the kill).
"""

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["build", "--mix", "nemotron=0.5,ot3=0.5", "--sample", "--seq-len", "4096", "--rows-per-shard", "4",
        "--window", "8", "--no-progress"]


def prep(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prep.cli", *ARGS, "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def phase(out: Path) -> str:
    names = {p.name for p in out.iterdir()} if out.exists() else set()
    if "manifest.json.tmp" in names or "manifest.json" in names:
        return "writing manifest"
    if any(n.endswith(".arrow.tmp") for n in names):
        return "writing a shard"
    if any(n.startswith(".prep-state") and n.endswith(".tmp") for n in names):
        return "saving state"
    if ".prep-state.json" in names:
        return "reading/tokenizing/packing"
    return "start-up"


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def chaos(num_kills: int, seed: int = 0, log=print) -> tuple[int, int, Counter]:
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="chaos-prep-"))
    start = time.perf_counter()
    reference = prep(work / "reference")
    assert reference.wait() == 0, reference.stderr.read().decode()
    duration = time.perf_counter() - start
    want = files(work / "reference")
    log(f"reference build: {duration:.1f} s, {len(want)} files")

    kills, identical, phases = 0, 0, Counter()
    run = 0
    while kills < num_kills:
        out = work / f"run-{run}"
        run += 1
        landed = 0
        for attempt in range(rng.choice([1, 1, 2])):  # sometimes kill the resumed run too
            proc = prep(out)
            time.sleep(rng.uniform(0.05, duration))
            if proc.poll() is None:
                where = phase(out)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                landed += 1
                phases[where] += 1
            else:
                proc.wait()
        if not landed:
            continue  # the build finished before the kill: not a kill, try again
        final = prep(out)
        err = final.stderr.read().decode()
        ok = final.wait() == 0 and files(out) == want
        kills += landed
        identical += landed if ok else 0
        log(f"run {run}: {landed} kill(s), {'identical' if ok else 'DIFFERENT'}"
            + ("" if ok else f"\n{err}"))
    return kills, identical, phases


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    kills, identical, phases = chaos(args.kills, args.seed)
    print("kills by phase: " + ", ".join(f"{k} {v}" for k, v in phases.most_common()))
    print(f"{kills} kills, {identical} identical")
    sys.exit(0 if kills == identical else 1)


if __name__ == "__main__":
    main()
