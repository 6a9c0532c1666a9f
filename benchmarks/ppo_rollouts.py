"""plpost's PPO on the preset's model: episodes per second, and how a rollout splits between
generation (sampling, then the scoring forwards of policy, value and reference) and the update.

    python -m benchmarks.ppo_rollouts SPEC.json RESULT.json

TRL 1.16 has no PPO trainer and the raw loop has no sampler, so this measures plpost alone. The
prompts are the preset's synthetic preference prompts; the reward is a cheap Python function (the
response's length against a target), so the time is the model's, not a reward model's. The
policy starts from random weights and rarely stops early, so responses run to max_new_tokens:
the worst case for generation. The first rollout is warmup and not counted.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import lightning as L
import torch

from benchmarks.data import read_rows
from benchmarks.frameworks import adamw, attention_implementation
from benchmarks.frameworks.plpost_stages import PRECISION
from benchmarks.measure import peak_memory
from benchmarks.presets import Preset
from plpost.data.prompts import PromptDataModule
from plpost.modules import ModelSettings
from plpost.modules.ppo import PPOModule
from plpost.rewards import RewardFunction

TARGET_CHARACTERS = 40
TIMES = ("time/generation_s", "time/update_s", "perf/episodes_per_s", "rollout/response_length")


def length_reward(prompts, completions, **columns) -> torch.Tensor:
    """1 at TARGET_CHARACTERS characters, falling linearly with the distance from it."""
    return torch.tensor([1.0 - abs(len(text) - TARGET_CHARACTERS) / TARGET_CHARACTERS for text in completions])


class RolloutTimes(L.Callback):
    """Keeps what PPOModule logged for each rollout."""

    def __init__(self) -> None:
        self.rollouts: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rollouts.append({name: float(trainer.callback_metrics[name]) for name in TIMES})


def measure(preset: Preset, model_dir: str, rows: list[dict]) -> dict:
    torch.manual_seed(preset.seed)
    module = PPOModule(
        model_dir, rewards=[RewardFunction(length_reward)], max_new_tokens=preset.ppo_max_new_tokens,
        ppo_epochs=2, num_mini_batches=2, model_settings=ModelSettings(dtype="float32", attn_implementation=attention_implementation()), optimizer=adamw(preset),
    )
    needed = preset.ppo_prompts * (preset.ppo_rollouts + 1)
    prompts = [{"prompt": rows[i % len(rows)]["prompt"]} for i in range(needed)]
    data = PromptDataModule(model_dir, train=prompts, batch_size=preset.ppo_prompts, max_prompt_length=preset.max_length,
                            shuffle=False, seed=preset.seed)
    times = RolloutTimes()
    if preset.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(
        accelerator="gpu" if preset.device == "cuda" else "cpu", devices=1, precision=PRECISION[preset.precision],
        max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[times],
    )
    trainer.fit(module, data)
    timed = times.rollouts[1:]
    generation = sum(r["time/generation_s"] for r in timed)
    update = sum(r["time/update_s"] for r in timed)
    episodes = preset.ppo_prompts * len(timed)
    return {
        "rollouts": len(timed), "prompts_per_rollout": preset.ppo_prompts, "max_new_tokens": preset.ppo_max_new_tokens,
        "episodes_per_s": episodes / (generation + update), "generation_s": generation, "update_s": update,
        "generation_share": generation / (generation + update),
        "response_length": sum(r["rollout/response_length"] for r in timed) / len(timed),
        **peak_memory(preset.device),
    }


def main(spec_file: str, result_file: str) -> int:
    spec = json.loads(Path(spec_file).read_text())
    preset = Preset(**spec["preset"])
    if preset.threads:
        torch.set_num_threads(preset.threads)
    try:
        result = {"ok": True, **measure(preset, spec["model_dir"], read_rows(spec["rows_file"]))}
    except Exception as error:  # reported in the results, not raised: the harness goes on
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(error).__name__}: {error}"[:500]}
    Path(result_file).write_text(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
