"""Tokenizer exactness: the tiktoken fast path equals `tokenizers` and Meta's own Llama-3 tokenizer."""

import random

import numpy as np
import pytest

from prep.tokenizer import CHATML_TEMPLATE, Encoder, _load_ranks, smollm3_special_tokens


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


def test_smollm3_vocab_and_names(encoder):
    assert encoder.kind == "tiktoken", encoder.fallback_reason
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
def test_tiktoken_equals_tokenizers(encoder, index):
    text = wide_texts()[index]
    reference = encoder.backend.encode(text, add_special_tokens=False).ids
    assert encoder.encode(text).tolist() == reference
    ids, starts = encoder.encode_with_starts(text)
    assert ids.tolist() == reference and len(starts) == len(ids)


def test_encode_batch_equals_encoding_each_text(encoder):
    """The build tokenizes batches in one call over texts joined by a separator special token; each
    text must still get exactly its own ids, whatever sits at the seams."""
    seams = ["", "", "<|im_", "end|>", "<|reserved_special_token_2", "47|>", " " * 7, "\r", "\n\n", "<think>", "'"]
    texts = wide_texts() + seams
    rng = random.Random(1)
    rng.shuffle(texts)
    expected = [encoder.backend.encode(text, add_special_tokens=False).ids for text in texts]
    assert [ids.tolist() for ids in encoder.encode_batch([[text] for text in texts])] == expected
    # a document comes as the parts it concatenates; where they are cut doesn't matter
    cuts = [sorted(rng.sample(range(len(text) + 1), min(3, len(text) + 1))) for text in texts]
    parts = [[text[a:b] for a, b in zip([0, *cut], [*cut, len(text)])] for text, cut in zip(texts, cuts)]
    assert ["".join(p) for p in parts] == texts and any(len(p) > 2 for p in parts)
    assert [ids.tolist() for ids in encoder.encode_batch(parts)] == expected


def test_encode_batch_is_one_call_unless_a_text_holds_the_separator(encoder, monkeypatch):
    calls, real = [], encoder.fast.encode_to_numpy
    monkeypatch.setattr(encoder.fast, "encode_to_numpy", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    texts = ["a b", "c\n", " d", "<|im_start|>user\nhi<|im_end|>\n"]
    batch = encoder.encode_batch([[text] for text in texts])
    assert [ids.tolist() for ids in batch] == [encoder.encode(t).tolist() for t in texts]
    assert len(calls) == 1 + len(texts)  # the batch, then the reference calls
    calls.clear()
    docs = [["x", encoder.separator[:5], encoder.separator[5:] + "y"], ["z"]]  # the separator across two parts
    expected = [encoder.backend.encode("".join(doc), add_special_tokens=False).ids for doc in docs]
    assert [ids.tolist() for ids in encoder.encode_batch(docs)] == expected
    assert len(calls) == 2  # document by document


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


def test_local_directory_and_fallback(encoder, tmp_path):
    """--tokenizer DIR loads through the same transformers path; a non-Llama BPE falls back to tokenizers."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from prep.tokenizer import load_encoder, load_hf_tokenizer

    load_hf_tokenizer().save_pretrained(tmp_path / "smol")
    local = load_encoder(str(tmp_path / "smol"))
    assert local.kind == "tiktoken" and local.fingerprint == encoder.fingerprint

    vocab = {"[UNK]": 0, "a": 1, "b": 2, "ab": 3, "c": 4}
    other = Tokenizer(models.BPE(vocab, [("a", "b")], unk_token="[UNK]"))
    other.normalizer = normalizers.Lowercase()
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=other, pad_token="c").save_pretrained(tmp_path / "toy")
    fallback = Encoder(tmp_path / "toy" / "tokenizer.json", "toy")
    assert fallback.kind == "tokenizers" and "normalizer" in fallback.fallback_reason
    assert fallback.encode("AB c").tolist() == [3, 4]
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
    """The tiktoken ranks cached per tokenizer.json give the same ids as the freshly checked twin."""
    monkeypatch.setenv("PREP_CACHE", str(tmp_path))
    fresh = Encoder(encoder.tokenizer_json, "smol")
    cached = Encoder(encoder.tokenizer_json, "smol")
    assert len(list((tmp_path / "encoders").glob("*.ranks.npz"))) == 1
    assert _load_ranks(next((tmp_path / "encoders").glob("*.ranks.npz"))) == fresh._ranks
    assert cached.kind == fresh.kind == "tiktoken" and cached.fingerprint == fresh.fingerprint
    for text in wide_texts():
        assert cached.encode(text).tolist() == fresh.encode(text).tolist() == encoder.backend.encode(
            text, add_special_tokens=False).ids


def test_encode_returns_uint32(encoder):
    assert encoder.encode("hello").dtype == np.uint32
