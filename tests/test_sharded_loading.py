"""Sharded loading under ModelParallelStrategy on 2 CPU processes: rank 0 builds each model whole,
rank 1 on the meta device, and after sharding every shard holds rank 0's weights, so the gathered
models are the unsharded loads exactly (the exports of whole runs: tests/test_fsdp.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plpost.hf import load_causal_lm

SCRIPT = Path(__file__).with_name("sharded_load.py")
STAGES = ["sft", "sft-lora", "dpo", "ppo-critic", "distill", "reward"]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sharded-load")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), str(root), *STAGES], env=env, timeout=600,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def saved(root: Path, stage: str, name: str) -> dict[str, dict[str, torch.Tensor]]:
    return torch.load(root / stage / f"{name}.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "name"), [("sft", "policy"), ("dpo", "policy"), ("dpo", "reference"),
                                             ("ppo-critic", "policy"), ("ppo-critic", "reference"),
                                             ("distill", "policy"), ("distill", "teacher")])
def test_sharded_models_hold_the_weights_and_buffers_of_the_unsharded_load(loaded, stage, name):
    """Every weight, and the rotary frequencies (a buffer outside the state dict, broadcast on its
    own), equal the whole model's exactly: tolerance 0."""
    whole = load_causal_lm("plpost:tiny")
    expected = whole.state_dict()
    got = saved(loaded, stage, name)
    assert got["weights"].keys() <= expected.keys() and len(got["weights"]) >= len(expected) - 1  # a tied head
    for key, value in got["weights"].items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    for key, value in whole.named_buffers():
        torch.testing.assert_close(got["buffers"][key], value, rtol=0, atol=0, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "name"), [("sft-lora", "policy"), ("ppo-critic", "critic"), ("reward", "policy")])
def test_new_parts_are_initialised_once_on_rank_0_and_shared(loaded, stage, name):
    """LoRA adapters and new score heads exist only where rank 0 initialised them (rank 1's meta
    tensors hold nothing): they arrive finite, LoRA's B at 0 (peft's start), and the backbone
    under them is the checkpoint's."""
    weights = saved(loaded, stage, name)["weights"]
    backbone = load_causal_lm("plpost:tiny").model.state_dict()
    for key, value in weights.items():
        assert torch.isfinite(value).all(), key
        if "lora_B" in key:
            assert torch.equal(value, torch.zeros_like(value)), key
        plain = key.replace("base_layer.", "").split("model.", 1)[-1]
        if "lora_" not in key and "score" not in key and plain in backbone:
            torch.testing.assert_close(value, backbone[plain], rtol=0, atol=0, msg=key)
    assert any("lora_A" in key or "score" in key for key in weights)


@pytest.mark.slow
def test_only_rank_0_builds_whole_models(loaded):
    for stage in STAGES:
        assert [json.loads((loaded / stage / f"empty-{rank}.json").read_text()) for rank in (0, 1)] == [False, True]
