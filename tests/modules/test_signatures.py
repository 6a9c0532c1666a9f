"""Each stage argument is declared once, by the class that uses it; a stage forwards the rest to its
bases with `**kwargs`. The CLI still sees every argument with its help, a misspelt one still fails,
the positional form still works, and the hyperparameters still rebuild the module."""

import importlib
import inspect
import pkgutil

import pytest
from conftest import TINY, cli_parameters
from jsonargparse import ArgumentParser

import plpost
import plpost.modules
from plpost.modules.base import PostTrainingModule, argument_names
from plpost.rewards import RewardFunction

STAGES = [getattr(plpost, name) for name in plpost.__all__ if issubclass(getattr(plpost, name), PostTrainingModule)]
POSITIONAL = {"model", "tokenizer"}
"""Declared by each stage as well as by `PostTrainingModule`, for the positional form `SFTModule("plpost:tiny")`."""


def module_classes() -> list[type]:
    """Every PostTrainingModule subclass (and itself) defined in plpost.modules."""
    found = []
    for info in pkgutil.iter_modules(plpost.modules.__path__, prefix="plpost.modules."):
        module = importlib.import_module(info.name)
        found += [value for value in vars(module).values() if inspect.isclass(value)
                  and issubclass(value, PostTrainingModule) and value.__module__ == module.__name__]
    return found


def declared(cls: type) -> set[str]:
    """The named arguments of `cls`'s own `__init__` (none if it has no `__init__` of its own)."""
    if "__init__" not in vars(cls):
        return set()
    parameters = list(inspect.signature(vars(cls)["__init__"]).parameters.values())[1:]
    return {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def no_reward(prompts, completions, **columns):
    return [0.0] * len(completions)


def required(stage: type) -> dict:
    """The arguments a stage cannot do without: distillation's teacher, the RL stages' reward sources."""
    names = argument_names(stage)
    return {**({"teacher": TINY} if "teacher" in names else {}),
            **({"rewards": [RewardFunction(no_reward)]} if "rewards" in names else {})}


@pytest.mark.parametrize("cls", module_classes(), ids=lambda c: c.__name__)
def test_no_class_declares_an_argument_one_of_its_bases_declares(cls):
    for base in cls.__mro__[1:]:
        shared = (declared(cls) & declared(base)) - POSITIONAL
        assert not shared, f"{cls.__name__} declares {sorted(shared)} again, which {base.__name__} declares"


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.__name__)
def test_the_cli_has_every_argument_once_with_its_help(stage):
    parameters = cli_parameters(stage)
    names = [p.name for p in parameters]
    assert len(names) == len(set(names))
    assert names[0] == "model"
    assert set(names) == argument_names(stage) == {name for cls in stage.__mro__ for name in declared(cls)}
    assert not [p.name for p in parameters if not p.doc], "arguments without a help text"
    parser = ArgumentParser()
    parser.add_class_arguments(stage, "model")
    assert set(vars(parser.get_defaults().model)) == set(names)


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.__name__)
def test_a_misspelt_argument_is_refused_by_name(stage):
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):
        stage(TINY, temprature=0.7, **required(stage))


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.__name__)
def test_the_positional_form_and_the_hyperparameters_rebuild_the_same_module(stage):
    keywords = required(stage)
    teacher = [keywords.pop("teacher")] if "teacher" in keywords else []
    module = stage(TINY, *teacher, TINY, **keywords)  # model, (teacher), tokenizer
    assert (module.model_name, module.tokenizer_name) == (TINY, TINY)
    rebuilt = stage.from_hyperparameters(dict(module.hparams))
    assert dict(rebuilt.hparams) == dict(module.hparams)
    assert set(module.hparams) == argument_names(stage) - {"optimizer", "scheduler", "rewards", "environment"}
