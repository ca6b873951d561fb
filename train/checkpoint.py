"""Checkpoints (torch.distributed.checkpoint) for exact resume, and the final Hugging Face export.

OUTPUT/checkpoints/step-00000100/
  .metadata, __0_0.distcp, ...  model and AdamW state, each rank writing its own shards (DCP)
  rng-00000.pt, ...             each rank's torch RNG states
  train_state.json              step, data position, world size, and the settings: the flags, the shards'
                                build id and what the flags resolved to (mode, precision, total steps);
                                written last
A checkpoint is written under `step-00000100.tmp/` and renamed when every rank has finished, so a
directory without the suffix is complete; `--resume` takes the newest one and deletes leftovers.
The learning rate is a function of the step (`lr_at`), so the step is the scheduler's whole state.
Nothing is unpickled: DCP reads tensors, and RNG files load with `torch.load(weights_only=True)`.
"""

import copy
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict,
)

from train.parallel import barrier, unwrap

STEP_DIR = re.compile(r"^step-(\d{8})$")
METRICS, SETTINGS = "metrics.jsonl", "settings.json"
# DCP warns on every save and load without a process group; one process is a case we mean, not a mistake.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def prepare_output(cfg, rank: int) -> None:
    """Refuse an --output that holds an earlier run unless --resume or --overwrite; --overwrite
    deletes its checkpoints, metrics and model (rank 0, while the others wait)."""
    output = Path(cfg.output)
    earlier_run = bool(complete_checkpoints(cfg.output)) or (output / METRICS).exists()
    if earlier_run and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"{output} holds an earlier run: pass --resume to continue it, --overwrite to start over, "
                         "or choose another --output")
    if cfg.overwrite and rank == 0:
        shutil.rmtree(output / "checkpoints", ignore_errors=True)
        shutil.rmtree(output / "model", ignore_errors=True)
        for name in (METRICS, SETTINGS):
            (output / name).unlink(missing_ok=True)
    barrier()


def write_settings(output: str, settings: dict, step: int) -> None:
    """settings.json of the run, and metrics.jsonl cut back to `step`: after a resume from step k, the
    lines of steps > k that the killed run had logged (and a line the kill cut in half) are dropped."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
    path = output / METRICS
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except json.JSONDecodeError:
            pass
    path.write_text("".join(line + "\n" for line in kept))


def append_metrics(output: str, record: dict) -> None:
    with open(Path(output) / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def checkpoints_dir(output: str) -> Path:
    return Path(output) / "checkpoints"


def complete_checkpoints(output: str) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "train_state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def rng_state(device: torch.device) -> dict:
    # Only torch's generators: the data order uses its own seeded numpy Generator, stored as the step.
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save(output: str, step: int, module, optimizer, loader, settings: dict, rank: int, world_size: int,
         device: torch.device, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    final = checkpoints_dir(output) / f"step-{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_state, optim_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    torch.save(rng_state(device), tmp / f"rng-{rank:05d}.pt")
    barrier()
    if rank == 0:
        state = {"step": step, "loader": loader.state_dict(), "world_size": world_size, "settings": settings}
        (tmp / "train_state.json").write_text(json.dumps(state, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in complete_checkpoints(output)[:-keep_last] if keep_last else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_latest(output: str, module, optimizer, loader, rank: int, world_size: int, device: torch.device,
                build_id: str) -> int:
    """Restore the newest complete checkpoint into module, optimizer, loader and RNG; returns its step.
    With none yet (a run killed before its first save), 0: the run starts over, as it would fresh,
    so a restart script can always pass --resume. Shards of another build than the checkpoint's
    (`build_id`) are refused: the same row numbers would be other sequences."""
    found = complete_checkpoints(output)
    if rank == 0:  # a killed save leaves a .tmp directory behind
        for leftover in checkpoints_dir(output).glob("step-*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
    if not found:
        barrier()
        return 0
    path = found[-1]
    state = json.loads((path / "train_state.json").read_text())
    saved_build = state["settings"].get("build_id")
    if saved_build != build_id:
        raise ValueError(f"{path} was trained on shards of build {saved_build}, but --shards holds build {build_id}: "
                         "resume with the shards it was trained on, or start a new run in another --output")
    if state["world_size"] != world_size:
        raise ValueError(f"{path} was saved by {state['world_size']} processes, this run has {world_size}: "
                         f"resume with --nproc-per-node {state['world_size']}")
    loader.load_state_dict(state["loader"])
    model_state, optim_state = get_state_dict(module, optimizer)
    tensors = {"model": model_state, "optim": optim_state}
    dcp.load(tensors, checkpoint_id=str(path))
    set_state_dict(module, optimizer, model_state_dict=tensors["model"], optim_state_dict=tensors["optim"])
    rng = torch.load(path / f"rng-{rank:05d}.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    barrier()
    return int(state["step"])


def export(output: str, module, tokenizer, dtype: torch.dtype, rank: int) -> Path:
    """Collective: gather the full weights to rank 0 and write OUTPUT/model/ (safetensors, config,
    tokenizer), which `AutoModelForCausalLM.from_pretrained` loads. Written to model.tmp, then renamed."""
    hf_model = unwrap(module).model
    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final = Path(output) / "model"
    if rank == 0:
        # keys are TrainModule's ("model.lm_head.weight"); the HF model's are one level down
        weights = {k.removeprefix("model."): v.to(dtype) for k, v in full.items()}
        if hf_model.config.tie_word_embeddings:  # the gathered copies no longer share storage: drop the tie's twin
            weights.pop("lm_head.weight", None)
        tmp = final.with_name("model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        hf_model.save_pretrained(tmp, state_dict=weights)
        config = copy.deepcopy(hf_model.config)
        config.use_cache = True  # generation wants the KV cache that training switched off
        config.dtype = dtype
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    barrier()
    return final
