"""train/model.py and the schedule: documents never attend to each other, the chunked loss head equals
the plain one (loss and gradients), the loss per source is exact, the LR schedule is transformers'."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import train.model as model_lib
from train.__main__ import lr_at
from train.config import TrainConfig
from train.model import TINY, TrainModule, chunked_linear_cross_entropy, step_flops


def tiny_model(attn="sdpa"):
    from transformers import AutoModelForCausalLM, SmolLM3Config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(SmolLM3Config(**TINY), attn_implementation=attn).eval()


def doc2_logits(model, doc1, doc2, **kwargs):
    """Logits of doc2's tokens when packed after doc1, called the way the trainer calls the model."""
    ids = torch.tensor([doc1 + doc2])
    positions = torch.tensor([list(range(len(doc1))) + list(range(len(doc2)))])
    with torch.no_grad():
        if kwargs.get("as_trainer", True):
            hidden = model.model(input_ids=ids, position_ids=positions, attention_mask=None, use_cache=False)
            return (hidden.last_hidden_state @ model.lm_head.weight.T)[0, len(doc1):]
        return model(input_ids=ids, position_ids=positions).logits[0, len(doc1):]  # the config's use_cache=True


def standalone_logits(model, doc):
    with torch.no_grad():
        return model(input_ids=torch.tensor([doc]), use_cache=False).logits[0]


DOC1, DOC1_CHANGED, DOC2 = [11, 12, 13, 14, 15, 16, 17], [901, 902, 903, 904, 905, 906, 907], [21, 22, 23, 24, 25, 26]


def test_documents_are_isolated_in_attention_sdpa():
    model = tiny_model("sdpa")
    packed = doc2_logits(model, DOC1, DOC2)
    torch.testing.assert_close(doc2_logits(model, DOC1_CHANGED, DOC2), packed, rtol=0, atol=1e-5)
    torch.testing.assert_close(standalone_logits(model, DOC2), packed, rtol=0, atol=1e-5)


def test_the_pitfall_is_real_with_the_configs_default_cache():
    # Why the trainer passes use_cache=False: with the default cache, doc 2 sees doc 1.
    model = tiny_model("sdpa")
    model.config.use_cache = True
    leaked = doc2_logits(model, DOC1, DOC2, as_trainer=False)
    assert (leaked - standalone_logits(model, DOC2)).abs().max() > 1e-2


@pytest.mark.slow
def test_documents_are_isolated_in_attention_flex():
    # The CUDA path: transformers' BlockMask from position_ids. Forward only (CPU flex has no backward);
    # ~20 s of torch.compile on 2 cores.
    model = tiny_model("flex_attention")
    packed = doc2_logits(model, DOC1, DOC2)
    torch.testing.assert_close(doc2_logits(model, DOC1_CHANGED, DOC2), packed, rtol=0, atol=1e-5)
    torch.testing.assert_close(standalone_logits(model, DOC2), packed, rtol=0, atol=1e-5)


def test_chunked_linear_cross_entropy_equals_plain_loss_and_gradients(monkeypatch):
    monkeypatch.setattr(model_lib, "CHUNK_TOKENS", 7)  # 30 tokens: 5 chunks, the last one short
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (30,))
    ours = chunked_linear_cross_entropy(hidden, weight, targets) * 0.37  # a non-unit upstream gradient
    grads = torch.autograd.grad(ours, (hidden, weight))
    ref = F.cross_entropy(hidden @ weight.T, targets, reduction="sum") * 0.37
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-6, atol=1e-6)


def test_loss_per_source_is_exact_and_gradients_match_the_plain_model():
    model = tiny_model("sdpa").double().train()  # float64: the comparison is about the math, not rounding
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]])
    labels = torch.tensor([[6, 7, -100, 9, 10, 11, -100, -100]])
    sources = torch.tensor([[1, 1, -1, 0, 0, 0, -1, -1]])
    total, per_source = TrainModule(model, num_sources=3)(ids, positions, labels, sources)
    ours = torch.autograd.grad(total, [p for p in model.parameters()])

    hidden = model.model(input_ids=ids, position_ids=positions, attention_mask=None, use_cache=False)
    token_loss = F.cross_entropy((hidden.last_hidden_state @ model.lm_head.weight.T)[0], labels[0],
                                 reduction="none", ignore_index=-100)
    expected = torch.stack([token_loss[sources[0] == s].sum() for s in range(3)])
    torch.testing.assert_close(per_source.double(), expected.detach(), rtol=1e-7, atol=1e-7)
    assert per_source[2] == 0  # a source without targets in this batch
    ref = torch.autograd.grad(token_loss.sum(), [p for p in model.parameters()])
    for g, r in zip(ours, ref):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9)


def test_lr_schedule_is_transformers_cosine_with_min_lr():
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    cfg = TrainConfig(lr=2e-5, warmup_ratio=0.03, min_lr_ratio=0.1)
    total = 200
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, math.ceil(0.03 * total), total, min_lr_rate=0.1)
    for step in range(total):
        assert lr_at(step, total, cfg) == pytest.approx(sched.get_last_lr()[0], rel=1e-9, abs=1e-15)
        opt.step()
        sched.step()
    assert lr_at(total, total, cfg) == pytest.approx(0.1 * cfg.lr)


def test_flops_count_documents_not_padding():
    config = SimpleNamespace(num_attention_heads=4, head_dim=16, hidden_size=64, num_hidden_layers=2)
    # two documents of 100 and 50 tokens: attention grows with 100^2 + 50^2, not with 150^2
    assert step_flops(config, params=1000, num_tokens=150, doc_len_sq=100**2 + 50**2) == \
        6 * 1000 * 150 + 6 * 2 * 64 * (100**2 + 50**2)


def test_shards_of_another_tokenizer_are_refused():
    from prep.tokenizer import load_hf_tokenizer

    manifest = {"tokenizer": {"name": "other/tokenizer", "vocab_size": 128256, "fingerprint": "sha256:" + "0" * 64}}
    with pytest.raises(ValueError, match="rebuild the shards"):
        model_lib.check_tokenizer(manifest, "shards/", "HuggingFaceTB/SmolLM3-3B", load_hf_tokenizer("HuggingFaceTB/SmolLM3-3B"))
    with pytest.raises(ValueError, match="embedding has 1000 rows"):
        model_lib.check_vocab(manifest, "shards/", 1000)
