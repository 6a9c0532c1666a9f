"""GenerationEval with an environment: the episodes training plays (tool calls, user turns), scored
on their last turn, their statistics logged, whole conversations in the sample table; the trained
module's environment by default; rows with tools refused where nothing could answer their calls."""

import json
import math
from functools import partial

import lightning as L
import pytest
import torch
from conftest import TINY
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from plpost import ChatDataModule, GRPOModule, PromptDataModule, SFTModule
from plpost.callbacks import GenerationEval
from plpost.callbacks.generations import conversation_text
from plpost.cli import PostTrainingCLI
from plpost.data.formats import DataValidationError
from plpost.environments import Environment
from plpost.rewards import EnvironmentReward
from plpost.tasks.addition import TryAgain, exact_match_reward
from plpost.tasks.calculator import CALCULATOR_TOOLS, add, calculator_tool_schemas

QUESTIONS = ["37+48", "59+26", "18+27", "66+19", "45+38", "23+59"]
PROMPTS = [{"prompt": [{"role": "user", "content": q}], "answer": str(eval(q))} for q in QUESTIONS]
CHATS = [{"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}] * 2
EPISODE_METRICS = ["score", "stopped", "length", "turns", "tool_calls", "tool_call_rate", "tool_errors",
                   "malformed_rate", "truncated", "episode_tokens"]


def recording(monkeypatch, logger, method: str) -> list[tuple[tuple, dict]]:
    """The arguments of each call of `logger.<method>`, which still logs as it would."""
    calls = []
    original = getattr(logger, method)

    def kept(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(logger, method, kept)
    return calls


def logged_metrics(calls: list[tuple[tuple, dict]]) -> dict[str, float]:
    return {name: value for args, _ in calls for name, value in args[0].items()}


def fit_unchanged(model: str, callbacks: list, logger=False) -> L.Trainer:
    """One SFT step at learning rate 0: the callbacks evaluate `model` as it is, at the end of training."""
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=1, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks)
    trainer.fit(SFTModule(model, optimizer=partial(torch.optim.SGD, lr=0.0)),
                ChatDataModule(TINY, train=CHATS, batch_size=2))
    return trainer


def test_episodes_with_tools_log_their_calls_and_the_table_shows_the_tool_results(tool_sft_export, tmp_path,
                                                                                    monkeypatch):
    """The tool-SFT model calls `add`, the environment answers, the model answers with the result:
    every metric is logged and finite, some episodes call, and the table the offline W&B run wrote
    holds the conversations, the tool's result included."""
    logger = WandbLogger(save_dir=str(tmp_path), project="plpost-test", offline=True)
    metrics = recording(monkeypatch, logger, "log_metrics")
    evaluation = GenerationEval(PROMPTS, exact_match_reward, environment=Environment(tools=CALCULATOR_TOOLS),
                                every_n_steps=0, max_new_tokens=72, table_rows=4)
    try:
        fit_unchanged(tool_sft_export, [evaluation], logger)
    finally:
        import wandb

        wandb.finish()
    # The stage logs its own metrics; WandbLogger logs its tables through log_metrics too.
    logged = {name: value for name, value in logged_metrics(metrics).items()
              if name.startswith("eval/") and name != "eval/samples"}
    assert sorted(logged) == sorted(f"eval/{name}" for name in EPISODE_METRICS)
    assert all(math.isfinite(value) for value in logged.values()), logged
    assert logged["eval/tool_call_rate"] > 0 and logged["eval/turns"] > 1
    [written] = tmp_path.rglob("media/table/eval/samples_*.table.json")  # what the offline run keeps
    table = json.loads(written.read_text())
    assert table["columns"] == ["step", "prompt", "conversation", "score"] and len(table["data"]) == 4
    called = [(row, conversation) for row, conversation in zip(table["data"], evaluation.conversations)
              if conversation[0].get("tool_calls")]
    assert called
    for row, conversation in called:
        result = next(message["content"] for message in conversation if message["role"] == "tool")
        assert f"tool: {result}" in row[2].splitlines() and "assistant: add({" in row[2]


def test_try_again_episodes_are_scored_on_their_last_turn(sft_export, tmp_path, monkeypatch):
    """TryAgain answers a wrong sum with a user turn: the score is the exact match of each episode's
    last assistant turn, and that turn is the last assistant message of its conversation."""
    logger = CSVLogger(str(tmp_path))
    metrics = recording(monkeypatch, logger, "log_metrics")
    evaluation = GenerationEval(PROMPTS, exact_match_reward, environment=TryAgain(max_turns=3), every_n_steps=0,
                                max_new_tokens=6)
    fit_unchanged(sft_export, [evaluation], logger)
    logged = logged_metrics(metrics)
    assert logged["eval/turns"] >= 1
    answers = [row["answer"] for row in PROMPTS]
    expected = exact_match_reward([row["prompt"] for row in PROMPTS], evaluation.completions, answers)
    assert logged["eval/score"] == pytest.approx(float(expected.mean()))
    for completion, conversation in zip(evaluation.completions, evaluation.conversations):
        assert completion == [m for m in conversation if m["role"] == "assistant"][-1]["content"]


def test_the_trained_modules_environment_is_used_unless_one_is_given(sft_export, tmp_path, monkeypatch):
    """GRPO with TryAgain: GenerationEval without an environment plays TryAgain's episodes (wrong
    answers are told to try again); one given an environment of its own plays that one instead."""
    logger = CSVLogger(str(tmp_path))
    metrics = recording(monkeypatch, logger, "log_metrics")
    own = GenerationEval(PROMPTS, exact_match_reward, every_n_steps=0, max_new_tokens=6, name="own")
    given = GenerationEval(PROMPTS, exact_match_reward, environment=Environment(max_turns=3), every_n_steps=0,
                           max_new_tokens=6, name="given")
    module = GRPOModule(sft_export, rewards=[EnvironmentReward()], environment=TryAgain(max_turns=3),
                        num_generations=2, max_new_tokens=6, optimizer=partial(torch.optim.SGD, lr=0.0))
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=1, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[own, given])
    trainer.fit(module, PromptDataModule(TINY, PROMPTS, batch_size=2, shuffle=False))
    logged = logged_metrics(metrics)
    assert "own/turns" in logged and "given/turns" in logged
    retried = [c for c in own.conversations if {"role": "user", "content": "wrong, try again"} in c]
    assert retried and logged["own/turns"] > 1  # the model of sft_export gets some carries wrong
    assert logged["given/turns"] == 1 and not any(m["role"] == "user" for c in given.conversations for m in c)


def test_rows_with_tools_are_refused_without_an_environment():
    rows = [{**PROMPTS[0], "tools": calculator_tool_schemas()}]
    with pytest.raises(DataValidationError, match='record 0, field "tools": .*give it `environment=`'):
        fit_unchanged(TINY, [GenerationEval(rows, every_n_steps=0)])


def test_string_prompts_are_refused_with_an_environment():
    with pytest.raises(DataValidationError, match='record 0, field "prompt": .*messages'):
        fit_unchanged(TINY, [GenerationEval([{"prompt": "1+1="}], environment=TryAgain(), every_n_steps=0)])


def test_a_conversation_reads_as_role_and_content_with_a_line_per_tool_call():
    conversation = [
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 37, "b": 48}}},
            {"type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "name": "add", "content": "85"},
        {"role": "tool", "name": "add", "content": "3"},
        {"role": "assistant", "content": "85"},
    ]
    assert conversation_text(conversation) == (
        'assistant: add({"a": 37, "b": 48})\nassistant: add({"a": 1, "b": 2})\ntool: 85\ntool: 3\nassistant: 85'
    )


def test_the_cli_builds_the_environment_from_yaml(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("""
trainer:
  callbacks:
    - class_path: plpost.callbacks.GenerationEval
      init_args:
        prompts: plpost:data/addition/eval.jsonl
        score_fn: plpost.tasks.addition.exact_match_reward
        environment:
          class_path: plpost.environments.Environment
          init_args: {tools: [plpost.tasks.calculator.add], max_turns: 3}
model:
  class_path: plpost.SFTModule
  init_args: {model: "plpost:tiny"}
data:
  class_path: plpost.ChatDataModule
  init_args: {tokenizer: "plpost:tiny", train: "plpost:data/addition/sft.jsonl"}
""")
    cli = PostTrainingCLI(args=[f"--config={config}"], run=False)
    [evaluation] = [callback for callback in cli.trainer.callbacks if isinstance(callback, GenerationEval)]
    assert evaluation.environment.tools == {"add": add} and evaluation.environment.max_turns == 3
