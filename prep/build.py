"""`prep build`: sources -> ChatML -> token ids -> mix -> pack -> shards + manifest.

The story, top to bottom: check every setting before any work; load the tokenizer; for each source
stream rows and check their messages, then render and tokenize them on a thread pool in batches of
~1M characters (one tiktoken call per batch; tiktoken releases the GIL, so N threads use N cores
while this thread reads); apply the long-document policy; interleave the sources by token share;
pack; write shards; write the manifest last.

Results come back in submission order, so the same inputs and seed give the same bytes whatever
`--workers` is. Peak memory is bounded by the packing window and the in-flight batches.
"""

import hashlib
import json
import os
import sys
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from prep.mix import Doc, Mixer, parse_mix
from prep.pack import BfdPacker, WrappedPacker
from prep.render import render, render_parts
from prep.settings import check_choices
from prep.shards import FORMAT, FORMAT_VERSION, MANIFEST, ShardWriter, write_json_atomic
from prep import state
from prep.sources import Reject, Source, check_spec, iter_rows, local_files, resolve_sources, to_messages
from prep.tokenizer import DEFAULT_TOKENIZER, Encoder, load_encoder

NUM_EXAMPLES = 5  # rejected rows shown per source
CHUNK_CHARS = 1 << 20  # characters of content per tokenizer call (~250k tokens, ~0.1 s of one core)


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
    """Replace a build already in --out."""
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


@dataclass
class SourceStats:
    rows_read: int = 0
    documents: int = 0
    tokens: int = 0
    rejected: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)
    truncated: int = 0
    truncated_tokens: int = 0
    dropped: int = 0
    dropped_tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self) | {"rejected": dict(self.rejected)}

    @classmethod
    def from_dict(cls, d: dict) -> "SourceStats":
        return cls(**(d | {"rejected": Counter(d["rejected"]), "examples": [tuple(e) for e in d["examples"]]}))

    def reject(self, row_number: int, reason: str) -> None:
        self.rejected[reason] += 1
        if len(self.examples) < NUM_EXAMPLES:
            self.examples.append((row_number, reason))


def tokenized_docs(index: int, source: Source, cfg: BuildConfig, encoder: Encoder,
                   pool: ThreadPoolExecutor, stats: SourceStats, in_flight: int,
                   budget: float | None = None) -> Iterator[Doc]:
    """Documents of one source, in row order. Rows are read and checked here, then rendered and
    tokenized on the pool in batches of about CHUNK_CHARS characters (one tokenizer call each, see
    Encoder.encode_batch), with up to `in_flight` batches ahead. `budget` is about how many tokens
    the mixer will take from this source (its share of --max-tokens): batches are not tokenized
    ahead beyond it, since the ones the mixer never takes cost CPU the others needed (2% of a
    50M-token build)."""
    assistant_only = cfg.loss_on == "assistant"

    def messages() -> Iterator[list | Reject]:
        """Each row's (role, content) messages, or its Reject, in row order."""
        for row in iter_rows(source.spec, start=stats.rows_read):
            try:
                if isinstance(row, Reject):
                    raise row
                yield to_messages(row)
            except Reject as reject:
                yield reject

    def encode(batch: list) -> list:
        """On the pool: a batch of rows' messages and Rejects -> Docs and the same Rejects."""
        rows = [item for item in batch if not isinstance(item, Reject)]
        if assistant_only:
            docs = iter([Doc(*_ids_and_mask(encoder, *render(row)), index) for row in rows])
        else:
            docs = iter([Doc(ids, None, index) for ids in encoder.encode_batch([render_parts(row) for row in rows])])
        return [item if isinstance(item, Reject) else next(docs) for item in batch]

    def chars(item) -> int:  # of the content: the ChatML markup around it is a few dozen per message
        return 0 if isinstance(item, Reject) else sum(len(content) for _, content in item)

    def worth_reading_ahead() -> bool:
        """Whether the mixer is likely to take another batch beyond those in the queue, guessing
        the queued batches' tokens from their characters at the rate seen so far."""
        if budget is None or not queue:
            return True
        tokens_per_char = seen_tokens / seen_chars if seen_chars else 0.25
        return stats.tokens + sum(batch_chars for batch_chars, _ in queue) * tokens_per_char < budget

    # Rows are accounted for when they leave the queue, so the counts stop exactly where the mixer stops.
    queue: deque = deque()  # (characters, future) of the batches ahead
    unread = batches(messages(), chars)
    row_number = stats.rows_read
    seen_chars = seen_tokens = 0
    try:
        while True:
            while len(queue) < in_flight and worth_reading_ahead() and (ahead := next(unread, None)) is not None:
                batch, batch_chars = ahead
                queue.append((batch_chars, pool.submit(encode, batch)))
            if not queue:
                return
            batch_chars, future = queue.popleft()
            tokens_before = stats.tokens
            for item in future.result():
                stats.rows_read += 1
                if isinstance(item, Reject):
                    stats.reject(row_number, item.args[0])
                else:
                    yield from _keep(item, cfg, stats)
                row_number += 1
            seen_chars += batch_chars
            seen_tokens += stats.tokens - tokens_before
    finally:  # the mixer stopped early: don't tokenize batches nobody will take
        for _, future in queue:
            future.cancel()


def batches(items: Iterator, chars_of) -> Iterator[tuple[list, int]]:
    """Consecutive items grouped until a group holds CHUNK_CHARS characters (one tokenizer call
    each), with the characters each group holds."""
    batch, chars = [], 0
    for item in items:
        batch.append(item)
        chars += chars_of(item)
        if chars >= CHUNK_CHARS:
            yield batch, chars
            batch, chars = [], 0
    if batch:
        yield batch, chars


def _ids_and_mask(encoder: Encoder, text: str, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Ids, and a loss mask that is 1 on tokens starting inside an assistant span (--loss-on assistant)."""
    ids, starts = encoder.encode_with_starts(text)
    mask = np.zeros(len(ids), dtype=np.uint8)
    for start, end in spans:
        mask[(starts >= start) & (starts < end)] = 1
    return ids, mask


def _keep(doc: Doc, cfg: BuildConfig, stats: SourceStats) -> Iterator[Doc]:
    """Apply --long truncate|drop (split happens in the packer) and count what's kept."""
    n = len(doc.ids)
    if n > cfg.seq_len and cfg.long == "drop":
        stats.dropped += 1
        stats.dropped_tokens += n
        return
    if n > cfg.seq_len and cfg.long == "truncate":
        stats.truncated += 1
        stats.truncated_tokens += n - cfg.seq_len
        doc = Doc(doc.ids[: cfg.seq_len], None if doc.mask is None else doc.mask[: cfg.seq_len], doc.source)
    stats.documents += 1
    stats.tokens += len(doc.ids)
    yield doc


def open_out_dir(out: Path, overwrite: bool, build_id: str, inputs: list) -> tuple[dict | None, tuple | None]:
    """Make `out` ready. Returns (manifest, None) when this very build is already finished there,
    (None, saved state) when a killed run of it can be resumed, and (None, None) for a fresh start."""
    ours = [p for p in out.iterdir() if p.name == MANIFEST or p.name.startswith(("shard-", ".prep-state"))] \
        if out.is_dir() else []
    if overwrite:
        for path in ours:
            path.unlink()
        ours = []
    if (out / MANIFEST).exists():
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("build_id") != build_id:
            raise ValueError(f"{out} holds a finished build with other settings; pass --overwrite or choose another --out")
        state.clear(out)
        return manifest, None
    saved = state.load(out)
    if saved is not None:
        meta = saved[0]
        if meta["build_id"] != build_id:
            raise ValueError(f"{out} holds an unfinished build with other settings; rerun it with its own settings, "
                             "or pass --overwrite to start over")
        if meta["inputs"] != inputs:
            raise ValueError(f"the input files changed since the unfinished build in {out} started; "
                             "pass --overwrite to start over")
        done = {s["file"] for s in meta["shards"]}
        for path in out.glob("shard-*"):  # written after the last saved state: it will be written again
            if path.name not in done:
                path.unlink()
        return None, saved
    if ours:
        raise ValueError(f"{out} holds shard files of an unknown build; pass --overwrite or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return None, None


def input_files(sources: list[Source]) -> list:
    """Path, size and mtime of every local input: a resumed build must read the same data."""
    files = []
    for source in sources:
        for path in local_files(source.spec) or []:
            st = os.stat(path)
            files.append([path, st.st_size, st.st_mtime_ns])
    return files


def build(cfg: BuildConfig, log=lambda msg: print(msg, file=sys.stderr)) -> dict:
    """Run (or resume, or recognise as done) a build and return its manifest.
    Raises ValueError for anything the user must fix."""
    shares = cfg.check()
    sources = resolve_sources(list(shares), cfg.sources, cfg.sample)
    for source in sources:
        check_spec(source.spec)
    encoder = load_encoder(cfg.tokenizer)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "workers", "progress", "overwrite")}
    identity = json.dumps({"settings": settings, "tokenizer": encoder.fingerprint}, sort_keys=True)
    build_id = "sha256:" + hashlib.sha256(identity.encode()).hexdigest()
    inputs = input_files(sources)
    out = Path(cfg.out)
    finished, saved = open_out_dir(out, cfg.overwrite, build_id, inputs)
    if finished is not None:
        log(f"{out} already holds this build (same settings and tokenizer): nothing to do")
        return finished
    workers = cfg.workers or os.cpu_count() or 1
    log(f"tokenizer {cfg.tokenizer}: vocab {encoder.vocab_size}, encoder {encoder.kind}"
        + (f" ({encoder.fallback_reason})" if encoder.fallback_reason else "") + f", {workers} threads")

    stats = [SourceStats() for _ in sources]
    packer = BfdPacker(cfg.seq_len, cfg.window) if cfg.packing == "bfd" else WrappedPacker(cfg.seq_len)
    writer = ShardWriter(out, cfg.seq_len, encoder.pad_id, cfg.loss_on == "assistant", cfg.rows_per_shard, build_id)
    counts = {"sequences": 0, "pieces": 0}
    mixer_tokens = [0] * len(sources)
    if saved is not None:
        meta, ready, open_, pending = saved
        stats = [SourceStats.from_dict(d) for d in meta["stats"]]
        packer.restore(ready, open_, pending, meta["num_split"])
        writer.shards, counts, mixer_tokens = meta["shards"], meta["counts"], meta["mixer_tokens"]
        log(f"resuming the unfinished build in {out}: {len(writer.shards)} shards done, "
            f"rows {[st.rows_read for st in stats]} read")

    def save_state():
        meta = {"build_id": build_id, "inputs": inputs, "shards": writer.shards, "counts": counts,
                "mixer_tokens": mixer.tokens, "num_split": packer.num_split, "stats": [st.to_dict() for st in stats]}
        state.save(out, meta, *packer.state())

    started = time.time()
    progress = _progress(cfg, initial=sum(mixer_tokens))
    pool = ThreadPoolExecutor(workers)
    try:
        streams = [tokenized_docs(i, s, cfg, encoder, pool, stats[i], in_flight=workers + 2,
                                  budget=cfg.max_tokens * shares[s.name] if cfg.max_tokens else None)
                   for i, s in enumerate(sources)]
        mixer = Mixer(streams, [shares[s.name] for s in sources], cfg.max_tokens, mixer_tokens)
        writer.on_shard = save_state
        if saved is None:
            save_state()  # from here on, a directory with shards always has a state or a manifest

        def write_ready():
            while packer.ready:
                seq = packer.ready.popleft()
                counts["sequences"] += 1
                counts["pieces"] += len(seq)
                writer.write(seq)  # may finish a shard, which saves the state

        for doc in mixer:
            progress.update(len(doc.ids))
            packer.add(doc)
            write_ready()
        for stream in streams:
            stream.close()  # stop reading sources the mixer no longer needs; their queued batches are cancelled
        packer.finish()
        write_ready()
    finally:  # don't wait for a batch still being tokenized: nobody will take it
        pool.shutdown(wait=False, cancel_futures=True)
    progress.close()
    shard_infos = writer.close()
    seconds = time.time() - started
    num_sequences, num_pieces = counts["sequences"], counts["pieces"]

    total_tokens = sum(mixer.tokens)
    for source, st in zip(sources, stats):
        bad = sum(st.rejected.values())
        if st.rows_read and bad / st.rows_read > cfg.max_bad_frac:
            raise ValueError(f"source {source.name!r} rejected {bad} of {st.rows_read} rows ({bad / st.rows_read:.1%}), "
                             f"more than --max-bad-frac {cfg.max_bad_frac:g}: {dict(st.rejected)}; "
                             f"first: {st.examples}. Fix the input or raise --max-bad-frac")
    if total_tokens == 0:
        raise ValueError("no document was produced: every source was empty or fully rejected")
    rejected = sum((st.rejected for st in stats), Counter())
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "build_id": build_id,
        "seq_len": cfg.seq_len,
        "pad_id": encoder.pad_id,
        "tokenizer": {"name": cfg.tokenizer, "vocab_size": encoder.vocab_size,
                      "fingerprint": encoder.fingerprint, "encoder": encoder.kind},
        "settings": settings,  # without out/workers/progress: the same build is the same bytes wherever it is written
        "loss_mask": cfg.loss_on == "assistant",
        "stopped_by": "max_tokens" if mixer.exhausted is None else f"source {sources[mixer.exhausted].name!r} ran out",
        "sources": [
            {"name": s.name, "spec": s.spec, "weight": shares[s.name], "requested_share": shares[s.name],
             "achieved_share": st.tokens / total_tokens, "rows_read": st.rows_read, "documents": st.documents,
             "tokens": st.tokens, "rejected": dict(sorted(st.rejected.items())),
             "rejected_examples": [{"row": r, "reason": why} for r, why in st.examples]}
            for s, st in zip(sources, stats)
        ],
        "counts": {
            "sequences": num_sequences,
            "documents": sum(st.documents for st in stats),
            "pieces": num_pieces,
            "tokens": total_tokens,
            "padding": num_sequences * cfg.seq_len - total_tokens,
            "split": packer.num_split,
            "truncated": sum(st.truncated for st in stats),
            "truncated_tokens": sum(st.truncated_tokens for st in stats),
            "dropped": sum(st.dropped for st in stats),
            "dropped_tokens": sum(st.dropped_tokens for st in stats),
            "rejected": dict(sorted(rejected.items())),
        },
        "shards": shard_infos,
    }
    write_json_atomic(out / MANIFEST, manifest)
    state.clear(out)
    log(summary(manifest, seconds))
    return manifest


def summary(manifest: dict, seconds: float) -> str:
    c = manifest["counts"]
    fill = c["tokens"] / max(1, c["sequences"] * manifest["seq_len"])
    lines = [f"wrote {c['sequences']} sequences x {manifest['seq_len']} in {len(manifest['shards'])} shards: "
             f"{c['tokens']:,} tokens from {c['documents']:,} documents, fill {fill:.2%}, "
             f"{c['tokens'] / max(seconds, 1e-9) / 1e6:.2f} M tokens/s; stopped by {manifest['stopped_by']}"]
    for s in manifest["sources"]:
        lines.append(f"  {s['name']}: share {s['achieved_share']:.2%} (asked {s['requested_share']:.2%}), "
                     f"{s['documents']:,} documents of {s['rows_read']:,} rows")
        if s["rejected"]:
            lines.append(f"    rejected {sum(s['rejected'].values())}: {s['rejected']}; first rows: "
                         + ", ".join(f"#{e['row']} {e['reason']}" for e in s["rejected_examples"]))
    lines.append(f"  split {c['split']}, truncated {c['truncated']} ({c['truncated_tokens']:,} tokens), "
                 f"dropped {c['dropped']} ({c['dropped_tokens']:,} tokens)")
    return "\n".join(lines)


def _progress(cfg: BuildConfig, initial: int):
    from tqdm import tqdm

    return tqdm(total=cfg.max_tokens, initial=initial, unit="tok", unit_scale=True, desc="prep build",
                disable=not (cfg.progress and sys.stderr.isatty()))
