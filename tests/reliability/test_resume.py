"""A run killed with SIGKILL and resumed from `last` ends exactly where the uninterrupted run ends.

Exactly: weights, optimizer moments, scheduler state and global step are torch.equal, and the
records trained on, micro-batch by micro-batch, are the same sequence (none seen twice, none
skipped). The runs shuffle, accumulate 2 micro-batches per step, cross epoch boundaries, use a
warmup-cosine schedule, and (SFT, reward) train with attention dropout 0.1, so the data position,
the epoch's shuffle and the random generators all have to be restored for the results to agree.
The negative controls remove one of those from the checkpoint and show the same comparison fails.

Adding a stage takes an entry in `resume_harness.STAGES` and in STAGES below. GRPO samples its own
completions every step, so its resumed run must also draw the same samples: the random generators
and the data position decide them (and, for distillation, which steps sample at all). "episodes" is
GRPO on multi-turn episodes (a wrong answer is told so and answered again): every turn's samples
decide what the next turn sees.
"""

import multiprocessing
import shutil
import signal
from pathlib import Path

import pytest
import torch
from resume_harness import SAMPLES_EPISODES, Run, differences, save_dropout_model, seen, train, train_with_threads

from plpost.checkpointing import RNG_STATES_KEY

STAGES = ["sft", "reward", "dpo", "grpo", "distill", "kto", "episodes"]
KILL_AFTER = 4  # one step into the second epoch (3 steps per epoch)


def killed(run: Run) -> int:
    """Runs `run` in a spawned child process and returns its exit code.

    Spawned, not forked: a fork of a process whose OpenMP thread pool is running crashes
    (SIGSEGV) as soon as the child computes with more than one thread."""
    child = multiprocessing.get_context("spawn").Process(target=train_with_threads, args=(run, torch.get_num_threads()))
    child.start()
    child.join(timeout=300)
    return child.exitcode


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory) -> str:
    return save_dropout_model(tmp_path_factory.mktemp("tiny-dropout"))


@pytest.fixture(scope="module")
def model_of(dropout_model, sft_export):
    """The model a stage trains: the dropout model, or for multi-turn episodes an SFT export."""
    return lambda stage: sft_export if stage in SAMPLES_EPISODES else dropout_model


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_of):
    """Per stage, computed once: the uninterrupted run's final state and records, and the folder
    of a run killed after KILL_AFTER steps (copy it before resuming: resuming writes into it)."""
    cache = {}

    def get(stage: str) -> tuple[dict, list[dict], Path]:
        if stage not in cache:
            root = tmp_path_factory.mktemp(stage)
            expected = train(Run(stage, root / "uninterrupted", model=model_of(stage)))
            folder = root / "killed"
            assert killed(Run(stage, folder, model=model_of(stage), kill_after_step=KILL_AFTER)) == -signal.SIGKILL
            cache[stage] = expected, seen(root / "uninterrupted"), folder
        return cache[stage]

    return get


def resume(killed_folder: Path, into: Path, stage: str, model: str) -> dict:
    shutil.copytree(killed_folder, into)
    return train(Run(stage, into, model=model, resume=True))


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_killed_and_resumed_run_ends_exactly_as_the_uninterrupted_run(stage, runs, model_of, tmp_path):
    expected, expected_seen, killed_folder = runs(stage)
    batches_per_step = 1 if stage in ("grpo", "distill", "episodes") else 2  # these accumulate inside their step
    assert expected["global_step"] == 7 and len(expected_seen) == 7 * batches_per_step
    assert expected["optimizers"][0]["state"] and expected["schedulers"]  # moments and a schedule to compare
    assert len(seen(killed_folder)) == batches_per_step * KILL_AFTER  # it did die where it should
    resumed = resume(killed_folder, tmp_path / "resumed", stage, model_of(stage))
    assert differences(expected, resumed) == []
    assert seen(tmp_path / "resumed") == expected_seen


@pytest.mark.slow
def test_a_run_killed_at_the_end_of_an_epoch_resumes_with_the_next_one(runs, dropout_model, tmp_path):
    """Killed after step 3, the last of epoch 0: its checkpoint says all of epoch 0 was trained,
    so the resumed run starts epoch 1 from its first record, in epoch 1's order."""
    expected, expected_seen, _ = runs("sft")
    folder = tmp_path / "run"
    assert killed(Run("sft", folder, model=dropout_model, kill_after_step=3)) == -signal.SIGKILL
    resumed = train(Run("sft", folder, model=dropout_model, resume=True))
    assert differences(expected, resumed) == []
    assert seen(folder) == expected_seen


def strip(checkpoint: Path, key: str) -> None:
    state = torch.load(checkpoint, weights_only=True)
    assert key in state
    del state[key]
    torch.save(state, checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("removed", "records_differ"), [("ChatDataModule", True), (RNG_STATES_KEY, False)],
    ids=["without-data-position", "without-random-generators"],
)
def test_the_comparison_fails_when_the_checkpoint_lacks_what_resuming_needs(
    removed, records_differ, runs, dropout_model, tmp_path
):
    """Negative controls. Without the data position the resumed run starts its epoch again and
    trains on records twice; without the generators its dropout masks differ. Either way the
    same comparison as above reports differences, so its silence above means something."""
    expected, expected_seen, killed_folder = runs("sft")
    into = tmp_path / "resumed"
    shutil.copytree(killed_folder, into)
    strip(into / "checkpoints" / "last.ckpt", removed)
    resumed = train(Run("sft", into, model=dropout_model, resume=True))
    assert differences(expected, resumed)  # weights and moments differ
    assert (seen(into) != expected_seen) == records_differ
    assert differences(expected["global_step"], resumed["global_step"]) == []


@pytest.mark.slow
def test_kill_while_writing_last_checkpoint_leaves_the_previous_one_and_resumes_exactly(
    runs, dropout_model, tmp_path
):
    """Killed halfway through writing last.ckpt at step 5: the half-written file is the temporary
    one, last.ckpt still holds step 4, and resuming from it ends as the uninterrupted run."""
    expected, expected_seen, _ = runs("sft")
    folder = tmp_path / "run"
    assert killed(Run("sft", folder, model=dropout_model, kill_while_saving_step=5)) == -signal.SIGKILL
    checkpoints = folder / "checkpoints"
    assert list(checkpoints.glob(".last.ckpt.*.tmp"))  # the kill did land inside the write
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 4
    resumed = train(Run("sft", folder, model=dropout_model, resume=True))
    assert differences(expected, resumed) == []
    lines = seen(folder)  # the killed run trained steps 0-4, the resumed one 4-6 again: step 4's save was lost
    assert lines[:10] == expected_seen[:10] and lines[10:] == expected_seen[8:]
    assert not list(checkpoints.glob(".last.ckpt.*.tmp"))  # the next save cleaned it up
