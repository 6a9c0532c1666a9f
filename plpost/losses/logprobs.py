"""Per-token log-probabilities and entropies from language-model logits, computed in chunks.

Conventions: `labels` are Hugging Face style, aligned with input_ids, with -100 where a position is
not supervised. `targets` are next-token targets: targets[:, t] is the token that logits[:, t]
predicts, so logits and targets have the same length T and nobody slices `logits[:, :-1]`
(a slice of a (B, T, V) tensor is not contiguous and would be copied whole).

Why chunks, and why a hand-written backward: a model in bf16/fp16 returns (B, T, V) logits in that
dtype, and the softmax must be taken in float32 to be accurate. `logits.float().log_softmax(-1)`
materialises a float32 copy of all B*T*V logits (8 GiB for 8 x 4096 tokens and a 64k vocabulary),
and autograd would then keep it (or the log-softmax output) alive until backward. Here the rows of
the flattened (B*T, V) logits are upcast `chunk_size` rows at a time; forward keeps only the
(B*T,) log-normaliser, and backward recomputes each chunk's softmax in float32 and writes the
gradient straight into a tensor of the logits' own dtype. Peak extra memory is one float32 chunk
(chunk_size x V) instead of the whole batch. Neither torch nor transformers offers this op.
float32 (or float64) logits need no upcast: at temperature 1, forward takes torch's fused
log_softmax of each chunk and backward writes each chunk's fused softmax straight into the gradient.
Measured on an H100, bf16 logits of 8192 tokens x 128256 vocab, forward + backward: 3.9 GiB beyond
the logits (their bf16 gradient included) against 11.7 GiB for `log_softmax(logits.float())`, at
27.5 ms against 18 ms (the extra passes over each chunk; small next to the model's own step).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from plpost.losses.masked import masked_sum

__all__ = ["next_token_targets", "token_logprobs", "token_entropy", "sequence_logprobs"]


def next_token_targets(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Targets for next-token prediction from HF-style labels.

    labels: (B, T) token ids, `ignore_index` where a position is not supervised.
    Returns (B, T): targets[:, t] = labels[:, t + 1], and `ignore_index` at t = T - 1 (nothing
    follows the last position), so targets[:, t] is what logits[:, t] predicts.
    """
    pad = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16/fp16/fp32 logits, float64 for float64 logits."""
    return torch.promote_types(dtype, torch.float32)


def _check(logits: Tensor, temperature: float, chunk_size: int) -> None:
    if logits.dim() < 2:
        raise ValueError(f"logits must have a vocabulary dimension last, got shape {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _upcast(chunk: Tensor, dtype: torch.dtype, temperature: float, out: Tensor | None = None) -> Tensor:
    """`chunk / temperature` in `dtype`, written to `out` (default: a fresh buffer): the one
    (chunk_size, V) buffer that the caller then works on in place, never the logits themselves."""
    if out is None:
        out = torch.empty(chunk.shape, dtype=dtype, device=chunk.device)
    if chunk.dtype == dtype and temperature != 1.0:
        return torch.div(chunk, temperature, out=out)  # one pass; not a copy, then a division
    # Upcast first: dividing bf16 would round the quotient to bf16.
    out.copy_(chunk)
    return out if temperature == 1.0 else out.div_(temperature)


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(x / temperature)[target] over rows of (N, V) logits; see the module docstring.

    Logits already in the compute dtype, at temperature 1, need no working copy: forward gathers
    from torch's fused log_softmax of each chunk, and backward writes the fused softmax straight
    into the gradient. Otherwise (bf16/fp16 logits, or a temperature) each chunk is upcast and/or
    divided into one buffer, worked on in place: a fresh one, or in backward the gradient's own
    rows when the logits are in the compute dtype. Either way, forward and backward each hold at
    most one float32 chunk at a time."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, valid: Tensor, temperature: float, chunk_size: int):
        n = logits.shape[0]
        dtype = _compute_dtype(logits.dtype)
        fused = logits.dtype == dtype and temperature == 1.0
        out = torch.empty(n, dtype=dtype, device=logits.device)
        lse = None if fused else torch.empty(n, dtype=dtype, device=logits.device)
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            if fused:
                out[rows] = torch.log_softmax(logits[rows], dim=-1).gather(-1, targets[rows, None]).squeeze(-1)
            else:
                x = _upcast(logits[rows], dtype, temperature)
                picked = x.gather(-1, targets[rows, None]).squeeze(-1)
                # logsumexp, in place: max-shifted so that exp() cannot overflow for huge logits.
                top = x.amax(dim=-1, keepdim=True)
                top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # an all -inf row
                lse[rows] = x.sub_(top).exp_().sum(dim=-1).log_().add_(top.squeeze(-1))
                out[rows] = picked - lse[rows]
                del x  # free this chunk before the next is allocated: one chunk alive, not two
        ctx.save_for_backward(logits, targets, valid, lse)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return torch.where(valid, out, torch.zeros((), dtype=dtype, device=out.device))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, targets, valid, lse = ctx.saved_tensors
        # d logp_t / d x_j = (1[j == t] - p_j) / temperature, with x = logits (not yet divided).
        zero = torch.zeros((), dtype=grad_out.dtype, device=grad_out.device)
        g = torch.where(valid, grad_out, zero) / ctx.temperature
        grad = torch.empty_like(logits)
        same_dtype = logits.dtype == _compute_dtype(logits.dtype)  # then p is built in grad itself
        for start in range(0, logits.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            if lse is None:
                p = torch.softmax(logits[rows], dim=-1, out=grad[rows])
            else:
                into = grad[rows] if same_dtype else None  # None: a fresh float32 chunk
                p = _upcast(logits[rows], lse.dtype, ctx.temperature, out=into).sub_(lse[rows, None]).exp_()
            p.mul_(-g[rows, None]).scatter_add_(-1, targets[rows, None], g[rows, None])  # g (onehot - p)
            if not same_dtype:
                grad[rows] = p
            del p  # as in forward: one chunk alive, not two
        return grad, None, None, None, None


def _log_softmax_(x: Tensor) -> tuple[Tensor, Tensor]:
    """Overwrite x with log softmax(x) (-inf clamped to the dtype's lowest finite value, so that
    p * log p is 0, not NaN, where p == 0); return it and p = softmax(x), a second buffer."""
    top = x.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    x.sub_(top)
    p = x.exp()
    total = p.sum(dim=-1, keepdim=True)
    p.div_(total)
    x.sub_(total.log_()).clamp_min_(torch.finfo(x.dtype).min)
    return x, p


class _TokenEntropy(torch.autograd.Function):
    """Entropy of softmax(x / temperature) over rows of (N, V) logits; see the module docstring.
    Two float32 chunk buffers at a time (log p and p)."""

    @staticmethod
    def forward(ctx, logits: Tensor, temperature: float, chunk_size: int):
        n = logits.shape[0]
        dtype = _compute_dtype(logits.dtype)
        out = torch.empty(n, dtype=dtype, device=logits.device)
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            logp, p = _log_softmax_(_upcast(logits[rows], dtype, temperature))
            # -sum p log p, not logsumexp - sum p x: the latter cancels catastrophically when
            # |logits| is large.
            out[rows] = p.mul_(logp).sum(dim=-1).neg_()
            del logp, p
        ctx.save_for_backward(logits, out)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, entropy = ctx.saved_tensors
        grad = torch.empty_like(logits)
        # dH / d x_j = -p_j (log p_j + H) / temperature (0 where p_j == 0).
        for start in range(0, logits.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            logp, p = _log_softmax_(_upcast(logits[rows], entropy.dtype, ctx.temperature))
            p.mul_(logp.add_(entropy[rows, None])).mul_(grad_out[rows, None] / -ctx.temperature)
            grad[rows] = p
            del logp, p
        return grad, None, None


def token_logprobs(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int = 4096,
) -> Tensor:
    """Log-probability of each target token: log softmax(logits / temperature)[target].

    logits: (B, T, V), any float dtype; targets: (B, T) next-token ids (see `next_token_targets`),
    `ignore_index` where nothing is predicted.
    Returns (B, T) in float32 (float64 when the logits are float64); exactly 0.0 where
    target == ignore_index. Differentiable in `logits`.
    Computed `chunk_size` rows of the flattened (B*T, V) logits at a time, each chunk upcast to
    float32 on its own, so bf16/fp16 logits are never copied whole to float32 (see the module
    docstring). The result does not depend on `chunk_size`.
    """
    _check(logits, temperature, chunk_size)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets {tuple(targets.shape)} must match logits {tuple(logits.shape)} without the vocab dim"
        )
    vocab = logits.shape[-1]
    flat_targets = targets.reshape(-1)
    valid = flat_targets != ignore_index
    safe = torch.where(valid, flat_targets, torch.zeros_like(flat_targets))
    out = _TokenLogprobs.apply(logits.reshape(-1, vocab), safe, valid, float(temperature), int(chunk_size))
    return out.view(targets.shape)


def token_entropy(
    logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int = 4096,
) -> Tensor:
    """Entropy (nats) of the next-token distribution softmax(logits / temperature) at each position.

    logits: (B, T, V), any float dtype; mask: optional (B, T) 0/1, output is 0 where it is 0.
    Returns (B, T) in float32 (float64 for float64 logits); differentiable in `logits`.
    Chunked over the flattened (B*T, V) rows exactly as `token_logprobs`.
    """
    _check(logits, temperature, chunk_size)
    vocab = logits.shape[-1]
    out = _TokenEntropy.apply(logits.reshape(-1, vocab), float(temperature), int(chunk_size))
    out = out.view(logits.shape[:-1])
    if mask is not None:
        out = torch.where(mask.to(torch.bool), out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def sequence_logprobs(token_logps: Tensor, mask: Tensor) -> Tensor:
    """Log-probability of each sequence: the SUM of its unmasked token log-probs.

    token_logps, mask: (B, T); mask is 0/1 (bool or float), 1 on completion tokens.
    Returns (B,). Summed, not averaged, because DPO's log pi(y|x) is the sum over completion tokens
    (divide by the length yourself for length-normalised variants such as IPO or SimPO).
    """
    return masked_sum(token_logps, mask, dim=-1)
