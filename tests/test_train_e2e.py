"""`python -m train` and `torchrun -m train` end to end on shards built by the real `prep build` from the
embedded sample (seq_len 256, so a CPU step takes ~0.3 s): the loss falls, the export loads, wrong
shards are refused, DDP and FSDP agree, and a stopped run resumes to the same losses (faults: test_train_faults.py)."""

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from prep.shards import BUILD_ID_KEY

from conftest import RUN, metrics, train_cli
from train.__main__ import main


def test_loss_falls_and_every_metric_is_logged(single_run):
    rows = metrics(single_run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    last3 = sum(r["loss"] for r in rows[-3:]) / 3
    # the sample's varied vocabulary falls ~0.45 in 8 steps (its first 60k tokens); a model that does not learn, ~0
    assert last3 < rows[0]["loss"] - 0.3, [r["loss"] for r in rows]
    for r in rows:
        assert set(r) >= {"loss", "loss_per_source", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gb"}
        assert set(r["loss_per_source"]) == {"nemotron", "ot3"} and r["tokens"] > 0
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(3e-3)  # warmup: ceil(10% of 8) = 1 step
    assert rows[0]["mfu"] is None  # CPU: no peak to divide by without --peak-tflops


def test_export_loads_in_transformers_with_the_trained_weights(single_run, shards):
    from prep.shards import fingerprint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.data import Loader, PackedShards

    model, info = AutoModelForCausalLM.from_pretrained(single_run / "model", dtype=torch.float32,
                                                       output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    tokenizer = AutoTokenizer.from_pretrained(single_run / "model")
    manifest = json.loads((shards / "manifest.json").read_text())
    assert fingerprint(tokenizer.backend_tokenizer) == manifest["tokenizer"]["fingerprint"]
    saved = json.loads((single_run / "model" / "config.json").read_text())
    assert saved["use_cache"] and saved["dtype"] == "bfloat16" and model.config.tie_word_embeddings
    # the exported weights are the trained ones: their loss on training rows is the trained loss, not ~11.8
    batch = Loader(PackedShards(str(shards)), 1, 1, 0, 1, seed=42).next()[0]
    with torch.no_grad():
        logp = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0].log_softmax(-1)
    targets = batch.labels[0] != -100
    nll = -logp[targets].gather(1, batch.labels[0][targets][:, None]).mean().item()
    assert nll < metrics(single_run)[0]["loss"] - 0.5


def test_an_exported_model_directory_trains_again_as_model(single_run, shards, tmp_path):
    # --model DIR: from_pretrained and the tokenizer saved beside the weights, checked against the shards
    output = tmp_path / "again"
    assert main(["--shards", str(shards), "--model", str(single_run / "model"), "--lr", "1e-3", "--max-steps", "2",
                 "--save-every", "0", "--output", str(output)]) == 0
    rows = metrics(output)
    assert rows[0]["loss"] < metrics(single_run)[0]["loss"] - 0.5  # it starts from the trained weights


def test_shards_of_another_tokenizer_are_refused_in_one_line(shards, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"].update(name="meta-llama/Llama-3.2-1B", fingerprint="sha256:" + "1" * 64)
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert main(["--shards", str(other), "--model-config", "tiny", "--tokenizer", "HuggingFaceTB/SmolLM3-3B",
                 "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "rebuild the shards" in err[-1] and "Llama-3.2-1B" in err[-1]
    assert not (tmp_path / "run").exists()  # refused before any work


def test_an_earlier_run_is_not_overwritten_without_resume(single_run, shards, capsys):
    assert main(["--shards", str(shards), *RUN, "--output", str(single_run)]) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_resume_before_any_checkpoint_starts_over_identically(single_run, shards, tmp_path):
    """Killed before its first save: metrics.jsonl but no checkpoint. A restart with --resume starts at 0."""
    output = tmp_path / "early"
    output.mkdir()
    (output / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 99.0}) + "\n")
    (output / "checkpoints" / "step-00000002.tmp").mkdir(parents=True)  # a save that never finished
    assert main(["--shards", str(shards), *RUN, "--max-steps", "8", "--save-every", "0", "--output", str(output),
                 "--resume"]) == 0
    keys = ("step", "loss", "lr", "grad_norm")
    assert [{k: r[k] for k in keys} for r in metrics(output)] == [{k: r[k] for k in keys} for r in metrics(single_run)]
    assert not (output / "checkpoints" / "step-00000002.tmp").exists()


def test_stop_after_then_resume_gives_identical_losses(single_run, shards, tmp_path):
    args = ["--shards", str(shards), *RUN, "--max-steps", "8", "--save-every", "0", "--output", str(tmp_path / "r")]
    assert main(args + ["--stop-after", "3"]) == 0
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["step-00000003"]
    assert not (tmp_path / "r" / "model").exists()
    assert main(args + ["--resume"]) == 0
    keys = ("step", "loss", "loss_per_source", "lr", "grad_norm", "tokens")
    resumed, reference = metrics(tmp_path / "r"), metrics(single_run)
    assert [{k: r[k] for k in keys} for r in resumed] == [{k: r[k] for k in keys} for r in reference]
    weights = "model.safetensors"
    assert (tmp_path / "r" / "model" / weights).read_bytes() == (single_run / "model" / weights).read_bytes()


def test_ddp_and_fsdp_give_the_same_losses(shards, tmp_path):
    args = ["--shards", str(shards), *RUN, "--grad-accum", "1", "--max-steps", "3", "--save-every", "0"]
    train_cli(args + ["--dist", "ddp", "--output", str(tmp_path / "ddp")], nproc=2)
    train_cli(args + ["--dist", "fsdp", "--output", str(tmp_path / "fsdp")], nproc=2)
    ddp, fsdp = metrics(tmp_path / "ddp"), metrics(tmp_path / "fsdp")
    # learning itself is checked on one process (test_loss_falls_and_every_metric_is_logged); here the two layouts must agree
    assert len(ddp) == len(fsdp) == 3 and all(r["grad_norm"] > 0 for r in fsdp)
    for a, b in zip(ddp, fsdp):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        # equal gradients, but an fp32 norm over 8.5M values is only good to ~5e-5 (measured against fp64),
        # and FSDP sums it per shard
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
        assert a["tokens"] == b["tokens"]  # the same rows on the same steps
    from transformers import AutoModelForCausalLM

    for run in ("ddp", "fsdp"):  # both exports gathered every weight under its HF name
        _, info = AutoModelForCausalLM.from_pretrained(tmp_path / run / "model", output_loading_info=True)
        assert not any(info.values()), info
    # The first step's loss is that of the seeded init, whatever the processes: a plain transformers model
    # built from the same seed, on the rows both ranks read at step 0.
    assert fsdp[0]["loss"] == pytest.approx(reference_first_loss(shards, world_size=2, grad_accum=1), rel=1e-5)


def reference_first_loss(shards: Path, world_size: int, grad_accum: int) -> float:
    from transformers import AutoModelForCausalLM, SmolLM3Config

    from train.data import Loader, PackedShards
    from train.model import TINY

    torch.manual_seed(42)
    model = AutoModelForCausalLM.from_config(SmolLM3Config(**TINY), attn_implementation="sdpa", dtype=torch.float32)
    total, count = 0.0, 0
    for rank in range(world_size):
        for batch in Loader(PackedShards(str(shards)), 1, grad_accum, rank, world_size, seed=42).next():
            with torch.no_grad():
                logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
            total += torch.nn.functional.cross_entropy(logits[0], batch.labels[0], reduction="sum").item()
            count += int((batch.labels != -100).sum())
    return total / count


def test_first_loss_of_one_process_is_the_seeded_init_s(single_run, shards):
    assert metrics(single_run)[0]["loss"] == pytest.approx(reference_first_loss(shards, 1, grad_accum=2), rel=1e-5)


def test_resume_refuses_rebuilt_shards_and_keeps_the_resolved_settings(shards, tmp_path, capsys):
    args = ["--shards", str(shards), *RUN, "--max-steps", "4", "--save-every", "0", "--output", str(tmp_path / "r")]
    assert main(args + ["--stop-after", "1"]) == 0
    state = json.loads((tmp_path / "r" / "checkpoints" / "step-00000001" / "train_state.json").read_text())
    manifest = json.loads((shards / "manifest.json").read_text())
    assert state["settings"]["build_id"] == manifest["build_id"]
    assert state["settings"]["resolved"] | {"liger": None} == {"mode": "none", "precision": "fp32", "total_steps": 4,
                                                               "world_size": 1, "liger": None}
    rebuilt = tmp_path / "rebuilt"
    shutil.copytree(shards, rebuilt)
    manifest["build_id"] = "another-build"
    (rebuilt / "manifest.json").write_text(json.dumps(manifest))
    for shard in rebuilt.glob("*.arrow"):  # the shards name their build too; keep them consistent with it
        table = pa.ipc.open_stream(pa.memory_map(str(shard))).read_all()
        table = table.replace_schema_metadata({BUILD_ID_KEY: "another-build"})
        with pa.OSFile(str(shard) + ".tmp", "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=64)
        os.replace(str(shard) + ".tmp", shard)  # the table still maps the old file
    args[1] = str(rebuilt)
    assert main(args + ["--resume", "--no-verify-hashes"]) == 2
    assert "another-build" in capsys.readouterr().err


@pytest.mark.slow
def test_the_handbook_recipe_file_runs_as_published_on_cpu(shards, tmp_path, capsys, monkeypatch):
    """Its own mid.yaml, unedited, with what a CPU needs on top: a tiny model and the shards' length.
    Its `report_to: wandb` logs offline here (no account, no network)."""
    from test_train_config import HANDBOOK_MID

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")

    (tmp_path / "mid.yaml").write_text(HANDBOOK_MID)
    output = tmp_path / "run"
    assert main(["--recipe", str(tmp_path / "mid.yaml"), "--shards", str(shards), "--model-config", "tiny",
                 "--seq-len", "256", "--max-steps", "1", "--output", str(output)]) == 0
    settings = json.loads((output / "settings.json").read_text())
    assert (settings["lr"], settings["grad_accum"], settings["seq_len"]) == (2e-5, 2, 256)
    assert settings["resolved"]["precision"] == "bf16"  # the recipe's bf16: true, on CPU too
    warnings = [line for line in capsys.readouterr().err.splitlines() if "ignoring" in line]
    assert len(warnings) == 1 and "dataset_mixture" in warnings[0] and "attn_implementation" in warnings[0]
    assert (output / "model" / "model.safetensors").exists() and len(metrics(output)) == 1
    assert list((output / "wandb").glob("offline-run-*")), "the recipe's report_to: wandb was not honored"
