"""GenerationEval: periodic generation on fixed prompts, scored and logged as metrics and a table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from plpost.data.formats import DataValidationError, validate_prompt_row
from plpost.data.sources import SourceLike, describe, load_source
from plpost.generation import generate_texts
from plpost.sharding import full_parameters


class GenerationEval(L.Callback):
    """Generates completions for a fixed prompt set every `every_n_steps` optimizer steps.

    With `score_fn(prompts, completions, **columns) -> Tensor` (the same signature as PPO
    reward functions; columns are the prompt rows' other fields), logs `{name}/score`, the mean
    score. Always logs `{name}/stopped` (the share of completions that ended with a stop token
    before `max_new_tokens`) and `{name}/length` (mean completion tokens), and a table of the
    first `table_rows` prompts (a W&B table with WandbLogger, the console otherwise).

    Args:
        prompts: rows with a `prompt` field (string or messages) plus any extra columns.
        score_fn: scores completions; e.g. ``plpost.tasks.addition.exact_match_reward``.
        every_n_steps: how often, in optimizer steps; 0 evaluates only when training ends.
        max_new_tokens: the longest completion.
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
        every_n_steps: int = 100,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        limit: int | None = None,
        table_rows: int = 16,
        name: str = "eval",
    ) -> None:
        source = describe(prompts)
        rows = [dict(row) for row in load_source(prompts)][:limit]
        self.prompts = []
        for index, row in enumerate(rows):
            prompt, tools = validate_prompt_row(source, index, row)
            if tools is not None:
                raise DataValidationError(source, index, "tools", "GenerationEval renders prompts without tools; remove them")
            self.prompts.append(prompt)
        self.columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
        self.score_fn = score_fn
        self.every_n_steps = every_n_steps
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample
        self.table_rows = table_rows
        self.name = name
        self._last_step = -1
        self.completions: list[str] = []
        """The last evaluation's completions of every prompt, in order, on every rank."""

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
        prompts = [self.prompts[i] for i in share]
        with full_parameters(pl_module.generation_model()) as model:
            texts, lengths, stopped = generate_texts(model, pl_module.tokenizer, prompts,
                                                     max_new_tokens=self.max_new_tokens, do_sample=self.do_sample)
        scores: list[float | None] = [None] * len(share)
        if self.score_fn is not None and share:
            columns = {key: [values[i] for i in share] for key, values in self.columns.items()}
            scores = torch.as_tensor(self.score_fn(prompts, texts, **columns), dtype=torch.float32).tolist()
        rows = sorted(gathered(trainer, list(zip(share, texts, lengths.tolist(), stopped.tolist(), scores))))
        _, self.completions, all_lengths, all_stopped, all_scores = (list(column) for column in zip(*rows))
        metrics = {
            f"{self.name}/stopped": sum(all_stopped) / len(rows),
            f"{self.name}/length": sum(all_lengths) / len(rows),
        }
        if self.score_fn is not None:
            metrics[f"{self.name}/score"] = sum(all_scores) / len(rows)
        if trainer.is_global_zero:
            self.log_table(trainer, self.completions, all_scores if self.score_fn is not None else None)
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(f"step {trainer.global_step}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
        return metrics

    def log_table(self, trainer: L.Trainer, texts: list[str], scores: list[float] | None) -> None:
        rows = []
        for i in range(min(self.table_rows, len(texts))):
            score = float(scores[i]) if scores is not None else None
            rows.append([trainer.global_step, str(self.prompts[i]), texts[i], score])
        columns = ["step", "prompt", "completion", "score"]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key=f"{self.name}/samples", columns=columns, data=rows)
                return
        for row in rows[:4]:
            rank_zero_info(f"  {row[1]!r} -> {row[2]!r} (score {row[3]})")


def gathered(trainer: L.Trainer, items: list) -> list:
    """Every rank's `items` (picklable), concatenated in rank order, on every rank; a collective."""
    if trainer.world_size == 1:
        return items
    shares: list[list | None] = [None] * trainer.world_size
    torch.distributed.all_gather_object(shares, items)
    return [item for share in shares for item in share]
