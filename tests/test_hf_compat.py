"""plpost.hf_compat: the hub-kernel routing removed where no kernel was put in, and kept where one was.

The compiled-graph consequence (one graph for an activation-checkpointed LoRA model) is asserted in
tests/modules/test_compile.py; these tests pin what the function does to the model itself.
"""

from types import MethodType

import pytest
import torch

from plpost.hf import load_causal_lm
from plpost.hf_compat import enable_activation_checkpointing, without_hub_kernel_routing


def routed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [module for module in model.modules() if module.__dict__.get("_kernel_funcs")]


@pytest.fixture
def model():
    torch.manual_seed(0)
    model = load_causal_lm("plpost:tiny")
    if not routed_layers(model):
        pytest.skip("this transformers release routes no layer through the kernels package")
    return model.eval()


def test_routing_is_removed_and_the_logits_stay_the_same(model):
    """Without a kernel put in, the routing calls the plain rotary function either way: removing it
    changes no number, and every routed layer's forward is then its own class's unwrapped forward."""
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        without_hub_kernel_routing(model)
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    for layer in routed_layers(model):
        assert layer.forward.__func__ is type(layer).forward.__wrapped__


def test_a_layer_whose_kernel_was_replaced_keeps_its_routing(model):
    """`kernels.kernelize` puts a kernel in by binding a new forward on the layer's private function
    module; such a layer must keep the routing that calls it."""
    first, *rest = routed_layers(model)
    function = next(iter(first._kernel_funcs.values()))
    function.forward = MethodType(type(function).forward, function)  # what kernelize does, with the same code
    without_hub_kernel_routing(model)
    assert "forward" not in first.__dict__
    assert all("forward" in layer.__dict__ for layer in rest)


def test_activation_checkpointing_is_enabled_without_a_deprecation_warning(recwarn):
    model = load_causal_lm("plpost:tiny")
    enable_activation_checkpointing(model)
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning) and "checkpointing" in str(w.message)]
    checkpointing = getattr(type(model), "is_activation_checkpointing", None)
    assert (model.is_activation_checkpointing if checkpointing is not None else model.is_gradient_checkpointing)
    ids = torch.tensor([[5, 9, 14, 3]])
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert model.get_input_embeddings().weight.grad is not None
