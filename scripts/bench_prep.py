"""Benchmark `prep build` end to end against the bare encoder on the same rendered texts.

    .venv/bin/python scripts/bench_prep.py                 # 50M tokens, 3 repeats (about 3 min on 2 cores)
    .venv/bin/python scripts/bench_prep.py --tokens 10e6 --repeats 1   # quicker

It generates a corpus with realistic lengths (scripts/synth.py: Nemotron-like mean ~5k tokens,
OpenThoughts-like mean ~12k, ~1.5% beyond 32k) as parquet, the format the hub serves smoltalk2 in
(and, for comparison, as jsonl.gz), then measures in one run:
  1. the bare encoder: the same ChatML texts, already rendered and in memory, encoded with the
     same tiktoken encoding on one thread per core (the tokenizer's own limit on this machine),
     both one call per text and one call per batch of texts as the build makes them
     (Encoder.encode_batch); the faster of the two is the reference;
  2. `prep build --mix nemotron=0.5,ot3=0.5` on those files, as a subprocess, from the parquet
     to finished shards (reading, parsing, rendering, tokenizing, packing, writing, hashing).
and prints the ratio (goal >= 0.85), BFD fill at 32k (goal >= 99.8%), tokens kept (goal 100%) and
peak RSS.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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


def run_prep(paths: dict[str, Path], num_tokens: int, out: Path) -> tuple[dict, float, float]:
    """Manifest, wall seconds and peak RSS (MB) of one `prep build` subprocess."""
    cmd = [str(ROOT / ".venv/bin/prep"), "build", "--mix", "nemotron=0.5,ot3=0.5", "--overwrite", "--no-progress",
           "--source", f"nemotron={paths['nemotron']}", "--source", f"ot3={paths['ot3']}",
           "--max-tokens", str(num_tokens), "--out", str(out)]
    import psutil

    start = time.perf_counter()
    log = out.with_name(out.name + ".log")
    proc = subprocess.Popen(cmd, stderr=log.open("w"))
    peak = 0
    while proc.poll() is None:  # sampled every 20 ms: the build's memory is flat, not spiky
        try:
            peak = max(peak, psutil.Process(proc.pid).memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    assert proc.wait() == 0, f"prep build failed ({proc.returncode}): {log.read_text()[-2000:]}"
    return json.loads((out / "manifest.json").read_text()), seconds, peak / 2**20


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


def bare_encoder(encoder, texts: list[str], batched: bool) -> tuple[int, float]:
    """Tokens and seconds to encode texts already in memory with one thread per core: one call per
    text, or (batched) one call per CHUNK_CHARS characters of texts, as the build makes them."""
    from prep.build import batches

    work = list(batches(iter(texts), len)) if batched else [[text] for text in texts]
    encode = encoder.encode_batch if batched else (lambda batch: [encoder.encode(batch[0])])
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        start = time.perf_counter()
        num_tokens = sum(len(ids) for docs in pool.map(encode, work) for ids in docs)
        return num_tokens, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=float, default=50e6, help="corpus size in tokens (default 50M)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the median is shown")
    parser.add_argument("--work", default=str(ROOT / "bench"), help="where the corpus and shards go")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    num_tokens = int(args.tokens)

    t = time.perf_counter()
    paths = make_corpus(work, num_tokens, ".parquet")
    gz_paths = make_corpus(work, num_tokens, ".jsonl.gz")
    print(f"corpus: {', '.join(f'{p.name} {p.stat().st_size / 1e6:.0f} MB' for p in [*paths.values(), *gz_paths.values()])} "
          f"({time.perf_counter() - t:.0f} s)")

    from prep.tokenize import load_encoder

    runs = {"parquet": [], "jsonl.gz": [], "bare": [], "bare batched": [], "start-up": []}
    texts = encoder = None
    for rep in range(args.repeats):  # interleaved, so a slow moment of the machine hits all alike
        manifest, seconds, rss = run_prep(paths, num_tokens, work / "shards")
        runs["parquet"].append((seconds, rss))
        gz_manifest, seconds, rss = run_prep(gz_paths, num_tokens, work / "shards-gz")
        runs["jsonl.gz"].append((seconds, rss))
        _, seconds, _ = run_prep(paths, 1, work / "shards-tiny")  # one document: the fixed cost
        runs["start-up"].append((seconds, 0))
        if texts is None:
            encoder = load_encoder(manifest["tokenizer"]["name"])
            texts = rendered_texts(paths, {s["name"]: s["rows_read"] for s in manifest["sources"]})
        bare_tokens, seconds = bare_encoder(encoder, texts, batched=False)
        runs["bare"].append((seconds, 0))
        _, seconds = bare_encoder(encoder, texts, batched=True)
        runs["bare batched"].append((seconds, 0))
    seconds = {k: statistics.median(s for s, _ in v) for k, v in runs.items()}
    c = manifest["counts"]
    prep_rate = c["tokens"] / seconds["parquet"]
    # the reference is the faster way to call the tokenizer: one call per text, or batched as the build does
    bare_rate = bare_tokens / min(seconds["bare"], seconds["bare batched"])
    steady_rate = c["tokens"] / (seconds["parquet"] - seconds["start-up"])
    gz_rate = gz_manifest["counts"]["tokens"] / seconds["jsonl.gz"]
    input_tokens = c["tokens"] + c["truncated_tokens"] + c["dropped_tokens"]
    print(f"machine: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; "
          f"median of {args.repeats} runs each")
    print(f"bare encoder ({encoder.kind}, {os.cpu_count()} threads, texts in memory): {bare_tokens / 1e6:.1f} M tokens "
          f"in {seconds['bare']:.1f} s called per text, {seconds['bare batched']:.1f} s called per batch "
          f"(Encoder.encode_batch); the faster, {bare_rate / 1e6:.2f} M tokens/s, is the reference")
    print(f"prep build, parquet -> shards: {c['tokens'] / 1e6:.1f} M tokens in {seconds['parquet']:.1f} s = "
          f"{prep_rate / 1e6:.2f} M tokens/s")
    print(f"ratio prep / bare encoder, end to end: {prep_rate / bare_rate:.2f}  (goal >= 0.85)")
    print(f"  start-up (imports, tokenizer, opening sources; a 1-document build): {seconds['start-up']:.1f} s; "
          f"after it: {steady_rate / 1e6:.2f} M tokens/s, ratio {steady_rate / bare_rate:.2f}")
    print(f"  same corpus as jsonl.gz: {gz_rate / 1e6:.2f} M tokens/s, ratio {gz_rate / bare_rate:.2f} "
          "(gunzip and JSON parsing share the same 2 cores)")
    print(f"BFD fill at {manifest['seq_len']}: {c['tokens'] / (c['sequences'] * manifest['seq_len']):.3%}  (goal >= 99.8%)")
    print(f"tokens kept: {c['tokens'] / input_tokens:.3%} ({c['split']} documents split, none truncated or dropped)"
          f"  (goal 100%)")
    print(f"peak RSS of prep build: {max(r for _, r in runs['parquet']):.0f} MB parquet, "
          f"{max(r for _, r in runs['jsonl.gz']):.0f} MB jsonl.gz")


if __name__ == "__main__":
    main()
