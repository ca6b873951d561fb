"""Regenerate the embedded sample in prep/sample/ (GENERATED synthetic data, not real data).

    python scripts/make_sample.py

writes prep/sample/nemotron.jsonl.gz and prep/sample/ot3.jsonl.gz: 200 rows each
in the HuggingFaceTB/smoltalk2 `Mid` schema, made by scripts/synth.py. They
imitate DeepSeek-R1 traces from Llama-Nemotron-Post-Training and OpenThoughts3
(which we cannot download here) in shape, length and character mix only; the
text itself is template-generated and meaningless.

The output is byte-identical on every run: fixed seeds, and gzip headers with
no filename and mtime=0. tests/test_synth.py checks the shipped files against
a fresh regeneration, so run this script again after any change to synth.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
import synth  # noqa: E402

ROWS = 200
# A seed whose 200 rows per file include rare features: look-alikes (1% of rows, 3 per file here) and
# CRLF (3%). tests/test_synth.py checks that each file has every feature.
SEEDS = {"nemotron": 5, "ot3": 5}
# Rows at these positions are forced to 40k-80k tokens, so each file has at least
# 3 rows that do not fit one 32,768-token sequence (natural tail: ~1.5% of 200 = ~3
# more, but that number depends on the seed).
FORCED_LONG = (17, 101, 188)
DEFAULT_OUT = SCRIPTS.parent / "prep" / "sample"


def make_sample(out_dir) -> dict[str, Path]:
    """Write both sample files into `out_dir`; return {kind: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, seed in SEEDS.items():
        path = out_dir / f"{kind}.jsonl.gz"
        rows = synth.rows(kind, num_rows=ROWS, seed=seed, force_long=FORCED_LONG)
        synth.write_jsonl(path, rows, compresslevel=9)  # the smallest files: they live in git
        paths[kind] = path
    return paths


if __name__ == "__main__":
    for kind, path in make_sample(DEFAULT_OUT).items():
        print(f"{kind}: {path} ({path.stat().st_size / 1e6:.2f} MB)")
