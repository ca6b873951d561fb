"""Packing: documents in, fixed-length sequences (lists of pieces) out, and the long-document policy.

`bfd` (default): best-fit decreasing over bounded windows. A window gathers documents until it
holds `window` sequences' worth of tokens, sorts them longest first and puts each into the open
sequence with the least room that still fits it. The emptiest sequences of a window stay open
into the next one, so the small documents that come later fill them; memory is bounded by the
window, never by the dataset. A document is split only when it is longer than seq_len: it then
becomes full seq_len pieces plus a remainder that is packed like any document (`--long split`).
`--long truncate|drop` are applied before mixing (`long_documents`, on a whole batch's lengths),
so no document reaches a packer too long unless splitting was asked for.

`wrapped`: concatenate in arrival order and cut every seq_len tokens (what the SmolLM3 blog says
its mid-training used); documents that straddle a cut become two pieces, and every piece is
still recorded in doc_lens so the trainer never lets them attend to each other.

A packer's pieces are views of its documents' ids: packing copies no token. The shard writer
copies each piece once, into the record batch it writes.
"""

import bisect
from collections import deque
from typing import Iterator

import numpy as np

from prep.mix import Doc
from prep.sources import Batch

Sequence = list[Doc]  # the pieces of one packed sequence, in order


def long_documents(batches: Iterator[Batch], long: str, seq_len: int) -> Iterator[Batch]:
    """--long truncate|drop on each batch's documents (split is the packers' job): truncate
    shortens a document to seq_len tokens, drop marks it to be left out. The mixer's side of
    the source (prep.mix.documents) counts what was cut or dropped as it takes the documents."""
    for batch in batches:
        lengths = batch.ends - batch.starts
        if long == "truncate":
            batch.cut = np.maximum(lengths - seq_len, 0)
            batch.ends = batch.ends - batch.cut
        elif long == "drop":
            batch.dropped = lengths > seq_len
        yield batch


def pack(docs: Iterator[Doc], packer: "BfdPacker | WrappedPacker") -> Iterator[Sequence]:
    """The packer's sequences, each as soon as it is finished, then the rest once `docs` ends.
    The packer counts what it yields, so a resumed build knows how many sequences were written."""
    for doc in docs:
        packer.add(doc)
        yield from packer.take_ready()
    packer.finish()
    yield from packer.take_ready()


class BfdPacker:
    """Best-fit decreasing in windows of `window` sequences (module docstring); `ready` holds the
    finished sequences, `open` those carried into the next window, `pending` the window's documents."""

    def __init__(self, seq_len: int, window: int = 256, carry_frac: float = 0.1):
        self.seq_len = seq_len
        self.window_tokens = window * seq_len
        self.carry_frac = carry_frac
        self.ready: deque[Sequence] = deque()  # finished sequences, for the writer to take
        self.open: list[Sequence] = []  # sequences carried over from the previous window
        self.pending: list[Doc] = []  # documents of the current window
        self.pending_tokens = 0
        self.num_split = 0
        self.num_sequences = self.num_pieces = 0  # taken by the writer

    def add(self, doc: Doc) -> None:
        """Take one document; splits it first when it is longer than seq_len."""
        if len(doc.ids) > self.seq_len:
            self.num_split += 1
            cut = len(doc.ids) - len(doc.ids) % self.seq_len
            self.ready.extend([_slice(doc, start, start + self.seq_len)] for start in range(0, cut, self.seq_len))
            if cut == len(doc.ids):
                return
            doc = _slice(doc, cut, len(doc.ids))
        self.pending.append(doc)
        self.pending_tokens += len(doc.ids)
        if self.pending_tokens >= self.window_tokens:
            self._pack_window(final=False)

    def finish(self) -> None:
        """Pack the last window; every sequence is then ready."""
        self._pack_window(final=True)

    def take_ready(self) -> Iterator[Sequence]:
        """The finished sequences, counted as they are taken."""
        while self.ready:
            sequence = self.ready.popleft()
            self.num_sequences += 1
            self.num_pieces += len(sequence)
            yield sequence

    def _pack_window(self, final: bool) -> None:
        bins = self.open
        room = sorted((self.seq_len - _tokens(sequence), index) for index, sequence in enumerate(bins))
        # longest first; ties keep arrival order (sort is stable), so the result is deterministic
        for doc in sorted(self.pending, key=lambda pending: -len(pending.ids)):
            size = len(doc.ids)
            fit = bisect.bisect_left(room, (size, -1))  # the fullest open sequence it fits in
            if fit < len(room):
                free, index = room.pop(fit)
                bins[index].append(doc)
            else:
                free, index = self.seq_len, len(bins)
                bins.append([doc])
            if free - size > 0:
                bisect.insort(room, (free - size, index))
        self.pending, self.pending_tokens = [], 0
        keep = set() if final else {index for _, index in room[::-1][: int(len(bins) * self.carry_frac)]}
        self.open = [sequence for index, sequence in enumerate(bins) if index in keep]
        self.ready.extend(sequence for index, sequence in enumerate(bins) if index not in keep)

    def state(self) -> tuple[list[Sequence], list[Sequence], list[Doc]]:
        """What a resumed build needs: ready, open and pending, as lists, copied (the packer goes
        on while they are saved)."""
        return [list(sequence) for sequence in self.ready], [list(sequence) for sequence in self.open], list(self.pending)

    def restore(self, ready: list[Sequence], open_: list[Sequence], pending: list[Doc], counts: dict) -> None:
        self.ready, self.open, self.pending = deque(ready), open_, pending
        self.pending_tokens = _tokens(pending)
        self.num_split, self.num_sequences, self.num_pieces = counts["split"], counts["sequences"], counts["pieces"]


class WrappedPacker:
    """Concatenate and cut every seq_len tokens (module docstring); `current` is the sequence being filled."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.ready: deque[Sequence] = deque()
        self.current: Sequence = []
        self.used = 0
        self.num_split = 0
        self.num_sequences = self.num_pieces = 0

    def add(self, doc: Doc) -> None:
        """Append one document, cutting it wherever a sequence fills up."""
        start, size = 0, len(doc.ids)
        if self.used + size > self.seq_len:
            self.num_split += 1
        while start < size:
            take = min(size - start, self.seq_len - self.used)
            self.current.append(_slice(doc, start, start + take))
            self.used += take
            start += take
            if self.used == self.seq_len:
                self.ready.append(self.current)
                self.current, self.used = [], 0

    def finish(self) -> None:
        """The last, partly filled sequence is ready too."""
        if self.current:
            self.ready.append(self.current)
            self.current, self.used = [], 0

    take_ready = BfdPacker.take_ready

    def state(self) -> tuple[list[Sequence], list[Sequence], list[Doc]]:
        return [list(sequence) for sequence in self.ready], [list(self.current)] if self.current else [], []

    def restore(self, ready: list[Sequence], open_: list[Sequence], pending: list[Doc], counts: dict) -> None:
        assert not pending and len(open_) <= 1
        self.ready = deque(ready)
        self.current = open_[0] if open_ else []
        self.used = _tokens(self.current)
        self.num_split, self.num_sequences, self.num_pieces = counts["split"], counts["sequences"], counts["pieces"]


def _tokens(docs: list[Doc]) -> int:
    return sum(len(doc.ids) for doc in docs)


def _slice(doc: Doc, start: int, end: int) -> Doc:
    return Doc(doc.ids[start:end], None if doc.mask is None else doc.mask[start:end], doc.source)
