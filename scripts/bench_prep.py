"""Benchmark `prep build` end to end against bare fastokens on the same rendered texts.

    .venv/bin/python scripts/bench_prep.py                       # 200M tokens, 3 runs (about 10 min on 2 cores)
    .venv/bin/python scripts/bench_prep.py --corpus real         # real text: the .py/.md files of .venv, ~60M tokens
    .venv/bin/python scripts/bench_prep.py --tokens 20e6 --repeats 1 --calibrate   # quick, and checks the method
    .venv/bin/python scripts/bench_prep.py --serial              # the single-thread work per token, projected to 16/64 cores
    .venv/bin/python scripts/bench_prep.py --profile             # py-spy: CPU-seconds per stage of one build
    .venv/bin/python scripts/bench_prep.py --profile --prep /work/main/.venv/bin/prep   # ... of another version
    .venv/bin/python scripts/bench_prep.py --tokens 50e6 --repeats 4 --against ../old/.venv/bin/prep   # A/B two versions
    .venv/bin/python scripts/bench_prep.py --tokens 50e6 --jsonl --against ../old/.venv/bin/prep      # ... on jsonl.gz

Corpora (made once under --work, as parquet, the format the hub serves smoltalk2 in):
  synthetic (default): scripts/synth.py's rows with realistic lengths (Nemotron-like mean ~5k
      tokens, OpenThoughts-like mean ~12k, ~1.5% beyond 32k), half the tokens each. Its texts are
      assembled from a pool of a few thousand blocks, so words repeat far more than in real traces,
      which flatters an encoder that caches words (fastokens does).
  real: every .py, .md, .rst, .txt and .pyi file of this checkout's .venv (~225 MB: code, docs,
      licences, in many styles), cut into documents of at most 40,000 characters, one source.

Measured in one run:
  1. `prep build` on those files, as a subprocess, from the parquet to finished shards
     (start-up, reading, checking, rendering, encoding, packing, writing, hashing);
  2. the reference: bare fastokens on the same ChatML texts, in a fresh process that renders them
     beforehand (with the build's own stages) and then encodes each text once, one thread per
     core, each call one batch of texts as the build makes them, with `encode_batch_flat` (the
     faster of fastokens' batch calls): what a pipeline that only tokenized would take;
  3. after the runs, alone, a 1-document build: the fixed start-up cost;
and prints the ratio (goal >= 0.5 after start-up), tokens/s (goal >= 12M), BFD fill at 32k (goal
>= 99.8%), tokens kept (goal 100%) and the build's peak RSS, with its RSS at each quarter of the
run (goal <= 1 GB, flat).

Why the two are interleaved in slices: the speed of this shared 2-core machine moves by up to 2x
within a minute. Every --slice seconds of its running the build is stopped (SIGSTOP), the bare
encoder runs for --slice seconds, and the build goes on (SIGCONT), so both see the same machine
moments; once the bare encoder is done (it needs a fraction of the build's time), the build runs
on alone. Each one's time is the time it was running. Why the reference encodes each text once,
in a process of its own: fastokens caches the words it has encoded in its threads, so a second
pass over the same texts runs ~15% faster, which no build gets (an earlier version of this script
cycled over the texts and was flattered so). `--calibrate` races two such references (should
come out at 1.00). To tell whether a change to prep helps, race two versions with `--against`:
each build runs a slice while the other is stopped.
"""

import argparse
import itertools
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import synth  # noqa: E402

PREP = [str(ROOT / ".venv/bin/prep")]  # --prep replaces it, to measure another version on the same corpus
REAL_SUFFIXES = (".py", ".md", ".rst", ".txt", ".pyi")
REAL_DOC_CHARS = 40_000


def make_corpus(work: Path, num_tokens: int, suffix: str) -> dict[str, Path]:
    """Half the tokens Nemotron-like, half OpenThoughts-like (made only when missing)."""
    paths = {}
    for kind in ("nemotron", "ot3"):
        path = work / f"{kind}-{num_tokens // 2}{suffix}"
        rows = synth.rows(kind, num_tokens=num_tokens // 2 + 2_000_000, seed=1)
        if path.exists():
            pass
        elif suffix == ".jsonl.gz":
            synth.write_jsonl(path, rows)
        else:  # row groups of 500 rows, as the hub's parquet files have small row groups too
            write_parquet(path, rows)
        paths[kind] = path
    return paths


def write_parquet(path: Path, rows, group_rows: int = 500) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_suffix(".tmp")
    writer, batch = None, []
    for row in itertools.chain(rows, [None]):
        if row is not None:
            batch.append(row)
        if batch and (row is None or len(batch) == group_rows):
            table = pa.Table.from_pylist(batch)
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            batch = []
    writer.close()
    tmp.rename(path)


def make_real_corpus(work: Path) -> dict[str, Path]:
    """The text files of this checkout's .venv as smoltalk2 `Mid` rows: a user turn naming the file,
    an assistant turn holding (a piece of) it; files in sorted order, cut at REAL_DOC_CHARS."""
    path = work / "real-files.parquet"
    if not path.exists():
        def rows():
            root = ROOT / ".venv" / "lib"
            for file in sorted(p for p in root.rglob("*") if p.suffix in REAL_SUFFIXES and p.is_file()):
                text = file.read_text(encoding="utf-8", errors="replace")
                for start in range(0, len(text), REAL_DOC_CHARS):
                    yield {"messages": [{"role": "user", "content": f"Show {file.relative_to(root)}, part {start // REAL_DOC_CHARS}."},
                                        {"role": "assistant", "content": text[start:start + REAL_DOC_CHARS]}]}

        write_parquet(path, rows())
    return {"files": path}


def prep_command(paths: dict[str, Path], num_tokens: int | None, out: Path) -> list[str]:
    """`prep build` of these sources in equal shares (a source of its own: one), into `out`."""
    mix = ",".join(f"{name}={1 / len(paths):g}" for name in paths)
    sources = [arg for name, path in paths.items() for arg in ("--source", f"{name}={path}")]
    return [*PREP, "build", "--mix", mix, "--overwrite", "--no-progress", *sources,
            *(["--max-tokens", str(num_tokens)] if num_tokens else []), "--out", str(out)]


def rendered_batches(paths: dict[str, Path], rows_read: dict[str, int]) -> list[list[str]]:
    """The ChatML texts of the rows a build used, in the batches the build encodes them in, made by
    the build's own stages (read -> check -> render) and turned into Python strings beforehand."""
    from prep.check import check
    from prep.render import render
    from prep.sources import read

    batches = []
    for name, path in paths.items():
        for batch in render(check(read(str(path))), spans=False):
            if batch.first_row >= rows_read[name]:
                break
            batches.append(batch.texts.to_pylist()[: rows_read[name] - batch.first_row])
    return batches


class BareChild:
    """The reference: bare fastokens in a process of its own, on the ChatML texts the build used,
    rendered by the build's own stages (read -> check -> render) before its clock starts, each text
    encoded once, with `encode_batch_flat` (the faster of fastokens' two batch calls), one thread
    per core, each call one of the build's batches, in the build's order.

    Once, and in a fresh process, because that is what a build does: fastokens keeps per-thread
    caches of the words it has encoded, so encoding the same texts again runs ~15% faster (200M
    synthetic tokens, 2 threads: 96.9 M tokens/s the first time, 114.3 and 112.8 the next two),
    and a str keeps the UTF-8 fastokens made of it, so a second call on the same objects skips
    that work too.

    `run_slice` lets it run for about `seconds` (SIGCONT ... SIGSTOP) and counts its running time;
    it is `done` once it has printed its token count."""

    def __init__(self, paths: dict[str, Path], rows_read: dict[str, int], tokenizer_json: Path):
        spec = json.dumps({"paths": {name: str(path) for name, path in paths.items()}, "rows_read": rows_read,
                           "tokenizer": str(tokenizer_json)})
        self.proc = subprocess.Popen([sys.executable, __file__, "--bare-child", spec], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline() == "ready\n", "the bare encoder child failed to start"
        self.seconds, self.tokens, self.started = 0.0, None, False

    @property
    def done(self) -> bool:
        return self.tokens is not None

    def run_slice(self, seconds: float) -> None:
        if not self.started:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
            self.started = True
        self.seconds += take_turn(self.proc, seconds)
        if self.proc.poll() is not None:
            assert self.proc.returncode == 0, f"the bare encoder child failed ({self.proc.returncode})"
            self.tokens = int(self.proc.stdout.readline())

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def take_turn(proc: subprocess.Popen, seconds: float | None) -> float:
    """Let a (stopped) process run for `seconds` (None: to its end), stop it again unless it ended;
    the seconds it ran."""
    proc.send_signal(signal.SIGCONT)
    start = time.perf_counter()
    while proc.poll() is None and (seconds is None or time.perf_counter() - start < seconds):
        time.sleep(0.002)
    ran = time.perf_counter() - start
    if proc.poll() is None:
        proc.send_signal(signal.SIGSTOP)
    return ran


def bare_child(spec: str) -> None:
    """BareChild's process: render the texts, say "ready", wait for "go", encode, print the tokens."""
    import fastokens

    spec = json.loads(spec)
    batches = rendered_batches({name: Path(path) for name, path in spec["paths"].items()}, spec["rows_read"])
    fast = fastokens.Tokenizer.from_file(spec["tokenizer"])
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        print("ready", flush=True)
        sys.stdin.readline()
        print(sum(len(ids) // 4 for ids, _ in pool.map(fast.encode_batch_flat, batches)),
              flush=True)


def run_sliced(cmd: list[str], bare: BareChild, slice_s: float, log: Path):
    """Run cmd, stopping it every slice_s seconds of its running for a slice of the bare encoder,
    until the bare encoder is done; then the build runs on alone. Returns its running seconds and
    its RSS samples (MB, against running seconds)."""
    import psutil

    proc = subprocess.Popen(cmd, stderr=log.open("w"))
    running, rss = 0.0, []
    while True:
        start = time.perf_counter()
        while proc.poll() is None and (bare.done or time.perf_counter() - start < slice_s):
            try:  # a sample every ~5 ms: enough to see the peak and whether it grows
                rss.append((running + time.perf_counter() - start, psutil.Process(proc.pid).memory_info().rss / 2**20))
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.005)
        running += time.perf_counter() - start
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGSTOP)
        bare.run_slice(slice_s)
        proc.send_signal(signal.SIGCONT)
    while not bare.done:  # a build faster than the bare encoder: let it finish
        bare.run_slice(slice_s)
    assert proc.returncode == 0, f"{cmd[:2]} failed ({proc.returncode}): {log.read_text()[-2000:]}"
    return running, rss


def sliced_build(cmd: list[str], out: Path, bare: BareChild, slice_s: float) -> dict:
    """One `prep build`, sliced with a fresh bare encoder: its manifest, running seconds, RSS, the reference's rate."""
    seconds, rss = run_sliced(cmd, bare, slice_s, out.with_name(out.name + ".log"))
    manifest = json.loads((out / "manifest.json").read_text())
    return {"manifest": manifest, "seconds": seconds, "rss": rss, "rate": bare.rate}


def plain_seconds(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def calibrate(make_bare, slice_s: float) -> float:
    """The method against itself: two bare encoders taking turns in slices; their rates' ratio (should be 1.00)."""
    first, second = make_bare(), make_bare()
    while not (first.done and second.done):
        for bare in (first, second):
            if not bare.done:
                bare.run_slice(slice_s)
    return first.rate / second.rate


def head_to_head(commands: dict[str, list[str]], slice_s: float) -> dict[str, float]:
    """Builds taking turns: each runs slice_s seconds while the others are stopped, so a change to
    prep is measured against another version on the same machine moment. Running seconds of each."""
    procs = {}
    for name, cmd in commands.items():
        procs[name] = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        procs[name].send_signal(signal.SIGSTOP)
    running = dict.fromkeys(commands, 0.0)
    while any(proc.poll() is None for proc in procs.values()):
        for name, proc in procs.items():
            if proc.poll() is not None:
                continue
            alone = all(other.poll() is not None for other in procs.values() if other is not proc)
            running[name] += take_turn(proc, None if alone else slice_s)
    failed = {name: proc.returncode for name, proc in procs.items() if proc.returncode}
    assert not failed, f"builds failed: {failed}"
    return running


def compare(other: str, paths: dict[str, Path], num_tokens: int, work: Path, repeats: int, slice_s: float) -> None:
    """--against: this prep and another, head to head on the corpus; which one goes first alternates."""
    commands = {"this": prep_command(paths, num_tokens, work / "shards-this"),
                "other": [*other.split(), *prep_command(paths, num_tokens, work / "shards-other")[1:]]}
    speedups = []
    for rep in range(repeats):
        order = list(commands) if rep % 2 == 0 else list(commands)[::-1]
        seconds = head_to_head({name: commands[name] for name in order}, slice_s)
        speedups.append(seconds["other"] / seconds["this"])
        print(f"run {rep + 1}: this {seconds['this']:.2f} s, other {seconds['other']:.2f} s", flush=True)
    print(f"this prep is {statistics.median(speedups):.3f}x the speed of {other!r} "
          f"(median of {repeats}; runs: {', '.join(f'{v:.3f}' for v in speedups)})")


# ---------------------------------------------------------------------------------------------
# --profile: where the CPU-seconds of one build go, by stage (py-spy --native, all threads)
# ---------------------------------------------------------------------------------------------

# The stage a sample belongs to, from the innermost frame of prep's own code on its stack, by
# file and function (the second list covers the build before it was split into stage modules).
STAGES = [
    (r"prep/tokenizer\.py", r"^(Encoder\.__init__|load_encoder|_encoder|_load_fastokens|Encoder\._inspect|tokenizer_file)", "start-up (tokenizer)"),
    (r"prep/sources\.py", None, "read"),
    (r"prep/check\.py", None, "check"),
    (r"prep/render\.py", None, "render"),
    (r"prep/tokenizer\.py", None, "encode"),
    (r"prep/pack\.py", r"^long_documents", "long-document policy"),
    (r"prep/mix\.py", None, "mix"),
    (r"prep/pack\.py", None, "pack"),
    (r"prep/shards\.py", None, "write (+ hash)"),
    (r"prep/state\.py", None, "resume state"),
    (r"prep/build\.py", r"^(ReadAhead\.|ahead)", "read"),  # a source's reader thread and its queue
    (r"prep/build\.py", r"^(tokenized_docs\.<locals>\.encode|_ids_and_mask)", "encode"),
    (r"prep/build\.py", r"^(tokenized_docs\.<locals>\.messages|tokenized_docs\.<locals>\.chars|batches)$", "read"),
    (r"prep/build\.py", r"^_keep", "long-document policy"),
    (r"prep/build\.py", r"^build\.<locals>\.write_ready", "write (+ hash)"),
    (r"prep/build\.py", r"^(build\.<locals>\.save_state|save_state)", "resume state"),
]


WAITING = ("PyThread_acquire_lock", "pthread_cond", "Condition.wait", "Event.wait", "SimpleQueue_get")


def stage_of(frames: list[str]) -> str | None:
    """frames: innermost first, each "function (file:line)" as py-spy writes them. None for a thread
    that waits (py-spy counts a thread blocked on a lock as active)."""
    if any("importlib" in frame for frame in frames):
        return "start-up (imports)"
    for frame in frames:
        match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
        if not match or "prep/" not in match.group(2):
            if any(marker in frame for marker in WAITING):
                return None
            continue
        function, file = match.groups()
        if file.endswith("prep/sources.py") and function.startswith(("to_messages", "_message")):
            return "check"
        for file_pattern, function_pattern, stage in STAGES:
            if re.search(file_pattern, file) and (function_pattern is None or re.search(function_pattern, function)):
                return stage
        return f"other prep ({Path(file).name}:{function})"
    return "outside prep"


def profile(cmd: list[str], work: Path, rate: int = 50) -> None:
    """CPU-seconds per stage of one build: the build's CPU time (user + sys, from a plain run), split
    in the proportions of a `py-spy record --native` run's samples of every thread, waiting ones
    left out. (py-spy counts a thread that waits for a core as active, so on a busy machine its
    sample counts are wall time; the plain run's CPU time is not.)"""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    _, _, usage = os.wait4(proc.pid, 0)
    cpu, wall = usage.ru_utime + usage.ru_stime, time.perf_counter() - started
    raw = work / "profile.txt"
    subprocess.run(["py-spy", "record", "--native", "--format", "raw", "--rate", str(rate), "-o", str(raw), "--", *cmd],
                   check=True, stderr=subprocess.DEVNULL, env=os.environ | {"PATH": f"{ROOT / '.venv/bin'}:{os.environ['PATH']}"})
    samples: dict[str, int] = defaultdict(int)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        stage = stage_of(stack.split(";")[::-1])
        if stage is not None:
            samples[stage] += int(count)
    total = sum(samples.values())
    print(f"{' '.join(cmd[:2])} ...: {cpu:.1f} CPU-seconds (user + sys) in {wall:.1f} s; "
          f"split by {total} py-spy samples (--native --rate {rate}):")
    for stage, count in sorted(samples.items(), key=lambda item: -item[1]):
        print(f"  {stage:45s} {cpu * count / total:6.1f} s  {count / total:6.1%}")


# ---------------------------------------------------------------------------------------------
# --serial: the work that runs on one thread, per token, and what it caps the build at
# ---------------------------------------------------------------------------------------------

def serial(paths: dict[str, Path], manifest: dict, tokenizer_json: Path, repeats: int) -> None:
    """On one core: read + check + render (+ the texts as Python strings, which fastokens takes),
    then mix + pack + write + hash on batches encoded beforehand, and bare fastokens alone; each
    in tokens per CPU-second of the whole process (fastokens encodes on its own thread pool, and
    the shard writer has a thread too; all are pinned to the one core). The build runs the first
    on a reader thread per source and the second on its main and writer threads, so those cap it
    whatever the number of cores (they hold the GIL only between Arrow kernels, numpy copies and
    hashing); encoding scales with the cores."""
    import fastokens

    from prep.check import check
    from prep.mix import Mixer, SourceStats, documents
    from prep.pack import BfdPacker, long_documents, pack
    from prep.render import render
    from prep.shards import ShardWriter, write
    from prep.sources import read
    from prep.tokenizer import encode, load_encoder

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    rows = {source["name"]: source["rows_read"] for source in manifest["sources"]}
    shares = [source["requested_share"] for source in manifest["sources"]]
    num_tokens = manifest["counts"]["tokens"]

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def read_check_render() -> list:
        batches = []
        for index, (name, path) in enumerate(paths.items()):
            for batch in render(check(read(str(path), index)), spans=False):
                if batch.first_row >= rows[name]:
                    break
                batch.texts.to_pylist()
                batches.append(batch)
        return batches

    encoder = load_encoder(manifest["tokenizer"]["name"])
    fast = fastokens.Tokenizer.from_file(str(tokenizer_json))
    results = defaultdict(list)
    for _ in range(repeats):
        start = cpu()
        batches = read_check_render()
        results["read + check + render (+ str)"].append(num_tokens / (cpu() - start))
        texts = [batch.texts.to_pylist() for batch in batches]
        start = cpu()
        for batch_texts in texts:
            fast.encode_batch_flat(batch_texts)
        results["bare fastokens encode_batch_flat"].append(num_tokens / (cpu() - start))
        with ThreadPoolExecutor(1) as pool:
            encoded = list(encode(iter(batches), encoder, pool, in_flight=2))
        out = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-serial-{os.getpid()}"
        out.mkdir(exist_ok=True)
        start = cpu()
        stats = [SourceStats() for _ in paths]
        streams = [documents(long_documents(iter([b for b in encoded if b.source == index]), "split", 32768), stats[index])
                   for index in range(len(paths))]
        mixer = Mixer(streams, shares, manifest["settings"]["max_tokens"])
        write(pack(iter(mixer), BfdPacker(32768, 256)), ShardWriter(out, 32768, manifest["pad_id"], False, 1024))
        results["mix + pack + write + hash"].append(sum(mixer.tokens) / (cpu() - start))
        for path in out.iterdir():
            path.unlink()
        out.rmdir()
    rate = {name: statistics.median(values) for name, values in results.items()}
    # each source's reader thread reads, checks and renders its share; the main thread mixes, packs and writes all
    readers = rate["read + check + render (+ str)"] / max(shares)
    cap = min(readers, rate["mix + pack + write + hash"])
    print(f"one core, median of {repeats}, tokens per CPU-second:")
    for name, value in rate.items():
        print(f"  {name:40s} {value / 1e6:7.1f} M")
    print(f"  {'readers (one per source, largest share ' + format(max(shares), '.0%') + ')':40s} {readers / 1e6:7.1f} M")
    print(f"  cap of the threads that don't scale: {cap / 1e6:.1f} M tokens/s (the readers; the main and writer threads, "
          "counted as one)")
    for cores in (2, 16, 64):
        encoding = cores * rate["bare fastokens encode_batch_flat"]
        print(f"  {cores:2d} cores: encoding {encoding / 1e6:7.1f} M tokens/s: projected {min(encoding, cap) / 1e6:.1f} M tokens/s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=float, default=200e6, help="tokens to build (default 200M; real: all it has)")
    parser.add_argument("--corpus", choices=["synthetic", "real"], default="synthetic")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the median is shown")
    parser.add_argument("--slice", type=float, default=1.0, help="seconds per slice of build / bare encoder")
    parser.add_argument("--calibrate", action="store_true", help="also slice the bare encoder against itself")
    parser.add_argument("--jsonl", action="store_true", help="also time the synthetic corpus as jsonl.gz (with --against: only)")
    parser.add_argument("--serial", action="store_true", help="instead, the single-thread work per token")
    parser.add_argument("--profile", action="store_true", help="instead, one build under py-spy, by stage")
    parser.add_argument("--work", default=str(ROOT / "bench"), help="where the corpus and shards go")
    parser.add_argument("--prep", help="the prep command to measure, e.g. another checkout's (default: this one's)")
    parser.add_argument("--against", metavar="PREP", help="instead, race this prep against another prep command, "
                        "taking turns in slices, and print the speed ratio")
    parser.add_argument("--bare-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prep:
        PREP[:] = args.prep.split()
    if args.bare_child:
        return bare_child(args.bare_child)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    real = args.corpus == "real"
    num_tokens = None if real else int(args.tokens)

    started = time.perf_counter()
    # --against --jsonl races the two on the same rows as jsonl.gz
    paths = make_real_corpus(work) if real else make_corpus(work, num_tokens, ".jsonl.gz" if args.against and args.jsonl else ".parquet")
    print(f"corpus: {', '.join(f'{p.name} {p.stat().st_size / 1e6:.0f} MB' for p in paths.values())} "
          f"({time.perf_counter() - started:.0f} s); machine: {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f} at start", flush=True)

    if args.against:
        return compare(args.against, paths, num_tokens, work, args.repeats, args.slice)
    out = work / ("shards-real" if real else "shards")
    if args.profile:
        return profile(prep_command(paths, num_tokens, out), work)

    # One plain build first: it says which rows the build takes (the reference gets the same texts)
    # and warms the page cache for every run after it.
    subprocess.run(prep_command(paths, num_tokens, out), check=True, stderr=subprocess.DEVNULL)
    manifest = json.loads((out / "manifest.json").read_text())
    from prep.tokenizer import load_encoder

    tokenizer_json = load_encoder(manifest["tokenizer"]["name"]).tokenizer_json
    if args.serial:
        return serial(paths, manifest, tokenizer_json, args.repeats)
    rows_read = {source["name"]: source["rows_read"] for source in manifest["sources"]}

    def make_bare() -> BareChild:
        return BareChild(paths, rows_read, tokenizer_json)

    kinds = ["parquet"] + (["jsonl.gz"] if args.jsonl and not real else [])
    runs = {kind: [] for kind in kinds}
    commands = {"parquet": (prep_command(paths, num_tokens, out), out)}
    if "jsonl.gz" in kinds:
        commands["jsonl.gz"] = (prep_command(make_corpus(work, num_tokens, ".jsonl.gz"), num_tokens, work / "shards-gz"),
                                work / "shards-gz")
    startups = []
    for _ in range(args.repeats):
        for kind in kinds:
            runs[kind].append(sliced_build(*commands[kind], make_bare(), args.slice))
        startups.append(plain_seconds(prep_command(paths, 1, work / "shards-tiny")))
    startup = statistics.median(startups)

    def ratios(kind: str, minus_startup: bool = False) -> list[float]:
        """Per run: the build's tokens/s over the bare encoder's tokens/s in the same run's slices."""
        return [run["manifest"]["counts"]["tokens"] / (run["seconds"] - (startup if minus_startup else 0)) / run["rate"]
                for run in runs[kind]]

    def show(values: list[float]) -> str:
        return f"{statistics.median(values):.2f}" + (f" (runs: {', '.join(f'{v:.2f}' for v in values)})" if len(values) > 1 else "")

    def median_seconds(kind: str) -> float:
        return statistics.median(run["seconds"] for run in runs[kind])

    manifest = runs["parquet"][-1]["manifest"]
    counts = manifest["counts"]
    input_tokens = counts["tokens"] + counts["truncated_tokens"] + counts["dropped_tokens"]
    print(f"median of {args.repeats} runs each, build and bare encoder interleaved in {args.slice:g} s slices; "
          f"load average {os.getloadavg()[0]:.2f} at the end")
    print(f"bare fastokens (encode_batch_flat, {os.cpu_count()} threads, a fresh process, each text once): "
          f"{statistics.median(run['rate'] for run in runs['parquet']) / 1e6:.2f} M tokens/s")
    print(f"prep build, parquet -> shards: {counts['tokens'] / 1e6:.1f} M tokens in {median_seconds('parquet'):.1f} s = "
          f"{counts['tokens'] / median_seconds('parquet') / 1e6:.2f} M tokens/s  (goal >= 12)")
    print(f"ratio prep / bare fastokens, end to end: {show(ratios('parquet'))}")
    print(f"  start-up (imports, tokenizer, opening sources; a 1-document build, alone): {startup:.1f} s; "
          f"after it: ratio {show(ratios('parquet', minus_startup=True))}  (goal >= 0.5)")
    if "jsonl.gz" in runs:
        print(f"  same corpus as jsonl.gz: ratio {show(ratios('jsonl.gz'))}")
    if args.calibrate:
        print(f"  the method against itself (--calibrate, should be 1.00): {calibrate(make_bare, args.slice):.2f}")
    print(f"BFD fill at {manifest['seq_len']}: {counts['tokens'] / (counts['sequences'] * manifest['seq_len']):.3%}  "
          f"(goal >= 99.8%)")
    print(f"tokens kept: {counts['tokens'] / input_tokens:.3%} ({counts['split']} documents split, none truncated or "
          f"dropped); encoder fallbacks: {counts['encoder_fallbacks']}  (goal 100%)")
    for kind in runs:
        rss = max(runs[kind], key=lambda run: max(mb for _, mb in run["rss"]))["rss"]
        quarters = [max(mb for t, mb in rss if t <= rss[-1][0] * q / 4) for q in (1, 2, 3, 4)]
        print(f"peak RSS of prep build ({kind}): {quarters[-1]:.0f} MB; peak by the end of each quarter of the run: "
              + ", ".join(f"{mb:.0f}" for mb in quarters) + " MB  (goal <= 1024, flat)")


if __name__ == "__main__":
    main()
