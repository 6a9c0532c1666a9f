"""`plpost export` turns the last.ckpt of a run killed with SIGKILL into a loadable folder."""

import multiprocessing
import signal

import torch
from resume_harness import Run, train_with_threads
from transformers import AutoModelForCausalLM

from plpost.cli import main


def test_a_killed_runs_last_checkpoint_exports_its_weights(tmp_path):
    """A run SIGKILLed after 3 optimizer steps leaves last.ckpt and no folder; the export reloads
    with exactly the checkpoint's policy weights."""
    run = Run("sft", tmp_path / "killed", kill_after_step=3)
    child = multiprocessing.get_context("spawn").Process(target=train_with_threads, args=(run, torch.get_num_threads()))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    checkpoint = run.folder / "checkpoints" / "last.ckpt"
    main(["export", str(checkpoint), str(tmp_path / "model"), "--quiet"])
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["global_step"] == 3
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    for name, value in reloaded.items():
        torch.testing.assert_close(value, saved["state_dict"][f"policy.{name}"], rtol=0, atol=0)
