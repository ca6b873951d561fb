"""train/config.py: the handbook's recipe YAML, precedence of flags, one warning for unused keys, --help."""

import subprocess
import sys

import pytest

from prep.settings import field_choices, field_docs
from train.config import TrainConfig, parse_args

# recipes/smollm3/sft/mid.yaml of the alignment-handbook (huggingface/alignment-handbook, commit 19f0345),
# byte for byte: `--recipe` must take the file as published.
HANDBOOK_MID = r'''# Config for 8 nodes, with GBS 128
# Model arguments
model_name_or_path: HuggingFaceTB/SmolLM3-3B-Base
model_revision: main
torch_dtype: bfloat16
attn_implementation: flash_attention_2
trust_remote_code: true

# Data training arguments
chat_template: "{%- for message in messages -%}\n    {{- \"<|im_start|>\" + message.role + \"\\n\" + message.content + \"<|im_end|>\" + \"\\n\" -}}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n\t{{- \"<|im_start|>assistant\\n\" -}}\n{%- endif -%}"
dataset_mixture:
  datasets:                     
    - id: HuggingFaceTB/smoltalk2 
      config: Mid 
      split: Llama_Nemotron_Post_Training_Dataset_reasoning_r1            
      columns:
        - messages
      weight: 1.0
    - id: HuggingFaceTB/smoltalk2
      config: Mid
      split: OpenThoughts3_1.2M         
      columns:
        - messages
      weight: 1.0
  seed: 0
dataset_num_proc: 48
eos_token: <|im_end|>

# SFT trainer config
bf16: true
ddp_timeout: 14400 # avoid nccl errors when tokenizing large datasets
do_eval: false
eval_strategy: 'no'
gradient_accumulation_steps: 2
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: true
output_dir: data/SmolLM3-Mid
hub_strategy: every_save
learning_rate: 2.0e-05
log_level: info
logging_steps: 1
logging_strategy: steps
lr_scheduler_type: cosine_with_min_lr
lr_scheduler_kwargs:
  min_lr_rate: 0.1
packing: true
max_grad_norm: 0.2
max_length: 32768
max_steps: -1
num_train_epochs: 5
overwrite_output_dir: true
per_device_train_batch_size: 1
push_to_hub: true
report_to:
- wandb
save_strategy: steps
save_steps: 0.05 # save every 0.25 epochs
save_total_limit: 1
seed: 42
use_liger_kernel: true
warmup_ratio: 0.03
run_name: smollm3-midtraining
average_tokens_across_devices: true'''

# The handbook recipe's numbers, read off that file (and transformers' TrainingArguments defaults for the
# AdamW settings it doesn't name): what the defaults of TrainConfig must be with no YAML at all.
HANDBOOK_NUMBERS = {"model": "HuggingFaceTB/SmolLM3-3B-Base", "lr": 2.0e-05, "min_lr_ratio": 0.1, "warmup_ratio": 0.03,
                    "grad_clip": 0.2, "epochs": 5, "max_steps": -1, "batch_size": 1, "grad_accum": 2, "seed": 42,
                    "activation_checkpointing": True, "liger": True, "save_every": 0.05, "log_every": 1,
                    "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8}


def recipe(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_handbook_recipe_sets_every_field_it_names_and_warns_once(tmp_path):
    warnings = []
    cfg = parse_args(["--shards", "s", "--recipe", recipe(tmp_path, HANDBOOK_MID)], warn=warnings.append)
    assert (cfg.model, cfg.lr, cfg.min_lr_ratio, cfg.warmup_ratio, cfg.grad_clip) == \
        ("HuggingFaceTB/SmolLM3-3B-Base", 2e-5, 0.1, 0.03, 0.2)
    assert (cfg.epochs, cfg.max_steps, cfg.batch_size, cfg.grad_accum, cfg.seed) == (5, -1, 1, 2, 42)
    assert (cfg.activation_checkpointing, cfg.liger, cfg.precision, cfg.seq_len) == (True, True, "bf16", 32768)
    assert (cfg.output, cfg.save_every, cfg.keep_last, cfg.log_every) == ("data/SmolLM3-Mid", 0.05, 1, 1)
    assert cfg.trust_remote_code is False  # only the command line can allow remote code
    assert cfg.report_to == "wandb"
    assert len(warnings) == 1
    for key in ("dataset_mixture", "push_to_hub", "hub_strategy", "run_name", "trust_remote_code"):
        assert key in warnings[0]
    for used in ("learning_rate", "num_train_epochs", "lr_scheduler_kwargs", "packing", "max_length"):
        assert used not in warnings[0].replace("trust_remote_code", "")


def test_defaults_are_the_handbook_recipe():
    cfg = TrainConfig(shards="s")
    assert {name: getattr(cfg, name) for name in HANDBOOK_NUMBERS} == HANDBOOK_NUMBERS
    assert cfg.save_interval(1000) == 50 and TrainConfig(save_every=7).save_interval(1000) == 7
    assert TrainConfig(save_every=0).save_interval(1000) == 0


def test_the_handbook_file_sets_the_same_numbers(tmp_path):
    cfg = parse_args(["--shards", "s", "--recipe", recipe(tmp_path, HANDBOOK_MID)], warn=lambda m: None)
    assert {name: getattr(cfg, name) for name in HANDBOOK_NUMBERS} == HANDBOOK_NUMBERS


def test_flags_win_over_the_recipe_and_yaml_strings_are_coerced(tmp_path):
    # YAML 1.1 reads 2e-5 (no dot) as a string; a recipe may write it either way.
    path = recipe(tmp_path, "learning_rate: 2e-5\nnum_train_epochs: 3\nuse_liger_kernel: false\n")
    cfg = parse_args(["--shards", "s", "--recipe", path, "--epochs", "1"], warn=lambda m: None)
    assert (cfg.lr, cfg.epochs, cfg.liger) == (2e-5, 1, False)
    cfg = parse_args(["--shards", "s", "--recipe", path, "--liger"], warn=lambda m: None)
    assert cfg.liger is True


def test_our_own_field_names_work_in_a_recipe(tmp_path):
    cfg = parse_args(["--recipe", recipe(tmp_path, "shards: data/\nmodel_config: tiny\ngrad_clip: 1.0\n")])
    assert (cfg.shards, cfg.model_config, cfg.grad_clip) == ("data/", "tiny", 1.0)


def test_transformers5_warmup_steps_and_yaml_nulls(tmp_path):
    text = "warmup_steps: 0.05\nsave_total_limit: null\nmax_length: null\n"
    cfg = parse_args(["--shards", "s", "--recipe", recipe(tmp_path, text)], warn=lambda m: None)
    assert (cfg.warmup_ratio, cfg.warmup_steps, cfg.keep_last, cfg.seq_len) == (0.05, 0, 0, 0)
    cfg = parse_args(["--shards", "s", "--recipe", recipe(tmp_path, "warmup_steps: 100\n")], warn=lambda m: None)
    assert cfg.warmup_steps == 100


@pytest.mark.parametrize("text, precision", [
    ("torch_dtype: bfloat16\n", "bf16"), ("bf16: true\n", "bf16"), ("torch_dtype: float32\n", "fp32"),
    ("dtype: float32\nbf16: false\n", "fp32"), ("torch_dtype: auto\n", TrainConfig.precision),
])
def test_recipe_dtypes_set_the_precision(tmp_path, text, precision):
    assert parse_args(["--shards", "s", "--recipe", recipe(tmp_path, text)], warn=lambda m: None).precision == precision


@pytest.mark.parametrize("text, message", [
    ("lr_scheduler_type: linear\n", "not supported"),
    ("fp16: true\n", "fp16 is not supported"),
    ("torch_dtype: float16\n", "torch_dtype: float16 is not supported; use bfloat16, float32 or auto"),
    ("dtype: half\n", "dtype: half is not supported"),
    ("packing: false\n", "always uses packing"),
    ("num_train_epochs: many\n", "must be of type int"),
    ("gradient_checkpointing: 1\n", "true or false"),
    ("- a list\n", "YAML mapping"),
    ("dist: zero3\n", "--dist must be one of auto, ddp, fsdp, not 'zero3'"),
])
def test_bad_recipes_fail_with_the_key_named(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        parse_args(["--shards", "s", "--recipe", recipe(tmp_path, text)], warn=lambda m: None)


@pytest.mark.parametrize("argv, message", [
    ([], "--shards DIR is required"),
    (["--shards", "s", "--dist", "zero3"], "--dist must be one of"),
    (["--shards", "s", "--grad-accum", "0"], "--grad-accum must be at least 1"),
    (["--shards", "s", "--recipe", "missing.yaml"], "no such file"),
])
def test_setting_mistakes_are_value_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


def test_cli_errors_are_one_line_and_exit_2():
    out = subprocess.run([sys.executable, "-m", "train", "--shards", "s", "--dist", "zero3"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: --dist must be one of auto, ddp, fsdp, not 'zero3'"]


def test_help_shows_every_setting_and_real_examples():
    out = subprocess.run([sys.executable, "-m", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name, doc in field_docs(TrainConfig).items():
        assert "--" + name.replace("_", "-") in out.stdout and doc
    choices = field_choices(TrainConfig)
    assert choices
    for name, allowed in choices.items():  # shown from the field's Literal annotation
        assert "--" + name.replace("_", "-") + " {" + ",".join(allowed) + "}" in out.stdout
    assert "torchrun --nproc-per-node 8 -m train --shards shards/" in out.stdout
    assert "--model-config tiny" in out.stdout and "--resume" in out.stdout
