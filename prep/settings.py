"""Settings declared once, as a dataclass per tool: `prep build`'s BuildConfig and the trainer's TrainConfig.

A field's default is the option's default, the docstring under it is its `--help` text, and a
`Literal[...]` annotation lists its choices. prep's Typer options and the trainer's argparse flags
are generated from the fields with the helpers below, and `check_choices` is the one check of a
choice, for the command lines, recipe files and code that builds a config directly alike.
"""

import ast
import inspect
import textwrap
from typing import Literal, get_args, get_origin, get_type_hints


def field_docs(cls) -> dict[str, str]:
    """The docstring under each dataclass field, read from the source (Python keeps none at run time)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body, docs = tree.body[0].body, {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = after.value.value
    return docs


def field_choices(cls) -> dict[str, tuple]:
    """The allowed values of each field annotated `Literal[...]`."""
    return {name: get_args(kind) for name, kind in get_type_hints(cls).items() if get_origin(kind) is Literal}


def flag(name: str) -> str:
    """The command-line flag of a field: `seq_len` -> `--seq-len`."""
    return "--" + name.replace("_", "-")


def check_choices(settings) -> None:
    """ValueError naming the flag and its choices when a field is not one of its `Literal` values."""
    for name, allowed in field_choices(type(settings)).items():
        value = getattr(settings, name)
        if value not in allowed:
            raise ValueError(f"{flag(name)} must be one of {', '.join(allowed)}, not {value!r}")

