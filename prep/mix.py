"""Mixing: interleave per-source document streams so each source gets its share of output tokens.

`--mix nemotron=0.5,ot3=0.5` gives target shares of tokens (weights are normalised). The next
document always comes from the source furthest behind its target (smallest tokens/weight, ties to
the first listed), so the interleave is deterministic and the achieved share never strays from
the target by more than one document's length over the total so far. The mix stops at
`--max-tokens` (the document that crosses it is kept whole) or as soon as any source runs out,
which keeps the shares on target instead of finishing on whatever source is left.
"""

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np


@dataclass(slots=True)
class Doc:
    ids: np.ndarray  # uint32 token ids
    mask: np.ndarray | None  # uint8 loss mask (1 = target) or None for loss on every token
    source: int  # index into the build's sources


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
            i = min(range(len(self.streams)), key=lambda k: self.tokens[k] / self.shares[k])
            doc = next(self.streams[i], None)
            if doc is None:
                self.exhausted = i
                return
            self.tokens[i] += len(doc.ids)
            yield doc
