"""Shared fixtures: the SmolLM3 encoder (built offline once, cached) and small generated corpora."""

import json
import os
import random
import tempfile

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
