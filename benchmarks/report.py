"""The markdown tables of one harness run (appended to benchmarks/RESULTS.md)."""

from __future__ import annotations

from collections import defaultdict

FRAMEWORK_ORDER = {"plpost": 0, "trl": 1, "raw": 2}


def best_runs(runs: list[dict]) -> dict[tuple[str, str, str], dict]:
    """(stage, variant, framework) -> its fastest successful repeat (a failure where none succeeded)."""
    best: dict[tuple[str, str, str], dict] = {}
    for run in runs:
        key = (run["stage"], run["variant"], run["framework"])
        current = best.get(key)
        if current is None:
            best[key] = run
            continue
        faster = run.get("ok") and (not current.get("ok") or run["tokens_per_s"] > current["tokens_per_s"])
        if faster:
            best[key] = run
    return best


def ratio(a: dict | None, b: dict | None, key: str = "tokens_per_s") -> str:
    if not (a and b and a.get("ok") and b.get("ok")):
        return "-"
    return f"{a[key] / b[key]:.2f}x"


def cpu_ratio(a: dict, b: dict) -> str:
    return f" ({ratio(a, b, 'tokens_per_cpu_s')} per CPU-s)" if "tokens_per_cpu_s" in a and "mfu" not in a else ""


def header(report: dict) -> list[str]:
    preset, machine, v = report["preset"], report["machine"], report["versions"]
    model = preset["model"]
    load_start = "/".join(f"{x:.1f}" for x in machine["load_avg"])
    load_end = "/".join(f"{x:.1f}" for x in report["load_avg_end"])
    repeats = preset["repeats"]
    return [
        f"## {preset['name']}, {report['date']}",
        "",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, GPU: {machine['gpu'] or 'none'}; "
        f"load average (1/5/15 min) {load_start} at start, {load_end} at end",
        f"- versions: torch {v['torch']}, transformers {v['transformers']}, lightning {v['lightning']}, "
        f"trl {v['trl']}, accelerate {v['accelerate']}, python {v['python']}, plpost {v['plpost']}",
        f"- model: Llama, hidden {model['hidden_size']}, {model['num_hidden_layers']} layers, "
        f"{model['num_attention_heads']} heads ({model['num_key_value_heads']} kv), mlp {model['intermediate_size']}, "
        f"vocab {model['vocab_size']}; {preset['precision']}, sdpa attention, AdamW lr {preset['learning_rate']} "
        f"(fused: {preset['fused_adamw']}), no clipping, no gradient checkpointing",
        f"- data: synthetic chat, lognormal lengths (median prompt {preset['prompt_median']}, completion "
        f"{preset['completion_median']}, sigma {preset['length_sigma']}), max_length {preset['max_length']}; "
        f"batch {preset['batch_size']} sequences (SFT) / pairs (reward, DPO); {preset['warmup_steps']} warmup + "
        f"{preset['timed_steps']} timed steps; "
        + (f"best of {repeats} interleaved repeats" if repeats > 1 else "one repeat")
        + f"; {preset['notes'] or ''}; harness wall time {report['wall_s']:.0f} s",
        "",
    ]


def throughput_table(report: dict) -> list[str]:
    best = best_runs(report["runs"])
    cuda = report["preset"]["device"] == "cuda"
    # On a CPU the machine may be shared: tokens per CPU-second (and its ratios) do not depend on the load.
    columns = ["stage", "variant", "framework", "real tokens/s", "steps/s", "vs TRL", "of raw"]
    columns += ["MFU"] if cuda else ["tokens/CPU-s", "vs TRL (CPU-s)", "of raw (CPU-s)"]
    columns += ["padding", "peak mem (MiB)", "set-up s"]
    lines = ["| " + " | ".join(columns) + " |", "| --- | --- | --- |" + " ---: |" * (len(columns) - 3)]
    for (stage, variant, framework), run in sorted(
        best.items(), key=lambda kv: (report_case_order(report, kv[0][:2]), FRAMEWORK_ORDER[kv[0][2]])
    ):
        if not run.get("ok"):
            lines.append(f"| {stage} | {variant} | {framework} | failed: {run.get('error', '?')[:160]} |"
                         + " |" * (len(columns) - 4))
            continue
        trl, raw = best.get((stage, variant, "trl")), best.get((stage, variant, "raw"))
        check = " (tokens differ from the data!)" if run.get("tokens_match_data") is False else ""
        cells = [stage, variant, framework, f"{run['tokens_per_s']:.0f}{check}", f"{run['steps_per_s']:.2f}",
                 ratio(run, trl), ratio(run, raw)]
        if cuda:
            cells.append(f"{100 * run['mfu']:.1f}%")
        else:
            cells += [f"{run['tokens_per_cpu_s']:.0f}", ratio(run, trl, "tokens_per_cpu_s"),
                      ratio(run, raw, "tokens_per_cpu_s")]
        cells += [f"{100 * run['padding_fraction']:.0f}%", f"{run['peak_mem_mib']:.0f}", f"{run['setup_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    mem = "peak RSS of the whole process" if not cuda else "torch.cuda.max_memory_allocated"
    lines += [
        "",
        "real tokens: non-pad tokens fed to the model (a pair counts prompt + chosen and prompt + rejected); "
        + ("MFU: 6 x matmul params x real tokens/s / peak (no attention term, no reference forward); " if cuda else
           "tokens/CPU-s: real tokens per second of CPU time this process used in the timed window "
           "(independent of the load); ")
        + "padding: share of pad tokens in the collated two-row batches (plpost's shared-prompt rows feed each "
        f"prompt once and are not counted here); peak mem: {mem}; set-up: process start to the first "
        "step (imports, model load, tokenization, a precomputed reference pass).",
        "",
    ]
    return lines


def report_case_order(report: dict, case: tuple[str, str]) -> int:
    cases = [tuple(c) for c in report["preset"]["cases"]]
    return cases.index(case) if case in cases else len(cases)


def optimisation_lines(report: dict) -> list[str]:
    best = best_runs(report["runs"])
    lines = ["| optimisation | framework | before | after | speed-up | peak mem before -> after (MiB) |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    pairs = [("SFT packing (padding-free) vs padded", "sft", "padded", "padding-free"),
             ("SFT activation checkpointing vs none (padded)", "sft", "padded", "checkpointed"),
             ("SFT torch.compile vs eager (padded)", "sft", "padded", "compiled"),
             ("DPO precomputed reference vs live copy", "dpo", "live-ref", "precomputed-ref"),
             ("reward pairs packed vs padded", "reward", "padded", "padding-free"),
             ("reward prompt shared by chosen and rejected vs two padded rows", "reward", "two-row", "padded"),
             ("DPO prompt shared vs two padded rows (live reference)", "dpo", "two-row", "live-ref"),
             ("reward pairs length-grouped vs padded", "reward", "padded", "length-grouped"),
             ("DPO pairs packed vs padded (live reference)", "dpo", "live-ref", "padding-free")]
    for title, stage, before_variant, after_variant in pairs:
        for framework in ("plpost", "trl", "raw"):
            before, after = best.get((stage, before_variant, framework)), best.get((stage, after_variant, framework))
            if not (before and after and before.get("ok") and after.get("ok")):
                continue
            lines.append(
                f"| {title} | {framework} | {before['tokens_per_s']:.0f} tok/s | {after['tokens_per_s']:.0f} tok/s | "
                f"{ratio(after, before)}{cpu_ratio(after, before)} | "
                f"{before['peak_mem_mib']:.0f} -> {after['peak_mem_mib']:.0f} |"
            )
    for entry in report.get("logprob_memory", []):
        if "error" in entry:
            lines.append(f"| log-probs, {entry['variant']} | plpost | failed: {entry['error']} | | | |")
    measured = {e["variant"]: e for e in report.get("logprob_memory", []) if "error" not in e}
    if len(measured) == 2:
        naive, chunked = measured["naive"], measured["chunked"]
        lines.append(
            f"| chunked `token_logprobs` vs `log_softmax(logits.float())`, {naive['tokens']} tokens x "
            f"{naive['vocab']} vocab {naive['dtype']} logits ({naive['logits_mib']:.0f} MiB), fwd + bwd | plpost | "
            f"{naive['time_s'] * 1000:.0f} ms | {chunked['time_s'] * 1000:.0f} ms | "
            f"{naive['time_s'] / chunked['time_s']:.2f}x | extra peak {naive['extra_peak_mib']:.0f} -> "
            f"{chunked['extra_peak_mib']:.0f} |"
        )
    return lines + [""] if len(lines) > 2 else []


def fsdp_lines(report: dict) -> list[str]:
    smoke = report.get("fsdp_smoke")
    if not smoke:
        return []
    lines = ["FSDP smoke (plpost, Lightning `FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer})`, 1 device):", "",
             "| stage | ok | steps | FSDP units (in the reference) | loss | peak mem (MiB) | fit s |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for entry in smoke:
        if "error" in entry:
            lines.append(f"| {entry.get('stage', '?')} | failed: {entry['error'][:160]} | | | | | |")
            continue
        lines.append(
            f"| {entry['stage']} | {entry['ok']} | {entry['steps']} | {entry['fsdp_units']} "
            f"({entry['fsdp_units_in_reference']}) | {entry['loss']:.3f} | {entry['peak_mem_mib']:.0f} | "
            f"{entry['fit_s']:.1f} |"
        )
    return lines + [""]


def ppo_lines(report: dict) -> list[str]:
    ppo = report.get("ppo")
    if not ppo:
        return []
    if not ppo.get("ok"):
        return [f"PPO (plpost): failed: {ppo.get('error', '?')}", ""]
    return [
        f"PPO (plpost; TRL 1.16 has no PPO trainer): {ppo['rollouts']} timed rollouts of {ppo['prompts_per_rollout']} "
        f"prompts, up to {ppo['max_new_tokens']} new tokens (mean response {ppo['response_length']:.1f} tokens), "
        "2 PPO epochs x 2 mini-batches, value head on the policy, frozen reference copy:",
        "",
        "| episodes/s | generation + scoring s | update s | generation share | peak mem (MiB) |",
        "| ---: | ---: | ---: | ---: | ---: |",
        f"| {ppo['episodes_per_s']:.1f} | {ppo['generation_s']:.2f} | {ppo['update_s']:.2f} | "
        f"{100 * ppo['generation_share']:.0f}% | {ppo['peak_mem_mib']:.0f} |",
        "",
    ]


def mismatches(report: dict) -> list[str]:
    wrong = [r for r in report["runs"] if r.get("ok") and r.get("tokens_match_data") is False]
    return [f"WARNING: {r['framework']} {r['stage']} {r['variant']} trained on {r['real_tokens']} real tokens, "
            f"the data holds {r['expected_real_tokens']}" for r in wrong]


def render(report: dict) -> str:
    lines = header(report) + throughput_table(report)
    settings = settings_table(report)
    if settings:
        lines += ["Settings per framework:", "", *settings, ""]
    optimisations = optimisation_lines(report)
    if optimisations:
        lines += ["Optimisations, before/after (same run):", ""] + optimisations
    lines += fsdp_lines(report) + ppo_lines(report) + mismatches(report)
    return "\n".join(lines) + "\n"


def settings_table(report: dict) -> list[str]:
    """What each framework was configured with, per case (from the runs themselves)."""
    settings = defaultdict(dict)
    for run in report["runs"]:
        if run.get("ok"):
            settings[(run["stage"], run["variant"])][run["framework"]] = run.get("settings", "")
    lines = []
    for (stage, variant), by in settings.items():
        ordered = sorted(by.items(), key=lambda kv: FRAMEWORK_ORDER[kv[0]])
        lines.append(f"- {stage} {variant}: " + "; ".join(f"{framework}: {s}" for framework, s in ordered))
    return lines
