"""Non-finite losses and gradients stop training with an error naming the step and its records,
or, with NonFiniteGuard(on_non_finite="skip"), leave weights and optimizer state untouched.
Also: log-probs against a float64 reference where tests/losses does not reach (float32 logits
of 1e4 over a 152k vocabulary, and their gradient)."""

import copy

import lightning as L
import pytest
import torch
from conftest import TINY

from plpost import ChatDataModule, PreferenceDataModule, RewardModule, SFTModule
from plpost.callbacks import NonFiniteError, NonFiniteGuard
from plpost.losses import token_logprobs

ROWS = [
    {"messages": [{"role": "user", "content": f"{i}+{i}"}, {"role": "assistant", "content": "5" * (i + 1)}]}
    for i in range(8)
]
PAIRS = [
    {"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(2 * i + 1)} for i in range(8)
]


class Inject(L.Callback):
    """At optimizer step `step`, makes the output of `module_name` NaN ("loss"), or keeps it and
    makes the gradient flowing back through it infinite ("gradient": the loss stays finite)."""

    def __init__(self, step: int, kind: str, module_name: str = "lm_head") -> None:
        self.step, self.kind, self.module_name = step, kind, module_name

    def on_train_start(self, trainer, pl_module) -> None:
        def hook(module, inputs, output):
            if trainer.global_step != self.step or not torch.is_grad_enabled():
                return output
            if self.kind == "loss":
                return output * float("nan")
            output.register_hook(lambda gradient: gradient * float("inf"))
            return output

        pl_module.policy.get_submodule(self.module_name).register_forward_hook(hook)


class Snapshots(L.Callback):
    """Weights and optimizer state after every optimizer step, by global step."""

    def __init__(self) -> None:
        self.states = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.states[trainer.global_step] = {
            "weights": {k: v.detach().clone() for k, v in pl_module.named_parameters()},
            "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
        }


def fit(module, data, *callbacks, steps: int = 3, **options) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_steps=steps, callbacks=list(callbacks), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **options,
    )
    trainer.fit(module, data)
    return trainer


def sft():
    module = SFTModule(TINY, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    return module, ChatDataModule(TINY, train=ROWS, batch_size=2, shuffle=False)


@pytest.mark.parametrize(("kind", "what"), [("loss", "non-finite loss"), ("gradient", "non-finite gradients (of ")])
def test_non_finite_step_stops_training_naming_the_step_and_its_records(kind, what):
    """By default (the guard the stage adds itself). Step 1 holds micro-batches 2 and 3 (accumulate
    2, batch 2, no shuffle): records 4-7 of the in-memory rows."""
    module, data = sft()
    snapshots = Snapshots()
    with pytest.raises(NonFiniteError) as error:
        fit(module, data, Inject(1, kind), snapshots, accumulate_grad_batches=2)
    message = str(error.value)
    assert message.startswith(f"{what}") and "at global step 1 " in message, message
    assert "records [4, 5, 6, 7] of in-memory rows" in message, message
    assert max(snapshots.states) == 1  # stopped before the bad step was taken
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_reward_pairs_are_named_by_their_pair_index():
    module = RewardModule(TINY, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = PreferenceDataModule(TINY, train=PAIRS, batch_size=2, shuffle=False)
    with pytest.raises(NonFiniteError, match=r"non-finite loss at global step 2 .*records \[4, 5\] of in-memory rows"):
        fit(module, data, Inject(2, "loss", "score"))


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_skip_leaves_weights_and_optimizer_state_untouched_and_counts(kind):
    module, data = sft()
    guard, snapshots = NonFiniteGuard(on_non_finite="skip"), Snapshots()
    trainer = fit(module, data, guard, Inject(1, kind), snapshots, steps=3)
    states = snapshots.states
    assert sorted(states) == [1, 2, 3] and trainer.global_step == 3
    assert [g for g in trainer.callbacks if isinstance(g, NonFiniteGuard)] == [guard]  # the stage kept the user's
    for name, weight in states[1]["weights"].items():
        assert torch.equal(states[2]["weights"][name], weight), name  # the skipped step changed nothing
    for index, moments in states[1]["optimizer"]["state"].items():
        for key, value in moments.items():  # exp_avg, exp_avg_sq and the step count
            assert torch.equal(states[2]["optimizer"]["state"][index][key], value), (index, key)
    changed = [n for n, w in states[2]["weights"].items() if not torch.equal(states[3]["weights"][n], w)]
    assert changed  # the next step trains again
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert guard.skipped_steps == 1 and trainer.callback_metrics["train/skipped_steps"] == 1
    assert guard.state_dict() == {"skipped_steps": 1}  # kept in checkpoints


def test_finite_training_is_not_disturbed():
    """Negative control for the skip test: without an injection every step changes the weights."""
    module, data = sft()
    guard, snapshots = NonFiniteGuard(on_non_finite="skip"), Snapshots()
    fit(module, data, guard, snapshots, steps=3)
    for step in (1, 2):
        before, after = snapshots.states[step]["weights"], snapshots.states[step + 1]["weights"]
        assert any(not torch.equal(after[n], w) for n, w in before.items())
    assert guard.skipped_steps == 0


def test_the_guard_is_configured_from_yaml_and_replaces_the_default(tmp_path, monkeypatch):
    from plpost.cli import PostTrainingCLI

    monkeypatch.chdir(tmp_path)  # the CLI writes config.yaml into the run folder, here the working one

    data = tmp_path / "chat.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n' * 2)
    config = tmp_path / "run.yaml"
    config.write_text(f"""
trainer:
  max_steps: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  callbacks:
    - class_path: plpost.callbacks.NonFiniteGuard
      init_args: {{on_non_finite: skip}}
model: {{class_path: plpost.SFTModule, init_args: {{model: "plpost:tiny"}}}}
data: {{class_path: plpost.ChatDataModule, init_args: {{tokenizer: "plpost:tiny", train: {data}, batch_size: 2}}}}
""")
    cli = PostTrainingCLI(args=["fit", f"--config={config}"])
    guards = [c for c in cli.trainer.callbacks if isinstance(c, NonFiniteGuard)]
    assert [g.on_non_finite for g in guards] == ["skip"]


def test_guard_rejects_an_unknown_policy():
    with pytest.raises(ValueError, match="on_non_finite must be 'error' or 'skip'"):
        NonFiniteGuard(on_non_finite="ignore")


# -- log-probs: float32, huge logits, a Qwen-size vocabulary ------------------------------------
def test_float32_logprobs_and_gradients_of_huge_logits_over_a_large_vocabulary_match_float64():
    """tests/losses covers bf16 at 50k and float64 at |logit| 1e4 over 1k. Here float32 logits up
    to 1e4 over 151,936 entries: exp() would overflow without the max shift, and a float32 sum of
    152k terms would lose the small ones. The log-normaliser (~1e4) is rounded to float32, whose
    spacing there is 2^-10, so values agree within 2e-3, and the probabilities in the gradient
(softmax - onehot) within a relative 2e-3."""
    vocab = 151_936
    generator = torch.Generator().manual_seed(0)
    logits64 = (torch.rand(2, 3, vocab, generator=generator, dtype=torch.float64) * 2 - 1) * 1e4
    logits64[0, 0, 11] = 1e4  # a clear winner: log p ~ 0
    logits64[1, 2, :] = 9e3  # a flat row: log p = -log(vocab)
    targets = torch.randint(0, vocab, (2, 3), generator=generator)
    targets[0, 0] = 11
    logits32 = logits64.float().requires_grad_(True)
    ours = token_logprobs(logits32, targets)
    reference64 = logits64.float().double().requires_grad_(True)  # the same float32 values, in float64
    expected = torch.log_softmax(reference64, -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(ours.double(), expected.detach(), rtol=0, atol=2e-3)
    assert abs(float(ours[1, 2]) + torch.log(torch.tensor(float(vocab)))) < 2e-3
    ours.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(logits32.grad.double(), reference64.grad, rtol=2e-3, atol=1e-7)
