"""Mid-train SmolLM3 on packed shards: `python -m train --shards DIR` or `torchrun --nproc-per-node N -m train ...`.

The story: settings -> processes -> data -> model -> tokenizer check -> kernels -> parallelize ->
optimizer -> resume -> loop -> export. Inside the loop, one step is: the micro-batches of this rank
(built on a thread while the previous step ran), the global count of target tokens, forward and
backward of each micro-batch with the loss divided by that count, clip, AdamW step; then, once in a
while, log and save. `python -m train --help` lists every setting with examples.
"""

import json
import math
import resource
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from train.checkpoint import complete_checkpoints, export, load_latest, save
from train.config import TrainConfig, parse_args
from train.data import Loader, PackedShards
from train.model import (
    TrainModule, apply_liger, build_model, check_tokenizer, check_vocab, chunked_linear_cross_entropy,
    liger_linear_cross_entropy, model_tokenizer, num_params, peak_flops, step_flops,
)
from train.parallel import (
    all_reduce_sum, autocast, barrier, clip_grad_norm, grad_sync, init_distributed, parallelize, resolve_dist,
    resolve_precision,
)


ANOTHER_RANK = "another rank refused the shards (its error is printed above); run `prep verify`"


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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def trim_metrics(path: Path, last_step: int) -> None:
    """After a resume from step k, drop the lines of steps > k that the killed run had logged (and a
    line the kill cut in half)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            pass
    path.write_text("".join(line + "\n" for line in kept))


def train(cfg: TrainConfig, rank: int, world_size: int, device: torch.device) -> None:
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    output = Path(cfg.output)
    metrics_path = output / "metrics.jsonl"
    earlier_run = bool(complete_checkpoints(cfg.output)) or metrics_path.exists()
    if earlier_run and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"{output} holds an earlier run: pass --resume to continue it, --overwrite to start over, "
                         "or choose another --output")
    if cfg.overwrite and rank == 0:
        shutil.rmtree(output / "checkpoints", ignore_errors=True)
        shutil.rmtree(output / "model", ignore_errors=True)
        for name in ("metrics.jsonl", "settings.json"):
            (output / name).unlink(missing_ok=True)
    barrier()

    # Data: memory-mapped rows; nothing is read until a step uses it.
    # Corrupt or foreign shards are refused before the first step, on every rank together.
    try:
        shards, refused = PackedShards(cfg.shards, cfg.verify_hashes, rank, world_size), ""
    except ValueError as e:
        shards, refused = None, str(e)
    if all_reduce_sum(torch.tensor([float(bool(refused))])).item():
        raise ValueError(refused or ANOTHER_RANK)
    if cfg.seq_len and cfg.seq_len != shards.seq_len:
        raise ValueError(f"{cfg.shards} holds {shards.seq_len}-token sequences, but the settings ask for "
                         f"{cfg.seq_len}; rebuild with `prep build --seq-len {cfg.seq_len}` or drop the setting")

    # The proof that the shards speak the model's vocabulary, before a 3B model is loaded; then the model.
    tokenizer_name, tokenizer = model_tokenizer(cfg, shards.manifest)
    check_tokenizer(shards.manifest, cfg.shards, tokenizer_name, tokenizer)
    precision, mode = resolve_precision(cfg.precision, device), resolve_dist(cfg.dist, world_size)
    hf_model = build_model(cfg, device)
    check_vocab(shards.manifest, cfg.shards, hf_model.config.vocab_size)
    liger = cfg.liger and device.type == "cuda" and apply_liger(hf_model)
    params = num_params(hf_model)
    module = TrainModule(hf_model, len(shards.source_names),
                         liger_linear_cross_entropy() if liger else chunked_linear_cross_entropy)
    module = parallelize(module, mode, precision, device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")

    loader = Loader(shards, cfg.batch_size, cfg.grad_accum, rank, world_size, cfg.seed,
                    hf_model.config.vocab_size, pin_memory=device.type == "cuda")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * loader.steps_per_epoch
    save_interval = cfg.save_interval(total_steps)
    settings = asdict(cfg)
    step = load_latest(cfg.output, module, optimizer, loader, rank, world_size, device) if cfg.resume else 0
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        (output / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
        trim_metrics(metrics_path, step)
    peak = peak_flops(device, cfg.peak_tflops)
    log(f"{'resuming at step ' + str(step) if step else 'starting'}: {len(shards)} sequences of {shards.seq_len} "
        f"tokens from {', '.join(shards.source_names)}; {params / 1e6:.1f}M parameters; {world_size} x {device.type} "
        f"({mode}, {precision}, attn {hf_model.config._attn_implementation}, liger {'on' if liger else 'off'}); "
        f"{loader.steps_per_epoch} steps per epoch, {total_steps} steps; {loader.rows_per_step} sequences per step")

    num_sources = len(shards.source_names)
    while step < total_steps:
        # ---- one step ----
        t0 = time.perf_counter()
        lr = lr_at(step, total_steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = loader.next()
        # The loss is a mean over every target token of the step, on all ranks and micro-batches, so
        # each micro-batch's sum is divided by the global count; x world_size undoes the gradient mean.
        num_targets = sum(b.num_targets for b in micro_batches)
        global_targets = all_reduce_sum(torch.tensor([float(num_targets)], device=device)).item()
        scale = world_size / max(global_targets, 1.0)
        loss_sums = torch.zeros(num_sources, dtype=torch.float64, device=device)  # stays on the GPU: no sync
        for i, batch in enumerate(micro_batches):
            b = batch.to(device)
            with grad_sync(module, last_micro_batch=i == len(micro_batches) - 1), autocast(mode, precision, device):
                loss_sum, per_source = module(b.input_ids, b.position_ids, b.labels, b.label_sources)
                (loss_sum * scale).backward()
            loss_sums += per_source.double()
        grad_norm = clip_grad_norm(module.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # ---- once in a while: log, save, stop ----
        if step % cfg.log_every == 0 or step == total_steps:
            counts = sum(b.source_targets for b in micro_batches)
            tokens = sum(b.num_tokens for b in micro_batches)
            doc_len_sq = sum(b.doc_len_sq for b in micro_batches)
            local = torch.tensor([*counts, tokens, doc_len_sq], dtype=torch.float64, device=device)
            stats = all_reduce_sum(torch.cat([loss_sums, local])).cpu()  # one all-reduce for all of it
            seconds = time.perf_counter() - t0
            sums, counts = stats[:num_sources], stats[num_sources:2 * num_sources]
            tokens, doc_len_sq = stats[-2].item(), stats[-1].item()
            flops_per_s = step_flops(hf_model.config, params, tokens, doc_len_sq) / seconds
            record = {
                "step": step, "epoch": (step - 1) // loader.steps_per_epoch,
                "loss": (sums.sum() / counts.sum().clamp(min=1)).item(),
                "loss_per_source": {name: (sums[s] / counts[s]).item() if counts[s] else None
                                    for s, name in enumerate(shards.source_names)},
                "lr": lr, "grad_norm": grad_norm, "tokens": int(tokens), "tokens_per_s": tokens / seconds,
                "mfu": flops_per_s / (peak * world_size) if peak else None,
                "peak_mem_gb": peak_memory_gb(device), "step_s": seconds,
            }
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            per_source = " ".join(f"{k} {v:.4f}" for k, v in record["loss_per_source"].items() if v is not None)
            mfu = f"{100 * record['mfu']:.1f}%" if record["mfu"] is not None else "-"
            log(f"step {step}/{total_steps} | loss {record['loss']:.4f} | {per_source} | lr {lr:.2e} | "
                f"grad norm {grad_norm:.3f} | {record['tokens_per_s']:,.0f} tok/s | mfu {mfu} | "
                f"mem {record['peak_mem_gb']:.2f} GB")
        stopping = step == cfg.stop_after and step < total_steps
        if (save_interval and step % save_interval == 0) or stopping:
            path = save(cfg.output, step, module, optimizer, loader, settings, rank, world_size, device, cfg.keep_last)
            log(f"saved {path}")
        if stopping:
            log(f"stopped after step {step} (--stop-after); continue with --resume")
            return

    path = export(cfg.output, module, hf_model, tokenizer,
                  torch.bfloat16 if cfg.export_dtype == "bf16" else torch.float32, rank)
    log(f"exported {path}: AutoModelForCausalLM.from_pretrained('{path}')")


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rank, world_size, device = init_distributed()
    try:
        train(cfg, rank, world_size, device)
    except ValueError as e:
        if rank == 0 or str(e) != ANOTHER_RANK:  # one line per problem, not one per rank
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
