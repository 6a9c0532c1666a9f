"""2 CPU processes, DDP and FSDP2, where one rank's data takes another path than the other's: every
collective is still entered by both ranks, so the runs finish (a hang fails the test in minutes)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("uneven_run.py")
CASES = ["grpo-dynamic", "sft", "dpo", "kto", "grpo", "ppo", "distill"]
HANG_AFTER_S = 240
"""Each process prints where it waits and exits after this long (a run takes about 2 minutes)."""


def run(out: Path, strategy: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PLPOST_HANG_AFTER_S": str(HANG_AFTER_S)}
    # A process group of its own, so a timeout kills the process Lightning launched as well.
    process = subprocess.Popen([sys.executable, str(SCRIPT), str(out), strategy, *CASES], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=HANG_AFTER_S + 60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
    assert process.returncode == 0, stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "sharded"])
def test_ranks_that_take_different_paths_still_meet_in_every_collective(tmp_path, strategy):
    """grpo-dynamic: rank 0's prompts always score alike, rank 1's never do; rank 0 samples its 2
    groups of each of its 2 batches twice more (8 groups) while rank 1 samples none again, but joins
    each round's gathering of the sharded weights. The other stages: 7 rows over 2 ranks and batches
    of 2, two epochs, so the last batch is short. GenerationEval: 3 prompts (2 and 1 per rank) and
    1 (none on rank 1), alone and as a TryAgain episode; every rank ends with all the completions
    (and the episode's conversation), the same on both."""
    run(tmp_path, strategy)
    for case in CASES:
        done = [json.loads((tmp_path / case / f"done-{rank}.json").read_text()) for rank in (0, 1)]
        assert done[0]["three"] == done[1]["three"] and len(done[0]["three"]) == 3
        assert done[0]["one"] == done[1]["one"] and len(done[0]["one"]) == 1
        assert done[0]["episodes"] == done[1]["episodes"] and len(done[0]["episodes"]) == 1
    resampled = [json.loads((tmp_path / "grpo-dynamic" / f"done-{rank}.json").read_text())["resampled"] for rank in (0, 1)]
    assert resampled == [8, 0]
