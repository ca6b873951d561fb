"""Hostile input: every bad row is counted under a named reason, and the good rows around it come out
exactly as from a clean file. tests/data/hostile.jsonl interleaves one good row before each of 46
bad rows (three schemas), then two good rows with special-token strings and an escaped NUL."""

import json
from collections import Counter
from pathlib import Path

import numpy as np

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prep.build import BuildConfig, build

from conftest import read_shard

HOSTILE = Path(__file__).parent / "data" / "hostile.jsonl"
# The reason each bad row (lines 2, 4, 6, ...) must be counted under, in file order.
EXPECTED = [
    "unknown_schema", "unknown_schema", "null_messages", "bad_messages_type", "bad_messages_type", "empty_messages",
    "message_not_an_object", "message_not_an_object", "message_not_an_object", "bad_role_type", "bad_role_type",
    "bad_role_type", "unknown_role", "unknown_role", "null_content", "null_content", "bad_content_type",
    "bad_content_type", "bad_content_type", "lone_surrogate", "lone_surrogate", "null_conversations",
    "empty_conversations", "bad_conversations_type", "unknown_role", "null_content", "bad_role_type",
    "bad_content_type", "null_content", "bad_content_type", "empty_input", "null_input", "unknown_role",
    "bad_input_type", "not_an_object", "not_an_object", "not_an_object", "bad_json", "bad_json", "bad_json",
    "bad_json", "bad_json", "bad_json", "invalid_utf8", "invalid_utf8", "invalid_utf8",
]
SETTINGS = dict(mix="h=1", seq_len=512, rows_per_shard=8, progress=False, max_bad_frac=1.0)


def test_every_bad_row_is_named_and_good_rows_are_untouched(tmp_path):
    lines = HOSTILE.read_bytes().split(b"\n")[:-1]
    assert len(lines) == 2 * len(EXPECTED) + 2 and len(set(EXPECTED)) >= 19
    manifest = build(BuildConfig(out=str(tmp_path / "dirty"), sources={"h": str(HOSTILE)}, **SETTINGS),
                     log=lambda m: None)
    source = manifest["sources"][0]
    assert source["rejected"] == dict(Counter(EXPECTED))
    assert source["rows_read"] == len(lines) and source["documents"] == len(lines) - len(EXPECTED)
    assert [e["row"] for e in source["rejected_examples"]] == [1, 3, 5, 7, 9]  # 0-based row numbers
    assert source["rejected_examples"][0]["reason"] == EXPECTED[0]

    good = [line for i, line in enumerate(lines) if i % 2 == 0 or i >= 2 * len(EXPECTED)]
    clean_path = tmp_path / "clean.jsonl"
    clean_path.write_bytes(b"\n".join(good) + b"\n")
    clean = build(BuildConfig(out=str(tmp_path / "clean"), sources={"h": str(clean_path)}, **SETTINGS),
                  log=lambda m: None)
    assert clean["counts"]["tokens"] == manifest["counts"]["tokens"]
    assert [s["rows"] for s in clean["shards"]] == [s["rows"] for s in manifest["shards"]]
    for a, b in zip(clean["shards"], manifest["shards"]):
        assert read_shard(tmp_path / "clean" / a["file"]).equals(read_shard(tmp_path / "dirty" / b["file"]))


def shard_documents(out: Path) -> list[list[int]]:
    """Every document (or piece) of a build, in shard order."""
    manifest = json.loads((out / "manifest.json").read_text())
    docs = []
    for info in manifest["shards"]:
        rows = read_shard(out / info["file"])
        for ids, lens in zip(rows["input_ids"].to_pylist(), rows["doc_lens"].to_pylist()):
            starts = np.cumsum([0] + lens)
            docs += [ids[start:end] for start, end in zip(starts, starts[1:])]
    return docs


def chatml(row: dict) -> str:
    """The row's ChatML, written out here (its messages as test_sources checks them per schema)."""
    from prep.check import to_messages

    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in to_messages(row))


def test_good_rows_get_tokenizers_ids(tmp_path, encoder):
    """Around the bad rows, every good row's document holds exactly `tokenizers`' ids of its ChatML."""
    build(BuildConfig(out=str(tmp_path / "o"), sources={"h": str(HOSTILE)}, **(SETTINGS | {"seq_len": 4096})),
          log=lambda m: None)
    good = [json.loads(line) for i, line in enumerate(HOSTILE.read_bytes().split(b"\n")[:-1])
            if i % 2 == 0 or i >= 2 * len(EXPECTED)]
    expected = Counter(tuple(encoder.backend.encode(chatml(row), add_special_tokens=False).ids) for row in good)
    assert Counter(map(tuple, shard_documents(tmp_path / "o"))) == expected


def test_a_row_no_encoder_can_encode_is_rejected_and_counted(tmp_path, monkeypatch):
    """If fastokens and then tokenizers both fail on a document, its row is rejected as untokenizable,
    named in the manifest, and the rows around it are built as usual."""
    from prep.tokenizer import Encoder

    def failing(real):
        def encode(self, texts, *rest):
            if any("UNENCODABLE" in text for text in texts):
                raise ValueError("no")
            return real(self, texts, *rest)
        return encode

    monkeypatch.setattr(Encoder, "_fast_batch", failing(Encoder._fast_batch))
    monkeypatch.setattr(Encoder, "_reference_one", lambda self, text: None)
    rows = [{"messages": [{"role": "user", "content": f"row {i}" + (" UNENCODABLE" if i == 3 else "")}]} for i in range(8)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    manifest = build(BuildConfig(out=str(tmp_path / "o"), sources={"h": str(path)}, **SETTINGS), log=lambda m: None)
    source = manifest["sources"][0]
    assert source["rejected"] == {"untokenizable": 1} and source["rejected_examples"] == [{"row": 3, "reason": "untokenizable"}]
    assert source["documents"] == 7 and source["rows_read"] == 8 and manifest["counts"]["encoder_fallbacks"] == 0


def test_special_token_strings_in_content_stay_special(tmp_path, encoder):
    """Documented choice: like apply_chat_template with the official tokenizer, `<|im_end|>` written inside
    content becomes special id 128012 (not escaped), so our ids equal the reference recipe's."""
    row = json.loads(HOSTILE.read_bytes().split(b"\n")[-2])
    path = tmp_path / "special.jsonl"
    path.write_text(json.dumps(row) + "\n")
    manifest = build(BuildConfig(out=str(tmp_path / "o"), sources={"h": str(path)}, **SETTINGS), log=lambda m: None)
    t = read_shard(tmp_path / "o" / manifest["shards"][0]["file"])
    n = t["doc_lens"][0].as_py()[0]
    ids = t["input_ids"][0].values.to_numpy()[:n].tolist()
    assert ids.count(128012) == 3  # two turn ends + one inside the user's content
    assert ids.count(128011) == 3 and 128000 in ids and 128001 in ids
    assert encoder.decode(ids).startswith("<|im_start|>user\nprint('<|im_end|>')")


def test_parquet_with_unexpected_schema_is_counted(tmp_path):
    path = tmp_path / "weird.parquet"
    pq.write_table(pa.table({"foo": [1, 2, 3], "bar": ["a", "b", "c"]}), path)
    with pytest.raises(ValueError, match=r"rejected 3 of 3 rows.*unknown_schema"):
        build(BuildConfig(out=str(tmp_path / "o"), sources={"h": str(path)}, **(SETTINGS | {"max_bad_frac": 0.5})),
              log=lambda m: None)


@pytest.mark.slow
def test_a_50_mb_row_is_packed_whole(tmp_path, encoder):
    """One 50 MB assistant message (generated here, not committed): split into pieces, nothing lost,
    and its ids, pieces put back together, are `tokenizers`' ids."""
    content = ("Wait, let me reconsider the integral once more. " * 1_100_000)[:50_000_000]
    path = tmp_path / "huge.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}]}))
        f.write("\n")
    manifest = build(BuildConfig(out=str(tmp_path / "o"), sources={"h": str(path)}, mix="h=1", progress=False),
                     log=lambda m: None)
    counts = manifest["counts"]
    assert counts["documents"] == 1 and counts["split"] == 1 and counts["rejected"] == {}
    assert counts["tokens"] > 10_000_000 and counts["pieces"] == -(-counts["tokens"] // 32768)
    pieces = shard_documents(tmp_path / "o")  # the full pieces in order, then the remainder
    expected = encoder.backend.encode(chatml({"messages": [{"role": "user", "content": "q"},
                                                          {"role": "assistant", "content": content}]}),
                                      add_special_tokens=False).ids
    assert sum(pieces, []) == expected and counts["encoder_fallbacks"] == 0
