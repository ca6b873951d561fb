"""Resume state and the output directory: what a killed `prep build` needs to continue exactly
where it stopped, and how a rerun finds out what `--out` holds.

Saved after every finished shard (and once before the first): the rows each source has settled,
the mixer's token counts, the counters, the shards so far, and the packer's documents in flight
(finished sequences not yet written, open sequences, the current window) as flat numpy arrays.
A rerun with the same settings reopens each source at its row, skips those rows without
tokenizing them, and continues; because every step is deterministic it writes the same bytes an
uninterrupted run writes.

Files: `.prep-state.json` names `.prep-state-NNNNN.npz`; the npz is written first and the json
replaces the old one atomically, so a kill at any moment, or a full disk, leaves a consistent pair
(a kill during the very first save leaves an npz and no json: the rerun removes it and starts).
No pickles: `np.load(allow_pickle=False)`.

The state also records the size and mtime of every local input file: a resumed build that would
read changed data is refused, naming the first file that changed and how.
"""

import json
from pathlib import Path

import numpy as np

from prep.mix import Doc
from prep.pack import Sequence
from prep.shards import MANIFEST, atomic_file, disk_full, is_disk_full, write_json_atomic

STATE = ".prep-state.json"


def prepare(out: Path, overwrite: bool, build_id: str, inputs: list) -> tuple[dict | None, tuple | None]:
    """Make `out` ready. Returns (manifest, None) when this very build is already finished there,
    (None, saved state) when a killed run of it can be resumed, and (None, None) for a fresh start.
    Raises ValueError when `out` holds another build, or its inputs changed."""
    ours = [path for path in out.iterdir() if path.name == MANIFEST or path.name.startswith(("shard-", ".prep-state"))] \
        if out.is_dir() else []
    if overwrite:
        for path in ours:
            path.unlink()
        ours = []
    if (out / MANIFEST).exists():
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("build_id") != build_id:
            raise ValueError(f"{out} holds a finished build with other settings; pass --overwrite or choose another --out")
        clear(out)
        return manifest, None
    saved = load(out)
    if saved is not None:
        meta = saved[0]
        if meta["build_id"] != build_id:
            raise ValueError(f"{out} holds an unfinished build with other settings; rerun it with its own settings, "
                             "or pass --overwrite to start over")
        if changed := changed_input(meta["inputs"], inputs):
            raise ValueError(f"{changed} since the unfinished build in {out} started, so resuming would mix old and "
                             "new data; put the file back as it was, or pass --overwrite to start over")
        done = {shard["file"] for shard in meta["shards"]}
        for path in out.glob("shard-*"):  # written after the last saved state: it will be written again
            if path.name not in done:
                path.unlink()
        return None, saved
    # Without a state json (the commit point of every save), files of ours are the remains of a first
    # save that was killed before its json: nothing to resume, and not another build's.
    leftovers = [path for path in ours if path.name.startswith(".prep-state")]
    if len(ours) > len(leftovers):
        raise ValueError(f"{out} holds shard files of an unknown build; pass --overwrite or choose another --out")
    for path in leftovers:
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return None, None


def changed_input(saved: list, now: list) -> str | None:
    """The first difference between two lists of [path, size, mtime_ns] (build.input_files), in
    words, or None when they are the same."""
    found = {path: (size, mtime) for path, size, mtime in now}
    for path, size, mtime in saved:
        if path not in found:
            return f"input file {path} is gone"
        if found[path][0] != size:
            return f"input file {path} changed size ({size:,} -> {found[path][0]:,} bytes)"
        if found[path][1] != mtime:
            return f"input file {path} was modified (its mtime changed, same size)"
    known = {path for path, _, _ in saved}
    for path, _, _ in now:
        if path not in known:
            return f"input file {path} is new"
    return None


def save(out: Path, meta: dict, ready: list[Sequence], open_: list[Sequence], pending: list[Doc]) -> None:
    """The packer's documents (npz), then `meta` naming them (json), each atomically."""
    groups = ready + open_ + [pending]
    docs = [doc for group in groups for doc in group]
    arrays = {
        "ids": np.concatenate([doc.ids for doc in docs]) if docs else np.zeros(0, np.uint32),
        "lens": np.array([len(doc.ids) for doc in docs], np.int64),
        "sources": np.array([doc.source for doc in docs], np.int64),
        "group_sizes": np.array([len(group) for group in groups], np.int64),
    }
    if any(doc.mask is not None for doc in docs):
        arrays["masks"] = np.concatenate([doc.mask for doc in docs])
    npz = f".prep-state-{len(meta['shards']):05d}.npz"
    try:
        with atomic_file(out / npz) as f:
            np.savez(f, **arrays)
    except OSError as error:
        if is_disk_full(error):  # the previous pair is untouched: a rerun resumes from it
            raise disk_full("resume state", out / npz, sum(array.nbytes for array in arrays.values())) from None
        raise
    write_json_atomic(out / STATE, meta | {"arrays": npz, "num_ready": len(ready), "num_open": len(open_)},
                      what="resume state")
    for old in out.glob(".prep-state-*.npz"):
        if old.name != npz:
            old.unlink()


def load(out: Path) -> tuple[dict, list[Sequence], list[Sequence], list[Doc]] | None:
    """The saved meta and packer contents, or None when `out` has no resume state."""
    if not (out / STATE).exists():
        return None
    meta = json.loads((out / STATE).read_text())
    with np.load(out / meta["arrays"], allow_pickle=False) as arrays:
        ids, lens, sources, sizes = arrays["ids"], arrays["lens"], arrays["sources"], arrays["group_sizes"]
        masks = arrays["masks"] if "masks" in arrays else None
    offsets = np.concatenate([[0], np.cumsum(lens)])
    docs = [Doc(ids[start:end], None if masks is None else masks[start:end], int(source))
            for start, end, source in zip(offsets[:-1], offsets[1:], sources)]
    groups, first = [], 0
    for size in sizes:
        groups.append(docs[first:first + size])
        first += size
    num_ready, num_open = meta["num_ready"], meta["num_open"]
    return meta, groups[:num_ready], groups[num_ready:num_ready + num_open], groups[-1]


def clear(out: Path) -> None:
    for path in [out / STATE, *out.glob(".prep-state-*.npz*"), out / (STATE + ".tmp")]:
        path.unlink(missing_ok=True)
