"""Look inside a shard directory: `prep inspect` (what is in it) and `prep show` (one sequence, decoded).

  prep inspect shards/            # a table: fill, documents per sequence, lengths and shares per source
  prep inspect shards/ --json     # the same as one JSON object (keys below)
  prep show shards/ --seq 17      # packed sequence 17, document by document

`inspect` reads the manifest and the small `doc_lens`/`doc_sources` columns of a memory map, never
`input_ids`: at 32k tokens a row is 128 KiB of ids and a few bytes of lengths, so a 35B-token build
(~1M sequences, 128 GiB) is summarised from ~50 MiB of pages.

Documents and pieces: each entry of `doc_lens` is a document, or one piece of a document longer
than seq_len that the build split (`--long split`). The shards don't record which pieces belong
together (BFD packs a split document's remainder into a later window), so nothing here pretends
to rebuild documents: "documents per sequence" counts doc_lens entries and lengths are piece
lengths (never above seq_len). The manifest's count of whole source documents is reported next
to them.

Keys of `inspect --json` (and of the dict `inspect()` returns):
  dir, seq_len, pad_id, loss_mask, tokenizer {name, vocab_size, encoder, fingerprint},
  packing, long, stopped_by, shards        number of shard files
  sequences, tokens, padding               counted from doc_lens (tokens = sum of doc_lens)
  fill                                     tokens / (sequences * seq_len), the non-padding share
  pieces                                   doc_lens entries; documents: source documents (manifest)
  docs_per_sequence {mean, p50, p99, min, max}   doc_lens entries (pieces) per sequence
  doc_len {mean, p50, p90, p99, max}       piece lengths over all sources
  sources [{name, requested_share, achieved_share (from doc_lens), tokens, pieces, documents,
            rows_read, rejected {reason: n}, doc_len {mean, p50, p90, p99, max}}]
  split, truncated, truncated_tokens, dropped, dropped_tokens, rejected {reason: n}
Percentiles are numpy's default (linear interpolation).
"""

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from prep.shards import as_numpy, fingerprint, iter_batches, list_parts, read_manifest, shard_files

LAYOUT_COLUMNS = ["doc_lens", "doc_sources"]


@dataclass
class Layout:
    """Where the tokens are, for every sequence of a build: one entry per doc_lens entry or per row."""

    manifest: dict
    lens: np.ndarray  # every doc_lens entry, in order
    sources: np.ndarray  # its doc_sources entry
    row_pieces: np.ndarray  # doc_lens entries per sequence
    row_tokens: np.ndarray  # sum(doc_lens) per sequence


def read_layout(out_dir) -> Layout:
    """The doc_lens and doc_sources of every row of a build, as flat arrays (never input_ids)."""
    manifest = read_manifest(out_dir)
    lens, sources, row_pieces, row_tokens = [], [], [], []
    for shard in shard_files(out_dir, manifest):
        for batch in iter_batches(shard, manifest, columns=LAYOUT_COLUMNS):
            values, offsets = list_parts(batch.column("doc_lens"))
            csum = np.concatenate([[0], np.cumsum(values, dtype=np.int64)])
            # copies (a few bytes per document), so no shard's memory map outlives its loop
            lens.append(values.astype(np.int64))
            sources.append(list_parts(batch.column("doc_sources"))[0].astype(np.int64))
            row_pieces.append(np.diff(offsets))
            row_tokens.append(csum[offsets[1:]] - csum[offsets[:-1]])

    def cat(parts):
        return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.zeros(0, np.int64)

    return Layout(manifest, cat(lens), cat(sources), cat(row_pieces), cat(row_tokens))


def describe(values: np.ndarray, percentiles=(50, 90, 99)) -> dict:
    """Mean, the given percentiles and max of `values` (zeros when there are none)."""
    if len(values) == 0:
        return {"mean": 0.0, **{f"p{pct}": 0.0 for pct in percentiles}, "max": 0}
    return {"mean": float(values.mean()), **{f"p{pct}": float(np.percentile(values, pct)) for pct in percentiles},
            "max": int(values.max())}


def inspect(out_dir) -> dict:
    """Everything `prep inspect` shows, as a dict with the keys documented at the top of this file."""
    layout = read_layout(out_dir)
    manifest, counts = layout.manifest, layout.manifest["counts"]
    num_seq, tokens = len(layout.row_tokens), int(layout.row_tokens.sum())
    per_seq = describe(layout.row_pieces, (50, 99))
    per_seq["min"] = int(layout.row_pieces.min()) if num_seq else 0
    sources = []
    for index, source in enumerate(manifest["sources"]):
        mine = layout.lens[layout.sources == index]
        sources.append({
            "name": source["name"], "requested_share": source.get("requested_share"),
            "achieved_share": float(mine.sum() / tokens) if tokens else 0.0,
            "tokens": int(mine.sum()), "pieces": len(mine), "documents": source.get("documents"),
            "rows_read": source.get("rows_read"), "rejected": source.get("rejected", {}), "doc_len": describe(mine),
        })
    seq_len, settings = manifest["seq_len"], manifest.get("settings", {})
    return {
        "dir": str(out_dir), "seq_len": seq_len, "pad_id": manifest["pad_id"],
        "loss_mask": manifest.get("loss_mask", False),
        "tokenizer": {key: manifest["tokenizer"].get(key) for key in ("name", "vocab_size", "encoder", "fingerprint")},
        "packing": settings.get("packing"), "long": settings.get("long"),
        "stopped_by": manifest.get("stopped_by"), "shards": len(manifest["shards"]),
        "sequences": num_seq, "tokens": tokens, "padding": num_seq * seq_len - tokens,
        "fill": tokens / (num_seq * seq_len) if num_seq else 0.0,
        "pieces": len(layout.lens), "documents": counts.get("documents"),
        "docs_per_sequence": per_seq, "doc_len": describe(layout.lens), "sources": sources,
        **{key: counts.get(key, 0) for key in ("split", "truncated", "truncated_tokens", "dropped", "dropped_tokens")},
        "rejected": counts.get("rejected", {}),
    }


def format_report(report: dict) -> str:
    """The table `prep inspect` prints."""
    tok, dps = report["tokenizer"], report["docs_per_sequence"]
    lines = [
        f"{report['dir']}: {report['shards']} shards, seq_len {report['seq_len']:,}, tokenizer {tok['name']} "
        f"(vocab {tok['vocab_size']:,}, pad id {report['pad_id']}), packing {report['packing']}, long {report['long']}"
        + (", loss mask" if report["loss_mask"] else ""),
        f"  sequences        {report['sequences']:,}",
        f"  tokens           {report['tokens']:,}",
        f"  fill             {report['fill']:.2%}   padding {report['padding']:,} tokens",
        f"  documents        {report['documents']:,} source documents in {report['pieces']:,} pieces "
        f"({report['split']:,} split)",
        f"  docs / sequence  mean {dps['mean']:.2f}   p50 {dps['p50']:g}   p99 {dps['p99']:g}   "
        f"min {dps['min']}   max {dps['max']}   (doc_lens entries per sequence)",
        "",
    ]
    header = ("  source", "requested", "achieved", "tokens", "docs", "pieces", "len mean", "p50", "p90", "p99", "max")
    rows = [header]
    everything = {"name": "all", "requested_share": None, "achieved_share": 1.0, "tokens": report["tokens"],
                  "documents": report["documents"], "pieces": report["pieces"], "doc_len": report["doc_len"]}
    for source in report["sources"] + [everything]:
        share, lens = source["requested_share"], source["doc_len"]
        rows.append((f"  {source['name']}", "" if share is None else f"{share:.2%}", f"{source['achieved_share']:.2%}",
                     f"{source['tokens']:,}", f"{source['documents']:,}", f"{source['pieces']:,}",
                     f"{lens['mean']:,.0f}", f"{lens['p50']:,.0f}", f"{lens['p90']:,.0f}", f"{lens['p99']:,.0f}",
                     f"{lens['max']:,}"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    rejected = sum(report["rejected"].values())
    lines += ["", f"  split {report['split']:,}   truncated {report['truncated']:,} ({report['truncated_tokens']:,} "
                  f"tokens)   dropped {report['dropped']:,} ({report['dropped_tokens']:,} tokens)   rejected {rejected:,}"
                  + (f" {report['rejected']}" if rejected else "") + f"   stopped by {report['stopped_by']}"]
    return "\n".join(lines)


# --- show -----------------------------------------------------------------------------------------

NO_LOSS = ("⟦", "⟧")  # brackets around tokens without loss when the output is not a terminal
DIM, BOLD, RESET = "\x1b[2m", "\x1b[1m", "\x1b[0m"
RULE_WIDTH = 100


def read_row(out_dir, manifest: dict, seq: int) -> dict:
    """Packed sequence `seq`, counted across the whole build, as numpy arrays: input_ids, doc_lens,
    doc_sources and loss_mask (or None), with the shard and row it is in."""
    total = sum(entry["rows"] for entry in manifest["shards"])
    if not 0 <= seq < total:
        raise ValueError(f"--seq {seq} is out of range: this build has {total:,} sequences (0..{total - 1})")
    shard = next(shard for shard in reversed(shard_files(out_dir, manifest)) if shard.first_row <= seq)
    row = seq - shard.first_row
    for batch in iter_batches(shard, manifest):
        if row < batch.num_rows:
            one = batch.slice(row, 1)
            out = {"shard": shard.path.name, "row": row}
            for name in ("input_ids", "doc_lens", "doc_sources", "loss_mask"):
                out[name] = as_numpy(one.column(name).flatten()) if name in one.schema.names else None
            return out
        row -= batch.num_rows
    raise AssertionError("unreachable: iter_batches refuses a shard with fewer rows than the manifest lists")


@lru_cache(maxsize=2)
def load_decoder(name: str):
    """The tokenizers.Tokenizer of a transformers tokenizer (cached: loading takes seconds)."""
    from prep.tokenizer import load_hf_tokenizer

    return load_hf_tokenizer(name).backend_tokenizer


def check_tokenizer(backend, manifest: dict, name: str) -> None:
    """ValueError when the tokenizer `name` (a tokenizers.Tokenizer) is not the one the build used."""
    built = manifest["tokenizer"].get("fingerprint")
    if built and fingerprint(backend) != built:
        raise ValueError(f"tokenizer {name!r} is not the one these shards were built with "
                         f"({manifest['tokenizer']['name']}, {built[:19]}...); pass --tokenizer with that one")


def clip(segments: list[tuple[str, bool]], max_chars: int, hint: str) -> list[tuple[str, bool]]:
    """Keep the first and last max_chars/2 characters of a document (its question and its answer)."""
    total = sum(len(text) for text, _ in segments)
    if max_chars <= 0 or total <= max_chars:
        return segments
    head_budget, tail_budget = max_chars // 2, max_chars - max_chars // 2
    head, tail = [], []
    for text, loss in segments:
        if head_budget <= 0:
            break
        head.append((text[:head_budget], loss))
        head_budget -= len(text)
    for text, loss in reversed(segments):
        if tail_budget <= 0:
            break
        tail.append((text[-tail_budget:], loss))
        tail_budget -= len(text)
    marker = (f"\n  … {total - max_chars:,} characters not shown ({hint}) …\n", True)
    return head + [marker] + tail[::-1]


def show(out_dir, seq: int = 0, doc: int | None = None, max_chars: int = 2000, color: bool = False,
         tokenizer: str | None = None) -> str:
    """Packed sequence `seq` decoded, one boundary line per document, padding summarised.

    Special tokens stay visible. With a loss mask, tokens without loss are dimmed (color) or
    wrapped in ⟦ ⟧. `doc` shows one document whole; otherwise each is clipped to `max_chars`.
    """
    manifest = read_manifest(out_dir)
    row = read_row(out_dir, manifest, seq)
    T, pad_id = manifest["seq_len"], manifest["pad_id"]
    num_docs = len(row["doc_lens"])
    if doc is not None and not 0 <= doc < num_docs:
        raise ValueError(f"--doc {doc} is out of range: sequence {seq} has {num_docs} documents (0..{num_docs - 1})")
    name = tokenizer or manifest["tokenizer"]["name"]
    try:
        backend = load_decoder(name)
    except (OSError, ValueError) as error:  # transformers' messages run over several lines
        raise ValueError(f"can't load tokenizer {name!r}: {' '.join(str(error).split())}; "
                         "pass --tokenizer with the one the shards were built with") from None
    check_tokenizer(backend, manifest, name)
    names = [source["name"] for source in manifest["sources"]]
    starts = np.concatenate([[0], np.cumsum(row["doc_lens"], dtype=np.int64)])
    used = int(starts[-1])
    mask = row["loss_mask"]

    def rule(text: str) -> str:
        line = f"━━━ {text} " + "━" * max(3, RULE_WIDTH - len(text) - 5)
        return f"{BOLD}{line}{RESET}" if color else line

    lines = [f"sequence {seq} ({row['shard']} row {row['row']}): {num_docs} document{'s' * (num_docs != 1)}, "
             f"{used:,} tokens, {T - used:,} padding, seq_len {T:,}"]
    if mask is not None:
        lines.append(f"loss mask: {int(mask.sum()):,} of {used:,} tokens get loss; the others are "
                     + ("dimmed" if color else f"shown {NO_LOSS[0]}like this{NO_LOSS[1]}"))
    for index in range(num_docs) if doc is None else [doc]:
        start, end = int(starts[index]), int(starts[index + 1])
        source = int(row["doc_sources"][index])
        source_name = names[source] if source < len(names) else f"<bad source {source}>"
        lines.append(rule(f"doc {index} · {source_name} · {end - start:,} tokens · positions {start:,}-{end - 1:,}"))
        ids = row["input_ids"][start:end]
        if mask is None:
            segments = [(backend.decode(ids.tolist(), skip_special_tokens=False), True)]
        else:  # decode each run of equal mask values on its own, to mark where the loss starts and stops
            cuts = np.flatnonzero(np.diff(mask[start:end])) + 1
            segments = [(backend.decode(ids[first:last].tolist(), skip_special_tokens=False), bool(mask[start + first]))
                        for first, last in zip([0, *cuts], [*cuts, end - start])]
        if doc is None:
            segments = clip(segments, max_chars, f"--seq {seq} --doc {index} shows it whole")
        text = "".join(part if loss else (f"{DIM}{part}{RESET}" if color else f"{NO_LOSS[0]}{part}{NO_LOSS[1]}")
                       for part, loss in segments)
        lines.append(text.rstrip("\n"))
    if used < T and doc is None:
        not_pad = int((row["input_ids"][used:] != pad_id).sum())
        pad_token = backend.id_to_token(pad_id)
        lines.append(rule(f"padding · {T - used:,} × {pad_token} (id {pad_id}) · positions {used:,}-{T - 1:,}"
                          + (f" · {not_pad:,} are not the pad id: run prep verify" if not_pad else "")))
    return "\n".join(lines)
