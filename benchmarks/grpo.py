"""plpost's GRPOModule against TRL 1.16's GRPOTrainer (no vLLM): episodes (completions) per second,
and how a step splits between generation (sampling and scoring) and the update.

    python -m benchmarks.grpo --preset cpu-tiny          # both frameworks, appends to RESULTS.md

Same random-weight Llama as the other benchmarks (the preset's), same prompts (the preset's
synthetic preference prompts, in the same order, unshuffled), same G, completion length, prompts
per step, sampling (temperature 1, no top-p / top-k), one optimizer step per generation batch, no
KL term (beta 0: neither loads a reference), the "dapo" loss with clip 0.2, and the same cheap
reward (the completion's length against a target), so the time is the model's. A random-weight
policy rarely stops early: completions run to the limit in both. Each framework runs in its own
process; the first step is warmup and not counted. TRL's generation time is the time spent in
its `_generate_and_score_completions` (sampling, the old-log-prob pass it needs, scoring).
TRL's GRPOConfig turns gradient checkpointing on by default and the benchmark model is saved with
use_cache=False (for training, see benchmarks/run.py); both are set here as plpost runs
(checkpointing off, KV cache on while sampling), so each framework does the same work.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.presets import Preset, get_preset  # noqa: E402
from plpost.modules import ModelSettings

SETTINGS = {  # per preset: prompts per step, G, new tokens, timed steps
    "cpu-tiny": dict(prompts=8, generations=8, max_new_tokens=32, steps=4),
    "gpu-0.5b": dict(prompts=16, generations=8, max_new_tokens=128, steps=4),
    "smoke": dict(prompts=2, generations=2, max_new_tokens=4, steps=1),
}
TARGET_CHARACTERS = 40
LR = 1e-6


def length_reward(prompts, completions, **columns) -> list[float]:
    """1 at TARGET_CHARACTERS characters, falling linearly with the distance from it."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [1.0 - abs(len(text) - TARGET_CHARACTERS) / TARGET_CHARACTERS for text in texts]


def run_plpost(preset: Preset, settings: dict, model_dir: str, prompts: list[dict]) -> dict:
    import lightning as L
    import torch

    from plpost import GRPOModule, PromptDataModule
    from plpost.rewards import RewardFunction

    timed: list[dict] = []

    class Times(L.Callback):
        def on_train_batch_start(self, *args) -> None:
            self.cpu = time.process_time()

        def on_train_batch_end(self, trainer, module, *args) -> None:
            timed.append({k: float(trainer.callback_metrics[k]) for k in ("time/generation_s", "time/update_s")})
            timed[-1]["cpu_s"] = time.process_time() - self.cpu

    module = GRPOModule(
        model_dir, rewards=[RewardFunction(length_reward)], num_generations=settings["generations"],
        max_new_tokens=settings["max_new_tokens"], loss_type="dapo", epsilon_low=0.2, beta=0.0, model_settings=ModelSettings(dtype="float32"), gradient_clip_val=1.0, optimizer=lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=0.0),
    )
    data = PromptDataModule(model_dir, train=prompts, batch_size=settings["prompts"], max_prompt_length=preset.max_length,
                            shuffle=False)
    trainer = L.Trainer(accelerator="gpu" if preset.device == "cuda" else "cpu", devices=1, precision="32-true",
                        max_steps=settings["steps"] + 1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Times()])
    trainer.fit(module, data)
    return summarise(timed[1:], settings)


def run_trl(preset: Preset, settings: dict, model_dir: str, prompts: list[dict]) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    timed: list[dict] = []
    generation = {"s": 0.0}

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, *args, **kwargs):
            started = time.perf_counter()
            out = super()._generate_and_score_completions(*args, **kwargs)
            generation["s"] += time.perf_counter() - started
            return out

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            generation["s"], self.started, self.cpu = 0.0, time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            total = time.perf_counter() - self.started
            timed.append({"time/generation_s": generation["s"], "time/update_s": total - generation["s"],
                          "cpu_s": time.process_time() - self.cpu})

    completions = settings["prompts"] * settings["generations"]
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-grpo-"), use_cpu=preset.device != "cuda", bf16=False,
        per_device_train_batch_size=completions, gradient_accumulation_steps=1, steps_per_generation=1,
        num_generations=settings["generations"], max_completion_length=settings["max_new_tokens"],
        temperature=1.0, top_p=1.0, top_k=0, loss_type="dapo", epsilon=0.2, beta=0.0, num_iterations=1,
        learning_rate=LR, weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        max_steps=settings["steps"] + 1, logging_steps=1, report_to=[], save_strategy="no", shuffle_dataset=False,
        disable_dropout=True, seed=preset.seed, dataloader_num_workers=0,
        gradient_checkpointing=False, generation_kwargs={"use_cache": True},
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = TimedGRPOTrainer(model=model, reward_funcs=length_reward, args=config, callbacks=[StepTimes()],
                               train_dataset=Dataset.from_list(prompts),
                               processing_class=AutoTokenizer.from_pretrained(model_dir, padding_side="left"))
    trainer.train()
    return summarise(timed[1:], settings)


def summarise(timed: list[dict], settings: dict) -> dict:
    generation = sum(t["time/generation_s"] for t in timed)
    update = sum(t["time/update_s"] for t in timed)
    episodes = settings["prompts"] * settings["generations"] * len(timed)
    cpu = sum(t["cpu_s"] for t in timed)
    return {"steps": len(timed), "episodes": episodes, "episodes_per_s": episodes / (generation + update),
            "episodes_per_cpu_s": episodes / cpu, "cpu_s": cpu,
            "generation_s": generation, "update_s": update, "generation_share": generation / (generation + update)}


def worker(framework: str, spec_file: str, result_file: str) -> int:
    import torch

    spec = json.loads(Path(spec_file).read_text())
    preset = Preset(**spec["preset"])
    if preset.threads:
        torch.set_num_threads(preset.threads)
    run = run_plpost if framework == "plpost" else run_trl
    started = time.perf_counter()
    result = run(preset, spec["settings"], spec["model_dir"], spec["prompts"])
    result.update(framework=framework, wall_s=time.perf_counter() - started)
    Path(result_file).write_text(json.dumps(result, indent=1))
    return 0


def markdown(report: dict) -> str:
    s, rows = report["settings"], report["runs"]
    lines = [
        f"## GRPO, preset `{report['preset']}`, {report['date']}",
        "",
        f"{report['machine']}; {s['prompts']} prompts x G = {s['generations']} completions per step, up to "
        f"{s['max_new_tokens']} new tokens, one optimizer step per generation batch, beta 0, loss `dapo`, "
        f"{s['steps']} timed steps after one warmup step (`python -m benchmarks.grpo --preset {report['preset']}`).",
        "",
        "| framework | episodes/s | episodes per CPU-s | generation s | update s | generation share |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(f"| {row['framework']} | {row['episodes_per_s']:.1f} | {row['episodes_per_cpu_s']:.1f} | "
                     f"{row['generation_s']:.2f} | {row['update_s']:.2f} | {100 * row['generation_share']:.0f}% |")
    by_name = {row["framework"]: row for row in rows}
    if {"plpost", "trl"} <= by_name.keys():
        wall = by_name["plpost"]["episodes_per_s"] / by_name["trl"]["episodes_per_s"]
        cpu = by_name["plpost"]["episodes_per_cpu_s"] / by_name["trl"]["episodes_per_cpu_s"]
        lines += ["", f"plpost / TRL: {wall:.2f}x episodes/s (wall clock), {cpu:.2f}x episodes per CPU-second "
                      "(the load-independent ratio on a shared machine)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-tiny")
    parser.add_argument("--frameworks", default="plpost,trl")
    parser.add_argument("--results-md", default=str(REPO / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from benchmarks.data import preference_rows
    from benchmarks.measure import machine
    from benchmarks.run import build_model_folder, subprocess_env

    preset, settings = get_preset(args.preset), SETTINGS[args.preset]
    workdir = Path(tempfile.mkdtemp(prefix="plpost-grpo-bench-"))
    build_model_folder(preset, workdir / "model")
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    count = settings["prompts"] * (settings["steps"] + 1)
    prompts = [{"prompt": row["prompt"]} for row in preference_rows(preset, count, tokenizer)]
    spec = {"preset": asdict(preset), "settings": settings, "model_dir": str(workdir / "model"), "prompts": prompts}
    (workdir / "spec.json").write_text(json.dumps(spec))
    runs = []
    for framework in args.frameworks.split(","):
        out = workdir / f"{framework}.json"
        code = subprocess.run([sys.executable, "-m", "benchmarks.grpo", "--worker", framework, str(workdir / "spec.json"),
                               str(out)], cwd=REPO, env=subprocess_env(preset)).returncode
        if code or not out.exists():
            raise SystemExit(f"{framework} failed with exit code {code}")
        runs.append(json.loads(out.read_text()))
        print(f"[grpo bench] {framework}: {runs[-1]}", flush=True)
    described = machine()
    report = {"preset": preset.name, "date": datetime.date.today().isoformat(), "settings": settings, "runs": runs,
              "machine": f"{described.get('cpu', '?')}, {described.get('cores', '?')} cores, {preset.threads or 'all'} "
                         f"thread(s) per run, load average {described['load_avg'][0]:.1f} at the end"}
    text = markdown(report)
    with open(args.results_md, "a") as handle:
        handle.write("\n" + text)
    print(text)
    return report


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        raise SystemExit(worker(*sys.argv[2:5]))
    main()
