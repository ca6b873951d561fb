"""Shared fixtures: the SmolLM3 encoder (built offline once, cached), small generated corpora, and the
tests' own reader of shards (plain pyarrow, independent of prep.shards' reader)."""

import json
import os
import random
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pytest

# Hermetic: every run builds SmolLM3's tokenizer offline into its own cache, as a fresh machine does.
os.environ.setdefault("PREP_CACHE", tempfile.mkdtemp(prefix="prep-cache-"))

WORDS = ("the so we have Wait let me check again denominator équation naïve 中文 数学 😀 x^2 \\frac{1}{2} "
         "def return ( ) { } = + - 0 1 2 3 42 3.14 \n \n\n \t").split(" ")


def random_text(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choices(WORDS, k=num_words))


def smoltalk_row(rng: random.Random, i: int, num_words: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Question {i}: " + random_text(rng, 20)},
                         {"role": "assistant", "content": "<think>\n" + random_text(rng, num_words) + "\n</think>\n\nDone."}],
            "source": "test"}


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return str(path)


def read_shard(path) -> pa.Table:
    """One shard file as a table, read into memory with plain pyarrow (not memory-mapped: tests
    rewrite shards in place after reading them)."""
    with pa.OSFile(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


def read_rows(out_dir) -> list[dict]:
    """Every sequence of a build in manifest order: input_ids and loss_mask (None without one) as numpy
    arrays, doc_lens and doc_sources as lists."""
    manifest = json.loads((Path(out_dir) / "manifest.json").read_text())
    rows = []
    for info in manifest["shards"]:
        table = read_shard(Path(out_dir) / info["file"])
        ids = table["input_ids"].combine_chunks().flatten().to_numpy().reshape(len(table), -1)
        masks = (table["loss_mask"].combine_chunks().flatten().to_numpy().reshape(len(table), -1)
                 if "loss_mask" in table.column_names else [None] * len(table))
        for row_ids, lens, sources, mask in zip(ids, table["doc_lens"].to_pylist(), table["doc_sources"].to_pylist(),
                                                masks):
            rows.append({"input_ids": row_ids, "doc_lens": lens, "doc_sources": sources, "loss_mask": mask})
    return rows


@pytest.fixture(scope="session")
def encoder():
    from prep.tokenizer import load_encoder

    return load_encoder()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Two jsonl sources: 'a' (shorter docs, some > 1024 tokens) and 'b' (longer docs)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    a = write_jsonl(root / "a.jsonl", [smoltalk_row(rng, i, rng.randint(20, 600)) for i in range(160)])
    b = write_jsonl(root / "b.jsonl", [smoltalk_row(rng, i, rng.randint(100, 1500)) for i in range(120)])
    return {"a": a, "b": b}


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """The trainer's tests' shards: the real `prep build` of the embedded sample at seq_len 256 (a CPU step of
    the tiny model takes ~0.3 s), built once per session. A test module with its own `shards` uses that."""
    from prep.build import BuildConfig, build

    out = tmp_path_factory.mktemp("shards")
    build(BuildConfig(mix="nemotron=0.5,ot3=0.5", sample=True, out=str(out), seq_len=256, max_tokens=60_000,
                      overwrite=True, progress=False), log=lambda msg: None)
    return out


# The trainer's end-to-end tests: the tiny model on `shards`, one process in this one or N under torchrun.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
RUN = ["--model-config", "tiny", "--lr", "3e-3", "--warmup-ratio", "0.1", "--grad-accum", "2"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "train"]


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def train_cli(args: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "train"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "train"]
    out = subprocess.run(launcher + args, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def single_run(shards, tmp_path_factory) -> Path:
    """The reference of one process, run in this process: 8 steps of the tiny model, no checkpoint."""
    from train.__main__ import main

    output = tmp_path_factory.mktemp("single") / "run"
    os.environ["HF_HUB_OFFLINE"] = "1"
    assert main(["--shards", str(shards), *RUN, "--max-steps", "8", "--save-every", "0", "--output", str(output)]) == 0
    return output


@pytest.fixture(scope="session")
def fsdp_run(shards, tmp_path_factory) -> Path:
    """The reference of two processes: 8 FSDP2 steps over gloo, no checkpoint."""
    output = tmp_path_factory.mktemp("fsdp") / "run"
    train_cli(["--shards", str(shards), *RUN, "--max-steps", "8", "--save-every", "0", "--dist", "fsdp",
               "--output", str(output)], nproc=2)
    return output


# Disk-full tests: a real file system that fills up (mounting one needs root, as CI runs).
@contextmanager
def tmpfs(path: Path, size_mb: int):
    """A tmpfs of `size_mb` MiB mounted at `path` (created) for the block, then unmounted."""
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def ballast(disk: Path, leave_bytes: int = 0) -> Path:
    """disk/ballast, taking every free byte of the file system but `leave_bytes`."""
    stat = os.statvfs(disk)
    file = disk / "ballast"
    with open(file, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, stat.f_bavail * stat.f_frsize - leave_bytes)
    return file
