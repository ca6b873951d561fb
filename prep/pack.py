"""Packing: documents in, fixed-length sequences (lists of pieces) out.

`bfd` (default): best-fit decreasing over bounded windows. A window gathers documents until it
holds `window` sequences' worth of tokens, sorts them longest first and puts each into the open
sequence with the least room that still fits it. The emptiest sequences of a window stay open
into the next one, so the small documents that come later fill them; memory is bounded by the
window, never by the dataset. A document is split only when it is longer than seq_len: it then
becomes full seq_len pieces plus a remainder that is packed like any document (`--long split`).
`--long truncate|drop` are applied before packing (see build.py), so no document here is too long
unless splitting was asked for.

`wrapped`: concatenate in arrival order and cut every seq_len tokens (what the SmolLM3 blog says
its mid-training used); documents that straddle a cut become two pieces, and every piece is
still recorded in doc_lens so the trainer never lets them attend to each other.
"""

import bisect
from collections import deque

from prep.mix import Doc

Sequence = list[Doc]  # the pieces of one packed sequence, in order


class BfdPacker:
    def __init__(self, seq_len: int, window: int = 256, carry_frac: float = 0.1):
        self.seq_len = seq_len
        self.window_tokens = window * seq_len
        self.carry_frac = carry_frac
        self.ready: deque[Sequence] = deque()  # finished sequences, for the writer to take
        self.open: list[Sequence] = []  # sequences carried over from the previous window
        self.pending: list[Doc] = []  # documents of the current window
        self.pending_tokens = 0
        self.num_split = 0

    def add(self, doc: Doc) -> None:
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
        self._pack_window(final=True)

    def _pack_window(self, final: bool) -> None:
        bins = self.open
        room = sorted((self.seq_len - sum(len(d.ids) for d in b), i) for i, b in enumerate(bins))
        # longest first; ties keep arrival order (sort is stable), so the result is deterministic
        for doc in sorted(self.pending, key=lambda d: -len(d.ids)):
            n = len(doc.ids)
            k = bisect.bisect_left(room, (n, -1))
            if k < len(room):
                free, i = room.pop(k)
                bins[i].append(doc)
            else:
                free, i = self.seq_len, len(bins)
                bins.append([doc])
            if free - n > 0:
                bisect.insort(room, (free - n, i))
        self.pending, self.pending_tokens = [], 0
        keep = set() if final else {i for _, i in room[::-1][: int(len(bins) * self.carry_frac)]}
        self.open = [b for i, b in enumerate(bins) if i in keep]
        self.ready.extend(b for i, b in enumerate(bins) if i not in keep)

    def state(self) -> tuple[list[Sequence], list[Sequence], list[Doc]]:
        return list(self.ready), self.open, self.pending

    def restore(self, ready: list[Sequence], open_: list[Sequence], pending: list[Doc], num_split: int) -> None:
        self.ready, self.open, self.pending = deque(ready), open_, pending
        self.pending_tokens = sum(len(d.ids) for d in pending)
        self.num_split = num_split


class WrappedPacker:
    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.ready: deque[Sequence] = deque()
        self.current: Sequence = []
        self.used = 0
        self.num_split = 0

    def add(self, doc: Doc) -> None:
        start, n = 0, len(doc.ids)
        if self.used + n > self.seq_len:
            self.num_split += 1
        while start < n:
            take = min(n - start, self.seq_len - self.used)
            self.current.append(_slice(doc, start, start + take))
            self.used += take
            start += take
            if self.used == self.seq_len:
                self.ready.append(self.current)
                self.current, self.used = [], 0

    def finish(self) -> None:
        if self.current:
            self.ready.append(self.current)
            self.current, self.used = [], 0

    def state(self) -> tuple[list[Sequence], list[Sequence], list[Doc]]:
        return list(self.ready), [self.current] if self.current else [], []

    def restore(self, ready: list[Sequence], open_: list[Sequence], pending: list[Doc], num_split: int) -> None:
        assert not pending and len(open_) <= 1
        self.ready = deque(ready)
        self.current = open_[0] if open_ else []
        self.used = sum(len(d.ids) for d in self.current)
        self.num_split = num_split


def _slice(doc: Doc, start: int, end: int) -> Doc:
    return Doc(doc.ids[start:end], None if doc.mask is None else doc.mask[start:end], doc.source)
