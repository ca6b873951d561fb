"""`prep inspect | show | verify | plot` on shards built here from the embedded sample.

One build is shared by the module (seq_len 2048, so long sample documents are split and some
sequences hold several documents and padding); corruption tests damage a copy of it.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from prep.build import BuildConfig, build
from prep.cli import app
from prep.inspection import inspect, show
from prep.plot import plot
from prep.shards import schema, sha256_file
from prep.verify import Problem, verify

from conftest import read_rows, read_shard

T = 2048
runner = CliRunner()


def prep(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "build"
    build(BuildConfig(mix="nemotron=0.5,ot3=0.5", sample=True, out=str(out), seq_len=T, max_tokens=300_000,
                      rows_per_shard=32, progress=False), log=lambda msg: None)
    return out


@pytest.fixture(scope="module")
def masked(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("masked") / "build"
    build(BuildConfig(mix="nemotron=0.5,ot3=0.5", sample=True, out=str(out), seq_len=4096, max_tokens=60_000,
                      rows_per_shard=8, loss_on="assistant", progress=False), log=lambda msg: None)
    return out


@pytest.fixture
def damaged(shards, tmp_path) -> Path:
    return Path(shutil.copytree(shards, tmp_path / "copy"))


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def one_line_error(result) -> bool:
    return result.exit_code == 2 and "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


# --- inspect --------------------------------------------------------------------------------------

def test_inspect_json_equals_an_independent_count(shards):
    result = prep("inspect", shards, "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    rows = read_rows(shards)
    manifest = manifest_of(shards)
    lens = [n for r in rows for n in r["doc_lens"]]
    tokens = sum(lens)
    per_seq = [len(r["doc_lens"]) for r in rows]
    assert got["sequences"] == len(rows) == manifest["counts"]["sequences"]
    assert got["tokens"] == tokens == manifest["counts"]["tokens"]
    assert got["padding"] == sum(int((r["input_ids"] == manifest["pad_id"]).sum()) for r in rows)
    assert got["fill"] == pytest.approx(tokens / (len(rows) * T))
    assert got["pieces"] == len(lens) and got["documents"] == manifest["counts"]["documents"]
    assert got["docs_per_sequence"] == pytest.approx({
        "mean": np.mean(per_seq), "p50": np.percentile(per_seq, 50), "p99": np.percentile(per_seq, 99),
        "min": min(per_seq), "max": max(per_seq)})
    assert got["split"] == manifest["counts"]["split"] > 0  # the sample has documents longer than 2048 tokens
    assert got["seq_len"] == T and got["tokenizer"]["name"] == "HuggingFaceTB/SmolLM3-3B"
    for i, source in enumerate(got["sources"]):
        mine = [n for r in rows for n, s in zip(r["doc_lens"], r["doc_sources"]) if s == i]
        assert source["name"] == manifest["sources"][i]["name"]
        assert source["tokens"] == sum(mine) and source["pieces"] == len(mine)
        assert source["achieved_share"] == pytest.approx(sum(mine) / tokens)
        assert source["requested_share"] == 0.5
        assert source["doc_len"] == pytest.approx({
            "mean": np.mean(mine), "p50": np.percentile(mine, 50), "p90": np.percentile(mine, 90),
            "p99": np.percentile(mine, 99), "max": max(mine)})
        assert source["doc_len"]["max"] <= T


def test_inspect_table(shards):
    result = prep("inspect", shards)
    assert result.exit_code == 0, result.output
    out = result.stdout
    report = inspect(shards)
    for text in ("sequences", f"{report['tokens']:,}", f"{report['fill']:.2%}", "docs / sequence", "nemotron", "ot3",
                 "p99", "split", "truncated", "dropped", "rejected", "HuggingFaceTB/SmolLM3-3B", "seq_len 2,048"):
        assert text in out, text


def test_inspect_never_reads_input_ids(shards, monkeypatch):
    import prep.inspection as ins

    asked = []
    real = ins.iter_batches
    monkeypatch.setattr(ins, "iter_batches", lambda *args, columns=None, **kwargs:
                        asked.append(columns) or real(*args, columns=columns, **kwargs))
    inspect(shards)
    assert asked and all(columns == ["doc_lens", "doc_sources"] for columns in asked)


# --- show -----------------------------------------------------------------------------------------

def test_show_marks_every_document_and_summarises_padding(shards):
    rows = read_rows(shards)
    seq = next(i for i, r in enumerate(rows) if len(r["doc_lens"]) >= 2 and sum(r["doc_lens"]) < T)
    row = rows[seq]
    result = prep("show", shards, "--seq", seq, "--no-color", "--max-chars", 300)
    assert result.exit_code == 0, result.output
    out = result.stdout
    names = [s["name"] for s in manifest_of(shards)["sources"]]
    for k, (n, s) in enumerate(zip(row["doc_lens"], row["doc_sources"])):
        assert f"━━━ doc {k} · {names[s]} · {n:,} tokens" in out
    pad = T - sum(row["doc_lens"])
    assert f"padding · {pad:,} × <|finetune_right_pad_id|>" in out
    assert out.count("<|finetune_right_pad_id|>") == 1  # summarised, not printed
    assert "characters not shown" in out  # --max-chars clipped the long documents


def test_show_doc_is_whole_and_decodes_exactly(shards):
    from prep.tokenizer import load_hf_tokenizer

    rows = read_rows(shards)
    seq = next(i for i, r in enumerate(rows) if len(r["doc_lens"]) >= 2)
    lens = rows[seq]["doc_lens"]
    ids = rows[seq]["input_ids"][lens[0]:lens[0] + lens[1]]
    text = load_hf_tokenizer().decode(ids.tolist(), skip_special_tokens=False)
    out = show(shards, seq=seq, doc=1, max_chars=100)
    assert "doc 0 ·" not in out and "━━━ doc 1 ·" in out
    assert text.rstrip("\n") in out and "characters not shown" not in out


def test_show_keeps_special_tokens_and_marks_tokens_without_loss(masked):
    assert verify(masked) == []  # loss_mask column: schema, 0/1 values, no loss on padding
    out = show(masked, seq=0, max_chars=0)
    assert "loss mask:" in out
    assert "⟦<|im_start|>user\n" in out or "⟦<|im_start|>system\n" in out  # the prompt gets no loss ...
    assert "<|im_end|>" in out and "<think>" in out
    body = out.split("━━━ doc 0", 1)[1]
    assert body.count("⟦") == body.count("⟧") >= 1
    colored = show(masked, seq=0, max_chars=200, color=True)
    assert "\x1b[2m" in colored and "⟦" not in colored


@pytest.mark.parametrize("args, message", [(["--seq", 10_000], "--seq 10000 is out of range"),
                                           (["--seq", 0, "--doc", 99], "--doc 99 is out of range")])
def test_show_out_of_range(shards, args, message):
    result = prep("show", shards, *args)
    assert one_line_error(result) and message in result.output


# --- verify ---------------------------------------------------------------------------------------

def test_verify_ok(shards):
    result = prep("verify", shards)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("OK") and len(result.stdout.strip().splitlines()) == 1
    assert verify(shards) == [] and verify(shards, fast=True) == []


def test_verify_is_fast(shards):
    import time

    verify(shards)  # warm imports and page cache
    started = time.time()
    verify(shards, fast=True)
    assert time.time() - started < 0.5, "300k tokens should verify in milliseconds"


def checks(problems: list[Problem]) -> set[tuple]:
    return {(p.shard, p.check) for p in problems}


def test_verify_catches_a_flipped_byte(damaged):
    path = damaged / "shard-00001.arrow"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(data)
    result = prep("verify", damaged)
    assert result.exit_code == 1
    assert "shard-00001.arrow: sha256:" in result.stdout and "Traceback" not in result.output


def test_verify_catches_a_truncated_shard(damaged):
    path = damaged / "shard-00002.arrow"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    found = checks(verify(damaged, fast=True))
    assert ("shard-00002.arrow", "read") in found and ("shard-00002.arrow", "rows") in found
    path.write_bytes(data[:-8])  # cut exactly at the end-of-stream marker: every row still reads
    assert checks(verify(damaged, fast=True)) == {("shard-00002.arrow", "read")}


def test_verify_catches_a_missing_shard(damaged):
    (damaged / "shard-00003.arrow").unlink()
    result = prep("verify", damaged)
    assert result.exit_code == 1 and "shard-00003.arrow: missing:" in result.stdout


def test_verify_catches_edited_counts(damaged):
    manifest = manifest_of(damaged)
    manifest["counts"]["tokens"] += 1
    manifest["sources"][1]["tokens"] -= 10
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    problems = verify(damaged)
    assert checks(problems) == {(None, "totals")} and len(problems) == 2
    assert "counts.tokens" in str(problems[0])


def test_verify_catches_edited_hashes(damaged):
    manifest = manifest_of(damaged)
    manifest["shards"][2]["sha256"] = "0" * 64
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    assert checks(verify(damaged)) == {("shard-00002.arrow", "sha256")}
    assert verify(damaged, fast=True) == []  # --fast trusts the hashes: say so in its help


def test_verify_names_shard_row_and_check(damaged):
    """Rewrite one shard with bad rows (and a matching hash), so only the row checks can see them."""
    manifest = manifest_of(damaged)
    for index, info in enumerate(manifest["shards"]):  # the first shard with a padded row
        path = damaged / info["file"]
        table = read_shard(path)
        lens = table["doc_lens"].to_pylist()
        padded = next((r for r in range(len(table)) if sum(lens[r]) < T), None)
        if padded is not None:
            break
    first_seq = sum(info["rows"] for info in manifest["shards"][:index])
    ids = table["input_ids"].combine_chunks().flatten().to_numpy().reshape(len(table), T).copy()
    srcs = table["doc_sources"].to_pylist()
    vocab_row, source_row, long_row = [r for r in range(len(table)) if r != padded][1:4]
    ids[padded, -1] = 7  # a token in the padding
    ids[vocab_row, 5] = 200_000  # beyond the vocabulary
    srcs[source_row][0] = 9  # a source the manifest doesn't have
    lens[long_row][0] += T  # longer than the sequence
    columns = [pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), T),
               pa.array(lens, pa.list_(pa.uint32())), pa.array(srcs, pa.list_(pa.uint8()))]
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema(T, False)) as writer:
        writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=schema(T, False)))
    manifest["shards"][index]["sha256"] = sha256_file(path)
    (damaged / "manifest.json").write_text(json.dumps(manifest))

    problems = {p.check: p for p in verify(damaged) if p.shard == path.name}
    assert problems["padding"].row == padded and problems["padding"].sequence == first_seq + padded
    assert problems["ids"].row == vocab_row and "200,000" in problems["ids"].message
    assert problems["doc_sources"].row == source_row
    assert problems["doc_lens"].row == long_row
    result = prep("verify", damaged, "--fast")
    assert result.exit_code == 1
    assert f"{path.name} row {padded} (--seq {first_seq + padded}): padding:" in result.stdout


def test_verify_checks_the_schema(damaged):
    path = damaged / "shard-00000.arrow"
    table = read_shard(path)
    table = table.cast(pa.schema([f.with_type(pa.list_(pa.uint64())) if f.name == "doc_lens" else f
                                  for f in table.schema]))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    assert ("shard-00000.arrow", "schema") in checks(verify(damaged, fast=True))


def test_verify_refuses_escaping_names_and_reports_extra_files(damaged):
    manifest = manifest_of(damaged)
    manifest["shards"][0]["file"] = "../shard-00000.arrow"
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    (damaged / "notes.txt").write_text("hello")
    found = checks(verify(damaged))
    assert (None, "name") in found
    assert ("notes.txt", "extra-file") in found and ("shard-00000.arrow", "extra-file") in found


def test_verify_catches_a_shard_from_another_build(damaged, tmp_path):
    """Same seq_len and file name, hash patched into the manifest: only the build id tells them apart."""
    other = tmp_path / "other"
    build(BuildConfig(mix="nemotron=0.6,ot3=0.4", sample=True, out=str(other), seq_len=T, max_tokens=300_000,
                      rows_per_shard=32, progress=False), log=lambda msg: None)
    manifest = manifest_of(damaged)
    shutil.copy(other / "shard-00000.arrow", damaged / "shard-00000.arrow")
    manifest["shards"][0]["sha256"] = sha256_file(damaged / "shard-00000.arrow")
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    assert ("shard-00000.arrow", "build") in checks(verify(damaged, fast=True))


# --- plot -----------------------------------------------------------------------------------------

def test_plot_writes_a_png(shards, tmp_path):
    out = tmp_path / "figs" / "shards.png"
    result = prep("plot", shards, "-o", out)
    assert result.exit_code == 0, result.output
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(out).shape
    assert width > 1000 and height > 700


def test_a_plot_that_fails_midway_leaves_the_previous_png_whole(shards, tmp_path, monkeypatch):
    import matplotlib.figure

    out = tmp_path / "shards.png"
    assert prep("plot", shards, "-o", out).exit_code == 0
    before = out.read_bytes()

    def interrupted(figure, file, **kwargs):  # half a PNG, then the disk or the process gives out
        (open(file, "wb") if isinstance(file, (str, Path)) else file).write(before[: len(before) // 2])
        raise OSError("interrupted")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", interrupted)
    with pytest.raises(OSError, match="interrupted"):
        plot(shards, out)
    assert out.read_bytes() == before and [path.name for path in tmp_path.iterdir()] == ["shards.png"]


# --- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["inspect", "show", "verify", "plot"])
def test_not_a_build_is_one_line_and_exit_2(command, shards, tmp_path):
    assert one_line_error(prep(command, tmp_path / "nowhere"))
    assert one_line_error(prep(command, tmp_path))  # a directory without manifest.json
    foreign = tmp_path / "v9"
    shutil.copytree(shards, foreign)
    manifest = manifest_of(foreign)
    manifest["format_version"] = 9
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    result = prep(command, foreign)
    assert one_line_error(result) and "v9" in result.output


@pytest.mark.parametrize("args", [["inspect"], ["show", "--seq", 31], ["plot", "-o"]])
def test_a_cut_shard_is_one_line_naming_the_shard_and_the_check(args, damaged, tmp_path):
    path = damaged / "shard-00000.arrow"  # rows 0-31
    path.write_bytes(path.read_bytes()[:-1000])
    result = prep(args[0], damaged, *args[1:], *([tmp_path / "never.png"] if args[0] == "plot" else []))
    assert one_line_error(result) and "shard-00000.arrow" in result.output and ": read: " in result.output
    assert f"prep verify {damaged}" in result.output


def test_help_has_examples():
    for command in ("inspect", "show", "verify", "plot"):
        result = prep(command, "--help")
        assert result.exit_code == 0 and "Examples" in result.output and f"prep {command} " in result.output
