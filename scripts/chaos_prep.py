"""Chaos test for `prep build`: the faults a cluster throws, at random moments, each compared with an
uninterrupted build.

    .venv/bin/python scripts/chaos_prep.py              # 20 SIGKILLs, about 3 minutes on 2 cores
    .venv/bin/python scripts/chaos_prep.py --kills 5
    .venv/bin/python scripts/chaos_prep.py --term 10    # SIGTERM: exit 75, then resume
    .venv/bin/python scripts/chaos_prep.py --enospc 8   # a full tmpfs (needs root): exit 74, then resume
    .venv/bin/python scripts/chaos_prep.py --concurrent 10  # two builds into one --out at once

A reference build of the embedded sample runs once, uninterrupted. Then, per fault:

  kill        a fresh output directory is built by a `prep build` that is killed with SIGKILL after a
              random delay (anywhere from start-up to the manifest), sometimes killed again while
              resuming, and finally rerun with the same arguments to completion.
  term        SIGTERM (or SIGUSR1, one trial in three) at a random moment once the build runs (its
              lock record is written): it must exit 75 with one line, within the grace of
              prep/preempt.py; then the rerun completes. Prints the time from signal to exit.
  enospc      on a 16 MiB tmpfs, a ballast leaves a random amount free, so the build fills the disk
              at a shard or a resume state write; one trial in three instead fills the disk while
              the build is paused (SIGSTOP) right after its last state save, so the manifest is what
              hits it (a ballast placed earlier can't: the last state save needs more space than
              the manifest, and frees more). Each must exit 74 with one line naming the file, leave
              no temp file and a state that loads; then the ballast is removed and the rerun completes.
  concurrent  two builds started at once into one fresh --out: exactly one must run, the other be
              refused at once (exit 2) naming the first's pid and host; `prep verify` must pass.

Every file in the directory must end equal to the reference byte for byte, and no temp or state
file may be left. Small shards (4 sequences of 4096 tokens) make shard boundaries, and so resume
points, frequent. Prints one summary line per fault: trials, survived identical, time to exit.
"""

import argparse
import json
import random
import shutil
import signal
import socket
import statistics
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


def reference_build(work: Path, log) -> tuple[dict[str, bytes], float]:
    start = time.perf_counter()
    reference = prep(work / "reference")
    assert reference.wait() == 0, reference.stderr.read().decode()
    duration = time.perf_counter() - start
    want = files(work / "reference")
    log(f"reference build: {duration:.1f} s, {len(want)} files")
    return want, duration


def started(out: Path, proc: subprocess.Popen) -> bool:
    """Wait until the build holds its lock (its record is written, its signal handlers are in
    place); False when it ended first."""
    lock = out / ".prep-lock"
    while not (lock.exists() and lock.stat().st_size):
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    return True


def rerun_identical(out: Path, want: dict[str, bytes]) -> tuple[bool, str]:
    final = prep(out)
    err = final.stderr.read().decode()
    return final.wait() == 0 and files(out) == want, err


def summary(fault: str, trials: int, identical: int, exit_s: list[float] | None = None) -> str:
    line = f"{fault}: {trials} trials, {identical} survived identical"
    if exit_s:
        line += (f", signal to exit min {min(exit_s):.2f} s, median {statistics.median(exit_s):.2f} s, "
                 f"max {max(exit_s):.2f} s")
    return line


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
    want, duration = reference_build(work, log)

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
        ok, err = rerun_identical(out, want)
        kills += landed
        identical += landed if ok else 0
        log(f"run {run}: {landed} kill(s), {'identical' if ok else 'DIFFERENT'}"
            + ("" if ok else f"\n{err}"))
    shutil.rmtree(work)
    return kills, identical, phases


def terms(num_trials: int, seed: int = 0, log=print) -> tuple[int, int, list[float]]:
    """SIGTERM (or SIGUSR1) at a random moment of a running build: exit 75 with one line, then identical."""
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="chaos-prep-term-"))
    want, duration = reference_build(work, log)
    trials, identical, exit_s, run = 0, 0, [], 0
    while trials < num_trials:
        out = work / f"run-{run}"
        run += 1
        proc = prep(out)
        if not started(out, proc):
            raise SystemExit(f"the build ended before it started: {proc.stderr.read().decode()}")
        time.sleep(rng.uniform(0, duration * 0.8))
        signum = rng.choice([signal.SIGTERM, signal.SIGTERM, signal.SIGUSR1])
        if proc.poll() is not None:
            continue  # finished before the signal: not a trial
        sent = time.perf_counter()
        proc.send_signal(signum)
        code = proc.wait()
        exit_s.append(time.perf_counter() - sent)
        err = proc.stderr.read().decode()
        if code == 0:
            log(f"run {run}: {signum.name} came after the last shard; the build finished (exit 0)")
            exit_s.pop()
            continue
        trials += 1
        line = err.strip().splitlines()[-1] if err.strip() else ""
        clean = code == 75 and line.startswith(f"stopped by {signum.name}") and "Traceback" not in err
        ok, rerun_err = rerun_identical(out, want)
        identical += clean and ok
        log(f"run {run}: {signum.name}, exit {code} after {exit_s[-1]:.2f} s: {line!r}; rerun "
            f"{'identical' if ok else 'DIFFERENT'}" + ("" if ok and clean else f"\n{err}\n{rerun_err}"))
    shutil.rmtree(work)
    return trials, identical, exit_s


def fill(disk: Path, leave: int = 0) -> Path:
    """A ballast file taking all but `leave` free bytes of `disk`."""
    ballast = disk / "ballast"
    with open(ballast, "ab") as f:
        f.write(b"\0" * max(0, shutil.disk_usage(disk).free - leave))
    return ballast


def after_last_state_save(out: Path, num_shards: int, proc: subprocess.Popen) -> bool:
    """Wait until the build has saved its last state (after shard num_shards - 1) and removed the
    one before, and stop the process right there; False when it got past that point first."""
    last, before = out / f".prep-state-{num_shards:05d}.npz", out / f".prep-state-{num_shards - 1:05d}.npz"
    while not (last.exists() and not before.exists()):
        if proc.poll() is not None or (out / "manifest.json").exists():
            return False
    proc.send_signal(signal.SIGSTOP)
    if (out / "manifest.json").exists() or (out / "manifest.json.tmp").exists():
        proc.send_signal(signal.SIGCONT)
        return False
    return True


def disk_full(num_trials: int, seed: int = 0, log=print) -> tuple[int, int, Counter]:
    """A full tmpfs at a shard, a state or the manifest write: exit 74 with one line, then identical."""
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="chaos-prep-enospc-"))
    want, _ = reference_build(work, log)
    num_shards = sum(name.startswith("shard-") for name in want)
    needed = sum(len(data) for data in want.values())
    disk = work / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], check=True)
    trials, identical, hit, run = 0, 0, Counter(), 0
    try:
        while trials < num_trials:
            out = disk / f"run-{run}"
            run += 1
            at_manifest = run % 3 == 0
            if at_manifest:
                proc = prep(out)
                if not after_last_state_save(out, num_shards, proc):
                    proc.wait()
                    log(f"run {run}: missed the moment between the last state save and the manifest; again")
                    shutil.rmtree(out)
                    continue
                ballast = fill(disk)
                proc.send_signal(signal.SIGCONT)
            else:
                ballast = fill(disk, leave=rng.randint(64 << 10, needed * 9 // 10))
                proc = prep(out)
            code = proc.wait()
            err = proc.stderr.read().decode()
            line = err.strip().splitlines()[-1] if err.strip() else ""
            what = line.removeprefix("Error: disk full writing ").split(" /")[0] if "disk full" in line else "nothing"
            trials += 1
            hit[what] += 1
            state = json.loads((out / ".prep-state.json").read_text()) if (out / ".prep-state.json").exists() else None
            clean = (code == 74 and line.startswith("Error: disk full writing ") and "Traceback" not in err
                     and not list(out.glob("*.tmp")) and (state is None or (out / state["arrays"]).exists()))
            ballast.unlink()
            ok, rerun_err = rerun_identical(out, want)
            identical += clean and ok
            log(f"run {run}: exit {code}, {line!r}; rerun {'identical' if ok else 'DIFFERENT'}"
                + ("" if ok and clean else f"\n{err}\n{rerun_err}"))
            shutil.rmtree(out)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)
        shutil.rmtree(work)
    return trials, identical, hit


def concurrent(num_trials: int, log=print) -> tuple[int, int]:
    """Two builds at once into one --out: one runs, the other is refused naming it; the result verifies."""
    work = Path(tempfile.mkdtemp(prefix="chaos-prep-concurrent-"))
    want, _ = reference_build(work, log)
    host = socket.gethostname()
    survived = 0
    for trial in range(num_trials):
        out = work / f"run-{trial}"
        first, second = prep(out), prep(out)
        codes = first.wait(), second.wait()
        errs = first.stderr.read().decode(), second.stderr.read().decode()
        ran = [index for index, code in enumerate(codes) if code == 0]
        refused = [index for index, code in enumerate(codes) if code == 2]
        verified = subprocess.run([sys.executable, "-m", "prep.cli", "verify", str(out)], cwd=ROOT,
                                  capture_output=True, text=True)
        ok = (len(ran) == 1 and len(refused) == 1 and files(out) == want and verified.returncode == 0)
        if ok:
            winner, loser = (first, second) if ran == [0] else (second, first)
            refusal = errs[refused[0]].strip().splitlines()[-1]
            ok = f"is being built by pid {winner.pid} on {host}" in refusal and "Traceback" not in errs[refused[0]]
        survived += ok
        log(f"run {trial}: exits {codes}, verify {verified.returncode}, {'identical' if ok else 'WRONG'}"
            + (f": {errs[refused[0]].strip().splitlines()[-1]!r}" if refused else f"\n{errs}"))
    shutil.rmtree(work)
    return num_trials, survived


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=None, help="SIGKILL trials (the default mode: 20)")
    parser.add_argument("--term", type=int, default=0, help="SIGTERM/SIGUSR1 trials")
    parser.add_argument("--enospc", type=int, default=0, help="disk-full trials on a tmpfs (needs root)")
    parser.add_argument("--concurrent", type=int, default=0, help="trials of two builds into one --out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.kills is None and not (args.term or args.enospc or args.concurrent):
        args.kills = 20
    lines, failed = [], False
    if args.kills:
        kills, identical, phases = chaos(args.kills, args.seed)
        print("kills by phase: " + ", ".join(f"{k} {v}" for k, v in phases.most_common()))
        lines.append(summary("SIGKILL", kills, identical))
        failed |= kills != identical
    if args.term:
        trials, identical, exit_s = terms(args.term, args.seed)
        lines.append(summary("SIGTERM/SIGUSR1 (exit 75)", trials, identical, exit_s))
        failed |= trials != identical
    if args.enospc:
        trials, identical, hit = disk_full(args.enospc, args.seed)
        lines.append(summary("ENOSPC (exit 74)", trials, identical) + " (writes hit: "
                     + ", ".join(f"{what} {count}" for what, count in hit.most_common()) + ")")
        failed |= trials != identical
    if args.concurrent:
        trials, survived = concurrent(args.concurrent)
        lines.append(summary("two builds, one --out (exit 2 for one)", trials, survived))
        failed |= trials != survived
    print("\n".join(lines))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
