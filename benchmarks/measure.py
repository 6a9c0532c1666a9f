"""What every framework's run measures, the same way: step times, real tokens, peak memory.

Timing: the clock reads at the end of each optimizer step (after a CUDA synchronize); the timed
window runs from the end of the last warmup step to the end of the last step, so it includes
everything a framework does between steps (data loading, collation, logging, callbacks) and
excludes start-up, model loading, tokenization, a precomputed reference pass and the warmup steps.

CPU time: on a shared machine the wall clock also counts the time other processes hold the cores,
so the CPU time this process spent in the same window (user + system, all threads) is recorded
too; real tokens per CPU-second compares frameworks by the work they do, whatever the load.

Tokens: real (non-pad) tokens are counted from the batch each framework actually feeds its model
(attention-mask ones; every token of a padding-free row), so a framework that tokenized
differently would show it, and `fed` counts the pads too.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import time
from pathlib import Path

import torch
from torch import Tensor, nn


def process_start_time() -> float:
    """Wall-clock time this process started, so set-up time includes the interpreter and imports."""
    try:
        import psutil

        return psutil.Process().create_time()
    except ImportError:
        return time.time()


class StepClock:
    """Collects per-step token counts and end-of-step times; `summary()` excludes the warmup steps."""

    def __init__(self, warmup_steps: int, device: torch.device | str) -> None:
        if warmup_steps < 1:
            raise ValueError("at least one warmup step is needed: the clock starts at the end of the last one")
        self.warmup_steps = warmup_steps
        self.cuda = torch.device(device).type == "cuda"
        self.real: list[Tensor | int] = []
        self.fed: list[int] = []
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []
        self.first_start: float | None = None

    def batch(self, input_ids: Tensor, attention_mask: Tensor | None) -> None:
        """Counts a batch about to be trained on; no host sync (the sum is read at the end)."""
        if self.first_start is None:
            self.first_start = time.time()
        self.real.append(input_ids.numel() if attention_mask is None else attention_mask.sum())
        self.fed.append(input_ids.numel())

    def step_end(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())

    def summary(self) -> dict:
        steps = len(self.ends)
        if steps <= self.warmup_steps:
            raise RuntimeError(f"only {steps} steps ran, not more than the {self.warmup_steps} warmup steps")
        if len(self.real) != steps:
            raise RuntimeError(f"{len(self.real)} batches counted for {steps} optimizer steps")
        real = [int(value) for value in self.real]
        timed = slice(self.warmup_steps, steps)
        window = slice(self.warmup_steps - 1, None)  # from the end of the last warmup step
        seconds = self.ends[-1] - self.ends[self.warmup_steps - 1]
        step_times = [b - a for a, b in zip(self.ends[window], self.ends[timed])]
        real_tokens, fed_tokens = sum(real[timed]), sum(self.fed[timed])
        cpu_seconds = self.cpu_ends[-1] - self.cpu_ends[self.warmup_steps - 1]
        return {
            "timed_steps": steps - self.warmup_steps,
            "time_s": seconds,
            "real_tokens": real_tokens,
            "fed_tokens": fed_tokens,
            "padding_fraction": 1 - real_tokens / fed_tokens,
            "tokens_per_s": real_tokens / seconds,
            "steps_per_s": (steps - self.warmup_steps) / seconds,
            "cpu_s": cpu_seconds,
            "tokens_per_cpu_s": real_tokens / cpu_seconds,
            "step_times_s": step_times,
            "all_real_tokens": real,
            "first_step_start": self.first_start,
        }


def peak_memory(device: torch.device | str) -> dict:
    """CUDA: torch.cuda.max_memory_allocated. CPU: the process's peak resident set size."""
    if torch.device(device).type == "cuda":
        return {"peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20, "mem_kind": "cuda max_memory_allocated"}
    return {"peak_mem_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "mem_kind": "peak RSS"}


def matmul_parameters(model: nn.Module) -> int:
    """Parameters that take part in matmuls: all but the input embedding (a lookup costs no FLOPs)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    skip = {id(p) for p in embedding.parameters()} if embedding is not None else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def model_flops_utilization(params: int, tokens_per_s: float, peak_flops: float) -> float:
    """6 * params * real tokens/s / peak: the training FLOPs of forward + backward (no attention term,
    no reference forward), counted on real tokens only, so padding lowers it."""
    return 6 * params * tokens_per_s / peak_flops


def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "gpu": None}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info["load_avg"] = list(os.getloadavg())
    return info


def versions(repo: Path) -> dict:
    import importlib.metadata as metadata

    found = {}
    for name in ("torch", "transformers", "lightning", "trl", "accelerate", "peft", "datasets"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found["python"] = platform.python_version()
    # A copy of the tree without .git (a remote GPU machine) cannot ask git: the caller passes the sha.
    found["plpost"] = os.environ.get("PLPOST_GIT_SHA") or git_sha(repo)
    return found


def git_sha(repo: Path) -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo, capture_output=True, text=True,
                             check=True).stdout.strip()
        # Untracked files count too: a module being written is benchmarked as it is on disk.
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "plpost"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("+uncommitted" if dirty else "")
