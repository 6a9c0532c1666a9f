"""Peak memory of a real-size model: a random-weight Qwen2.5-0.5B, SFT at sequence length 512, on
CPU, in one process against two processes, sharded with FSDP2 (ModelParallelStrategy, gloo) or
replicated with DDP.

    python benchmarks/model_scale.py WORKDIR [--runs single sharded ddp] [--precision 32-true bf16-mixed]
        [--layers 24] [--untied] [--steps 2] [--checkpointed] [--default-allocator] [--results benchmarks/RESULTS.md]

The model folder (WORKDIR/qwen2.5-0.5b-random: the architecture of Qwen2.5-0.5B from its published
config, written out below, with random weights stored in bfloat16 as the real checkpoint's are, and
the bundled tokenizer, whose ids never reach the vocabulary's top rows) is made on the first run;
`--layers` keeps the config but for the number of decoder layers (a smaller model, where two DDP
replicas fit in memory); `--untied` gives the head weights of its own, as Qwen2.5-7B and Llama 3
have (630M parameters at 24 layers). Each run is its own processes, one run at a time; each process reports
its peak RSS in each phase of the run: `setup` (models built, sharded and filled: up to the start
of fit), then `forward`, `backward` and `optimizer` of every step, and `run` (`ru_maxrss`, the
whole process). AdamW, float32 master weights under both precisions.

The allocator: glibc returns a freed block to the system at once only when it was mapped on its
own, and it raises that threshold to the size of every mapped block freed, up to 32 MiB; after the
first step most tensors are below it (a sharded decoder layer's gradient is 30 MB here), and what
they free stays in the process. Measured at 0.5B: 1.0 GiB more peak RSS in a sharded process,
0.6 GiB in one process, and no difference in what torch allocates. So every run is started with
the threshold fixed at 128 KiB (`MALLOC_MMAP_THRESHOLD_`), the same for all, and RSS follows the
tensors; `--default-allocator` measures with glibc's defaults.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

QWEN2_5_0_5B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
    "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
    "num_key_value_heads": 2, "max_position_embeddings": 32768, "max_window_layers": 21,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": False,
    "tie_word_embeddings": True, "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151643,
    "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": False, "torch_dtype": "bfloat16",
}
"""config.json of Qwen/Qwen2.5-0.5B (494M parameters, 136M of them the tied embedding)."""
SEQUENCE_LENGTH = 512
MMAP_THRESHOLD = 128 * 1024
GIB = 2**30
PHASES = ("setup", "forward", "backward", "optimizer")


def model_folder(workdir: Path, layers: int = QWEN2_5_0_5B["num_hidden_layers"], untied: bool = False) -> Path:
    """The random-weight model, written once (1 GB in bfloat16 at 24 layers)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from plpost.hf import load_tokenizer

    suffix = ("" if layers == QWEN2_5_0_5B["num_hidden_layers"] else f"-{layers}-layers") + ("-untied" if untied else "")
    folder = workdir / f"qwen2.5-0.5b{suffix}-random"
    if (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = {**QWEN2_5_0_5B, "num_hidden_layers": layers, "tie_word_embeddings": not untied}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    load_tokenizer("plpost:tiny").save_pretrained(folder)
    return folder


def chats(count: int) -> list[dict]:
    """Chats of SEQUENCE_LENGTH tokens with the bundled byte-level tokenizer (one character, one token)."""
    return [{"messages": [{"role": "user", "content": "q" * 180}, {"role": "assistant", "content": "a" * 310}]}
            for _ in range(count)]


class PhasePeaks:
    """The peak resident memory of this process in each phase, sampled every 5 ms."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.peaks: dict[str, float] = {}
        threading.Thread(target=self.sample, daemon=True).start()

    def sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while True:
            with open("/proc/self/statm") as statm:
                resident = int(statm.read().split()[1]) * page / GIB
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), resident)
            time.sleep(0.005)


def worker(workdir: str, run: str, precision: str, layers: int, untied: bool, steps: int, checkpointed: bool) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy

    from plpost import ChatDataModule, SFTModule
    from plpost.modules import ModelSettings

    peaks = PhasePeaks()

    class Phases(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            peaks.phase = "forward"

        def on_before_backward(self, trainer, pl_module, loss) -> None:
            peaks.phase = "backward"

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            peaks.phase = "optimizer"

    processes = 1 if run == "single" else 2
    folder = str(model_folder(Path(workdir), layers, untied))
    strategy = {"single": "auto", "ddp": "ddp",
                "sharded": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                                 process_group_backend="gloo")}[run]
    module = SFTModule(folder, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-5),
                       model_settings=ModelSettings(gradient_checkpointing=checkpointed))
    data = ChatDataModule(folder, train=chats(processes * steps), batch_size=1, shuffle=False,
                          max_length=SEQUENCE_LENGTH)
    trainer = L.Trainer(accelerator="cpu", devices=processes, strategy=strategy, max_steps=steps, precision=precision,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Phases()])
    trainer.fit(module, data)
    print(json.dumps({"rank": trainer.global_rank,
                      "parameters": sum(p.numel() for p in module.policy.parameters()),  # a DTensor counts all shards
                      **{phase: round(peaks.peaks.get(phase, 0.0), 2) for phase in PHASES},
                      "run": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}), flush=True)


def meminfo_gib(field: str) -> float:
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields[field].split()[0]) / 2**20


def measure(args: argparse.Namespace, run: str, precision: str) -> dict:
    """One run in its own processes; its ranks' peaks, and the least memory the machine had free meanwhile."""
    env = dict(os.environ)
    if not args.default_allocator:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    command = [sys.executable, __file__, "--worker", args.workdir, run, precision, str(args.layers),
               str(int(args.untied)), str(args.steps), str(int(args.checkpointed))]
    started = time.time()
    # Files, not pipes: the run is polled for free memory, and a pipe nobody reads fills and blocks it.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
        least_free = meminfo_gib("MemAvailable")
        while process.poll() is None:
            least_free = min(least_free, meminfo_gib("MemAvailable"))
            time.sleep(0.2)
        out.seek(0)
        err.seek(0)
        ranks = [json.loads(line) for line in out.read().splitlines() if line.startswith("{")]
        if process.returncode != 0 or not ranks:
            raise SystemExit(f"{run} {precision} failed (exit {process.returncode}): {' '.join(command)}\n"
                             + err.read()[-3000:])
    return {"run": run, "precision": precision, "ranks": sorted(ranks, key=lambda rank: rank["rank"]),
            "least_free_gib": round(least_free, 1), "seconds": round(time.time() - started)}


def table(results: list[dict], args: argparse.Namespace) -> str:
    from benchmarks.measure import machine, versions

    described, installed = machine(), versions(REPO)
    parameters = results[0]["ranks"][0]["parameters"]
    lines = [f"## Peak memory of a {parameters / 1e6:.0f}M-parameter model, 1 process against 2, "
             f"{datetime.date.today().isoformat()}", "",
             f"{described.get('cpu', '?')}, {described.get('cores', '?')} cores, "
             f"{meminfo_gib('MemTotal'):.0f} GiB, load average {described['load_avg'][0]:.1f} at the end; "
             f"torch {installed['torch']}, transformers {installed['transformers']}, lightning {installed['lightning']}, "
             f"plpost {installed['plpost']}; "
             f"`python benchmarks/model_scale.py WORKDIR --layers {args.layers} --steps {args.steps}"
             f"{' --untied' if args.untied else ''}"
             f"{' --checkpointed' if args.checkpointed else ''}{' --default-allocator' if args.default_allocator else ''}`: "
             f"the Qwen2.5-0.5B architecture{'' if args.layers == 24 else f' with {args.layers} decoder layers'} "
             f"(151936 x 896 embedding, {'and a head of its own' if args.untied else 'tied to the head'}), random weights stored in bfloat16, SFT at sequence length "
             f"{SEQUENCE_LENGTH} (batch 1 per process), AdamW, float32 master weights, {args.steps} steps, "
             f"gradient checkpointing {'on' if args.checkpointed else 'off'}, glibc's mmap threshold "
             f"{'as glibc sets it' if args.default_allocator else 'fixed at 128 KiB'}. "
             "Peak RSS of each process in each phase (GiB); the share is of the one-process run's "
             "peak at the same precision.", "",
             "| precision | run | rank | setup | forward | backward | optimizer | whole run | share | least free |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    single = {result["precision"]: result["ranks"][0]["run"] for result in results if result["run"] == "single"}
    for result in results:
        for rank in result["ranks"]:
            share = f"{rank['run'] / single[result['precision']]:.0%}" if result["precision"] in single else "-"
            phases = " | ".join(f"{rank[phase]:.2f}" for phase in PHASES)
            lines.append(f"| {result['precision']} | {result['run']} | {rank['rank']} | {phases} | {rank['run']:.2f} "
                         f"| {share} | {result['least_free_gib']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir")
    parser.add_argument("--runs", nargs="+", default=["single", "sharded"], choices=["single", "sharded", "ddp"])
    parser.add_argument("--precision", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--layers", type=int, default=QWEN2_5_0_5B["num_hidden_layers"])
    parser.add_argument("--untied", action="store_true")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--checkpointed", action="store_true")
    parser.add_argument("--default-allocator", action="store_true")
    parser.add_argument("--results", default=None, help="append the table to this markdown file")
    args = parser.parse_args()
    model_folder(Path(args.workdir), args.layers, args.untied)
    results = []
    for precision in args.precision:
        for run in args.runs:
            results.append(measure(args, run, precision))
            print(json.dumps(results[-1]), flush=True)
    text = table(results, args)
    print(text)
    if args.results:
        with open(args.results, "a") as handle:
            handle.write("\n" + text)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        workdir, run, precision, layers, untied, steps, checkpointed = sys.argv[2:9]
        worker(workdir, run, precision, int(layers), untied == "1", int(steps), checkpointed == "1")
    else:
        main()
