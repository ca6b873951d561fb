"""Resume state: what a killed `prep build` needs to continue exactly where it stopped.

Saved after every finished shard (and once before the first): the rows each source has settled,
the mixer's token counts, the counters, the shards so far, and the packer's documents in flight
(finished sequences not yet written, open sequences, the current window) as flat numpy arrays.
A rerun with the same settings reopens each source at its row, skips those rows without
tokenizing them, and continues; because every step is deterministic it writes the same bytes an
uninterrupted run writes.

Files: `.prep-state.json` names `.prep-state-NNNNN.npz`; the npz is written first and the json
replaces the old one atomically, so a kill at any moment leaves a consistent pair. No pickles:
`np.load(allow_pickle=False)`.
"""

import json
import os
from pathlib import Path

import numpy as np

from prep.mix import Doc
from prep.pack import Sequence

STATE = ".prep-state.json"


def save(out: Path, meta: dict, ready: list[Sequence], open_: list[Sequence], pending: list[Doc]) -> None:
    groups = ready + open_ + [pending]
    docs = [d for g in groups for d in g]
    arrays = {
        "ids": np.concatenate([d.ids for d in docs]) if docs else np.zeros(0, np.uint32),
        "lens": np.array([len(d.ids) for d in docs], np.int64),
        "sources": np.array([d.source for d in docs], np.int64),
        "group_sizes": np.array([len(g) for g in groups], np.int64),
    }
    if any(d.mask is not None for d in docs):
        arrays["masks"] = np.concatenate([d.mask for d in docs])
    npz = f".prep-state-{len(meta['shards']):05d}.npz"
    tmp = out / (npz + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / npz)
    tmp = out / (STATE + ".tmp")
    tmp.write_text(json.dumps(meta | {"arrays": npz, "num_ready": len(ready), "num_open": len(open_)}))
    os.replace(tmp, out / STATE)
    for old in out.glob(".prep-state-*.npz"):
        if old.name != npz:
            old.unlink()


def load(out: Path) -> tuple[dict, list[Sequence], list[Sequence], list[Doc]] | None:
    """The saved meta and packer contents, or None when `out` has no resume state."""
    if not (out / STATE).exists():
        return None
    meta = json.loads((out / STATE).read_text())
    with np.load(out / meta["arrays"], allow_pickle=False) as z:
        ids, lens, sources, sizes = z["ids"], z["lens"], z["sources"], z["group_sizes"]
        masks = z["masks"] if "masks" in z else None
    offsets = np.concatenate([[0], np.cumsum(lens)])
    docs = [Doc(ids[a:b], None if masks is None else masks[a:b], int(s))
            for a, b, s in zip(offsets[:-1], offsets[1:], sources)]
    groups, k = [], 0
    for size in sizes:
        groups.append(docs[k:k + size])
        k += size
    num_ready, num_open = meta["num_ready"], meta["num_open"]
    return meta, groups[:num_ready], groups[num_ready:num_ready + num_open], groups[-1]


def clear(out: Path) -> None:
    for path in [out / STATE, *out.glob(".prep-state-*.npz*"), out / (STATE + ".tmp")]:
        path.unlink(missing_ok=True)
