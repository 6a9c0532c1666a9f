"""plpost against TRL and a raw torch loop: SFT, reward modelling and DPO, one command, one run.

    python benchmarks/run.py --preset cpu-tiny                  # a few minutes on 2 CPU cores
    python benchmarks/run.py --preset gpu-0.5b                  # one GPU (benchmarks/gpu.sh)
    python benchmarks/run.py --preset cpu-tiny --frameworks raw --stages sft --steps 2

The harness builds one random-weight Llama from the preset's config and saves it, with the bundled
byte-level tokenizer, to a folder every framework loads; it generates the synthetic rows once
(benchmarks/data.py) and writes them to a file every framework reads, in the same order. Each
(stage, variant, framework) then runs in its own subprocess (benchmarks/worker.py), so peak
memory is per run and no framework inherits another's warm state. With --repeats N the whole
plan runs N times, interleaved, and the table keeps each configuration's fastest repeat (the one
least disturbed by other load on the machine); the JSON keeps every repeat.

Writes benchmarks/results/<preset>-<time>.json (or under $OUT) and appends the markdown tables to
benchmarks/RESULTS.md (or --results-md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `benchmarks` and `plpost` importable
    sys.path.insert(0, str(REPO))

from benchmarks.measure import machine, versions  # noqa: E402
from benchmarks.presets import FRAMEWORKS, ONLY, STAGES, Preset, get_preset  # noqa: E402
from benchmarks.report import render  # noqa: E402

TOKENIZER_DIR = REPO / "plpost" / "assets" / "tiny"
H100_BF16_DENSE_FLOPS = 989e12
MIN_RUN_S = 45  # no run starts with less time than this left before --deadline-s
LOG_TAIL_LINES = 60


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-tiny", help="cpu-tiny, gpu-0.5b or smoke (see presets.py)")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="comma-separated subset of plpost,trl,raw")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of sft,reward,dpo")
    parser.add_argument("--variants", default=None, help="comma-separated variants to keep (default: the preset's)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default: the preset's)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warmup steps, at least 1")
    parser.add_argument("--repeats", type=int, default=None, help="run the whole plan this many times, interleaved")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per run")
    parser.add_argument("--peak-flops", type=float, default=H100_BF16_DENSE_FLOPS,
                        help="the accelerator's peak bf16 FLOP/s for MFU (default: H100 SXM dense, 989e12)")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="start no run after this many seconds (the rest are reported as skipped)")
    parser.add_argument("--fsdp-smoke-steps", type=int, default=None,
                        help="steps of each stage under FSDP (default: the preset's; 0 skips)")
    parser.add_argument("--no-extras", action="store_true", help="skip the log-prob memory and FSDP measurements")
    parser.add_argument("--out-dir", default=None, help="JSON results folder (default: $OUT, else benchmarks/results)")
    parser.add_argument("--results-md", default=None,
                        help="markdown file the tables are appended to (default: benchmarks/RESULTS.md; "
                             "$OUT/RESULTS.md when $OUT is set)")
    parser.add_argument("--workdir", default=None, help="where the model folder and rows go (default: a temp dir)")
    return parser.parse_args(argv)


def build_model_folder(preset: Preset, folder: Path) -> None:
    """The preset's Llama with seeded random weights, saved with the bundled tokenizer.

    Saved with use_cache=False, as a model is configured for training. With use_cache=True (the
    config default) and no use_cache argument in the forward, transformers 5.24 builds a KV cache
    in every training forward, and with a cache it ignores the restarting position ids of a packed
    row: attention crosses from one sequence into the next. TRL passes use_cache=False itself,
    plpost's SFTModule does not (reported in RESULTS.md), so this keeps every framework computing
    the same, correct thing.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = LlamaConfig(
        **preset.model,
        max_position_embeddings=preset.max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=False,
    )
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {config.vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
    torch.manual_seed(preset.seed)
    device = "cuda" if preset.device == "cuda" and torch.cuda.is_available() else "cpu"
    with torch.device(device):  # building 0.4B parameters on the GPU takes a second, not a minute
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def prepare(
    preset: Preset, cases: list[tuple[str, str]], workdir: Path
) -> tuple[str, dict[str, str], dict[tuple[str, str], list[int]]]:
    """The model folder, a rows file per stage, and each case's real tokens per row in the order the
    case trains on them (for the check)."""
    from transformers import AutoTokenizer

    from benchmarks.data import length_grouped_row_order, real_token_counts, rows_for, write_rows

    model_dir = workdir / "model"
    build_model_folder(preset, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows_files, tokens = {}, {}
    for stage in sorted({stage for stage, _ in cases}):
        rows = rows_for(stage, preset, preset.steps * preset.batch_size, tokenizer)
        rows_files[stage] = str(workdir / f"rows-{stage}.jsonl")
        write_rows(Path(rows_files[stage]), rows)
        per_row = real_token_counts(stage, rows, tokenizer)
        for variant in [v for s, v in cases if s == stage]:
            order = length_grouped_row_order(preset, rows, tokenizer) if variant == "length-grouped" else None
            tokens[stage, variant] = per_row if order is None else [per_row[i] for i in order]
    return str(model_dir), rows_files, tokens


def expected_timed_tokens(preset: Preset, per_row: list[int]) -> int:
    start = preset.warmup_steps * preset.batch_size
    return sum(per_row[start : preset.steps * preset.batch_size])


def subprocess_env(preset: Preset) -> dict[str, str]:
    paths = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
               TQDM_DISABLE="1")
    if preset.threads:
        env["OMP_NUM_THREADS"] = str(preset.threads)
    return env


def run_module(module: str, args: list[str], preset: Preset, log: Path, timeout: float) -> int | str:
    """Runs `python -m module args...`; returns its exit code, or "timeout"."""
    with log.open("w") as handle:
        try:
            return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=subprocess_env(preset),
                                  stdout=handle, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return "timeout"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.monotonic()
    at_start = machine()
    preset = get_preset(args.preset).with_overrides(
        timed_steps=args.steps, warmup_steps=args.warmup, repeats=args.repeats, threads=args.threads,
        fsdp_smoke_steps=args.fsdp_smoke_steps,
    )
    if preset.warmup_steps < 1:
        raise SystemExit("--warmup must be at least 1: the clock starts at the end of the last warmup step")
    frameworks = [f for f in args.frameworks.split(",") if f]
    stages = [s for s in args.stages.split(",") if s]
    variants = set(args.variants.split(",")) if args.variants else None
    cases = [(s, v) for s, v in preset.cases if s in stages and (variants is None or v in variants)]
    out_env = os.environ.get("OUT")
    out_dir = Path(args.out_dir or (out_env if out_env else REPO / "benchmarks" / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    default_md = Path(out_env) / "RESULTS.md" if out_env else REPO / "benchmarks" / "RESULTS.md"
    results_md = Path(args.results_md or default_md)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="plpost-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)

    print(f"[bench] {preset.name}: preparing the model and data in {workdir}", flush=True)
    model_dir, rows_files, tokens = prepare(preset, cases, workdir)

    def remaining() -> float:
        return float("inf") if args.deadline_s is None else args.deadline_s - (time.monotonic() - started)

    runs: list[dict] = []
    extras: dict = {}
    plan = [(repeat, case) for repeat in range(preset.repeats) for case in cases]
    extras_at = 0 if not cases else min(len(cases), preset.extras_after or len(cases))  # within repeat 0
    for position, (repeat, (stage, variant)) in enumerate(plan):
        for framework in [f for f in frameworks if f in ONLY.get((stage, variant), FRAMEWORKS)]:
            runs.append(measure_run(preset, args, stage, variant, framework, repeat, model_dir, rows_files,
                                    tokens[stage, variant], workdir, remaining))
        if position + 1 == extras_at and not args.no_extras:
            extras = run_extras(preset, args, model_dir, rows_files, workdir, remaining)
    if not cases and not args.no_extras:
        extras = run_extras(preset, args, model_dir, rows_files, workdir, remaining)

    report = {
        "preset": asdict(preset),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": at_start,
        "load_avg_end": list(os.getloadavg()),
        "versions": versions(REPO),
        "peak_flops": args.peak_flops,
        "wall_s": time.monotonic() - started,
        "runs": runs,
        **extras,
    }
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_file = out_dir / f"{preset.name}-{stamp}.json"
    json_file.write_text(json.dumps(report, indent=1))
    # One file of log tails, not one per run: few files come back from a remote machine.
    log_file = out_dir / f"{preset.name}-{stamp}-logs.txt"
    log_file.write_text("".join(
        f"==== {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]) + "\n"
        for log in sorted((workdir / "logs").glob("*.log"))
    ))
    markdown = render(report)
    results_md.parent.mkdir(parents=True, exist_ok=True)
    with results_md.open("a") as handle:
        handle.write("\n" + markdown)
    print(markdown)
    print(f"[bench] wrote {json_file}, {log_file.name} and appended to {results_md}", flush=True)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def measure_run(preset, args, stage, variant, framework, repeat, model_dir, rows_files, row_tokens, workdir,
                remaining) -> dict:
    """One (stage, variant, framework) in its own process; its result, or why there is none."""
    name = f"{stage}-{variant}-{framework}-r{repeat}"
    identity = {"stage": stage, "variant": variant, "framework": framework, "repeat": repeat}
    if remaining() < MIN_RUN_S:
        print(f"[bench] {name}: skipped (deadline)", flush=True)
        return {**identity, "ok": False, "error": "skipped: past the deadline"}
    run_dir = workdir / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {**identity, "preset": asdict(preset), "model_dir": model_dir, "rows_file": rows_files[stage],
            "workdir": str(run_dir), "peak_flops": args.peak_flops}
    (run_dir / "spec.json").write_text(json.dumps(spec))
    result_file = run_dir / "result.json"
    code = run_module("benchmarks.worker", [str(run_dir / "spec.json"), str(result_file)], preset,
                      workdir / "logs" / f"{name}.log", min(preset.run_timeout_s, remaining()))
    if result_file.exists():
        result = {**json.loads(result_file.read_text()), "repeat": repeat}
    else:
        result = {**identity, "ok": False, "error": f"worker exited with {code} and no result"}
    if result.get("ok"):
        result["expected_real_tokens"] = expected_timed_tokens(preset, row_tokens)
        result["tokens_match_data"] = result["real_tokens"] == result["expected_real_tokens"]
    shown = f"{result['tokens_per_s']:.0f} tok/s" if result.get("ok") else result.get("error")
    print(f"[bench] {name}: {shown}", flush=True)
    return result


def run_extras(preset, args, model_dir, rows_files, workdir, remaining) -> dict:
    extras = {}
    if preset.logprob_memory is not None and remaining() > MIN_RUN_S:
        tokens, vocab, dtype = preset.logprob_memory
        measured = []
        for variant in ("naive", "chunked"):
            out = workdir / f"logprob-{variant}.json"
            arguments = [variant, str(tokens), str(vocab), dtype, preset.device, str(out)]
            code = run_module("benchmarks.logprob_memory", arguments, preset,
                              workdir / "logs" / f"logprob-{variant}.log", min(300, remaining()))
            failed = {"variant": variant, "error": f"exit {code}"}
            measured.append(json.loads(out.read_text()) if out.exists() else failed)
            print(f"[bench] log-prob memory {variant}: {measured[-1]}", flush=True)
        extras["logprob_memory"] = measured
    if preset.fsdp_smoke_steps and remaining() > MIN_RUN_S:
        stages = [s for s in STAGES if s in rows_files]
        spec = {"preset": asdict(preset), "model_dir": model_dir, "rows_files": rows_files, "stages": stages,
                "workdir": str(workdir / "fsdp")}
        (workdir / "fsdp-spec.json").write_text(json.dumps(spec))
        out = workdir / "fsdp.json"
        code = run_module("benchmarks.fsdp_smoke", [str(workdir / "fsdp-spec.json"), str(out)], preset,
                          workdir / "logs" / "fsdp.log", min(300, remaining()))
        extras["fsdp_smoke"] = json.loads(out.read_text()) if out.exists() else [{"ok": False, "error": f"exit {code}"}]
        print(f"[bench] FSDP smoke: {extras['fsdp_smoke']}", flush=True)
    prompts_file = rows_files.get("reward") or rows_files.get("dpo")  # preference rows hold the prompts
    if preset.ppo_rollouts and prompts_file and remaining() > MIN_RUN_S:
        spec = {"preset": asdict(preset), "model_dir": model_dir, "rows_file": prompts_file}
        (workdir / "ppo-spec.json").write_text(json.dumps(spec))
        out = workdir / "ppo.json"
        code = run_module("benchmarks.ppo_rollouts", [str(workdir / "ppo-spec.json"), str(out)], preset,
                          workdir / "logs" / "ppo.log", min(preset.run_timeout_s, remaining()))
        extras["ppo"] = json.loads(out.read_text()) if out.exists() else {"ok": False, "error": f"exit {code}"}
        print(f"[bench] PPO: {extras['ppo']}", flush=True)
    return extras


if __name__ == "__main__":
    main()
