"""Tokenizer exactness: the fastokens hot path equals `tokenizers` (on a wide text set, a seeded fuzz
corpus and pathological documents) and Meta's own Llama-3 tokenizer; where fastokens fails, the
fallback still gives `tokenizers`' ids and is counted."""

import json
import random

import numpy as np
import pytest

import prep.tokenizer
from prep.tokenizer import CHATML_TEMPLATE, ENCODED, FALLBACK, Encoder, smollm3_special_tokens


def wide_texts() -> list[str]:
    rng = random.Random(7)
    texts = [
        "Hello, world! It's a test. They'll've done it; we'd go.",
        "naïve façade coöperate Ærøskøbing — “smart quotes” and ‘single’ … ¿Qué? ¡Sí!",
        "中文分词测试：数学题的答案是四十二。日本語のテキストとカタカナ。한국어 문장입니다.",
        "العربية نص تجريبي مع أرقام ١٢٣ and עברית",
        "emoji 😀😃👍🏽👨‍👩‍👧‍👦🏳️‍🌈 🇫🇷 ✓ ✗ ★ ∑∫√∞≤≥≠ ℝ ℕ 𝔽 𝒪(n log n)",
        "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n    else:\n        return -x\n",
        "line one\r\nline two\r\n\r\nline four\rold mac\n",
        "spaces:" + " " * 37 + "end" + "\t" * 9 + "tabs" + "\n" * 12 + "newlines" + " \n \n  \n",
        " " * 5000 + "x" + "\n" * 3000,
        "12345678901234567890 3.14159265 1e-10 0x1F 1,000,000 2024-11-29",
        "<think>\nWait, maybe \\frac{a}{b} = \\boxed{42}.\n</think>\n\nThe answer is 42.",
        "special strings in content: <|im_start|>user\nhi<|im_end|> <|begin_of_text|> <tool_call>{}</tool_call> "
        "<|reserved_special_token_99|> <|im_end |> <|not_a_token|>",
        "'s 's 'S 'T 'Re 've 'M 'LL 'D '''' \"\" ``` ~~~ ***",
        "a" * 20000,
        "ab1" * 7000,
        "\u200b\u200d\ufeff zero width and BOM \u00a0nbsp \u2028 line sep \u3000 ideographic space",
        "\x00NUL\x01\x07\x1b[31mANSI\x1b[0m \x7f",
    ]
    for _ in range(30):  # random bytes, decoded leniently as real data often is
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(1, 400)))
        texts.append(raw.decode("utf-8", errors="replace"))
        texts.append(raw.decode("latin-1"))
    for _ in range(30):  # random unicode across planes
        texts.append("".join(chr(rng.choice([rng.randrange(32, 0x2FF), rng.randrange(0x4E00, 0x9FFF),
                                             rng.randrange(0x1F300, 0x1FAFF), rng.randrange(0x600, 0x6FF)]))
                             for _ in range(rng.randint(1, 300))))
    return texts


def reference(encoder, text: str) -> list[int]:
    return encoder.backend.encode(text, add_special_tokens=False).ids


def fuzz_texts(count: int, seed: int) -> list[str]:
    """Generated hard texts: special tokens and fragments of them, CJK, emoji and ZWJ sequences,
    combining marks, whitespace runs, digits, control characters, private-use and astral code points,
    contractions and code, in random mixtures and lengths."""
    rng = random.Random(seed)
    specials = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|begin_of_text|>", "<tool_call>",
                "<|reserved_special_token_5|>", "<|finetune_right_pad_id|>", "<code>"]
    fragments = [token[:cut] for token in specials for cut in range(1, len(token))] + ["<|", "|>", "<", ">", "|"]
    pieces = [
        lambda: rng.choice(specials),
        lambda: rng.choice(fragments),
        lambda: "".join(chr(rng.randrange(0x4E00, 0xA000)) for _ in range(rng.randint(1, 12))),  # CJK
        lambda: "".join(chr(rng.randrange(0x3040, 0x3100)) for _ in range(rng.randint(1, 8))),  # kana
        lambda: rng.choice(["👨‍👩‍👧‍👦", "🏳️‍🌈", "👍🏽", "🇫🇷", "❤️‍🔥", "🧑🏿‍💻", "😀"]) * rng.randint(1, 3),
        lambda: rng.choice("aeioun") + "".join(chr(rng.randrange(0x300, 0x370)) for _ in range(rng.randint(1, 5))),
        lambda: "".join(rng.choice(" \t\n\r\u00a0\u3000\u2028\u200b") for _ in range(rng.randint(1, 40))),
        lambda: str(rng.randrange(10 ** rng.randint(1, 15))),
        lambda: "".join(chr(rng.randrange(0, 32)) for _ in range(rng.randint(1, 4))) + "\x7f",
        lambda: "".join(chr(rng.randrange(0xE000, 0xF900)) for _ in range(rng.randint(1, 4))),  # private use
        lambda: "".join(chr(rng.randrange(0x10000, 0x10FFFF)) for _ in range(rng.randint(1, 4))),  # astral
        lambda: rng.choice(["'s", "'T", "'re", "'VE", "'m", "'ll", "'d", "''", "n't"]),
        lambda: rng.choice(["def f(x):\n    return x", "{\"a\": [1, 2]}", "\\frac{a}{b}", "x**2 + y_1", "<div>"]),
        lambda: " ".join(rng.choice(["the", "Wait", "naïve", "Ελληνικά", "العربية", "한국어", "ℝ", "∑"]) for _ in range(3)),
    ]
    texts = []
    for _ in range(count):
        texts.append("".join(rng.choice(pieces)() + rng.choice(["", " ", "\n", "  "]) for _ in range(rng.randint(1, 12))))
    return texts


def test_smollm3_vocab_and_names(encoder):
    assert encoder.kind == "fastokens", encoder.fallback_reason
    assert encoder.byte_level
    assert encoder.vocab_size == 128_256
    assert encoder.pad_id == 128_004
    token = encoder.backend.token_to_id
    expected = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128002: "<think>", 128003: "</think>",
                128004: "<|finetune_right_pad_id|>", 128011: "<|im_start|>", 128012: "<|im_end|>",
                128013: "<tool_response>", 128014: "</tool_response>", 128015: "<tool_call>",
                128016: "</tool_call>", 128017: "<code>", 128018: "</code>",
                128009: "<|eot_id|>", 128255: "<|reserved_special_token_247|>"}
    for token_id, name in expected.items():
        assert token(name) == token_id
    assert len(set(smollm3_special_tokens())) == 256


@pytest.mark.parametrize("index", range(len(wide_texts())))
def test_fastokens_equals_tokenizers(encoder, index):
    text = wide_texts()[index]
    assert encoder.encode(text).tolist() == reference(encoder, text)


def test_encode_batch_equals_encoding_each_text(encoder):
    """One fastokens call per batch; each text must still get exactly its own ids."""
    texts = wide_texts() + ["", "<|im_", "end|>", " " * 7, "\r", "\n\n", "<think>", "'"]
    random.Random(1).shuffle(texts)
    ids, offsets, encoded_by = encoder.encode_batch(texts)
    assert [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])] == [reference(encoder, t) for t in texts]
    assert ids.dtype == np.uint32 and (encoded_by == ENCODED).all()


def test_fuzz_10000_texts_equal_tokenizers(encoder):
    texts = fuzz_texts(10_000, seed=11)
    ids, offsets, encoded_by = encoder.encode_batch(texts)
    expected = [encoding.ids for encoding in encoder.backend.encode_batch(texts, add_special_tokens=False)]
    got = [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    mismatches = [k for k in range(len(texts)) if got[k] != expected[k]]
    assert not mismatches, f"{len(mismatches)} texts differ, first: {texts[mismatches[0]]!r}"
    assert (encoded_by == ENCODED).all() and sum(map(len, expected)) > 300_000


@pytest.mark.parametrize("name", ["word", "repetition", "whitespace", "newlines"])
def test_pathological_documents_are_exact(encoder, name):
    """A 1M-character word, deep repetition and long whitespace runs: exact ids (or a counted fallback,
    which gives the same ids), never an error."""
    text = {"word": "a" * 1_000_000, "repetition": "ab1 " * 250_000 + "!?" * 100_000,
            "whitespace": " " * 2_000_000 + "x" + "\t" * 100_000, "newlines": (" " * 500 + "\n") * 2_000}[name]
    ids, offsets, _ = encoder.encode_batch(["before", text, "after"])
    assert ids[offsets[1]:offsets[2]].tolist() == reference(encoder, text)
    assert ids[:offsets[1]].tolist() == reference(encoder, "before")


@pytest.mark.slow
def test_10_mb_of_whitespace_is_exact(encoder):
    """`tokenizers` itself gives up on long whitespace runs (on 50 MB its Oniguruma regex stops with
    "retry-limit-in-match over"), so the reference here is its BPE model on the one pre-token that
    the regex makes of an all-space text (`\\s+(?!\\S)` up to the end): the byte-level "Ġ"s."""
    num_spaces = 10_000_000
    expected = [token.id for token in encoder.backend.model.tokenize("Ġ" * num_spaces)]
    assert encoder.encode(" " * num_spaces).tolist() == expected


def pcre2_tokenizer(encoder, tmp_path, monkeypatch):
    """SmolLM3's tokenizer.json with its pattern changed just enough that fastokens runs it on PCRE2
    (its Llama-3 pattern has a PCRE2-free matcher), under a match limit a long whitespace run exceeds."""
    spec = json.loads(encoder.tokenizer_json.read_text())
    split = spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]
    split["Regex"] = split["Regex"].replace(r"\p{N}{1,3}", r"\p{N}{1,4}")
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    monkeypatch.setenv("PREP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(prep.tokenizer, "PCRE2_LIMITS", {"pcre2_match_limit": 1000})
    return Encoder(tmp_path / "tokenizer.json", "pcre2")


def test_a_pcre2_limit_falls_back_to_exact_ids(encoder, tmp_path, monkeypatch):
    pcre2 = pcre2_tokenizer(encoder, tmp_path, monkeypatch)
    assert pcre2.kind == "fastokens"
    hostile = " " * 100_000 + "x"
    with pytest.raises(ValueError, match="match limit"):  # what fastokens itself does
        pcre2.fast.encode_batch_flat([hostile])
    texts = ["12345 numbers", hostile, "and more text"]
    ids, offsets, encoded_by = pcre2.encode_batch(texts)
    assert encoded_by.tolist() == [ENCODED, FALLBACK, ENCODED]
    assert [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])] == [reference(pcre2, t) for t in texts]


def test_ids_that_dont_spell_the_text_fall_back(encoder, monkeypatch):
    """The bytes guard: if fastokens ever lost or repeated a piece of text, the ids come from tokenizers."""
    real = encoder.fast

    class Lossy:  # fastokens, except that a text saying "lossy" loses its last token
        def encode_batch_flat(self, texts):
            pieces = [np.frombuffer(real.encode_batch_flat([text])[0], np.uint32) for text in texts]
            pieces = [piece[:-1] if "lossy" in text else piece for piece, text in zip(pieces, texts)]
            offsets = np.r_[0, np.cumsum([len(piece) for piece in pieces])].astype(np.uint64)
            return np.concatenate(pieces).tobytes(), offsets.tobytes()

    monkeypatch.setattr(encoder, "fast", Lossy())
    texts = ["first text", "", "second text, the lossy one", "", "last"]  # empty texts: no tokens to sum
    ids, offsets, encoded_by = encoder.encode_batch(texts)
    assert encoded_by.tolist() == [ENCODED, ENCODED, FALLBACK, ENCODED, ENCODED]
    assert [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])] == [reference(encoder, t) for t in texts]


def test_base_vocab_equals_meta_llama3_tokenizer(encoder):
    """Meta's reference implementation of the Llama-3 tokenizer is an independent oracle for the BPE."""
    from llama_models.llama3.tokenizer import Tokenizer

    meta = Tokenizer.get_instance()
    for text in wide_texts():
        if "<|" in text or "<t" in text or "</" in text:
            continue
        assert encoder.encode(text).tolist() == meta.encode(text, bos=False, eos=False)


def test_special_token_strings_become_special_ids(encoder):
    ids = encoder.encode("a<|im_end|>b<think>").tolist()
    assert 128012 in ids and 128002 in ids
    assert encoder.decode(ids) == "a<|im_end|>b<think>"


def test_token_starts_are_the_bytes_each_token_spells(encoder):
    """Loss masks find a token by the byte it starts at: each token must spell exactly the text's
    bytes from there, by Meta's own tokenizer's bytes for the base vocabulary (an independent table)."""
    from llama_models.llama3.tokenizer import Tokenizer

    meta = Tokenizer.get_instance().model
    texts = wide_texts() + ["<|im_start|>user\nhi<|im_end|>\n"]
    ids, offsets, _ = encoder.encode_batch(texts)
    starts = encoder.token_starts(texts, ids, offsets)
    joined = "".join(texts).encode()
    for token_id, start, end in zip(ids.tolist(), starts.tolist(), [*starts[1:].tolist(), len(joined)]):
        spelled = meta.decode_single_token_bytes(token_id) if token_id < 128_000 \
            else encoder.backend.id_to_token(token_id).encode()
        assert joined[start:end] == spelled


def test_local_directory_and_fallback(encoder, tmp_path):
    """--tokenizer DIR loads through the same transformers path; a tokenizer fastokens can't load
    (a Whitespace pre-tokenizer) is encoded by tokenizers."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from prep.tokenizer import load_encoder, load_hf_tokenizer

    load_hf_tokenizer().save_pretrained(tmp_path / "smol")
    local = load_encoder(str(tmp_path / "smol"))
    assert local.kind == "fastokens" and local.fingerprint == encoder.fingerprint

    vocab = {"[UNK]": 0, "a": 1, "b": 2, "ab": 3, "c": 4}
    other = Tokenizer(models.BPE(vocab, [("a", "b")], unk_token="[UNK]"))
    other.normalizer = normalizers.Lowercase()
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=other, pad_token="c").save_pretrained(tmp_path / "toy")
    fallback = Encoder(tmp_path / "toy" / "tokenizer.json", "toy")
    assert fallback.kind == "tokenizers" and "can't load" in fallback.fallback_reason
    assert fallback.encode("AB c").tolist() == [3, 4] and not fallback.byte_level
    ids, offsets, encoded_by = fallback.encode_batch(["AB c", "c ab"])
    assert ids.tolist() == [3, 4, 4, 3] and (encoded_by == ENCODED).all()  # tokenizers by design, not a failure
    assert fallback.token_starts(["AB c", "c ab"], ids, offsets).tolist() == [0, 3, 4, 6]
    assert fallback.fingerprint != encoder.fingerprint and fallback.pad_id == 4


def test_offline_build_is_cached_and_announced(tmp_path, monkeypatch, capsys):
    import prep.tokenizer as tok

    monkeypatch.setenv("PREP_CACHE", str(tmp_path))
    monkeypatch.setattr(tok, "hub_reachable", lambda: False)
    first = tok.load_hf_tokenizer("HuggingFaceTB/SmolLM3-3B")
    assert (tmp_path / "tokenizers" / "SmolLM3-3B" / "tokenizer.json").exists()
    assert "hub unreachable" in capsys.readouterr().err
    assert first.chat_template == CHATML_TEMPLATE
    with pytest.raises(ValueError, match="--tokenizer"):
        tok.load_hf_tokenizer("someone/other-model")


def test_cached_encoder_equals_fresh(encoder, tmp_path, monkeypatch):
    """What is cached per tokenizer.json (the fastokens verdict, vocabulary facts, token lengths)
    gives the same encoder as a fresh inspection."""
    monkeypatch.setenv("PREP_CACHE", str(tmp_path))
    fresh = Encoder(encoder.tokenizer_json, "smol")
    cached = Encoder(encoder.tokenizer_json, "smol")
    assert len(list((tmp_path / "encoders").glob("*.token-bytes.npy"))) == 1
    assert np.array_equal(cached.token_bytes, fresh.token_bytes) and cached.token_bytes.sum() > 128_000
    assert (cached.kind, cached.fingerprint, cached.pad_id) == (fresh.kind, fresh.fingerprint, fresh.pad_id)
    texts = wide_texts()
    assert cached.encode_batch(texts)[0].tolist() == fresh.encode_batch(texts)[0].tolist()


def test_encode_returns_uint32(encoder):
    assert encoder.encode("hello").dtype == np.uint32


def test_fastokens_loads_on_a_thread_and_a_failed_load_raises_at_the_first_encode(encoder, tmp_path, monkeypatch):
    """With its verdict cached, fastokens (1-2 s to load) loads on a thread of its own while the
    build gets going: the encoder is there at once, the first encode waits for the load, and a load
    that fails raises there rather than falling back without a word."""
    monkeypatch.setenv("PREP_CACHE", str(tmp_path))
    Encoder(encoder.tokenizer_json, "smol")  # inspects the tokenizer.json and caches the verdict
    cached = Encoder(encoder.tokenizer_json, "smol")
    assert cached.kind == "fastokens" and cached.loading()
    texts = wide_texts()
    assert cached.encode_batch(texts)[0].tolist() == encoder.encode_batch(texts)[0].tolist()
    assert not cached.loading()

    def broken_load(path):
        raise OSError(f"can't read {path}")

    monkeypatch.setattr(prep.tokenizer, "_load_fastokens", broken_load)
    broken = Encoder(encoder.tokenizer_json, "smol")
    with pytest.raises(OSError, match="can't read"):
        broken.encode("hello")
