"""torch_compile: each stage's compiled forwards give eager's losses and first-step gradients on
batches of different lengths with one graph per model and mode (shapes are dynamic), parameter
names stay eager's, and PPO compiles its scoring and updates but samples eagerly.

Compiling the tiny model takes 5-30 s per graph on a CPU (less when inductor's on-disk cache
already holds it), so all but the SFT check are marked slow.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import replace
from functools import partial

import lightning as L
import pytest
import torch
from conftest import TINY, GradientCapture, cli_parameters
from torch._dynamo.utils import counters

import plpost.modules.online as online_module
import plpost.modules.ppo as ppo_module
from plpost import ChatDataModule, SFTModule
from plpost.data.preference import PreferenceDataModule
from plpost.data.prompts import PromptDataModule
from plpost.modules import ModelSettings, LoraSettings
from plpost.modules.base import PostTrainingModule
from plpost.modules.dpo import DPOModule
from plpost.modules.ppo import PPOModule
from plpost.modules.reward import RewardModule, backbone_and_head
from plpost.rewards import RewardFunction

STAGES = [SFTModule, RewardModule, DPOModule, PPOModule]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts without compiled code and graph counts, and leaves none behind."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def sgd_lr0(params):
    return torch.optim.SGD(params, lr=0.0)


def chats(count: int = 8) -> list[dict]:
    """Answers of 1 to 8 digits, a second turn on odd rows: micro-batches of 4 differ in length."""
    rows = []
    for i in range(count):
        turns = [f"{i}+{i}", "7" * (i + 1)] + (["again", "12345"] if i % 2 else [])
        rows.append({"messages": [{"role": "user" if j % 2 == 0 else "assistant", "content": t}
                                  for j, t in enumerate(turns)]})
    return rows


def pairs(count: int = 4) -> list[dict]:
    """Preference pairs whose prompts and answers grow with i: micro-batches of 2 differ in length."""
    return [
        {
            "prompt": [{"role": "user", "content": f"{i}+{i * 7}" + " please" * i}],
            "chosen": [{"role": "assistant", "content": "7" * (i + 1)}],
            "rejected": [{"role": "assistant", "content": "3" * (2 * count - i)}],
        }
        for i in range(count)
    ]


class Record(L.Callback):
    """The loss and the input width of each micro-batch."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.widths: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if outputs:  # empty under manual optimization (PPO)
            self.losses.append(float(outputs["loss"]))
        self.widths.append(batch.input_ids.shape[1])


def configured(module: PostTrainingModule) -> PostTrainingModule:
    """`module` with its models built from the same random draws whatever came before (the reward
    head starts random), so that hooks can be put on them before `fit`."""
    L.seed_everything(0)
    module.configure_model()
    return module


def first_step(module: L.LightningModule, data: L.LightningDataModule, accumulate: int = 2):
    """(micro-batch losses, widths, gradients) of one optimizer step over `accumulate` micro-batches."""
    L.seed_everything(0)
    record, capture = Record(), GradientCapture()
    trainer = L.Trainer(
        max_steps=1, accumulate_grad_batches=accumulate, callbacks=[record, capture], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, data)
    return record.losses, record.widths, capture.gradients


def assert_close_gradient(actual, expected, name) -> None:
    """Compiled kernels sum in another order: equal up to float32 rounding of the tensor's scale."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()),
                               msg=lambda message: f"{name}: {message}")


def assert_same_step(eager, compiled) -> None:
    """The same micro-batch losses and step gradients, up to float32 rounding (not bit for bit)."""
    (eager_losses, eager_widths, eager_grads), (losses, widths, grads) = eager, compiled
    assert widths == eager_widths and len(set(widths)) == len(widths) > 1, widths  # different lengths
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-5, atol=1e-6)
    assert grads.keys() == eager_grads.keys() and grads
    for name, grad in eager_grads.items():
        assert_close_gradient(grads[name], grad, name)
    assert any(grad.abs().max() > 0 for grad in grads.values())


@contextmanager
def eager_calls(*modules: torch.nn.Module, phase: list[str] | None = None):
    """Yields a list that receives `phase[0]` each time one of `modules` runs eagerly.

    Inside a compiled graph the hook is traced with `is_compiling()` true, so it records nothing:
    an empty list means every call ran compiled.
    """
    calls: list[str] = []
    phase = phase if phase is not None else ["step"]

    def hook(module, args, output):
        if not torch.compiler.is_compiling():
            calls.append(phase[0])

    handles = [module.register_forward_hook(hook) for module in modules]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


# -- the argument -------------------------------------------------------------------------
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.__name__)
def test_every_stage_takes_torch_compile_in_its_model_settings(stage):
    """torch_compile is a `ModelSettings` field, which every stage takes as `model_settings`."""
    parameter = next(p for p in cli_parameters(stage) if p.name == "model_settings")
    assert parameter.default == ModelSettings() and parameter.kind is inspect.Parameter.KEYWORD_ONLY
    assert parameter.default.torch_compile is False and "torch_compile:" in ModelSettings.__doc__
    assert parameter.doc


def test_without_torch_compile_nothing_is_compiled():
    module = SFTModule(TINY)
    module.configure_model()
    assert module.policy._compiled_call_impl is None
    assert not any(m._compiled_call_impl is not None for m in module.modules())


def test_configure_model_again_compiles_nothing_twice():
    """Each fit/validate calls configure_model; the compiled forward is set once and kept."""
    module = DPOModule(TINY, model_settings=ModelSettings(torch_compile=True))
    module.configure_model()
    compiled = [module.policy._compiled_call_impl, module.reference.model._compiled_call_impl]
    assert all(c is not None for c in compiled)
    module.configure_model()
    assert [module.policy._compiled_call_impl, module.reference.model._compiled_call_impl] == compiled
    assert module.reference._compiled_call_impl is None  # the wrapper's forward only adds no_grad


# -- SFT ----------------------------------------------------------------------------------
def test_sft_compiled_step_matches_eager_on_two_lengths_with_one_graph():
    data = partial(ChatDataModule, TINY, train=chats(), batch_size=4, shuffle=False)
    eager_module = configured(SFTModule(TINY, optimizer=sgd_lr0))
    eager = first_step(eager_module, data())
    module = configured(SFTModule(TINY, optimizer=sgd_lr0, model_settings=ModelSettings(torch_compile=True)))
    with eager_calls(module.policy.lm_head) as calls:
        compiled = first_step(module, data())
    assert_same_step(eager, compiled)
    assert calls == []  # the forward ran compiled ...
    assert graphs() == 1  # ... as one dynamic graph for both lengths: no recompile
    # In place: no `_orig_mod.` prefix, so checkpoints, resumption and exports are unchanged.
    assert module.state_dict().keys() == eager_module.state_dict().keys()
    assert module.export_model() is module.policy


@pytest.mark.slow
def test_sft_compiled_after_lora_with_checkpointing_and_packing_matches_eager():
    """LoRA wraps the model before the compile, so the adapters are inside the graph; checkpointing
    stays in it too (without the embedding hook that transformers and peft add, which only
    reentrant checkpointing needs); packed rows (one per batch, no attention mask) change width
    too. Dropout is off: compiled code draws its dropout masks from other random streams."""
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    data = partial(ChatDataModule, TINY, train=chats(), batch_size=4, shuffle=False, packing=True)
    settings = ModelSettings(lora=lora, gradient_checkpointing=True)
    eager_module = configured(SFTModule(TINY, model_settings=settings, optimizer=sgd_lr0))
    eager = first_step(eager_module, data())
    module = configured(SFTModule(TINY, model_settings=replace(settings, torch_compile=True), optimizer=sgd_lr0))
    with eager_calls(module.policy.get_base_model().lm_head) as calls:
        compiled = first_step(module, data())
    assert_same_step(eager, compiled)
    assert all("lora_" in name for name in compiled[2])
    assert calls == [] and graphs() == 1  # no embedding hook sends the forward back to eager
    assert module.state_dict().keys() == eager_module.state_dict().keys()


# -- reward model -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared-prompt", "padded"])
def test_reward_compiles_the_backbone_that_rewards_call(share_prompt):
    """Rewards call the backbone directly, so that is what is compiled (with the shared-prompt
    layout's custom 4D mask, too); the model's own forward is never called, and is left alone."""
    data = partial(PreferenceDataModule, TINY, train=pairs(), batch_size=2, shuffle=False)
    eager_module = configured(RewardModule(TINY, share_prompt=share_prompt, optimizer=sgd_lr0))
    eager = first_step(eager_module, data())
    module = configured(RewardModule(TINY, share_prompt=share_prompt, optimizer=sgd_lr0, model_settings=ModelSettings(torch_compile=True)))
    backbone = backbone_and_head(module.policy)[0].base_model
    assert backbone._compiled_call_impl is not None and module.policy._compiled_call_impl is None
    with eager_calls(backbone.norm) as calls:
        compiled = first_step(module, data())
    assert_same_step(eager, compiled)
    assert calls == [] and graphs() == 1
    assert module.state_dict().keys() == eager_module.state_dict().keys()


# -- DPO ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_dpo_compiles_policy_and_reference_copy():
    """The policy (shared-prompt 4D mask) and the frozen copy run compiled: one graph each, with
    and without gradients, for both lengths."""
    data = partial(PreferenceDataModule, TINY, train=pairs(), batch_size=2, shuffle=False)
    eager_module = configured(DPOModule(TINY, optimizer=sgd_lr0))
    eager = first_step(eager_module, data())
    module = configured(DPOModule(TINY, optimizer=sgd_lr0, model_settings=ModelSettings(torch_compile=True)))
    with eager_calls(module.policy.lm_head, module.reference.model.lm_head) as calls:
        compiled = first_step(module, data())
    assert_same_step(eager, compiled)
    assert calls == [] and graphs() == 2
    assert module.state_dict().keys() == eager_module.state_dict().keys()


@pytest.mark.slow
def test_dpo_adapter_reference_runs_the_compiled_policy_with_its_adapter_off():
    """reference="adapter" calls the compiled policy inside peft's `disable_adapter()`: the compiled
    code must tell adapter on from off (it guards on peft's switch and compiles once more) and not
    reuse the adapter-on graph. LoRA's B starts at 0, where the two agree, so it is moved first."""
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    eager_module, module = (
        configured(DPOModule(TINY, reference="adapter", model_settings=ModelSettings(lora=lora, torch_compile=c)))
        for c in (False, True)
    )
    for m in (eager_module, module):
        torch.manual_seed(1)
        for name, parameter in m.policy.named_parameters():
            if "lora_B" in name:
                parameter.data.normal_(std=0.5)
    data = PreferenceDataModule(TINY, train=pairs(), shuffle=False)
    data.setup("fit")
    batch = data.collate_fn()([(example, None) for example in data.train_examples])
    with torch.no_grad(), eager_calls(module.policy.get_base_model().lm_head) as calls:
        policy, reference = module.model_logps(module.policy, batch), module.reference_logps(batch, "train")
    with torch.no_grad():
        expected = eager_module.model_logps(eager_module.policy, batch), eager_module.reference_logps(batch, "train")
    for actual, wanted in zip((policy, reference), expected):
        torch.testing.assert_close(torch.stack(actual), torch.stack(wanted), rtol=1e-5, atol=1e-4)
    assert not torch.allclose(torch.stack(policy), torch.stack(reference), atol=1e-2)  # the adapter matters
    assert calls == [] and graphs() == 2


# -- PPO ----------------------------------------------------------------------------------
def digits_reward(prompts, completions, **columns) -> torch.Tensor:
    return torch.tensor([float(sum(ch.isdigit() for ch in c)) for c in completions])


PROMPTS = [{"prompt": [{"role": "user", "content": q}], "answer": "0"} for q in ["1+1", "12+34", "5", "99+99+1"]]


@pytest.mark.slow
def test_ppo_samples_eagerly_and_scores_and_updates_compiled(monkeypatch):
    """Sampling runs the policy eagerly (a compiled KV-cache decode is not what torch_compile buys
    here, see PPOModule.compiled_modules); the rollout's log-probs, values and reference log-probs
    and the update run compiled. Sampling is then eager's, token for token; the update's gradients
    match eager's; and until the first optimizer step the ratio is still exactly 1, since the
    rollout and the update run the same compiled forward on the same rows."""
    phase = ["score"]
    ratios, samples = [], []
    original_sample, original_loss = online_module.sample_responses, ppo_module.ppo_policy_loss

    def sampling(*args, **kwargs):
        phase[0] = "sample"
        try:
            out = original_sample(*args, **kwargs)
        finally:
            phase[0] = "score"
        samples.append(out.input_ids)
        return out

    def recording(logprobs, old_logprobs, advantages, mask, **kw):
        out = original_loss(logprobs, old_logprobs, advantages, mask, **kw)
        ratios.append(out.ratio[mask].detach())
        return out

    monkeypatch.setattr(online_module, "sample_responses", sampling)  # the sampling path PPO and GRPO share
    monkeypatch.setattr(ppo_module, "ppo_policy_loss", recording)

    def run(**settings):
        module = configured(PPOModule(TINY, rewards=[RewardFunction(digits_reward)], max_new_tokens=4,
                                      ppo_epochs=1, optimizer=sgd_lr0, **settings))
        data = PromptDataModule(TINY, PROMPTS, batch_size=4)
        with eager_calls(module.policy.lm_head, module.reference.model.lm_head, phase=phase) as calls:
            _, _, gradients = first_step(module, data, accumulate=1)
        return module, calls, gradients

    eager_module, eager_phases, eager_gradients = run()
    assert set(eager_phases) == {"score", "sample"}  # the hooks see both phases
    eager_ratios = ratios[:]
    ratios.clear()
    module, phases, gradients = run(model_settings=ModelSettings(torch_compile=True))
    assert phases and set(phases) == {"sample"}  # sampling eager, every other forward compiled
    assert len(samples) == 2 and torch.equal(samples[0], samples[1])  # eager's responses, token for token
    assert module.policy._compiled_call_impl is not None and module.reference.model._compiled_call_impl is not None
    assert gradients.keys() == eager_gradients.keys() and gradients
    for name, gradient in eager_gradients.items():
        assert_close_gradient(gradients[name], gradient, name)
    assert ratios and all(torch.equal(r, torch.ones_like(r)) for r in ratios + eager_ratios)
    assert module.state_dict().keys() == eager_module.state_dict().keys()
