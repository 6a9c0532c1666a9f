"""The demo's report: report.md (every table, a sentence per row of the stage table), report.png
(the stage table) and overoptimisation.png (the RLHF runs' proxy and gold against KL). With several
seeds a number is their mean, ± half their range."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path

import torch

POLICY_COLUMNS = [
    ("format", "chat format", "percent"), ("accuracy", "exact match", "percent"),
    ("accuracy_carry", "with carry", "percent"), ("accuracy_no_carry", "without carry", "percent"),
    ("p_correct", "p(correct answer)", "percent"), ("sampled_accuracy", "exact match, sampled", "percent"),
    ("reward", "reward-model score", "number"), ("kl_to_sft", "KL to SFT (nats)", "number"),
]
RANKERS = [
    ("sft_likelihood", "SFT model, its own likelihood"), ("reward_bundled", "reward model, bundled pairs"),
    ("reward_sampled", "reward model, with the SFT model's samples"), ("implicit_dpo", "DPO + RPO, implicit reward"),
    ("implicit_dpo_sigmoid", "DPO sigmoid alone, implicit reward"),
]
TOOL_POLICIES = [("sft_tools", "SFT with a calculator tool"), ("grpo_tools", "GRPO with a calculator tool")]
TOOL_COLUMNS = [
    ("accuracy_with_tool", "exact match with the tool"), ("accuracy_without_tool", "exact match without it"),
    ("tool_call_rate", "tool-call rate"), ("malformed_rate", "malformed-call rate"),
]


def policy_sentences(scale) -> dict[str, str]:
    """What each row of the stage table is, in one sentence."""
    sentences = {
        "base": "The bundled pretrained model: it has read number text but never the chat format.",
        "sft": f"SFT ({scale.sft_epochs} epochs) on {f'the first {scale.sft_limit:,}' if scale.sft_limit else 'the 20,000'} "
               "demonstrations, which forget the carry on 65% of the problems that need one.",
        "sft_clean": f"SFT ({scale.clean_epochs} epochs) on the first {scale.clean_size:,} correct demonstrations only: "
                     "less data, none of it wrong.",
        "dpo": "DPO from SFT (sigmoid loss plus RPO's NLL on the chosen answer) on the reward model's pairs.",
        "dpo_sigmoid": "The same DPO with the sigmoid loss alone, no NLL term.",
        "ppo_exact": "PPO rewarded by exact match (RL with a verifiable reward), KL coefficient 0.05.",
        "grpo": "GRPO rewarded by exact match, 8 samples per prompt scored against each other; no reward model.",
    }
    for coef in scale.kl_coefs:
        leash = "no KL penalty: nothing holds it near SFT" if coef == 0 else f"KL coefficient {coef:g} to SFT"
        sentences[f"rlhf_kl_{coef:g}"] = f"RLHF: PPO from SFT against the learned reward model, {leash}."
    sentences["rlhf_bundled"] = (f"RLHF against the reward model of the bundled pairs alone (never the SFT model's own "
                                 f"samples), KL coefficient {scale.bundled_reward_kl_coef:g}.")
    return sentences


def spread(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half the range) of one number over the seeds."""
    return sum(values) / len(values), (max(values) - min(values)) / 2


def cell(values: Sequence[float], kind: str) -> str:
    mean, half = spread(values)
    if kind == "percent":
        return f"{100 * mean:.1f}%" + (f" ± {100 * half:.1f}" if len(values) > 1 else "")
    return f"{mean:.2f}" + (f" ± {half:.2f}" if len(values) > 1 else "")


def over_seeds(results: list[dict], *keys: str) -> list[float]:
    values = []
    for result in results:
        for key in keys:
            result = result[key]
        values.append(result)
    return values


def markdown(results: list[dict], scale, seconds: dict, machine: str, seeds: Sequence[int]) -> str:
    sentences = policy_sentences(scale)
    names = list(results[0]["policies"])
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))} (mean ± half the range)"
    lines = [
        f"Measured {date.today().isoformat()} on {machine}; {seed_text}; {seconds['wall']:.0f} s in all "
        f"({seconds['cpu']:.0f} s of CPU time). Every number is on the {results[0]['held_out']} held-out problems, "
        "greedy decoding unless it says sampled (temperature 1).",
        "",
        "| policy | " + " | ".join(label for _, label, _ in POLICY_COLUMNS) + " |",
        "| --- " * (len(POLICY_COLUMNS) + 1) + "|",
    ]
    for name in names:
        cells = [cell(over_seeds(results, "policies", name, key), kind) for key, _, kind in POLICY_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", *(f"- **{name}**: {sentences[name]}" for name in names)]
    lines += [
        "", "Who ranks the correct sum above a wrong one, on held-out pairs (share ranked right):", "",
        "| ranked by | against the plausible mistake | against the SFT model's own wrong samples |",
        "| --- | --- | --- |",
    ]
    for key, label in RANKERS:
        if key in results[0]["ranking"]["plausible"]:
            lines.append(f"| {label} | {cell(over_seeds(results, 'ranking', 'plausible', key), 'percent')} | "
                         f"{cell(over_seeds(results, 'ranking', 'sft_samples', key), 'percent')} |")
    lines += [
        "", "- The SFT model prefers what it was shown, mistake included: likelihood is not a judgement.",
        "- A reward model and DPO's implicit reward learn the ranking from the pairs.",
        "", "Different preference data, different opinion: from the same SFT model, DPO + RPO on pairs that prefer "
        "the bare sum (\"85\") to the sum with a full stop (\"85.\"), or the reverse:", "",
        "| policy | answers bare | answers with a full stop | correct, either style |", "| --- | --- | --- | --- |",
    ]
    for name in results[0]["styles"]:
        lines.append(f"| {name} | " + " | ".join(cell(over_seeds(results, "styles", name, key), "percent")
                                                 for key in ("bare", "stopped", "correct")) + " |")
    pairs = results[0]["pairs"]
    lines += ["", f"Preference pairs: {pairs['sampled']:,} for the reward model (the bundled ones and the SFT model's "
              f"wrong samples against the correct sum), {pairs['bundled']:,} bundled ones for the other. "
              "`overoptimisation.png` plots each RLHF run's reward-model score (the proxy) and exact match (the gold) "
              "against its KL to SFT as it trains, on samples of held-out prompts."]
    lines += tool_lines(results, scale)
    return "\n".join(lines) + "\n"


def tool_lines(results: list[dict], scale) -> list[str]:
    """The calculator task's table, what each row trained and what the table shows."""
    demonstrations = f"the first {scale.tool_sft_limit:,}" if scale.tool_sft_limit else "the 4,000"
    lines = [
        "", f"With a calculator: SFT ({scale.tool_sft_epochs} epochs) from the base model on {demonstrations} calculator "
        "demonstrations (half offer the `add` tool, and 30% of those call it; the direct answers forget the carry as "
        f"above), then GRPO ({scale.tool_grpo_steps} steps) from it with the tool on offer, rewarded by exact match of "
        "the last turn. With the tool: greedy episodes of up to 3 turns; without it: the plain one-turn prompt. The "
        "rates are shares of the tool episodes: with a call, and with a call the parser could not read.", "",
        "| policy | " + " | ".join(label for _, label in TOOL_COLUMNS) + " |",
        "| --- " * (len(TOOL_COLUMNS) + 1) + "|",
    ]
    for name, label in TOOL_POLICIES:
        cells = [cell(over_seeds(results, "tools", name, key), "percent") for key, _ in TOOL_COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + ["", "What it shows: the SFT model imitates its demonstrations, which mostly answer without the "
                    "tool, and GRPO, whose only reward is the right sum, learns that calling the tool earns it."]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stage_figure(results: list[dict], path: Path) -> None:
    """Exact match per policy (bars; with seeds, their range) over the stage table."""
    plt = pyplot()
    names = list(results[0]["policies"])
    figure, (bars_axis, table_axis) = plt.subplots(2, 1, figsize=(11, 8), gridspec_kw={"height_ratios": [1.1, 1]})
    for offset, (key, label) in enumerate([("accuracy", "exact match"), ("accuracy_carry", "with carry")]):
        values = [spread([100 * v for v in over_seeds(results, "policies", name, key)]) for name in names]
        bars = bars_axis.bar([x + offset * 0.4 for x in range(len(names))], [m for m, _ in values], 0.4,
                             yerr=[h for _, h in values] if len(results) > 1 else None, label=label)
        bars_axis.bar_label(bars, fmt="%.0f", fontsize=7)
    bars_axis.set_xticks([x + 0.2 for x in range(len(names))], names, rotation=20, fontsize=8)
    bars_axis.set_ylabel("% of held-out problems")
    bars_axis.set_ylim(0, 110)
    bars_axis.legend(fontsize=8, loc="upper left")
    bars_axis.set_title("plpost demo: two-digit addition, held-out problems")
    table_axis.axis("off")
    rows = [[cell(over_seeds(results, "policies", name, key), kind) for key, _, kind in POLICY_COLUMNS] for name in names]
    table = table_axis.table(cellText=rows, rowLabels=names, colLabels=[label for _, label, _ in POLICY_COLUMNS],
                             loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.scale(1, 1.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def overoptimisation_figure(results: list[dict], path: Path) -> None:
    """Proxy (reward-model score) and gold (exact match) against KL to SFT, a line per KL coefficient."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, name in zip(colors, results[0]["curves"]):
        for seed_index, result in enumerate(results):
            points = result["curves"][name]
            kl = [point["kl_to_sft"] for point in points]
            label = name.replace("rlhf_kl_", "KL coefficient ") if seed_index == 0 else None
            axes[0].plot(kl, [point["reward"] for point in points], "o-", color=color, ms=3, label=label)
            axes[1].plot(kl, [100 * point["accuracy"] for point in points], "o-", color=color, ms=3, label=label)
    axes[0].set_ylabel("reward-model score (proxy)")
    axes[1].set_ylabel("exact match, % (gold)")
    for axis in axes:
        axis.set_xlabel("KL to SFT (nats per answer, sampled)")
        axis.legend(fontsize=8)
    figure.suptitle("RLHF against a learned reward: what the policy optimises and what it should")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread"


def write_report(out: Path, results: list[dict], scale, seconds: dict, seeds: Sequence[int],
                 show: Callable[[str], None] = print) -> str:
    text = markdown(results, scale, seconds, machine_description(), seeds)
    (out / "report.md").write_text(text)
    stage_figure(results, out / "report.png")
    overoptimisation_figure(results, out / "overoptimisation.png")
    show(text)
    show(f"written: {out / 'report.md'}, {out / 'report.png'}, {out / 'overoptimisation.png'}")
    return text
