"""`plpost demo`: the whole pipeline on the bundled addition task, measured on held-out prompts.

    bundled base model -> SFT -> reward model -> PPO
                              \\-> DPO
                              \\-> GRPO (no reward model: exact match, G samples per prompt)

The SFT demonstrations forget the carry on 65% of the problems that need one, as real
demonstrations hold plausible mistakes; SFT imitates them. The preference pairs prefer the
correct answer to the plausible mistake, and PPO and GRPO are rewarded by exact match; all should
lift accuracy above SFT. Every number in the report is measured by the run, with fixed seeds.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from plpost import ChatDataModule, DPOModule, GRPOModule, PPOModule, PreferenceDataModule, PromptDataModule, RewardModule
from plpost import SFTModule
from plpost.callbacks import HFExport, StageProgressBar
from plpost.data.sources import DataSource, load_source
from plpost.evaluation import greedy_report, learned_rewards, sampled_kl
from plpost.hf import load_causal_lm, load_tokenizer
from plpost.optim import WarmupCosineLR
from plpost.quiet import lightning_notices_hidden
from plpost.rewards import RewardFunction
from plpost.tasks.addition import AdditionProblem, exact_match_reward

BASE = "plpost:tiny"
DATA = "plpost:data/addition/"
ANSWER_FORMAT = r"[0-9]+"


@dataclass
class DemoScale:
    """How much each stage trains; `quick` shrinks everything for tests."""

    sft_epochs: int = 3
    sft_limit: int | None = None
    reward_epochs: int = 3
    preference_limit: int | None = None
    dpo_epochs: int = 1
    ppo_steps: int = 120
    grpo_steps: int = 40
    eval_limit: int | None = None


QUICK = DemoScale(sft_epochs=1, sft_limit=1500, reward_epochs=1, preference_limit=600, dpo_epochs=1, ppo_steps=3, grpo_steps=2,
                  eval_limit=40)


def adamw(lr: float):
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def cosine(warmup_steps: int):
    return lambda optimizer: WarmupCosineLR(optimizer, warmup_steps=warmup_steps, min_lr_ratio=0.1)


STAGE_LABELS = {"sft": "[1/5] SFT", "reward": "[2/5] reward model", "dpo": "[3/5] DPO", "ppo": "[4/5] PPO",
                "grpo": "[5/5] GRPO"}


def fit(module: L.LightningModule, data: L.LightningDataModule, out: Path, stage: str, *, quiet: bool = False,
        **trainer) -> float:
    """Trains one stage (with a bar for it unless `quiet`), exports it to out/stage, and returns the seconds it took."""
    L.seed_everything(0, verbose=False)
    started = time.perf_counter()
    progress = [] if quiet else [StageProgressBar(STAGE_LABELS[stage])]
    L.Trainer(
        logger=CSVLogger(out / "logs", name=stage), callbacks=[HFExport(str(out / stage)), *progress],
        enable_checkpointing=False, enable_progress_bar=not quiet, enable_model_summary=False, log_every_n_steps=10,
        **trainer,
    ).fit(module, data)
    return time.perf_counter() - started


def run_stages(out: Path, scale: DemoScale, quiet: bool = False) -> dict[str, float]:
    seconds = {}
    sft_data = ChatDataModule(BASE, train=DataSource(DATA + "sft.jsonl", limit=scale.sft_limit), batch_size=16,
                              max_length=32)
    seconds["sft"] = fit(SFTModule(BASE, optimizer=adamw(1e-3), scheduler=cosine(50)), sft_data, out, "sft",
                         quiet=quiet, max_epochs=scale.sft_epochs)
    sft = str(out / "sft")
    preferences = DataSource(DATA + "preference.jsonl", limit=scale.preference_limit)
    reward_data = PreferenceDataModule(sft, train=preferences, val_size=200 if not scale.preference_limit else 100,
                                       batch_size=128, max_length=32)
    reward = RewardModule(sft, optimizer=adamw(5e-4), scheduler=cosine(10))
    seconds["reward"] = fit(reward, reward_data, out, "reward", quiet=quiet, max_epochs=scale.reward_epochs)
    dpo_data = PreferenceDataModule(sft, train=preferences, batch_size=32, max_length=32)
    seconds["dpo"] = fit(DPOModule(sft, beta=0.1, rpo_alpha=1.0, optimizer=adamw(3e-4), scheduler=cosine(10)),
                         dpo_data, out, "dpo", quiet=quiet, max_epochs=scale.dpo_epochs)
    ppo_data = PromptDataModule(sft, train=DATA + "prompts.jsonl", batch_size=64)
    ppo = PPOModule(sft, rewards=[RewardFunction(exact_match_reward)], missing_eos_penalty=1.0, max_new_tokens=6, kl_coef=0.05,
                    ppo_epochs=4, optimizer=adamw(3e-4))
    seconds["ppo"] = fit(ppo, ppo_data, out, "ppo", quiet=quiet, max_steps=scale.ppo_steps)
    # 16 prompts x 8 completions per step, each compared with the 7 others of its prompt: no value
    # model, no reward model, and (beta 0) no reference.
    grpo_data = PromptDataModule(sft, train=DATA + "prompts.jsonl", batch_size=16)
    grpo = GRPOModule(sft, rewards=[RewardFunction(exact_match_reward)], num_generations=8, max_new_tokens=6,
                      epsilon_high=0.28, mask_truncated_completions=True, optimizer=adamw(2e-4))
    seconds["grpo"] = fit(grpo, grpo_data, out, "grpo", quiet=quiet, max_steps=scale.grpo_steps)
    return seconds


def held_out_pairwise_accuracy(reward_path: Path, limit: int | None) -> float:
    """Share of held-out preference pairs whose chosen answer the reward model scores higher.

    The pairs are built from the held-out evaluation problems (never trained on): chosen is the
    correct sum, rejected the plausible mistake, as in the training pairs.
    """
    tokenizer = load_tokenizer(str(reward_path))
    rows = list(load_source(DATA + "eval.jsonl"))[:limit]
    prompts = [row["prompt"] for row in rows]
    correct = [row["answer"] for row in rows]
    problems = [AdditionProblem(*map(int, row["prompt"][-1]["content"].split("+"))) for row in rows]
    mistaken = [problem.plausible_mistake for problem in problems]
    chosen = learned_rewards(str(reward_path), tokenizer, prompts, correct)
    rejected = learned_rewards(str(reward_path), tokenizer, prompts, mistaken)
    return float((chosen > rejected).float().mean())


def measure(out: Path, scale: DemoScale) -> dict[str, dict[str, float]]:
    tokenizer = load_tokenizer(str(out / "sft"))
    rows = list(load_source(DATA + "eval.jsonl"))[: scale.eval_limit]
    prompts = [row["prompt"] for row in rows]
    columns = {"answer": [row["answer"] for row in rows]}
    carry = torch.tensor([row["has_carry"] for row in rows])
    reference = load_causal_lm(str(out / "sft"))
    table = {}
    for name, path in [("base", BASE), *((stage, out / stage) for stage in ("sft", "dpo", "ppo", "grpo"))]:
        policy = load_causal_lm(str(path))
        report = greedy_report(policy, tokenizer, prompts, exact_match_reward, columns, answer_format=ANSWER_FORMAT)
        row = {
            "format": float(report.well_formed.float().mean()),
            "accuracy": float(report.scores.mean()),
            "accuracy_carry": float(report.scores[carry].mean()),
            "accuracy_no_carry": float(report.scores[~carry].mean()),
            "mean_reward": float(learned_rewards(str(out / "reward"), tokenizer, prompts, report.completions).mean()),
        }
        if name in ("dpo", "ppo", "grpo"):
            row["kl_to_sft"] = sampled_kl(policy, reference, tokenizer, prompts)
        table[name] = row
    table["reward_model"] = {"pairwise_accuracy": held_out_pairwise_accuracy(out / "reward", scale.eval_limit)}
    return table


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def markdown_table(table: dict, seconds: dict[str, float], machine: str) -> str:
    """The report: one row per policy, measured on the held-out problems with greedy decoding."""
    lines = [
        f"Measured {date.today().isoformat()} on {machine}; {seconds['total']:.0f} s in all "
        f"(SFT {seconds['sft']:.0f} s, reward model {seconds['reward']:.0f} s, DPO {seconds['dpo']:.0f} s, "
        f"PPO {seconds['ppo']:.0f} s, GRPO {seconds['grpo']:.0f} s).",
        "",
        "| policy | chat format | accuracy | with carry | without carry | reward-model score | KL to SFT (nats) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("base", "sft", "dpo", "ppo", "grpo"):
        row = table[name]
        kl = f"{row['kl_to_sft']:.2f}" if "kl_to_sft" in row else "-"
        lines.append(
            f"| {name} | {percent(row['format'])} | {percent(row['accuracy'])} | {percent(row['accuracy_carry'])} | "
            f"{percent(row['accuracy_no_carry'])} | {row['mean_reward']:.2f} | {kl} |"
        )
    lines += ["", f"Reward model, held-out pairwise accuracy: {percent(table['reward_model']['pairwise_accuracy'])}."]
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["base", "sft", "dpo", "ppo", "grpo"]
    metrics = [("format", "chat format"), ("accuracy", "accuracy"), ("accuracy_carry", "accuracy, carry problems")]
    figure, axis = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(metrics)
    for i, (key, label) in enumerate(metrics):
        values = [100 * table[name][key] for name in names]
        bars = axis.bar([x + i * width for x in range(len(names))], values, width, label=label)
        axis.bar_label(bars, fmt="%.0f", fontsize=7)
    axis.set_xticks([x + width for x in range(len(names))], [n.upper() if n != "base" else "base" for n in names])
    axis.set_ylabel("% of held-out problems")
    axis.set_ylim(0, 105)
    axis.legend(fontsize=8, loc="upper left")
    axis.set_title("plpost demo: two-digit addition, greedy decoding")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def machine_description() -> str:
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def run_demo(out: str | Path = "outputs/demo", *, quick: bool = False, quiet: bool = False) -> dict:
    """Runs every stage, measures every policy, writes report.md, report.json and report.png.

    The console shows a bar per stage (none with `quiet`) and the report; Lightning's notices
    (devices, why a fit stopped, exports) stay in the stages' logs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scale = QUICK if quick else DemoScale()
    started = time.perf_counter()
    with lightning_notices_hidden():
        seconds = run_stages(out, scale, quiet)
    if not quiet:
        print(f"measuring base, SFT, DPO, PPO and GRPO on {scale.eval_limit or 300} held-out problems ...", flush=True)
    table = measure(out, scale)
    seconds["total"] = time.perf_counter() - started
    report = markdown_table(table, seconds, machine_description())
    (out / "report.md").write_text(report)
    (out / "report.json").write_text(json.dumps({"table": table, "seconds": seconds, "scale": asdict(scale)}, indent=2))
    plot(table, out / "report.png")
    print(report)
    print(f"written: {out / 'report.md'}, {out / 'report.png'}")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="plpost demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/demo", help="folder for the models, logs and the report")
    parser.add_argument("--quick", action="store_true", help="a shortened run (about a minute) that checks the pipeline")
    parser.add_argument("--quiet", action="store_true", help="no progress bars: print only the report (for scripts)")
    args = parser.parse_args(argv)
    run_demo(args.out, quick=args.quick, quiet=args.quiet)
