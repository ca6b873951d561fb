"""Sources: where rows come from, and the three schemas they come in.

A source is a name (used in `--mix`) and a SPEC:
  - a hub dataset `id` or `id:config:split` (the presets below, or any other),
  - a local file, directory or glob of .jsonl, .jsonl.gz, .json, .parquet or .arrow files,
  - a local dataset directory laid out like a hub repo, as `DIR:config:split`.
Everything is read with `datasets` streaming (hub and local alike, one code path), so memory stays
flat whatever the size. JSON lines are read as text and parsed row by row, so one bad line
(cut in half, not JSON, invalid UTF-8, a wrong type) costs one counted row, not the build.

Each row is turned into a list of (role, content) messages by the schema it matches:
  - smoltalk2 `Mid`: `messages: [{role, content}]`
  - Llama-Nemotron-Post-Training raw: `input: [{role, content}]` + `output: str`. Its `system_prompt`
    ("detailed thinking on/off") is the dataset's reasoning switch, not content, and is dropped,
    as smoltalk2 did when it re-published these rows: the `<think>` block in `output` already
    says the answer is reasoned.
  - OpenThoughts3 raw: `conversations: [{from: human|gpt|system, value}]`
"""

import codecs
import glob
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

HUB_PRESETS = {
    "nemotron": "HuggingFaceTB/smoltalk2:Mid:Llama_Nemotron_Post_Training_Dataset_reasoning_r1",
    "ot3": "HuggingFaceTB/smoltalk2:Mid:OpenThoughts3_1.2M",
}
SAMPLE_DIR = Path(__file__).parent / "sample"
ROLES = ("system", "user", "assistant", "tool")
OT3_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
TABLE_ROWS = 128  # rows per Arrow table read from parquet, arrow and dataset repos
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".arrow")
# Bytes that are not UTF-8 decode to this noncharacter, so the row is counted as invalid_utf8.
INVALID_UTF8_MARK = "\U0010fffe"
codecs.register_error("prep-mark-invalid", lambda err: (INVALID_UTF8_MARK, err.end))
# A JSON escape of a UTF-16 surrogate; unpaired, it decodes to a str that is not valid Unicode.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


class Reject(Exception):
    """A row that can't become a document; args[0] is the reason counted in the manifest."""


@dataclass(frozen=True)
class Source:
    name: str
    spec: str


def sample_spec(name: str) -> str:
    path = SAMPLE_DIR / f"{name}.jsonl.gz"
    if not path.exists():
        raise ValueError(f"no embedded sample for source {name!r}; samples exist for: {', '.join(HUB_PRESETS)}")
    return str(path)


def resolve_sources(names: list[str], overrides: dict[str, str], sample: bool) -> list[Source]:
    """Source specs for the mix names: --source overrides, else --sample, else the hub preset."""
    sources = []
    for name in names:
        if name in overrides:
            spec = overrides[name]
        elif sample:
            spec = sample_spec(name)
        elif name in HUB_PRESETS:
            spec = HUB_PRESETS[name]
        else:
            raise ValueError(f"unknown source {name!r} in --mix: known presets are {', '.join(HUB_PRESETS)}; "
                             f"add others with --source {name}=SPEC")
        sources.append(Source(name, spec))
    return sources


def local_files(spec: str) -> list[str] | None:
    """The data files a local SPEC names (sorted), or None when SPEC is not a local path."""
    if any(ch in spec for ch in "*?["):
        files = sorted(glob.glob(spec, recursive=True))
        if not files:
            raise ValueError(f"--source glob {spec!r} matches no file")
    elif os.path.isfile(spec):
        files = [spec]
    elif os.path.isdir(spec) and not os.path.exists(os.path.join(spec, "README.md")):
        files = sorted(str(p) for p in Path(spec).rglob("*") if p.is_file())
    else:
        return None
    files = [f for f in files if f.endswith(DATA_SUFFIXES)]
    if not files:
        raise ValueError(f"--source {spec!r} holds no .jsonl, .jsonl.gz, .json, .parquet or .arrow file")
    return files


def check_spec(spec: str) -> list[str] | None:
    """Fail early on a SPEC that can't be read: the local files it names, or None for a dataset repo."""
    files = local_files(spec)
    if files is None:
        repo = spec.split(":")[0]
        if not os.path.isdir(repo):
            from prep.tokenizer import hub_reachable

            if not hub_reachable():
                raise ValueError(f"can't reach the Hugging Face hub for {repo!r}: pass local files with "
                                 "--source NAME=PATH, or use the embedded sample with --sample")
    return files


def open_stream(spec: str):
    """A streaming `datasets.IterableDataset` over SPEC, and whether its rows are raw JSON text lines."""
    import datasets

    files = check_spec(spec)
    if files is not None:
        kinds = {"text" if f.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")) else f.rsplit(".", 1)[1] for f in files}
        if len(kinds) > 1:
            raise ValueError(f"--source {spec!r} mixes file kinds ({', '.join(sorted(kinds))}): give one kind per source")
        kind = kinds.pop()
        extra = {"encoding_errors": "prep-mark-invalid"} if kind == "text" else {}
        return datasets.load_dataset(kind, data_files=files, split="train", streaming=True, **extra), kind == "text"
    repo, config, split = (spec.split(":") + [None, None])[:3]
    return datasets.load_dataset(repo, config, split=split or "train", streaming=True), False


def iter_rows(spec: str, start: int = 0) -> Iterator[dict | Reject]:
    """Every row of SPEC in order from row `start`, as a dict, or a Reject for a line that isn't a
    JSON object. Rows before `start` are skipped unparsed (a resumed build)."""
    stream, is_text = open_stream(spec)
    if not is_text:
        for table in _tables(stream.skip(start) if start else stream):
            try:
                yield from table.to_pylist()
            except UnicodeDecodeError:  # Arrow doesn't check strings read from parquet: find the bad rows
                yield from (_pylist_or_reject(table.slice(i, 1)) for i in range(table.num_rows))
        return
    row_number = 0
    for line in (line for table in _tables(stream) for line in table.column("text").to_pylist()):
        if not line.strip():
            continue  # blank lines are not rows in JSON lines
        row_number += 1
        if row_number <= start:
            continue
        if INVALID_UTF8_MARK in line:
            yield Reject("invalid_utf8")
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            yield Reject("bad_json")
            continue
        if not isinstance(obj, dict):
            yield Reject("not_an_object")
        elif "\\u" in line and SURROGATE_ESCAPE.search(line) and _has_lone_surrogate(obj):
            yield Reject("lone_surrogate")
        else:
            yield obj


def _has_lone_surrogate(obj: dict) -> bool:
    """Whether a parsed JSON row holds a surrogate that no escape paired up (not valid Unicode, so
    no tokenizer can take it). Only JSON text can produce one: strings that come from Arrow were
    decoded from valid UTF-8, and invalid bytes in a JSON line are caught as invalid_utf8 above."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _pylist_or_reject(row: "pyarrow.Table") -> dict | Reject:
    try:
        return row.to_pylist()[0]
    except UnicodeDecodeError:
        return Reject("invalid_utf8")


def _tables(stream):
    """The stream as Arrow tables of TABLE_ROWS rows: one conversion to Python per table costs 1.6-2.8x
    less CPU than `datasets` formatting row by row, and every CPU-second this thread spends is
    one the tokenizer threads don't get."""
    return stream.with_format("arrow").iter(batch_size=TABLE_ROWS)


def _message(role, content) -> tuple[str, str]:
    if not isinstance(role, str):
        raise Reject("bad_role_type")
    if role not in ROLES:
        raise Reject("unknown_role")
    if content is None:
        raise Reject("null_content")
    if not isinstance(content, str):
        raise Reject("bad_content_type")
    return role, content


def _message_list(value, key: str) -> list:
    if value is None:
        raise Reject(f"null_{key}")
    if not isinstance(value, list):
        raise Reject(f"bad_{key}_type")
    if not value:
        raise Reject(f"empty_{key}")
    if not all(isinstance(m, dict) for m in value):
        raise Reject("message_not_an_object")
    return value


def to_messages(row: dict) -> list[tuple[str, str]]:
    """(role, content) messages of a row in any of the three schemas; raises Reject."""
    if "messages" in row:
        return [_message(m.get("role"), m.get("content")) for m in _message_list(row["messages"], "messages")]
    if "conversations" in row:
        turns = _message_list(row["conversations"], "conversations")
        return [_message(OT3_ROLES.get(t.get("from"), t.get("from")), t.get("value")) for t in turns]
    if "input" in row and "output" in row:
        # Nemotron raw; system_prompt is dropped on purpose (module docstring).
        inputs = row["input"]
        if isinstance(inputs, str):  # some Nemotron splits store the prompt as a plain string
            inputs = [{"role": "user", "content": inputs}]
        messages = [_message(m.get("role"), m.get("content")) for m in _message_list(inputs, "input")]
        return messages + [_message("assistant", row["output"])]
    raise Reject("unknown_schema")
