"""plpost's sampler against transformers' `generate` and TRL 1.16's GRPOTrainer sampling: new tokens
per CPU-second at G = 4, 8, 16 completions per prompt and prompts of 32 and 512 tokens.

    python -m benchmarks.sampling --preset cpu-tiny      # appends to RESULTS.md

One process, one model (the preset's random-weight Llama, its position table widened to hold the
longest prompt), the same prompts (token ids, no padding, decoded once for TRL as it would get
them from a dataset), the same G, sampling (temperature 1, no top-k / top-p) and completion
length for all. They take turns at every point, each from the same seed, so each
point is measured under the same load; CPU time is this process's (user + system), which counts
the work done whatever else holds the cores. TRL's path is its GRPOTrainer's own
`_generate_single_turn` (no vLLM), which samples with `generate` on the G-times repeated
prompts and cuts each completion after its stop token. New tokens are counted up to and
including each completion's stop token (a random-weight policy rarely stops: they run to the
limit). The sampler draws one uniform number per token (the same distribution, other tokens);
drawing `generate`'s random numbers instead ("generate's draws", its own column), it and TRL give
`generate`'s tokens from the same seed (checked at every point: `same tokens as generate`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.presets import get_preset  # noqa: E402

SETTINGS = {  # per preset: distinct prompts per call, new tokens, repeats of each measurement
    "cpu-tiny": dict(prompts=4, max_new_tokens=32, repeats=3, groups=(4, 8, 16), prompt_lengths=(32, 512)),
    "gpu-0.5b": dict(prompts=8, max_new_tokens=128, repeats=3, groups=(4, 8, 16), prompt_lengths=(32, 512)),
    "smoke": dict(prompts=2, max_new_tokens=4, repeats=1, groups=(2,), prompt_lengths=(8,)),
}
SEED = 0
EXACT = ("plpost sampler, generate's draws", "TRL GRPOTrainer")
"""The samplers that draw generate's random numbers: from the same seed, generate's tokens."""


def round_trip_prompts(tokenizer, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` prompts of exactly `length` token ids that decode to a text encoding back to them
    (so TRL's text prompts and the token ids are the same prompts)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    prompts: list[list[int]] = []
    while len(prompts) < count:
        ids = ordinary[torch.randint(len(ordinary), (length + 8,), generator=generator)].tolist()
        again = tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"][:length]
        if len(again) == length and tokenizer(tokenizer.decode(again), add_special_tokens=False)["input_ids"] == again:
            prompts.append(again)
    return prompts


def trl_sampler(model, tokenizer, settings: dict, group: int):
    """A GRPOTrainer set up as benchmarks/grpo.py runs it, for its sampling alone."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-sampling-"), use_cpu=model.device.type != "cuda", bf16=False,
        per_device_train_batch_size=settings["prompts"] * group, num_generations=group,
        max_completion_length=settings["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=0, report_to=[],
        gradient_checkpointing=False, generation_kwargs={"use_cache": True}, seed=SEED,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=config,
                          train_dataset=Dataset.from_list([{"prompt": "x"}] * group), processing_class=tokenizer)
    model.eval()

    def sample(prompt_ids: list[list[int]]):
        import torch

        repeated = [ids for ids in prompt_ids for _ in range(group)]
        completions, _ = trainer._generate_single_turn(repeated, None, {}, group)
        return torch.nn.utils.rnn.pad_sequence([torch.tensor(c) for c in completions], batch_first=True,
                                                padding_value=tokenizer.pad_token_id)

    return sample


def measure(preset_name: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.run import build_model_folder
    from plpost.generation import completion_stats, generation_config
    from plpost.sampling import complete

    preset, settings = get_preset(preset_name), SETTINGS[preset_name]
    if preset.threads:
        torch.set_num_threads(preset.threads)
    longest = max(settings["prompt_lengths"]) + settings["max_new_tokens"]
    folder = Path(tempfile.mkdtemp(prefix="plpost-sampling-bench-")) / "model"
    build_model_folder(dataclasses.replace(preset, max_length=max(preset.max_length, longest)), folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    device = "cuda" if preset.device == "cuda" and torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    config = generation_config(tokenizer, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                               max_new_tokens=settings["max_new_tokens"], use_cache=True)
    points = []
    for length in settings["prompt_lengths"]:
        prompts = round_trip_prompts(tokenizer, settings["prompts"], length, seed=length)
        input_ids = torch.tensor(prompts, device=device)
        attention_mask = torch.ones_like(input_ids)
        for group in settings["groups"]:
            samplers = {
                "plpost sampler": lambda g=group: complete(model, input_ids, attention_mask, config, num_samples=g),
                "plpost sampler, generate's draws": lambda g=group: complete(
                    model, input_ids, attention_mask, config, num_samples=g, backend="cached-exact"),
                "generate": lambda g=group: complete(model, input_ids, attention_mask, config, num_samples=g,
                                                     backend="generate"),
                "TRL GRPOTrainer": lambda f=trl_sampler(model, tokenizer, settings, group): f(prompts),
            }
            cpu = dict.fromkeys(samplers, 0.0)
            tokens = dict.fromkeys(samplers, 0)
            outputs = {}
            for _ in range(settings["repeats"] + 1):  # the first round warms up and is not counted
                for name, sample in samplers.items():
                    torch.manual_seed(SEED)
                    started = time.process_time()
                    with torch.no_grad():
                        completion = sample()
                    elapsed = time.process_time() - started
                    if name in outputs:
                        cpu[name] += elapsed
                        tokens[name] += int(completion_stats(completion, config.eos_token_id)[0].sum())
                    outputs[name] = completion.cpu()
            reference = outputs["generate"]
            same = all(outputs[name].shape == reference.shape and torch.equal(outputs[name], reference)
                       for name in EXACT)
            points.append({"prompt_tokens": length, "group": group, "rows": len(prompts) * group, "same_tokens": same,
                           **{f"{name}/tokens_per_cpu_s": tokens[name] / cpu[name] for name in samplers}})
            print(f"[sampling bench] {points[-1]}", flush=True)
    model.train()
    return {"preset": preset.name, "settings": settings, "points": points}


def markdown(report: dict) -> str:
    s = report["settings"]
    names = ["plpost sampler", "plpost sampler, generate's draws", "generate", "TRL GRPOTrainer"]
    lines = [
        f"## Sampling, preset `{report['preset']}`, {report['date']}",
        "",
        f"{report['machine']}; {s['prompts']} distinct prompts x G completions per call, {s['max_new_tokens']} new "
        f"tokens, temperature 1, {s['repeats']} timed calls per sampler and point after one warmup "
        f"(`python -m benchmarks.sampling --preset {report['preset']}`). New tokens per CPU-second:",
        "",
        "| prompt tokens | G | rows | " + " | ".join(names) + " | sampler / generate | same tokens as generate |",
        "| ---: | ---: | ---: | " + " | ".join("---:" for _ in names) + " | ---: | --- |",
    ]
    for point in report["points"]:
        rates = [point[f"{name}/tokens_per_cpu_s"] for name in names]
        lines.append(f"| {point['prompt_tokens']} | {point['group']} | {point['rows']} | "
                     + " | ".join(f"{rate:.0f}" for rate in rates)
                     + f" | {rates[0] / rates[2]:.2f}x | {'yes' if point['same_tokens'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-tiny")
    parser.add_argument("--results-md", default=str(REPO / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args(argv)
    from benchmarks.grpo import append_report, machine_line

    report = measure(args.preset)
    report.update(date=datetime.date.today().isoformat(), machine=machine_line(get_preset(args.preset)))
    append_report(args.results_md, markdown(report))
    return report


if __name__ == "__main__":
    main()
