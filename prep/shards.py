"""Shards: packed sequences -> Arrow IPC stream files, plus the manifest that makes them a build.

Layout of `--out DIR`: `shard-00000.arrow`, `shard-00001.arrow`, ... and `manifest.json`.
Each row of a shard is one packed sequence:
  input_ids   fixed_size_list<uint32>[seq_len]   tokens, padded with pad_id
  doc_lens    list<uint32>                       document (or piece) lengths from position 0
  doc_sources list<uint8>                        per document, an index into manifest["sources"]
  loss_mask   fixed_size_list<uint8>[seq_len]    only with --loss-on assistant
The IPC *stream* format is what `datasets.Dataset.from_file` reads, and `pa.memory_map` opens it
zero-copy. Every file is written as `*.tmp` and renamed when complete; the manifest is written
last, so a directory without one is not a build.
"""

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:  # an import cycle otherwise: pack -> mix -> tokenizer -> shards (the fingerprint)
    from prep.pack import Sequence

FORMAT = "prep-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BATCH_ROWS = 64  # 64 x 32768 x 4 B = 8 MiB record batches


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


@contextmanager
def atomic_file(path: Path, suffix: str = ".tmp"):
    """A binary file that appears at `path` whole or not at all: written beside it as path+suffix,
    fsynced, then renamed over `path`. Every manifest, resume state and cache file goes through it."""
    tmp = path.with_name(path.name + suffix)
    with open(tmp, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj, suffix: str = ".tmp") -> None:
    """`obj` as indented JSON at `path`, atomically (atomic_file)."""
    with atomic_file(path, suffix) as f:
        f.write((json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


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
    for sequence in sequences:
        writer.write(sequence)
    return writer.close()


class ShardWriter:
    """Buffers sequences into record batches of BATCH_ROWS and rotates shards every `rows_per_shard`
    rows. Each shard is written as `*.tmp`, hashed while written, fsynced and renamed."""

    def __init__(self, out_dir: Path, seq_len: int, pad_id: int, loss_mask: bool, rows_per_shard: int,
                 build_id: str | None = None):
        self.out_dir, self.seq_len, self.pad_id = out_dir, seq_len, pad_id
        self.loss_mask, self.rows_per_shard = loss_mask, rows_per_shard
        self.schema = schema(seq_len, loss_mask, build_id)
        self.shards: list[dict] = []  # finished shards; a resumed build restores them
        self.on_shard = lambda: None  # called after each finished shard (the build saves its state)
        self.buffer: list["Sequence"] = []
        self.writer = None
        self.rows_in_shard = 0
        # One ids buffer for every batch: a fresh 8 MiB array per batch cost page faults (kernel time)
        # on every write. Reusing it is safe: write_batch copies the batch into the file before returning.
        self.ids_buffer = np.empty((BATCH_ROWS, seq_len), dtype=np.uint32)

    def write(self, sequence: "Sequence") -> None:
        self.buffer.append(sequence)
        if len(self.buffer) == BATCH_ROWS or self.rows_in_shard + len(self.buffer) == self.rows_per_shard:
            self._flush()

    def close(self) -> list[dict]:
        self._flush()
        self._finish_shard()
        return self.shards

    def _flush(self) -> None:
        if not self.buffer:
            return
        if self.writer is None:
            self.tmp_path = self.out_dir / (shard_name(len(self.shards)) + ".tmp")
            self.sink = HashingFile(self.tmp_path)
            self.writer = pa.ipc.new_stream(pa.PythonFile(self.sink, mode="w"), self.schema)
        self.writer.write_batch(self._batch(self.buffer))
        self.rows_in_shard += len(self.buffer)
        self.buffer = []
        if self.rows_in_shard == self.rows_per_shard:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.sink.close()
        final = self.out_dir / shard_name(len(self.shards))
        os.replace(self.tmp_path, final)
        self.shards.append({"file": final.name, "rows": self.rows_in_shard, "sha256": self.sink.digest.hexdigest()})
        self.writer, self.rows_in_shard = None, 0
        self.on_shard()

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


def read_manifest(out_dir: Path) -> dict:
    """The manifest of a build directory; ValueError with what to do when there is none or it's foreign."""
    path = Path(out_dir) / MANIFEST
    if not Path(out_dir).is_dir():
        raise ValueError(f"{out_dir} is not a directory; build shards with `prep build --out {out_dir}`")
    if not path.exists():
        raise ValueError(f"{out_dir} has no {MANIFEST}: it is not a finished build (rerun `prep build --out {out_dir}`)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is format {manifest.get('format')!r} v{manifest.get('format_version')}; "
                         f"this version reads {FORMAT!r} v{FORMAT_VERSION}: rebuild the shards with this prep")
    return manifest
