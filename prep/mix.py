"""Mixing: interleave per-source document streams so each source gets its share of output tokens.

`--mix nemotron=0.5,ot3=0.5` gives target shares of tokens (weights are normalised). The next
document always comes from the source furthest behind its target (smallest tokens/weight, ties to
the first listed), so the interleave is deterministic and the achieved share never strays from
the target by more than one document's length over the total so far. The mix stops at
`--max-tokens` (the document that crosses it is kept whole) or as soon as any source runs out,
which keeps the shares on target instead of finishing on whatever source is left.

The stages before the mixer run ahead of it (batches are read and encoded in advance), so what
a source has *given* the build is counted here, document by document as the mixer takes them
(`documents` and `SourceStats`): the manifest's counts and a resumed build's row positions are
exactly the rows whose documents reached the packer.
"""

import math
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np

from prep.sources import Batch
from prep.tokenizer import FAILED, FALLBACK

NUM_EXAMPLES = 5  # rejected rows named per source


@dataclass(slots=True)
class Doc:
    ids: np.ndarray  # uint32 token ids
    mask: np.ndarray | None  # uint8 loss mask (1 = target) or None for loss on every token
    source: int  # index into the build's sources


@dataclass
class SourceStats:
    """What one source has given the build so far (rows settled: taken by the mixer or rejected)."""

    rows_read: int = 0
    documents: int = 0
    tokens: int = 0
    rejected: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)
    truncated: int = 0
    truncated_tokens: int = 0
    dropped: int = 0
    dropped_tokens: int = 0
    encoder_fallbacks: int = 0

    def to_dict(self) -> dict:
        return asdict(self) | {"rejected": dict(self.rejected)}

    @classmethod
    def from_dict(cls, saved: dict) -> "SourceStats":
        return cls(**(saved | {"rejected": Counter(saved["rejected"]),
                               "examples": [tuple(example) for example in saved["examples"]]}))

    def reject(self, row_number: int, reason: str) -> None:
        self.rejected[reason] += 1
        if len(self.examples) < NUM_EXAMPLES:
            self.examples.append((row_number, reason))


def documents(batches: Iterator[Batch], stats: SourceStats) -> Iterator[Doc]:
    """One source's documents in row order, one at a time, counted into `stats` as they are taken.
    Rejected rows are counted as the stream passes them; the rows after the last document taken
    stay unread, so a resumed build starts with them."""
    for batch in batches:
        rejects = deque(batch.rejects)
        for doc, row in enumerate(batch.rows.tolist()):
            while rejects and rejects[0][0] < row:
                stats.reject(batch.first_row + rejects[0][0], rejects.popleft()[1])
            stats.rows_read = batch.first_row + row + 1
            start, end = int(batch.starts[doc]), int(batch.ends[doc])
            if batch.encoded_by[doc] == FAILED:
                stats.reject(batch.first_row + row, "untokenizable")
                continue
            if batch.dropped is not None and batch.dropped[doc]:
                stats.dropped += 1
                stats.dropped_tokens += end - start
                continue
            if batch.cut is not None and batch.cut[doc]:
                stats.truncated += 1
                stats.truncated_tokens += int(batch.cut[doc])
            stats.encoder_fallbacks += int(batch.encoded_by[doc] == FALLBACK)
            stats.documents += 1
            stats.tokens += end - start
            # copies: a view would keep the batch's ids alive while any one document waits to be packed
            yield Doc(batch.ids[start:end].copy(), None if batch.masks is None else batch.masks[start:end].copy(),
                      batch.source)
        for row, reason in rejects:
            stats.reject(batch.first_row + row, reason)
        stats.rows_read = batch.first_row + batch.num_rows


def parse_mix(text: str) -> dict[str, float]:
    """'a=0.5,b=0.5' -> {'a': 0.5, 'b': 0.5} normalised to sum 1; ValueError on anything malformed."""
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, eq, value = part.strip().partition("=")
        name = name.strip()
        if not eq or not name:
            raise ValueError(f"--mix part {part.strip()!r} is not NAME=WEIGHT (e.g. --mix nemotron=0.5,ot3=0.5)")
        if name in weights:
            raise ValueError(f"--mix names {name!r} twice")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"--mix weight {value.strip()!r} for {name!r} is not a number") from None
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"--mix weight for {name!r} must be a positive number, got {value.strip()}")
        weights[name] = weight
    if len(weights) > 255:
        raise ValueError("--mix takes at most 255 sources (doc_sources is uint8)")
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


class Mixer:
    """Pulls documents from the streams by deficit; `tokens` and `exhausted` tell how it went."""

    def __init__(self, streams: list[Iterator[Doc]], shares: list[float], max_tokens: int | None,
                 tokens: list[int] | None = None):
        self.streams, self.shares, self.max_tokens = streams, shares, max_tokens
        self.tokens = list(tokens) if tokens else [0] * len(streams)  # restored when a build resumes
        self.exhausted: int | None = None  # the source that ran out, if one did

    def __iter__(self) -> Iterator[Doc]:
        while not (self.max_tokens and sum(self.tokens) >= self.max_tokens):
            behind = min(range(len(self.streams)), key=lambda source: self.tokens[source] / self.shares[source])
            doc = next(self.streams[behind], None)
            if doc is None:
                self.exhausted = behind
                return
            self.tokens[behind] += len(doc.ids)
            yield doc

    def stopped_by(self, names: list[str]) -> str:
        return "max_tokens" if self.exhausted is None else f"source {names[self.exhausted]!r} ran out"
