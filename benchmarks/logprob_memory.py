"""Peak memory of per-token log-probs, forward + backward: plpost's chunked `token_logprobs` against
the plain `logits.float().log_softmax(-1).gather(...)`, each in a fresh process.

    python -m benchmarks.logprob_memory {chunked,naive} TOKENS VOCAB DTYPE DEVICE RESULT.json

Extra peak memory is measured beyond the logits themselves (their gradient included in both):
CUDA from torch.cuda.max_memory_allocated, CPU from the rise of the peak resident set size.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

ROWS = 8


def naive_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def resident_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_resident_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(variant: str, tokens: int, vocab: int, dtype: str, device: str, repeats: int = 2) -> dict:
    from plpost.losses import token_logprobs

    logprobs = token_logprobs if variant == "chunked" else naive_logprobs
    generator = torch.Generator(device=device).manual_seed(0)
    # Drawn in its own dtype: a float32 temporary would raise the CPU peak before the measurement starts.
    logits = torch.randn(ROWS, tokens // ROWS, vocab, generator=generator, device=device, dtype=getattr(torch, dtype))
    logits.requires_grad_(True)
    targets = torch.randint(0, vocab, (ROWS, tokens // ROWS), generator=generator, device=device)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = resident_mib()
    times = []
    for _ in range(1 + repeats):  # the first call also sets the peak; the later ones are timed
        start = time.perf_counter()
        logprobs(logits, targets).sum().backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_resident_mib()
    return {
        "variant": variant, "tokens": tokens, "vocab": vocab, "dtype": dtype, "device": device,
        "logits_mib": logits.numel() * logits.element_size() / 2**20,
        "extra_peak_mib": peak - base,
        "time_s": sum(times[1:]) / repeats,
    }


if __name__ == "__main__":
    variant, tokens, vocab, dtype, device, out = sys.argv[1:7]
    Path(out).write_text(json.dumps(measure(variant, int(tokens), int(vocab), dtype, device)))
