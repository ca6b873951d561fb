"""The model: SmolLM3 from the hub, a directory or a config; document-isolated attention; a loss head
that never materialises [tokens, 128256] logits; FLOPs for MFU.

Document isolation. With `attention_mask=None`, no KV cache and `position_ids` restarting at every
document, transformers' masking utilities detect the packed format and AND a same-document mask
into the causal mask (sdpa: a 4D boolean mask; flex_attention: a BlockMask). With a cache (the
config's default `use_cache=True`) the detection switches off and documents attend to each other,
so the model is always called with use_cache=False. tests/test_train_model.py proves isolation.

Loss. At T=32768 and V=128256 the logits alone are 16.8 GB in fp32. On CUDA, Liger's fused linear
cross-entropy computes them a chunk at a time; elsewhere `ChunkedLinearCrossEntropy` does the same
in plain torch: per chunk of 1024 tokens (0.5 GB of fp32 logits) it computes the loss and, already
in forward, the gradients of the hidden states and of the weight, so backward is a multiply.
"""

import sys
from pathlib import Path

import torch
from torch import nn

# A SmolLM3 in miniature: same vocabulary (the shards' ids must fit), GQA 4:2, a NoPE layer every 4th
# as in SmolLM3, tied embeddings. 8.5M parameters, 8.2M of them the embedding.
TINY = dict(vocab_size=128256, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=65536, tie_word_embeddings=True, use_cache=False)
# --model-config NAME. transformers' SmolLM3Config() defaults are SmolLM3-3B: hidden 2048, 36 layers, 16 heads,
# 4 KV heads, intermediate 11008, vocab 128256, NoPE every 4th layer, tied embeddings (3.08B parameters).
NAMED_CONFIGS = {"tiny": TINY, "smollm3-3b": dict(use_cache=False)}
CHUNK_TOKENS = 1024
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                    "B200": 2250.0, "GH200": 989.0}  # dense, per GPU


def attention_kind(requested: str, device: torch.device) -> str:
    """flex_attention document masks on CUDA; on CPU flex_attention has no backward, so sdpa."""
    if requested != "auto":
        return requested
    return "flex_attention" if device.type == "cuda" else "sdpa"


def model_config(cfg):
    """The transformers config of the model to train: --model-config (a name of NAMED_CONFIGS or a config.json),
    else --model's own config.json (a few kB, read by every rank)."""
    from transformers import AutoConfig, SmolLM3Config

    if cfg.model_config in NAMED_CONFIGS:
        config = SmolLM3Config(**NAMED_CONFIGS[cfg.model_config])
    elif cfg.model_config:
        if not Path(cfg.model_config).is_file():
            raise ValueError(f"--model-config {cfg.model_config!r}: give {' or '.join(NAMED_CONFIGS)} or the path of a config.json")
        config = AutoConfig.from_pretrained(cfg.model_config, trust_remote_code=cfg.trust_remote_code)
    else:
        try:
            config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        except OSError as e:
            raise ValueError(f"can't load --model {cfg.model}: {str(e).splitlines()[0]} "
                             "(pass a local model directory, or --model-config tiny for a random model)") from None
    config.use_cache = False  # see the module docstring: a cache switches document isolation off
    return config


def build_meta_model(config, attn: str, trust_remote_code: bool = False):
    """The causal LM with its parameters on the meta device (nothing allocated) and its buffers real: the
    rotary frequencies are computed at construction and are in no checkpoint, so they can't come later."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32,
                                                 trust_remote_code=trust_remote_code)
    model.tie_weights()  # init_empty_weights registers a new meta tensor for each name, which unties lm_head
    model.config.use_cache = False
    return model


def full_weights(cfg, config, attn: str) -> dict:
    """The full state dict that rank 0 loads and every rank receives its shard of: --model's weights as
    `from_pretrained` reads them, kept in the checkpoint's dtype (bf16 for SmolLM3: 6 GB, not 12), or
    the seeded random init of --model-config, drawn from a forked RNG so that the ranks' RNGs stay equal."""
    from transformers import AutoModelForCausalLM

    if cfg.model_config:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32,
                                                     trust_remote_code=cfg.trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, attn_implementation=attn, dtype="auto",
                                                     trust_remote_code=cfg.trust_remote_code)
    return model.state_dict()


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in backward. Non-reentrant: composes with FSDP2, DDP and compile;
    transformers checkpoints the layer's forward, so FSDP2's hooks stay outside the recomputation."""
    model.activation_checkpointing_enable({"use_reentrant": False})


def compile_layers(model) -> None:
    """torch.compile each decoder layer in place: the layers share one compiled graph, and the state-dict
    keys don't change (no `_orig_mod.`), so checkpoints and exports are the same with and without."""
    for layer in model.model.layers:
        layer.compile()


def model_tokenizer(cfg, manifest: dict):
    """The tokenizer that goes with the model: --tokenizer, the model's own, or for a config the shards'."""
    from prep.tokenizer import load_hf_tokenizer

    name = cfg.tokenizer or (manifest["tokenizer"]["name"] if cfg.model_config else cfg.model)
    try:
        return name, load_hf_tokenizer(name)
    except (OSError, ValueError) as e:
        raise ValueError(f"can't load the tokenizer {name!r}: {str(e).splitlines()[0]}; pass --tokenizer DIR") from None


def check_tokenizer(manifest: dict, shard_dir: str, name: str, tokenizer) -> None:
    """Refuse shards tokenized with another vocabulary than the model's: training would be silent garbage."""
    from prep.shards import fingerprint

    theirs = manifest["tokenizer"]
    ours = fingerprint(tokenizer.backend_tokenizer)
    if ours != theirs["fingerprint"]:
        raise ValueError(
            f"{shard_dir} was tokenized with {theirs['name']} ({theirs['fingerprint'][:19]}...), but the model's "
            f"tokenizer {name} is {ours[:19]}...: rebuild the shards with `prep build --tokenizer {name}` "
            "or pass the matching --tokenizer")


def check_vocab(manifest: dict, shard_dir: str, vocab_size: int) -> None:
    if manifest["tokenizer"]["vocab_size"] > vocab_size:
        raise ValueError(f"{shard_dir} uses {manifest['tokenizer']['vocab_size']} token ids but the model's embedding "
                         f"has {vocab_size} rows; use a model with the shards' vocabulary")


def apply_liger(model) -> bool:
    """Liger's RoPE, RMSNorm and SwiGLU kernels in place; False when liger-kernel isn't installed."""
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_smollm3
    except ImportError:
        print("liger-kernel is not installed (pip install -e '.[gpu]'): using plain torch kernels", file=sys.stderr)
        return False
    # The loss head is ours (TrainModule), so Liger's model-forward patch for the loss is not wanted.
    apply_liger_kernel_to_smollm3(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=False,
                                  cross_entropy=False, model=model)
    return True


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), its gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        w = weight.to(hidden.dtype)
        N, V = hidden.shape[0], w.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # softmax and sums: fp32 at least
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(w, dtype=acc) if weight.requires_grad else None
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        # One [chunk, V] buffer, reused and updated in place: on 2 CPU cores, allocating a fresh 0.5 GB
        # temporary per op (logsumexp, softmax, ...) cost more in page faults than the arithmetic.
        buffer = torch.empty(min(N, CHUNK_TOKENS), V, dtype=acc, device=hidden.device)
        for lo in range(0, N, CHUNK_TOKENS):
            h, y = hidden[lo:lo + CHUNK_TOKENS], targets[lo:lo + CHUNK_TOKENS]
            rows = torch.arange(len(y), device=y.device)
            logits = buffer[: len(y)]
            if h.dtype == acc:
                torch.mm(h, w.T, out=logits)
            else:
                logits.copy_(h @ w.T)
            target_logit = logits[rows, y]
            peak = logits.max(dim=-1).values
            probs = logits.sub_(peak[:, None]).exp_()
            total = probs.sum(dim=-1)
            loss += (peak + total.log() - target_logit).sum()
            # d loss / d logits = softmax - onehot, written over the logits
            grad = probs.div_(total[:, None])
            grad[rows, y] -= 1
            grad = grad.to(w.dtype)
            grad_hidden[lo:lo + CHUNK_TOKENS] = grad @ w
            if grad_weight is not None and h.dtype == acc:
                grad_weight.addmm_(grad.T, h)  # accumulate in place: no [V, H] temporary per chunk
            elif grad_weight is not None:
                grad_weight += grad.T @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_weight = None if grad_weight is None else grad_weight * grad_loss
        return grad_hidden * grad_loss, grad_weight, None


def chunked_linear_cross_entropy(hidden, weight, targets):
    return ChunkedLinearCrossEntropy.apply(hidden, weight, targets)


def liger_linear_cross_entropy():
    """Liger's fused linear cross-entropy (Triton, CUDA only) with the same signature as ours."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return lambda hidden, weight, targets: loss(weight, hidden, targets)


class TrainModule(nn.Module):
    """The causal LM plus its loss head: forward returns the summed loss of each source's targets.

    One module, so that FSDP2's root and DDP see the loss head's use of lm_head.weight inside forward.
    Per source, the targets are gathered and passed to the fused loss separately: the same FLOPs as one
    call, and the loss per source comes out exact and for free.
    """

    def __init__(self, model, num_sources: int, linear_cross_entropy=chunked_linear_cross_entropy):
        super().__init__()
        self.model, self.num_sources, self.linear_cross_entropy = model, num_sources, linear_cross_entropy

    def forward(self, input_ids, position_ids, labels, label_sources):
        # attention_mask=None and use_cache=False: the packed-sequence (document) mask comes from position_ids.
        out = self.model.model(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False)
        hidden = out.last_hidden_state.flatten(0, 1)
        labels, weight = labels.flatten(), self.model.lm_head.weight
        if label_sources is None:  # every label is a target of source 0: no data-dependent shapes (train.memory)
            per_source = self.linear_cross_entropy(hidden, weight, labels)[None]
        else:
            per_source = torch.stack([self.source_loss(hidden, weight, labels, label_sources.flatten() == s)
                                      for s in range(self.num_sources)])
        # A micro-batch without targets (an epoch's empty tail rows) still gives every parameter a
        # (zero) gradient, so DDP's and FSDP's gradient reductions line up across ranks.
        total = per_source.sum() + 0.0 * (hidden.sum() + weight.sum())
        return total, per_source.detach()

    def source_loss(self, hidden, weight, labels, of_source):
        idx = of_source.nonzero().squeeze(1)
        if not idx.numel():
            return hidden.new_zeros((), dtype=torch.float32)
        return self.linear_cross_entropy(hidden.index_select(0, idx), weight, labels.index_select(0, idx))


def num_params(model) -> int:
    """Parameters that do a matmul per token: all, less an untied input embedding (a lookup)."""
    total = sum(p.numel() for p in model.parameters())
    if not model.config.tie_word_embeddings:
        total -= model.get_input_embeddings().weight.numel()
    return total


def step_flops(config, params: int, num_tokens: int, doc_len_sq: int) -> float:
    """Training FLOPs (forward + backward) of a batch: 6 x params per token, plus causal attention of each
    document: QK^T and AV are 2 x 2 x L^2 x d, halved by causality, times 3 for backward (PaLM, App. B)."""
    d = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    return 6.0 * params * num_tokens + 6.0 * config.num_hidden_layers * d * doc_len_sq


def peak_flops(device: torch.device, override_tflops: float) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None when unknown (CPU without --peak-tflops)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None
