"""Input embeddings and output head sharded by vocabulary rows, so their whole table never exists
while a sharded model trains.

As FSDP2 units, the embeddings and the head are gathered whole for their forward and backward, and
a tied table (Qwen2.5 up to 3B, Llama 3.2) is one unit used at both ends of the model, so
FSDP2 keeps it whole from the lookup to the head and again through the whole backward, beside its
whole gradient: on Qwen2.5-0.5B that is 28% of the parameters, twice over, on every rank. Here each
rank keeps only its rows of the table, and the tokens travel instead of the table:

- the lookup gathers every rank's token ids, looks up the ones in its rows and sums the rows back
  to the ranks that asked (`reduce_scatter`): tokens x hidden numbers each way, no table;
- the head gathers every rank's hidden states, computes the logits of its vocabulary rows for all
  of them, and exchanges them (`all_to_all`) so that each rank gets the whole vocabulary's logits
  for its own tokens; the backward sends the logits' gradients the same way back.

Each rank's gradient of its rows is then complete (it saw every rank's tokens), so it needs no
reduction. The cost: per forward, one logits-sized exchange instead of gathering the table, and
per call a count of tokens agreed first (ranks may pad to different lengths). Every rank runs each
forward, as under FSDP2. For `generate`, whose ranks stop at different steps,
`gather_whole_tables` keeps a whole copy for the duration, as FSDP2's units are kept gathered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def shard_vocabulary(model: nn.Module, mesh: Any, compute_dtype: torch.dtype | None) -> list[nn.Parameter]:
    """Replaces `model`'s input embeddings and head by vocabulary-sharded ones, where they are the
    plain `nn.Embedding` and bias-free `nn.Linear` of most language models (a tied pair stays one
    parameter); returns the parameters now sharded, for FSDP2 to leave alone. Returns [] and
    changes nothing for any other kind (Gemma's scaled embedding, a head with a bias, a LoRA-wrapped
    head), which stays an FSDP2 unit, and on a mesh of one process, which shards nothing."""
    if mesh.size() == 1 or not vocabulary_shardable(model):
        return []
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    table = _sharded_parameter(embeddings.weight, mesh)
    replacements = {embeddings: VocabShardedEmbedding(table, mesh, compute_dtype, embeddings.padding_idx)}
    if head is not None:
        head_table = table if head.weight is embeddings.weight else _sharded_parameter(head.weight, mesh)
        replacements[head] = VocabShardedHead(head_table, mesh, compute_dtype)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child in replacements:
                setattr(parent, name, replacements[child])
    return list({id(module.weight): module.weight for module in replacements.values()}.values())


def vocabulary_shardable(model: nn.Module) -> bool:
    """Whether `model`'s input embeddings are a plain lookup (`nn.Embedding` itself, without
    `max_norm`, `scale_grad_by_freq` or sparse gradients) and its head, if it has one, a bias-free
    `nn.Linear` itself: what `VocabShardedEmbedding` and `VocabShardedHead` compute. A subclass may
    compute more (Gemma scales its embeddings) and is left to FSDP2."""
    if not hasattr(model, "get_input_embeddings"):
        return False
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(embeddings) is not nn.Embedding or embeddings.max_norm is not None or embeddings.scale_grad_by_freq \
            or embeddings.sparse:
        return False
    return head is None or (type(head) is nn.Linear and head.bias is None)


def _sharded_parameter(weight: nn.Parameter, mesh: Any) -> nn.Parameter:
    """`weight`'s rows for this rank (`Shard(0)`, FSDP2's own layout), taken without communication:
    every rank holds the same weights here, or none (the meta device) until they are filled."""
    from torch.distributed.tensor import Shard, distribute_tensor

    source = weight.detach()
    if not source.is_meta and mesh.device_type != "cpu":
        source = source.to(torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device()))
    return nn.Parameter(distribute_tensor(source, mesh, [Shard(0)], src_data_rank=None),
                        requires_grad=weight.requires_grad)


class _VocabSharded(nn.Module):
    """The rows of a `num_rows x width` table this rank holds, and where they start.

    The gradient of a rank's rows sums the losses of every rank's tokens, where FSDP2 and DDP
    average the ranks' gradients: so it is divided by the number of ranks, on the tokens' side of
    each product (a few rows per token), not on the table's."""

    def __init__(self, weight: nn.Parameter, mesh: Any, compute_dtype: torch.dtype | None):
        super().__init__()
        self.weight = weight
        self.compute_dtype = compute_dtype
        self.whole: torch.Tensor | None = None
        self.group = mesh.get_group()
        self.world = dist.get_world_size(self.group)
        self.rows_per_rank = -(-weight.shape[0] // self.world)
        self.first_row = dist.get_rank(self.group) * self.rows_per_rank

    def table(self) -> torch.Tensor:
        """This rank's rows, in the compute dtype (bf16-mixed gathers nothing here, so they are cast
        as FSDP2 casts what it gathers)."""
        rows = self.weight.to_local()
        return rows if self.compute_dtype is None else rows.to(self.compute_dtype)

    def agreed_count(self, count: int, device: torch.device) -> int:
        """The largest count of tokens any rank passes to this call: each rank pads to it."""
        most = torch.tensor([count], device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=self.group)
        return int(most.item())


class VocabShardedEmbedding(_VocabSharded):
    """`nn.Embedding`'s lookup from this rank's rows of the table."""

    def __init__(self, weight: nn.Parameter, mesh: Any, compute_dtype: torch.dtype | None, padding_idx: int | None):
        super().__init__(weight, mesh, compute_dtype)
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = weight.shape

    @torch.compiler.disable
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.whole is not None:
            return F.embedding(ids, self.whole, self.padding_idx)
        rows = self.table()
        flat = ids.reshape(-1)
        count = self.agreed_count(flat.shape[0], ids.device)
        local = _all_gather(_padded(flat, count), self.group) - self.first_row
        inside = (local >= 0) & (local < rows.shape[0])
        padding = None
        if self.padding_idx is not None and 0 <= self.padding_idx - self.first_row < rows.shape[0]:
            padding = self.padding_idx - self.first_row
        found = _ScaledGradient.apply(F.embedding(torch.where(inside, local, 0), rows, padding), 1 / self.world)
        mine = _Collective.apply(found * inside.unsqueeze(-1).to(found.dtype), self.group,
                                 _sum_scatter, _all_gather)
        return mine[:flat.shape[0]].reshape(*ids.shape, rows.shape[1])


class VocabShardedHead(_VocabSharded):
    """A bias-free `nn.Linear` head from this rank's rows: the whole vocabulary's logits for this
    rank's tokens."""

    def __init__(self, weight: nn.Parameter, mesh: Any, compute_dtype: torch.dtype | None):
        super().__init__(weight, mesh, compute_dtype)
        self.out_features, self.in_features = weight.shape

    @torch.compiler.disable
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.whole is not None:
            return F.linear(hidden, self.whole)
        rows = self.table()
        flat = hidden.reshape(-1, hidden.shape[-1])
        tokens = flat.shape[0]
        count = self.agreed_count(tokens, hidden.device)
        every_rank_hidden = _Collective.apply(_padded(flat, count), self.group, _all_gather, _sum_scatter)
        my_rows_logits = _ProductWithRows.apply(every_rank_hidden, rows, 1 / self.world)
        if rows.shape[0] < self.rows_per_rank:  # the last rank's rows, when the vocabulary does not divide
            my_rows_logits = F.pad(my_rows_logits, (0, self.rows_per_rank - rows.shape[0]))
        # Block i of what arrives is rank i's rows of the vocabulary for this rank's tokens.
        arrived = _Collective.apply(my_rows_logits, self.group, _exchange, _exchange)
        del my_rows_logits  # the buffer sent, as large as the logits
        blocks = arrived.view(self.world, count, self.rows_per_rank)
        if tokens < count:
            blocks = blocks[:, :tokens]
        # One copy, into a tensor of its own (not a view: FSDP2 warns that changing a view the root
        # unit returns in place would skip its backward hook).
        logits = blocks.transpose(0, 1).reshape(*hidden.shape[:-1], self.world * self.rows_per_rank)
        return logits if logits.shape[-1] == self.out_features else logits[..., :self.out_features].contiguous()


def gather_whole_tables(model: nn.Module) -> None:
    """Each vocabulary-sharded table of `model` gathered whole once (a tied one once for both ends),
    in the compute dtype, for the forwards of `generate`; a collective, every rank calls it."""
    gathered: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, _VocabSharded):
            if id(module.weight) not in gathered:
                whole = module.weight.detach().full_tensor()
                gathered[id(module.weight)] = whole if module.compute_dtype is None else whole.to(module.compute_dtype)
            module.whole = gathered[id(module.weight)]


def drop_whole_tables(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, _VocabSharded):
            module.whole = None


# torch 2.13 renamed these two; the old names still work there, with a warning.
_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_into = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Every rank's `tensor` stacked along the first dimension, rank order."""
    out = tensor.new_empty((dist.get_world_size(group) * tensor.shape[0], *tensor.shape[1:]))
    _gather_into(out, tensor.contiguous(), group=group)
    return out


def _sum_scatter(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Block r of the first dimension, summed over the ranks, to rank r."""
    out = tensor.new_empty((tensor.shape[0] // dist.get_world_size(group), *tensor.shape[1:]))
    _reduce_scatter_into(out, tensor.contiguous(), group=group)
    return out


class _ScaledGradient(torch.autograd.Function):
    """The identity, its gradient multiplied by `scale`."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def _padded(rows: torch.Tensor, count: int) -> torch.Tensor:
    """`rows` with zero rows appended up to `count`."""
    if rows.shape[0] == count:
        return rows
    return torch.cat([rows, rows.new_zeros((count - rows.shape[0], *rows.shape[1:]))])


class _ProductWithRows(torch.autograd.Function):
    """`hidden @ rows.T`, the gradient it sends to `rows` multiplied by `scale`."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(hidden, rows)
        ctx.scale = scale
        return hidden @ rows.T

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        hidden, rows = ctx.saved_tensors
        grad_hidden = grad @ rows if ctx.needs_input_grad[0] else None
        grad_rows = grad.T @ (hidden * ctx.scale) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_rows, None


class _Collective(torch.autograd.Function):
    """`forward_op(tensor, group)`, whose gradient is `backward_op(grad, group)`: gathering every
    rank's rows and summing blocks to their owners are each other's transposes, and an exchange is
    its own (block r went to rank r, so block r of the gradient goes back to it)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Any, forward_op: Callable, backward_op: Callable) -> torch.Tensor:
        ctx.group, ctx.backward_op = group, backward_op
        return forward_op(tensor, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return ctx.backward_op(grad, ctx.group), None, None, None


def _exchange(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Block r of the first dimension to rank r; block i of the result from rank i."""
    out = torch.empty_like(tensor)
    dist.all_to_all_single(out, tensor.contiguous(), group=group)
    return out
