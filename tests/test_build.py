"""End-to-end `prep build`: rows in, shards out; nothing lost, deterministic, readable by pyarrow and datasets."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from prep.build import BuildConfig, build

from conftest import read_rows, read_shard, smoltalk_row, write_jsonl

T = 1024


def chatml(messages: list[dict]) -> str:
    """The recipe's ChatML, written out here as the template reads (render.py must agree)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def expected_docs(encoder, path) -> list[np.ndarray]:
    """`tokenizers`' ids of each row's ChatML: the reference for what the build must write."""
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    return [np.array(encoder.backend.encode(chatml(row["messages"]), add_special_tokens=False).ids, np.uint32)
            for row in rows]


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


GENERATION_TEMPLATE = (  # the recipe's ChatML, with assistant content + <|im_end|> marked for transformers
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
)


def test_loss_on_assistant_equals_transformers_assistant_mask(tmp_path):
    """The loss mask against transformers' own: apply_chat_template(return_assistant_tokens_mask=True)
    with a template that wraps assistant content and its <|im_end|> in {% generation %}. They agree on
    every token but one kind, by design: a token that starts in the header and ends inside the
    content (the BPE merges the header's "\\n" with the content's leading newlines) gets loss from
    transformers (it holds a character of the content) and none from us (it doesn't start there)."""
    import random

    from prep.tokenizer import load_hf_tokenizer

    hf = load_hf_tokenizer()
    rng = random.Random(5)
    contents = ["<think>\nsix sevens\n</think>\n\n42", "\n  42 again", " leading space", "中文 答案 😀",
                "\n\n\nnewlines first", "<|im_end|> inside", "x", "tabs\there\n\n"]
    rows = []
    for i in range(40):
        turns = [{"role": "user", "content": f"Q{i}: " + rng.choice(["What is 6*7?", "  and again?", "中文?"])}]
        for _ in range(rng.randint(1, 3)):
            turns += [{"role": "assistant", "content": rng.choice(contents) + f" #{i}"},
                      {"role": "user", "content": rng.choice(["more", "\nwhy?"])}]
        rows.append({"messages": turns[:-1]})
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    manifest, out = run(tmp_path, mix="qa=1", sources={"qa": path}, loss_on="assistant", seq_len=256, window=4)
    assert manifest["loss_mask"] and manifest["counts"]["split"] == 0
    theirs = {}
    for row in rows:
        out_hf = hf.apply_chat_template(row["messages"], chat_template=GENERATION_TEMPLATE, tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=True)
        text = chatml(row["messages"])
        offsets = hf(text, add_special_tokens=False, return_offsets_mapping=True)
        assert offsets["input_ids"] == out_hf["input_ids"]
        content_starts, position = [], 0
        for m in row["messages"]:
            head = f"<|im_start|>{m['role']}\n"
            if m["role"] == "assistant":
                content_starts.append(position + len(head))
            position += len(head) + len(m["content"]) + len("<|im_end|>\n")
        assert position == len(text)
        theirs[tuple(out_hf["input_ids"])] = (np.array(out_hf["assistant_masks"]), offsets["offset_mapping"], content_starts)
    straddling = 0
    for shard_row in read_rows(out):
        for start, end in zip(np.cumsum([0] + shard_row["doc_lens"][:-1]), np.cumsum(shard_row["doc_lens"])):
            mask, offsets, content_starts = theirs.pop(tuple(shard_row["input_ids"][start:end].tolist()))
            ours = shard_row["loss_mask"][start:end]
            for position in np.flatnonzero(ours != mask):
                token_start, token_end = offsets[position]
                assert ours[position] == 0 and mask[position] == 1, position
                assert any(token_start < content < token_end for content in content_starts), position
                straddling += 1
        assert (shard_row["loss_mask"][sum(shard_row["doc_lens"]):] == 0).all()
    assert not theirs and straddling > 0  # every document found once; the one difference did occur


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


@pytest.mark.parametrize("total_from", ["max_tokens", "parquet row counts"])
def test_progress_shows_tokens_per_second_and_an_eta(tmp_path, corpus, monkeypatch, capsys, total_from):
    """On a terminal the bar shows tokens/s and, when the total is known, a percentage and an ETA:
    from --max-tokens, or estimated from the parquet footers' row counts."""
    import re
    import sys

    import pyarrow.parquet as pq

    sources = {}
    for name, path in corpus.items():
        sources[name] = str(tmp_path / f"{name}.parquet")
        pq.write_table(pa.Table.from_pylist([json.loads(line) for line in open(path)]), sources[name])
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    extra = {"max_tokens": 60_000} if total_from == "max_tokens" else {}
    build(BuildConfig(out=str(tmp_path / "out"), mix="a=0.5,b=0.5", sources=sources, seq_len=T, window=16,
                      progress=True, **extra), log=lambda m: None)
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert re.search(r"tok/s", bar) and re.search(r"\d+%", bar) and re.search(r"<\d\d:\d\d", bar), bar


def test_progress_estimate_from_row_counts(tmp_path):
    """Without --max-tokens the build ends when the first source runs out: the estimate is the
    total mixed by then, from each source's tokens per row so far."""
    from prep.build import Progress
    from prep.mix import SourceStats
    from prep.sources import Source

    progress = Progress(BuildConfig(progress=False), [Source("a", "x"), Source("b", "y")], {"a": 0.5, "b": 0.5},
                        [SourceStats(rows_read=10, tokens=1000), SourceStats(rows_read=50, tokens=1000)])
    progress.num_rows = [100, 1000]  # a: 10,000 tokens when it runs out; b: 20,000
    assert progress.estimate() == 20_000  # a runs out first, when the mix holds 10,000 / 0.5


def test_readers_start_at_once_and_read_further_ahead_only_while_the_tokenizer_loads():
    """A ReadAhead starts reading when it is made, not when first asked (every source reads while
    the tokenizer loads); it keeps `depth` batches ready, and while `warm_up()` holds it reads on,
    up to `warm_up_bytes` of text; either way the batches come out in order."""
    import threading
    import time

    from prep.build import ReadAhead
    from prep.sources import Batch

    def started(warm_up) -> tuple[list[int], ReadAhead]:
        produced = []

        def batches():
            for index in range(40):
                produced.append(index)
                yield Batch(0, index, 1, text_bytes=np.array([10]))

        stream = ReadAhead(batches(), depth=2, warm_up=warm_up, warm_up_bytes=100)
        deadline = time.time() + 5
        while time.time() < deadline:  # until the reader thread is blocked, its queue full
            before = len(produced)
            time.sleep(0.2)
            if len(produced) == before:
                break
        return produced, stream

    produced, stream = started(lambda: False)
    assert len(produced) == 2 + 1  # `depth` queued, one waiting for room, none asked for yet
    assert [batch.first_row for batch in stream] == list(range(40))
    assert next(stream, "the end") == "the end"

    loading = threading.Event()
    loading.set()
    produced, stream = started(loading.is_set)
    assert len(produced) == 10 + 1  # 100 bytes of 10-byte batches queued
    loading.clear()  # loaded: back to `depth`, so taking one batch reads no other
    assert next(stream).first_row == 0
    time.sleep(0.2)
    assert len(produced) == 11
    assert [batch.first_row for batch in stream] == list(range(1, 40))
    stream.close()


def test_while_the_tokenizer_loads_the_reader_furthest_behind_reads_next():
    """During the load each ReadAhead makes a batch only holding one of the shared turns (the load
    keeps a core to itself), and the turn goes to the reader furthest behind its warm-up by bytes:
    a source whose batches hold 3x the text of the other's, and which has the same share, reads
    one batch for the other's three, so both are as far along when the load ends (taking turns
    batch by batch, it read 3x the bytes); once the tokenizer has loaded, they read side by side."""
    import threading
    import time

    from prep.build import ReadAhead, Turns
    from prep.sources import Batch

    lock, busy, most, order = threading.Lock(), [0], [0], []
    batch_bytes = {0: 10, 1: 30}

    def batches(source: int):
        for index in range(12):
            with lock:
                busy[0] += 1
                most[0] = max(most[0], busy[0])
                order.append(source)
            time.sleep(0.02)  # reading, checking, rendering one batch
            with lock:
                busy[0] -= 1
            yield Batch(source, index, 1, text_bytes=np.array([batch_bytes[source]]))

    def read_both(loading: bool) -> int:
        busy[0] = most[0] = 0
        order.clear()
        turns = Turns(1)
        readers = [ReadAhead(batches(source), depth=12, warm_up=lambda: loading, warm_up_bytes=1000,
                             warm_up_turns=turns) for source in range(2)]
        for source, reader in enumerate(readers):
            assert [(batch.source, batch.first_row) for batch in reader] == [(source, row) for row in range(12)]
        return most[0]

    assert read_both(loading=True) == 1
    read = {0: 0, 1: 0}
    for source in order[:12]:  # while both have batches left: never more than a batch apart in bytes
        read[source] += batch_bytes[source]
        assert abs(read[0] - read[1]) <= 30, order
    assert order[:12].count(0) >= 8, order  # 9 of 12, give or take the start
    assert read_both(loading=False) == 2
