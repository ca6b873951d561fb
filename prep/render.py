"""Rendering: each row's messages become one ChatML document.

Exactly what the alignment-handbook SmolLM3 mid-training chat template renders (see
`prep.tokenizer.CHATML_TEMPLATE`, tested against `apply_chat_template`): for each message
`<|im_start|>{role}\\n{content}<|im_end|>\\n`, no BOS, no system prompt added. A whole batch is
rendered with two Arrow kernels (join each message, then each document's messages), with no
Python object per row.

Special-token strings inside content (say a literal `<|im_end|>` in a code answer) are kept as
text and become their special ids when tokenized, exactly as `apply_chat_template(tokenize=True)`
does with the official tokenizer, so our ids equal the reference recipe's ids.

With `--loss-on assistant`, the loss covers each assistant message's content and its closing
`<|im_end|>` (the model must learn to stop), and nothing else. A token gets loss when it *starts*
inside such a span, so a token that merges the header's newline with leading newlines of the
content (the BPE does that) gets none. Spans are in UTF-8 bytes, the unit token boundaries are
found in (prep.tokenizer.Encoder.loss_mask).
"""

from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prep.sources import Batch

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def render(batches: Iterator[Batch], spans: bool) -> Iterator[Batch]:
    """Fill in each batch's ChatML `texts`, and with `spans` the assistant spans its loss mask covers."""
    for batch in batches:
        batch.texts, batch.spans = chatml(batch.messages, spans)
        batch.text_bytes = pc.binary_length(batch.texts).to_numpy().astype(np.int64)
        batch.messages = None
        yield batch


def chatml(conversations: pa.ListArray, spans: bool = False) -> tuple[pa.StringArray, tuple | None]:
    """One ChatML text per conversation (list<struct<role, content>>) and, with `spans`, the
    [start, end) bytes of every assistant content + `<|im_end|>` as three arrays: the document
    each span is in, its start and its end."""
    role, content = conversations.flatten().flatten()
    lengths = conversations.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    messages = pc.binary_join_element_wise(IM_START, role, "\n", content, IM_END + "\n", "")
    offsets = np.r_[0, np.cumsum(lengths)]
    texts = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), messages), "")
    if not spans:
        return texts, None
    message_bytes = pc.binary_length(messages).to_numpy().astype(np.int64)
    message_start = np.r_[0, np.cumsum(message_bytes)[:-1]]
    document = np.repeat(np.arange(len(lengths)), lengths)
    within = message_start - message_start[offsets[:-1]][document]  # where each message starts in its document
    start = within + len(IM_START.encode()) + pc.binary_length(role).to_numpy() + len("\n")
    end = start + pc.binary_length(content).to_numpy() + len(IM_END.encode())
    assistant = pc.equal(role, "assistant").to_numpy(zero_copy_only=False)
    return texts, (document[assistant], start[assistant], end[assistant])
