"""Faults a cluster throws at `prep build`: a second build into the same --out, preemption (SIGTERM,
SIGUSR1), a full disk, and inputs changed under an unfinished build. Each ends with one line and a
documented exit code, and the rerun ends with the bytes of a build that never failed."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import prep.build
import prep.state
from prep.build import BuildConfig, build
from prep.lock import Locked
from prep.shards import LOCK, DiskFull
from prep.verify import verify

from conftest import ballast, tmpfs

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(mix="a=0.5,b=0.5", seq_len=1024, window=8, rows_per_shard=6, progress=False)
# the embedded sample in 128 shards: long enough to signal a CLI build mid-way (scripts/chaos_prep.py)
SAMPLE = dict(mix="nemotron=0.5,ot3=0.5", sample=True, seq_len=4096, rows_per_shard=4, window=8, progress=False)
SAMPLE_ARGS = ["--mix", "nemotron=0.5,ot3=0.5", "--sample", "--seq-len", "4096", "--rows-per-shard", "4",
               "--window", "8", "--no-progress"]


def files(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(out).iterdir())}


def quiet(message):
    pass


def source_args(sources: dict[str, str]) -> list[str]:
    return [arg for name, path in sources.items() for arg in ("--source", f"{name}={path}")]


def prep_cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prep.cli", "build", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, what: str, limit_s: float = 60) -> None:
    """Poll until `condition()`; fail when the process ends first (or after `limit_s`, a hang guard)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert process.poll() is None, f"the build ended before {what}: {process.stderr.read()}"
        assert time.monotonic() < deadline, f"no {what} after {limit_s} s"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    build(BuildConfig(out=str(out), sources=corpus, **SMALL), log=quiet)
    return files(out)


@pytest.fixture(scope="module")
def sample_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample-ref") / "out"
    build(BuildConfig(out=str(out), **SAMPLE), log=quiet)
    return files(out)


@pytest.fixture
def lock_holder(tmp_path):
    """Another process holding the build lock of a directory, through prep's own lock, until the test ends."""
    processes = []

    def hold(out: Path) -> subprocess.Popen:
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sys; from pathlib import Path; from prep.lock import lock_build\n"
             "with lock_build(Path(sys.argv[1])):\n    print('locked', flush=True); sys.stdin.read()", str(out)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        processes.append(holder)
        assert holder.stdout.readline() == "locked\n"
        return holder

    yield hold
    for holder in processes:
        holder.kill()
        holder.wait()


# --- one build per directory -----------------------------------------------------------------------

def test_a_second_build_is_refused_naming_the_holder(tmp_path, corpus, lock_holder):
    out = tmp_path / "out"
    holder = lock_holder(out)
    second = prep_cli("--out", str(out), "--mix", "a=0.5,b=0.5", *source_args(corpus), "--seq-len", "1024")
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2
    # one line, the last: before it, at most what the tokenizer's load says (the load starts first)
    assert err.count("Error: ") == 1 and "Traceback" not in err
    assert f"is being built by pid {holder.pid} on {socket.gethostname()}" in err.splitlines()[-1]
    assert [path.name for path in out.iterdir()] == [LOCK]  # the refused build wrote nothing


def test_overwrite_does_not_delete_a_build_in_progress(tmp_path, corpus, reference, lock_holder):
    out = tmp_path / "out"
    build(BuildConfig(out=str(out), sources=corpus, **SMALL), log=quiet)
    holder = lock_holder(out)
    before = {name: data for name, data in files(out).items() if name != LOCK}
    with pytest.raises(Locked, match=f"pid {holder.pid} on "):
        build(BuildConfig(out=str(out), sources=corpus, overwrite=True, **(SMALL | {"seq_len": 2048})), log=quiet)
    assert {name: data for name, data in files(out).items() if name != LOCK} == before


def test_the_lock_of_a_killed_build_does_not_block(tmp_path, corpus, reference):
    out = tmp_path / "out"
    killed = prep_cli("--out", str(out), "--mix", "a=0.5,b=0.5", *source_args(corpus), "--seq-len", "1024",
                      "--window", "8", "--rows-per-shard", "6", "--no-progress")
    lock = out / LOCK
    wait_for(lambda: lock.exists() and lock.stat().st_size > 0, killed, "the lock record")
    killed.kill()
    killed.wait()
    assert f'"pid": {killed.pid}' in lock.read_text()  # the dead holder's record stays: it must not matter
    build(BuildConfig(out=str(out), sources=corpus, **SMALL), log=quiet)
    assert files(out) == reference


def test_a_first_state_save_killed_before_its_json_does_not_block(tmp_path, corpus, reference):
    """SIGKILL between the first resume state's arrays and its json (the commit point) leaves files
    that name no build: the rerun clears them and builds, where it used to refuse the directory."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".prep-state-00000.npz").write_bytes(b"PK\x03\x04 the arrays of a save killed before its json")
    (out / ".prep-state.json.tmp").write_text('{"build_id": ')
    build(BuildConfig(out=str(out), sources=corpus, **SMALL), log=quiet)
    assert files(out) == reference
    (out / "shard-00009.arrow").write_bytes(b"someone else's")  # shards without a state or manifest: refused
    (out / "manifest.json").unlink()
    with pytest.raises(ValueError, match="shard files of an unknown build"):
        build(BuildConfig(out=str(out), sources=corpus, **SMALL), log=quiet)


def test_verify_ignores_the_lock_file_only(tmp_path, corpus):
    out = tmp_path / "out"
    build(BuildConfig(out=str(out), sources=corpus, **SMALL), log=quiet)
    assert (out / LOCK).read_bytes() == b""  # kept, emptied: a finished build is the same bytes whoever wrote it
    assert verify(out) == []
    (out / "stray.txt").write_text("x")
    assert [(problem.check, problem.shard) for problem in verify(out)] == [("extra-file", "stray.txt")]


# --- preemption --------------------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_stops_after_a_shard_and_the_rerun_is_identical(tmp_path, sample_reference, signum):
    out = tmp_path / "out"
    stopped = prep_cli("--out", str(out), *SAMPLE_ARGS)
    wait_for(lambda: (out / "shard-00002.arrow").exists(), stopped, "a third shard")
    stopped.send_signal(signum)
    _, err = stopped.communicate(timeout=60)  # a hang guard: the build bounds itself (prep/preempt.py)
    assert stopped.returncode == 75, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stopped by {signum.name} after ") and "rerun the same command to resume" in last
    assert "Traceback" not in err and not (out / "manifest.json").exists()
    meta = prep.state.load(out)[0]
    assert f"after {len(meta['shards'])} shards" in last and len(meta["shards"]) < 128
    build(BuildConfig(out=str(out), **SAMPLE), log=quiet)
    assert files(out) == sample_reference


def stalled_build(grace_s: float) -> subprocess.Popen:
    """A process inside prep's signal handling that never reaches its next clean point (a stalled source)."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from prep.preempt import stop_signals\n"
         f"with stop_signals(grace_s={grace_s}) as stop:\n"
         "    stop.check(3); print('ready', flush=True); time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "ready\n"
    return process


def test_a_stalled_build_stops_at_once_after_the_grace():
    process = stalled_build(grace_s=0.5)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)  # it would sleep 600 s without the grace
    assert process.returncode == 75
    assert err == ("stopped by SIGTERM at once: the shard in progress was not finished 0.5 s after it; "
                   "3 shards are saved, rerun the same command to resume\n")


def test_a_second_signal_stops_at_once():
    process = stalled_build(grace_s=600)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # the two signals as two events, as a scheduler and then an impatient user send them
    process.send_signal(signal.SIGUSR1)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 75
    assert "not finished a second SIGUSR1" in err and err.count("\n") == 1


# --- disk full ---------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: a real filesystem that fills up (mounting needs root, as CI runs)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    with tmpfs(tmp_path / "disk", 4) as disk:
        yield disk


AT_SAVE = 4  # the initial state save, then one after each shard: the 4th comes after shard 2


def fill_before_state_save(monkeypatch, disk: Path):
    save, calls = prep.state.save, []

    def filling_save(*args, **kw):
        calls.append(1)
        if len(calls) == AT_SAVE:
            ballast(disk)
        save(*args, **kw)

    monkeypatch.setattr(prep.state, "save", filling_save)


def fill_after_state_save(monkeypatch, disk: Path):
    """The disk fills right after a state save: the next write is a shard's."""
    save, calls = prep.state.save, []

    def filling_save(*args, **kw):
        save(*args, **kw)
        calls.append(1)
        if len(calls) == AT_SAVE:
            ballast(disk)

    monkeypatch.setattr(prep.state, "save", filling_save)


def fill_before_manifest(monkeypatch, disk: Path):
    write_json = prep.build.write_json_atomic

    def filling_write(*args, **kw):
        ballast(disk)
        write_json(*args, **kw)

    monkeypatch.setattr(prep.build, "write_json_atomic", filling_write)


@pytest.mark.parametrize("what, filler", [("shard", fill_after_state_save), ("resume state", fill_before_state_save),
                                          ("manifest", fill_before_manifest)], ids=["shard", "state", "manifest"])
def test_disk_full_keeps_the_last_state_and_the_rerun_is_identical(tmp_path, corpus, reference, small_disk,
                                                                   monkeypatch, what, filler):
    out = small_disk / "out"
    filler(monkeypatch, small_disk)
    with pytest.raises(DiskFull) as error:
        build(BuildConfig(out=str(out), sources=corpus, **SMALL), log=quiet)
    message = str(error.value)
    assert message.startswith(f"disk full writing {what} {out}/") and "\n" not in message
    assert "it needs about " in message and " free; free some space" in message
    assert not list(out.glob("*.tmp")) and not (out / "manifest.json").exists()
    saved = prep.state.load(out)[0]["shards"]  # the last complete state loads
    all_shards = sum(name.startswith("shard-") for name in reference)
    assert len(saved) == {"shard": 3, "resume state": 2, "manifest": all_shards}[what]
    monkeypatch.undo()
    (small_disk / "ballast").unlink()
    build(BuildConfig(out=str(out), sources=corpus, **SMALL), log=quiet)
    assert files(out) == reference


def test_disk_full_from_the_command_line(tmp_path, corpus, reference, small_disk):
    """A ballast left 100 KiB free before the build: exit 74, one line, and after freeing the space, the same bytes."""
    space = ballast(small_disk, 100 * 1024)
    out = small_disk / "out"
    args = ["--out", str(out), "--mix", "a=0.5,b=0.5", *source_args(corpus), "--seq-len", "1024", "--window", "8",
            "--rows-per-shard", "6", "--no-progress"]
    full = prep_cli(*args)
    _, err = full.communicate(timeout=120)
    assert full.returncode == 74, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("Error: disk full writing ") and "rerun the same command to resume" in last
    assert not list(out.glob("*.tmp"))
    space.unlink()
    rerun = prep_cli(*args)
    _, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    assert files(out) == reference


# --- changed inputs ----------------------------------------------------------------------------------

def stop_after_state_save(monkeypatch, k: int):
    """The k-th state save ends the build, as a kill right after it would; returns the real save."""
    save, calls = prep.state.save, []

    def stopping_save(*args, **kw):
        save(*args, **kw)
        calls.append(1)
        if len(calls) == k:
            raise SystemExit("killed")

    monkeypatch.setattr(prep.state, "save", stopping_save)
    return save


@pytest.mark.parametrize("change, expected", [
    ("append", r"input file .*a\.jsonl changed size \([\d,]+ -> [\d,]+ bytes\)"),
    ("touch", r"input file .*a\.jsonl was modified \(its mtime changed, same size\)"),
    ("remove", r"input file .*b-part2\.jsonl is gone"),
    ("add", r"input file .*b-part3\.jsonl is new"),
], ids=["append", "touch", "remove", "add"])
def test_a_resume_over_changed_inputs_is_refused_naming_the_file(tmp_path, corpus, monkeypatch, change, expected):
    data = tmp_path / "data"
    (data / "b").mkdir(parents=True)
    shutil.copy(corpus["a"], data / "a.jsonl")
    lines = Path(corpus["b"]).read_text().splitlines(keepends=True)
    (data / "b" / "b-part1.jsonl").write_text("".join(lines[:60]))
    (data / "b" / "b-part2.jsonl").write_text("".join(lines[60:]))
    sources = {"a": str(data / "a.jsonl"), "b": str(data / "b")}
    save = stop_after_state_save(monkeypatch, 3)
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        build(BuildConfig(out=str(out), sources=sources, **SMALL), log=quiet)
    monkeypatch.setattr(prep.state, "save", save)
    if change == "append":
        with open(data / "a.jsonl", "a") as f:
            f.write(lines[0])
    elif change == "touch":
        status = os.stat(data / "a.jsonl")
        os.utime(data / "a.jsonl", ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))
    elif change == "remove":
        (data / "b" / "b-part2.jsonl").unlink()
    else:
        (data / "b" / "b-part3.jsonl").write_text(lines[0])
    with pytest.raises(ValueError, match=expected + r" since the unfinished build in .* --overwrite to start over"):
        build(BuildConfig(out=str(out), sources=sources, **SMALL), log=quiet)
    assert prep.state.load(out) is not None  # refused, not wiped
