"""Sources: where rows come from, read in batches of consecutive rows.

A source is a name (used in `--mix`) and a SPEC:
  - a hub dataset `id` or `id:config:split` (the presets below, or any other),
  - a local file, directory or glob of .jsonl, .jsonl.gz, .json, .parquet or .arrow files,
  - a local dataset directory laid out like a hub repo, as `DIR:config:split`.

Local files are read with pyarrow and the standard library; dataset repos (hub or local) with
`datasets` streaming. Either way memory stays flat whatever the size: parquet is read a batch of
rows at a time with Arrow's pre-buffering off, since pre-buffering keeps every compressed column
chunk it has read until the file ends, so memory would grow with the size of the input files;
and only the columns messages are made of (ROW_COLUMNS) are decoded.
JSON lines are parsed row by row, so one bad line (cut in half, not JSON, invalid UTF-8, a wrong
type) costs one counted row, not the build.

`read` is the first stage of a build: it yields `Batch`es, which the later stages fill in
(check.py: messages; render.py: text; tokenizer.py: ids; pack.py: the long-document policy).
"""

import glob
import gzip
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

HUB_PRESETS = {
    "nemotron": "HuggingFaceTB/smoltalk2:Mid:Llama_Nemotron_Post_Training_Dataset_reasoning_r1",
    "ot3": "HuggingFaceTB/smoltalk2:Mid:OpenThoughts3_1.2M",
}
SAMPLE_DIR = Path(__file__).parent / "sample"
BATCH_ROWS = 128  # rows per batch read: a few MB of text, so batches stay small while rows are long
# The only columns a row's messages come from (prep.check.to_messages): parquet's other columns
# (Nemotron's system_prompt, license, generator...) are never decompressed.
ROW_COLUMNS = ("messages", "conversations", "input", "output")
JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
DATA_SUFFIXES = (*JSON_SUFFIXES, ".parquet", ".arrow")
READ_BYTES = 1 << 20  # bytes of a JSON lines file read (or gunzipped) at a time
# A JSON escape of a UTF-16 surrogate; unpaired, it decodes to a str that is not valid Unicode.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


class Reject(Exception):
    """A row that can't become a document; args[0] is the reason counted in the manifest."""


@dataclass(frozen=True)
class Source:
    name: str
    spec: str


@dataclass
class Batch:
    """Consecutive rows of one source on their way through the stages; each stage fills in its part."""

    source: int  # index of the source in the build
    first_row: int  # row number, in the source, of the batch's first row
    num_rows: int
    table: pa.RecordBatch | None = None  # read: the rows as Arrow (parquet, arrow, dataset repos)
    lines: list | None = None  # read: JSON lines' rows, parsed (a dict or a Reject each)
    rejects: list = field(default_factory=list)  # check: (row in batch, reason), in row order
    rows: np.ndarray | None = None  # check: the rows in the batch that became documents
    messages: pa.ListArray | None = None  # check: their list<struct<role, content>>
    texts: pa.StringArray | None = None  # render: their ChatML text
    spans: tuple | None = None  # render: assistant spans as (document, start byte, end byte) arrays
    ids: np.ndarray | None = None  # encode: the ids of every document, concatenated
    starts: np.ndarray | None = None  # encode: document k is ids[starts[k]:ends[k]]
    ends: np.ndarray | None = None  # encode, and shortened by --long truncate
    masks: np.ndarray | None = None  # encode: loss mask aligned with ids (--loss-on assistant)
    encoded_by: np.ndarray | None = None  # encode: which encoder gave each document's ids (tokenizer.ENCODED...)
    cut: np.ndarray | None = None  # pack.long_documents: tokens --long truncate cuts off each document
    dropped: np.ndarray | None = None  # pack.long_documents: documents --long drop leaves out
    text_bytes: np.ndarray | None = None  # render: UTF-8 bytes of each text


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
        files = sorted(str(path) for path in Path(spec).rglob("*") if path.is_file())
    else:
        return None
    files = [path for path in files if path.endswith(DATA_SUFFIXES)]
    if not files:
        raise ValueError(f"--source {spec!r} holds no .jsonl, .jsonl.gz, .json, .parquet or .arrow file")
    kinds = {_kind(path) for path in files}
    if len(kinds) > 1:
        raise ValueError(f"--source {spec!r} mixes file kinds ({', '.join(sorted(kinds))}): give one kind per source")
    return files


def _kind(path: str) -> str:
    return "json" if path.endswith(JSON_SUFFIXES) else path.rsplit(".", 1)[1]


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


def num_rows(spec: str) -> int | None:
    """How many rows SPEC holds, when its metadata says so without reading it (parquet footers)."""
    files = local_files(spec)
    if not files or _kind(files[0]) != "parquet":
        return None
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(path).num_rows for path in files)


def read(spec: str, source: int = 0, start: int = 0) -> Iterator[Batch]:
    """Batches of consecutive rows of SPEC, from row `start` on (a resumed build skips the rows it
    has settled, unparsed)."""
    files = check_spec(spec)
    if files is None:
        tables = _dataset_tables(spec, start)
    elif _kind(files[0]) == "json":
        yield from _json_batches(files, source, start)
        return
    else:
        tables = _file_tables(files, _kind(files[0]), start)
    row = start
    for table in tables:
        yield Batch(source, row, table.num_rows, table=table)
        row += table.num_rows


def _file_tables(files: list[str], kind: str, start: int) -> Iterator[pa.RecordBatch]:
    """Record batches of BATCH_ROWS rows from local parquet or Arrow IPC files, skipping `start` rows."""
    import pyarrow.parquet as pq

    for path in files:
        try:
            if kind == "parquet":
                reader = pq.ParquetFile(path, pre_buffer=False)
                metadata = reader.metadata
                groups = list(range(metadata.num_row_groups))
                while groups and start >= (group_rows := metadata.row_group(groups[0]).num_rows):
                    start -= group_rows  # whole row groups before the resume point are never read
                    groups.pop(0)
                if not groups:
                    continue
                columns = [name for name in reader.schema_arrow.names if name in ROW_COLUMNS] or None
                batches = reader.iter_batches(batch_size=BATCH_ROWS, row_groups=groups, columns=columns, use_threads=False)
            else:
                batches = _ipc_batches(path)
            for table in batches:
                if start >= table.num_rows:
                    start -= table.num_rows
                    continue
                yield from _split(table.slice(start))
                start = 0
        except (OSError, pa.ArrowException) as error:
            raise _damaged(path, error) from None


def _ipc_batches(path: str) -> Iterator[pa.RecordBatch]:
    """An Arrow IPC stream (what `datasets` writes) or file, memory-mapped."""
    source = pa.memory_map(path)
    try:
        reader = pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(source)
        yield from (reader.get_batch(index) for index in range(reader.num_record_batches))
        return
    yield from reader


def _damaged(path: str, error: Exception) -> ValueError:
    reason = " ".join(str(error).split())  # one line: Arrow's messages end in a newline
    return ValueError(f"can't read {path}: {reason}; the file is cut short, damaged or not what its name says: "
                      "download it again, or leave it out of --source")


def _split(table: pa.RecordBatch) -> Iterator[pa.RecordBatch]:
    for offset in range(0, table.num_rows, BATCH_ROWS):
        yield table.slice(offset, BATCH_ROWS)


def _dataset_tables(spec: str, start: int) -> Iterator[pa.RecordBatch]:
    """A hub id[:config:split] or a local dataset repo, through `datasets` streaming."""
    import datasets

    repo, config, split = (spec.split(":") + [None, None])[:3]
    stream = datasets.load_dataset(repo, config, split=split or "train", streaming=True)
    for table in (stream.skip(start) if start else stream).with_format("arrow").iter(batch_size=BATCH_ROWS):
        yield from table.to_batches()


def _json_batches(files: list[str], source: int, start: int) -> Iterator[Batch]:
    """JSON lines parsed into dicts (or a Reject each), BATCH_ROWS rows a batch; blank lines are not rows."""
    row, items = 0, []
    for path in files:
        for raw in _raw_lines(path):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = None
            if line is not None and (not line or line.isspace()):
                continue
            row += 1
            if row <= start:
                continue
            items.append(Reject("invalid_utf8") if line is None else _parse(line, raw))
            if len(items) == BATCH_ROWS:
                yield Batch(source, row - len(items), len(items), lines=items)
                items = []
    if items:
        yield Batch(source, row - len(items), len(items), lines=items)


def _raw_lines(path: str) -> Iterator[bytes]:
    """The lines of a text file as bytes, ends left out, split as Python's text mode splits them
    (universal newlines, as `datasets` reads text: "\n", "\r\n" and a lone "\r" each end a line).
    Read as bytes a MB at a time and split on b"\n", then decoded line by line: cheaper than a
    TextIOWrapper over gzip (8 KB reads, its own line search, both under the GIL), and a line with
    bytes that aren't UTF-8 fails its strict decode (invalid_utf8) instead of being searched for a
    mark. A .gz that is cut short or not gzip is a ValueError naming the file (`_damaged`)."""
    pending: list[bytes] = []  # the start of a line that a later chunk ends
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as file:
            while chunk := file.read(READ_BYTES):
                *complete, last = chunk.split(b"\n")
                if complete:
                    if pending:
                        complete[0] = b"".join([*pending, complete[0]])
                        pending = []
                    for line in complete:
                        yield from _split_cr(line)
                if last:
                    pending.append(last)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise _damaged(path, error) from None
    if pending:
        yield from _split_cr(b"".join(pending))


def _split_cr(line: bytes) -> list[bytes]:
    if b"\r" not in line:
        return [line]
    parts = line.split(b"\r")
    return parts[:-1] if parts[-1] == b"" else parts  # "\r\n" ends one line, not two


def _parse(line: str, raw: bytes) -> dict | Reject:
    try:
        obj = json.loads(line)
    except ValueError:
        return Reject("bad_json")
    if not isinstance(obj, dict):
        return Reject("not_an_object")
    if b"\\u" in raw and SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(obj):
        return Reject("lone_surrogate")
    return obj


def _has_lone_surrogate(obj: dict) -> bool:
    """Whether a parsed JSON row holds a surrogate that no escape paired up (not valid Unicode, so
    no tokenizer can take it). Only JSON text can produce one: strings that come from Arrow were
    decoded from valid UTF-8, and invalid bytes in a JSON line are caught as invalid_utf8 above."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
