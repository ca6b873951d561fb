"""Schemas, file kinds, the hub path (exercised with a local dataset repo), the checks (Arrow and
Python paths alike) and ChatML rendering."""

import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prep.check import check, messages_array, to_messages
from prep.render import chatml
import prep.sources
from prep.sources import BATCH_ROWS, ROW_COLUMNS, Reject, local_files, read, resolve_sources


def iter_rows(spec: str) -> list:
    """Each row of SPEC through read and check, in row order: its (role, content) messages, or its Reject."""
    rows = []
    for batch in check(read(spec)):
        reasons = dict(batch.rejects)
        accepted = iter(batch.messages.to_pylist())
        for row in range(batch.num_rows):
            rows.append(Reject(reasons[row]) if row in reasons else [(m["role"], m["content"]) for m in next(accepted)])
    return rows

SMOLTALK = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}], "source": "s"}
NEMOTRON = {"input": [{"role": "user", "content": "2+2?"}], "output": "<think>\nadd\n</think>\n\n4",
            "system_prompt": "detailed thinking on", "reasoning": "on", "category": "math"}
OT3 = {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "<think>\nadd\n</think>\n\n4"}],
       "difficulty": 3, "source": "ai2-adapt-dev/openmath", "domain": "math"}


def test_three_schemas_give_the_same_conversation():
    want = [("user", "2+2?"), ("assistant", "<think>\nadd\n</think>\n\n4")]
    assert to_messages(SMOLTALK) == [("system", "Be brief.")] + want
    assert to_messages(NEMOTRON) == want  # system_prompt ("detailed thinking on") is dropped by design
    assert to_messages(OT3) == want


@pytest.mark.parametrize("row, reason", [
    ({}, "unknown_schema"),
    ({"messages": None}, "null_messages"),
    ({"messages": []}, "empty_messages"),
    ({"messages": "hi"}, "bad_messages_type"),
    ({"messages": ["hi"]}, "message_not_an_object"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown_role"),
    ({"messages": [{"role": 3, "content": "x"}]}, "bad_role_type"),
    ({"messages": [{"role": "user", "content": None}]}, "null_content"),
    ({"messages": [{"role": "user"}]}, "null_content"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, "bad_content_type"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "unknown_role"),
    ({"input": [{"role": "user", "content": "q"}], "output": None}, "null_content"),
])
def test_bad_rows_are_named(row, reason):
    with pytest.raises(Reject) as info:
        to_messages(row)
    assert info.value.args[0] == reason


def test_render_equals_apply_chat_template(encoder):
    from prep.tokenizer import load_hf_tokenizer

    hf = load_hf_tokenizer()
    messages = [dict(role=r, content=c) for r, c in to_messages(SMOLTALK)]
    messages.append({"role": "user", "content": "tricky <|im_end|> inside, 中文, \r\n\ttabs   "})
    texts, (documents, starts, ends) = chatml(messages_array([[(m["role"], m["content"]) for m in messages]] * 2),
                                              spans=True)
    text = texts[1].as_py()
    assert text == hf.apply_chat_template(messages, tokenize=False)
    ids = hf.apply_chat_template(messages, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert encoder.encode(text).tolist() == list(ids)
    assert not text.startswith("<|begin_of_text|>")
    assert documents.tolist() == [0, 1]  # spans are in UTF-8 bytes, within their document
    assert [text.encode()[start:end] for start, end in zip(starts, ends)] == ["<think>\nadd\n</think>\n\n4<|im_end|>".encode()] * 2


def test_lone_surrogates_are_rejected_paired_ones_kept(tmp_path):
    """JSON escapes can spell a surrogate no other one pairs up: not valid Unicode, so the row is
    rejected; a pair (an emoji written with ensure_ascii) and a quoted backslash are fine."""
    good = {"messages": [{"role": "user", "content": "emoji \U0001F600, path C:\\ud800"}]}
    bad = {"messages": [{"role": "user", "content": "ok"}], "source": "bad \ud800 tail"}
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (good, bad, good)))
    assert "\\ud83d\\ude00" in (tmp_path / "s.jsonl").read_text()  # the emoji is an escaped pair
    rows = list(iter_rows(str(tmp_path / "s.jsonl")))
    assert rows[0] == rows[2] == to_messages(good)
    assert isinstance(rows[1], Reject) and rows[1].args == ("lone_surrogate",)


def write_all_kinds(tmp_path):
    rows = [SMOLTALK, NEMOTRON, OT3]
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "rows.jsonl").write_text(lines)
    with gzip.open(tmp_path / "rows.jsonl.gz", "wt") as f:
        f.write(lines)
    table = pa.Table.from_pylist([SMOLTALK, SMOLTALK])
    pq.write_table(table, tmp_path / "rows.parquet")
    with pa.ipc.new_stream(str(tmp_path / "rows.arrow"), table.schema) as w:
        w.write_table(table)


@pytest.mark.parametrize("name, count", [("rows.jsonl", 3), ("rows.jsonl.gz", 3), ("rows.parquet", 2), ("rows.arrow", 2)])
def test_every_file_kind_streams(tmp_path, name, count):
    write_all_kinds(tmp_path)
    rows = list(iter_rows(str(tmp_path / name)))
    assert len(rows) == count
    assert rows[0] == to_messages(SMOLTALK)


@pytest.mark.parametrize("row", [NEMOTRON, OT3, SMOLTALK, {"id": 1, "text": "no messages"}])
def test_parquet_decodes_only_the_columns_messages_come_from(tmp_path, row):
    """Nemotron's system_prompt, OT3's difficulty, smoltalk2's source: never decompressed, and the
    rows give what the whole row gives (or the same reason)."""
    pq.write_table(pa.Table.from_pylist([row, row]), tmp_path / "rows.parquet")
    (batch,) = read(str(tmp_path / "rows.parquet"))
    assert batch.table.schema.names == ([name for name in row if name in ROW_COLUMNS] or list(row))
    try:
        expected = to_messages(row)
    except Reject as reject:
        expected = reject.args[0]
    assert [r.args[0] if isinstance(r, Reject) else r for r in iter_rows(str(tmp_path / "rows.parquet"))] == [expected] * 2


def test_directories_and_globs(tmp_path):
    (tmp_path / "d").mkdir()
    for i in range(3):
        (tmp_path / "d" / f"part-{i}.jsonl").write_text(json.dumps(SMOLTALK) + "\n")
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    assert len(local_files(str(tmp_path / "d"))) == 3
    assert len(list(iter_rows(str(tmp_path / "d")))) == 3
    assert len(list(iter_rows(str(tmp_path / "d" / "part-[01].jsonl")))) == 2
    with pytest.raises(ValueError, match="matches no file"):
        local_files(str(tmp_path / "nothing-*.jsonl"))
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.jsonl").write_text(json.dumps(SMOLTALK) + "\n")
    pq.write_table(pa.Table.from_pylist([SMOLTALK]), tmp_path / "mixed" / "b.parquet")
    with pytest.raises(ValueError, match="mixes file kinds"):
        list(iter_rows(str(tmp_path / "mixed")))


def test_broken_lines_are_counted_not_fatal(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_bytes(json.dumps(SMOLTALK).encode() + b"\n{\"messages\": [{\"role\n" + b"not json\n" + b"[1, 2]\n"
                     + b"\n" + b'{"messages": [{"role": "user", "content": "bad \xff byte"}]}\n'
                     + json.dumps(OT3).encode() + b"\n")
    rows = list(iter_rows(str(path)))
    reasons = [r.args[0] if isinstance(r, Reject) else "ok" for r in rows]
    assert reasons == ["ok", "bad_json", "bad_json", "not_an_object", "invalid_utf8", "ok"]


# Line ends of every kind, blank and whitespace-only lines (ASCII and not), invalid bytes next to a
# line end, a BOM, and separators that text mode does not split on (U+0085, U+2028).
AWKWARD = (b'{"a": 1}\r\n\r\n  \n{"b":\r"x"}\n\xe3\x80\n\xe3\x80\x80\n\xef\xbb\xbf{"c": 2}\r\r\n'
           b'\xc2\x85\xe2\x80\xa8{"d": "\xff"}\n\r\r{"e": 3}\n\n\n{"f": 4}\r')


@pytest.mark.parametrize("name", ["awkward.jsonl", "awkward.jsonl.gz"])
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 20])
def test_json_lines_split_and_decode_as_text_mode_does(tmp_path, monkeypatch, name, chunk):
    """Lines are read as bytes and split on b"\\n" (prep.sources._raw_lines), a chunk at a time:
    the rows must be those Python's text mode gives (universal newlines), whatever the chunk size,
    and a .gz may hold several gzip members."""
    path = tmp_path / name
    half = len(AWKWARD) // 2
    path.write_bytes(gzip.compress(AWKWARD[:half]) + gzip.compress(AWKWARD[half:]) if name.endswith(".gz") else AWKWARD)
    monkeypatch.setattr(prep.sources, "READ_BYTES", chunk)
    text_mode = io.TextIOWrapper(io.BytesIO(AWKWARD), encoding="utf-8", errors="surrogateescape")
    expected = []
    for line in text_mode:
        if not line.strip():
            continue  # a blank line is not a row
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # surrogateescape kept a byte that is not UTF-8
            expected.append("invalid_utf8")
            continue
        try:
            expected.append(to_messages(json.loads(line)) if isinstance(json.loads(line), dict) else "not_an_object")
        except ValueError:
            expected.append("bad_json")
        except Reject as reject:
            expected.append(reject.args[0])
    assert len(expected) == 8 and expected.count("invalid_utf8") == 2 and expected.count("bad_json") == 3
    assert [r.args[0] if isinstance(r, Reject) else r for r in iter_rows(str(path))] == expected


def test_a_noncharacter_is_text_in_every_file_kind(tmp_path):
    """U+10FFFE is valid UTF-8 (a noncharacter, not an error): JSON lines keep it as parquet does.
    (The text-mode reader marked bad bytes with it, so a row holding it was counted invalid_utf8.)"""
    row = {"messages": [{"role": "user", "content": "odd \U0010fffe char"}]}
    (tmp_path / "rows.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "rows.parquet")
    assert iter_rows(str(tmp_path / "rows.jsonl")) == iter_rows(str(tmp_path / "rows.parquet")) == [to_messages(row)]


def test_a_damaged_source_file_is_one_clear_error(tmp_path):
    """Cut short, overwritten in the middle, a wrong CRC, not the kind its name says: a ValueError that
    names the file (the CLI prints it as one line), not a traceback from gzip or Arrow."""
    rows = [SMOLTALK] * 500
    data = gzip.compress(b"".join(json.dumps(row).encode() + b"\n" for row in rows))
    crc = bytearray(data)
    crc[-8] ^= 0xFF  # the CRC in the gzip trailer
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "good.parquet", row_group_size=50)
    parquet = (tmp_path / "good.parquet").read_bytes()
    middle = len(parquet) // 2
    damaged = {"cut.jsonl.gz": data[: len(data) // 2], "plain.jsonl.gz": b"not gzip at all\n", "crc.jsonl.gz": bytes(crc),
               "cut.parquet": parquet[:middle], "zeroed.parquet": parquet[:middle] + bytes(2000) + parquet[middle + 2000:],
               "text.arrow": b"not arrow\n"}
    for name, content in damaged.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"can't read .*{name}: .*download it again"):
            list(read(str(tmp_path / name)))


def test_invalid_utf8_in_parquet_is_counted_not_fatal(tmp_path):
    """Arrow doesn't check the strings it reads from parquet; a bad one costs its row, not the build."""
    content = pa.array([b"fine", b"bad \xff byte", b"also fine"], pa.binary()).view(pa.string())
    element = pa.StructArray.from_arrays([pa.array(["user"] * 3), content], ["role", "content"])
    table = pa.table({"messages": pa.ListArray.from_arrays(pa.array([0, 1, 2, 3], pa.int32()), element)})
    pq.write_table(table, tmp_path / "bad.parquet")
    rows = list(iter_rows(str(tmp_path / "bad.parquet")))
    assert rows[0] == [("user", "fine")]
    assert isinstance(rows[1], Reject) and rows[1].args == ("invalid_utf8",)
    assert rows[2] == [("user", "also fine")]


def test_hub_path_with_a_local_dataset_repo(tmp_path):
    """`id:config:split` goes through datasets.load_dataset exactly as for the hub; here the repo is a local dir."""
    repo = tmp_path / "smoltalk2"
    (repo / "Mid").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([SMOLTALK] * 4), repo / "Mid" / "OpenThoughts3_1.2M-00000.parquet")
    pq.write_table(pa.Table.from_pylist([SMOLTALK] * 2), repo / "Mid" / "Other-00000.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: Mid\n  data_files:\n"
        "  - split: OpenThoughts3_1.2M\n    path: Mid/OpenThoughts3_1.2M-*.parquet\n"
        "  - split: Other\n    path: Mid/Other-*.parquet\n---\n")
    rows = list(iter_rows(f"{repo}:Mid:OpenThoughts3_1.2M"))
    assert len(rows) == 4 and rows[0] == to_messages(SMOLTALK)


def test_presets_and_unreachable_hub(monkeypatch):
    import prep.tokenizer

    specs = {s.name: s.spec for s in resolve_sources(["nemotron", "ot3"], {}, sample=False)}
    assert specs == {"nemotron": "HuggingFaceTB/smoltalk2:Mid:Llama_Nemotron_Post_Training_Dataset_reasoning_r1",
                     "ot3": "HuggingFaceTB/smoltalk2:Mid:OpenThoughts3_1.2M"}
    monkeypatch.setattr(prep.tokenizer, "hub_reachable", lambda: False)
    with pytest.raises(ValueError, match="--source.*--sample"):
        list(iter_rows(specs["ot3"]))
    with pytest.raises(ValueError, match="unknown source 'foo'.*--source foo=SPEC"):
        resolve_sources(["foo"], {}, sample=False)


BAD_MESSAGES = [None, [], [None], [{"role": None, "content": "x"}], [{"role": "wizard", "content": "x"}],
                [{"role": "user", "content": None}], [{"role": "user", "content": "ok"}, {"role": "alien", "content": "x"}],
                [{"role": "user", "content": "ok"}, None], [{"role": "assistant", "content": ""}]]


@pytest.mark.parametrize("column, role_key, content_key", [("messages", "role", "content"),
                                                            ("conversations", "from", "value")])
def test_arrow_checks_reject_what_to_messages_rejects(tmp_path, column, role_key, content_key):
    """Parquet in the two list-of-struct schemas is checked by Arrow kernels: every row must be
    accepted or rejected, for the same reason, exactly as to_messages does it row by row."""
    import random

    rng = random.Random(2)
    roles = {"messages": ["user", "assistant", "system", "tool"], "conversations": ["human", "gpt", "system", "tool"]}
    values = []
    for i in range(300):
        if rng.random() < 0.3:
            messages = rng.choice(BAD_MESSAGES)
        else:
            messages = [{"role": rng.choice(roles[column]), "content": f"turn {i} {j} 中文"} for j in range(rng.randint(1, 4))]
        values.append(None if messages is None else
                      [None if m is None else {role_key: m["role"], content_key: m["content"]} for m in messages])
    pq.write_table(pa.table({column: values, "id": list(range(300))}), tmp_path / "rows.parquet", row_group_size=70)
    rows = iter_rows(str(tmp_path / "rows.parquet"))
    expected = []
    for value in values:
        try:
            expected.append(to_messages({column: value, "id": 0}))
        except Reject as reject:
            expected.append(reject.args[0])
    assert [r.args[0] if isinstance(r, Reject) else r for r in rows] == expected
    assert len({e for e in expected if isinstance(e, str)}) >= 5


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "arrow"])
def test_reading_from_a_row_equals_skipping_to_it(tmp_path, kind):
    """A resumed build reads a source from its settled row: whole row groups are skipped unread,
    and the rows from there on are those of a full read."""
    rows = [{"messages": [{"role": "user", "content": f"row {i}"}]} for i in range(3 * BATCH_ROWS + 17)]
    path = tmp_path / f"rows.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=100)
    else:
        table = pa.Table.from_pylist(rows)
        with pa.ipc.new_stream(str(path), table.schema) as writer:
            for batch in table.to_batches(max_chunksize=90):
                writer.write_batch(batch)
    full = [(batch.first_row, batch.num_rows) for batch in read(str(path))]
    assert sum(n for _, n in full) == len(rows) and [first for first, _ in full][0] == 0
    for start in (0, 1, 99, 100, 250, BATCH_ROWS, len(rows) - 1, len(rows)):
        batches = list(check(read(str(path), start=start)))
        assert not batches or batches[0].first_row == start
        got = [m for batch in batches for m in batch.messages.to_pylist()]
        assert [m[0]["content"] for m in got] == [f"row {i}" for i in range(start, len(rows))]
