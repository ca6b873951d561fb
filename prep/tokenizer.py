"""The tokenizer: load SmolLM3's (hub id, local dir, or built offline), and encode fast and exactly.

SmolLM3 uses the Llama-3.2 byte-level BPE (128,000 ranks, Llama-3 pre-tokenizer regex) plus 256
special tokens (vocab 128,256), some renamed by SmolLM3 (`<|im_start|>` = 128011, ...).

Loading: `--tokenizer` is a local directory or a hub id, read by `transformers.AutoTokenizer`
either way. When the hub can't be reached and SmolLM3 is asked for, the same tokenizer is built
from the Llama-3 `tokenizer.model` that the PyPI package `llama-models` ships (transformers'
`TikTokenConverter` turns ranks into a `tokenizers` BPE), saved to a cache directory and loaded
from there.

Encoding: `tiktoken` runs the same BPE 5-8x faster than `tokenizers` on this machine and releases
the GIL (`encode_to_numpy`), so threads scale. We build a tiktoken twin of the loaded tokenizer
only when its structure is provably the same algorithm (byte-level BPE, Llama-style split regex,
merges in rank order, no normalizer, plain added tokens) and it agrees on a probe text;
otherwise we fall back to `tokenizers`. Tests check equality on a wide text set.
"""

import hashlib
import json
import os
import socket
import sys
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

from prep.shards import fingerprint

DEFAULT_TOKENIZER = "HuggingFaceTB/SmolLM3-3B"
PAD_TOKEN = "<|finetune_right_pad_id|>"
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_BASE_TOKENS = 128_000
# SmolLM3's names for the ids it repurposed; every other special id keeps its Llama-3.2 name.
SMOLLM3_SPECIAL_NAMES = {
    128000: "<|begin_of_text|>",
    128001: "<|end_of_text|>",
    128002: "<think>",
    128003: "</think>",
    128004: PAD_TOKEN,
    128006: "<|start_header_id|>",
    128007: "<|end_header_id|>",
    128008: "<|eom_id|>",
    128009: "<|eot_id|>",
    128010: "<|python_tag|>",
    128011: "<|im_start|>",
    128012: "<|im_end|>",
    128013: "<tool_response>",
    128014: "</tool_response>",
    128015: "<tool_call>",
    128016: "</tool_call>",
    128017: "<code>",
    128018: "</code>",
}
# The ChatML template of the alignment-handbook SmolLM3 mid-training recipe: no BOS, no system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def smollm3_special_tokens() -> list[str]:
    """The 256 special tokens of SmolLM3 in id order (128000..128255)."""
    names = []
    for token_id in range(NUM_BASE_TOKENS, NUM_BASE_TOKENS + 256):
        if token_id in SMOLLM3_SPECIAL_NAMES:
            names.append(SMOLLM3_SPECIAL_NAMES[token_id])
        elif token_id == 128005:
            names.append("<|reserved_special_token_2|>")
        else:  # Llama-3.2 numbers the reserved tokens from 128011 on as 3, 4, ...
            names.append(f"<|reserved_special_token_{token_id - 128008}|>")
    return names


def cache_dir() -> Path:
    return Path(os.environ.get("PREP_CACHE", Path.home() / ".cache" / "prep"))


@lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """A 3-second probe, because transformers and datasets retry an unreachable hub for ~25-50 s."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    host = constants.ENDPOINT.split("://", 1)[-1].split("/", 1)[0]
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def build_smollm3_offline(out_dir: Path) -> Path:
    """Write SmolLM3's tokenizer (tokenizer.json + tokenizer_config.json) into out_dir, atomically."""
    import llama_models
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    model_file = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    backend = TikTokenConverter(
        vocab_file=str(model_file), pattern=LLAMA3_PATTERN, extra_special_tokens=smollm3_special_tokens()
    ).converted()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token=PAD_TOKEN,
        model_max_length=65536,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out_dir)
    return out_dir


def load_hf_tokenizer(name_or_path: str = DEFAULT_TOKENIZER):
    """A transformers fast tokenizer from a local directory or a hub id (SmolLM3 also offline)."""
    from transformers import AutoTokenizer

    if Path(name_or_path).is_dir():
        return AutoTokenizer.from_pretrained(name_or_path)
    if hub_reachable():
        try:
            return AutoTokenizer.from_pretrained(name_or_path)
        except OSError:
            pass
    if "smollm3" in name_or_path.lower():
        return AutoTokenizer.from_pretrained(offline_smollm3_dir())
    raise ValueError(
        f"can't load tokenizer {name_or_path!r}: the hub is unreachable and it is not a local directory; "
        "pass --tokenizer DIR with a tokenizer.json"
    )


def offline_smollm3_dir() -> Path:
    """SmolLM3's tokenizer built from llama-models' Llama-3 BPE, once, into the cache; says so in one line."""
    local = cache_dir() / "tokenizers" / "SmolLM3-3B"
    if not (local / "tokenizer.json").exists():
        build_smollm3_offline(local)
    print(f"hub unreachable: using SmolLM3's tokenizer rebuilt from llama-models' Llama-3 BPE ({local})", file=sys.stderr)
    return local


def _bytes_of_byte_level() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {ch: b for b, ch in bytes_to_unicode().items()}


def tiktoken_twin(backend) -> tuple[dict | None, str]:
    """What a tiktoken Encoding equal to `backend` (a tokenizers.Tokenizer) is made of, or None and why not."""
    import tiktoken

    spec = json.loads(backend.to_str())
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is not None:
        return None, "has a normalizer"
    if model.get("type") != "BPE" or not model.get("ignore_merges") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix") or model.get("dropout"):
        return None, "model is not a plain byte-level BPE with ignore_merges"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) != 2 or steps[0].get("type") != "Split" or steps[0].get("behavior") != "Isolated" \
            or steps[0].get("invert") or steps[1].get("type") != "ByteLevel" or steps[1].get("use_regex") \
            or steps[1].get("add_prefix_space") or "Regex" not in steps[0].get("pattern", {}):
        return None, "pre-tokenizer is not Split(regex) + ByteLevel"
    added = backend.get_added_tokens_decoder()
    if any(t.lstrip or t.rstrip or t.single_word for t in added.values()):
        return None, "an added token strips whitespace"
    byte_of = _bytes_of_byte_level()
    vocab = model["vocab"]
    try:
        ranks = {bytes(byte_of[c] for c in token): rank for token, rank in vocab.items()}
    except KeyError:
        return None, "vocabulary is not byte-level"
    merged_ranks = [vocab.get(a + b) for a, b in (m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"])]
    if None in merged_ranks or any(x > y for x, y in zip(merged_ranks, merged_ranks[1:])):
        return None, "merges are not in rank order"
    spec = {"pattern": steps[0]["pattern"]["Regex"], "special_tokens": {t.content: i for i, t in added.items()}}
    encoding = tiktoken.Encoding(name="twin", pat_str=spec["pattern"], mergeable_ranks=ranks,
                                 special_tokens=spec["special_tokens"])
    probe = PROBE_TEXT + "".join(t.content for t in list(added.values())[:16])
    if encoding.encode(probe, allowed_special="all") != backend.encode(probe, add_special_tokens=False).ids:
        return None, "disagrees on the probe text"
    return spec | {"ranks": ranks}, ""


PROBE_TEXT = (
    "Hello world! It's 3.14159 and I'll've 12345678 things.\r\n\tTabs\t\tand    spaces   \n\n\n"
    "Ünïcödé façade naïve — “quotes” ‘x’; Ελληνικά; 中文字符测试; 日本語のテキスト; 한국어; العربية; "
    "emoji 😀👍🏽👨‍👩‍👧 ✓ ∑ ∫ √ ≤ ≥; def f(x):\n    return x**2  # comment\n}}]]))  \n"
    "<think>\nWait, let me re-check: \\frac{a}{b} + x^2 = \\boxed{42}\n</think>"
)


class Encoder:
    """Text -> uint32 token ids, with the fastest exact backend for the tokenizer in `tokenizer_json`.

    Whether tiktoken is exact for a tokenizer is decided once per tokenizer.json (by its sha256) and
    cached with the ranks, so a build starts in ~0.5 s instead of ~4 s (transformers import,
    vocabulary conversion and checks).
    """

    def __init__(self, tokenizer_json: Path, name: str):
        self.name, self.tokenizer_json = name, Path(tokenizer_json)
        key = hashlib.sha256(self.tokenizer_json.read_bytes()).hexdigest()[:32]
        meta_path = cache_dir() / "encoders" / f"{key}.json"
        ranks_path = meta_path.with_suffix(".ranks.npz")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        if meta is None or not (meta["fallback_reason"] or ranks_path.exists()):  # no cache, or an older layout
            meta = self._inspect()
            _write_cache(meta_path, meta, getattr(self, "_ranks", None))
        self.vocab_size, self.fingerprint, self.pad_id = meta["vocab_size"], meta["fingerprint"], meta["pad_id"]
        self.fallback_reason = meta["fallback_reason"]
        self.fast = self.separator = None
        if not self.fallback_reason:
            import tiktoken

            ranks = getattr(self, "_ranks", None) or _load_ranks(ranks_path)
            self.fast = tiktoken.Encoding(name="twin", pat_str=meta["pattern"], mergeable_ranks=ranks,
                                          special_tokens=meta["special_tokens"])
            # encode_batch joins texts with the last special token (a reserved one in Llama-3 vocabularies)
            specials = meta["special_tokens"]
            self.separator = max(specials, key=specials.get) if specials else None
            self.separator_id = specials.get(self.separator)
        self.kind = "tiktoken" if self.fast is not None else "tokenizers"

    @cached_property
    def backend(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.tokenizer_json))

    def _inspect(self) -> dict:
        twin, reason = tiktoken_twin(self.backend)
        pad = self.backend.token_to_id(PAD_TOKEN)
        if pad is None:  # not a Llama-3 vocabulary: the tokenizer's own pad, else its end-of-text
            config = self.tokenizer_json.with_name("tokenizer_config.json")
            config = json.loads(config.read_text()) if config.exists() else {}
            pad = next((self.backend.token_to_id(t) for t in (config.get("pad_token"), config.get("eos_token"))
                        if isinstance(t, str) and self.backend.token_to_id(t) is not None), 0)
        meta = {"vocab_size": self.backend.get_vocab_size(with_added_tokens=True),
                "fingerprint": fingerprint(self.backend), "pad_id": pad, "fallback_reason": reason}
        if twin is not None:
            self._ranks = twin.pop("ranks")
            meta.update(twin)
        return meta

    def encode(self, text: str) -> np.ndarray:
        """Ids of text; special-token strings in text become their special ids, as in transformers."""
        if self.fast is not None:
            return self.fast.encode_to_numpy(text, allowed_special="all").astype(np.uint32, copy=False)
        return np.asarray(self.backend.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def encode_batch(self, docs: list[list[str]]) -> list[np.ndarray]:
        """`encode` of each document, given as the strings it concatenates (prep.render.render_parts),
        from one tiktoken call over the documents joined by a separator special token. tiktoken cuts
        its input at special tokens and runs the regex and BPE on each piece on its own, so the ids of
        the joined text are the documents' ids with the separator's id between them. One call per
        batch takes the GIL twice per batch instead of twice per document: beside a busy Python
        thread, per-document calls ran at half the speed of batched ones here, and even alone they
        were 6-15% slower. If the separator is not found once per seam (a document that contains it,
        or a special token straddling a seam) the batch is encoded document by document."""
        if self.fast is not None and self.separator is not None and len(docs) > 1:
            pieces = []
            for parts in docs:
                pieces += parts
                pieces.append(self.separator)
            pieces.pop()
            joined = "".join(pieces)
            if joined.count(self.separator) == len(docs) - 1:  # no document contains it
                ids = self.fast.encode_to_numpy(joined, allowed_special="all")
                seams = np.flatnonzero(ids == self.separator_id)
                if len(seams) == len(docs) - 1:  # every separator became its own token
                    # copies: a view would keep the whole batch's ids alive as long as any one document waits to be packed
                    first, *rest = np.split(ids, seams)
                    return [first.copy()] + [piece[1:].copy() for piece in rest]
        return [self.encode("".join(parts)) for parts in docs]

    def encode_with_starts(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Ids and, for each token, the character offset where it starts (for loss masks)."""
        if self.fast is not None:
            ids = self.fast.encode(text, allowed_special="all")
            _, starts = self.fast.decode_with_offsets(ids)
            return np.asarray(ids, dtype=np.uint32), np.asarray(starts, dtype=np.int64)
        enc = self.backend.encode(text, add_special_tokens=False)
        return np.asarray(enc.ids, dtype=np.uint32), np.asarray([s for s, _ in enc.offsets], dtype=np.int64)

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)


def _write_cache(meta_path: Path, meta: dict, ranks: dict[bytes, int] | None) -> None:
    """The ranks, then the metadata, each atomically (the metadata's presence means the cache is whole)."""
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    if ranks is not None:
        tmp = meta_path.with_suffix(f".ranks.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            _save_ranks(f, ranks)
        os.replace(tmp, meta_path.with_suffix(".ranks.npz"))
    tmp = meta_path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, meta_path)


def _save_ranks(file, ranks: dict[bytes, int]) -> None:
    """Tokens as one byte string plus end offsets, in rank order: loading it takes ~0.05 s where
    tiktoken's own base64 text format took 0.12-0.23 s, on every start of every command."""
    tokens = sorted(ranks, key=ranks.get)
    np.savez(file, blob=np.frombuffer(b"".join(tokens), dtype=np.uint8),
             ends=np.cumsum([len(t) for t in tokens], dtype=np.int64),
             ranks=np.array([ranks[t] for t in tokens], dtype=np.int64))


def _load_ranks(path: Path) -> dict[bytes, int]:
    with np.load(path, allow_pickle=False) as arrays:
        blob, ends, ranks = arrays["blob"].tobytes(), arrays["ends"].tolist(), arrays["ranks"].tolist()
    return {blob[start:end]: rank for start, end, rank in zip([0, *ends[:-1]], ends, ranks)}


def tokenizer_file(name_or_path: str = DEFAULT_TOKENIZER) -> Path:
    """The tokenizer.json for a local directory or a hub id (SmolLM3 is built offline when needed)."""
    if Path(name_or_path).is_dir():
        path = Path(name_or_path) / "tokenizer.json"
        if not path.exists():
            raise ValueError(f"--tokenizer {name_or_path} has no tokenizer.json")
        return path
    if hub_reachable():
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(name_or_path, "tokenizer.json"))
        except Exception:  # unknown repo, gated, network hiccup: try the offline route below
            pass
    if "smollm3" in name_or_path.lower():
        return offline_smollm3_dir() / "tokenizer.json"
    raise ValueError(
        f"can't load tokenizer {name_or_path!r}: the hub is unreachable and it is not a local directory; "
        "pass --tokenizer DIR with a tokenizer.json"
    )


def load_encoder(name_or_path: str = DEFAULT_TOKENIZER) -> Encoder:
    return Encoder(tokenizer_file(name_or_path), name_or_path)
