"""FSDP2 sharding under ModelParallelStrategy on 2 CPU processes (gloo): every stage takes the same
steps as under DDP, its export is gathered whole, and a setting plpost cannot honour is refused."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plpost.hf import load_causal_lm

SCRIPT = Path(__file__).with_name("sharded_run.py")
UNITS_SCRIPT = Path(__file__).with_name("sharded_units.py")
STAGES = ["sft", "sft-packed", "sft-lora", "sft-merged", "sft-bf16", "sft-untied", "reward", "dpo", "dpo-adapter", "dpo-precomputed", "orpo", "kto",
          "ppo", "ppo-critic", "grpo", "distill"]
CLIPPED = {"ppo", "ppo-critic", "grpo", "distill"}
"""Stages that clip the gradient norm (see the tolerance in the test below)."""
MIXED = {"sft-bf16"}
"""Stages in bf16-mixed precision, which DDP (autocast over float32 weights) computes otherwise."""


def run(out: Path, strategy: str, *stages: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), str(out), strategy, *stages], env=env, timeout=600,
                          capture_output=True, text=True)


def exported(folder: Path) -> dict[str, torch.Tensor]:
    (weights,) = [f for f in (folder / "model").iterdir() if f.suffix == ".safetensors"]
    return load_file(weights)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sharded")
    for strategy in ("ddp", "sharded"):
        done = run(root / strategy, strategy, *STAGES)
        assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("stage", [stage for stage in STAGES if stage not in MIXED])
def test_sharded_run_exports_the_weights_of_a_ddp_run(runs, stage):
    """Both runs see the same 2 x 2 rows per step and take 3 SGD steps at lr 0.5. DDP all-reduces
    the full gradients and averages them; FSDP2 reduce-scatters the layers' gradients with the
    same average, and each rank steps its shard. The reward model (its embeddings inside the
    backbone's unit) sums the same two float32 gradients in the same order (gloo, CPU), and SGD is
    elementwise, so its weights agree exactly: tolerance 0.
    A language model's embeddings and head are sharded by vocabulary rows: each rank's logits are
    two half-vocabulary products, the gradient of the hidden states is summed half by half, and
    the table's gradient is one product over both ranks' tokens, where DDP sums two. The same
    numbers summed in another order differ by float32 rounding: after one step, measured 1.1e-6
    at most (the embeddings, whose gradients are the largest); 3 steps at this learning rate, which
    move the weights by up to 4.7, grow it to 6.6e-4 (sft-untied), 1.3e-6 for the preference and
    online stages: the tolerance is 1e-3. A wrong gradient (a missing average over the ranks, a
    row sent to the wrong rank) moves the weights by the steps' own size, thousands of times more.
    The ranks of the sharded run hold different halves (their local sums differ), so the export
    is a gathering, not one rank's copy; the steps moved the weights, so equality is not trivial."""
    ddp, sharded = exported(runs / "ddp" / stage), exported(runs / "sharded" / stage)
    assert ddp.keys() == sharded.keys()
    for name in ddp:
        tolerance = 0.0 if stage == "reward" else 1e-3
        torch.testing.assert_close(sharded[name], ddp[name], rtol=0.0, atol=tolerance, msg=name)
    local_sums = torch.load(runs / "sharded" / stage / "sums.pt", weights_only=True)
    assert local_sums[0] != local_sums[1]
    if stage.endswith(("lora", "adapter")):  # adapter folders; a merged export is compared as a full model
        assert any(name.endswith("lora_B.weight") and sharded[name].abs().sum() > 0 for name in sharded)
    elif stage != "reward":
        initial = load_causal_lm("plpost:tiny").state_dict()
        assert any(not torch.equal(sharded[name], initial[name]) for name in sharded)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [stage for stage in STAGES if stage != "reward"])
def test_generation_eval_samples_from_the_gathered_weights_of_a_sharded_model(runs, stage):
    """GenerationEval at the end of training, greedy: each rank generates its share of the 3
    prompts (2 and 1) from the full weights gathered once (`sharding.full_parameters`), and every
    rank holds the 3 gathered completions, the DDP run's word for word where the weights agree
    with DDP's to float32 rounding and the steps sample nothing (not the online stages). bf16's
    rounding at lr 0.5 moves its weights by 0.02 from DDP's in one step, and after 3 its greedy
    completions of these prompts mostly end at once (they did before vocabulary sharding too:
    "", "", "+"), so for it only the ranks' agreement is checked."""
    for rank in (0, 1):
        sharded = json.loads((runs / "sharded" / stage / f"generations-{rank}.json").read_text())
        assert len(sharded) == 3 and (any(sharded) or stage in MIXED)
        assert sharded == json.loads((runs / "sharded" / stage / "generations-0.json").read_text())
        if stage not in CLIPPED | MIXED:
            assert sharded == json.loads((runs / "ddp" / stage / f"generations-{rank}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "sft-untied"])
def test_the_units_are_the_decoder_layers_and_a_root_of_the_final_norm(runs, stage):
    """The embeddings and the head are sharded by vocabulary rows (`plpost.sharded_vocabulary`),
    tied or not, so no FSDP2 unit holds them: each decoder layer is a unit, and the root keeps only
    the final norm."""
    units = json.loads((runs / "sharded" / stage / "units.json").read_text())
    layers = [unit for unit in units if unit[0].startswith("model.layers.")]
    assert len(layers) == load_causal_lm("plpost:tiny").config.num_hidden_layers
    assert sorted(map(sorted, units)) == sorted([[""], *layers])


@pytest.mark.slow
def test_embeddings_and_head_stay_sharded_and_compute_what_the_whole_model_computes():
    """One sharded step on 2 processes, each rank on its own tokens and sequence length (16 and 11,
    so each call pads to the longer), the bundled vocabulary's 263 rows split 132 + 131 (so the
    short rank pads its logits). Tied (one table used at both ends, which an FSDP2 unit would
    keep whole from the lookup through the whole backward) and untied, the table is never whole:
    sharded at every point of the step. The logits and the gradients are those of the unsharded
    model: its gradients averaged over the two ranks' tokens, as DDP steps (float32; the only
    difference is the order of the sums, a few float32 rounding steps of the gradients' size).
    A head with a bias stays an FSDP2 unit, gathered only for its own forward and backward, so it
    is sharded while the layers run, and computes the same. Greedy generation with the tables
    gathered once, ranks asking for different lengths, matches the unsharded model's."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run([sys.executable, str(UNITS_SCRIPT), str(port)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    every_rank = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("[")))
    points = ["forward of the first layer", "backward of the last layer", "backward of the first layer",
              "after the backward"]
    for seen in every_rank:
        assert set(seen) == {"tied", "untied", "with a bias"}
        for head, step in seen.items():
            assert step["states"] == [[point, "sharded", "sharded"] for point in points], head
            assert step["logits"] < 1e-5, head
            assert step["gradients"] < 1e-5, head
            assert step["generated"], head


@pytest.mark.slow
def test_bf16_mixed_gathers_bfloat16_weights_and_keeps_float32_shards(runs):
    """precision="bf16-mixed" under ModelParallelStrategy: the layers compute with the bfloat16
    weights FSDP2 gathers (MixedPrecisionPolicy; DDP's autocast computes from float32 weights),
    while the shards the optimizer steps, and so the export, stay float32 and do train.
    (Exports are not compared with DDP's: at this learning rate, three steps amplify bfloat16
    rounding until autocast alone moves the weights about as far from float32 as the steps do.)"""
    assert (runs / "sharded" / "sft-bf16" / "compute-dtype.txt").read_text() == "torch.bfloat16"
    assert (runs / "ddp" / "sft-bf16" / "compute-dtype.txt").read_text() == "torch.float32"
    assert (runs / "sharded" / "sft" / "compute-dtype.txt").read_text() == "torch.float32"
    weights, initial = exported(runs / "sharded" / "sft-bf16"), load_causal_lm("plpost:tiny").state_dict()
    assert {weight.dtype for weight in weights.values()} == {torch.float32}
    assert all(torch.isfinite(weight).all() for weight in weights.values())
    assert any(not torch.equal(weights[name], initial[name]) for name in weights)


@pytest.mark.slow
def test_tensor_parallel_is_refused_with_what_to_use_instead(tmp_path):
    done = run(tmp_path, "tensor-parallel", "sft")
    assert done.returncode != 0
    assert "use ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)" in done.stderr


def fsdp1_trainer(*callbacks):
    """What `check_strategy` reads of a Trainer running Lightning's FSDPStrategy, which refuses to run
    on CPU: the strategy itself, the callbacks and the world size."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    return SimpleNamespace(strategy=FSDPStrategy(), callbacks=list(callbacks), world_size=4)


@pytest.mark.parametrize("samples", [True, False])
def test_fsdp1_is_refused_where_plpost_would_need_whole_weights(samples, tmp_path):
    from plpost.callbacks import GenerationEval, HFExport
    from plpost.sharding import check_strategy

    callbacks = [] if samples else [HFExport(str(tmp_path)), GenerationEval([{"prompt": "1+1="}])]
    with pytest.raises(ValueError) as refusal:
        check_strategy(fsdp1_trainer(*callbacks), samples=samples)
    assert "FSDPStrategy" in str(refusal.value)
    assert "use ModelParallelStrategy(data_parallel_size=4, tensor_parallel_size=1) instead" in str(refusal.value)
    assert ("sampling" in str(refusal.value)) == samples and ("HFExport" in str(refusal.value)) != samples


@pytest.mark.parametrize("stage", ["SFTModule", "RewardModule", "DPOModule", "KTOModule"])
def test_fsdp1_is_left_to_an_offline_stage_until_it_exports(stage, tmp_path):
    """An offline stage under FSDP1 with callbacks that need no whole weights (checkpoints, throughput)
    is Lightning's to run; the same run with an HFExport added is refused, naming the export."""
    import plpost
    from lightning.pytorch.callbacks import ModelCheckpoint

    from plpost.callbacks import HFExport, Throughput
    from plpost.sharding import check_strategy

    samples = getattr(plpost, stage).samples_while_training
    assert check_strategy(fsdp1_trainer(ModelCheckpoint(dirpath=tmp_path), Throughput()), samples=samples) is None
    with pytest.raises(ValueError, match="HFExport"):
        check_strategy(fsdp1_trainer(ModelCheckpoint(dirpath=tmp_path), HFExport(str(tmp_path))), samples=samples)


def test_only_the_sampling_stages_say_they_sample():
    from plpost import DistillationModule, DPOModule, GRPOModule, KTOModule, PPOModule, RewardModule, SFTModule

    assert all(stage.samples_while_training for stage in (PPOModule, GRPOModule, DistillationModule))
    assert not any(stage.samples_while_training for stage in (SFTModule, RewardModule, DPOModule, KTOModule))
