"""Benchmark the readers of the shard format against sha256 over the same files, in one run.

    .venv/bin/python scripts/bench_shards.py                # 1 GB of 32k-token shards, 3 repeats
    .venv/bin/python scripts/bench_shards.py --gb 0.25 --repeats 5

Writes synthetic packed shards in the contract's schema (random documents, ids below the SmolLM3
vocabulary) and times, interleaved, with the files in the page cache:
  sha256        hashing every file (the reference: what --verify-hashes always cost)
  open          train.data.PackedShards without proving (--no-verify-hashes): memory-maps, reads the schema
  open+prove    PackedShards(verify_hashes=True) on one rank: sha256 and the row checks of every file
  verify --fast prep verify without sha256: the row checks alone, plus the totals
  inspect       prep inspect: reads doc_lens/doc_sources only
and Loader.build, the hot path, per 32k-token row. Prints seconds, GB/s and the ratio to sha256.
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prep.inspection import inspect  # noqa: E402
from prep.shards import FORMAT, FORMAT_VERSION, MANIFEST, schema, sha256_file  # noqa: E402
from prep.verify import verify  # noqa: E402
from train.data import Loader, PackedShards  # noqa: E402

SEQ_LEN, VOCAB, PAD = 32768, 128256, 128004
ROWS_PER_SHARD = 1024  # prep build's default: 128 MiB files


def write_build(out: Path, num_bytes: float, seed: int = 0) -> dict:
    """Shards of about `num_bytes` of input_ids in the contract's schema (rows of 1-6 random documents,
    then padding), and a manifest whose counts are what the rows hold."""
    rng = np.random.default_rng(seed)
    num_rows = max(1, int(num_bytes // (SEQ_LEN * 4)))
    shards, tokens, pieces, source_tokens = [], 0, 0, np.zeros(2, np.int64)
    for first in range(0, num_rows, ROWS_PER_SHARD):
        rows = min(ROWS_PER_SHARD, num_rows - first)
        ids = np.full((rows, SEQ_LEN), PAD, np.uint32)
        lens, sources = [], []
        for row in range(rows):
            cuts = np.sort(rng.integers(1, SEQ_LEN, rng.integers(0, 6)))
            row_lens = np.diff(np.concatenate([[0], cuts, [SEQ_LEN - rng.integers(0, 2000)]]))
            row_lens = row_lens[row_lens > 0]
            row_sources = rng.integers(0, 2, len(row_lens))
            used = int(row_lens.sum())
            ids[row, :used] = rng.integers(0, VOCAB, used, dtype=np.uint32)
            lens.append(row_lens.tolist())
            sources.append(row_sources.tolist())
            tokens, pieces = tokens + used, pieces + len(row_lens)
            source_tokens += np.bincount(row_sources, weights=row_lens, minlength=2).astype(np.int64)
        shard_schema = schema(SEQ_LEN, False)
        batch = pa.RecordBatch.from_arrays([
            pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), SEQ_LEN),
            pa.array(lens, pa.list_(pa.uint32())), pa.array(sources, pa.list_(pa.uint8()))], schema=shard_schema)
        path = out / f"shard-{len(shards):05d}.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, shard_schema) as writer:
            for offset in range(0, rows, 64):  # 64-row record batches, as prep build writes them
                writer.write_batch(batch.slice(offset, 64))
        shards.append({"file": path.name, "rows": rows, "sha256": sha256_file(path)})
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "seq_len": SEQ_LEN, "pad_id": PAD,
        "tokenizer": {"name": "synthetic", "vocab_size": VOCAB}, "loss_mask": False,
        "sources": [{"name": name, "tokens": int(source_tokens[index]), "documents": 0,
                     "achieved_share": int(source_tokens[index]) / tokens} for index, name in enumerate("ab")],
        "counts": {"sequences": num_rows, "tokens": tokens, "pieces": pieces, "documents": 0,
                   "padding": num_rows * SEQ_LEN - tokens},
        "shards": shards,
    }
    (out / MANIFEST).write_text(json.dumps(manifest))
    return manifest


def run(out: Path, gb: float, repeats: int) -> None:
    """Write the build into `out`, then time every reader on it."""
    manifest = write_build(out, gb * 1e9)
    files = [out / entry["file"] for entry in manifest["shards"]]
    size = sum(path.stat().st_size for path in files)
    assert verify(out) == [], "the synthetic build must be sound"
    print(f"{len(files)} shards, {manifest['counts']['sequences']:,} rows of {SEQ_LEN:,} tokens, {size / 1e9:.2f} GB")

    readers = {
        "sha256": lambda: [sha256_file(path) for path in files],
        "open": lambda: PackedShards(str(out)),
        "open+prove": lambda: PackedShards(str(out), verify_hashes=True),
        "verify --fast": lambda: verify(out, fast=True),
        "inspect": lambda: inspect(out),
    }
    seconds = {name: [] for name in readers}
    for _ in range(repeats):
        for name, read in readers.items():
            started = time.perf_counter()
            read()
            seconds[name].append(time.perf_counter() - started)
    reference = statistics.median(seconds["sha256"])
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"  {name:14s} {median:7.3f} s  {size / median / 1e9:6.2f} GB/s  {median / reference:5.2f}x sha256")

    loader = Loader(PackedShards(str(out)), batch_size=8, grad_accum=1, rank=0, world_size=1, seed=0)
    steps = min(20, loader.steps_per_epoch)
    started = time.perf_counter()
    for step in range(steps):
        loader.build(step)
    per_row = (time.perf_counter() - started) / (steps * 8)
    print(f"  Loader.build   {per_row * 1e3:7.3f} ms per {SEQ_LEN:,}-token row")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="size of the input_ids to write, in GB")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    out = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    try:
        run(out, args.gb, args.repeats)
    finally:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
