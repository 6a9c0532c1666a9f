"""Which embeddings and heads `plpost.sharded_vocabulary` shards by vocabulary rows: only those whose
computation it reproduces (what it computes, on 2 processes, is in tests/test_fsdp.py)."""

import torch
from torch import nn

from plpost.hf import load_causal_lm
from plpost.sharded_vocabulary import vocabulary_shardable


class ScaledEmbedding(nn.Embedding):
    """As Gemma's: the lookup times a constant, which a plain lookup would leave out."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 2.0


def test_a_plain_lookup_and_a_bias_free_head_are_sharded_tied_or_not():
    model = load_causal_lm("plpost:tiny")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert vocabulary_shardable(model)
    model.lm_head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    assert vocabulary_shardable(model)


def test_a_lookup_or_head_that_computes_more_is_left_to_fsdp2():
    base = load_causal_lm("plpost:tiny")
    hidden, vocab = base.config.hidden_size, base.config.vocab_size
    changes = {
        "a head with a bias": lambda m: setattr(m, "lm_head", nn.Linear(hidden, vocab, bias=True)),
        "a scaled embedding": lambda m: setattr(m.model, "embed_tokens", ScaledEmbedding(vocab, hidden)),
        "max_norm": lambda m: setattr(m.model.embed_tokens, "max_norm", 1.0),
        "scale_grad_by_freq": lambda m: setattr(m.model.embed_tokens, "scale_grad_by_freq", True),
        "sparse gradients": lambda m: setattr(m.model.embed_tokens, "sparse", True),
    }
    for name, change in changes.items():
        model = load_causal_lm("plpost:tiny")
        change(model)
        assert not vocabulary_shardable(model), name


def test_lora_on_the_head_is_left_to_fsdp2_and_lora_elsewhere_is_not():
    from peft import LoraConfig, get_peft_model

    on_layers = get_peft_model(load_causal_lm("plpost:tiny"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert vocabulary_shardable(on_layers)
    on_head = get_peft_model(load_causal_lm("plpost:tiny"), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert not vocabulary_shardable(on_head)


def test_a_module_without_embeddings_is_not_sharded():
    assert not vocabulary_shardable(nn.Linear(4, 4))
