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
from pathlib import Path

import numpy as np
import pyarrow as pa

from prep.pack import Sequence

FORMAT = "prep-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BATCH_ROWS = 64  # 64 x 32768 x 4 B = 8 MiB record batches


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


BUILD_ID_KEY = "prep.build_id"  # schema metadata: which build wrote the shard


def schema(seq_len: int, loss_mask: bool, build_id: str | None = None) -> pa.Schema:
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


def fingerprint(backend) -> str:
    """The tokenizer a build was made with, as the contract names it: sha256 over every (id, token)
    of a `tokenizers.Tokenizer`'s vocabulary and its special tokens. The manifest records it; the
    trainer and `prep show` refuse a tokenizer whose fingerprint differs."""
    vocab = sorted((i, t) for t, i in backend.get_vocab(with_added_tokens=True).items())
    specials = sorted(t.content for t in backend.get_added_tokens_decoder().values() if t.special)
    blob = json.dumps({"vocab": vocab, "special": specials}, ensure_ascii=False).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def unsafe_name(name) -> bool:
    """A manifest shard name that could leave the directory (`../x`, `/etc/x`, `a/b`): every reader refuses it."""
    return not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Buffers sequences into record batches and rotates shards every `rows_per_shard` rows."""

    def __init__(self, out_dir: Path, seq_len: int, pad_id: int, loss_mask: bool, rows_per_shard: int,
                 build_id: str | None = None):
        self.out_dir, self.seq_len, self.pad_id = out_dir, seq_len, pad_id
        self.loss_mask, self.rows_per_shard = loss_mask, rows_per_shard
        self.schema = schema(seq_len, loss_mask, build_id)
        self.shards: list[dict] = []  # finished shards; a resumed build restores them
        self.on_shard = lambda: None  # called after each finished shard (the build saves its state)
        self.buffer: list[Sequence] = []
        self.writer = None
        self.rows_in_shard = 0
        self.ids_buffer = None

    def write(self, seq: Sequence) -> None:
        self.buffer.append(seq)
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
            self.sink = pa.OSFile(str(self.tmp_path), "wb")
            self.writer = pa.ipc.new_stream(self.sink, self.schema)
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
        with open(self.tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp_path, final)
        self.shards.append({"file": final.name, "rows": self.rows_in_shard, "sha256": sha256_file(final)})
        self.writer, self.rows_in_shard = None, 0
        self.on_shard()

    def _batch(self, seqs: list[Sequence]) -> pa.RecordBatch:
        B, T = len(seqs), self.seq_len
        # One ids buffer for every batch: a fresh 8 MiB array per batch cost page faults (kernel time)
        # on every write. Reusing it is safe: write_batch copies the batch into the file before returning.
        if self.ids_buffer is None:
            self.ids_buffer = np.empty((BATCH_ROWS, T), dtype=np.uint32)
        ids = self.ids_buffer[:B]
        ids.fill(self.pad_id)
        mask = np.zeros((B, T), dtype=np.uint8) if self.loss_mask else None
        lens, srcs, offsets = [], [], [0]
        for b, seq in enumerate(seqs):
            pos = 0
            for doc in seq:
                n = len(doc.ids)
                ids[b, pos:pos + n] = doc.ids
                if mask is not None:
                    mask[b, pos:pos + n] = 1 if doc.mask is None else doc.mask
                lens.append(n)
                srcs.append(doc.source)
                pos += n
            assert pos <= T, "a packed sequence overflows seq_len"
            offsets.append(len(lens))
        offsets = pa.array(offsets, pa.int32())
        columns = [
            pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), T),
            pa.ListArray.from_arrays(offsets, pa.array(lens, pa.uint32())),
            pa.ListArray.from_arrays(offsets, pa.array(srcs, pa.uint8())),
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
