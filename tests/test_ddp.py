"""DDP with two CPU processes trains, and takes the same step as one process on the same data."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plpost.hf import load_causal_lm

SCRIPT = Path(__file__).with_name("ddp_one_step.py")


def one_step(tmp_path: Path, devices: int) -> dict[str, torch.Tensor]:
    out = tmp_path / f"weights-{devices}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(SCRIPT), str(out), str(devices)], check=True, env=env, timeout=300)
    return torch.load(out, weights_only=True)


@pytest.mark.slow
def test_two_process_ddp_step_equals_single_process_step(tmp_path):
    """Each rank sees 4 of the 8 chats; the loss of each is divided by the loss tokens of all 8,
    and DDP averages the two ranks' gradients, which loss_scale undoes, so one SGD step must land
    on the same weights as one process with all 8 chats in one batch."""
    single = one_step(tmp_path, 1)
    double = one_step(tmp_path, 2)
    initial = load_causal_lm("plpost:tiny").state_dict()
    assert any(not torch.equal(single[name], initial[name]) for name in single)  # the step did move
    assert single.keys() == double.keys()
    for name in single:
        torch.testing.assert_close(double[name], single[name], rtol=1e-4, atol=1e-5, msg=name)
