"""Data preparation at the size people train on: plpost's cached Arrow path against TRL's, same file.

    python benchmarks/data_scale.py --chats 10000 100000 --pairs 100000 [--num-proc 2] [--append]

Synthetic multi-turn chats (a system prompt, two user/assistant rounds, about 600 tokens) and
preference pairs (a system prompt and a question, two answers) are written once as JSON Lines, and
tokenized with the real Qwen2.5 tokenizer and template of the template tests' cache
(tests/templates/assets.py). Every measurement runs in a fresh process, so its peak RSS is its own:

- plpost first run: `ChatDataModule` / `PreferenceDataModule` `prepare_data` + `setup` into an empty
  cache (the preparing process; its worker processes' peak is reported apart);
- plpost warm run, a reading rank: process start (interpreter and imports included) to the first
  training batch, with the entry already cached, then 200 more batches read (peak RSS of that rank);
- TRL 1.16 first and warm run: `load_dataset("json")` + `SFTTrainer` / `DPOTrainer` construction (the
  tokenization TRL does before training), into an empty, then the same, `HF_DATASETS_CACHE`.

Results are appended to benchmarks/RESULTS.md with the machine and date (--append).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
MAX_LENGTH = 2048
SYSTEM = "You are a careful assistant. Answer briefly, show the steps that matter, and say when you are unsure."


def qwen() -> tuple[str, str]:
    """(tokenizer folder, template file) of Qwen2.5 from the template tests' cache (fetched if missing)."""
    from templates.assets import llama_cpp_models, tokenizer_folder

    return str(tokenizer_folder("qwen-standin")), str(llama_cpp_models() / "templates" / "Qwen-Qwen2.5-7B-Instruct.jinja")


def words(rng: random.Random, count: int, vocabulary: list[str]) -> str:
    return " ".join(rng.choices(vocabulary, k=count)).capitalize() + "."


def write_rows(path: Path, kind: str, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    vocabulary = ["".join(rng.choices("etaoinshrdlucmfwypvbgk", k=rng.randint(2, 8))) for _ in range(3000)]
    with open(path, "w") as out:
        for _ in range(count):
            text = lambda n: words(rng, rng.randint(n * 3 // 4, n * 5 // 4), vocabulary)  # noqa: E731
            prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text(35)}]
            if kind == "chats":
                row = {"messages": [*prompt, {"role": "assistant", "content": text(75)},
                                    {"role": "user", "content": text(28)}, {"role": "assistant", "content": text(75)}]}
            else:
                row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": text(110)}],
                       "rejected": [{"role": "assistant", "content": text(110)}]}
            out.write(json.dumps(row) + "\n")


def peak_rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def plpost_module(kind: str, file: str, cache: str, num_proc: int | None):
    from plpost import ChatDataModule, PreferenceDataModule

    tokenizer, template = qwen()
    module_type = ChatDataModule if kind == "chats" else PreferenceDataModule
    return module_type(tokenizer, train=file, chat_template=template, max_length=MAX_LENGTH, batch_size=8,
                       cache_dir=cache, num_proc=num_proc)


def job_plpost_first(kind: str, file: str, cache: str, num_proc: int | None) -> dict:
    import plpost  # noqa: F401  (imports are not preparation: TRL's time starts after them too)

    start = time.perf_counter()
    data = plpost_module(kind, file, cache, num_proc)
    data.prepare_data()
    data.setup("fit")
    tokens = int(data.train_examples.column("lengths").sum())
    return {"seconds": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib(),
            "workers_peak_rss_mib": peak_rss_mib(resource.RUSAGE_CHILDREN), "examples": len(data.train_examples),
            "tokens": tokens, "counts": data.counts["train"]}


def job_plpost_warm(kind: str, file: str, cache: str, num_proc: int | None, started: float) -> dict:
    imported = time.time()
    data = plpost_module(kind, file, cache, num_proc)
    data.prepare_data()
    data.setup("fit")
    loader = iter(data.train_dataloader())
    next(loader)
    first_batch = time.time() - started
    after_imports = time.time() - imported
    for _, _ in zip(range(200), loader):
        pass
    return {"seconds_to_first_batch": first_batch, "seconds_after_imports": after_imports,
            "peak_rss_mib": peak_rss_mib(), "examples": len(data.train_examples)}


def job_trl(kind: str, file: str, cache: str, num_proc: int | None, started: float) -> dict:
    os.environ["HF_DATASETS_CACHE"] = cache
    import datasets
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from plpost.hf import load_causal_lm

    tokenizer_folder, template = qwen()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    tokenizer.chat_template = Path(template).read_text()
    model = load_causal_lm("plpost:tiny")  # preparation does not run the model
    start = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=file, split="train")
    with tempfile.TemporaryDirectory() as output:
        common = {"output_dir": output, "report_to": [], "dataset_num_proc": num_proc, "max_length": MAX_LENGTH,
                  "use_cpu": True, "bf16": False}
        if kind == "chats":
            trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=dataset, processing_class=tokenizer)
        else:
            trainer = DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=dataset, processing_class=tokenizer)
    return {"seconds": time.perf_counter() - start, "seconds_from_start": time.time() - started,
            "peak_rss_mib": peak_rss_mib(), "workers_peak_rss_mib": peak_rss_mib(resource.RUSAGE_CHILDREN),
            "examples": len(trainer.train_dataset)}


def run_job(job: str, kind: str, file: Path, cache: Path, num_proc: int | None) -> dict:
    command = [sys.executable, __file__, "--job", job, "--kind", kind, "--file", str(file), "--cache", str(cache)]
    if num_proc:
        command += ["--num-proc", str(num_proc)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(kind: str, count: int, workdir: Path, num_proc: int | None, with_trl: bool) -> dict:
    file = workdir / f"{kind}-{count}.jsonl"
    if not file.exists():
        write_rows(file, kind, count)
    results = {"kind": kind, "records": count, "file_mib": file.stat().st_size / 2**20}
    frameworks = [("plpost", "plpost-first", "plpost-warm"), ("trl", "trl", "trl")][: 2 if with_trl else 1]
    for framework, first, warm in frameworks:
        cache = workdir / f"cache-{framework}-{kind}-{count}"
        subprocess.run(["rm", "-rf", str(cache)], check=True)
        results[f"{framework}_first"] = run_job(first, kind, file, cache, num_proc)
        results[f"{framework}_warm"] = run_job(warm, kind, file, cache, num_proc)
        print(json.dumps({framework: results[f"{framework}_first"], "warm": results[f"{framework}_warm"]}), flush=True)
    return results


def table(runs: list[dict], num_proc: int | None) -> str:
    def cell(result: dict, key: str, unit: str) -> str:
        if result is None:
            return "not run"
        return "failed" if "error" in result else f"{result[key]:.0f} {unit}" if unit == "MiB" else f"{result[key]:.1f} {unit}"

    lines = [
        f"| data | plpost first run | TRL first run | plpost warm run, start to first batch | TRL warm run "
        f"(prep / from start) | plpost preparing process (workers) | plpost reading rank | TRL process (workers) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        p1, pw, t1, tw = run["plpost_first"], run["plpost_warm"], run.get("trl_first"), run.get("trl_warm")
        name = f"{run['records']:,} {run['kind']} ({run['file_mib']:.0f} MiB)"
        trl_warm = ("not run" if tw is None else "failed" if "error" in tw
                    else f"{tw['seconds']:.1f} s / {tw['seconds_from_start']:.1f} s")
        preparing = "failed" if "error" in p1 else f"{p1['peak_rss_mib']:.0f} MiB ({p1['workers_peak_rss_mib']:.0f} MiB)"
        trl_memory = ("not run" if t1 is None else "failed" if "error" in t1
                      else f"{t1['peak_rss_mib']:.0f} MiB ({t1['workers_peak_rss_mib']:.0f} MiB)")
        lines.append(f"| {name} | {cell(p1, 'seconds', 's')} | {cell(t1, 'seconds', 's')} | "
                     f"{cell(pw, 'seconds_to_first_batch', 's')} | {trl_warm} | {preparing} | "
                     f"{cell(pw, 'peak_rss_mib', 'MiB')} | {trl_memory} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chats", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--pairs", type=int, nargs="*", default=[100_000])
    parser.add_argument("--num-proc", type=int, default=None, help="both frameworks (default: each one's own)")
    parser.add_argument("--trl-up-to", type=int, default=None, help="measure TRL only on files of at most this many records")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "plpost-data-scale"))
    parser.add_argument("--append", action="store_true", help="append the results to benchmarks/RESULTS.md")
    parser.add_argument("--job")
    parser.add_argument("--kind")
    parser.add_argument("--file")
    parser.add_argument("--cache")
    args = parser.parse_args()
    if args.job:
        started = process_start()
        jobs = {"plpost-first": lambda: job_plpost_first(args.kind, args.file, args.cache, args.num_proc),
                "plpost-warm": lambda: job_plpost_warm(args.kind, args.file, args.cache, args.num_proc, started),
                "trl": lambda: job_trl(args.kind, args.file, args.cache, args.num_proc, started)}
        print(json.dumps(jobs[args.job]()))
        return
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    from benchmarks.measure import machine, versions

    header = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "versions": versions(REPO)}
    with_trl = lambda count: args.trl_up_to is None or count <= args.trl_up_to  # noqa: E731
    runs = [measure("chats", count, workdir, args.num_proc, with_trl(count)) for count in args.chats]
    runs += [measure("pairs", count, workdir, args.num_proc, with_trl(count)) for count in args.pairs]
    header["load_avg_end"] = list(os.getloadavg())
    (workdir / "results.json").write_text(json.dumps({**header, "runs": runs}, indent=1))
    text = (f"\n\n## Data preparation at scale, {header['date']}\n\n- machine: {header['machine']['cpu']}, "
            f"{header['machine']['cores']} cores; load average {header['machine']['load_avg']} at start, "
            f"{header['load_avg_end']} at end\n- versions: {header['versions']}\n- num_proc: "
            f"{args.num_proc or 'each framework default (plpost: one per core; TRL: none)'}\n\n{table(runs, args.num_proc)}\n")
    print(text)
    if args.append:
        with open(REPO / "benchmarks" / "RESULTS.md", "a") as results:
            results.write(text)


def process_start() -> float:
    from benchmarks.measure import process_start_time

    return process_start_time()


if __name__ == "__main__":
    main()
