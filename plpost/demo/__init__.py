"""`plpost demo`: the whole pipeline on the bundled addition task, every claim measured on held-out prompts.

    bundled base model -> SFT -> preference pairs -> reward model -> PPO against it (RLHF), KL sweep
                              \\-> DPO (+ RPO, sigmoid alone, two answer styles)
                              \\-> PPO and GRPO rewarded by exact match (a verifiable reward)
    bundled base model -> SFT with a calculator tool -> GRPO with the tool on offer (multi-turn episodes)

The SFT demonstrations forget the carry on 65% of the problems that need one, as real
demonstrations hold plausible mistakes; SFT imitates them. RLHF's preference pairs are the
policies' own samples labelled by the checker (exact match), and PPO then optimises the learned
reward model's score with a KL penalty to SFT: exact match is the gold measure that policy never
sees. The calculator demonstrations call an `add` tool on 30% of the problems that offer it and
answer the rest directly, forgetting the carry as the addition demonstrations do; GRPO rewarded by
exact match of the last turn learns to call it. Every number in the report is measured by the run,
with fixed seeds.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from plpost.demo.data import checker_pairs, rows
from plpost.demo.measure import held_out_pairs, policy_row, ranking_accuracies, style_shares, tool_row
from plpost.demo.report import write_report
from plpost.demo.stages import BASE, QUICK, DemoScale, Pipeline
from plpost.hf import load_causal_lm, load_tokenizer
from plpost.quiet import lightning_notices_hidden


def run_seed(out: Path, scale: DemoScale, seed: int, quiet: bool) -> tuple[dict, Pipeline]:
    """Trains every stage with `seed` into `out`, then measures every policy on the held-out problems."""
    held_out = rows("eval", scale.eval_limit)
    pipeline = Pipeline(out, scale, seed=seed, quiet=quiet)
    with lightning_notices_hidden():
        trained = pipeline.run(held_out[: scale.probe_prompts])
    if not quiet:
        measured = len(trained["policies"]) + len(trained["tool_policies"]) + 1
        print(f"measuring {measured} policies on {len(held_out)} held-out problems ...", flush=True)
    policies, reward = trained["policies"], trained["reward_models"]["sampled"]
    tokenizer = load_tokenizer(policies["sft"])
    reference = load_causal_lm(policies["sft"])
    table = {name: policy_row(path, reference, tokenizer, held_out, reward) for name, path in {"base": BASE, **policies}.items()}
    prompts = [row["prompt"] for row in held_out]
    sft_pairs = checker_pairs(reference, tokenizer, prompts, samples_per_prompt=4, seed=seed)
    pairs = held_out_pairs(held_out, sft_pairs)
    preference_policies = {"dpo": policies["dpo"], "dpo_sigmoid": policies["dpo_sigmoid"]}
    ranking = {kind: ranking_accuracies(kind_pairs, tokenizer, policies["sft"], trained["reward_models"], preference_policies)
               for kind, kind_pairs in pairs.items()}
    styles = {name: style_shares(path, tokenizer, held_out) for name, path in {"sft": policies["sft"], **trained["styles"]}.items()}
    tools = {name: tool_row(path, held_out) for name, path in trained["tool_policies"].items()}
    return {"policies": table, "ranking": ranking, "styles": styles, "tools": tools, "curves": trained["curves"],
            "pairs": trained["pairs"], "held_out": len(held_out), "seed": seed}, pipeline


def run_demo(out: str | Path = "outputs/demo", *, quick: bool = False, quiet: bool = False,
             seeds: tuple[int, ...] = (0,)) -> list[dict]:
    """Runs every stage for each seed, measures every policy, writes report.md, report.json,
    report.png and overoptimisation.png into `out` (each seed's models in out/seed-N).

    The console shows a bar per stage (none with `quiet`) and the report; Lightning's notices
    (devices, why a fit stopped, exports) stay in the stages' logs. Torch runs on one thread: for
    a model this small more threads only wait on each other, and on busy cores they stall."""
    torch.set_num_threads(1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scale = QUICK if quick else DemoScale()
    started, cpu_started = time.perf_counter(), time.process_time()
    results, stage_seconds = [], {}
    for seed in seeds:
        result, pipeline = run_seed(out / f"seed-{seed}", scale, seed, quiet)
        results.append(result)
        stage_seconds[seed] = {"wall": pipeline.seconds, "cpu": pipeline.cpu_seconds}
    seconds = {"wall": time.perf_counter() - started, "cpu": time.process_time() - cpu_started, "stages": stage_seconds}
    (out / "report.json").write_text(json.dumps({"results": results, "seconds": seconds, "scale": asdict(scale)}, indent=2))
    write_report(out, results, scale, seconds, seeds)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="plpost demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/demo", help="folder for the models, logs and the report")
    parser.add_argument("--quick", action="store_true", help="a shortened run (about a minute) that checks the pipeline")
    parser.add_argument("--quiet", action="store_true", help="no progress bars: print only the report (for scripts)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="run everything once per seed and report each number's mean and spread (e.g. --seeds 0 1 2)")
    args = parser.parse_args(argv)
    run_demo(args.out, quick=args.quick, quiet=args.quiet, seeds=tuple(args.seeds))
