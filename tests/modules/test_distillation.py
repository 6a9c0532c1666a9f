"""DistillationModule: no loss and no gradient when the student is its teacher, gradients reach the
student only, the teacher stays out of checkpoints, the first step does not depend on the
micro-batches, dataset completions (lmbda), LoRA, refusals; and, slow, a student distilled from the
SFT model of the addition task recovers its held-out accuracy and answers as it does."""

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

from transformers import AutoConfig

from conftest import TINY, GradientCapture
from plpost import DistillationModule, PromptDataModule
from plpost.assets import resolve_pretrained
from plpost.callbacks import write_hf_folder
from plpost.hf import load_causal_lm, load_tokenizer
from plpost.modules import LoraSettings, ModelSettings

SFT_EXAMPLES, STUDENT_STEP, DISTILL_BATCHES = 8000, 375, 125
RECOVERED = 0.5  # of the held-out accuracy gap between student and teacher, at least (measured: 0.97 to 1.06)
REPEATED = 0.5  # of the teacher's wrong held-out answers that the student gives too, at least (measured: 0.73 to 0.81)
ROWS = [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
        for q, a in [("1+1", "2"), ("12+34", "46"), ("5+5", "10"), ("99+99", "198")]]


@pytest.fixture(scope="module")
def perturbed_teacher(tmp_path_factory) -> str:
    """The tiny model with every weight moved by a little noise: a teacher the student is not."""
    path = tmp_path_factory.mktemp("teacher")
    model = load_causal_lm(TINY)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.save_pretrained(path)
    load_tokenizer(TINY).save_pretrained(path)
    return str(path)


def distill(teacher=TINY, **overrides) -> DistillationModule:
    settings = dict(max_new_tokens=4, optimizer=partial(torch.optim.SGD, lr=0.1), gradient_clip_val=None)
    return DistillationModule(TINY, teacher, **{**settings, **overrides})


def fit(module, *, max_steps=1, callbacks=(), completions=False, **trainer) -> L.Trainer:
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=list(callbacks), **trainer)
    trainer.fit(module, PromptDataModule(TINY, ROWS, batch_size=4, shuffle=False, completions=completions))
    return trainer


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_a_student_that_is_its_teacher_has_no_loss_and_no_gradient(divergence):
    """The same logits give a divergence of exactly 0; the gradient is s - t (forward KL) or its like,
    0 up to the rounding of the two softmaxes (at most 1e-7 here, where a teacher that differs gives 1e-2)."""
    capture = GradientCapture()
    trainer = fit(distill(divergence=divergence), callbacks=[capture])
    assert float(trainer.callback_metrics["train/loss"]) == 0.0
    assert float(trainer.callback_metrics["completions/mean_length"]) > 0
    assert capture.gradients and max(float(g.abs().max()) for g in capture.gradients.values()) < 1e-5


def test_gradients_reach_the_student_only_and_the_teacher_stays_out_of_checkpoints(perturbed_teacher, tmp_path):
    module = distill(perturbed_teacher)
    teacher_before = {k: v.clone() for k, v in load_causal_lm(perturbed_teacher).state_dict().items()}
    capture = GradientCapture()
    trainer = fit(module, callbacks=[capture])
    assert float(trainer.callback_metrics["train/loss"]) > 0
    assert max(float(g.abs().max()) for g in capture.gradients.values()) > 1e-3
    assert not any(name.startswith("teacher.") for name in capture.gradients)
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())
    for name, value in module.teacher.model.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    trainer.save_checkpoint(tmp_path / "distill.ckpt")
    checkpoint = torch.load(tmp_path / "distill.ckpt", weights_only=True)
    assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    assert any(k.startswith("policy.") for k in checkpoint["state_dict"])
    assert checkpoint["plpost_frozen_sources"]["teacher"]["path"].endswith(perturbed_teacher.rsplit("/", 1)[-1])


def test_first_step_gradients_do_not_depend_on_the_micro_batches(perturbed_teacher):
    """4 completions of different lengths as one micro-batch or as 3 (2, 1 and 1 rows): the same samples
    (drawn before the split), each token weighted by the batch's token count, so the same gradients."""
    gradients = []
    for accumulation in (1, 3):
        capture = GradientCapture()
        fit(distill(perturbed_teacher, divergence="jsd", gradient_accumulation_steps=accumulation, max_new_tokens=6),
            callbacks=[capture])
        gradients.append(capture.gradients)
    whole, split = gradients
    assert whole.keys() == split.keys() and any(g.abs().sum() > 0 for g in whole.values())
    for name, gradient in whole.items():
        torch.testing.assert_close(split[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_lmbda_zero_trains_on_the_dataset_completions(perturbed_teacher):
    """"46<|end|>" and the others: the completion tokens as the chat template ends an answer."""
    seen = []
    module = distill(perturbed_teacher, lmbda=0.0)
    micro_batch = module.micro_batch_divergence

    def recording(samples, rows):
        seen.append(samples)
        return micro_batch(samples, rows)

    module.micro_batch_divergence = recording
    trainer = fit(module, completions=True)
    assert float(trainer.callback_metrics["on_policy"]) == 0.0 and float(trainer.callback_metrics["train/loss"]) > 0
    samples, tokenizer = seen[0], load_tokenizer(TINY)
    texts = [tokenizer.decode(ids[mask]) for ids, mask in zip(samples.response_ids, samples.response_mask)]
    assert texts == ["2<|end|>", "46<|end|>", "10<|end|>", "198<|end|>"]


def test_lmbda_below_one_without_dataset_completions_is_refused_before_training():
    with pytest.raises(ValueError, match="completions: true"):
        fit(distill(lmbda=0.5))


def test_a_teacher_with_another_tokenizer_is_refused_before_its_weights_load(tmp_path):
    tokenizer = load_tokenizer(TINY)
    tokenizer.add_tokens(["<|distill|>"])
    tokenizer.save_pretrained(tmp_path)
    AutoConfig.from_pretrained(resolve_pretrained(TINY)).save_pretrained(tmp_path)  # and no weights at all
    with pytest.raises(ValueError, match="another tokenizer.*teacher of the student's family"):
        fit(distill(str(tmp_path)))


def test_a_lora_student_trains_its_adapters_only(perturbed_teacher):
    capture = GradientCapture()
    module = distill(perturbed_teacher, model_settings=ModelSettings(lora=LoraSettings(r=4, alpha=8, dropout=0.0)))
    fit(module, callbacks=[capture])
    assert capture.gradients and all("lora_" in name for name in capture.gradients)
    assert any(g.abs().sum() > 0 for g in capture.gradients.values())


@pytest.mark.parametrize(("settings", "message"), [
    (dict(divergence="jsd", beta=1.0), "strictly between 0 and 1"), (dict(lmbda=1.5), "lmbda"),
    (dict(divergence="kl"), "unknown divergence"), (dict(temperature=0.0), "temperature"),
])
def test_settings_that_cannot_work_are_refused_at_construction(settings, message):
    with pytest.raises(ValueError, match=message):
        distill(**settings)


class WriteHFFolderAt(L.Callback):
    """Writes the module's model as a Hugging Face folder once `step` optimizer steps are done."""

    def __init__(self, step: int, dirpath: Path) -> None:
        self.step, self.dirpath = step, dirpath

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step and not self.dirpath.exists():
            write_hf_folder(pl_module, self.dirpath)


@pytest.mark.slow
def test_a_student_distilled_from_the_sft_model_recovers_its_accuracy(tmp_path):
    """SFT on 8000 demonstrations (500 steps of 16) teaches the tiny model the chat format and some
    addition: the teacher. The same run after 375 steps, which knows the format but less addition
    (the held-out accuracy of this run climbs late, as its learning rate decays), is the student.
    One epoch of on-policy distillation (the 4000 bundled prompts, 125 generation batches of 32,
    reverse KL, AdamW 1e-3 decaying to 1e-4) takes its greedy exact match on the 300 held-out
    problems back to the teacher's, and makes it answer as the teacher does, mistakes included
    (the demonstrations forget most carries: 79 of the teacher's 139 wrong answers are 10 short,
    "85+99" -> 174). Measured with seeds 0, 1, 2: teacher 53.7%, student 14.3% -> 53.0%, 52.7%,
    56.0% (97-106% of the gap recovered), and of the teacher's wrong answers it gives 17% -> 74%,
    81%, 73% (a student that learned addition elsewhere would not). The thresholds (half the gap,
    half the mistakes) leave room for another platform's rounding. About 40 s of CPU on one thread
    (SFT 20 s, distillation 12 s)."""
    from plpost import ChatDataModule, SFTModule
    from plpost.data.sources import DataSource, load_source
    from plpost.evaluation import GreedyReport, greedy_report
    from plpost.optim import WarmupCosineLR
    from plpost.tasks import exact_match_reward

    settings = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    L.seed_everything(0)
    sft = SFTModule(TINY, optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.0),
                    scheduler=partial(WarmupCosineLR, warmup_steps=20, min_lr_ratio=0.1))
    chats = ChatDataModule(TINY, DataSource("plpost:data/addition/sft.jsonl", limit=SFT_EXAMPLES), batch_size=16,
                           max_length=32)
    L.Trainer(max_epochs=1, callbacks=[WriteHFFolderAt(STUDENT_STEP, tmp_path / "student")], **settings).fit(sft, chats)
    assert sft.trainer.global_step == SFT_EXAMPLES // 16 > STUDENT_STEP
    write_hf_folder(sft, tmp_path / "teacher")

    held_out = [dict(row) for row in load_source("plpost:data/addition/eval.jsonl")]
    tokenizer = load_tokenizer(TINY)

    def greedy(model) -> GreedyReport:
        return greedy_report(model, tokenizer, [r["prompt"] for r in held_out], exact_match_reward,
                             {"answer": [r["answer"] for r in held_out]}, max_new_tokens=4)

    def accuracy(report: GreedyReport) -> float:
        return float(report.scores.mean())

    def mistakes_repeated(report: GreedyReport) -> float:
        """The share of the teacher's wrong answers that the model gives too."""
        wrong = [i for i, score in enumerate(teacher.scores) if score == 0]
        return sum(report.completions[i] == teacher.completions[i] for i in wrong) / len(wrong)

    student = DistillationModule(str(tmp_path / "student"), str(tmp_path / "teacher"), max_new_tokens=6,
                                 optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.0),
                                 scheduler=partial(WarmupCosineLR, min_lr_ratio=0.1))
    student.configure_model()
    teacher, before = greedy(student.teacher.model), greedy(student.policy)
    assert accuracy(teacher) > 0.45 and accuracy(before) < 0.25, (accuracy(teacher), accuracy(before))  # a real gap
    L.seed_everything(0)
    L.Trainer(max_epochs=1, **settings).fit(
        student, PromptDataModule(TINY, "plpost:data/addition/prompts.jsonl", batch_size=32))
    assert student.trainer.global_step == DISTILL_BATCHES
    after = greedy(student.policy)
    print(f"held-out greedy exact match: teacher {accuracy(teacher):.3f}, student {accuracy(before):.3f} -> "
          f"{accuracy(after):.3f}; the teacher's mistakes repeated {mistakes_repeated(before):.3f} -> "
          f"{mistakes_repeated(after):.3f}")
    assert accuracy(after) > accuracy(before) + RECOVERED * (accuracy(teacher) - accuracy(before))
    assert mistakes_repeated(after) > max(REPEATED, mistakes_repeated(before) + 0.3)
