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
from typing import Iterator

from prep.mix import Doc

Sequence = list[Doc]  # the pieces of one packed sequence, in order


class BfdPacker:
    def __init__(self, seq_len: int, window: int = 256, carry_frac: float = 0.1):
        self.seq_len = seq_len
        self.window_tokens = window * seq_len
        self.carry_frac = carry_frac
        self.pending: list[Doc] = []
        self.pending_tokens = 0
        self.open: list[Sequence] = []  # sequences carried over from the previous window
        self.num_split = 0

    def add(self, doc: Doc) -> Iterator[Sequence]:
        if len(doc.ids) > self.seq_len:
            self.num_split += 1
            cut = len(doc.ids) - len(doc.ids) % self.seq_len
            for start in range(0, cut, self.seq_len):
                yield [_slice(doc, start, start + self.seq_len)]
            if cut == len(doc.ids):
                return
            doc = _slice(doc, cut, len(doc.ids))
        self.pending.append(doc)
        self.pending_tokens += len(doc.ids)
        if self.pending_tokens >= self.window_tokens:
            yield from self._pack_window(final=False)

    def finish(self) -> Iterator[Sequence]:
        yield from self._pack_window(final=True)

    def _pack_window(self, final: bool) -> Iterator[Sequence]:
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
        yield from (b for i, b in enumerate(bins) if i not in keep)


class WrappedPacker:
    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.current: Sequence = []
        self.used = 0
        self.num_split = 0

    def add(self, doc: Doc) -> Iterator[Sequence]:
        start, n = 0, len(doc.ids)
        if self.used + n > self.seq_len:
            self.num_split += 1
        while start < n:
            take = min(n - start, self.seq_len - self.used)
            self.current.append(_slice(doc, start, start + take))
            self.used += take
            start += take
            if self.used == self.seq_len:
                yield self.current
                self.current, self.used = [], 0

    def finish(self) -> Iterator[Sequence]:
        if self.current:
            yield self.current
            self.current, self.used = [], 0


def _slice(doc: Doc, start: int, end: int) -> Doc:
    return Doc(doc.ids[start:end], None if doc.mask is None else doc.mask[start:end], doc.source)
