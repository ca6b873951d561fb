"""`prep build` through the CLI: the embedded sample works offline; user errors are one line, no traceback."""

import json

import pytest
from typer.testing import CliRunner

from prep.cli import app

runner = CliRunner()


def test_sample_build_offline(tmp_path):
    out = tmp_path / "shards"
    result = runner.invoke(app, ["build", "--mix", "nemotron=0.5,ot3=0.5", "--sample", "--out", str(out),
                                 "--seq-len", "4096", "--no-progress"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["sources"]] == ["nemotron", "ot3"]
    assert manifest["counts"]["split"] > 0  # the sample has rows longer than 4096 (and than 32k)
    for s in manifest["sources"]:
        assert abs(s["achieved_share"] - 0.5) < 0.01
    assert "wrote" in result.output and "fill" in result.output


@pytest.mark.parametrize("args, message", [
    (["--mix", "nemotron=0"], "positive"),
    (["--mix", "nemotron"], "NAME=WEIGHT"),
    (["--mix", "bogus=1"], "unknown source 'bogus'"),
    (["--mix", "a=1", "--source", "a"], "NAME=SPEC"),
    (["--mix", "a=1", "--source", "a=/no/such/*.jsonl"], "matches no file"),
    (["--mix", "a=1", "--source", "b=x.jsonl"], "--mix doesn't use"),
    (["--packing", "zigzag"], "zigzag"),
    (["--sample", "--tokenizer", "/no/such/tokenizer"], "can't load tokenizer '/no/such/tokenizer'"),
])
def test_user_errors_are_one_line(tmp_path, args, message):
    result = runner.invoke(app, ["build", "--out", str(tmp_path / "o"), "--no-progress", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()  # checked before any work


def test_an_out_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    for out in (tmp_path / "file", tmp_path / "file" / "shards"):
        result = runner.invoke(app, ["build", "--sample", "--no-progress", "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert f"--out {out}" in result.output and "Traceback" not in result.output
    assert (tmp_path / "file").read_text() == "not a directory"


def test_help_shows_examples():
    for args in (["--help"], ["build", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and "prep build --mix nemotron=0.5,ot3=0.5" in result.output


@pytest.mark.parametrize("args, code", [(["--help"], 0), (["build", "--mix", "bogus=1"], 2)])
def test_console_script_skips_interpreter_teardown(args, code):
    """Arrow can abort an interpreter that shuts down while a closed parquet stream's scan thread
    still runs (exit 134 after a finished build, see prep.cli.main), so the console script exits
    without the teardown: exit handlers never run, the output is flushed, the exit code is kept."""
    import os
    import subprocess
    import sys

    script = ("import atexit, sys; atexit.register(lambda: print('TEARDOWN RAN', flush=True)); "
              "sys.argv = ['prep', *sys.argv[1:]]; import prep.cli; prep.cli.main()")
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True)
    assert result.returncode == code, result.stderr
    assert "TEARDOWN RAN" not in result.stdout
    assert ("Usage" in result.stdout) if code == 0 else ("unknown source 'bogus'" in result.stderr)


def test_build_options_are_generated_from_build_config(monkeypatch):
    """Every BuildConfig field is a `prep build` option with its docstring as help and its default;
    a dict field (sources) is the hand-written, repeatable --source."""
    import typer.main

    import prep.cli
    from prep.build import BuildConfig
    from prep.settings import field_docs

    params = {param.name: param for param in typer.main.get_command(app).commands["build"].params}
    for name, doc in field_docs(BuildConfig).items():
        assert params[name].help == doc or name == "sources", name
    assert params["sources"].opts == ["--source"] and params["sources"].multiple
    assert params["progress"].secondary_opts == ["--no-progress"] and params["sample"].secondary_opts == []

    made = []
    monkeypatch.setattr(prep.cli, "build", made.append)
    assert runner.invoke(app, ["build"]).exit_code == 0
    args = ["--mix", "a=1", "--source", "a=x.jsonl", "--sample", "--no-progress", "--seq-len", "64",
            "--packing", "wrapped", "--max-tokens", "5", "--max-bad-frac", "0.5"]
    assert runner.invoke(app, ["build", *args]).exit_code == 0
    assert made == [BuildConfig(), BuildConfig(mix="a=1", sources={"a": "x.jsonl"}, sample=True, progress=False,
                                               seq_len=64, packing="wrapped", max_tokens=5, max_bad_frac=0.5)]


def test_a_new_settings_field_becomes_an_option_with_no_other_edit():
    import inspect
    from dataclasses import dataclass
    from typing import Literal

    import typer

    from prep.cli import config_options
    from prep.settings import check_choices

    @dataclass
    class Toy:
        size: int = 3
        """How big."""
        shape: Literal["round", "square"] = "round"
        """Which shape."""
        limit: float | None = None
        """At most this."""
        loud: bool = True
        """Say it."""

    made = []

    def command(**settings):
        toy = Toy(**settings)
        check_choices(toy)
        made.append(toy)

    command.__signature__ = inspect.Signature(config_options(Toy, {}))
    toy_app = typer.Typer()
    toy_app.command()(command)
    assert runner.invoke(toy_app, ["--size", "5", "--shape", "square", "--limit", "0.5", "--no-loud"]).exit_code == 0
    assert made == [Toy(5, "square", 0.5, False)]
    help_text = runner.invoke(toy_app, ["--help"]).output
    assert "How big." in help_text and "<round|square>" in help_text and "--no-loud" in help_text
    result = runner.invoke(toy_app, ["--shape", "oval"])
    assert result.exit_code != 0 and isinstance(result.exception, ValueError)
    assert str(result.exception) == "--shape must be one of round, square, not 'oval'"


def test_a_damaged_source_file_is_one_line(tmp_path):
    """Found while reading (a reader thread), after --out exists: still one line, exit 2."""
    import gzip

    rows = b"".join(b'{"messages": [{"role": "user", "content": "row %d"}]}\n' % i for i in range(2000))
    data = gzip.compress(rows)
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    result = runner.invoke(app, ["build", "--mix", "a=1", "--source", f"a={tmp_path / 'cut.jsonl.gz'}",
                                 "--out", str(tmp_path / "o"), "--seq-len", "512", "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith(f"Error: can't read {tmp_path / 'cut.jsonl.gz'}: ")
