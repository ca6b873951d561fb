"""The model's build on 2 gloo processes (tests/train_build_worker.py): FSDP2 shards of rank 0's weights equal
`from_pretrained`'s and the seeded init's exactly; a non-zero rank never holds the whole model; bf16
FSDP2 (MixedPrecisionPolicy) stays close to fp32."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.model import TINY

# ~100M parameters, 400 MB in fp32; the checkpoint in bf16 as SmolLM3's is.
LARGE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=4, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM, SmolLM3Config

    root = tmp_path_factory.mktemp("build")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(SmolLM3Config(**TINY)).save_pretrained(root / "tiny")
    AutoModelForCausalLM.from_config(SmolLM3Config(**LARGE), dtype=torch.bfloat16).save_pretrained(root / "large")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    worker = Path(__file__).with_name("train_build_worker.py")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(worker), str(root), str(root / "tiny"), str(root / "large")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root


def test_fsdp_weights_equal_from_pretrained_and_the_seeded_init_exactly(built):
    from transformers import AutoModelForCausalLM, SmolLM3Config

    expected = AutoModelForCausalLM.from_pretrained(built / "tiny", dtype=torch.float32).state_dict()
    torch.manual_seed(42)  # --seed 42: what one process built before the model moved to the meta device
    seeded = AutoModelForCausalLM.from_config(SmolLM3Config(**TINY), dtype=torch.float32).state_dict()
    for name, reference in (("pretrained", expected), ("random", seeded)):
        gathered = load_file(built / f"{name}.safetensors")
        assert gathered.keys() == reference.keys()
        for key, value in reference.items():
            assert torch.equal(gathered[key], value), (name, key)


def test_a_non_zero_rank_never_holds_the_whole_model(built):
    full_fp32 = sum(t.numel() for t in load_file(built / "large" / "model.safetensors").values()) * 4
    rank0, rank1 = (json.loads((built / f"rss-{r}.json").read_text()) for r in (0, 1))
    assert rank1["local_params"] == pytest.approx(full_fp32 / 2, rel=0.01)  # its fp32 half, and no more
    # its shard plus one tensor in flight at a time: well under one full fp32 copy (400 MB)
    assert rank1["peak_growth"] < 0.75 * full_fp32, (rank1, full_fp32)
    assert rank0["peak_growth"] > rank1["peak_growth"]  # rank 0 did read the checkpoint


def test_bf16_fsdp_stays_close_to_fp32(built):
    losses = json.loads((built / "losses.json").read_text())
    assert losses["fp32"][-1] < losses["fp32"][0]
    assert losses["bf16"] != losses["fp32"]  # bf16 really ran
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-3)
