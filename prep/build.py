"""`prep build`: sources -> ChatML -> token ids -> mix -> pack -> shards + manifest.

The story, top to bottom: check every setting before any work; load the tokenizer; find out what
`--out` holds (done, resumable, or fresh); then run the stages, each a generator over the one
before it, in the module named for it:

    read (sources) -> check -> render -> encode (tokenizer) -> long-document policy (pack)
        -> documents, mix (mix) -> pack -> write (shards)

One such chain per source up to `documents`; the mixer interleaves them. Reading, checking and
rendering run on a thread per source (`ReadAhead`), with Arrow kernels that release the GIL; encoding
runs on a thread pool, several batches ahead, with fastokens releasing the GIL, and its results
come back in submission order, so the same inputs and settings give the same bytes whatever
`--workers` is. This thread mixes and packs; the shards are written, hashed and fsynced on a
writer thread, which also saves the resume state after every shard (prep.shards.ShardWriter).
The manifest is written last. Peak memory is bounded by the batches in flight, the packing
window and the writer's few record batches; Arrow and the rest share one malloc (`one_heap`).
While the tokenizer loads (1-2 s, on a thread of its own), the readers read further ahead, taking
turns on the cores the load leaves free.

Faults a cluster throws: one build per `--out` (prep/lock.py); SIGTERM or SIGUSR1 stops at the
next shard, resumable (prep/preempt.py); a full disk stops with one line (prep/shards.py,
DiskFull), resumable once there is space; changed local inputs refuse a resume (prep/state.py).
"""

import contextlib
import ctypes
import hashlib
import itertools
import json
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator, Literal

import pyarrow as pa

from prep import state
from prep.check import check
from prep.mix import Doc, Mixer, SourceStats, documents, parse_mix
from prep.lock import lock_build
from prep.pack import BfdPacker, WrappedPacker, long_documents, pack
from prep.preempt import StopSignals, stop_signals
from prep.render import render
from prep.settings import check_choices
from prep.shards import MANIFEST, ShardWriter, manifest, write, write_json_atomic
from prep.sources import Batch, Source, check_spec, local_files, num_rows, read, resolve_sources
from prep.tokenizer import DEFAULT_TOKENIZER, Encoder, encode, load_encoder

# Text the readers may read ahead, all sources together, while the tokenizer loads (1-2 s in which
# nothing can be encoded): about what one core reads, checks and renders meanwhile. Each source
# gets its share of the mix, so that all are as far along when encoding starts.
WARM_UP_BYTES = 128 << 20


@dataclass
class BuildConfig:
    mix: str = "nemotron=0.5,ot3=0.5"
    """Target token shares, NAME=WEIGHT,...; names are presets (nemotron, ot3) or --source names."""
    sources: dict[str, str] = field(default_factory=dict)
    """NAME -> SPEC overrides: hub id[:config:split], or a local file, directory or glob."""
    sample: bool = False
    """Read the embedded generated sample instead of the hub presets."""
    out: str = "shards"
    """Output directory for shard-NNNNN.arrow files and manifest.json."""
    overwrite: bool = False
    """Replace a build already in --out (never while another build holds its lock)."""
    tokenizer: str = DEFAULT_TOKENIZER
    """Hub id or local directory of the tokenizer."""
    seq_len: int = 32768
    """Tokens per packed sequence."""
    packing: Literal["bfd", "wrapped"] = "bfd"
    """bfd (best-fit decreasing, documents kept whole) or wrapped (concatenate and cut)."""
    long: Literal["split", "truncate", "drop"] = "split"
    """Documents longer than seq_len: split (no token lost), truncate, or drop."""
    loss_on: Literal["all", "assistant"] = "all"
    """all (the recipe) or assistant (write a loss_mask covering assistant content only)."""
    max_tokens: int | None = None
    """Stop once this many tokens are mixed (the crossing document is kept whole); default: until a source runs out."""
    max_bad_frac: float = 0.01
    """Fail when a source rejects more than this fraction of its rows."""
    rows_per_shard: int = 1024
    """Sequences per shard file (1024 x 32k tokens = 128 MiB)."""
    window: int = 256
    """BFD window, in sequences: bigger packs tighter and holds more in memory (256 x 32k x 4 B = 32 MiB)."""
    workers: int = 0
    """Tokenizer threads; 0 = all cores. Output bytes do not depend on it."""
    seed: int = 42
    """Recorded for the trainer's shuffle; the build itself is deterministic without randomness."""
    progress: bool = True
    """Show a progress bar (only on a terminal)."""

    def check(self) -> dict[str, float]:
        """Validate everything a user can get wrong, before any work starts; returns the shares."""
        shares = parse_mix(self.mix)
        unknown = sorted(set(self.sources) - set(shares))
        if unknown:
            raise ValueError(f"--source names {', '.join(unknown)} which --mix doesn't use; add them to --mix")
        check_choices(self)
        if self.seq_len < 16:
            raise ValueError("--seq-len must be at least 16")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ValueError("--max-tokens must be positive")
        if not 0 <= self.max_bad_frac <= 1:
            raise ValueError("--max-bad-frac must be between 0 and 1")
        if self.rows_per_shard < 1 or self.window < 1 or self.workers < 0:
            raise ValueError("--rows-per-shard and --window must be >= 1, --workers >= 0")
        return shares

    def settings(self) -> dict:
        """The settings that decide the output bytes: all but where it goes and how it runs."""
        return {key: value for key, value in asdict(self).items() if key not in ("out", "workers", "progress", "overwrite")}


def build(cfg: BuildConfig, log=lambda msg: print(msg, file=sys.stderr)) -> dict:
    """Run (or resume, or recognise as done) a build and return its manifest. Raises ValueError for
    anything the user must fix (Locked when another build holds --out), Preempted when SIGTERM or
    SIGUSR1 stopped it at a clean point, DiskFull when a write found no space: after the last two,
    the same call resumes."""
    shares = cfg.check()
    one_heap()
    # The signals first, so one during the slow start-up (the tokenizer) stops cleanly too, and a
    # lock record on disk means they are handled. Then the tokenizer: fastokens loads on a thread of
    # its own (1-2 s, the longest step of the start-up), and everything after runs meanwhile. The
    # lock before anything looks at --out (--overwrite must not delete what a live build writes).
    with stop_signals() as stop:
        encoder = load_encoder(cfg.tokenizer)
        sources = resolve_sources(list(shares), cfg.sources, cfg.sample)
        for source in sources:
            check_spec(source.spec)
        out = Path(cfg.out)
        with lock_build(out):
            return run(cfg, shares, sources, encoder, out, stop, log)


def run(cfg: BuildConfig, shares: dict[str, float], sources: list[Source], encoder: Encoder, out: Path,
        stop: StopSignals, log) -> dict:
    """build() holding the lock, with `stop` checked once the state is saved: before the stages and
    after every shard."""
    settings = cfg.settings()
    identity = json.dumps({"settings": settings, "tokenizer": encoder.fingerprint}, sort_keys=True)
    build_id = "sha256:" + hashlib.sha256(identity.encode()).hexdigest()
    inputs = input_files(sources)
    finished, saved = state.prepare(out, cfg.overwrite, build_id, inputs)
    if finished is not None:
        log(f"{out} already holds this build (same settings and tokenizer): nothing to do")
        return finished
    workers = cfg.workers or os.cpu_count() or 1
    log(f"tokenizer {cfg.tokenizer}: vocab {encoder.vocab_size}, encoder {encoder.kind}"
        + (f" ({encoder.fallback_reason})" if encoder.fallback_reason else "") + f", {workers} threads")

    stats = [SourceStats() for _ in sources]
    packer = BfdPacker(cfg.seq_len, cfg.window) if cfg.packing == "bfd" else WrappedPacker(cfg.seq_len)
    writer = ShardWriter(out, cfg.seq_len, encoder.pad_id, cfg.loss_on == "assistant", cfg.rows_per_shard, build_id)
    mixer_tokens = None
    if saved is not None:
        meta, ready, open_, pending = saved
        stats = [SourceStats.from_dict(saved_stats) for saved_stats in meta["stats"]]
        packer.restore(ready, open_, pending, meta["counts"])
        writer.shards, mixer_tokens = meta["shards"], meta["mixer_tokens"]
        log(f"resuming the unfinished build in {out}: {len(writer.shards)} shards done, "
            f"rows {[given.rows_read for given in stats]} read")

    started = time.time()
    pool = ThreadPoolExecutor(workers)
    readers = []
    try:  # the stages: one chain per source up to the mixer (module docstring)
        # while the tokenizer loads, the readers take turns on the cores it leaves free: with every
        # reader on a core of its own, the load took 2.4 s instead of 1.6 on 2 cores
        turns = Turns(max(1, (os.cpu_count() or 1) - 1))
        readers = [ReadAhead(render(check(read(source.spec, index, given.rows_read)), spans=cfg.loss_on == "assistant"),
                             warm_up=encoder.loading, warm_up_bytes=int(WARM_UP_BYTES * shares[source.name]),
                             warm_up_turns=turns)
                   for index, (source, given) in enumerate(zip(sources, stats))]
        streams = [documents(long_documents(encode(reader, encoder, pool, in_flight=workers + 2,
                                                   budget=cfg.max_tokens * shares[source.name] if cfg.max_tokens else None,
                                                   taken=lambda given=given: given.tokens),
                                            cfg.long, cfg.seq_len), given)
                   for source, reader, given in zip(sources, readers, stats)]
        mixer = Mixer(streams, [shares[source.name] for source in sources], cfg.max_tokens, mixer_tokens)
        # The resume state after each shard: taken when its last row goes to the writer thread, saved
        # there once the shard is renamed (prep.shards.ShardWriter)
        writer.snapshot = partial(snapshot_state, stats, mixer, packer)
        writer.on_shard = partial(save_state, out, build_id, inputs, writer)

        def shard_handed_over() -> None:
            if stop.received:  # a clean point: that shard written and its state saved (prep/preempt.py)
                writer.drain()
                stop.check(len(writer.shards))

        writer.on_handover = shard_handed_over
        if saved is None:  # from here on, a directory with shards always has a state or a manifest
            save_state(out, build_id, inputs, writer, writer.snapshot())
        stop.check(len(writer.shards))
        progress = Progress(cfg, sources, shares, stats)
        shards = write(pack(progress.track(mixer), packer), writer)
        progress.close()
    finally:  # stop the readers, and don't wait for a batch still being encoded: nobody will take it
        for reader in readers:
            reader.close()
        pool.shutdown(wait=False, cancel_futures=True)

    for source, given in zip(sources, stats):  # what each source gave the build
        bad = sum(given.rejected.values())
        if given.rows_read and bad / given.rows_read > cfg.max_bad_frac:
            raise ValueError(f"source {source.name!r} rejected {bad} of {given.rows_read} rows ({bad / given.rows_read:.1%}), "
                             f"more than --max-bad-frac {cfg.max_bad_frac:g}: {dict(given.rejected)}; "
                             f"first: {given.examples}. Fix the input or raise --max-bad-frac")
    if sum(mixer.tokens) == 0:
        raise ValueError("no document was produced: every source was empty or fully rejected")
    result = manifest(
        build_id=build_id, seq_len=cfg.seq_len, pad_id=encoder.pad_id,
        tokenizer={"name": cfg.tokenizer, "vocab_size": encoder.vocab_size, "fingerprint": encoder.fingerprint,
                   "encoder": encoder.kind},
        settings=settings, loss_mask=cfg.loss_on == "assistant", stopped_by=mixer.stopped_by([source.name for source in sources]),
        sources=[{"name": source.name, "spec": source.spec, "share": shares[source.name]} | given.to_dict()
                 for source, given in zip(sources, stats)],
        packing={"sequences": packer.num_sequences, "pieces": packer.num_pieces, "split": packer.num_split},
        shards=shards)
    write_json_atomic(out / MANIFEST, result, what="manifest")
    state.clear(out)
    log(summary(result, time.time() - started))
    return result


class ReadAhead:
    """`batches` produced on a thread of their own, up to `depth` ahead, from the moment it is made
    (not when first asked: every source reads while the tokenizer loads). Reading, checking and
    rendering are Arrow kernels, which release the GIL, so each source's reader runs beside this
    thread (mixing, packing, writing) and the encoder threads: on one core this thread alone would
    cap a build at ~45M tokens/s (`scripts/bench_prep.py --serial`). While `warm_up()` holds (the
    tokenizer is loading: 1-2 s in which nothing can be encoded) it reads on, up to `warm_up_bytes`
    of text, so that time isn't lost to reading later, each batch holding one of `warm_up_turns`
    (shared by the build's readers, the one furthest behind first) so that the load keeps a core to
    itself. Order is kept, so the bytes don't change; `close()` stops the thread."""

    def __init__(self, batches: Iterator[Batch], depth: int = 4, warm_up=lambda: False, warm_up_bytes: int = 0,
                 warm_up_turns: "Turns | None" = None):
        self.depth, self.warm_up, self.warm_up_bytes = depth, warm_up, warm_up_bytes
        self.warm_up_turns = warm_up_turns or Turns(1)
        self.queue: deque = deque()  # (batch, or None at the end, or an error; its bytes of text)
        self.queued_bytes = 0
        self.read_bytes = 0  # of text, since the start: how far along its warm-up this reader is
        self.changed = threading.Condition()  # an item in, or one out
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._produce, args=(batches,), daemon=True, name="prep-reader")
        self.thread.start()

    def __iter__(self) -> "ReadAhead":
        return self

    def __next__(self) -> Batch:
        with self.changed:
            while not self.queue:
                self.changed.wait()
            item, num_bytes = self.queue[0]
            if isinstance(item, Batch):  # the end, or an error, stays at the head: asked again, it says the same
                self.queue.popleft()
                self.queued_bytes -= num_bytes
                self.changed.notify_all()
        if item is None:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stopped.set()

    def _has_room(self) -> bool:
        return len(self.queue) < self.depth or (self.queued_bytes < self.warm_up_bytes and self.warm_up())

    def _put(self, item, num_bytes: int = 0) -> None:
        with self.changed:
            while not self.stopped.is_set() and not self._has_room():
                self.changed.wait(0.05)  # also wakes up to see the warm-up end
            self.queue.append((item, num_bytes))
            self.queued_bytes += num_bytes
            self.changed.notify_all()

    def _produce(self, batches: Iterator[Batch]) -> None:
        try:
            while True:
                behind = self.read_bytes / max(1, self.warm_up_bytes)
                with self.warm_up_turns.turn(behind) if self.warm_up() else contextlib.nullcontext():
                    batch = next(batches, None)
                if batch is None:
                    break
                num_bytes = 0 if batch.text_bytes is None else int(batch.text_bytes.sum())
                self.read_bytes += num_bytes
                self._put(batch, num_bytes)
                if self.stopped.is_set():
                    return
            self._put(None)
        except BaseException as error:  # raised again on the consuming thread
            self._put(error)


class Turns:
    """`slots` turns, each given to the waiting reader furthest behind: the least share of its
    warm-up read so far, the first to ask on a tie. (First come first served, the sources took
    turns batch by batch, and a source whose rows are longer read more bytes per turn: on the
    peers' corpus OT3's rows are 2.5x Nemotron's, so OT3 filled its warm-up while Nemotron was
    left to read alone after the load, holding the build back. A Semaphore was worse: the thread
    that gave a turn back took it again at once.)"""

    def __init__(self, slots: int):
        self.free = slots
        self.waiting: list = []  # (how far behind, arrival) per thread waiting for a turn
        self.arrivals = itertools.count()
        self.changed = threading.Condition()

    @contextlib.contextmanager
    def turn(self, behind: float = 0.0):
        with self.changed:
            token = (behind, next(self.arrivals))
            self.waiting.append(token)
            self.changed.wait_for(lambda: self.free and min(self.waiting) == token)
            self.waiting.remove(token)
            self.free -= 1
            self.changed.notify_all()  # the next in line may have a free slot too
        try:
            yield
        finally:
            with self.changed:
                self.free += 1
                self.changed.notify_all()


def snapshot_state(stats: list[SourceStats], mixer: Mixer, packer: BfdPacker | WrappedPacker) -> tuple:
    """What a killed build needs to resume at this point, copied: the stages go on while it is saved."""
    meta = {"mixer_tokens": list(mixer.tokens), "stats": [given.to_dict() for given in stats],
            "counts": {"sequences": packer.num_sequences, "pieces": packer.num_pieces, "split": packer.num_split}}
    return meta, *packer.state()


def save_state(out: Path, build_id: str, inputs: list, writer: ShardWriter, snapshot: tuple) -> None:
    """After every finished shard (and once before the first): the snapshot taken when its last row
    was handed over, with the shards written so far."""
    meta, ready, open_, pending = snapshot
    state.save(out, {"build_id": build_id, "inputs": inputs, "shards": list(writer.shards)} | meta, ready, open_, pending)


def one_heap(arenas: int = 2) -> None:
    """Arrow allocates from glibc's malloc, as Python, numpy and fastokens do, and glibc keeps at
    most `arenas` arenas (M_ARENA_MAX); both for the whole process, before the build starts its
    threads. By default Arrow has a heap of its own (mimalloc), so the text read ahead while the
    tokenizer loads and the ids that follow never reuse each other's freed memory; and a thread
    that allocates may get a glibc arena of its own (up to 8 per core), where what is freed stays.
    Measured at 200M tokens (BENCHMARKS.md): ~250 MB freed but not given back (mallinfo2) with the
    default arenas, peak RSS 930-950 -> 780-800 MB with 2; then 863 -> 798 MB and 7.6 -> 7.1 s with
    Arrow on malloc. Other C libraries (macOS, musl) have no mallopt or ignore it."""
    pa.set_memory_pool(pa.system_memory_pool())
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(-8, arenas)  # M_ARENA_MAX in glibc's malloc.h


def input_files(sources: list[Source]) -> list:
    """Path, size and mtime of every local input: a resumed build must read the same data."""
    files = []
    for source in sources:
        for path in local_files(source.spec) or []:
            status = os.stat(path)
            files.append([path, status.st_size, status.st_mtime_ns])
    return files


class Progress:
    """A progress bar of the tokens mixed, with tokens/s and, when the total can be known, an ETA.
    The total is --max-tokens; without it, when every source's row count is in its metadata
    (parquet footers), the build ends when the first source runs out, so the total is estimated
    from each source's tokens per row so far."""

    def __init__(self, cfg: BuildConfig, sources: list[Source], shares: dict[str, float], stats: list[SourceStats]):
        from tqdm import tqdm

        self.stats, self.shares = stats, [shares[source.name] for source in sources]
        self.num_rows = None if cfg.max_tokens else [num_rows(source.spec) for source in sources]
        self.bar = tqdm(total=cfg.max_tokens, initial=sum(given.tokens for given in stats), unit="tok", unit_scale=True,
                        desc="prep build", disable=not (cfg.progress and sys.stderr.isatty()))

    def track(self, docs: Iterator[Doc]) -> Iterator[Doc]:
        if self.bar.disable:  # no terminal, or --no-progress: nothing to draw, nothing to estimate
            yield from docs
            return
        for doc in docs:
            self.bar.update(len(doc.ids))
            if self.num_rows and None not in self.num_rows:
                self.bar.total = max(self.estimate() or 0, self.bar.n)
            yield doc

    def estimate(self) -> int | None:
        """Tokens mixed by the time the first source runs out, from each source's rows and tokens so far."""
        totals = [given.tokens * rows / given.rows_read / share
                  for given, rows, share in zip(self.stats, self.num_rows, self.shares) if given.rows_read]
        return int(min(totals)) if totals else None

    def close(self) -> None:
        self.bar.total = self.bar.n  # done: the document that crossed --max-tokens went past the total
        self.bar.close()


def summary(manifest: dict, seconds: float) -> str:
    """What a build wrote, in a few lines for the terminal."""
    counts = manifest["counts"]
    fill = counts["tokens"] / max(1, counts["sequences"] * manifest["seq_len"])
    lines = [f"wrote {counts['sequences']} sequences x {manifest['seq_len']} in {len(manifest['shards'])} shards: "
             f"{counts['tokens']:,} tokens from {counts['documents']:,} documents, fill {fill:.2%}, "
             f"{counts['tokens'] / max(seconds, 1e-9) / 1e6:.2f} M tokens/s; stopped by {manifest['stopped_by']}"]
    for source in manifest["sources"]:
        lines.append(f"  {source['name']}: share {source['achieved_share']:.2%} (asked {source['requested_share']:.2%}), "
                     f"{source['documents']:,} documents of {source['rows_read']:,} rows")
        if source["rejected"]:
            lines.append(f"    rejected {sum(source['rejected'].values())}: {source['rejected']}; first rows: "
                         + ", ".join(f"#{example['row']} {example['reason']}" for example in source["rejected_examples"]))
    lines.append(f"  split {counts['split']}, truncated {counts['truncated']} ({counts['truncated_tokens']:,} tokens), "
                 f"dropped {counts['dropped']} ({counts['dropped_tokens']:,} tokens)")
    if counts["encoder_fallbacks"]:
        lines.append(f"  {counts['encoder_fallbacks']} documents encoded by tokenizers: fastokens failed on them "
                     "(same ids, slower)")
    return "\n".join(lines)
