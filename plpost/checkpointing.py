"""Checkpoints that survive a kill mid-write, and resumed runs that draw the same random numbers.

`AtomicCheckpointIO` is on by default for plpost's stage modules (they install it in `setup`
when the strategy would write with Lightning's plain `TorchCheckpointIO`). Any other
LightningModule gets it with ``L.Trainer(plugins=[AtomicCheckpointIO()])``.

Lightning's checkpoints do not hold the random generators, so a resumed run would draw other
dropout masks (and PPO other samples) than the uninterrupted run. `rng_states_of_all_ranks`
collects every rank's generators for the checkpoint; the stage modules put them back at
`on_train_start`, right before the first batch after the resume (see `PostTrainingModule`).

A stage's checkpoint also says what it holds: the stage class (`STAGE_KEY`, so `plpost export` and
`plpost chat` rebuild it), the keys it saved (`TRAINED_KEYS`: all but the frozen models', checked
on load by `check_saved_keys`) and where each frozen model comes from (`FROZEN_SOURCES_KEY`).
"""

from __future__ import annotations

import random
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO


RNG_STATES_KEY = "plpost_rng_states"
STAGE_KEY = "plpost_stage"
"""Checkpoint entry naming the stage class (`module.Class`)."""
TRAINED_KEYS = "plpost_trained_keys"
"""Checkpoint entry listing the state-dict keys saved (all but the frozen models')."""
FROZEN_SOURCES_KEY = "plpost_frozen_sources"
"""Checkpoint entry recording each frozen model's source in place of its weights."""


# -- what a checkpoint holds ------------------------------------------------------------------
def check_keys_match(missing: list[str], unexpected: list[str]) -> None:
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def check_saved_keys(expected: set[str], saved: list[str] | None) -> None:
    """A checkpoint that lists its keys (`TRAINED_KEYS`) holds exactly `expected`: what
    `load_state_dict` checks where Lightning calls it, and sharded loading (which fills in
    parameters one by one) does not."""
    if saved is not None:
        check_keys_match(sorted(expected - set(saved)), sorted(set(saved) - expected))


def is_under(key: str, prefixes: tuple[str, ...]) -> bool:
    """Whether state-dict `key` belongs to one of the submodules named by `prefixes`."""
    return any(key.startswith(f"{prefix}.") for prefix in prefixes)


def rng_state() -> dict[str, Any]:
    """The global generators that sampling (and reward code) draws from, in a form that
    `torch.load(weights_only=True)` reads back: tensors, ints and strings only."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside its target, fsyncs it, then renames it
    over the target, so a crash or kill during a save leaves the previous file (e.g. `last.ckpt`)
    whole and loadable.

    Lightning's `TorchCheckpointIO` serialises to memory first but then truncates the target and
    writes it in place: a kill during that write leaves a truncated file. A rename within one
    folder is atomic (POSIX and Windows). Remote (fsspec) paths are left to `TorchCheckpointIO`,
    since object stores replace an object whole.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_atomically(Path(path), lambda handle: torch.save(checkpoint, handle))


def write_atomically(target: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Runs `write` on a temporary file in target's folder and renames it to `target` once it
    is complete and on disk. On any failure the temporary file is removed and `target` is as
    it was; a process killed mid-write leaves only the temporary file, removed by the next save."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        stale.unlink(missing_ok=True)  # left by a process killed while saving; only one rank writes a path
    handle = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, target)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    if os.name == "posix":  # the rename itself reaches the disk only with the folder's entry
        folder = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def use_atomic_checkpoints(trainer: L.Trainer) -> None:
    """Makes `trainer` write checkpoints with AtomicCheckpointIO where it would use plain
    TorchCheckpointIO; any other CheckpointIO (async, XLA, a user's own) is left alone."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


# -- random generators ------------------------------------------------------------------------
def rng_states_of_all_ranks() -> list[dict[str, Any]]:
    """Every rank's `rng_state()`, indexed by rank; a collective, so call it on all ranks (as
    Lightning does with checkpoint hooks: saving a checkpoint is collective)."""
    state = rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states
