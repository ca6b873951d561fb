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


def describe(x: np.ndarray, percentiles=(50, 90, 99)) -> dict:
    if len(x) == 0:
        return {"mean": 0.0, **{f"p{q}": 0.0 for q in percentiles}, "max": 0}
    return {"mean": float(x.mean()), **{f"p{q}": float(np.percentile(x, q)) for q in percentiles},
            "max": int(x.max())}


def inspect(out_dir) -> dict:
    """Everything `prep inspect` shows, as a dict with the keys documented at the top of this file."""
    lay = read_layout(out_dir)
    m, c = lay.manifest, lay.manifest["counts"]
    num_seq, tokens = len(lay.row_tokens), int(lay.row_tokens.sum())
    per_seq = describe(lay.row_pieces, (50, 99))
    per_seq["min"] = int(lay.row_pieces.min()) if num_seq else 0
    sources = []
    for i, s in enumerate(m["sources"]):
        mine = lay.lens[lay.sources == i]
        sources.append({
            "name": s["name"], "requested_share": s.get("requested_share"),
            "achieved_share": float(mine.sum() / tokens) if tokens else 0.0,
            "tokens": int(mine.sum()), "pieces": len(mine), "documents": s.get("documents"),
            "rows_read": s.get("rows_read"), "rejected": s.get("rejected", {}), "doc_len": describe(mine),
        })
    return {
        "dir": str(out_dir), "seq_len": m["seq_len"], "pad_id": m["pad_id"], "loss_mask": m.get("loss_mask", False),
        "tokenizer": {k: m["tokenizer"].get(k) for k in ("name", "vocab_size", "encoder", "fingerprint")},
        "packing": m.get("settings", {}).get("packing"), "long": m.get("settings", {}).get("long"),
        "stopped_by": m.get("stopped_by"), "shards": len(m["shards"]),
        "sequences": num_seq, "tokens": tokens, "padding": num_seq * m["seq_len"] - tokens,
        "fill": tokens / (num_seq * m["seq_len"]) if num_seq else 0.0,
        "pieces": len(lay.lens), "documents": c.get("documents"),
        "docs_per_sequence": per_seq, "doc_len": describe(lay.lens), "sources": sources,
        **{k: c.get(k, 0) for k in ("split", "truncated", "truncated_tokens", "dropped", "dropped_tokens")},
        "rejected": c.get("rejected", {}),
    }


def format_report(r: dict) -> str:
    """The table `prep inspect` prints."""
    tok = r["tokenizer"]
    dps = r["docs_per_sequence"]
    lines = [
        f"{r['dir']}: {r['shards']} shards, seq_len {r['seq_len']:,}, tokenizer {tok['name']} "
        f"(vocab {tok['vocab_size']:,}, pad id {r['pad_id']}), packing {r['packing']}, long {r['long']}"
        + (", loss mask" if r["loss_mask"] else ""),
        f"  sequences        {r['sequences']:,}",
        f"  tokens           {r['tokens']:,}",
        f"  fill             {r['fill']:.2%}   padding {r['padding']:,} tokens",
        f"  documents        {r['documents']:,} source documents in {r['pieces']:,} pieces ({r['split']:,} split)",
        f"  docs / sequence  mean {dps['mean']:.2f}   p50 {dps['p50']:g}   p99 {dps['p99']:g}   "
        f"min {dps['min']}   max {dps['max']}   (doc_lens entries per sequence)",
        "",
    ]
    header = ("  source", "requested", "achieved", "tokens", "docs", "pieces", "len mean", "p50", "p90", "p99", "max")
    rows = [header]
    for s in r["sources"] + [{"name": "all", "requested_share": None, "achieved_share": 1.0, "tokens": r["tokens"],
                              "documents": r["documents"], "pieces": r["pieces"], "doc_len": r["doc_len"]}]:
        d = s["doc_len"]
        rows.append((f"  {s['name']}", "" if s["requested_share"] is None else f"{s['requested_share']:.2%}",
                     f"{s['achieved_share']:.2%}", f"{s['tokens']:,}", f"{s['documents']:,}", f"{s['pieces']:,}",
                     f"{d['mean']:,.0f}", f"{d['p50']:,.0f}", f"{d['p90']:,.0f}", f"{d['p99']:,.0f}", f"{d['max']:,}"))
    widths = [max(len(row[k]) for row in rows) for k in range(len(header))]
    for row in rows:
        lines.append("  ".join([row[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(row[1:], widths[1:])]).rstrip())
    rejected = sum(r["rejected"].values())
    lines += ["", f"  split {r['split']:,}   truncated {r['truncated']:,} ({r['truncated_tokens']:,} tokens)   "
                  f"dropped {r['dropped']:,} ({r['dropped_tokens']:,} tokens)   rejected {rejected:,}"
                  + (f" {r['rejected']}" if rejected else "") + f"   stopped by {r['stopped_by']}"]
    return "\n".join(lines)


# --- show -----------------------------------------------------------------------------------------

NO_LOSS = ("⟦", "⟧")  # brackets around tokens without loss when the output is not a terminal
DIM, BOLD, RESET = "\x1b[2m", "\x1b[1m", "\x1b[0m"
RULE_WIDTH = 100


def read_row(out_dir, manifest: dict, seq: int) -> dict:
    """Packed sequence `seq`, counted across the whole build, as numpy arrays: input_ids, doc_lens,
    doc_sources and loss_mask (or None), with the shard and row it is in."""
    total = sum(s["rows"] for s in manifest["shards"])
    if not 0 <= seq < total:
        raise ValueError(f"--seq {seq} is out of range: this build has {total:,} sequences (0..{total - 1})")
    shard = next(s for s in reversed(shard_files(out_dir, manifest)) if s.first_row <= seq)
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
    built = manifest["tokenizer"].get("fingerprint")
    if built and fingerprint(backend) != built:
        raise ValueError(f"tokenizer {name!r} is not the one these shards were built with "
                         f"({manifest['tokenizer']['name']}, {built[:19]}...); pass --tokenizer with that one")


def clip(segments: list[tuple[str, bool]], max_chars: int, hint: str) -> list[tuple[str, bool]]:
    """Keep the first and last max_chars/2 characters of a document (its question and its answer)."""
    total = sum(len(t) for t, _ in segments)
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
    r = read_row(out_dir, manifest, seq)
    T, pad_id = manifest["seq_len"], manifest["pad_id"]
    num_docs = len(r["doc_lens"])
    if doc is not None and not 0 <= doc < num_docs:
        raise ValueError(f"--doc {doc} is out of range: sequence {seq} has {num_docs} documents (0..{num_docs - 1})")
    name = tokenizer or manifest["tokenizer"]["name"]
    try:
        backend = load_decoder(name)
    except (OSError, ValueError) as e:  # transformers' messages run over several lines
        raise ValueError(f"can't load tokenizer {name!r}: {' '.join(str(e).split())}; "
                         "pass --tokenizer with the one the shards were built with") from None
    check_tokenizer(backend, manifest, name)
    names = [s["name"] for s in manifest["sources"]]
    starts = np.concatenate([[0], np.cumsum(r["doc_lens"], dtype=np.int64)])
    used = int(starts[-1])
    mask = r["loss_mask"]

    def rule(text: str) -> str:
        line = f"━━━ {text} " + "━" * max(3, RULE_WIDTH - len(text) - 5)
        return f"{BOLD}{line}{RESET}" if color else line

    lines = [f"sequence {seq} ({r['shard']} row {r['row']}): {num_docs} document{'s' * (num_docs != 1)}, "
             f"{used:,} tokens, {T - used:,} padding, seq_len {T:,}"]
    if mask is not None:
        lines.append(f"loss mask: {int(mask.sum()):,} of {used:,} tokens get loss; the others are "
                     + ("dimmed" if color else f"shown {NO_LOSS[0]}like this{NO_LOSS[1]}"))
    for k in range(num_docs) if doc is None else [doc]:
        a, b = int(starts[k]), int(starts[k + 1])
        src = int(r["doc_sources"][k])
        src_name = names[src] if src < len(names) else f"<bad source {src}>"
        lines.append(rule(f"doc {k} · {src_name} · {b - a:,} tokens · positions {a:,}-{b - 1:,}"))
        ids = r["input_ids"][a:b]
        if mask is None:
            segments = [(backend.decode(ids.tolist(), skip_special_tokens=False), True)]
        else:  # decode each run of equal mask values on its own, to mark where the loss starts and stops
            cuts = np.flatnonzero(np.diff(mask[a:b])) + 1
            segments = [(backend.decode(ids[i:j].tolist(), skip_special_tokens=False), bool(mask[a + i]))
                        for i, j in zip([0, *cuts], [*cuts, b - a])]
        if doc is None:
            segments = clip(segments, max_chars, f"--seq {seq} --doc {k} shows it whole")
        text = "".join(t if loss else (f"{DIM}{t}{RESET}" if color else f"{NO_LOSS[0]}{t}{NO_LOSS[1]}")
                       for t, loss in segments)
        lines.append(text.rstrip("\n"))
    if used < T and doc is None:
        not_pad = int((r["input_ids"][used:] != pad_id).sum())
        pad_token = backend.id_to_token(pad_id)
        lines.append(rule(f"padding · {T - used:,} × {pad_token} (id {pad_id}) · positions {used:,}-{T - 1:,}"
                          + (f" · {not_pad:,} are not the pad id: run prep verify" if not_pad else "")))
    return "\n".join(lines)
