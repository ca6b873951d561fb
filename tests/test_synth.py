"""Tests for scripts/synth.py (synthetic smoltalk2-Mid rows) and the shipped sample, measured with prep's encoder.

Run: .venv/bin/python -m pytest -q tests/test_synth.py
"""

import gzip
import json
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import make_sample  # noqa: E402
import synth  # noqa: E402

SAMPLE_DIR = ROOT / "prep" / "sample"


def content_tokens(encoder, row: dict) -> int:
    return sum(len(encoder.encode(m["content"])) for m in row["messages"])


def read_sample(kind: str) -> list[dict]:
    with gzip.open(SAMPLE_DIR / f"{kind}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("kind", ["nemotron", "ot3"])
def test_same_seed_same_rows(kind):
    a = list(synth.rows(kind, num_rows=20, seed=7))
    b = list(synth.rows(kind, num_rows=20, seed=7))
    c = list(synth.rows(kind, num_rows=20, seed=8))
    assert a == b
    assert a != c


@pytest.mark.parametrize("kind,source", [
    ("nemotron", "Llama_Nemotron_Post_Training_Dataset_reasoning_r1"),
    ("ot3", "OpenThoughts3_1.2M"),
])
def test_schema(kind, source):
    for row in synth.rows(kind, num_rows=50, seed=1):
        assert set(row) == {"messages", "source"}
        assert row["source"] == source
        roles = [m["role"] for m in row["messages"]]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"])
        for m in row["messages"]:
            assert set(m) == {"role", "content"} and isinstance(m["content"], str) and m["content"]
        reply = row["messages"][-1]["content"]
        assert reply.startswith("<think>\n")
        assert reply.count("\n</think>\n\n") == 1


def test_row_token_counts_are_exact(encoder):
    """make_row's count is prep's encoder on the message contents, also for CRLF, look-alike and system rows."""
    rng, pool, seen = random.Random(0), synth.cached_pool(0), set()
    for _ in range(300):
        row, tokens = synth.make_row(rng, pool, "nemotron")
        assert tokens == content_tokens(encoder, row)
        text = "".join(m["content"] for m in row["messages"])
        seen |= {name for name, present in [("crlf", "\r\n" in text), ("system", row["messages"][0]["role"] == "system"),
                                            ("lookalike", any(s in text for s in ("<|", "im_end|>", "</think ")))] if present}
    assert seen == {"crlf", "system", "lookalike"}
    # why the counts add up: the pre-tokenizer cuts before any block, as none starts with whitespace
    assert all(not text[0].isspace() for pairs in pool.blocks.values() for text, _ in pairs)


def test_num_tokens_stops_at_the_row_that_crosses_it(encoder):
    rows = list(synth.rows("nemotron", num_tokens=50_000, seed=0))
    tokens = [content_tokens(encoder, row) for row in rows]
    assert sum(tokens[:-1]) < 50_000 <= sum(tokens)
    assert sum(1 for _ in synth.rows("ot3", num_rows=3, num_tokens=10**9)) == 3


@pytest.mark.parametrize("kind,mean", [("nemotron", 5_000), ("ot3", 12_000)])
def test_lengths_have_the_target_mean_and_a_long_tail(kind, mean):
    rng, pool = random.Random(1), synth.cached_pool(0)
    tokens = np.array([synth.make_row(rng, pool, kind)[1] for _ in range(2_000)])  # exact, by the test above
    assert abs(tokens.mean() / mean - 1) < 0.1
    assert 0.008 < np.mean(tokens > 32_768) < 0.025  # ~1.5% of rows do not fit one 32k sequence
    assert tokens.min() >= 400 and tokens.max() < 81_000


def test_vocabulary_is_varied(encoder):
    """Word-caching tokenizers would be flattered by a few thousand words repeated (the hand-written
    templates this replaced gave ~7.7k distinct words per 1M tokens)."""
    rows = list(synth.rows("nemotron", num_tokens=1_000_000, seed=3))
    words = {word for row in rows for m in row["messages"] for word in m["content"].split()}
    assert len(words) > 20_000


def test_unknown_kind():
    with pytest.raises(ValueError):
        next(synth.rows("nope", num_rows=1))


@pytest.mark.parametrize("name", ["x.jsonl", "x.jsonl.gz"])
def test_write_jsonl_roundtrip(tmp_path, name):
    rows = list(synth.rows("ot3", num_rows=5, seed=2))
    path = tmp_path / name
    assert synth.write_jsonl(path, iter(rows)) == 5
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == rows
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temp file left behind
    first = path.read_bytes()
    synth.write_jsonl(path, iter(rows))
    assert path.read_bytes() == first  # no time stamp in the gzip header


def test_shipped_sample_matches_regeneration(tmp_path):
    paths = make_sample.make_sample(tmp_path)
    assert sorted(paths) == ["nemotron", "ot3"]
    for kind, path in paths.items():
        shipped = SAMPLE_DIR / f"{kind}.jsonl.gz"
        # compare the text, not the .gz bytes: another zlib may compress the same text differently
        assert gzip.decompress(shipped.read_bytes()) == gzip.decompress(path.read_bytes()), (
            f"{shipped} is stale: run `python scripts/make_sample.py`")


@pytest.mark.parametrize("kind", ["nemotron", "ot3"])
def test_sample_has_rows_longer_than_32k_tokens(kind, encoder):
    rows = read_sample(kind)
    assert len(rows) == make_sample.ROWS
    assert sum(content_tokens(encoder, row) > 32_768 for row in rows) >= 3


@pytest.mark.parametrize("kind", ["nemotron", "ot3"])
def test_sample_has_every_feature(kind):
    rows = read_sample(kind)
    texts = ["".join(m["content"] for m in row["messages"]) for row in rows]
    assert all(row["messages"][-1]["content"].startswith("<think>\n") for row in rows)
    features = {"math": r"\\frac|\\\[", "code": r"```(python|cpp)\n", "crlf": r"\r\n", "CJK": r"[\u4e00-\u9fff]",
                "emoji": r"[\U0001F300-\U0001FAFF]", "combining mark": r"[\u0300-\u036f]",
                "special-token look-alike": r"<\||im_end\|>|</think "}
    for feature, pattern in features.items():
        assert any(re.search(pattern, text) for text in texts), f"no {feature} in the {kind} sample"
