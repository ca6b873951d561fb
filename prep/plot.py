"""`prep plot`: one PNG that shows a build at a glance.

  prep plot shards/ -o shards.png

Four panels from the same columns `prep inspect` reads (doc_lens, doc_sources; never input_ids):
document length per source (log x, seq_len marked: everything at the line is a split piece or
a document that filled a sequence alone), documents per sequence, fill per sequence, and the
token share each source was asked for next to what it got.
"""

from pathlib import Path

import numpy as np

from prep.inspection import read_layout
from prep.shards import atomic_file

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def plot(out_dir, png) -> Path:
    """Write the overview PNG of a build to `png` (whole, then renamed) and return its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

    lay = read_layout(out_dir)
    T = lay.manifest["seq_len"]
    names = [source["name"] for source in lay.manifest["sources"]]
    num_seq, tokens = len(lay.row_tokens), int(lay.row_tokens.sum())
    fill = lay.row_tokens / T
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    fig.suptitle(f"{out_dir}: {num_seq:,} sequences x {T:,} tokens, {tokens:,} tokens in {len(lay.lens):,} "
                 f"documents or pieces, fill {tokens / max(1, num_seq * T):.2%}", fontsize=12)

    ax = axes[0, 0]
    # the last edge is seq_len itself, so full-length pieces land in the bar just left of the line
    low = 10 ** np.floor(np.log10(max(1, lay.lens.min()))) if len(lay.lens) else 1
    bins = np.logspace(np.log10(low), np.log10(T), 60)
    for index, name in enumerate(names):
        mine = lay.lens[lay.sources == index]
        if len(mine):
            ax.hist(mine, bins=bins, histtype="step", linewidth=1.8, color=COLORS[index % len(COLORS)],
                    label=f"{name} ({len(mine):,}, median {np.median(mine):,.0f})")
    ax.axvline(T, color="black", linestyle="--", linewidth=1, label=f"seq_len {T:,}")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.set(title="Document length per source (split pieces count as documents)",
           xlabel="tokens per document (log scale)", ylabel="documents")
    ax.legend(fontsize=9, loc="upper left")

    ax = axes[0, 1]
    top = int(lay.row_pieces.max()) if num_seq else 1
    _, _, bars = ax.hist(lay.row_pieces, bins=np.arange(0.5, top + 1.5), color=COLORS[0], edgecolor="white")
    ax.bar_label(bars, labels=[f"{int(bar.get_height()):,}" if bar.get_height() else "" for bar in bars], fontsize=8)
    mean = lay.row_pieces.mean() if num_seq else 0
    ax.axvline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:.2f}")
    ax.set(title="Documents per sequence", xlabel="documents (doc_lens entries) in a sequence", ylabel="sequences")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=9)

    ax = axes[1, 0]
    ax.hist(fill, bins=np.linspace(min(fill.min(), 0.9) if num_seq else 0, 1, 41), color=COLORS[2], edgecolor="white")
    ax.axvline(fill.mean() if num_seq else 0, color="black", linestyle="--", linewidth=1,
               label=f"mean {fill.mean() if num_seq else 0:.2%}")
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.set(title="Fill per sequence (non-padding share)", xlabel="fill", ylabel="sequences (log scale)")
    ax.legend(fontsize=9, loc="upper left")

    ax = axes[1, 1]
    x = np.arange(len(names))
    asked = [source.get("requested_share") or 0 for source in lay.manifest["sources"]]
    got = [int(lay.lens[lay.sources == index].sum()) / max(1, tokens) for index in range(len(names))]
    ax.bar(x - 0.2, asked, 0.4, label="requested", color="#bbbbbb")
    bars = ax.bar(x + 0.2, got, 0.4, label="achieved (colour of the source)",
                  color=[COLORS[index % len(COLORS)] for index in x])
    ax.bar_label(bars, labels=[f"{share:.1%}" for share in got], fontsize=9)
    ax.set_xticks(x, names)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylim(0, max(asked + got + [0.01]) * 1.3)
    ax.set(title="Token share per source", ylabel="share of tokens")
    ax.legend(fontsize=9, loc="upper center", ncols=2)

    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_file(png) as f:  # a plot that fails midway leaves the previous one whole
            fig.savefig(f, dpi=110, format=png.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return png
