"""train/model.py and the schedule: documents never attend to each other, the chunked loss head equals
the plain one (loss and gradients), the loss per source is exact, the LR schedule is transformers'."""

import math
import os
import subprocess
import sys

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


@pytest.mark.parametrize("attn", ["sdpa", pytest.param("flex_attention", marks=pytest.mark.slow)])
def test_documents_are_isolated_in_attention(attn):
    # flex_attention is the CUDA path: transformers' BlockMask from position_ids. Forward only (CPU flex
    # has no backward); ~20 s of torch.compile on 2 cores.
    model = tiny_model(attn)
    packed = doc2_logits(model, DOC1, DOC2)
    torch.testing.assert_close(doc2_logits(model, DOC1_CHANGED, DOC2), packed, rtol=0, atol=1e-5)
    torch.testing.assert_close(standalone_logits(model, DOC2), packed, rtol=0, atol=1e-5)


def test_the_pitfall_is_real_with_the_configs_default_cache():
    # Why the trainer passes use_cache=False: with the default cache, doc 2 sees doc 1.
    model = tiny_model("sdpa")
    model.config.use_cache = True
    leaked = doc2_logits(model, DOC1, DOC2, as_trainer=False)
    assert (leaked - standalone_logits(model, DOC2)).abs().max() > 1e-2


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


def test_step_flops_equal_torchs_flop_counter_on_the_tiny_model():
    """Forward + backward FLOPs of the tiny model on two packed documents, counted by torch's
    FlopCounterMode, against step_flops. Eager attention, so that the counter sees its matmuls: it
    computes the whole T x T square and masks it, where step_flops counts each document's causal
    half-square, so the attention term is checked apart."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_model("eager").train()
    config, lens = model.config, [96, 32]
    T, L, d = sum(lens), config.num_hidden_layers, config.hidden_size  # d: heads x head_dim
    ids = torch.randint(0, config.vocab_size, (1, T))
    positions = torch.cat([torch.arange(n) for n in lens])[None]
    # the plain loss head: the counter skips the chunked head's in-place addmm_ (torch registers no count for it)
    plain_head = lambda hidden, weight, targets: F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    with FlopCounterMode(display=False) as counter:
        loss = TrainModule(model, 1, plain_head)(ids, positions, ids.roll(-1, 1), torch.zeros_like(ids))[0]
        loss.backward()
    counted = counter.get_total_flops()
    params = model_lib.num_params(model)
    matmuls = 6 * params * T  # 2 forward + 4 backward per parameter and token; the tied embedding counts once
    square = 3 * 2 * 2 * T * T * d * L  # QK^T and AV over the whole square, forward + backward
    assert counted == pytest.approx(matmuls + square, rel=1e-4)
    doc_len_sq = sum(n * n for n in lens)
    ours = step_flops(config, params, T, doc_len_sq)
    assert ours - matmuls == square * doc_len_sq / (2 * T * T)  # per document, the causal half


def test_shards_of_another_tokenizer_are_refused():
    from prep.tokenizer import load_hf_tokenizer

    manifest = {"tokenizer": {"name": "other/tokenizer", "vocab_size": 128256, "fingerprint": "sha256:" + "0" * 64}}
    with pytest.raises(ValueError, match="rebuild the shards"):
        model_lib.check_tokenizer(manifest, "shards/", "HuggingFaceTB/SmolLM3-3B", load_hf_tokenizer("HuggingFaceTB/SmolLM3-3B"))
    with pytest.raises(ValueError, match="embedding has 1000 rows"):
        model_lib.check_vocab(manifest, "shards/", 1000)


def test_liger_head_gives_the_chunked_heads_losses_and_gradients():
    """The CUDA loss head (Liger's fused linear cross-entropy, a Triton kernel) run by Triton's interpreter
    on CPU, inside TrainModule: per-source losses and every gradient equal the chunked head's, with
    ignored labels and a non-unit loss scale (train_step's world_size / global targets)."""
    script = """
import torch
from transformers import AutoModelForCausalLM, SmolLM3Config
from train.model import TINY, TrainModule, chunked_linear_cross_entropy, liger_linear_cross_entropy
torch.manual_seed(0)
small = {**TINY, "vocab_size": 512, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # the interpreter is slow
model = AutoModelForCausalLM.from_config(SmolLM3Config(**small), attn_implementation="sdpa").train()
ids = torch.randint(0, 512, (1, 12))
positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0]])
labels = torch.tensor([[7, 8, 9, 10, -100, 11, 12, -100, 13, 14, -100, -100]])
sources = torch.where(labels >= 0, torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]]), -1)
results = []
for head in (chunked_linear_cross_entropy, liger_linear_cross_entropy()):
    model.zero_grad()
    total, per_source = TrainModule(model, 3, head)(ids, positions, labels, sources)
    (total * 2 / 7).backward()
    results.append((per_source, [p.grad.clone() for p in model.parameters()]))
(ours, ours_grads), (liger, liger_grads) = results
torch.testing.assert_close(liger, ours, rtol=1e-5, atol=1e-5)
assert ours[2] == 0 and ours[0] > 0 and ours[1] > 0
for a, b in zip(liger_grads, ours_grads):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
print("equal")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}  # read when Triton is imported
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("equal"), out.stderr[-3000:]


@pytest.mark.slow
def test_compiled_layers_give_eager_losses(tmp_path):
    """--compile: torch.compile per decoder layer (inductor's C++ backend on CPU), three steps of the
    trainer's build and step, the same losses as eager within 1e-4."""
    from train.__main__ import Plan, build_module, train_step
    from train.data import Batch
    from train.model import full_weights, model_config
    from train.parallel import parallelize

    cpu, T = torch.device("cpu"), 64
    ids = torch.randint(0, 128256, (1, T), generator=torch.Generator().manual_seed(0))
    batch = Batch(ids, torch.arange(T)[None], ids.roll(-1, 1), torch.zeros(1, T, dtype=torch.long),
                  torch.tensor([T]).numpy(), T, T * T)
    losses = {}
    for compiled in (False, True):
        cfg = TrainConfig(model_config="tiny", compile=compiled)
        config = model_config(cfg)
        module, _ = build_module(cfg, config, "sdpa", 1, cpu)
        module = parallelize(module, "none", "fp32", cpu, 0, 1, lambda: full_weights(cfg, config, "sdpa"))
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
        plan = Plan(0, 1, cpu, "none", "fp32", False, 0, 3, 0, None, ["a"], None, "")
        losses[compiled] = [train_step(module, optimizer, [batch], plan, 1.0)[0].item() / T for _ in range(3)]
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)
    assert losses[False][-1] < losses[False][0]
