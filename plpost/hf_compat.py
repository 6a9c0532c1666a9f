"""Where plpost meets transformers internals that change between releases: the hub-kernel routing that
breaks compiled graphs, and the renamed activation-checkpointing switch (see `PostTrainingModule`)."""

from __future__ import annotations

from types import MethodType

import torch


def without_hub_kernel_routing(model: torch.nn.Module) -> torch.nn.Module:
    """Removes, in place, the per-call routing that the `kernels` package wraps around the forward of
    layers that transformers marks `use_kernelized_func` (attention's rotary embedding), where no hub
    kernel was put in: the routing then calls the plain torch function anyway.

    Why: transformers >= 5.25 requires `kernels`, whose wrapper writes a module-level variable at each
    forward. Inside a compiled, activation-checkpointed layer that write is a side effect that
    torch.compile refuses (its checkpoint operator would have to replay it in the backward), so it
    breaks the graph and runs the model eagerly in pieces. A layer whose kernel function was replaced
    (`kernels.kernelize`) keeps its routing: that kernel is what the user asked for.
    """
    for module in model.modules():
        kernel_functions = module.__dict__.get("_kernel_funcs")
        if not kernel_functions or any("forward" in function.__dict__ for function in kernel_functions.values()):
            continue
        plain_forward = getattr(type(module).forward, "__wrapped__", None)
        if plain_forward is not None:
            module.forward = MethodType(plain_forward, module)
    return model


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing on every decoder layer of a transformers model, by the
    method's new name where transformers has it (5.25 renamed `gradient_checkpointing_enable`, which
    now warns of its removal) and by the old one before."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
