"""Benchmark `prep build` end to end against the bare encoder on the same rendered texts.

    .venv/bin/python scripts/bench_prep.py                 # 50M tokens (about 4 min on 2 cores)
    .venv/bin/python scripts/bench_prep.py --tokens 10e6   # quicker

It generates a corpus with realistic lengths (scripts/synth.py: Nemotron-like mean ~5k tokens,
OpenThoughts-like mean ~12k, ~1.5% beyond 32k) as two jsonl.gz files, then measures in one run:
  1. the bare encoder: the same ChatML texts, already rendered and in memory, encoded with the
     same tiktoken encoding on one thread per core (the tokenizer's own limit on this machine);
  2. `prep build --mix nemotron=0.5,ot3=0.5` on those files, as a subprocess, from the jsonl to
     finished shards (reading, parsing, rendering, tokenizing, packing, writing, hashing).
and prints the ratio (goal >= 0.85), BFD fill at 32k (goal >= 99.8%), tokens kept (goal 100%) and
peak RSS.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import synth  # noqa: E402


def make_corpus(work: Path, num_tokens: int) -> dict[str, Path]:
    """Half the tokens Nemotron-like, half OpenThoughts-like (estimated; rebuilt only when missing)."""
    paths = {}
    for kind in ("nemotron", "ot3"):
        path = work / f"{kind}-{num_tokens // 2}.jsonl.gz"
        if not path.exists():
            synth.write_jsonl(path, synth.rows(kind, num_tokens=num_tokens // 2 + 2_000_000, seed=1))
        paths[kind] = path
    return paths


def bare_encoder(encoder, paths: dict[str, Path], limit_docs: dict[str, int]) -> tuple[int, float]:
    """Tokens and seconds to encode the rendered texts with all cores, texts already in memory."""
    from prep.render import render
    from prep.sources import iter_rows, to_messages

    texts = []
    for kind, path in paths.items():
        for i, row in enumerate(iter_rows(str(path))):
            if i == limit_docs[kind]:
                break
            texts.append(render(to_messages(row))[0])
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        start = time.perf_counter()
        num_tokens = sum(len(ids) for ids in pool.map(encoder.encode, texts))
        seconds = time.perf_counter() - start
    return num_tokens, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=float, default=50e6, help="corpus size in tokens (default 50M)")
    parser.add_argument("--work", default=str(ROOT / "bench"), help="where the corpus and shards go")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    num_tokens = int(args.tokens)

    t = time.perf_counter()
    paths = make_corpus(work, num_tokens)
    print(f"corpus: {', '.join(f'{p.name} {p.stat().st_size / 1e6:.0f} MB' for p in paths.values())} "
          f"({time.perf_counter() - t:.0f} s)")

    out = work / "shards"
    cmd = [str(ROOT / ".venv/bin/prep"), "build", "--mix", "nemotron=0.5,ot3=0.5", "--overwrite", "--no-progress",
           "--source", f"nemotron={paths['nemotron']}", "--source", f"ot3={paths['ot3']}",
           "--max-tokens", str(num_tokens), "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    build_seconds = time.perf_counter() - start
    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["counts"]

    from prep.tokenize import load_encoder

    encoder = load_encoder(manifest["tokenizer"]["name"])
    docs_used = {s["name"]: s["rows_read"] for s in manifest["sources"]}
    bare_tokens, bare_seconds = bare_encoder(encoder, paths, docs_used)

    prep_rate = c["tokens"] / build_seconds
    bare_rate = bare_tokens / bare_seconds
    input_tokens = c["tokens"] + c["truncated_tokens"] + c["dropped_tokens"]
    print(f"machine: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB")
    print(f"bare encoder ({encoder.kind}, {os.cpu_count()} threads): {bare_tokens / 1e6:.1f} M tokens in "
          f"{bare_seconds:.1f} s = {bare_rate / 1e6:.2f} M tokens/s")
    print(f"prep build end to end: {c['tokens'] / 1e6:.1f} M tokens in {build_seconds:.1f} s = "
          f"{prep_rate / 1e6:.2f} M tokens/s (includes ~3 s start-up: imports and tokenizer load)")
    print(f"ratio prep / bare encoder: {prep_rate / bare_rate:.2f}  (goal >= 0.85)")
    print(f"BFD fill at {manifest['seq_len']}: {c['tokens'] / (c['sequences'] * manifest['seq_len']):.3%}  (goal >= 99.8%)")
    print(f"tokens kept: {c['tokens'] / input_tokens:.3%} ({c['split']} documents split, none truncated or dropped)"
          f"  (goal 100%)")
    print(f"peak RSS of prep build: {peak_rss_mb:.0f} MB")


if __name__ == "__main__":
    main()
