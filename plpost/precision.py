"""The dtype each model's weights load in, from the Trainer's `precision` as Lightning means it.

`*-mixed` (and `32-true`): the weights the optimizer steps, their gradients and its state are
float32, whatever dtype the checkpoint is stored in (the bfloat16 of Qwen, Llama or Gemma
checkpoints is upcast, exactly); only the computation runs in bfloat16 or float16 (autocast, or
FSDP2's gathered copies). At learning rates of 1e-6 to 1e-5 most AdamW updates of a weight near
0.02 are smaller than bfloat16's rounding step there (about 8e-5), so bfloat16 master weights
would lose them without a word. Frozen models (a reference, a teacher) take the compute dtype:
they are never stepped, so nothing is lost, and they cost half the memory.

`bf16-true` / `16-true`: every weight is bfloat16 / float16, trained ones included, by choice.
"""

from __future__ import annotations

from plpost.hf import DTYPES

TRAINED_DTYPES = {"32-true": "float32", "32": "float32", "bf16-mixed": "float32", "16-mixed": "float32",
                  "bf16-true": "bfloat16", "16-true": "float16"}
"""Precision -> dtype of trained weights, gradients and optimizer state."""
COMPUTE_DTYPES = {**TRAINED_DTYPES, "bf16-mixed": "bfloat16", "16-mixed": "float16"}
"""Precision -> dtype the forward computes in, which frozen models are kept in."""


def weights_dtype(precision: str | None, requested: str | None, *, frozen: bool = False) -> str | None:
    """The dtype name a model loads in: the one `precision` implies (`frozen`: the compute
    dtype), else `requested` (the module's `dtype`), else None (as stored). Without a Trainer
    (`precision` None: an export, a chat) the request or the stored dtype is kept."""
    implied = (COMPUTE_DTYPES if frozen else TRAINED_DTYPES).get(str(precision))
    return implied or requested


def check_dtype_fits(requested: str | None, precision: str) -> None:
    """Raises ValueError when the module's explicit `dtype` contradicts the Trainer's precision."""
    implied = TRAINED_DTYPES.get(str(precision))
    if requested is None or implied is None or requested == implied:
        return
    if implied == "float32":
        fix = f"remove dtype (or set float32), or choose precision: {'bf16' if requested == 'bfloat16' else '16'}-true"
    else:
        fix = f"remove dtype (or set {implied}), or choose precision: bf16-mixed"
    raise ValueError(f"dtype: {requested} contradicts precision: {precision}, which trains {implied} weights "
                     f"and optimizer state: {fix}")


def stored_dtype(name_or_path: str, *, trust_remote_code: bool = False) -> str | None:
    """The dtype name the checkpoint's config says its weights are stored in (None if it says none
    plpost knows), read without loading them."""
    from transformers import AutoConfig

    from plpost.assets import resolve_pretrained

    config = AutoConfig.from_pretrained(resolve_pretrained(name_or_path), trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else None
    return name if name in DTYPES else None

