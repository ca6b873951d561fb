"""The tokenizer: load SmolLM3's (hub id, local dir, or built offline), and encode fast and exactly.

SmolLM3 uses the Llama-3.2 byte-level BPE (128,000 ranks, Llama-3 pre-tokenizer regex) plus 256
special tokens (vocab 128,256), some renamed by SmolLM3 (`<|im_start|>` = 128011, ...).

Loading: `--tokenizer` is a local directory or a hub id, read by `transformers.AutoTokenizer`
either way. When the hub can't be reached and SmolLM3 is asked for, the same tokenizer is built
from the Llama-3 `tokenizer.model` that the PyPI package `llama-models` ships (transformers'
`TikTokenConverter` turns ranks into a `tokenizers` BPE), saved to a cache directory and loaded
from there.

Encoding: `fastokens` loads the same tokenizer.json as `tokenizers` and gives the same ids, many
times faster, encoding a whole batch of documents per call with the GIL released. It is used
once it agrees with `tokenizers` on a probe text (checked once per tokenizer.json and versions,
then cached); otherwise, or for a document fastokens fails on (an error, such as a PCRE2 limit
on a pathological text, or ids whose bytes don't add up to the text's), `tokenizers` encodes it
and the manifest counts it. Tests check equality on a wide text set and a seeded fuzz corpus.

`encode` is the build's tokenizing stage: batches are encoded on a thread pool, in order.
"""

import hashlib
import json
import os
import socket
import sys
from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor
from functools import cached_property, lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Iterator

import numpy as np

from prep.shards import fingerprint
from prep.sources import Batch

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


PROBE_TEXT = (
    "Hello world! It's 3.14159 and I'll've 12345678 things.\r\n\tTabs\t\tand    spaces   \n\n\n"
    "Ünïcödé façade naïve — “quotes” ‘x’; Ελληνικά; 中文字符测试; 日本語のテキスト; 한국어; العربية; "
    "emoji 😀👍🏽👨‍👩‍👧 ✓ ∑ ∫ √ ≤ ≥; def f(x):\n    return x**2  # comment\n}}]]))  \n"
    "<think>\nWait, let me re-check: \\frac{a}{b} + x^2 = \\boxed{42}\n</think>"
)
# fastokens' PCRE2 limits (pcre2_match_limit, ...), None = PCRE2's own. SmolLM3's Llama-3 pattern
# doesn't run on PCRE2 in fastokens; a tokenizer whose pattern does and a document that exceeds a
# limit get an error from fastokens, and that document is encoded by `tokenizers` instead.
PCRE2_LIMITS: dict[str, int] = {}
ENCODED, FALLBACK, FAILED = 0, 1, 2  # which encoder gave a text's ids (Encoder.encode_batch)


class Encoder:
    """Text -> uint32 token ids, exactly as `tokenizers` encodes the tokenizer in `tokenizer_json`.

    What fastokens may do for this tokenizer (and the vocabulary facts the build needs) is worked
    out once per tokenizer.json and library versions and cached, so a build doesn't load
    `tokenizers` (0.5 s) to start; loading fastokens itself takes 1-2 s, on a thread of its own.
    """

    def __init__(self, tokenizer_json: Path, name: str):
        self.name, self.tokenizer_json = name, Path(tokenizer_json)
        identity = self.tokenizer_json.read_bytes() + f"{version('fastokens')} {version('tokenizers')}".encode()
        meta_path = cache_dir() / "encoders" / f"{hashlib.sha256(identity).hexdigest()[:32]}.json"
        bytes_path = meta_path.with_suffix(".token-bytes.npy")
        if meta_path.exists():
            meta, fast, token_bytes = json.loads(meta_path.read_text()), None, None
        else:
            meta, fast, token_bytes = self._inspect()
            _write_cache(meta_path, meta, bytes_path, token_bytes)
        self.vocab_size, self.fingerprint, self.pad_id = meta["vocab_size"], meta["fingerprint"], meta["pad_id"]
        self.fallback_reason, self.byte_level = meta["fallback_reason"], meta["byte_level"]
        if self.byte_level and token_bytes is None:
            token_bytes = np.load(bytes_path, allow_pickle=False)
        self.token_bytes = token_bytes  # bytes each id spells, for byte-level vocabularies
        self.kind = "tokenizers" if self.fallback_reason else "fastokens"
        # Loading fastokens takes 1-2 s in Rust, with the GIL released: it runs on a thread of its
        # own while the build gets going (its readers fill their queues); the first encode waits.
        self._fast, self._loading = fast, None  # _loading: the load's Future, until it is taken
        if self.kind == "fastokens" and fast is None:
            loader = ThreadPoolExecutor(1, thread_name_prefix="prep-load-fastokens")
            self._loading = loader.submit(_load_fastokens, self.tokenizer_json)
            loader.shutdown(wait=False)  # the load goes on; the thread ends with it

    @property
    def fast(self):
        """The fastokens tokenizer (None when `tokenizers` encodes), once it has loaded."""
        loading = self._loading  # read once: encoder threads may ask at the same moment
        if loading is not None:
            self._fast, self._loading = loading.result(), None
        return self._fast

    @fast.setter
    def fast(self, tokenizer) -> None:
        self._fast, self._loading = tokenizer, None

    def loading(self) -> bool:
        """Whether fastokens is still loading (the build reads further ahead meanwhile)."""
        loading = self._loading
        return loading is not None and not loading.done()

    @cached_property
    def backend(self):
        """The reference: a `tokenizers.Tokenizer`, loaded when first needed."""
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.tokenizer_json))

    def _inspect(self) -> tuple[dict, object, np.ndarray | None]:
        """Vocabulary facts, whether fastokens loads this tokenizer and agrees on the probe text,
        the fastokens tokenizer and each id's length in bytes (None unless byte-level)."""
        pad = self.backend.token_to_id(PAD_TOKEN)
        if pad is None:  # not a Llama-3 vocabulary: the tokenizer's own pad, else its end-of-text
            config = self.tokenizer_json.with_name("tokenizer_config.json")
            config = json.loads(config.read_text()) if config.exists() else {}
            pad = next((self.backend.token_to_id(name) for name in (config.get("pad_token"), config.get("eos_token"))
                        if isinstance(name, str) and self.backend.token_to_id(name) is not None), 0)
        added = list(self.backend.get_added_tokens_decoder().values())
        probe = PROBE_TEXT + "".join(token.content for token in added[:16])
        expected = self.backend.encode(probe, add_special_tokens=False).ids
        token_bytes = _byte_level_lengths(self.backend)
        byte_level = token_bytes is not None and int(token_bytes[expected].sum()) == len(probe.encode())
        reason, fast = "", None
        try:
            fast = _load_fastokens(self.tokenizer_json)
            ids, _ = fast.encode_batch_flat([probe])
            if np.frombuffer(ids, np.uint32).tolist() != expected:
                reason = "fastokens disagrees with tokenizers on the probe text"
        except Exception as error:  # a tokenizer.json fastokens doesn't support
            reason = f"fastokens can't load it: {error}"
        meta = {"vocab_size": self.backend.get_vocab_size(with_added_tokens=True),
                "fingerprint": fingerprint(self.backend), "pad_id": pad, "fallback_reason": reason,
                "byte_level": byte_level}
        return meta, fast, token_bytes if byte_level else None

    def encode(self, text: str) -> np.ndarray:
        """Ids of text; special-token strings in text become their special ids, as in transformers."""
        ids, _, encoded_by = self.encode_batch([text])
        if encoded_by[0] == FAILED:
            raise ValueError(f"neither fastokens nor tokenizers can encode this {len(text):,}-character text")
        return ids

    def encode_batch(self, texts: list[str], text_bytes: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ids of every text, concatenated (uint32); offsets (text k is ids[offsets[k]:offsets[k+1]]);
        and per text which encoder gave its ids: ENCODED, FALLBACK (fastokens failed, `tokenizers`
        encoded it) or FAILED (neither could: no ids; the build counts the row as rejected).
        `text_bytes`, each text's length in UTF-8 when the caller knows it, saves encoding them again."""
        encoded_by = np.full(len(texts), ENCODED, dtype=np.uint8)
        if self.fast is not None:
            try:
                ids, offsets = self._fast_batch(texts)
                if self._bytes_add_up(texts, ids, offsets, text_bytes):
                    return ids, offsets, encoded_by
            except BaseException as error:  # some text failed: find which, one by one
                _raise_unless_encoder_error(error)
        pieces = []
        for index, text in enumerate(texts):
            ids = self._fast_one(text) if self.fast is not None else None
            if ids is None:
                ids = self._reference_one(text)
                encoded_by[index] = FAILED if ids is None else FALLBACK if self.fast is not None else ENCODED
            pieces.append(np.zeros(0, np.uint32) if ids is None else ids)
        offsets = np.r_[0, np.cumsum([len(piece) for piece in pieces])].astype(np.int64)
        return (np.concatenate(pieces) if pieces else np.zeros(0, np.uint32)), offsets, encoded_by

    def _fast_one(self, text: str) -> np.ndarray | None:
        """fastokens' ids of one text, or None when it fails on it."""
        try:
            ids, offsets = self._fast_batch([text])
        except BaseException as error:
            _raise_unless_encoder_error(error)
            return None
        return ids if self._bytes_add_up([text], ids, offsets) else None

    def _reference_one(self, text: str) -> np.ndarray | None:
        """`tokenizers`' ids of one text, or None when it fails on it too (on 50 MB of whitespace its
        Oniguruma regex gives up: "retry-limit-in-match over")."""
        try:
            return np.asarray(self.backend.encode(text, add_special_tokens=False).ids, dtype=np.uint32)
        except BaseException as error:
            _raise_unless_encoder_error(error)
            return None

    def _fast_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids, offsets = self.fast.encode_batch_flat(texts)
        return np.frombuffer(ids, np.uint32), np.frombuffer(offsets, np.uint64).astype(np.int64)

    def _bytes_add_up(self, texts: list[str], ids: np.ndarray, offsets: np.ndarray,
                      text_bytes: np.ndarray | None = None) -> bool:
        """Whether each text's tokens spell as many bytes as the text has: a cheap guard that catches
        a lost or repeated piece of text (it can't see two different splits of the same bytes; the
        probe check and the tests cover those). Tokenizers that aren't byte-level pass."""
        if not self.byte_level:
            return True
        starts, ends = offsets[:-1], offsets[1:]
        spelled = np.zeros(len(texts), np.int64)
        if len(ids):  # 2 ns per token: the table fits in cache, and 'clip' skips numpy's bounds check
            tokens = ends > starts  # reduceat wants the start of every non-empty text, no other
            spelled[tokens] = np.add.reduceat(np.take(self.token_bytes, ids, mode="clip"), starts[tokens], dtype=np.int64)
        return np.array_equal(spelled, [len(text.encode()) for text in texts] if text_bytes is None else text_bytes)

    def token_starts(self, texts: list[str], ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """The byte where each token starts, counted from the start of the batch's texts joined."""
        if self.byte_level:
            lengths = self.token_bytes[ids].astype(np.int64)
            return np.cumsum(lengths) - lengths
        starts, base = [], 0
        for text in texts:  # not byte-level: tokenizers' character offsets, turned into bytes
            encoding = self.backend.encode(text, add_special_tokens=False)
            char_bytes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
            byte_of_char = np.r_[0, np.cumsum(1 + (char_bytes >= 0x80) + (char_bytes >= 0x800) + (char_bytes >= 0x10000))]
            starts.append(base + byte_of_char[[start for start, _ in encoding.offsets]])
            base += int(byte_of_char[-1])
        return np.concatenate(starts) if starts else np.zeros(0, np.int64)

    def decode(self, ids) -> str:
        return self.backend.decode([int(token_id) for token_id in ids], skip_special_tokens=False)


def _raise_unless_encoder_error(error: BaseException) -> None:
    """Let only an encoder's own failure through: a ValueError (how fastokens reports one, a PCRE2
    limit say) or a Rust panic, which pyo3 raises as PanicException, a BaseException."""
    if not isinstance(error, Exception) and type(error).__name__ != "PanicException":
        raise error


def _load_fastokens(tokenizer_json: Path):
    import fastokens

    return fastokens.Tokenizer.from_file(str(tokenizer_json), **PCRE2_LIMITS)


def _byte_level_lengths(backend) -> np.ndarray | None:
    """Bytes each token id spells, when the vocabulary is byte-level (every character of a base
    token stands for one byte, an added token for its UTF-8 text); None otherwise."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = set(bytes_to_unicode().values())
    added = {token_id: token.content for token_id, token in backend.get_added_tokens_decoder().items()}
    lengths = np.zeros(backend.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for token, token_id in backend.get_vocab(with_added_tokens=True).items():
        if token_id in added:
            lengths[token_id] = len(added[token_id].encode())
        elif set(token) <= alphabet:
            lengths[token_id] = len(token)
        else:
            return None
    return lengths.astype(np.uint8 if lengths.max() < 256 else np.int64)


def _write_cache(meta_path: Path, meta: dict, bytes_path: Path, token_bytes: np.ndarray | None) -> None:
    """The token lengths, then the metadata, each atomically (the metadata's presence means the cache is whole)."""
    from prep.shards import write_json_atomic

    meta_path.parent.mkdir(parents=True, exist_ok=True)
    if token_bytes is not None:
        tmp = bytes_path.with_name(bytes_path.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.save(f, token_bytes)
        os.replace(tmp, bytes_path)
    write_json_atomic(meta_path, meta)


def encode(batches: Iterator[Batch], encoder: Encoder, pool: Executor, in_flight: int,
           budget: float | None = None, taken=None) -> Iterator[Batch]:
    """Each batch's texts encoded on the pool, up to `in_flight` batches ahead, yielded in order
    (so the output doesn't depend on the number of threads). With `--loss-on assistant` batches
    (their `spans`) also get their loss masks. `budget` is about how many tokens the mixer will
    take from this source (its share of --max-tokens) and `taken()` how many it has taken: batches
    are not encoded ahead beyond it, since the ones the mixer never takes cost CPU the others need."""
    queue: deque = deque()  # (bytes of text, future) of the batches ahead
    seen_bytes = seen_tokens = 0
    try:
        while True:
            while len(queue) < in_flight and (budget is None or not queue or _short_of(
                    budget, taken(), queue, seen_tokens / seen_bytes if seen_bytes else 0.25)):
                batch = next(batches, None)
                if batch is None:
                    break
                queue.append((int(batch.text_bytes.sum()), pool.submit(_encode_batch, encoder, batch)))
            if not queue:
                return
            num_bytes, future = queue.popleft()
            batch = future.result()
            seen_bytes += num_bytes
            seen_tokens += len(batch.ids)
            yield batch
    finally:  # the mixer stopped early: don't encode batches nobody will take
        for _, future in queue:
            future.cancel()


def _short_of(budget: float, taken: int, queue: deque, tokens_per_byte: float) -> bool:
    """Whether the mixer is likely to take more than the batches in the queue will give, guessing
    their tokens from their bytes at the rate seen so far."""
    return taken + sum(num_bytes for num_bytes, _ in queue) * tokens_per_byte < budget


def _encode_batch(encoder: Encoder, batch: Batch) -> Batch:
    """On the pool: a rendered batch's ids (and loss masks) filled in."""
    texts = batch.texts.to_pylist()
    batch.ids, offsets, batch.encoded_by = encoder.encode_batch(texts, batch.text_bytes)
    batch.starts, batch.ends = offsets[:-1], offsets[1:]
    if batch.spans is not None:
        batch.masks = loss_mask(encoder.token_starts(texts, batch.ids, offsets), batch.text_bytes, batch.spans)
    batch.texts = batch.spans = None
    return batch


def loss_mask(token_starts: np.ndarray, text_bytes: np.ndarray, spans: tuple) -> np.ndarray:
    """1 on the tokens that start inside a span, 0 elsewhere. Token starts are bytes from the start
    of the joined texts; a span is (document, start byte, end byte) within its document."""
    document, start, end = spans
    text_base = np.r_[0, np.cumsum(text_bytes)[:-1]]
    span_start, span_end = text_base[document] + start, text_base[document] + end
    last = np.searchsorted(span_start, token_starts, side="right") - 1  # the last span starting at or before
    inside = (last >= 0) & (token_starts < span_end[np.maximum(last, 0)])
    return inside.astype(np.uint8)


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
    """The Encoder for a hub id or local directory. One process reuses it while the tokenizer.json
    is unchanged: loading fastokens takes 1-2 s, and a test session builds dozens of times."""
    path = tokenizer_file(name_or_path)
    stat = path.stat()
    return _encoder(path, name_or_path, stat.st_size, stat.st_mtime_ns, tuple(sorted(PCRE2_LIMITS.items())))


@lru_cache(maxsize=4)
def _encoder(path: Path, name: str, *identity) -> Encoder:
    return Encoder(path, name)
