"""The frozen-model component every stage uses (`plpost.frozen`): one rule for when a frozen model is
the policy's own starting weights, one set of reference options with one set of refusals, and
frozen models found, kept out of checkpoints and kept in eval mode the same way in every stage."""

from functools import partial

import pytest
import torch
from conftest import TINY

from plpost.frozen import is_policy_start, resolve_reference
from plpost.hf import load_causal_lm
from plpost.modules import DistillationModule, DPOModule, GRPOModule, KTOModule, LoraSettings, ModelSettings, PPOModule
from plpost.rewards import RewardFunction, RewardModel

OTHER = "other/model"


def zero_reward(prompts, completions, **columns):
    return torch.zeros(len(completions))


REWARDS = dict(rewards=[RewardFunction(zero_reward)])
STAGES_WITH_A_REFERENCE = {
    "DPOModule": partial(DPOModule, TINY),
    "KTOModule": partial(KTOModule, TINY),
    "PPOModule": partial(PPOModule, TINY, **REWARDS),
    "GRPOModule": partial(GRPOModule, TINY, beta=0.1, **REWARDS),
}


def resolve(kind, reference_model=None, *, lora=False, random_init=False, allowed=("auto", "copy", "adapter")):
    return resolve_reference(kind, reference_model, policy_model=TINY, lora=lora, random_init=random_init,
                             stage="SomeModule", allowed=allowed)


def test_the_one_rule_for_the_policys_own_starting_weights():
    """Unnamed: the policy's start, whatever it is. Named: the weights stored under the name, which
    are the policy's start only when the policy loads that name as stored (not random_init)."""
    assert is_policy_start(None, TINY, random_init=False) and is_policy_start(None, TINY, random_init=True)
    assert is_policy_start(TINY, TINY, random_init=False)
    assert not is_policy_start(TINY, TINY, random_init=True)
    assert not is_policy_start(OTHER, TINY, random_init=False)


def test_auto_is_the_adapter_with_lora_and_a_copy_without():
    assert resolve("auto", lora=True) == "adapter" and resolve("auto") == "copy"
    assert resolve("copy", lora=True) == "copy" and resolve("adapter", TINY, lora=True) == "adapter"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(kind="adapter"), "needs `lora`"),
        (dict(kind="adapter", reference_model=OTHER, lora=True), "always compares against `model`"),
        (dict(kind="precomputed", random_init=True, allowed=("precomputed",)), "cannot be reloaded"),
        (dict(kind="precomputed"), r"SomeModule takes reference: auto \| copy \| adapter, not 'precomputed'"),
    ],
)
def test_contradictions_are_refused_in_one_sentence(arguments, message):
    with pytest.raises(ValueError, match=message):
        resolve(**arguments)


@pytest.mark.parametrize("stage", ["PPOModule", "GRPOModule"])
def test_online_stages_refuse_precomputed_by_name(stage):
    with pytest.raises(ValueError, match=f"{stage} takes reference: auto | copy | adapter"):
        STAGES_WITH_A_REFERENCE[stage](reference="precomputed")


@pytest.mark.parametrize("stage", STAGES_WITH_A_REFERENCE)
def test_every_stage_copies_the_start_loads_a_name_and_keeps_it_out_of_checkpoints(stage, tmp_path):
    """The same three cases in every stage: no name is a copy of the policy's start (random weights
    with random_init), the policy's own name as stored is a copy too, and with random_init that name
    loads its stored weights. The copy is frozen, in eval mode after `.train()`, and not in the state dict."""
    build = STAGES_WITH_A_REFERENCE[stage]
    stored = load_causal_lm(TINY).state_dict()
    cases = [
        (dict(), True, True),
        (dict(reference_model=TINY), True, True),
        (dict(model_settings=ModelSettings(random_init=True)), True, False),
        (dict(reference_model=TINY, model_settings=ModelSettings(random_init=True)), False, True),
    ]
    for arguments, copied, equals_stored in cases:
        torch.manual_seed(0)
        module = build(**arguments)
        module.configure_model()
        module.train()
        reference = module.reference
        assert module.frozen_copies() == {"reference": reference} and reference.copied_start is copied
        assert not reference.training and not any(p.requires_grad for p in reference.parameters())
        weights = reference.model.state_dict()
        assert all(torch.equal(weights[k], stored[k]) for k in stored) is equals_stored, arguments
        policy = module.policy.state_dict()
        assert all(torch.equal(weights[k], policy[k]) for k in stored) is copied, arguments
        assert not [key for key in module.state_dict() if key.startswith("reference.")]
        assert "reference" in module.frozen_sources()


@pytest.mark.parametrize("stage", STAGES_WITH_A_REFERENCE)
def test_with_lora_every_stage_defaults_to_the_adapter_and_loads_no_second_model(stage):
    module = STAGES_WITH_A_REFERENCE[stage](model_settings=ModelSettings(lora=LoraSettings(r=2, alpha=4)))
    module.configure_model()
    assert module.reference_kind == "adapter" and module.frozen_copies() == {}
    assert "LoRA adapter disabled" in module.frozen_sources()["reference"]


def test_a_teacher_follows_the_same_rule():
    """A teacher is always named: the student's own name loads as stored, a copy when the student
    starts from it too, loaded when the student starts from random weights."""
    same = DistillationModule(TINY, TINY)
    same.configure_model()
    assert same.teacher.copied_start and same.frozen_copies() == {"teacher": same.teacher}
    random_student = DistillationModule(TINY, TINY, model_settings=ModelSettings(random_init=True))
    random_student.configure_model()
    stored = load_causal_lm(TINY).state_dict()
    assert not random_student.teacher.copied_start
    assert all(torch.equal(random_student.teacher.model.state_dict()[k], v) for k, v in stored.items())


def test_a_reward_model_is_frozen_and_left_out_of_checkpoints(reward_model_dir):
    module = GRPOModule(TINY, rewards=[RewardModel(reward_model_dir)])
    module.configure_model()
    module.train()
    frozen = module.frozen_copies()
    assert list(frozen) == ["reward_scorer.sources.0.model"]
    assert not frozen["reward_scorer.sources.0.model"].training
    assert not [key for key in module.state_dict() if key.startswith("reward_scorer.sources.")]
    assert module.stage_frozen_models() == []  # scored whole on every rank: not sharded with the policy
