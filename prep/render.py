"""Rendering: one row's messages become one ChatML document.

Exactly what the alignment-handbook SmolLM3 mid-training chat template renders (see
`prep.tokenize.CHATML_TEMPLATE`, tested against `apply_chat_template`): for each message
`<|im_start|>{role}\\n{content}<|im_end|>\\n`, no BOS, no system prompt added.

Special-token strings inside content (say a literal `<|im_end|>` in a code answer) are kept as
text and become their special ids when tokenized, exactly as `apply_chat_template(tokenize=True)`
does with the official tokenizer, so our ids equal the reference recipe's ids.

With `--loss-on assistant`, the loss covers each assistant message's content and its closing
`<|im_end|>` (the model must learn to stop), and nothing else. A token gets loss when it *starts*
inside such a span, so a token that merges the header's newline with leading newlines of the
content (the BPE does that) gets none.
"""

from prep.sources import INVALID_UTF8_MARK, Reject

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def render(messages: list[tuple[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The ChatML text and the [start, end) character spans of assistant content + `<|im_end|>`."""
    parts, spans, pos = [], [], 0
    for role, content in messages:
        head = f"{IM_START}{role}\n"
        parts += [head, content, IM_END + "\n"]
        start = pos + len(head)
        pos = start + len(content) + len(IM_END) + 1
        if role == "assistant":
            spans.append((start, pos - 1))
    text = "".join(parts)
    if INVALID_UTF8_MARK in text:
        raise Reject("invalid_utf8")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise Reject("lone_surrogate") from None  # JSON "\ud800" escapes decode to unpaired surrogates
    return text, spans
