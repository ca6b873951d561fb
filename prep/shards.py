"""Shards: packed sequences -> Arrow IPC stream files, plus the manifest that makes them a build.

Layout of `--out DIR`: `shard-00000.arrow`, `shard-00001.arrow`, ... and `manifest.json` (and
`.prep-lock`, the build lock of prep/lock.py, which is no part of the data).
Each row of a shard is one packed sequence:
  input_ids   fixed_size_list<uint32>[seq_len]   tokens, padded with pad_id
  doc_lens    list<uint32>                       document (or piece) lengths from position 0
  doc_sources list<uint8>                        per document, an index into manifest["sources"]
  loss_mask   fixed_size_list<uint8>[seq_len]    only with --loss-on assistant
The IPC *stream* format is what `datasets.Dataset.from_file` reads, and `pa.memory_map` opens it
zero-copy. Every file is written as `*.tmp` and renamed when complete; the manifest is written
last, so a directory without one is not a build. A write that finds the disk full (ENOSPC, or
EDQUOT: over quota) removes its temp file and raises DiskFull, one line naming the file, the bytes
it needs and the bytes free; whatever was complete before stays as it was.
"""

import errno
import hashlib
import json
import os
import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:  # an import cycle otherwise: pack -> mix -> tokenizer -> shards (the fingerprint)
    from prep.pack import Sequence

FORMAT = "prep-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".prep-lock"
BATCH_ROWS = 64  # 64 x 32768 x 4 B = 8 MiB record batches
WRITE_AHEAD = 3  # jobs (record batches, a shard's end) the writer thread may be behind the build


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


BUILD_ID_KEY = "prep.build_id"  # schema metadata: which build wrote the shard


def schema(seq_len: int, loss_mask: bool, build_id: str | None = None) -> pa.Schema:
    """The Arrow schema of every shard: the contract between `prep build`, its readers and the
    trainer (module docstring). `build_id`, when given, goes into the schema metadata."""
    fields = [
        pa.field("input_ids", pa.list_(pa.uint32(), seq_len)),
        pa.field("doc_lens", pa.list_(pa.uint32())),
        pa.field("doc_sources", pa.list_(pa.uint8())),
    ]
    if loss_mask:
        fields.append(pa.field("loss_mask", pa.list_(pa.uint8(), seq_len)))
    # the build id in every shard lets verify and the trainer spot a shard from another build cheaply
    return pa.schema(fields, metadata={BUILD_ID_KEY: build_id} if build_id else None)


def build_id_of(shard_schema: pa.Schema) -> str:
    """The build id `schema()` wrote into a shard ("" when it has none)."""
    return (shard_schema.metadata or {}).get(BUILD_ID_KEY.encode(), b"").decode()


def manifest(*, build_id: str, seq_len: int, pad_id: int, tokenizer: dict, settings: dict, loss_mask: bool,
             stopped_by: str, sources: list[dict], packing: dict, shards: list[dict]) -> dict:
    """The manifest of a finished build. `sources` holds each source's name, spec and share and
    the counts of what it gave the build (prep.mix.SourceStats.to_dict()); `packing` the packer's
    sequences, pieces and split documents. Totals are derived here, so they always add up."""
    def total(key: str) -> int:
        return sum(source[key] for source in sources)

    total_tokens = total("tokens")
    rejected: dict[str, int] = {}
    for source in sources:
        for reason, count in source["rejected"].items():
            rejected[reason] = rejected.get(reason, 0) + count
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "build_id": build_id,
        "seq_len": seq_len,
        "pad_id": pad_id,
        "tokenizer": tokenizer,
        "settings": settings,  # without out/workers/progress: the same build is the same bytes wherever it is written
        "loss_mask": loss_mask,
        "stopped_by": stopped_by,
        "sources": [
            {"name": source["name"], "spec": source["spec"], "weight": source["share"],
             "requested_share": source["share"], "achieved_share": source["tokens"] / total_tokens,
             "rows_read": source["rows_read"], "documents": source["documents"], "tokens": source["tokens"],
             "rejected": dict(sorted(source["rejected"].items())),
             "rejected_examples": [{"row": row, "reason": why} for row, why in source["examples"]],
             "encoder_fallbacks": source["encoder_fallbacks"]}
            for source in sources
        ],
        "counts": {
            "sequences": packing["sequences"],
            "documents": total("documents"),
            "pieces": packing["pieces"],
            "tokens": total_tokens,
            "padding": packing["sequences"] * seq_len - total_tokens,
            "split": packing["split"],
            "truncated": total("truncated"),
            "truncated_tokens": total("truncated_tokens"),
            "dropped": total("dropped"),
            "dropped_tokens": total("dropped_tokens"),
            "rejected": dict(sorted(rejected.items())),
            "encoder_fallbacks": total("encoder_fallbacks"),
        },
        "shards": shards,
    }


def fingerprint(backend) -> str:
    """The tokenizer a build was made with, as the contract names it: sha256 over every (id, token)
    of a `tokenizers.Tokenizer`'s vocabulary and its special tokens. The manifest records it; the
    trainer and `prep show` refuse a tokenizer whose fingerprint differs."""
    vocab = sorted((token_id, token) for token, token_id in backend.get_vocab(with_added_tokens=True).items())
    specials = sorted(added.content for added in backend.get_added_tokens_decoder().values() if added.special)
    blob = json.dumps({"vocab": vocab, "special": specials}, ensure_ascii=False).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def unsafe_name(name) -> bool:
    """A manifest shard name that could leave the directory (`../x`, `/etc/x`, `a/b`): every reader refuses it."""
    return not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class DiskFull(Exception):
    """A write found no space left (ENOSPC) or the quota spent (EDQUOT). The message is one line."""


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(what: str, path: Path, needed: int) -> DiskFull:
    """The error for `what` (a shard, the resume state, the manifest) at `path`, which needs about
    `needed` bytes. Called once its temp file is gone, so the free space shown is what a rerun has."""
    try:
        free = f"{size(shutil.disk_usage(path.parent).free)} free"
    except OSError:
        free = "free space unknown"
    return DiskFull(f"disk full writing {what} {path}: it needs about {size(needed)}, {free}; free some space "
                    "(or raise the quota) and rerun the same command to resume")


def size(num_bytes: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes} bytes" if unit == "bytes" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024


@contextmanager
def atomic_file(path: Path, suffix: str = ".tmp"):
    """A binary file that appears at `path` whole or not at all: written beside it as path+suffix,
    fsynced, then renamed over `path`; on any failure the temp file is removed. Every manifest,
    resume state and cache file goes through it."""
    tmp = path.with_name(path.name + suffix)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj, suffix: str = ".tmp", what: str = "") -> None:
    """`obj` as indented JSON at `path`, atomically (atomic_file); DiskFull, naming it `what`, when
    the disk is full."""
    data = (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()
    try:
        with atomic_file(path, suffix) as f:
            f.write(data)
    except OSError as error:
        if is_disk_full(error):
            raise disk_full(what or "file", path, len(data)) from None
        raise


class HashingFile:
    """A file being written and its sha256 as it goes, so a shard is never read back to hash it."""

    def __init__(self, path: Path):
        self.file, self.digest = open(path, "wb"), hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    @property
    def closed(self) -> bool:
        return self.file.closed


def write(sequences: Iterator["Sequence"], writer: "ShardWriter") -> list[dict]:
    """The last stage: every sequence into shards; returns the shards' file, rows and sha256."""
    try:
        for sequence in sequences:
            writer.write(sequence)
        return writer.close()
    finally:
        writer.stop()


class ShardWriter:
    """Buffers sequences into record batches of BATCH_ROWS and rotates shards every `rows_per_shard`
    rows. Each shard is written as `*.tmp`, hashed while written, fsynced and renamed; a shard that
    finds the disk full is removed and raises DiskFull.

    The writing runs on a thread of its own ("prep-writer"), at most WRITE_AHEAD jobs behind the
    caller: copying pieces into rows, Arrow's IPC writer, sha256 and the file writes release the
    GIL, and a shard's fsync and its resume state (`on_shard`) no longer stall the build's main
    thread (they left both cores half idle for ~0.2 s at every shard). The hooks, which the build
    sets: `snapshot()` on the caller's thread when a shard's last row is handed over (what the
    resume state must hold at that point: the packer and mixer go on meanwhile), `on_shard(it)` on
    the writer thread once that shard is renamed, and `on_handover()` on the caller's thread after
    the hand-over (the build's preemption check). An error on the writer thread (DiskFull, or any
    other) is raised again on the caller's thread at its next call; jobs after it are dropped."""

    def __init__(self, out_dir: Path, seq_len: int, pad_id: int, loss_mask: bool, rows_per_shard: int,
                 build_id: str | None = None):
        self.out_dir, self.seq_len, self.pad_id = out_dir, seq_len, pad_id
        self.loss_mask, self.rows_per_shard = loss_mask, rows_per_shard
        self.schema = schema(seq_len, loss_mask, build_id)
        self.shards: list[dict] = []  # finished shards; a resumed build restores them
        self.snapshot = lambda: None
        self.on_shard = lambda snapshot: None
        self.on_handover = lambda: None
        self.buffer: list["Sequence"] = []
        self.rows_handed = 0  # rows of the current shard handed to the writer thread
        self.writer = None  # the current shard's Arrow writer (writer thread)
        self.jobs: Queue = Queue(WRITE_AHEAD)
        self.thread: threading.Thread | None = None
        self.failed: BaseException | None = None
        self.dropping = False  # stop(): skip what is left
        # One ids buffer for every batch: a fresh 8 MiB array per batch cost page faults (kernel time)
        # on every write. Reusing it is safe: write_batch copies the batch into the file before returning.
        self.ids_buffer = np.empty((BATCH_ROWS, seq_len), dtype=np.uint32)

    def write(self, sequence: "Sequence") -> None:
        self.buffer.append(sequence)
        if len(self.buffer) == BATCH_ROWS or self.rows_handed + len(self.buffer) == self.rows_per_shard:
            self._hand_over()

    def close(self) -> list[dict]:
        """Write what is buffered, finish the last shard and wait for all of it; the shards."""
        self._hand_over(last=True)
        self.drain()
        return self.shards

    def drain(self) -> None:
        """Wait until every job handed over is done; raise the writer thread's error, if any."""
        if self.thread is not None:
            self.jobs.join()
        self._raise_failure()

    def stop(self) -> None:
        """End the writer thread, dropping jobs not yet started (after an error, or a finished close)."""
        if self.thread is not None:
            self.dropping = True
            self.jobs.put(None)
            self.thread.join()
            self.thread = None

    def _hand_over(self, last: bool = False) -> None:
        if self.buffer:
            self._submit(self._write_batch, self.buffer)
            self.rows_handed += len(self.buffer)
            self.buffer = []
        if self.rows_handed and (self.rows_handed == self.rows_per_shard or last):
            self._submit(self._finish_shard, self.snapshot())
            self.rows_handed = 0
            self.on_handover()

    def _submit(self, job: Callable, argument) -> None:
        self._raise_failure()
        if self.thread is None:
            self.dropping = False
            self.thread = threading.Thread(target=self._work, daemon=True, name="prep-writer")
            self.thread.start()
        self.jobs.put((job, argument))

    def _raise_failure(self) -> None:
        if self.failed is not None:
            raise self.failed

    def _work(self) -> None:
        """The writer thread: jobs in order, until None; after an error, or once stopping, only counts them off."""
        while (item := self.jobs.get()) is not None:
            try:
                if self.failed is None and not self.dropping:
                    job, argument = item
                    job(argument)
            except BaseException as error:  # raised again on the caller's thread
                self.failed = error
            finally:
                self.jobs.task_done()
        self.jobs.task_done()

    def _write_batch(self, sequences: list["Sequence"]) -> None:
        with self._disk_full_removes_the_shard():
            if self.writer is None:
                self.tmp_path = self.out_dir / (shard_name(len(self.shards)) + ".tmp")
                self.sink = HashingFile(self.tmp_path)
                self.writer = pa.ipc.new_stream(pa.PythonFile(self.sink, mode="w"), self.schema)
                self.rows_in_shard = 0
            self.writer.write_batch(self._batch(sequences))
        self.rows_in_shard += len(sequences)

    def _finish_shard(self, snapshot) -> None:
        with self._disk_full_removes_the_shard():
            self.writer.close()
            self.sink.close()
        final = self.out_dir / shard_name(len(self.shards))
        os.replace(self.tmp_path, final)
        self.shards.append({"file": final.name, "rows": self.rows_in_shard, "sha256": self.sink.digest.hexdigest()})
        self.writer = None
        self.on_shard(snapshot)

    @contextmanager
    def _disk_full_removes_the_shard(self):
        try:
            yield
        except OSError as error:
            if not is_disk_full(error):
                raise
            try:
                self.sink.file.close()  # flushing what is left can fail again: the file goes anyway
            except OSError:
                pass
            self.tmp_path.unlink(missing_ok=True)
            self.writer = None
            bytes_per_row = self.seq_len * (4 + self.loss_mask)  # input_ids (+ loss_mask); doc_lens are noise
            raise disk_full("shard", self.out_dir / shard_name(len(self.shards)),
                            self.rows_per_shard * bytes_per_row) from None

    def _batch(self, sequences: list["Sequence"]) -> pa.RecordBatch:
        """One record batch: the pieces copied into padded rows, with their lengths and sources."""
        B, T = len(sequences), self.seq_len
        ids = self.ids_buffer[:B]
        ids.fill(self.pad_id)
        mask = np.zeros((B, T), dtype=np.uint8) if self.loss_mask else None
        pieces = [piece for sequence in sequences for piece in sequence]
        lens = np.array([len(piece.ids) for piece in pieces], dtype=np.uint32)
        offsets = np.r_[0, np.cumsum([len(sequence) for sequence in sequences])].astype(np.int32)
        for row, sequence in enumerate(sequences):
            position = 0
            for piece in sequence:
                end = position + len(piece.ids)
                ids[row, position:end] = piece.ids
                if mask is not None:
                    mask[row, position:end] = 1 if piece.mask is None else piece.mask
                position = end
            assert position <= T, "a packed sequence overflows seq_len"
        columns = [
            pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), T),
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(lens)),
            pa.ListArray.from_arrays(pa.array(offsets), pa.array([piece.source for piece in pieces], pa.uint8())),
        ]
        if mask is not None:
            columns.append(pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1)), T))
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)


# --- reading ---------------------------------------------------------------------------------------
# The one reader of the format: `prep inspect|show|verify|plot` and the trainer open manifests and
# shards only through the functions below, so every check is written once and no reader skips one.
# A failed check goes to `report(check, message, row=None)`. `prep verify` passes a report that
# collects, to list every problem of a build; every other reader passes none and stops at the
# first problem with one ValueError.

Report = Callable[..., None]
MANIFEST_KEYS = ("seq_len", "pad_id", "tokenizer", "sources", "counts", "shards")  # what readers use
# A stream writer closes with this marker; a file cut at a batch boundary reads fine without it.
END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"
NUMPY_TYPES = {pa.uint8(): np.uint8, pa.uint32(): np.uint32, pa.int32(): np.int32}


def read_manifest(out_dir: Path) -> dict:
    """The manifest of a build directory, checked. ValueError, one line that says what to do, when the
    directory or its manifest is missing, the manifest is not JSON, is another format or version, or
    lacks a key the readers use."""
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir} is not a directory; build shards with `prep build --out {out_dir}`")
    if not path.exists():
        raise ValueError(f"{out_dir} has no {MANIFEST}: it is not a finished build (rerun `prep build --out {out_dir}`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); rebuild with `prep build`") from None
    found = (manifest.get("format"), manifest.get("format_version")) if isinstance(manifest, dict) else (None, None)
    if found != (FORMAT, FORMAT_VERSION):
        raise ValueError(f"{path} is format {found[0]!r} v{found[1]}; this version reads {FORMAT!r} v{FORMAT_VERSION}: "
                         "rebuild the shards with this prep")
    for key in MANIFEST_KEYS:
        if key not in manifest:
            raise ValueError(f"{path} has no {key!r}; rebuild with `prep build`")
    return manifest


def refuse(where, out_dir) -> Report:
    """The report of a reader that stops at the first problem: a ValueError naming the file, the check
    and what failed, and pointing at `prep verify` for the whole list."""
    def report(check: str, message: str, row: int | None = None) -> None:
        at = "" if row is None else f" row {row}"
        raise ValueError(f"{where}{at}: {check}: {message}; `prep verify {out_dir}` lists every problem")
    return report


@dataclass
class ShardFile:
    """One shard as its build's manifest lists it: where the file is and what it must hold."""

    path: Path
    rows: int  # rows the manifest promises
    sha256: str
    first_row: int  # its first row counted across the build, as `prep show --seq` counts


def shard_files(out_dir, manifest: dict, report: Report | None = None) -> list[ShardFile | None]:
    """Every shard the manifest lists, in order, as a file inside `out_dir`. A name that could leave the
    directory (`../x`, `/etc/x`, `a/b`), that is listed twice or that names the manifest is reported
    as check "name" and comes back as None: it is never opened."""
    out_dir = Path(out_dir)
    report = report or refuse(out_dir / MANIFEST, out_dir)
    files, seen, first_row = [], set(), 0
    for entry in manifest["shards"]:
        name = entry.get("file")
        if unsafe_name(name):
            report("name", f"manifest names shard {name!r}, which is not a plain file name in {out_dir} "
                           "(it could point outside the directory); it is not read")
            files.append(None)
        elif name in seen or name == MANIFEST:
            report("name", f"manifest lists shard {name!r} twice or names itself as a shard; it is not read")
            files.append(None)
        else:
            seen.add(name)
            files.append(ShardFile(out_dir / name, entry.get("rows"), entry.get("sha256"), first_row))
        first_row += entry.get("rows", 0)
    return files


def iter_batches(shard: ShardFile, manifest: dict, columns: list[str] | None = None, check_hash: bool = False,
                 report: Report | None = None) -> Iterator[pa.RecordBatch]:
    """Record batches of one shard from a memory map: nothing is copied, and with `columns` only their
    pages are ever touched. On the way it checks what the manifest says of the file: that it exists,
    its sha256 (with `check_hash`), its schema, the build that wrote it, that it reads to the end of
    the stream, and its number of rows. A check that leaves nothing to read ends the batches; the
    others let them go on, so `prep verify` can check every row of a shard with a wrong hash."""
    report = report or refuse(shard.path, shard.path.parent)
    if not shard.path.is_file():
        report("missing", f"listed in the manifest but not in {shard.path.parent}")
        return
    if check_hash and (digest := sha256_file(shard.path)) != shard.sha256:
        report("sha256", f"{digest[:16]}... but the manifest says {str(shard.sha256)[:16]}...: the file changed "
                         "after the build")
    expected = schema(manifest["seq_len"], bool(manifest.get("loss_mask")))
    rows = 0
    try:
        with pa.memory_map(str(shard.path)) as source:
            reader = pa.ipc.open_stream(source)
            if not reader.schema.equals(expected):
                found = reader.schema.to_string(show_schema_metadata=False).replace("\n", ", ")
                needed = expected.to_string().replace("\n", ", ")
                report("schema", f"columns ({found}) don't match the manifest's seq_len {manifest['seq_len']} and "
                                 f"loss_mask {bool(manifest.get('loss_mask'))}, which need ({needed})")
                return
            written_by, ours = build_id_of(reader.schema), manifest.get("build_id", "")
            if written_by != ours:
                report("build", f"written by another build ({written_by[:23] or '(none)'}..., this manifest's is "
                                f"{ours[:23] or '(none)'}...)")
            for batch in reader:
                yield batch if columns is None else batch.select(columns)
                rows += batch.num_rows
            source.seek(max(0, source.size() - len(END_OF_STREAM)))
            if source.read(len(END_OF_STREAM)) != END_OF_STREAM:
                report("read", f"no end-of-stream marker after row {rows - 1}: the file was cut short or never closed")
    except (pa.ArrowException, OSError) as error:
        report("read", f"unreadable after {rows} rows ({error}): truncated or corrupt", rows)
    if rows != shard.rows:
        report("rows", f"{rows} rows but the manifest says {shard.rows}")


def as_numpy(array: pa.Array) -> np.ndarray:
    """Zero-copy numpy view of a primitive array's values, honouring a slice's offset. (pyarrow's
    to_numpy imports pandas, +0.4 s per process.)"""
    dtype = np.dtype(NUMPY_TYPES[array.type])
    return np.frombuffer(array.buffers()[1], dtype, count=len(array), offset=array.offset * dtype.itemsize)


def list_parts(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values, per-row offsets starting at 0) of a list column such as doc_lens: row r's entries are
    values[offsets[r]:offsets[r + 1]]. Zero-copy."""
    offsets = as_numpy(column.offsets)
    return as_numpy(column.flatten()), offsets - offsets[0]


def fixed_rows(column: pa.Array) -> np.ndarray:
    """[rows, seq_len] zero-copy view of a fixed-size list column (input_ids, loss_mask)."""
    return as_numpy(column.flatten()).reshape(len(column), column.type.list_size)


def row_faults(batch: pa.RecordBatch, manifest: dict) -> Iterator[tuple[str, np.ndarray, Callable[[int], str]]]:
    """The row checks of one record batch, vectorised: for each check, which rows fail it (one bool
    per row) and what is wrong with a failing row. A sound row has no nulls, as many doc_sources as
    doc_lens entries, every doc_lens entry > 0 and their sum <= seq_len, pad_id after its documents,
    every id < vocab_size, every doc_sources index naming a manifest source, and a 0/1 loss_mask
    that is 0 on padding."""
    T, pad_id = manifest["seq_len"], manifest["pad_id"]
    vocab, num_sources = manifest["tokenizer"]["vocab_size"], len(manifest["sources"])
    B = batch.num_rows
    for name in batch.schema.names:
        if batch.column(name).null_count:
            yield ("nulls", batch.column(name).is_null().to_numpy(zero_copy_only=False),
                   lambda row, name=name: f"{name} is null")
    lens, len_offsets = list_parts(batch.column("doc_lens"))
    srcs, src_offsets = list_parts(batch.column("doc_sources"))
    csum = np.concatenate([[0], np.cumsum(lens, dtype=np.int64)])
    used = csum[len_offsets[1:]] - csum[len_offsets[:-1]]
    num_lens, num_srcs = np.diff(len_offsets), np.diff(src_offsets)
    yield ("doc_sources", num_lens != num_srcs,
           lambda row: f"{num_srcs[row]} entries for {num_lens[row]} doc_lens entries")
    yield "doc_lens", used > T, lambda row: f"sum(doc_lens) = {used[row]:,} > seq_len {T:,}"
    row_of_len = np.repeat(np.arange(B), num_lens)
    yield "doc_lens", np.bincount(row_of_len[lens == 0], minlength=B) > 0, lambda row: "an entry is 0"
    row_of_src = np.repeat(np.arange(B), num_srcs)
    yield ("doc_sources", np.bincount(row_of_src[srcs >= num_sources], minlength=B) > 0,
           lambda row: f"index {srcs[row_of_src == row].max()} but the manifest has {num_sources} sources")

    ids = fixed_rows(batch.column("input_ids"))
    yield ("ids", (ids >= vocab).any(axis=1),
           lambda row: f"id {ids[row].max():,} at position {int(np.argmax(ids[row] >= vocab)):,} is beyond the "
                       f"vocabulary (vocab_size {vocab:,})")
    padding = np.arange(T)[None, :] >= np.minimum(used, T)[:, None]
    not_pad = (ids != pad_id) & padding
    yield ("padding", not_pad.any(axis=1),
           lambda row: f"{int(not_pad[row].sum()):,} tokens after the documents (from position {used[row]:,}) "
                       f"are not pad id {pad_id}")
    if "loss_mask" in batch.schema.names:
        mask = fixed_rows(batch.column("loss_mask"))
        yield "loss_mask", (mask > 1).any(axis=1), lambda row: f"value {mask[row].max()} (only 0 and 1 are allowed)"
        yield "loss_mask", ((mask != 0) & padding).any(axis=1), lambda row: "padding has loss"


def check_rows(batch: pa.RecordBatch, manifest: dict, first_row: int, report: Report) -> None:
    """Report the first failing row of each row check of a batch whose first row is `first_row` of its shard."""
    for check, failing, detail in row_faults(batch, manifest):
        if failing.any():
            row = int(np.argmax(failing))
            report(check, detail(row), first_row + row)
