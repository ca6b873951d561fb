"""Checkpoints (torch.distributed.checkpoint) for exact resume, and the final Hugging Face export.

OUTPUT/checkpoints/step-00000100/
  .metadata, __0_0.distcp, ...  model and AdamW state, each rank writing its own shards (DCP)
  rng-00000.pt, ...             each rank's torch RNG states
  train_state.json              step, data position, world size, the settings (the flags, the shards'
                                build id, what the flags resolved to), and the size and sha256 of
                                every other file; written last
A checkpoint is written under `step-00000100.tmp/` and renamed when every rank has finished, so a
directory without the suffix is complete. `--resume` checks the newest one against its record
(each rank hashes 1/N of the files), falls back to the one before when it is damaged (moving it
aside to `step-N.damaged`), and deletes leftovers; `python -m train --verify-checkpoints OUTPUT`
runs the same check. A write that fails on any rank (a full disk) fails the save on every rank,
removes the `.tmp`, and leaves the earlier checkpoints as they were.
The learning rate is a function of the step (`lr_at`), so the step is the scheduler's whole state.
Nothing is unpickled: DCP reads tensors, and RNG files load with `torch.load(weights_only=True)`.
"""

import copy
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict,
)
from torch.distributed.tensor import DTensor

from prep.shards import atomic_file, sha256_file, write_json_atomic
from train.faults import agree, together
from train.parallel import barrier, unwrap

STEP_DIR = re.compile(r"^step-(\d{8})$")
METRICS, SETTINGS, STATE = "metrics.jsonl", "settings.json", "train_state.json"
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
    write_json_atomic(output / SETTINGS, settings)
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
    with atomic_file(path) as f:
        f.write("".join(line + "\n" for line in kept).encode())


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
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: p.name)


def rng_state(device: torch.device) -> dict:
    # Only torch's generators: the data order uses its own seeded numpy Generator, stored as the step.
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def state_bytes(state, rank: int) -> int:
    """Bytes this rank's part of a state dict takes on disk: its shards of DTensors, and (rank 0) the
    plain tensors, which DCP writes once however many ranks hold them."""
    if isinstance(state, dict):
        return sum(state_bytes(value, rank) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(value, rank) for value in state)
    if isinstance(state, DTensor):
        local = state.to_local()
        return local.numel() * local.element_size()
    if isinstance(state, torch.Tensor) and rank == 0:
        return state.numel() * state.element_size()
    return 0


def save(output: str, step: int, module, optimizer, loader, settings: dict, rank: int, world_size: int,
         device: torch.device, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory. In four parts, each ending
    with the ranks agreeing that it worked: the .tmp directory, the tensors (DCP) and RNG states, the
    file records (each rank hashes 1/N of the files), then train_state.json and the rename (rank 0).
    When any part failed on any rank, the .tmp is removed and every rank raises WriteError."""
    final = checkpoints_dir(output) / f"step-{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    model_state, optim_state = get_state_dict(module, optimizer)
    needed = state_bytes([model_state, optim_state], rank)

    def make_tmp() -> None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def write_tensors() -> None:
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
        torch.save(rng_state(device), tmp / f"rng-{rank:05d}.pt")

    def record_files() -> None:
        names = sorted(p.name for p in tmp.iterdir() if not p.name.startswith("files-"))
        records = {name: file_record(tmp / name) for name in names[rank::world_size]}
        write_json_atomic(tmp / f"files-{rank:05d}.json", records)

    def publish() -> None:
        if rank != 0:
            return
        files = {}
        for part in sorted(tmp.glob("files-*.json")):
            files.update(json.loads(part.read_text()))
            part.unlink()
        state = {"step": step, "loader": loader.state_dict(), "world_size": world_size, "settings": settings,
                 "files": files}
        write_json_atomic(tmp / STATE, state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in complete_checkpoints(output)[:-keep_last] if keep_last else []:
            shutil.rmtree(old, ignore_errors=True)

    for part in (make_tmp, write_tensors, record_files, publish):
        together(part, f"checkpoint {final.name}", tmp, rank, device, needed,
                 cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True))
    return final


def file_record(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def checkpoint_problems(path: Path, rank: int = 0, world_size: int = 1) -> list[str]:
    """What is wrong with a complete checkpoint, as this rank sees it: train_state.json unreadable or
    without a file record, a file missing or of another size than recorded (every rank checks the
    sizes), or, for this rank's 1/N of the files, another sha256. Empty: intact."""
    try:
        state = json.loads((path / STATE).read_text())
        files = state["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{STATE} is unreadable or has no file record ({type(e).__name__})"]
    problems = []
    for index, (name, record) in enumerate(sorted(files.items())):
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != record["size"]:
            problems.append(f"{name} is {file.stat().st_size:,} bytes, its record says {record['size']:,}")
        elif index % world_size == rank and sha256_file(file) != record["sha256"]:
            problems.append(f"{name} has another sha256 than its record")
    return problems


def verify_checkpoints(output: str) -> int:
    """`python -m train --verify-checkpoints OUTPUT`: one line per checkpoint, then which one --resume
    would continue from. Exit code 0 when the newest is intact, 1 when not (or there is none)."""
    found = complete_checkpoints(output)
    for leftover in sorted(checkpoints_dir(output).glob("step-*.tmp")):
        print(f"{leftover}: unfinished (a save that was cut short; --resume deletes it)")
    intact = []
    for path in found:
        problems = checkpoint_problems(path)
        if problems:
            print(f"{path}: damaged: {'; '.join(problems)}")
        else:
            files = json.loads((path / STATE).read_text())["files"]
            print(f"{path}: intact ({len(files)} files, {sum(r['size'] for r in files.values()) / 1e6:,.1f} MB, sha256 checked)")
            intact.append(path)
    if not found:
        print(f"{output}: no complete checkpoint")
        return 1
    if intact:
        print(f"--resume would continue from {intact[-1].name}")
    else:
        print("no intact checkpoint: --resume would refuse; start over with --overwrite")
    return 0 if intact and intact[-1] == found[-1] else 1


def load_latest(output: str, module, optimizer, loader, rank: int, world_size: int, device: torch.device,
                build_id: str) -> int:
    """Restore the newest intact checkpoint into module, optimizer, loader and RNG; returns its step.
    A damaged one (checkpoint_problems, agreed by the ranks) is said in one line and moved aside, and
    the one before is tried. With none yet (a run killed before its first save), 0: the run starts
    over, as it would fresh, so a restart script can always pass --resume. Shards of another build
    than the checkpoint's (`build_id`) are refused: the same row numbers would be other sequences."""
    found = complete_checkpoints(output)
    if rank == 0:  # a killed save leaves a .tmp directory behind
        for leftover in checkpoints_dir(output).glob("step-*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
    if not found:
        barrier()
        return 0
    path, damaged = None, []
    for candidate in reversed(found):
        problems = checkpoint_problems(candidate, rank, world_size)
        if not agree(float(len(problems)), device=device)[0]:
            path = candidate
            break
        problem = problems[0] if problems else "a file has another sha256 than its record (found by another rank)"
        damaged.append(f"{candidate.name}: {problem}")
        if rank == 0:
            aside = candidate.with_name(candidate.name + ".damaged")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(candidate, aside)
            older = found[found.index(candidate) - 1].name if candidate != found[0] else None
            print(f"warning: checkpoint {candidate} is damaged ({problem}); moved aside to {aside.name}"
                  + (f", trying {older}" if older else ""), file=sys.stderr, flush=True)
    barrier()
    if path is None:
        raise ValueError(f"no intact checkpoint in {checkpoints_dir(output)} ({'; '.join(damaged)}): "
                         "start over with --overwrite, or resume from a copy of the run")
    state = json.loads((path / STATE).read_text())
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


def export(output: str, module, tokenizer, dtype: torch.dtype, rank: int, device: torch.device) -> Path:
    """Collective: gather the full weights to rank 0 and write OUTPUT/model/ (safetensors, config,
    tokenizer), which `AutoModelForCausalLM.from_pretrained` loads. Written to model.tmp, then renamed;
    a failed write removes model.tmp and raises WriteError on every rank."""
    hf_model = unwrap(module).model
    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final = Path(output) / "model"
    tmp = final.with_name("model.tmp")
    # keys are TrainModule's ("model.lm_head.weight"); the HF model's are one level down
    weights = {k.removeprefix("model."): v.to(dtype) for k, v in full.items()} if rank == 0 else {}
    if hf_model.config.tie_word_embeddings:  # the gathered copies no longer share storage: drop the tie's twin
        weights.pop("lm_head.weight", None)

    def write_model() -> None:
        if rank != 0:
            return
        shutil.rmtree(tmp, ignore_errors=True)
        hf_model.save_pretrained(tmp, state_dict=weights)
        config = copy.deepcopy(hf_model.config)
        config.use_cache = True  # generation wants the KV cache that training switched off
        config.dtype = dtype
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    needed = sum(weight.numel() * weight.element_size() for weight in weights.values())
    together(write_model, "the exported model", tmp, rank, device, needed,
             cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True))
    return final
