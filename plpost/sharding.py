"""Sharded training: FSDP2 (`fully_shard`) under Lightning's `ModelParallelStrategy`, and a refusal,
before any model loads, of every strategy or setting that plpost cannot run correctly.

The supported form is data-parallel sharding: `ModelParallelStrategy(data_parallel_size=N,
tensor_parallel_size=1)`. Each trained model (policy, critic) and each frozen copy (a DPO or PPO
reference) is sharded over the data-parallel mesh: one FSDP unit per decoder layer, then the root,
and the embeddings and head sharded by vocabulary rows, never gathered while training
(`plpost.sharded_vocabulary`); sharding a frozen model costs nothing but an all-gather per unit at
each forward and keeps its memory divided like the policy's. Only rank 0 builds these models
whole; every other rank builds them on the meta device and receives its shards from rank 0
(`shard_from_rank0`). Reward models scored from Python (`RewardScorer` sources) are not modules of
the stage: each rank keeps its own whole copy (replicated). A `precomputed` DPO or
KTO reference is loaded whole on each rank for its one pass before training (each rank computes
its share of the batches; see `plpost.modules.precomputed.precompute_logps`), then freed: the peak
is one unsharded model per rank at the start of fit, and none during training.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch import nn

from plpost.reward_head import SCORE_HEAD
from plpost.sharded_vocabulary import drop_whole_tables, gather_whole_tables, shard_vocabulary

TENSOR_PARALLEL_REFUSAL = (
    "plpost shards over data-parallel processes only: use ModelParallelStrategy(data_parallel_size={world}, "
    "tensor_parallel_size=1) (its default tensor_parallel_size='auto' takes every device for tensor parallelism), "
    "or strategy=ddp"
)


GATHER_REFUSAL = (
    "{strategy} keeps each rank's share of the weights only, and plpost gathers whole weights (here for {needs}) "
    "from FSDP2 alone: use ModelParallelStrategy(data_parallel_size={world}, "
    "tensor_parallel_size=1) instead"
)


def check_strategy(trainer: L.Trainer, *, samples: bool) -> None:
    """Refuses, with what to use instead, a strategy whose result plpost cannot vouch for.

    `samples`: the stage generates while it trains (PPO, GRPO, distillation). Generating, like
    `GenerationEval` and `HFExport`, needs whole weights, which plpost gathers from FSDP2 units
    only: Lightning's FSDPStrategy (FSDP1) and DeepSpeed's stage 3 partition the parameters in
    ways plpost does not unshard, so a run that needs them is refused rather than left to sample
    from, or export, one rank's share. A callback says it needs them with a true
    `needs_full_weights` attribute. (Lightning's FSDPStrategy refuses CPU itself.)"""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    if isinstance(strategy, ModelParallelStrategy) and strategy.device_mesh["tensor_parallel"].size() != 1:
        raise ValueError(TENSOR_PARALLEL_REFUSAL.format(world=trainer.world_size))
    partitioned = isinstance(strategy, FSDPStrategy) or getattr(strategy, "zero_stage_3", False)
    if not partitioned:
        return
    needs = ["the stage's own sampling"] if samples else []
    needs += sorted({type(callback).__name__ for callback in trainer.callbacks
                     if getattr(callback, "needs_full_weights", False)})
    if needs:
        raise ValueError(GATHER_REFUSAL.format(strategy=type(strategy).__name__, needs=" and ".join(needs),
                                               world=trainer.world_size))


def data_parallel_mesh(module: L.LightningModule) -> Any | None:
    """The data-parallel device mesh to shard over, or None when the strategy does not shard
    through `configure_model` (single device, DDP, Lightning's own FSDP wrapping)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = module._trainer
    if trainer is None or not isinstance(trainer.strategy, ModelParallelStrategy):
        return None
    return module.device_mesh["data_parallel"]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The blocks transformers keeps whole when it splits a model (`_no_split_modules`): the decoder
    layers, each one FSDP unit, so only one layer's full weights exist at a time."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def mixed_precision_policy(trainer: L.Trainer) -> Any | None:
    """FSDP2's mixed precision for the trainer's `precision`: ModelParallelStrategy runs
    "bf16-mixed" as autocast alone, which would gather and reduce float32 weights and gradients;
    with this policy each unit gathers its weights in bfloat16 for the forward and backward (half
    the memory and traffic) and reduces gradients in float32 into the float32 shards the
    optimizer steps. Any other precision: None (float32, or weights converted whole by "-true")."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if trainer.precision != "bf16-mixed":
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard(model: nn.Module, mesh: Any, mp_policy: Any | None = None) -> nn.Module:
    """`model` sharded in place with FSDP2 over `mesh`: each decoder layer is a unit, then the root
    (the final norm and, for LoRA, the adapters outside the layers). The embeddings and the head,
    tied or not, are sharded by vocabulary rows (`plpost.sharded_vocabulary`), outside every unit:
    a root unit stays whole from the forward to the end of the backward, and a unit of a tied table
    stays whole from the lookup to the end of the backward, beside its whole gradient. Embeddings
    or a head of another kind (`shard_vocabulary` says which) are units of their own instead.

    A sequence classifier (reward model, critic) is read as backbone and score head, each called
    on its own (`plpost.reward_head`), never through the root's forward, whose hook is what gathers
    a root unit: so the backbone and the head are the last two units there, and the root holds no
    parameter. A model sharded already is left as it is. `mp_policy`: see `mixed_precision_policy`.
    """
    from functools import partial

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if any(is_sharded(m) for m in model.modules()):
        return model
    unit = partial(fully_shard, mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy())
    for layer in decoder_layers(model):
        unit(layer)
    classifier = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(classifier, SCORE_HEAD, None)
    if head is not None and classifier.base_model is not classifier:
        unit(classifier.base_model)
        unit(head)
    else:
        vocabulary_sharded = set(shard_vocabulary(model, mesh, mp_policy.param_dtype if mp_policy else None))
        if not vocabulary_sharded:
            for embedding_unit in embedding_units(model):
                unit(embedding_unit)
        unit(model, ignored_params=vocabulary_sharded)
    return model


def embedding_units(model: nn.Module) -> list[nn.Module | list[nn.Module]]:
    """A language model's input embeddings and head as FSDP units, where they cannot be sharded by
    vocabulary rows: two, or one when they are tied (one tensor cannot be in two units, so it
    stays whole from the lookup to the head); none for a module without them (a PPO value head)."""
    if not hasattr(model, "get_input_embeddings"):
        return []
    embeddings, output = model.get_input_embeddings(), model.get_output_embeddings()
    if output is None:
        return [embeddings]
    return [[embeddings, output]] if output.weight is embeddings.weight else [embeddings, output]


def shard_from_rank0(model: nn.Module, mesh: Any, device: torch.device, mp_policy: Any | None = None) -> nn.Module:
    """`model` sharded (see `shard`) and filled with rank 0's weights: rank 0 built it whole (read
    from its checkpoint, LoRA and new heads initialised), every other rank on the meta device
    (`load_causal_lm(empty=True)`), so only rank 0 ever holds a whole copy, and only until its
    weights are sent. Each tensor is broadcast in turn and each rank keeps its shard of it
    (`set_model_state_dict(broadcast_from_rank0=True)`); buffers outside the state dict (rotary
    frequencies) are broadcast as they are. A collective: every rank calls it. A model sharded
    already is left as it is."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(is_sharded(m) for m in model.modules()):
        return model
    whole = model.state_dict() if dist.get_rank() == 0 else {}
    shard(model, mesh, mp_policy)
    if dist.get_rank() == 0:
        model.to(device)
    else:
        model.to_empty(device=device)
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del whole
    persistent = model.state_dict().keys()
    for name, buffer in model.named_buffers():
        if name not in persistent:
            dist.broadcast(buffer, src=0)
    return model


def check_all_sharded(module: nn.Module) -> None:
    """Every trainable parameter of `module` is sharded: one outside every FSDP unit would get no
    gradient reduction, and the ranks would drift apart without an error."""
    from torch.distributed.tensor import DTensor

    loose = [name for name, p in module.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if loose:
        raise RuntimeError(f"{type(module).__name__} left trainable parameters out of its sharded modules "
                           f"({', '.join(loose[:3])}): list their module in `sharded_modules()`")


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded state dict of `model` on CPU, gathered from every rank; a collective:
    every rank calls it, and only rank 0 receives the tensors (the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextmanager
def full_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with every FSDP unit's full parameters and every vocabulary-sharded table gathered,
    for the many small forwards of `generate` (without it each forward gathers every layer again,
    and ranks that stop sampling early would leave the others waiting in a collective). Resharded
    on exit. Every rank enters."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    gather_whole_tables(model)
    try:
        yield model
    finally:
        drop_whole_tables(model)
        for unit in units:
            unit.set_reshard_after_forward(True, recurse=False)
            unit.reshard()
