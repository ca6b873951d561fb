"""Rendering: one row's messages become one ChatML document.

Exactly what the alignment-handbook SmolLM3 mid-training chat template renders (see
`prep.tokenizer.CHATML_TEMPLATE`, tested against `apply_chat_template`): for each message
`<|im_start|>{role}\\n{content}<|im_end|>\\n`, no BOS, no system prompt added.

Special-token strings inside content (say a literal `<|im_end|>` in a code answer) are kept as
text and become their special ids when tokenized, exactly as `apply_chat_template(tokenize=True)`
does with the official tokenizer, so our ids equal the reference recipe's ids.

With `--loss-on assistant`, the loss covers each assistant message's content and its closing
`<|im_end|>` (the model must learn to stop), and nothing else. A token gets loss when it *starts*
inside such a span, so a token that merges the header's newline with leading newlines of the
content (the BPE does that) gets none.
"""

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def render_parts(messages: list[tuple[str, str]]) -> list[str]:
    """The strings whose concatenation is the ChatML document. The build joins a whole batch of
    documents in one go (Encoder.encode_batch), so a document is never joined on its own first."""
    parts = []
    for role, content in messages:
        parts += [f"{IM_START}{role}\n", content, IM_END + "\n"]
    return parts


def render(messages: list[tuple[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The ChatML text and the [start, end) character spans of assistant content + `<|im_end|>`."""
    parts = render_parts(messages)
    spans, pos = [], 0
    for (role, _), (head, content, tail) in zip(messages, zip(parts[::3], parts[1::3], parts[2::3])):
        if role == "assistant":
            spans.append((pos + len(head), pos + len(head) + len(content) + len(IM_END)))
        pos += len(head) + len(content) + len(tail)
    return "".join(parts), spans
