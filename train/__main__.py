"""Mid-train SmolLM3 on packed shards: `python -m train --shards DIR` or `torchrun --nproc-per-node N -m train ...`.

The story: settings -> processes -> `setup()` (output directory, shards, tokenizer check, model, kernels,
parallelize, optimizer, data, resume) -> the loop -> export. One step (`train_step`): this rank's
micro-batches (built on a thread while the previous step ran), the global count of target tokens,
forward and backward of each micro-batch with the loss divided by that count, clip, AdamW step. Then,
once in a while, `log_step` and a checkpoint. `python -m train --help` lists every setting with examples.
"""

import math
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from train.checkpoint import (
    METRICS, SETTINGS, append_metrics, export, load_latest, prepare_output, save, verify_checkpoints, write_settings,
)
from train.config import TrainConfig, parse_args
from train.data import Loader, PackedShards
from train.faults import (
    EXIT_PREEMPTED, EXIT_WRITE_FAILED, Preemption, WriteError, agree, peer_gone, together, write_error,
)
from train.memory import print_estimate
from train.model import (
    TrainModule, apply_liger, attention_kind, build_meta_model, check_tokenizer, check_vocab,
    chunked_linear_cross_entropy, compile_layers, enable_activation_checkpointing, full_weights,
    liger_linear_cross_entropy, model_config, model_tokenizer, num_params, peak_flops, step_flops,
)
from train.parallel import (
    all_reduce_sum, autocast, clip_grad_norm, grad_sync, init_distributed, parallelize, resolve_dist,
    resolve_precision, unwrap,
)
from train.tracking import Clock, backends, finish_trackers, hms, log_metrics, start_trackers

ANOTHER_RANK = "another rank refused the shards (its error is printed above); run `prep verify`"


@dataclass
class Plan:
    """What setup() resolved from the settings, the shards and the machine: the loop's constants."""

    rank: int
    world_size: int
    device: torch.device
    mode: str  # none, ddp or fsdp
    precision: str  # bf16 or fp32
    liger: bool
    params: int  # parameters that do a matmul per token (for MFU)
    total_steps: int
    save_interval: int  # in steps; 0 = never
    peak_flops: float | None  # of one device; None = unknown (no MFU)
    source_names: list[str]
    tokenizer: object  # the model's transformers tokenizer, exported with the model
    build_id: str  # of the shards (manifest["build_id"]): a resume refuses shards that were rebuilt

    def settings(self, cfg: TrainConfig) -> dict:
        """What settings.json and every checkpoint keep: the flags, plus what they resolved to on this machine."""
        return {**asdict(cfg), "build_id": self.build_id,
                "resolved": {"mode": self.mode, "precision": self.precision, "total_steps": self.total_steps,
                             "world_size": self.world_size, "liger": self.liger}}


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """transformers' cosine_with_min_lr, step counted from 0: linear warmup from 0 over ceil(3%) of the
    steps (or --warmup-steps), then a half cosine from lr down to lr x min_lr_ratio at the last step."""
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    if step < warmup:
        return cfg.lr * step / max(1, warmup)
    progress = (step - warmup) / max(1, total_steps - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cosine * (1.0 - cfg.min_lr_ratio) + cfg.min_lr_ratio)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    # VmHWM, this process's own peak: ru_maxrss carries a parent's (torchrun's, pytest's) over fork and exec
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")) / 1e9
    except OSError:  # no /proc (macOS): ru_maxrss, in bytes there
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e9


def open_shards(cfg: TrainConfig, rank: int, world_size: int) -> PackedShards:
    """The memory-mapped shards; corrupt or foreign ones are refused on every rank together."""
    try:
        shards, refused = PackedShards(cfg.shards, cfg.verify_hashes, rank, world_size), ""
    except ValueError as e:
        shards, refused = None, str(e)
    if all_reduce_sum(torch.tensor([float(bool(refused))])).item():
        raise ValueError(refused or ANOTHER_RANK)
    if cfg.seq_len and cfg.seq_len != shards.seq_len:
        raise ValueError(f"{cfg.shards} holds {shards.seq_len}-token sequences, but the settings ask for "
                         f"{cfg.seq_len}; rebuild with `prep build --seq-len {cfg.seq_len}` or drop the setting")
    return shards


def setup(cfg: TrainConfig, rank: int, world_size: int, device: torch.device):
    """Everything before the first step. Returns (module, optimizer, loader, start_step, plan)."""
    prepare_output(cfg, rank)
    shards = open_shards(cfg, rank, world_size)
    # The proof that the shards speak the model's vocabulary, before a 3B model is loaded; then the model.
    tokenizer_name, tokenizer = model_tokenizer(cfg, shards.manifest)
    check_tokenizer(shards.manifest, cfg.shards, tokenizer_name, tokenizer)
    precision, mode = resolve_precision(cfg.precision, device), resolve_dist(cfg.dist, world_size)
    config = model_config(cfg)
    check_vocab(shards.manifest, cfg.shards, config.vocab_size)
    attn = attention_kind(cfg.attn, device)
    module, liger = build_module(cfg, config, attn, len(shards.source_names), device)
    module = parallelize(module, mode, precision, device, rank, world_size, lambda: full_weights(cfg, config, attn))
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    loader = Loader(shards, cfg.batch_size, cfg.grad_accum, rank, world_size, cfg.seed,
                    pin_memory=device.type == "cuda")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * loader.steps_per_epoch
    params = num_params(unwrap(module).model)
    plan = Plan(rank, world_size, device, mode, precision, liger, params, total_steps,
                cfg.save_interval(total_steps), peak_flops(device, cfg.peak_tflops), shards.source_names, tokenizer,
                shards.manifest.get("build_id", ""))
    step = load_latest(cfg.output, module, optimizer, loader, rank, world_size, device,
                       plan.build_id) if cfg.resume else 0
    together(lambda: write_settings(cfg.output, plan.settings(cfg), step) if rank == 0 else None,
             SETTINGS, Path(cfg.output) / SETTINGS, rank, device)
    print0(rank, f"{'resuming at step ' + str(step) if step else 'starting'}: {len(shards)} sequences of "
           f"{shards.seq_len} tokens from {', '.join(shards.source_names)}; {params / 1e6:.1f}M parameters; "
           f"{world_size} x {device.type} ({mode}, {precision}, attn {attn}, liger {'on' if liger else 'off'}, "
           f"compile {'on' if cfg.compile else 'off'}); {loader.steps_per_epoch} steps per epoch, {total_steps} steps; "
           f"{loader.rows_per_step} sequences per step")
    return module, optimizer, loader, step, plan


def build_module(cfg: TrainConfig, config, attn: str, num_sources: int, device: torch.device):
    """The model on the meta device, then Liger's kernels (CUDA), activation checkpointing and compile,
    inside its loss head: torchtitan's order up to parallelize(). Returns (module, liger applied)."""
    hf_model = build_meta_model(config, attn, cfg.trust_remote_code)
    liger = cfg.liger and device.type == "cuda" and apply_liger(hf_model)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(hf_model)
    if cfg.compile:
        compile_layers(hf_model)
    head = liger_linear_cross_entropy() if liger else chunked_linear_cross_entropy
    return TrainModule(hf_model, num_sources, head), liger


def train_step(module, optimizer, micro_batches, plan: Plan, grad_clip: float) -> tuple[torch.Tensor, float]:
    """Forward, backward and AdamW over one step's micro-batches; returns (loss sum per source, grad norm).
    The loss is a mean over every target token of the step, on all ranks and micro-batches, so each
    micro-batch's sum is divided by the global count; x world_size undoes the gradient mean."""
    num_targets = sum(b.num_targets for b in micro_batches)
    global_targets = all_reduce_sum(torch.tensor([float(num_targets)], device=plan.device)).item()
    scale = plan.world_size / max(global_targets, 1.0)
    loss_sums = torch.zeros(len(plan.source_names), dtype=torch.float64, device=plan.device)  # no sync
    for i, batch in enumerate(micro_batches):
        b = batch.to(plan.device)
        with grad_sync(module, last_micro_batch=i == len(micro_batches) - 1), \
                autocast(plan.mode, plan.precision, plan.device):
            loss_sum, per_source = module(b.input_ids, b.position_ids, b.labels, b.label_sources)
            (loss_sum * scale).backward()
        loss_sums += per_source.double()
    grad_norm = clip_grad_norm(module.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sums, grad_norm


def log_step(step: int, loader: Loader, micro_batches, loss_sums: torch.Tensor, grad_norm: float, lr: float,
             seconds: float, module, plan: Plan, output: str, trackers: list, clock: Clock) -> dict:
    """Reduce this step's numbers over the ranks (one all-reduce); on rank 0, append them to metrics.jsonl,
    log them to the trackers and print one line with the elapsed time and the ETA; returns the record."""
    counts = sum(b.source_targets for b in micro_batches)
    tokens = sum(b.num_tokens for b in micro_batches)
    doc_len_sq = sum(b.doc_len_sq for b in micro_batches)
    local = torch.tensor([*counts, tokens, doc_len_sq], dtype=torch.float64, device=plan.device)
    stats = all_reduce_sum(torch.cat([loss_sums, local])).cpu()
    num_sources = len(plan.source_names)
    sums, counts = stats[:num_sources], stats[num_sources:2 * num_sources]
    tokens, doc_len_sq = stats[-2].item(), stats[-1].item()
    flops_per_s = step_flops(unwrap(module).model.config, plan.params, tokens, doc_len_sq) / seconds
    record = {
        "step": step, "epoch": (step - 1) // loader.steps_per_epoch,
        "loss": (sums.sum() / counts.sum().clamp(min=1)).item(),
        "loss_per_source": {name: (sums[s] / counts[s]).item() if counts[s] else None
                            for s, name in enumerate(plan.source_names)},
        "lr": lr, "grad_norm": grad_norm, "tokens": int(tokens), "tokens_per_s": tokens / seconds,
        "mfu": flops_per_s / (plan.peak_flops * plan.world_size) if plan.peak_flops else None,
        "peak_mem_gb": peak_memory_gb(plan.device), "step_s": seconds, "elapsed_s": clock.elapsed(),
    }
    if plan.rank == 0:
        append_metrics(output, record)
        log_metrics(trackers, record)
    per_source = " ".join(f"{k} {v:.4f}" for k, v in record["loss_per_source"].items() if v is not None)
    mfu = f"{100 * record['mfu']:.1f}%" if record["mfu"] is not None else "-"
    print0(plan.rank, f"step {step}/{plan.total_steps} | loss {record['loss']:.4f} | {per_source} | lr {lr:.2e} | "
                      f"grad norm {grad_norm:.3f} | {record['tokens_per_s']:,.0f} tok/s | mfu {mfu} | "
                      f"mem {record['peak_mem_gb']:.2f} GB | {hms(record['elapsed_s'])} elapsed, "
                      f"eta {hms(clock.eta(step, plan.total_steps))}")
    return record


def print0(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)


def train(cfg: TrainConfig, rank: int, world_size: int, device: torch.device, preemption: Preemption) -> int:
    """Setup, the loop, the export; returns the exit code (0, or EXIT_PREEMPTED after a signal)."""
    report_to = backends(cfg.report_to)  # a tracker that isn't installed is refused before any work
    module, optimizer, loader, step, plan = setup(cfg, rank, world_size, device)
    resolved = {**asdict(cfg), "world_size": world_size, "dist": plan.mode, "precision": plan.precision,
                "liger": plan.liger, "params": plan.params, "total_steps": plan.total_steps}
    trackers = start_trackers(report_to, cfg.output, step, resolved) if rank == 0 else []
    clock = Clock.resumed(cfg.output, step) if rank == 0 else Clock(step)
    while step < plan.total_steps:
        started = time.perf_counter()
        lr = lr_at(step, plan.total_steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = loader.next()
        loss_sums, grad_norm = train_step(module, optimizer, micro_batches, plan, cfg.grad_clip)
        step += 1

        logging_failed = None
        if step % cfg.log_every == 0 or step == plan.total_steps:
            try:  # only rank 0 writes metrics.jsonl
                log_step(step, loader, micro_batches, loss_sums, grad_norm, lr, time.perf_counter() - started,
                         module, plan, cfg.output, trackers, clock)
            except OSError as e:
                logging_failed = e
        # one all-reduce a step: did a signal reach any rank, did rank 0 fail to write its line
        signalled, failed = agree(float(preemption.signal is not None), float(logging_failed is not None),
                                  device=device)
        if failed:
            raise write_error(METRICS, Path(cfg.output) / METRICS, logging_failed) if logging_failed else \
                WriteError(f"rank 0 could not write {METRICS}", elsewhere=True)
        preempted = signalled > 0 and step < plan.total_steps
        stopping = (step == cfg.stop_after and step < plan.total_steps) or preempted
        if (plan.save_interval and step % plan.save_interval == 0) or stopping:
            path = save(cfg.output, step, module, optimizer, loader, plan.settings(cfg), rank, world_size, device,
                        cfg.keep_last)
            print0(rank, f"saved {path}")
        if stopping:
            why = f"{preemption.signal or 'a signal to another rank'}" if preempted else "--stop-after"
            print0(rank, f"stopped after step {step} ({why}); continue with --resume")
            finish_trackers(trackers)
            return EXIT_PREEMPTED if preempted else 0
    path = export(cfg.output, module, plan.tokenizer,
                  torch.bfloat16 if cfg.export_dtype == "bf16" else torch.float32, rank, device)
    print0(rank, f"exported {path}: AutoModelForCausalLM.from_pretrained('{path}')")
    finish_trackers(trackers)
    return 0


def main(argv=None) -> int:
    """Exit codes: train.faults' docstring (0 done, 75 preempted, 74 a write failed, 2 a user error, 1 other)."""
    try:
        cfg = parse_args(argv)
        if cfg.estimate_memory:
            return print_estimate(cfg)
        if cfg.verify_checkpoints:
            return verify_checkpoints(cfg.verify_checkpoints)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rank, world_size, device = init_distributed(cfg.dist_timeout)
    try:
        with Preemption() as preemption:  # from here on, SIGTERM or SIGUSR1: finish the step, save, exit 75
            return train(cfg, rank, world_size, device, preemption)
    except ValueError as e:
        if rank == 0 or str(e) != ANOTHER_RANK:  # one line per problem, not one per rank
            print(f"error: {e}", file=sys.stderr)
        return 2
    except WriteError as e:
        if not e.elsewhere:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    except (dist.DistError, RuntimeError) as e:
        if world_size == 1 or not peer_gone(e):
            raise
        # a peer is gone: its own exit says why; this rank's traceback would only bury it
        print(f"error: rank {rank}: a collective failed, another rank stopped (look for its error above): "
              f"{str(e).strip().splitlines()[0][:300]}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
