"""A 2-process run killed with SIGKILL and resumed from `last` ends exactly where the uninterrupted
2-process run ends: sharded with FSDP2 (ModelParallelStrategy, data-parallel 2, gloo) with either
checkpoint form, distributed (a folder of per-rank shards, Lightning's default) or full-state (one
file written by rank 0), and under DDP.

Exactly, on each rank: its shards of the weights and of the optimizer moments (sharded) or its whole
copies (DDP), the scheduler and the global step are torch.equal, and the records each rank trained on,
micro-batch by micro-batch, are the same sequence. The runs shuffle, accumulate 2 micro-batches,
cross an epoch boundary and train with attention dropout 0.1 (see test_resume.py, which shows, on
one process, that a checkpoint without the data position or without the generators fails this
comparison); PPO and GRPO sample their completions on every step, from the full weights gathered
on each rank, so each rank's generators must come back; "episodes" is GRPO on multi-turn episodes,
each rank playing its own, ending at different turns. The kill takes both processes at once (its
process group), at the start of step 5, after step 4's checkpoint.

One uninterrupted sharded run serves both checkpoint forms: the form changes how the checkpoint is
written, not what is trained.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from resume_harness import SAMPLES_EPISODES, TINY, differences, save_dropout_model, seen
from torch.distributed.checkpoint import FileSystemReader

from plpost import DPOModule
from plpost.checkpointing import RNG_STATES_KEY, TRAINED_KEYS

SCRIPT = Path(__file__).with_name("resume_harness.py")
KILL_AFTER = 4
FORMS = {  # strategy: the stages resumed under it
    "sharded": ["sft", "dpo", "ppo", "grpo", "episodes"],
    "sharded-full": ["sft", "dpo", "ppo"],
    "ddp": ["sft"],
}
UNINTERRUPTED = {"sharded": "sharded", "sharded-full": "sharded", "ddp": "ddp"}
FROZEN = ("reference.", "reward_scorer.sources.")


PARALLEL = 3
"""Launches run side by side, this many at a time: each is two processes that mostly wait on each other."""


def run_all(launches: list[tuple]) -> list[int]:
    """Runs each `(folder, strategy, model, *stages_and_options)` as a 2-process launch; their exit codes."""
    codes = []
    for start in range(0, len(launches), PARALLEL):
        started = [launch(*arguments) for arguments in launches[start:start + PARALLEL]]
        codes += [finish(process) for process in started]
    return codes


def launch(folder: Path, strategy: str, model: str, *arguments: str) -> subprocess.Popen:
    # In a session of its own: a killed run kills its process group, both ranks, and no more.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(folder), strategy, model, *arguments], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(process: subprocess.Popen) -> int:
    _, errors = process.communicate(timeout=900)
    assert process.returncode in (0, -9), errors[-3000:]
    return process.returncode


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sft_export) -> Path:
    """ROOT/uninterrupted-STRATEGY/STAGE and ROOT/STRATEGY/STAGE (killed after step 4, then resumed in place)."""
    root = tmp_path_factory.mktemp("resume-processes")
    dropout_model = save_dropout_model(root / "tiny-dropout")

    def by_model(stages: list[str]) -> list[tuple[str, list[str]]]:
        """The stages in launches of one model each: multi-turn episodes start from an SFT export."""
        groups = {dropout_model: [s for s in stages if s not in SAMPLES_EPISODES],
                  sft_export: [s for s in stages if s in SAMPLES_EPISODES]}
        return [(model, group) for model, group in groups.items() if group]

    kill = ("--kill-after", str(KILL_AFTER))
    killed = [(root / form, form, model, stage, *kill) for form, stages in FORMS.items()
              for model, group in by_model(stages) for stage in group]
    assert run_all(killed) == [-9] * len(killed)
    for form, stages in FORMS.items():
        for stage in stages:
            assert last_step(root / form / stage / "checkpoints" / "last.ckpt") == KILL_AFTER
    uninterrupted = {kind: sorted({s for form, stages in FORMS.items() if UNINTERRUPTED[form] == kind for s in stages})
                     for kind in set(UNINTERRUPTED.values())}
    rest = [(root / f"uninterrupted-{kind}", kind, model, *group) for kind, stages in uninterrupted.items()
            for model, group in by_model(stages)]
    rest += [(root / form, form, model, *group, "--resume") for form, stages in FORMS.items()
             for model, group in by_model(stages)]
    assert run_all(rest) == [0] * len(rest)
    return root


def last_step(checkpoint: Path) -> int:
    """The step of a checkpoint in either form, and that it holds every rank's generators."""
    state = torch.load(checkpoint / "meta.pt" if checkpoint.is_dir() else checkpoint, weights_only=True)
    assert len(state[RNG_STATES_KEY]) == 2
    return state["global_step"]


def saved_keys(checkpoint: Path) -> list[str]:
    """The model keys a checkpoint holds, read from a distributed checkpoint's metadata or a full-state file."""
    if checkpoint.is_dir():
        keys = FileSystemReader(checkpoint).read_metadata().state_dict_metadata
        return [key.removeprefix("state_dict.") for key in keys if key.startswith("state_dict.")]
    return list(torch.load(checkpoint, weights_only=True)["state_dict"])


def result(folder: Path, rank: int) -> dict:
    return torch.load(folder / f"result-{rank}.pt", weights_only=True)


CASES = [(form, stage) for form, stages in FORMS.items() for stage in stages]


@pytest.mark.slow
@pytest.mark.parametrize(("form", "stage"), CASES, ids=[f"{form}-{stage}" for form, stage in CASES])
def test_killed_and_resumed_processes_end_exactly_as_the_uninterrupted_ones(runs, form, stage):
    expected_folder, resumed_folder = runs / f"uninterrupted-{UNINTERRUPTED[form]}" / stage, runs / form / stage
    for rank in (0, 1):
        expected = result(expected_folder, rank)
        assert expected["global_step"] == 7 and expected["optimizers"][0]["state"]
        assert differences(expected, result(resumed_folder, rank)) == []
        assert seen(resumed_folder, rank) == seen(expected_folder, rank)
    assert seen(expected_folder, 0) != seen(expected_folder, 1)  # each rank trains its own records
    if form.startswith("sharded"):  # each rank holds its own half: the comparison is per shard
        assert differences(result(expected_folder, 0)["weights"], result(expected_folder, 1)["weights"])
    keys = saved_keys(resumed_folder / "checkpoints" / "last.ckpt")
    assert keys and not [key for key in keys if key.startswith(FROZEN)]
    assert (resumed_folder / "checkpoints" / "last.ckpt").is_dir() == (form == "sharded")


def test_a_checkpoint_that_does_not_hold_what_the_module_trains_is_refused_by_name():
    """Sharded loading fills parameters in one by one and skips the frozen ones, so the module
    checks the keys the checkpoint lists itself: its own pass, one missing or one extra fails."""
    module = DPOModule(TINY)
    module.configure_model()
    keys = sorted(module.state_dict())
    assert not [key for key in keys if key.startswith(FROZEN)]
    module.on_load_checkpoint({TRAINED_KEYS: keys})
    with pytest.raises(RuntimeError, match=f"missing \\['{keys[0]}'\\]"):
        module.on_load_checkpoint({TRAINED_KEYS: keys[1:]})
    with pytest.raises(RuntimeError, match="unexpected \\['policy.extra'\\]"):
        module.on_load_checkpoint({TRAINED_KEYS: [*keys, "policy.extra"]})
