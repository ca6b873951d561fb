"""The `prep` command line: each command is a thin wrapper over a library function.

  prep build --mix nemotron=0.5,ot3=0.5 --sample --out shards/
"""

import json
import os
import sys
import time

# prep never hands data to torch, but `datasets` imports torch (over a second) for every streaming
# dataset when torch is installed; its documented switch turns that off for this process.
os.environ.setdefault("USE_TORCH", "0")

import inspect  # noqa: E402
from dataclasses import MISSING, fields
from typing import Annotated, Optional, get_type_hints

import typer

from prep.build import BuildConfig, build
from prep.inspection import format_report, inspect as inspect_build, show
from prep.plot import plot
from prep.preempt import EX_TEMPFAIL, Preempted
from prep.settings import field_choices, field_docs, flag
from prep.shards import DiskFull, read_manifest
from prep.verify import verify

app = typer.Typer(
    help="Prepare SmolLM3 reasoning mid-training data: stream, render ChatML, tokenize exactly, mix, pack into "
    "32k-token Arrow shards.\n\n"
    "Examples:\n\n"
    "  prep build --mix nemotron=0.5,ot3=0.5 --sample --out shards/\n\n"
    "  prep build --mix nemotron=0.5,ot3=0.5 --max-tokens 35_000_000_000 --out /data/shards\n\n"
    "  prep build --mix mine=1 --source mine='data/*.jsonl.gz' --seq-len 8192\n\n"
    "  prep inspect shards/  |  prep show shards/ --seq 0  |  prep verify shards/  |  prep plot shards/ -o mix.png",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


EX_IOERR = 74  # sysexits.h: an input/output error, here a full disk


def fail(message: str) -> None:
    """One line on stderr and exit 2: the way user errors end, never a traceback."""
    typer.secho(f"Error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


@app.callback()
def prep_app():
    """Prepare SmolLM3 reasoning mid-training data into packed Arrow shards."""


def config_options(cls, hand_written: dict[str, inspect.Parameter]) -> list[inspect.Parameter]:
    """One Typer option per field of a settings dataclass, in field order: the flag from its name, the
    help from its docstring, the default from the field, the choices from a Literal annotation (shown
    here, checked by the config's check()). A bool that defaults to False is a plain switch (`--sample`),
    one that defaults to True can be turned off (`--progress/--no-progress`). Fields a command line
    can't spell as one value (a dict) come from `hand_written`."""
    docs, kinds, choices = field_docs(cls), get_type_hints(cls), field_choices(cls)
    options = []
    for field in fields(cls):
        if field.name in hand_written:
            options.append(hand_written[field.name])
            continue
        assert field.default is not MISSING, f"{cls.__name__}.{field.name} needs a default or a hand-written option"
        kind, extra = kinds[field.name], {}
        if kind is bool and field.default is True:
            declared = [f"{flag(field.name)}/--no-{flag(field.name)[2:]}"]
        else:
            declared = [flag(field.name)]
        if field.name in choices:
            kind, extra = str, {"metavar": "<" + "|".join(choices[field.name]) + ">"}
        option = typer.Option(*declared, help=docs[field.name], **extra)
        options.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default,
                                         annotation=Annotated[kind, option]))
    return options


def parse_source_options(values: list[str]) -> dict[str, str]:
    sources = {}
    for value in values:
        name, eq, spec = value.partition("=")
        if not eq or not name.strip() or not spec.strip():
            raise typer.BadParameter(f"{value!r} is not NAME=SPEC (e.g. --source ot3=data/ot3/*.parquet)",
                                     param_hint="--source")
        sources[name.strip()] = spec.strip()
    return sources


SOURCE_OPTION = inspect.Parameter(
    "sources", inspect.Parameter.KEYWORD_ONLY, default=None,
    annotation=Annotated[Optional[list[str]], typer.Option(
        "--source", help="NAME=SPEC, repeatable: hub id[:config:split], or a local file, directory or glob of "
        ".jsonl/.jsonl.gz/.parquet/.arrow. Overrides a preset or adds a source.")])


def build_command(**settings):
    """Stream sources, render ChatML, tokenize, mix by token share and pack into Arrow shards.

    Examples:

      prep build --mix nemotron=0.5,ot3=0.5 --sample --out shards/

      prep build --mix nemotron=0.5,ot3=0.5 --source nemotron=HuggingFaceTB/smoltalk2:Mid:Llama_Nemotron_Post_Training_Dataset_reasoning_r1

      prep build --mix a=0.7,b=0.3 --source a=data/a.jsonl.gz --source b='data/b/*.parquet' --loss-on assistant

    A killed or stopped build resumes when the same command runs again, and ends with the same bytes.
    One build at a time per --out: the build locks it (--out/.prep-lock), and a second is refused
    with the holder's pid and host.

    Exit codes: 0 done; 2 a setting, input or --out to fix (one line); 75 stopped by SIGTERM or
    SIGUSR1 (after the next shard, at most 20 s later): rerun to resume; 74 disk full or over quota
    (one line: the file, the bytes it needs, the bytes free): free space, then rerun to resume.
    """
    cfg = BuildConfig(**settings | {"sources": parse_source_options(settings["sources"] or [])})
    try:
        build(cfg)
    except Preempted as stop:
        typer.echo(str(stop), err=True)
        raise typer.Exit(EX_TEMPFAIL)
    except DiskFull as error:
        typer.secho(f"Error: {error}", err=True, fg=typer.colors.RED)
        raise typer.Exit(EX_IOERR)
    except ValueError as error:
        fail(str(error))


# Every BuildConfig field is an option of `prep build`: a new field needs no edit here.
build_command.__signature__ = inspect.Signature(config_options(BuildConfig, {"sources": SOURCE_OPTION}))
app.command("build")(build_command)


BuildDir = Annotated[str, typer.Argument(help="A build directory: shard-*.arrow files and manifest.json.",
                                         metavar="DIR", show_default=False)]


@app.command("inspect")
def inspect_command(
    out_dir: BuildDir,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object instead of the table (keys documented in prep/inspection.py).")] = False,
):
    """What a build holds: sequences, tokens, fill, documents per sequence, document length and token share per source.

    Reads the manifest and the doc_lens/doc_sources columns only, never input_ids, so it stays fast on any size.

    A document longer than seq_len that was split counts once per piece in the per-sequence and length numbers.

    Examples:

      prep inspect shards/

      prep inspect shards/ --json | jq '.sources[] | {name, requested_share, achieved_share}'
    """
    try:
        report = inspect_build(out_dir)
    except ValueError as error:
        fail(str(error))
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@app.command("show")
def show_command(
    out_dir: BuildDir,
    seq: Annotated[int, typer.Option(help="Packed sequence to show, counted from 0 across all shards.")] = 0,
    doc: Annotated[Optional[int], typer.Option(help="Show only this document of the sequence, whole.")] = None,
    max_chars: Annotated[int, typer.Option(help="Characters shown per document (first and last half); 0 = all.")] = 2000,
    color: Annotated[Optional[bool], typer.Option(
        "--color/--no-color", show_default=False,
        help="Dim tokens without loss and bold the boundaries (default: when printing to a terminal).")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(
        help="Decode with this tokenizer (hub id or dir) instead of the manifest's; must be the same vocabulary.")] = None,
):
    """Decode one packed sequence, document by document, with special tokens visible and padding summarised.

    Each document starts with a boundary line naming its index, source and length. With a loss mask (built with --loss-on assistant), tokens without loss are dimmed on a terminal, else ⟦wrapped⟧.

    Examples:

      prep show shards/ --seq 17

      prep show shards/ --seq 17 --doc 2

      prep show shards/ --seq 0 --max-chars 400 --no-color | less
    """
    try:
        text = show(out_dir, seq=seq, doc=doc, max_chars=max_chars, tokenizer=tokenizer,
                    color=sys.stdout.isatty() if color is None else color)
    except ValueError as error:
        fail(str(error))
    typer.echo(text)


@app.command("verify")
def verify_command(
    out_dir: BuildDir,
    fast: Annotated[bool, typer.Option("--fast", help="Skip the sha256 of each shard (all other checks still run).")] = False,
):
    """Check every shard against the manifest: sha256, schema, rows, doc_lens, padding, id range, sources, totals.

    Exit 0 with one OK line when all hold; otherwise exit 1 and one line per problem: shard, row (--seq N), check.

    Streams record batches with vectorised checks: memory stays flat on any size.

    Examples:

      prep verify shards/

      prep verify /data/shards --fast && echo sound
    """
    started = time.time()
    try:
        problems = verify(out_dir, fast=fast)
    except ValueError as error:
        fail(str(error))
    if problems:
        typer.echo(f"FAILED: {len(problems)} problem{'s' * (len(problems) != 1)} in {out_dir}")
        for problem in problems:
            typer.echo(f"  {problem}")
        raise typer.Exit(1)
    manifest = read_manifest(out_dir)
    counts = manifest["counts"]
    typer.echo(f"OK {out_dir}: {len(manifest['shards'])} shards, {counts['sequences']:,} sequences, "
               f"{counts['tokens']:,} tokens verified{' (sha256 skipped: --fast)' if fast else ''} "
               f"in {time.time() - started:.1f}s")


@app.command("plot")
def plot_command(
    out_dir: BuildDir,
    output: Annotated[str, typer.Option("--output", "-o", help="PNG file to write (.svg and .pdf work too).")] = "shards.png",
):
    """One PNG: document length per source (log x, seq_len marked), documents per sequence, fill, token shares.

    Examples:

      prep plot shards/ -o shards.png

      prep plot /data/shards -o report/mix.png
    """
    try:
        path = plot(out_dir, output)
    except ValueError as error:
        fail(str(error))
    except OSError as error:
        fail(f"can't write {output}: {error.strerror or error}")
    typer.echo(f"wrote {path}")


def main() -> None:
    """The `prep` console script: `app`, then a hard exit once the output is flushed.

    A `datasets` parquet stream closed before its end (every build stops reading its sources
    early) leaves an Arrow scan thread running for a moment, and an interpreter that shuts down
    under it makes Arrow abort the process: "terminate called without an active exception", exit
    134, after the build has finished (3 of 12 runs on a 2-core machine; apache/arrow#34314,
    huggingface/datasets#7566). By then every file is written, fsynced and renamed, so skipping
    the interpreter's teardown loses nothing."""
    try:
        app()
        code = 0
    except SystemExit as stop:
        code = stop.code
    if code is not None and not isinstance(code, int):  # sys.exit("message")
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    main()
