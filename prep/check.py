"""Check: rows -> (role, content) messages, or the reason a row can't become a document.

Each row is turned into messages by the schema it matches:
  - smoltalk2 `Mid`: `messages: [{role, content}]`
  - OpenThoughts3 raw: `conversations: [{from: human|gpt|system, value}]`
  - Llama-Nemotron-Post-Training raw: `input: [{role, content}]` + `output: str`. Its `system_prompt`
    ("detailed thinking on/off") is the dataset's reasoning switch, not content, and is dropped,
    as smoltalk2 did when it re-published these rows: the `<think>` block in `output` already
    says the answer is reasoned.

Arrow batches of the first two schemas are checked with Arrow kernels, without a Python object
per row: the common case costs a few vectorised passes over the batch. A row that fails them, a
batch whose strings aren't all valid UTF-8, and every other schema go through `to_messages`, one
Python row at a time, which names the reason; so both paths reject the same rows for the same
reasons. The result is one Arrow list<struct<role, content>> per batch, whatever the schema.
"""

from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prep.sources import Batch, Reject

ROLES = ("system", "user", "assistant", "tool")
OT3_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
STRINGS = (pa.string(), pa.large_string())


def check(batches: Iterator[Batch]) -> Iterator[Batch]:
    """Fill in each batch's `messages` (one list per accepted row), `rows` (which rows those are)
    and `rejects` (row, reason), in row order."""
    for batch in batches:
        if batch.table is not None and (vectorised := _arrow_messages(batch.table)) is not None:
            messages, ok = vectorised
            batch.rows = np.flatnonzero(ok)
            batch.messages = messages.filter(pa.array(ok))
            batch.rejects = [] if ok.all() else _reasons(batch.table, np.flatnonzero(~ok))
        else:
            items = batch.lines if batch.table is None else _python_rows(batch.table)
            accepted, rows, batch.rejects = [], [], []
            for row, item in enumerate(items):
                try:
                    if isinstance(item, Reject):
                        raise item
                    accepted.append(to_messages(item))
                    rows.append(row)
                except Reject as reject:
                    batch.rejects.append((row, reject.args[0]))
            batch.rows = np.array(rows, dtype=np.int64)
            batch.messages = messages_array(accepted)
        batch.table = batch.lines = None  # the rows are the messages now; don't hold both
        yield batch


def messages_array(conversations: list[list[tuple[str, str]]]) -> pa.ListArray:
    """Python (role, content) lists as the Arrow list<struct<role, content>> the render stage reads."""
    offsets = np.cumsum([0] + [len(messages) for messages in conversations], dtype=np.int32)
    roles = [role for messages in conversations for role, _ in messages]
    contents = [content for messages in conversations for _, content in messages]
    fields = pa.StructArray.from_arrays([pa.array(roles, pa.string()), pa.array(contents, pa.string())],
                                        fields=list(MESSAGE))
    return pa.ListArray.from_arrays(pa.array(offsets), fields)


def _arrow_messages(table: pa.RecordBatch) -> tuple[pa.ListArray, np.ndarray] | None:
    """The batch's messages and which rows pass every check, from Arrow kernels; None when the batch
    isn't one of the two list-of-struct schemas or holds invalid UTF-8 (the Python path finds the rows)."""
    names = table.schema.names
    if "messages" in names:
        column, role_key, content_key = table.column("messages"), "role", "content"
    elif "conversations" in names:
        column, role_key, content_key = table.column("conversations"), "from", "value"
    else:
        return None
    kind = column.type
    if not (pa.types.is_list(kind) and pa.types.is_struct(kind.value_type)):
        return None
    element = kind.value_type
    if element.get_field_index(role_key) < 0 or element.get_field_index(content_key) < 0 \
            or element.field(role_key).type not in STRINGS or element.field(content_key).type not in STRINGS:
        return None
    try:
        table.validate(full=True)  # Arrow doesn't check the UTF-8 of strings read from parquet
    except pa.ArrowInvalid:
        return None
    lengths = pc.fill_null(column.value_lengths(), 0).to_numpy(zero_copy_only=False)
    structs = column.flatten()  # the messages of every row, in order (a null row has none)
    fields = structs.flatten()  # a null message has null fields
    role, content = fields[element.get_field_index(role_key)], fields[element.get_field_index(content_key)]
    if role_key == "from":  # OpenThoughts3 names roles its own way; unknown names stay as they are
        role = pc.if_else(pc.equal(role, "human"), "user", pc.if_else(pc.equal(role, "gpt"), "assistant", role))
    role, content = role.cast(pa.string()), content.cast(pa.string())
    good = pc.and_kleene(pc.and_kleene(structs.is_valid(), pc.is_in(role, pa.array(ROLES))), content.is_valid())
    good = pc.fill_null(good, False).to_numpy(zero_copy_only=False)
    row_of_message = np.repeat(np.arange(len(lengths)), lengths)
    num_bad = np.bincount(row_of_message[~good], minlength=len(lengths))
    ok = column.is_valid().to_numpy(zero_copy_only=False) & (lengths > 0) & (num_bad == 0)
    offsets = pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32))
    messages = pa.ListArray.from_arrays(offsets, pa.StructArray.from_arrays([role, content], fields=list(MESSAGE)))
    return messages, ok


def _reasons(table: pa.RecordBatch, rows: np.ndarray) -> list[tuple[int, str]]:
    """Why each of these rows failed the vectorised checks, as `to_messages` names it."""
    reasons = []
    for row in rows.tolist():
        try:
            to_messages(table.slice(row, 1).to_pylist()[0])
            raise AssertionError(f"row {row} failed the Arrow checks but passes to_messages")
        except Reject as reject:
            reasons.append((row, reject.args[0]))
    return reasons


def _python_rows(table: pa.RecordBatch) -> list[dict | Reject]:
    """The rows as Python dicts; a row whose strings aren't valid UTF-8 becomes a Reject."""
    try:
        return table.to_pylist()
    except UnicodeDecodeError:  # Arrow doesn't check strings read from parquet: find the bad rows
        rows = []
        for row in range(table.num_rows):
            try:
                rows.append(table.slice(row, 1).to_pylist()[0])
            except UnicodeDecodeError:
                rows.append(Reject("invalid_utf8"))
        return rows


def _message(role, content) -> tuple[str, str]:
    if not isinstance(role, str):
        raise Reject("bad_role_type")
    if role not in ROLES:
        raise Reject("unknown_role")
    if content is None:
        raise Reject("null_content")
    if not isinstance(content, str):
        raise Reject("bad_content_type")
    return role, content


def _message_list(value, key: str) -> list:
    if value is None:
        raise Reject(f"null_{key}")
    if not isinstance(value, list):
        raise Reject(f"bad_{key}_type")
    if not value:
        raise Reject(f"empty_{key}")
    if not all(isinstance(message, dict) for message in value):
        raise Reject("message_not_an_object")
    return value


def to_messages(row: dict) -> list[tuple[str, str]]:
    """(role, content) messages of a row in any of the three schemas; raises Reject."""
    if "messages" in row:
        return [_message(message.get("role"), message.get("content"))
                for message in _message_list(row["messages"], "messages")]
    if "conversations" in row:
        turns = _message_list(row["conversations"], "conversations")
        return [_message(OT3_ROLES.get(turn.get("from"), turn.get("from")), turn.get("value")) for turn in turns]
    if "input" in row and "output" in row:
        # Nemotron raw; system_prompt is dropped on purpose (module docstring).
        inputs = row["input"]
        if isinstance(inputs, str):  # some Nemotron splits store the prompt as a plain string
            inputs = [{"role": "user", "content": inputs}]
        messages = [_message(message.get("role"), message.get("content")) for message in _message_list(inputs, "input")]
        return messages + [_message("assistant", row["output"])]
    raise Reject("unknown_schema")
