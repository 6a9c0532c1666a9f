"""Reference strategies: a frozen copy, the policy with its adapter disabled, precomputed log-probs."""

import builtins
import json
import math
import os
import threading

import lightning as L
import pytest
import torch
from conftest import TINY

from plpost.assets import resolve_pretrained
from plpost.data.preference import PreferenceDataModule
from plpost.frozen import FrozenCopy, adapter_disabled, model_fingerprint
from plpost.hf import load_causal_lm
from plpost.modules import ModelSettings, LoraSettings
from plpost.modules.base import PostTrainingModule
from plpost.modules.precomputed import cache_key, lookup, precompute_logps
from plpost.modules.preference_logps import pair_logps

IDS = torch.tensor([[5, 9, 12, 7, 30, 31]])


def varied_pairs(count: int = 10) -> list[dict]:
    """Bundled pairs with prompts of different lengths, so batches are padded differently."""
    with open(resolve_pretrained("plpost:data/addition/preference.jsonl")) as lines:
        rows = [json.loads(next(lines)) for _ in range(count)]
    for i, row in enumerate(rows):
        row["prompt"][0]["content"] += " please" * (i % 4)
    return rows


def logits(model) -> torch.Tensor:
    return model(input_ids=IDS).logits


def test_frozen_copy_stays_in_eval_mode_and_gives_no_gradients():
    frozen = FrozenCopy(load_causal_lm(TINY), source=TINY)
    holder = torch.nn.ModuleDict({"reference": frozen})
    holder.train()  # as Lightning does to the whole LightningModule
    assert not any(module.training for module in frozen.modules())
    assert not any(p.requires_grad for p in frozen.parameters())
    out = logits(frozen)
    assert out.grad_fn is None
    assert frozen.source == TINY


def lora_policy():
    module = PostTrainingModule(TINY, model_settings=ModelSettings(lora=LoraSettings(r=4, alpha=8, dropout=0.0)))
    return module.prepare_trainable(module.load_pretrained())


def test_adapter_disabled_is_the_base_model_and_restores_the_adapter():
    """With the LoRA B matrices made non-zero, the policy differs from its base; inside the
    context it equals the base model exactly, and after it differs again (adapter back on)."""
    policy = lora_policy()
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    base = load_causal_lm(TINY).eval()
    policy.train()
    adapted = logits(policy).detach()
    assert not torch.allclose(adapted, logits(base))
    with adapter_disabled(policy) as reference:
        assert reference is policy  # no copy
        assert not any(module.training for module in policy.modules())
        out = logits(reference)
        assert out.grad_fn is None
        torch.testing.assert_close(out, logits(base))
    assert all(module.training for module in policy.modules())
    torch.testing.assert_close(logits(policy).detach(), adapted)


def test_adapter_disabled_restores_modes_after_an_error():
    policy = lora_policy().train()
    with pytest.raises(RuntimeError), adapter_disabled(policy):
        raise RuntimeError("boom")
    assert all(module.training for module in policy.modules())


def test_adapter_disabled_refuses_a_model_without_adapters():
    with pytest.raises(TypeError, match="needs LoRA"), adapter_disabled(load_causal_lm(TINY)):
        pass


def test_fingerprint_changes_when_the_weights_are_rewritten(tmp_path):
    load_causal_lm(TINY).save_pretrained(tmp_path)
    before = model_fingerprint(str(tmp_path))
    assert model_fingerprint(str(tmp_path)) == before
    weights = tmp_path / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
    assert model_fingerprint(str(tmp_path)) != before


def test_cache_key_depends_on_reference_examples_and_settings():
    examples = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4], "pair_index": 0}]
    key = cache_key({"path": "a"}, examples, tokenizer="t")
    assert key == cache_key({"path": "a"}, [dict(e) for e in examples], tokenizer="t")
    assert key != cache_key({"path": "b"}, examples, tokenizer="t")
    assert key != cache_key({"path": "a"}, [{**examples[0], "chosen_ids": [5]}], tokenizer="t")
    assert key != cache_key({"path": "a"}, examples, tokenizer="u")


def single_device_trainer() -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)


def fake_logps(model, batch):
    """Index and (index + 0.5, -index) for examples that are just their index."""
    index = torch.tensor(batch)
    return index, torch.stack([index + 0.5, -index.float()], dim=-1)


def test_precompute_computes_missing_splits_once_then_reads_the_cache(tmp_path):
    """Indices 0, 2, 5 give a table of 6 rows with NaN in rows 1, 3, 4; the model is loaded once
    for both splits on the first call and never on the second."""
    loads = []

    def load_model():
        loads.append(1)
        return "model"

    jobs = {"train": (tmp_path / "train.pt", [0, 2, 5]), "val": (tmp_path / "val.pt", [1])}
    run = lambda: precompute_logps(  # noqa: E731
        jobs, load_model, fake_logps, collate=lambda items: [e for e, _ in items], columns=2, batch_size=2,
        trainer=single_device_trainer(),
    )
    first = run()
    assert len(loads) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.pt", "val.pt"]  # no .partial left over
    table = first["train"]
    assert table.shape == (6, 2)
    torch.testing.assert_close(table[[0, 2, 5]], torch.tensor([[0.5, 0.0], [2.5, -2.0], [5.5, -5.0]]))
    assert torch.isnan(table[[1, 3, 4]]).all()
    second = run()
    assert len(loads) == 1
    for split in jobs:
        torch.testing.assert_close(second[split], first[split], equal_nan=True)


def test_lookup_returns_rows_and_refuses_unknown_indices():
    table = torch.tensor([[0.5, 0.0], [math.nan, math.nan], [2.5, -2.0]])
    torch.testing.assert_close(lookup(table, torch.tensor([2, 0])), torch.tensor([[2.5, -2.0], [0.5, 0.0]]))
    with pytest.raises(KeyError, match=r"\[1\]"):
        lookup(table, torch.tensor([0, 1]))
    with pytest.raises(KeyError, match=r"\[7\]"):
        lookup(table, torch.tensor([7]))


class ThreadRank:
    """Trainer and strategy of one rank of a world simulated by threads: all_gather and
    reduce_boolean_decision exchange values through a shared board, as the collectives would."""

    def __init__(self, rank: int, world_size: int, board: dict, barrier: threading.Barrier) -> None:
        self.global_rank, self.local_rank, self.world_size = rank, rank, world_size
        self.root_device = torch.device("cpu")
        self.board, self.barrier, self.calls = board, barrier, 0
        self.strategy = self

    def exchange(self, value):
        self.calls += 1
        self.board[(self.calls, self.global_rank)] = value
        self.barrier.wait()
        return [self.board[(self.calls, rank)] for rank in range(self.world_size)]

    def all_gather(self, tensor):
        return torch.stack(self.exchange(tensor))

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return builtins.all(self.exchange(decision))


def test_two_ranks_compute_the_same_table_as_one(tmp_path):
    """10 pairs in batches of 3 (3, 3, 3, 1): rank 0 computes batches 0 and 2, rank 1 batches 1
    and 3, and the gathered table equals the single-device one exactly, because every pair is
    computed in the same batch (same padding) either way. Only rank 0 writes the cache file."""
    data = PreferenceDataModule(TINY, train=varied_pairs(), shuffle=False)
    data.setup("fit")
    model = load_causal_lm(TINY).eval()

    computed = []

    def logps_of(model, batch):
        computed.append(batch.pair_index.tolist())
        with torch.no_grad():
            logps = pair_logps(model, batch)
        return batch.pair_index, torch.stack(logps, dim=-1)

    def table(trainer, path):
        jobs = {"train": (path, data.train_examples)}
        return precompute_logps(jobs, lambda: model, logps_of, collate=data.collate_fn(), columns=2, batch_size=3,
                                trainer=trainer)["train"]

    single = table(single_device_trainer(), tmp_path / "single.pt")
    computed.clear()
    board, barrier, results = {}, threading.Barrier(2), {}
    ranks = [ThreadRank(rank, 2, board, barrier) for rank in range(2)]
    threads = [threading.Thread(target=lambda r=r: results.update({r.global_rank: table(r, tmp_path / "two.pt")}))
               for r in ranks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(len(batch) for batch in computed) == [1, 3, 3, 3]  # each batch once, on one rank
    assert sorted(path.name for path in tmp_path.iterdir()) == ["single.pt", "two.pt"]
    assert single.shape == (10, 2) and not torch.isnan(single).any()
    for rank in range(2):
        assert torch.equal(results[rank], single)
    assert torch.equal(torch.load(tmp_path / "two.pt")["table"], single)
