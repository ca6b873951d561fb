"""Tests for scripts/synth.py (synthetic smoltalk2-Mid rows) and the shipped sample.

Run: .venv/bin/python -m pytest -q tests/test_synth.py   (~2 s)
"""

import gzip
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import make_sample  # noqa: E402
import synth  # noqa: E402

SAMPLE_DIR = ROOT / "prep" / "sample"
# Pessimistic chars per Llama-3 token: the generated text measures 3.2-3.7 overall
# (plain English prose alone is ~3.8; no row measured above 4.5), so a row with
# more than 5.0 * 32,768 chars surely has more than 32,768 tokens.
CONSERVATIVE_CHARS_PER_TOKEN = 5.0


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


def test_num_tokens_stops_early():
    # ~5k tokens per nemotron row: a 50k-token budget is a handful of rows.
    n = sum(1 for _ in synth.rows("nemotron", num_tokens=50_000, seed=0))
    assert 1 <= n < 60
    assert sum(1 for _ in synth.rows("ot3", num_rows=3, num_tokens=10**9)) == 3


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


def test_shipped_sample_matches_regeneration(tmp_path):
    paths = make_sample.make_sample(tmp_path)
    assert sorted(paths) == ["nemotron", "ot3"]
    for kind, path in paths.items():
        shipped = SAMPLE_DIR / f"{kind}.jsonl.gz"
        # compare the text, not the .gz bytes: another zlib may compress the same text differently
        assert gzip.decompress(shipped.read_bytes()) == gzip.decompress(path.read_bytes()), (
            f"{shipped} is stale: run `python scripts/make_sample.py`")


@pytest.mark.parametrize("kind", ["nemotron", "ot3"])
def test_sample_has_rows_longer_than_32k_tokens(kind):
    with gzip.open(SAMPLE_DIR / f"{kind}.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == make_sample.ROWS
    chars = [sum(len(m["content"]) for m in r["messages"]) for r in rows]
    long_rows = [c for c in chars if c / CONSERVATIVE_CHARS_PER_TOKEN > 32_768]
    assert len(long_rows) >= 3
