"""Packed shards -> training batches: memory-mapped rows, a seeded shuffle per epoch, labels per document.

`prep build` stored everything the trainer needs in each row (see prep/shards.py): the tokens, the
length of every document and its source, and an optional loss mask. Nothing here tokenizes or looks
for special tokens. A row becomes
  input_ids     [T]  the tokens
  position_ids  [T]  0, 1, ... restarting at every document (and at the padding), which is how
                     transformers finds document boundaries for the attention mask
  labels        [T]  the next token of the same document; -100 on each document's last token,
                     on padding, and where the loss mask is 0
  label_sources [T]  the source index of each label (-1 where there is none), for loss per source

Sharding of the work: step s of an epoch takes rows perm[s*R : (s+1)*R], R = world x grad_accum x
batch, of that epoch's permutation (seed + epoch). Each rank reads its own slice, so ranks never
share a row, and the last step of an epoch is filled with empty rows (no labels, no gradient)
rather than dropping or repeating sequences. The position in the data is a function of the step
alone, which makes resuming exact.
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from prep.shards import check_rows, fixed_rows, iter_batches, list_parts, read_manifest, refuse, shard_files

IGNORE = -100


@dataclass
class Row:
    input_ids: np.ndarray  # [T] uint32, a view into the memory map
    doc_lens: np.ndarray  # [D] uint32
    doc_sources: np.ndarray  # [D] uint8
    loss_mask: np.ndarray | None  # [T] uint8


class PackedShards:
    """Every row of a `prep build` directory, memory-mapped: nothing is read until a row is used.

    prep.shards' reader opens the manifest and every shard, and refuses (ValueError) a shard name
    that leaves the directory, a missing or unreadable file, another schema or seq_len, a shard of
    another build, or a row count that differs from the manifest. With `verify_hashes`, each rank
    also proves its 1/world_size of the files before training: sha256 against the manifest and the
    row checks of `prep verify` (ids < vocab_size, doc_lens inside seq_len, ...). That is what lets
    the hot path trust every row without re-checking it.
    """

    def __init__(self, shard_dir: str, verify_hashes: bool = False, rank: int = 0, world_size: int = 1):
        self.dir = Path(shard_dir)
        self.manifest = read_manifest(self.dir)
        self.seq_len = int(self.manifest["seq_len"])
        self.pad_id = int(self.manifest["pad_id"])
        self.source_names = [source["name"] for source in self.manifest["sources"]]
        # One entry per record batch (64 rows each): numpy views of its columns into the memory map.
        self.batches: list[tuple] = []
        starts = [0]
        for index, shard in enumerate(shard_files(self.dir, self.manifest)):
            # Each rank proves 1/world_size of the files: 35B tokens on 8 ranks is ~17 GB each.
            proving, rows_in_shard = verify_hashes and index % world_size == rank, 0
            for batch in iter_batches(shard, self.manifest, check_hash=proving):
                if proving:
                    check_rows(batch, self.manifest, rows_in_shard, refuse(shard.path, self.dir))
                self.batches.append(columns(batch))
                rows_in_shard += batch.num_rows
                starts.append(starts[-1] + batch.num_rows)
        self.batch_starts = np.asarray(starts, dtype=np.int64)
        self.num_rows = int(starts[-1])
        if self.num_rows == 0:
            raise ValueError(f"{self.dir} holds no sequences")

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int) -> Row:
        batch = int(np.searchsorted(self.batch_starts, index, side="right")) - 1
        ids, offsets, lens, sources, mask = self.batches[batch]
        row = index - int(self.batch_starts[batch])
        first, end = offsets[row], offsets[row + 1]
        return Row(ids[row], lens[first:end], sources[first:end], None if mask is None else mask[row])


def columns(batch: pa.RecordBatch) -> tuple:
    """(input_ids [B, T], doc_lens offsets [B + 1], doc_lens, doc_sources, loss_mask [B, T] or None) of a
    record batch, zero-copy. doc_sources shares doc_lens' offsets (a row check of the shards)."""
    lens, offsets = list_parts(batch.column("doc_lens"))
    mask = fixed_rows(batch.column("loss_mask")) if "loss_mask" in batch.schema.names else None
    return fixed_rows(batch.column("input_ids")), offsets, lens, list_parts(batch.column("doc_sources"))[0], mask


def row_arrays(row: Row, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, position_ids, labels, label_sources) of one packed row, vectorised.
    The row is trusted: its doc_lens sum to at most seq_len, with no 0 entry (see PackedShards)."""
    T = seq_len
    ids = row.input_ids.astype(np.int64)
    lens = row.doc_lens.astype(np.int64)
    used = int(lens.sum())
    # Padding is one more segment, so its positions restart too and it never extends the last document.
    segments = np.append(lens, T - used) if used < T else lens
    starts = np.cumsum(segments) - segments
    position_ids = np.arange(T, dtype=np.int64) - np.repeat(starts, segments)
    labels = np.full(T, IGNORE, dtype=np.int64)
    labels[:-1] = ids[1:]
    labels[(starts + segments - 1)[: len(lens)]] = IGNORE  # a document's last token has no next token in it
    labels[used:] = IGNORE
    if row.loss_mask is not None:
        labels[:-1][row.loss_mask[1:] == 0] = IGNORE  # label t is token t+1: it counts if token t+1 gets loss
    label_sources = np.repeat(np.append(row.doc_sources.astype(np.int64), -1), np.append(lens, T - used))
    label_sources[labels == IGNORE] = -1
    return ids, position_ids, labels, label_sources


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64
    position_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], -100 = no loss
    label_sources: torch.Tensor  # [B, T], -1 = no loss
    source_targets: np.ndarray  # [num_sources] labels that count, per source
    num_tokens: int  # real (non-padding) tokens
    doc_len_sq: int  # sum over documents of length^2, for the attention FLOPs

    @property
    def num_targets(self) -> int:
        return int(self.source_targets.sum())

    def to(self, device: torch.device) -> "Batch":
        move = lambda tensor: tensor.to(device, non_blocking=True)
        return Batch(move(self.input_ids), move(self.position_ids), move(self.labels), move(self.label_sources),
                     self.source_targets, self.num_tokens, self.doc_len_sq)


class Loader:
    """The micro-batches of each optimizer step for one rank, from memory-mapped rows.

    The data position is `step` alone (the sharding of the work above), so `state_dict()` holds it and
    resuming is exact. `next()` returns one step's micro-batches and builds the next step's on a thread
    while this one trains. Rows are used as the shards hold them, with no per-row check: PackedShards
    proved them when it opened the shards (--verify-hashes).
    """

    def __init__(self, shards: PackedShards, batch_size: int, grad_accum: int, rank: int, world_size: int,
                 seed: int, pin_memory: bool = False):
        self.shards, self.batch_size, self.grad_accum = shards, batch_size, grad_accum
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.pin_memory = pin_memory
        self.rows_per_step = world_size * grad_accum * batch_size
        self.steps_per_epoch = -(-len(shards) // self.rows_per_step)
        self.step = 0
        self._perm_epoch, self._perm = -1, None
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._next = None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
            self._perm_epoch = epoch
        return self._perm

    def rows_of_step(self, step: int) -> list[list[int]]:
        """Row indices of this rank's micro-batches at `step`; -1 marks an empty row at an epoch's end."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch)
        micro = []
        for micro_batch in range(self.grad_accum):
            first = (step_in_epoch * self.rows_per_step
                     + (micro_batch * self.world_size + self.rank) * self.batch_size)
            micro.append([int(perm[slot]) if slot < len(perm) else -1 for slot in range(first, first + self.batch_size)])
        return micro

    def build(self, step: int) -> list[Batch]:
        """The micro-batches of `step` (what `next()` returns), built from scratch."""
        T, out = self.shards.seq_len, []
        for rows in self.rows_of_step(step):
            columns = [[], [], [], []]  # input_ids, position_ids, labels, label_sources
            num_tokens = doc_len_sq = 0
            for index in rows:
                if index < 0:  # empty: padding, positions 0..T-1, no labels
                    arrays = (np.full(T, self.shards.pad_id, np.int64), np.arange(T), np.full(T, IGNORE), np.full(T, -1))
                else:
                    row = self.shards[index]
                    arrays = row_arrays(row, T)
                    lens = row.doc_lens.astype(np.int64)
                    num_tokens += int(lens.sum())
                    doc_len_sq += int((lens * lens).sum())
                for column, array in zip(columns, arrays):
                    column.append(array)
            tensors = [torch.from_numpy(np.stack(column)) for column in columns]
            sources = tensors[3].numpy().ravel()
            source_targets = np.bincount(sources[sources >= 0], minlength=len(self.shards.source_names))
            if self.pin_memory:
                tensors = [tensor.pin_memory() for tensor in tensors]
            out.append(Batch(*tensors, source_targets, num_tokens, doc_len_sq))
        return out

    def next(self) -> list[Batch]:
        """This step's micro-batches; the next step's are built on a thread while this one trains."""
        batches = self._next.result() if self._next is not None else self.build(self.step)
        self.step += 1
        self._next = self._pool.submit(self.build, self.step)
        return batches

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "num_rows": len(self.shards), "rows_per_step": self.rows_per_step}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "num_rows", "rows_per_step"):
            if state[key] != mine[key]:
                raise ValueError(f"the checkpoint was made with {key}={state[key]}, this run has {mine[key]} "
                                 "(world size x --grad-accum x --batch-size, --seed and the shards must match to resume)")
        self.step = int(state["step"])
        self._next = None
