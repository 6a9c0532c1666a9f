"""Precomputed reference log-probs ("precomputed", offline stages): for a fixed dataset (DPO's
pairs, KTO's examples), the reference's log-probs of every example are computed once before
training, cached on disk (`cache_key`), and looked up by example index; the reference model is
loaded only for that pass, then freed (see `plpost.frozen` for the other references).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

CACHE_FORMAT = 1
"""Bump when what is cached changes meaning, so old cache files are never read as new ones."""


def cache_key(reference: dict[str, Any], examples: Sequence[dict], **settings: Any) -> str:
    """sha256 (hex) of the reference's fingerprint, the tokenized examples themselves (in order),
    and any other `settings` that change the numbers (tokenizer, dtype, precision)."""
    digest = hashlib.sha256()
    header = {"format": CACHE_FORMAT, "reference": reference, "settings": settings, "count": len(examples)}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for example in examples:
        digest.update(json.dumps(example, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def precompute_logps(
    jobs: dict[str, tuple[Path, Sequence[dict]]],
    load_model: Callable[[], nn.Module],
    logps_of: Callable[[nn.Module, Any], tuple[Tensor, Tensor]],
    *,
    collate: Callable[[list[tuple[dict, None]]], Any],
    columns: int,
    batch_size: int,
    trainer: L.Trainer,
) -> dict[str, Tensor]:
    """Per-example reference values of each split, read from its cache file or computed and saved.

    jobs: split -> (cache file, examples). The model is loaded with `load_model()` only when some
    split is not cached, used for all such splits, then freed. Examples are collated
    `batch_size` at a time, in order; `logps_of(model, batch)` returns the batch's example
    indices (n,) and their values (n, columns) (for DPO: pair_index, and the reference's chosen
    and rejected log-probs). Returns split -> (max index + 1, columns) float32 table on the CPU,
    NaN where no example has that index.

    Several devices: the batches (not the examples) are dealt out rank::world, every rank
    computes its share and the shares are all-gathered. Each example is then computed in exactly
    the batch it would be in on one device (same padding, same neighbours), so the table equals
    the single-device one, and the pass takes 1/world of the time. Rank 0 computing alone while
    the others wait would be simpler, but wastes the other devices and can outlast the
    collective timeout on large datasets. Whether a cache file is read is decided by all ranks
    together, so a rank that cannot see it (node-local disk) never leaves the others waiting in
    a collective.
    """
    strategy = trainer.strategy
    tables: dict[str, Tensor] = {}
    for split, (path, _) in jobs.items():
        if strategy.reduce_boolean_decision(path.is_file(), all=True):
            tables[split] = torch.load(path, map_location="cpu", weights_only=True)["table"]
    missing = [split for split in jobs if split not in tables]
    if not missing:
        return tables
    model = load_model()
    for split in missing:
        path, examples = jobs[split]
        tables[split] = _compute_table(model, examples, logps_of, collate, columns, batch_size, trainer)
        if trainer.local_rank == 0:  # one writer per node; identical contents if several share a disk
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
            torch.save({"table": tables[split]}, partial)
            os.replace(partial, path)  # readers never see a half-written file
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return tables


def _compute_table(model, examples, logps_of, collate, columns, batch_size, trainer) -> Tensor:
    strategy = trainer.strategy
    batches = [examples[start : start + batch_size] for start in range(0, len(examples), batch_size)]
    indices, values = [], []
    for chunk in batches[trainer.global_rank :: trainer.world_size]:
        index, value = logps_of(model, collate([(example, None) for example in chunk]))
        indices.append(index.detach().long().cpu())
        values.append(value.detach().float().cpu())
    # Every rank contributes the same number of rows (padded with index -1), as all_gather needs.
    rows = math.ceil(len(batches) / trainer.world_size) * batch_size
    local_index = torch.full((rows,), -1, dtype=torch.long)
    local_value = torch.zeros(rows, columns)
    if indices:
        index, value = torch.cat(indices), torch.cat(values)
        local_index[: len(index)], local_value[: len(index)] = index, value
    device = strategy.root_device
    all_index = strategy.all_gather(local_index.to(device)).reshape(-1).cpu()
    all_value = strategy.all_gather(local_value.to(device)).reshape(-1, columns).cpu()
    keep = all_index >= 0
    if int(keep.sum()) != len(examples) or all_index[keep].unique().numel() != len(examples):
        raise ValueError("every example needs its own index, but the indices of this split repeat")
    table = torch.full((int(all_index.max()) + 1, columns), math.nan)
    table[all_index[keep]] = all_value[keep]
    return table


def lookup(table: Tensor, index: Tensor) -> Tensor:
    """Rows `index` (n,) of a `precompute_logps` table: (n, columns), on `index`'s device (keep the
    table there: moving it is then a no-op).

    Raises KeyError for an index that was not precomputed (the data changed after the pass),
    checked here because an out-of-range index on a GPU is a device-side assert, not an error.
    """
    table = table.to(index.device)
    inside = index < table.shape[0]
    rows = table[torch.where(inside, index, torch.zeros_like(index))]
    missing = ~inside | torch.isnan(rows).any(-1)
    if missing.any():
        raise KeyError(f"no precomputed reference log-probs for example index {index[missing][:5].tolist()}: "
                       "was the data changed after they were computed?")
    return rows
