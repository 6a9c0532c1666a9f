"""GenerationEval: periodic generation on fixed prompts, scored and logged as metrics and a table;
with an environment, whole episodes (tool calls, user turns) played as training plays them."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from plpost.data.base import trainer_template
from plpost.data.formats import DataValidationError, validate_prompt_row
from plpost.data.sources import SourceLike, describe, load_source
from plpost.environments import Environment, Message
from plpost.evaluation import episode_report
from plpost.generation import generate_texts
from plpost.sharding import full_parameters


class Evaluated(NamedTuple):
    """One prompt's evaluation, as the ranks exchange it."""

    index: int
    completion: str
    score: float | None
    measures: dict[str, float]
    """Logged as `{name}/{key}`, each averaged over the prompts."""
    conversation: list[Message] | None
    """The episode after the prompt (None without an environment)."""


class GenerationEval(L.Callback):
    """Generates completions for a fixed prompt set every `every_n_steps` optimizer steps.

    With `score_fn(prompts, completions, **columns) -> Tensor` (the same signature as PPO
    reward functions; columns are the prompt rows' other fields), logs `{name}/score`, the mean
    score. Always logs `{name}/stopped` (the share of completions that ended with a stop token
    before `max_new_tokens`) and `{name}/length` (mean completion tokens), and a table of the
    first `table_rows` prompts (a W&B table with WandbLogger, the console otherwise).

    With an environment (`environment`, else the trained module's own `environment` when it has
    one, as GRPO and PPO with `environment=` do), each prompt plays one episode as training plays
    it (`plpost.evaluation.episode_report`): the rows' `tools` schemas and the environment's in the
    prompt, rendered with the data module's chat template, each turn at most `max_new_tokens`.
    `score_fn` then reads the last assistant turn, and the conversation as the column
    `conversation`; `{name}/stopped` is the share of episodes whose every turn stopped, `{name}/length`
    the policy's tokens per episode; also logged, per episode: `turns`, `tool_calls`, `tool_errors`,
    `truncated` (the share cut by max_turns or a token limit), `episode_tokens` (the policy's and the
    environment's), `tool_call_rate` (the share with at least one call) and `malformed_rate` (the
    share with a turn the response parser could not read). The table shows whole conversations.

    Args:
        prompts: rows with a `prompt` field (string or messages) plus any extra columns; with an
            environment, message prompts, which may carry `tools`.
        score_fn: scores completions; e.g. ``plpost.tasks.addition.exact_match_reward``.
        environment: plays the episodes, e.g. ``{class_path: plpost.environments.Environment,
            init_args: {tools: [plpost.tasks.calculator.add]}}``; None: the module's, if any.
        every_n_steps: how often, in optimizer steps; 0 evaluates only when training ends.
        max_new_tokens: the longest completion (with an environment: the longest turn).
        do_sample: sample instead of greedy decoding.
        limit: use only the first `limit` prompts.
        table_rows: how many completions to show in the table.
        name: the prefix of the logged names.
    """

    needs_full_weights = True
    """It generates from the whole policy (see `plpost.sharding.check_strategy`)."""

    def __init__(
        self,
        prompts: SourceLike,
        score_fn: Callable[..., torch.Tensor] | None = None,
        *,
        environment: Environment | None = None,
        every_n_steps: int = 100,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        limit: int | None = None,
        table_rows: int = 16,
        name: str = "eval",
    ) -> None:
        self.source = describe(prompts)
        rows = [dict(row) for row in load_source(prompts)][:limit]
        self.prompts, self.row_tools = [], []
        for index, row in enumerate(rows):
            prompt, tools = validate_prompt_row(self.source, index, row)
            self.prompts.append(prompt)
            self.row_tools.append(tools)
        # Every row's columns, None where a row has none: some rows may carry tools and others not.
        keys = dict.fromkeys(key for row in rows for key in row if key != "prompt")
        self.columns = {key: [row.get(key) for row in rows] for key in keys}
        self.score_fn = score_fn
        self.environment = environment
        self.every_n_steps = every_n_steps
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample
        self.table_rows = table_rows
        self.name = name
        self._last_step = -1
        self.completions: list[str] = []
        """The last evaluation's completions of every prompt, in order, on every rank."""
        self.conversations: list[list[Message]] = []
        """With an environment, the last evaluation's episodes after each prompt, in order, on every rank."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.environment_for(pl_module)  # refuses prompts it cannot play before training starts

    def environment_for(self, pl_module: L.LightningModule) -> Environment | None:
        """The environment the episodes are played with: the one given, else the module's; refuses
        the rows that cannot be played with it (or without one)."""
        environment = self.environment if self.environment is not None else getattr(pl_module, "environment", None)
        for index, (prompt, tools) in enumerate(zip(self.prompts, self.row_tools)):
            if environment is None and tools is not None:
                raise DataValidationError(self.source, index, "tools", "GenerationEval offers tools only with an "
                                          "environment: give it `environment=` (or train a module that has one), "
                                          "or remove them")
            if environment is not None and isinstance(prompt, str):
                raise DataValidationError(self.source, index, "prompt", "an environment's episodes start from "
                                          "messages: write it as [{'role': 'user', 'content': ...}]")
        return environment

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Each rank generates and scores its share of the prompts (rank r: prompts r, r + world,
        ...), and the shares are gathered, so every rank returns the same metrics of the whole set.
        Sharded (FSDP2), every rank gathers the full weights once, even with no prompt of its own
        (the gathering is a collective), and generates without further collectives."""
        share = list(range(trainer.global_rank, len(self.prompts), trainer.world_size))
        environment = self.environment_for(pl_module)
        with full_parameters(pl_module.generation_model()) as model:
            if environment is None:
                evaluated = self.generated(model, pl_module, share)
            else:
                evaluated = self.played(model, trainer, pl_module, environment, share)
        everything = sorted(gathered(trainer, evaluated), key=lambda item: item.index)
        self.completions = [item.completion for item in everything]
        self.conversations = [item.conversation for item in everything] if environment is not None else []
        metrics = {f"{self.name}/{key}": sum(item.measures[key] for item in everything) / len(everything)
                   for key in everything[0].measures}
        if self.score_fn is not None:
            metrics[f"{self.name}/score"] = sum(item.score for item in everything) / len(everything)
        if trainer.is_global_zero:
            self.log_table(trainer, everything)
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(f"step {trainer.global_step}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
        return metrics

    def share_columns(self, share: list[int]) -> dict[str, list[Any]]:
        return {key: [values[i] for i in share] for key, values in self.columns.items()}

    def generated(self, model: torch.nn.Module, pl_module: L.LightningModule, share: list[int]) -> list[Evaluated]:
        """One completion per prompt of `share`, scored."""
        prompts = [self.prompts[i] for i in share]
        texts, lengths, stopped = generate_texts(model, pl_module.tokenizer, prompts,
                                                 max_new_tokens=self.max_new_tokens, do_sample=self.do_sample)
        scores: list[float | None] = [None] * len(share)
        if self.score_fn is not None and share:
            scores = torch.as_tensor(self.score_fn(prompts, texts, **self.share_columns(share)),
                                     dtype=torch.float32).tolist()
        return [Evaluated(index, text, score, {"stopped": float(stop), "length": float(length)}, None)
                for index, text, length, stop, score in zip(share, texts, lengths.tolist(), stopped.tolist(), scores)]

    def played(self, model: torch.nn.Module, trainer: L.Trainer, pl_module: L.LightningModule, environment: Environment,
               share: list[int]) -> list[Evaluated]:
        """One episode per prompt of `share`, scored, with its statistics."""
        report = episode_report(model, trainer_template(trainer, pl_module.tokenizer), environment,
                                [self.prompts[i] for i in share], self.score_fn, self.share_columns(share),
                                max_new_tokens=self.max_new_tokens, do_sample=self.do_sample)
        statistics = report.statistics
        measures = {
            "stopped": report.stopped.float(), "length": report.lengths.float(), "turns": statistics["turns"],
            "tool_calls": statistics["tool_calls"], "tool_call_rate": (statistics["tool_calls"] > 0).float(),
            "tool_errors": statistics["tool_errors"], "malformed_rate": (statistics["malformed"] > 0).float(),
            "truncated": statistics["truncated"], "episode_tokens": statistics["episode_tokens"],
        }
        scores = report.scores.tolist() if report.scores is not None else [None] * len(share)
        return [Evaluated(index, completion, score, {key: float(values[row]) for key, values in measures.items()},
                          conversation)
                for row, (index, completion, conversation, score)
                in enumerate(zip(share, report.completions, report.conversations, scores))]

    def log_table(self, trainer: L.Trainer, evaluated: list[Evaluated]) -> None:
        episodes = evaluated[0].conversation is not None
        rows = []
        for item in evaluated[: self.table_rows]:
            prompt = self.prompts[item.index]
            shown = (conversation_text(prompt), conversation_text(item.conversation)) if episodes \
                else (str(prompt), item.completion)
            rows.append([trainer.global_step, *shown, item.score])
        columns = ["step", "prompt", "conversation" if episodes else "completion", "score"]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key=f"{self.name}/samples", columns=columns, data=rows)
                return
        for row in rows[:4]:
            if episodes:
                rank_zero_info(f"  {row[1]}\n    " + row[2].replace("\n", "\n    ") + f"\n    (score {row[3]})")
            else:
                rank_zero_info(f"  {row[1]!r} -> {row[2]!r} (score {row[3]})")


def conversation_text(messages: Sequence[Message]) -> str:
    """Messages as a person reads them: `role: content` each, and each tool call on a line of its
    own as `role: name(arguments JSON)`."""
    lines = []
    for message in messages:
        if message.get("content") or not message.get("tool_calls"):
            lines.append(f"{message['role']}: {message.get('content') or ''}")
        for call in message.get("tool_calls") or []:
            function = call.get("function", call)
            arguments = function.get("arguments") or {}
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            lines.append(f"{message['role']}: {function.get('name')}({arguments})")
    return "\n".join(lines)


def gathered(trainer: L.Trainer, items: list) -> list:
    """Every rank's `items` (picklable), concatenated in rank order, on every rank; a collective."""
    if trainer.world_size == 1:
        return items
    shares: list[list | None] = [None] * trainer.world_size
    torch.distributed.all_gather_object(shares, items)
    return [item for share in shares for item in share]
