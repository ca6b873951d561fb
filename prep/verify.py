"""`prep verify`: prove a shard directory is what its manifest says, before it costs GPU weeks.

  prep verify shards/          # every check; exit 0 with one OK line, else a report and exit 1
  prep verify shards/ --fast   # skip sha256 (hashing is ~most of the time on a big build)

Checks (those of prep/shards.py's reader, which the trainer runs too), per shard: the file exists under a plain name, its sha256 matches the manifest, its Arrow
schema is the one `prep build` writes for this seq_len and loss-mask setting, it reads to the end,
its row count matches. Per row: no nulls, doc_lens and doc_sources have the same number of
entries, every doc_lens entry > 0 and their sum <= seq_len, every position after the documents
is pad_id, every id < vocab_size, every doc_sources index names a manifest source, loss_mask is
0/1 and 0 on padding. Unlike the other readers, verify goes on past a problem and lists them all. Then the manifest's totals (sequences, tokens, pieces, padding, per-source
tokens) must equal what the data adds up to, and the directory must hold nothing else (but the build
lock, `.prep-lock`, which every build keeps: prep/lock.py).

Memory stays flat: shards are memory-mapped and checked one record batch (64 rows, 8 MiB at 32k)
at a time with vectorised numpy (scripts/bench_shards.py times it against sha256).
"""

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from prep.shards import LOCK, MANIFEST, ShardFile, iter_batches, list_parts, read_manifest, row_faults, shard_files

ROWS_SHOWN = 5  # bad rows listed per shard and check; the rest are counted


@dataclass
class Problem:
    # what failed: name, missing, sha256, build, schema, read, rows, nulls, doc_lens, doc_sources, padding, ids,
    # loss_mask, totals, extra-file
    check: str
    message: str
    shard: str | None = None  # file name, None for the manifest or the directory
    row: int | None = None  # row within the shard (the first bad one)
    sequence: int | None = None  # the same row counted across the build, as `prep show --seq` takes it

    def __str__(self) -> str:
        where = self.shard or MANIFEST
        if self.row is not None:
            where += f" row {self.row}" + (f" (--seq {self.sequence})" if self.sequence is not None else "")
        return f"{where}: {self.check}: {self.message}"


@dataclass
class Totals:
    sequences: int = 0
    tokens: int = 0
    pieces: int = 0
    source_tokens: np.ndarray | None = None


@dataclass
class BadRows:
    """Rows of one shard that failed a check: per check, how many, and the first few with what was wrong."""

    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=lambda: defaultdict(list))

    def add(self, check: str, rows: np.ndarray, which: np.ndarray, detail) -> None:
        found = np.flatnonzero(which)
        self.counts[check] += len(found)
        room = max(0, ROWS_SHOWN - len(self.examples[check]))
        self.examples[check] += [(int(rows[index]), detail(index)) for index in found[:room]]

    def problems(self, shard: str, first_sequence: int) -> list[Problem]:
        out = []
        for check, count in self.counts.items():
            if not count:
                continue
            (row, detail), *rest = self.examples[check]
            if count > 1:
                detail += (f" (and {count - 1} more rows: {', '.join(str(other) for other, _ in rest)}"
                           + (", ..." if count > 1 + len(rest) else "") + ")")
            out.append(Problem(check, detail, shard, row, first_sequence + row))
        return out


def check_batch(batch: pa.RecordBatch, first_row: int, manifest: dict, totals: Totals, bad: BadRows) -> None:
    """Every row check of one record batch (prep.shards.row_faults), and its share of the totals."""
    rows = np.arange(first_row, first_row + batch.num_rows)
    for check, which, detail in row_faults(batch, manifest):
        bad.add(check, rows, which, detail)
    lens = list_parts(batch.column("doc_lens"))[0].astype(np.int64)
    srcs = list_parts(batch.column("doc_sources"))[0]
    totals.sequences += batch.num_rows
    totals.tokens += int(lens.sum())
    totals.pieces += len(lens)
    num_sources = len(manifest["sources"])
    ok = srcs < num_sources
    if len(srcs) == len(lens):
        totals.source_tokens += np.bincount(srcs[ok], weights=lens[ok], minlength=num_sources).astype(np.int64)


def check_shard(shard: ShardFile, manifest: dict, totals: Totals, fast: bool) -> list[Problem]:
    """Every problem of one shard: what the reader checks of the file, then every row."""
    name, problems, bad, rows = shard.path.name, [], BadRows(), 0

    def report(check: str, message: str, row: int | None = None) -> None:
        problems.append(Problem(check, message, name, row, None if row is None else shard.first_row + row))

    for batch in iter_batches(shard, manifest, check_hash=not fast, report=report):
        check_batch(batch, rows, manifest, totals, bad)
        rows += batch.num_rows
    return problems + bad.problems(name, shard.first_row)


def check_totals(manifest: dict, totals: Totals) -> list[Problem]:
    """The manifest's counts against what the rows add up to."""
    counts, T = manifest["counts"], manifest["seq_len"]
    data = {"sequences": totals.sequences, "tokens": totals.tokens, "pieces": totals.pieces,
            "padding": totals.sequences * T - totals.tokens}
    problems = [Problem("totals", f"counts.{key} is {counts.get(key)} but the data has {value}")
                for key, value in data.items() if counts.get(key) != value]
    listed = sum(entry.get("rows", 0) for entry in manifest["shards"])
    if listed != counts.get("sequences"):
        problems.append(Problem("totals", f"shard rows add up to {listed} but counts.sequences is "
                                          f"{counts.get('sequences')}"))
    for source, tokens in zip(manifest["sources"], totals.source_tokens.tolist()):
        name, share = source.get("name"), source.get("achieved_share", 0)
        if source.get("tokens") != tokens:
            problems.append(Problem("totals", f"source {name!r} has tokens {source.get('tokens')} but the data has "
                                              f"{tokens}"))
        elif totals.tokens and abs(share - tokens / totals.tokens) > 1e-9:
            problems.append(Problem("totals", f"source {name!r} has achieved_share {share} but the data gives "
                                              f"{tokens / totals.tokens}"))
    documents = sum(source.get("documents", 0) for source in manifest["sources"])
    if documents != counts.get("documents"):
        problems.append(Problem("totals", f"counts.documents is {counts.get('documents')} but the sources add up "
                                          f"to {documents}"))
    return problems


def verify(out_dir, fast: bool = False) -> list[Problem]:
    """Every problem found in a build directory ([] when it's sound). ValueError when it is no build at all."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    problems: list[Problem] = []
    totals = Totals(source_tokens=np.zeros(len(manifest["sources"]), np.int64))
    shards = shard_files(out_dir, manifest, report=lambda check, message: problems.append(Problem(check, message)))
    complete = None not in shards
    for shard in filter(None, shards):
        found = check_shard(shard, manifest, totals, fast)
        complete = complete and not any(problem.check in ("missing", "read", "schema") for problem in found)
        problems += found
    if complete:  # totals over a partly unread build would only repeat the problems above
        problems += check_totals(manifest, totals)
    listed = {shard.path.name for shard in shards if shard}
    for path in sorted(out_dir.iterdir()):
        if path.name not in (MANIFEST, LOCK) and path.name not in listed:
            problems.append(Problem("extra-file", "not part of this build (the manifest doesn't list it)", path.name))
    return problems
