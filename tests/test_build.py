"""End-to-end `prep build`: rows in, shards out; nothing lost, deterministic, readable by pyarrow and datasets."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from prep.build import BuildConfig, build
from prep.render import render
from prep.sources import iter_rows, to_messages

from conftest import read_rows, read_shard, smoltalk_row, write_jsonl

T = 1024


def expected_docs(encoder, path) -> list[np.ndarray]:
    return [encoder.encode(render(to_messages(row))[0]) for row in iter_rows(path)]


def run(tmp_path, name="out", **kw) -> tuple[dict, Path]:
    out = tmp_path / name
    kw.setdefault("seq_len", T)
    kw.setdefault("window", 16)
    kw.setdefault("rows_per_shard", 40)
    cfg = BuildConfig(out=str(out), progress=False, overwrite=True, **kw)
    return build(cfg, log=lambda m: None), out


def test_every_token_comes_back(tmp_path, encoder, corpus):
    manifest, out = run(tmp_path, mix="a=0.5,b=0.5", sources=corpus)
    rows = read_rows(out)
    want = {i: expected_docs(encoder, corpus[name]) for i, name in enumerate(["a", "b"])}
    used = {i: manifest["sources"][i]["documents"] for i in want}
    assert 0 < used[0] <= len(want[0]) and 0 < used[1] <= len(want[1])
    want_docs = [d for i in want for d in want[i][: used[i]]]

    pieces, piece_sources = [], Counter()
    for row in rows:
        assert sum(row["doc_lens"]) <= T
        assert (row["input_ids"][sum(row["doc_lens"]):] == manifest["pad_id"]).all()
        starts = np.cumsum([0] + row["doc_lens"])
        for a, b, s in zip(starts, starts[1:], row["doc_sources"]):
            pieces.append(row["input_ids"][a:b])
            piece_sources[s] += b - a
    # documents that fit come back whole, exactly once
    whole = Counter(p.tobytes() for p in pieces)
    for doc in want_docs:
        if len(doc) <= T:
            assert whole[doc.tobytes()] >= 1
            whole[doc.tobytes()] -= 1
    # and over everything, the multiset of tokens is exactly the input's
    assert Counter(np.concatenate(pieces).tolist()) == Counter(np.concatenate(want_docs).tolist())
    c = manifest["counts"]
    assert c["tokens"] == sum(len(d) for d in want_docs) == sum(piece_sources.values())
    assert c["padding"] == len(rows) * T - c["tokens"] and c["sequences"] == len(rows)
    assert c["split"] == sum(len(d) > T for d in want_docs) > 0
    assert c["pieces"] == len(pieces) and c["documents"] == len(want_docs)
    assert [piece_sources[i] for i in (0, 1)] == [s["tokens"] for s in manifest["sources"]]
    assert c["tokens"] / (len(rows) * T) > 0.9  # tiny 16-sequence windows here; bench_prep measures 32k fill


def test_shares_within_one_percent(tmp_path, corpus):
    manifest, _ = run(tmp_path, mix="a=0.7,b=0.3", sources=corpus)
    for s in manifest["sources"]:
        assert abs(s["achieved_share"] - s["requested_share"]) < 0.01
    assert manifest["stopped_by"] == "source 'a' ran out"
    capped, _ = run(tmp_path, "capped", mix="a=0.5,b=0.5", sources=corpus, max_tokens=50_000)
    assert 50_000 <= capped["counts"]["tokens"] < 50_000 + 2_500 and capped["stopped_by"] == "max_tokens"


def test_deterministic_whatever_the_workers(tmp_path, corpus):
    _, one = run(tmp_path, "one", mix="a=0.5,b=0.5", sources=corpus, workers=1)
    _, two = run(tmp_path, "two", mix="a=0.5,b=0.5", sources=corpus, workers=2)
    _, four = run(tmp_path, "four", mix="a=0.5,b=0.5", sources=corpus, workers=4)
    files = sorted(p.name for p in one.iterdir())
    assert files == sorted(p.name for p in two.iterdir()) == sorted(p.name for p in four.iterdir())
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes() == (four / name).read_bytes(), name


def test_long_policies_and_wrapped(tmp_path, corpus):
    split, _ = run(tmp_path, "split", mix="b=1", sources={"b": corpus["b"]})
    trunc, _ = run(tmp_path, "trunc", mix="b=1", sources={"b": corpus["b"]}, long="truncate")
    drop, out = run(tmp_path, "drop", mix="b=1", sources={"b": corpus["b"]}, long="drop")
    n_long = split["counts"]["split"]
    assert n_long > 0 and trunc["counts"]["truncated"] == drop["counts"]["dropped"] == n_long
    assert trunc["counts"]["tokens"] + trunc["counts"]["truncated_tokens"] == split["counts"]["tokens"]
    assert drop["counts"]["tokens"] + drop["counts"]["dropped_tokens"] == split["counts"]["tokens"]
    assert all(n <= T for row in read_rows(out) for n in row["doc_lens"])
    wrapped, out = run(tmp_path, "wrapped", mix="b=1", sources={"b": corpus["b"]}, packing="wrapped")
    rows = read_rows(out)
    assert wrapped["counts"]["tokens"] == split["counts"]["tokens"]
    assert all(sum(r["doc_lens"]) == T for r in rows[:-1])  # wrapped: every sequence full but the last


def test_loss_on_assistant(tmp_path, encoder):
    rows = [{"messages": [{"role": "user", "content": "What is 6*7? " * 3},
                          {"role": "assistant", "content": "<think>\nsix sevens\n</think>\n\n42"},
                          {"role": "user", "content": "  and again?"}, {"role": "assistant", "content": "\n  42 again"}]}] * 3
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    manifest, out = run(tmp_path, mix="qa=1", sources={"qa": path}, loss_on="assistant", seq_len=256)
    assert manifest["loss_mask"]
    row = read_rows(out)[0]
    n = row["doc_lens"][0]
    text = encoder.decode(row["input_ids"][:n][row["loss_mask"][:n] == 1])
    # the header's "\n" and the content's leading "\n" merge into one token that starts in the header: no loss
    assert text == "<think>\nsix sevens\n</think>\n\n42<|im_end|>  42 again<|im_end|>"
    assert (row["loss_mask"][sum(row["doc_lens"]):] == 0).all()


def test_bad_rows_are_counted_and_change_nothing_else(tmp_path, corpus):
    import random

    rng = random.Random(3)
    good = [smoltalk_row(rng, i, 50) for i in range(200)]
    bad = ['{"messages": []}', '{"messages": [{"role": "alien", "content": "x"}]}', "not json",
           '{"messages": [{"role": "user", "content": null}]}', '{"messages": [{"role": "user", "content": "\\ud800"}]}']
    mixed = good[:50] + bad[:2] + good[50:150] + bad[2:] + good[150:]
    clean, clean_out = run(tmp_path, "clean", mix="s=1", sources={"s": write_jsonl(tmp_path / "clean.jsonl", good)})
    dirty, dirty_out = run(tmp_path, "dirty", mix="s=1", sources={"s": write_jsonl(tmp_path / "dirty.jsonl", mixed)},
                           max_bad_frac=0.05)
    assert dirty["counts"]["rejected"] == {"bad_json": 1, "empty_messages": 1, "lone_surrogate": 1,
                                           "null_content": 1, "unknown_role": 1}
    assert dirty["sources"][0]["rejected_examples"][0] == {"row": 50, "reason": "empty_messages"}
    clean_shards, dirty_shards = sorted(clean_out.glob("shard-*")), sorted(dirty_out.glob("shard-*"))
    assert len(clean_shards) == len(dirty_shards)
    for a, b in zip(clean_shards, dirty_shards):  # same sequences; only the build id in the metadata differs
        assert read_shard(a).equals(read_shard(b))
    with pytest.raises(ValueError, match="max-bad-frac"):
        run(tmp_path, "strict", mix="s=1", sources={"s": str(tmp_path / "dirty.jsonl")}, max_bad_frac=0.01)


def test_shards_open_with_datasets_and_manifest_is_complete(tmp_path, corpus):
    import datasets

    manifest, out = run(tmp_path, mix="a=0.5,b=0.5", sources=corpus)
    ds = datasets.Dataset.from_file(str(out / manifest["shards"][0]["file"]))
    assert len(ds) == manifest["shards"][0]["rows"] and len(ds[0]["input_ids"]) == T
    assert ds.features["input_ids"].length == T
    assert set(manifest["counts"]) >= {"sequences", "documents", "tokens", "padding", "split", "truncated",
                                       "dropped", "rejected"}
    assert manifest["tokenizer"]["fingerprint"].startswith("sha256:") and manifest["tokenizer"]["vocab_size"] == 128256
    assert manifest["settings"]["seq_len"] == T and manifest["pad_id"] == 128004
    assert sum(s["rows"] for s in manifest["shards"]) == manifest["counts"]["sequences"]
    assert not list(out.glob("*.tmp"))


def test_settings_are_checked_before_work(tmp_path):
    bad = [dict(mix="a=1", sources={"b": "x.jsonl"}), dict(mix="a=1", seq_len=4), dict(mix="a=1", packing="zigzag"),
           dict(mix="a=1", max_tokens=0), dict(mix="foo=1")]
    for kw in bad:
        with pytest.raises(ValueError):
            build(BuildConfig(out=str(tmp_path / "never"), progress=False, **kw))
    assert not (tmp_path / "never").exists()
