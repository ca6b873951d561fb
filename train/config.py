"""Settings of a training run: one dataclass, its command line, and the handbook's recipe YAML.

Precedence, lowest first: the defaults below (the alignment-handbook SmolLM3 mid-training recipe,
`recipes/smollm3/sft/mid.yaml`), then `--recipe FILE.yaml`, then flags given on the command line.
Each field's docstring is its `--help` text and a `Literal[...]` annotation lists its choices, so the
help can't drift from the code; prep/settings.py reads both, for `prep build` too.
"""

import argparse
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, get_type_hints

from prep.settings import check_choices, field_choices, field_docs, flag

EXAMPLES = """\
examples:
  # 8 GPUs, SmolLM3-3B-Base, the recipe's defaults, on the shards of `prep build`
  torchrun --nproc-per-node 8 -m train --shards shards/ --output runs/mid

  # the same settings from the alignment-handbook's own recipe file
  torchrun --nproc-per-node 8 -m train --shards shards/ --recipe recipes/smollm3/sft/mid.yaml

  # a tiny random SmolLM3 on CPU, one process, on 1k-token shards: loss 11.8 -> ~7.5 in about a minute
  prep build --mix nemotron=0.5,ot3=0.5 --sample --seq-len 1024 --out shards-1k/
  python -m train --shards shards-1k/ --model-config tiny --max-steps 30 --lr 3e-3 --save-every 0 --output runs/demo

  # two CPU processes (gloo), FSDP2; stop after step 10, then continue from the checkpoint
  torchrun --nproc-per-node 2 -m train --shards shards-1k/ --model-config tiny --max-steps 20 \\
      --save-every 5 --stop-after 10 --output runs/r
  torchrun --nproc-per-node 2 -m train --shards shards-1k/ --model-config tiny --max-steps 20 \\
      --save-every 5 --output runs/r --resume

  # preemptible: torchrun forwards SIGTERM/SIGUSR1, the ranks save and exit 75; rerun with --resume
  torchrun --signals-to-handle SIGTERM,SIGUSR1 --shutdown-timeout 110 --nproc-per-node 8 -m train \\
      --shards shards/ --output runs/mid --resume

  # every checkpoint of a run against its recorded sizes and sha256
  python -m train --verify-checkpoints runs/mid
"""


@dataclass
class TrainConfig:
    shards: str = ""
    """Directory written by `prep build` (shard-NNNNN.arrow + manifest.json)."""
    output: str = "runs/train"
    """Run directory: metrics.jsonl, checkpoints/step-NNNNNNNN/, and the exported model in model/."""
    model: str = "HuggingFaceTB/SmolLM3-3B-Base"
    """Hub id or local directory of the pretrained model to start from."""
    model_config: str = ""
    """Instead of --model: 'tiny' or a config.json path; builds a randomly initialised model."""
    tokenizer: str = ""
    """Tokenizer to check the shards against and export; default: the model's own (for --model-config: the shards')."""
    trust_remote_code: bool = False
    """Run model code from the hub or model directory (never needed for SmolLM3, which transformers has)."""
    seq_len: int = 0
    """Refuse shards of another seq_len; 0 = take the shards' (handbook: max_length)."""
    epochs: int = 5
    """Passes over the shards (handbook: num_train_epochs)."""
    max_steps: int = -1
    """Optimizer steps of the whole run; -1 = epochs x steps per epoch. The LR schedule spans this."""
    stop_after: int = -1
    """End this process after this step (checkpoint saved, schedule unchanged); continue with --resume."""
    batch_size: int = 1
    """Packed sequences per device per micro-batch (handbook: per_device_train_batch_size)."""
    grad_accum: int = 2
    """Micro-batches per optimizer step (handbook: gradient_accumulation_steps)."""
    lr: float = 2e-5
    """Peak learning rate of AdamW (handbook: learning_rate)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr x this (handbook: lr_scheduler_kwargs.min_lr_rate)."""
    warmup_ratio: float = 0.03
    """Linear warmup over this fraction of the steps, rounded up (handbook: warmup_ratio)."""
    warmup_steps: int = 0
    """Linear warmup over exactly this many steps; overrides --warmup-ratio when above 0."""
    weight_decay: float = 0.0
    """AdamW weight decay (handbook/transformers default 0)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 0.2
    """Clip the global gradient norm to this; 0 = off (handbook: max_grad_norm)."""
    seed: int = 42
    """Seed of the model init and of the per-epoch shuffle."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """bf16, fp32 or auto (bf16 on CUDA; fp32 on CPU, where bf16 matmuls are slower)."""
    dist: Literal["auto", "ddp", "fsdp"] = "auto"
    """ddp, fsdp, or auto (fsdp when more than one process)."""
    activation_checkpointing: bool = True
    """Recompute each decoder layer in backward (handbook: gradient_checkpointing)."""
    liger: bool = True
    """On CUDA, Liger kernels (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy); ignored on CPU."""
    attn: Literal["auto", "sdpa", "flex_attention", "eager"] = "auto"
    """Attention kernel: auto (flex_attention on CUDA, sdpa on CPU), sdpa, flex_attention or eager."""
    compile: bool = False
    """torch.compile each decoder layer (the first steps pay for the compilation)."""
    estimate_memory: bool = False
    """Print the peak GPU memory per rank of these settings, part by part, and exit: nothing is allocated."""
    world_size: int = 1
    """With --estimate-memory: the number of GPUs to plan for (FSDP over them when above 1)."""
    gpu_memory: float = 141.0
    """With --estimate-memory: GB of memory of one GPU, to say whether the peak fits (H200: 141)."""
    json: bool = False
    """With --estimate-memory: print one JSON object (peak_gb, its parts, fits) instead of a table."""
    save_every: float = 0.05
    """Checkpoint every N steps; below 1, a fraction of the run, as the handbook's save_steps: 0.05; 0 = never."""
    keep_last: int = 2
    """Complete checkpoints to keep; 0 = all (handbook: save_total_limit)."""
    resume: bool = False
    """Continue from the latest complete checkpoint in --output."""
    overwrite: bool = False
    """Start over in an --output that holds an earlier run: deletes its checkpoints, metrics and model."""
    log_every: int = 1
    """Print and append to metrics.jsonl every N steps (handbook: logging_steps)."""
    report_to: str = "none"
    """Also log every metrics.jsonl line to: tensorboard (under --output), wandb, trackio, mlflow, comma-separated;
all = every one installed; none = metrics.jsonl only (handbook: report_to)."""
    export_dtype: Literal["bf16", "fp32"] = "bf16"
    """dtype of the exported Hugging Face model: bf16 or fp32."""
    dist_timeout: int = 600
    """Seconds a collective waits for the other ranks before the run fails: how long survivors of a dead rank can hang (handbook: 4 h)."""
    verify_checkpoints: str = ""
    """Check every checkpoint of this run directory against its record (sizes, sha256), print one line each, and exit."""
    verify_hashes: bool = True
    """Before the first step, prove the shards as `prep verify` does (sha256 and row checks); each rank proves 1/N of the files. Off: trust them."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device for MFU; 0 = look the GPU up (CPU: no MFU)."""
    recipe: str = ""
    """An alignment-handbook recipe YAML; its known keys set the fields above, flags still win."""

    def check(self) -> None:
        """Every mistake a user can make in the settings, before any work starts."""
        if not self.shards and not (self.estimate_memory or self.verify_checkpoints):
            raise ValueError("--shards DIR is required: the output directory of `prep build`")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --output and --overwrite deletes it: pass one of them")
        check_choices(self)
        for name in ("epochs", "batch_size", "grad_accum", "log_every", "dist_timeout"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be at least 1")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("--min-lr-ratio must be in [0, 1] and --warmup-ratio in [0, 1)")
        if self.lr <= 0 or min(self.grad_clip, self.save_every, self.warmup_steps, self.seq_len, self.keep_last) < 0:
            raise ValueError("--lr must be positive; --grad-clip, --save-every, --warmup-steps, --seq-len and "
                             "--keep-last at least 0")

    def save_interval(self, total_steps: int) -> int:
        """--save-every in steps (0 = never); a value below 1 is a fraction of the run, rounded up."""
        if self.save_every == 0:
            return 0
        return math.ceil(self.save_every * total_steps) if self.save_every < 1 else int(self.save_every)


def parser() -> argparse.ArgumentParser:
    """The command line of TrainConfig: one flag per field, its help the field's docstring, its choices
    the field's Literal (shown here, checked once by TrainConfig.check(), recipe values alike)."""
    cli = argparse.ArgumentParser(
        prog="python -m train", usage="python -m train --shards DIR [options]  (or: torchrun --nproc-per-node N -m train ...)",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Mid-train SmolLM3 on packed shards from `prep build` (one process, or N with torchrun).",
    )
    docs, kinds, choices = field_docs(TrainConfig), get_type_hints(TrainConfig), field_choices(TrainConfig)
    for field in fields(TrainConfig):
        # SUPPRESS: a flag that isn't given leaves no attribute, so the recipe's value can stand.
        if kinds[field.name] is bool:
            cli.add_argument(flag(field.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                             help=docs[field.name])
            continue
        default = f" (default: {field.default})" if field.default != "" else ""
        if field.name in choices:
            kind, metavar = str, "{" + ",".join(choices[field.name]) + "}"
        else:
            kind, metavar = kinds[field.name], field.name.upper()
        cli.add_argument(flag(field.name), type=kind, default=argparse.SUPPRESS, metavar=metavar,
                         help=docs[field.name] + default)
    return cli


# alignment-handbook / transformers.TrainingArguments names -> ours.
RECIPE_KEYS = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "max_steps": "max_steps", "max_grad_norm": "grad_clip",
    "warmup_ratio": "warmup_ratio", "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "gradient_checkpointing": "activation_checkpointing",
    "model_name_or_path": "model", "use_liger_kernel": "liger", "seed": "seed", "output_dir": "output",
    "save_steps": "save_every", "save_total_limit": "keep_last", "logging_steps": "log_every",
    "weight_decay": "weight_decay", "adam_beta1": "adam_beta1", "adam_beta2": "adam_beta2",
    "adam_epsilon": "adam_epsilon", "max_length": "seq_len",
}
# Keys whose meaning is already how this trainer works, so they are not "unused".
RECIPE_BUILT_IN = {
    "packing": True, "padding_free": True, "average_tokens_across_devices": True,
    "chat_template": None, "eos_token": None,  # prep build rendered the data with these
}


def read_recipe(path: str) -> tuple[dict, list[str]]:
    """Our fields from a handbook recipe YAML, and the keys this trainer doesn't use."""
    import yaml

    recipe = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: a recipe is a YAML mapping of key: value")
    ours, unused = {}, []
    names = {f.name for f in fields(TrainConfig)}
    for key, value in recipe.items():
        if value is None:  # YAML null: "not set", except that a null save_total_limit keeps every checkpoint
            if key == "save_total_limit":
                ours["keep_last"] = 0
        elif key == "trust_remote_code":  # running downloaded code is a decision for the command line
            unused.append("trust_remote_code (pass --trust-remote-code on the command line to allow it)")
        elif key == "warmup_steps":  # transformers 5 folded warmup_ratio into it: below 1 it is a ratio
            ours["warmup_ratio" if isinstance(value, float) and value < 1 else "warmup_steps"] = value
        elif key == "report_to":  # transformers takes a list or one name
            ours["report_to"] = ",".join(value) if isinstance(value, list) else value
        elif key in RECIPE_KEYS:
            ours[RECIPE_KEYS[key]] = value
        elif key in names and key != "recipe":
            ours[key] = value
        elif key == "lr_scheduler_type":
            if value not in ("cosine_with_min_lr", "cosine"):
                raise ValueError(f"{path}: lr_scheduler_type {value!r} is not supported; use cosine_with_min_lr or cosine")
            if value == "cosine":
                ours.setdefault("min_lr_ratio", 0.0)
        elif key == "lr_scheduler_kwargs":
            kwargs = dict(value or {})
            if "min_lr_rate" in kwargs:
                ours["min_lr_ratio"] = kwargs.pop("min_lr_rate")
            unused += [f"lr_scheduler_kwargs.{k}" for k in kwargs]
        elif key in ("bf16", "fp16"):
            if key == "fp16" and value:
                raise ValueError(f"{path}: fp16 is not supported; use bf16: true")
            if key == "bf16" and value:
                ours["precision"] = "bf16"
        elif key in ("torch_dtype", "dtype"):  # the model's weights: bf16 or fp32 here, "auto" = the default
            if value in ("bfloat16", "bf16"):
                ours["precision"] = "bf16"
            elif value in ("float32", "fp32"):
                ours["precision"] = "fp32"
            elif value != "auto":
                raise ValueError(f"{path}: {key}: {value} is not supported; use bfloat16, float32 or auto")
        elif key in RECIPE_BUILT_IN:
            if RECIPE_BUILT_IN[key] is not None and value != RECIPE_BUILT_IN[key]:
                raise ValueError(f"{path}: {key}: {value} is not supported; this trainer always uses {key}: {RECIPE_BUILT_IN[key]}")
        else:
            unused.append(key)
    return ours, unused


def coerce(name: str, value, default):
    """A YAML value as the type of the field's default (YAML reads 2.0e-05 as a float but 2e-5 as a string)."""
    kind = type(default)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"recipe: {name} must be true or false, not {value!r}")
        return value
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"recipe: {name} must be of type {kind.__name__}, not {value!r}") from None


def parse_args(argv=None, warn=lambda msg: print(msg, file=sys.stderr)) -> TrainConfig:
    """Defaults, then --recipe, then flags; checked."""
    given = vars(parser().parse_args(argv))
    defaults = TrainConfig()
    values = {}
    recipe = given.get("recipe", "")
    if recipe:
        if not Path(recipe).is_file():
            raise ValueError(f"--recipe {recipe}: no such file")
        ours, unused = read_recipe(recipe)
        values = {k: coerce(k, v, getattr(defaults, k)) for k, v in ours.items()}
        if unused:
            warn(f"warning: {recipe}: ignoring {len(unused)} keys this trainer doesn't use: {', '.join(unused)}")
    values.update(given)
    cfg = TrainConfig(**values)
    cfg.check()
    return cfg
