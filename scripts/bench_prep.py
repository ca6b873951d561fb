"""Benchmark `prep build` end to end against the bare encoder on the same rendered texts.

    .venv/bin/python scripts/bench_prep.py                  # 200M tokens, 3 runs (about 13 min on 2 cores)
    .venv/bin/python scripts/bench_prep.py --tokens 50e6    # the smallest size the goal is set at (about 5 min)
    .venv/bin/python scripts/bench_prep.py --tokens 10e6 --repeats 1 --calibrate   # quick, and checks the method
    .venv/bin/python scripts/bench_prep.py --tokens 50e6 --repeats 4 --against ../old/.venv/bin/prep   # A/B two versions

It generates a corpus with realistic lengths (scripts/synth.py: Nemotron-like mean ~5k tokens,
OpenThoughts-like mean ~12k, ~1.5% beyond 32k) as parquet, the format the hub serves smoltalk2 in
(and, for comparison, as jsonl.gz), then measures in one run:
  1. `prep build --mix nemotron=0.5,ot3=0.5` on those files, as a subprocess, from the parquet
     to finished shards (start-up, reading, parsing, rendering, tokenizing, packing, writing,
     hashing), and a 1-document build: its fixed start-up cost;
  2. the bare encoder: the same ChatML texts, already rendered and in memory, encoded with the
     same tiktoken encoding on one thread per core (the tokenizer's own limit on this machine),
     both one call per text and one call per batch of texts as the build makes them
     (Encoder.encode_batch); the faster of the two is the reference;
and prints the ratio (goal >= 0.85), BFD fill at 32k (goal >= 99.8%), tokens kept (goal 100%) and
peak RSS.

Why the two are interleaved in slices: the speed of this shared 2-core machine moves by up to 2x
within a minute, so a build and a bare run measured one after the other gave ratios from 0.48 to
1.36 for the same code. Instead, every --slice seconds the build is stopped (SIGSTOP), the bare
encoder runs for --slice seconds, and the build goes on (SIGCONT), so both see the same machine.
The build's time is the time it was running. The bare encoder's time in a slice is each thread's
span up to the end of its last call, so the idle wait for the slice's last call never counts
against it.
`--calibrate` checks the method: it slices a process that runs the bare encoder itself, which
should come out at 1.00 (it gave 0.93-1.05 here). Runs within one invocation agree within ~0.05,
but invocations minutes apart gave 0.76 and 0.88 for two versions that race as equals, because
the machine's slow moments don't slow the build and the bare encoder alike. To tell whether a change
to prep helps, race the two versions with `--against`: each build runs a slice while the other is
stopped, which compares like with like.

Why 200M tokens by default: the build's start-up (imports, of which `datasets` alone is ~0.9 s,
and loading the tokenizer) is a fixed ~1.7 s, which at 50M is 15-20% of the bare encoder's time
on 2 cores but nothing in a real build of billions of tokens. Both sizes are quoted in the README.
"""

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import synth  # noqa: E402


def make_corpus(work: Path, num_tokens: int, suffix: str) -> dict[str, Path]:
    """Half the tokens Nemotron-like, half OpenThoughts-like (estimated; made only when missing)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {}
    for kind in ("nemotron", "ot3"):
        path = work / f"{kind}-{num_tokens // 2}{suffix}"
        rows = synth.rows(kind, num_tokens=num_tokens // 2 + 2_000_000, seed=1)
        if path.exists():
            pass
        elif suffix == ".jsonl.gz":
            synth.write_jsonl(path, rows)
        else:  # row groups of 500 rows, as the hub's parquet files have small row groups too
            tmp = path.with_suffix(".tmp")
            with pq.ParquetWriter(tmp, pa.Table.from_pylist([next(synth.rows(kind, num_rows=1))]).schema) as w:
                batch = []
                for row in rows:
                    batch.append(row)
                    if len(batch) == 500:
                        w.write_table(pa.Table.from_pylist(batch))
                        batch = []
                if batch:
                    w.write_table(pa.Table.from_pylist(batch))
            tmp.rename(path)
        paths[kind] = path
    return paths


PREP = [str(ROOT / ".venv/bin/prep")]  # --prep replaces it, to compare another version on the same corpus


def prep_command(paths: dict[str, Path], num_tokens: int, out: Path) -> list[str]:
    return [*PREP, "build", "--mix", "nemotron=0.5,ot3=0.5", "--overwrite", "--no-progress",
            "--source", f"nemotron={paths['nemotron']}", "--source", f"ot3={paths['ot3']}",
            "--max-tokens", str(num_tokens), "--out", str(out)]


def text_batches(texts: list[str]) -> list[list[list[str]]]:
    """The texts grouped as the build groups documents for Encoder.encode_batch (one part each)."""
    from prep.build import batches

    return [batch for batch, _ in batches(([text] for text in texts), lambda doc: len(doc[0]))]


class BareEncoder:
    """The reference: the rendered texts in memory, encoded on one thread per core, in slices.
    Slices alternate between one call per batch (as the build calls it) and one call per text."""

    def __init__(self, encoder, texts: list[str]):
        self.workers = os.cpu_count()
        self.pool = ThreadPoolExecutor(self.workers)
        self.modes = {
            "batched": (encoder.encode_batch, itertools.cycle(text_batches(texts))),
            "per text": (lambda text: [encoder.encode(text)], itertools.cycle(texts)),
        }
        self.turns = itertools.cycle(self.modes)
        self.tokens, self.seconds = Counter(), Counter()  # per mode, since the last reset()

    def run_slice(self, seconds: float) -> None:
        """Keep every thread busy for about `seconds`, then let the calls still running finish.
        The slice's time is each thread's span from the start to the end of its last call,
        averaged over the threads: gaps between calls count, the idle tail at the end does not."""
        mode = next(self.turns)
        encode, work = self.modes[mode]

        def timed(item) -> tuple[int, int, float]:
            num_tokens = sum(len(ids) for ids in encode(item))
            return num_tokens, threading.get_ident(), time.perf_counter()

        start = time.perf_counter()
        deadline, running, last_end = start + seconds, set(), {}
        while True:
            while len(running) < 2 * self.workers and time.perf_counter() < deadline:
                running.add(self.pool.submit(timed, next(work)))
            if not running:
                break
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                num_tokens, thread, end = future.result()
                self.tokens[mode] += num_tokens
                last_end[thread] = max(end, last_end.get(thread, end))
        self.seconds[mode] += sum(end - start for end in last_end.values()) / self.workers

    def rates(self) -> dict[str, float]:
        """Tokens/s per mode, over the slices since the last reset()."""
        return {mode: self.tokens[mode] / self.seconds[mode] for mode in self.modes if self.seconds[mode]}

    def reset(self) -> None:
        self.tokens.clear()
        self.seconds.clear()


def run_sliced(cmd: list[str], bare: BareEncoder, slice_s: float, log: Path, ready_line: bool = False):
    """Run cmd, stopping it every slice_s seconds of its running for a slice of the bare encoder.
    Returns the process, its running seconds and its peak RSS (MB). With ready_line, the clock
    starts when the process prints its first line (--calibrate's child, after loading its texts)."""
    import psutil

    proc = subprocess.Popen(cmd, stderr=log.open("w"), stdout=subprocess.PIPE if ready_line else None, text=True)
    if ready_line:
        proc.stdout.readline()
    running, peak = 0.0, 0
    while True:
        start = time.perf_counter()
        while proc.poll() is None and time.perf_counter() - start < slice_s:
            try:  # the build's memory is flat, not spiky: a sample every ~5 ms is plenty
                peak = max(peak, psutil.Process(proc.pid).memory_info().rss)
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.005)
        running += time.perf_counter() - start
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGSTOP)
        bare.run_slice(slice_s)
        proc.send_signal(signal.SIGCONT)
    assert proc.returncode == 0, f"{cmd[:2]} failed ({proc.returncode}): {log.read_text()[-2000:]}"
    return proc, running, peak / 2**20


def sliced_build(paths, num_tokens, out: Path, bare: BareEncoder, slice_s: float) -> dict:
    """One `prep build`, sliced with the bare encoder: its manifest, running seconds, RSS, reference rate."""
    bare.reset()
    _, seconds, rss = run_sliced(prep_command(paths, num_tokens, out), bare, slice_s, out.with_name(out.name + ".log"))
    manifest = json.loads((out / "manifest.json").read_text())
    return {"manifest": manifest, "seconds": seconds, "rss": rss, "rates": bare.rates()}


def bare_child(texts_path: str) -> None:
    """--calibrate's child: the bare encoder on the texts, batched, as fast as it goes; prints the tokens."""
    from prep.tokenizer import load_encoder
    import pyarrow as pa

    encoder = load_encoder()
    work = text_batches(pa.ipc.open_file(texts_path).read_all().column(0).to_pylist())
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        print("ready", flush=True)
        print(sum(len(ids) for docs in pool.map(encoder.encode_batch, work) for ids in docs), flush=True)


def calibrate(texts: list[str], bare: BareEncoder, work: Path, slice_s: float) -> float:
    """The ratio the method gives for the bare encoder against itself (should be 1.00)."""
    import pyarrow as pa

    path = work / "bench-texts.arrow"
    table = pa.table({"text": texts})
    with pa.ipc.new_file(path, table.schema) as writer:
        writer.write_table(table)
    bare.reset()
    proc, seconds, _ = run_sliced([sys.executable, __file__, "--bare-child", str(path)], bare, slice_s,
                                  work / "calibrate.log", ready_line=True)
    num_tokens = int(proc.stdout.readline())
    path.unlink()
    return num_tokens / seconds / max(bare.rates().values())


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
            proc.send_signal(signal.SIGCONT)
            start = time.perf_counter()
            while proc.poll() is None and (alone or time.perf_counter() - start < slice_s):
                time.sleep(0.002)
            running[name] += time.perf_counter() - start
            if proc.poll() is None:
                proc.send_signal(signal.SIGSTOP)
    failed = {name: proc.returncode for name, proc in procs.items() if proc.returncode}
    assert not failed, f"builds failed: {failed}"
    return running


def compare(other: str, paths: dict[str, Path], num_tokens: int, work: Path, repeats: int, slice_s: float) -> None:
    """--against: this prep and another, head to head on the parquet corpus; which one goes first alternates."""
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


def rendered_texts(paths: dict[str, Path], limit_docs: dict[str, int]) -> list[str]:
    """The ChatML texts of the rows the build used, in memory, for the bare encoder."""
    from prep.render import render
    from prep.sources import iter_rows, to_messages

    texts = []
    for kind, path in paths.items():
        for i, row in enumerate(iter_rows(str(path))):
            if i == limit_docs[kind]:
                break
            texts.append(render(to_messages(row))[0])
    return texts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=float, default=200e6, help="corpus size in tokens (default 200M)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the median is shown")
    parser.add_argument("--slice", type=float, default=1.0, help="seconds per slice of build / bare encoder")
    parser.add_argument("--calibrate", action="store_true", help="also slice the bare encoder against itself")
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
    num_tokens = int(args.tokens)

    t = time.perf_counter()
    paths = make_corpus(work, num_tokens, ".parquet")
    gz_paths = make_corpus(work, num_tokens, ".jsonl.gz")
    print(f"corpus: {', '.join(f'{p.name} {p.stat().st_size / 1e6:.0f} MB' for p in [*paths.values(), *gz_paths.values()])} "
          f"({time.perf_counter() - t:.0f} s)")

    if args.against:
        return compare(args.against, paths, num_tokens, work, args.repeats, args.slice)

    from prep.tokenizer import load_encoder

    # One plain build first: it says which rows the build takes (the bare encoder gets the same texts)
    # and warms the page cache for every run after it.
    out = work / "shards"
    subprocess.run(prep_command(paths, num_tokens, out), check=True, stderr=subprocess.DEVNULL)
    manifest = json.loads((out / "manifest.json").read_text())
    encoder = load_encoder(manifest["tokenizer"]["name"])
    texts = rendered_texts(paths, {s["name"]: s["rows_read"] for s in manifest["sources"]})
    bare = BareEncoder(encoder, texts)

    runs = {"parquet": [], "jsonl.gz": [], "start-up": []}
    for rep in range(args.repeats):
        runs["parquet"].append(sliced_build(paths, num_tokens, out, bare, args.slice))
        runs["jsonl.gz"].append(sliced_build(gz_paths, num_tokens, work / "shards-gz", bare, args.slice))
        runs["start-up"].append(sliced_build(paths, 1, work / "shards-tiny", bare, args.slice))  # one document

    def ratios(kind: str, minus_startup: bool = False) -> list[float]:
        """Per run: the build's tokens/s over the faster bare mode's tokens/s in the same run's slices."""
        out = []
        for run, startup in zip(runs[kind], runs["start-up"]):
            seconds = run["seconds"] - (startup["seconds"] if minus_startup else 0)
            out.append(run["manifest"]["counts"]["tokens"] / seconds / max(run["rates"].values()))
        return out

    def show(values: list[float]) -> str:
        return f"{statistics.median(values):.2f}" + (f" (runs: {', '.join(f'{v:.2f}' for v in values)})" if len(values) > 1 else "")

    manifest = runs["parquet"][-1]["manifest"]
    c = manifest["counts"]
    def median_seconds(kind: str) -> float:
        return statistics.median(run["seconds"] for run in runs[kind])

    rate = {mode: statistics.median(run["rates"][mode] for run in runs["parquet"]) for mode in bare.modes}
    input_tokens = c["tokens"] + c["truncated_tokens"] + c["dropped_tokens"]
    print(f"machine: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; "
          f"median of {args.repeats} runs each, build and bare encoder interleaved in {args.slice:g} s slices")
    print(f"bare encoder ({encoder.kind}, {bare.workers} threads, texts in memory): {rate['batched'] / 1e6:.2f} M tokens/s "
          f"called per batch (Encoder.encode_batch), {rate['per text'] / 1e6:.2f} M tokens/s called per text; "
          "in each run the faster is the reference")
    print(f"prep build, parquet -> shards: {c['tokens'] / 1e6:.1f} M tokens in {median_seconds('parquet'):.1f} s = "
          f"{c['tokens'] / median_seconds('parquet') / 1e6:.2f} M tokens/s")
    print(f"ratio prep / bare encoder, end to end: {show(ratios('parquet'))}  (goal >= 0.85)")
    print(f"  start-up (imports, tokenizer, opening sources; a 1-document build): {median_seconds('start-up'):.1f} s; "
          f"after it: ratio {show(ratios('parquet', minus_startup=True))}")
    print(f"  same corpus as jsonl.gz: ratio {show(ratios('jsonl.gz'))} (gunzip and JSON parsing share the same cores)")
    if args.calibrate:
        print(f"  the method against itself (--calibrate, should be 1.00): {calibrate(texts, bare, work, args.slice):.2f}")
    print(f"BFD fill at {manifest['seq_len']}: {c['tokens'] / (c['sequences'] * manifest['seq_len']):.3%}  (goal >= 99.8%)")
    print(f"tokens kept: {c['tokens'] / input_tokens:.3%} ({c['split']} documents split, none truncated or dropped)"
          f"  (goal 100%)")
    print(f"peak RSS of prep build: {max(r['rss'] for r in runs['parquet']):.0f} MB parquet, "
          f"{max(r['rss'] for r in runs['jsonl.gz']):.0f} MB jsonl.gz")


if __name__ == "__main__":
    main()
