"""A killed build resumes to the same bytes; a rerun never mixes two builds."""

import os

import pytest

import prep.state
from prep.build import BuildConfig, build

SMALL = dict(mix="a=0.5,b=0.5", seq_len=1024, window=8, rows_per_shard=6, progress=False)


def files(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    """Batches of a few rows, so batches straddle shards and a resume starts mid-batch (the module's
    reference build uses the default batches: grouping must not change the bytes)."""
    import prep.sources

    monkeypatch.setattr(prep.sources, "BATCH_ROWS", 7)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    build(BuildConfig(out=str(out), sources=corpus, **SMALL), log=lambda m: None)
    return files(out)


def crash_at_save(monkeypatch, k: int, after_save: bool = True):
    """Make the k-th state save kill the build, right after writing the state or just before it;
    returns the real `prep.state.save`, to put back for the resume."""
    save, calls = prep.state.save, []

    def crashing_save(*args, **kw):
        calls.append(1)
        if len(calls) == k and not after_save:
            raise SystemExit("killed")
        save(*args, **kw)
        if len(calls) == k:
            raise SystemExit("killed")

    monkeypatch.setattr(prep.state, "save", crashing_save)
    return save


@pytest.mark.parametrize("crash_at, after_save", [(1, True), (3, True), (3, False), (7, False)])
def test_crash_then_resume_gives_the_same_bytes(tmp_path, corpus, reference, monkeypatch, crash_at, after_save):
    """Crash right after the k-th state save, or just before it (a shard renamed but not yet recorded)."""
    save = crash_at_save(monkeypatch, crash_at, after_save)
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        build(BuildConfig(out=str(out), sources=corpus, **SMALL), log=lambda m: None)
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(prep.state, "save", save)
    logs = []
    build(BuildConfig(out=str(out), sources=corpus, **SMALL), log=logs.append)
    assert files(out) == reference
    assert any("resuming" in m for m in logs)


def test_crash_between_manifest_and_cleanup(tmp_path, corpus, reference, monkeypatch):
    """The manifest is written, the state files not yet removed: the rerun finds the build done."""
    import prep.build

    def crash(out):
        raise SystemExit("killed")

    out = tmp_path / "out"
    monkeypatch.setattr(prep.build.state, "clear", crash)
    with pytest.raises(SystemExit):
        build(BuildConfig(out=str(out), sources=corpus, **SMALL), log=lambda m: None)
    assert (out / "manifest.json").exists() and (out / ".prep-state.json").exists()
    monkeypatch.undo()
    logs = []
    build(BuildConfig(out=str(out), sources=corpus, **SMALL), log=logs.append)
    assert "nothing to do" in logs[0] and files(out) == reference


def test_resume_skips_finished_work(tmp_path, corpus, monkeypatch):
    """Rows settled before the crash are not tokenized again."""
    import prep.build

    import prep.sources

    save = crash_at_save(monkeypatch, 4)
    monkeypatch.setattr(prep.sources, "BATCH_ROWS", 1)  # one row per batch: rows in flight = batches
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        build(BuildConfig(out=str(out), sources=corpus, **SMALL), log=lambda m: None)
    done_rows = sum(st["rows_read"] for st in prep.state.load(out)[0]["stats"])
    monkeypatch.setattr(prep.state, "save", save)
    rendered = []
    real_render = prep.build.render

    def counting_render(batches, spans):
        for batch in real_render(batches, spans):
            rendered.append(len(batch.rows))
            yield batch

    monkeypatch.setattr(prep.build, "render", counting_render)
    manifest = build(BuildConfig(out=str(out), sources=corpus, **SMALL), log=lambda m: None)
    total_rows = sum(s["rows_read"] for s in manifest["sources"])
    # batches ahead per source (build.py): being encoded, and rendered ahead by the reader thread
    ahead = 2 * ((os.cpu_count() + 2) + (4 + 1))
    assert done_rows > 0 and sum(rendered) <= total_rows - done_rows + ahead


def test_rerun_is_a_no_op_and_other_settings_are_refused(tmp_path, corpus, reference):
    out = tmp_path / "out"
    build(BuildConfig(out=str(out), sources=corpus, **SMALL), log=lambda m: None)
    logs = []
    build(BuildConfig(out=str(out), sources=corpus, **SMALL), log=logs.append)
    assert "nothing to do" in logs[0] and files(out) == reference
    with pytest.raises(ValueError, match="other settings.*--overwrite"):
        build(BuildConfig(out=str(out), sources=corpus, **(SMALL | {"seq_len": 2048})), log=lambda m: None)
    assert files(out) == reference
    build(BuildConfig(out=str(out), sources=corpus, overwrite=True, **(SMALL | {"seq_len": 2048})), log=lambda m: None)
    assert files(out) != reference and not list(out.glob(".prep-state*"))


def test_unfinished_build_with_other_settings_is_refused(tmp_path, corpus, monkeypatch):
    save = crash_at_save(monkeypatch, 1)
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        build(BuildConfig(out=str(out), sources=corpus, **SMALL), log=lambda m: None)
    monkeypatch.setattr(prep.state, "save", save)
    with pytest.raises(ValueError, match="unfinished build with other settings"):
        build(BuildConfig(out=str(out), sources=corpus, **(SMALL | {"mix": "a=0.3,b=0.7"})), log=lambda m: None)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "shard-00000.arrow").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown build"):
        build(BuildConfig(out=str(tmp_path / "foreign"), sources=corpus, **SMALL), log=lambda m: None)


@pytest.mark.slow
def test_chaos_sigkill(tmp_path):
    """Real SIGKILLs at random moments of a CLI build (scripts/chaos_prep.py does 20)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import chaos_prep

    kills, identical, _ = chaos_prep.chaos(3, seed=1, log=lambda m: None)
    assert kills >= 3 and identical == kills


def test_parquet_source_resumes_mid_file(tmp_path, corpus, monkeypatch):
    """Parquet is read as Arrow tables; a resume skips the settled rows inside the stream and must
    still give the bytes of an uninterrupted build."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    sources = {}
    for name, path in corpus.items():
        rows = [json.loads(line) for line in open(path, encoding="utf-8")]
        sources[name] = str(tmp_path / f"{name}.parquet")
        pq.write_table(pa.Table.from_pylist(rows), sources[name], row_group_size=50)
    reference = tmp_path / "ref"
    build(BuildConfig(out=str(reference), sources=sources, **SMALL), log=lambda m: None)

    save = crash_at_save(monkeypatch, 3)
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        build(BuildConfig(out=str(out), sources=sources, **SMALL), log=lambda m: None)
    assert 0 < sum(st["rows_read"] for st in prep.state.load(out)[0]["stats"])
    monkeypatch.setattr(prep.state, "save", save)
    logs = []
    build(BuildConfig(out=str(out), sources=sources, **SMALL), log=logs.append)
    assert any("resuming" in m for m in logs)
    assert files(out) == files(reference)
