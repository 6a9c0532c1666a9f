"""What sampling from FSDP2-sharded weights costs: the gather of the full weights, and generate with
them gathered once (`plpost.sharding.full_parameters`) against gathering each layer at every forward.

    python -m benchmarks.sharded_generation [MODEL ...]      (default: plpost:tiny)

Two CPU processes (gloo), the model sharded as the stages shard it (`plpost.sharding.shard`), greedy
decoding of 4 prompts for 32 new tokens, median of 3. Prints one line per model: the parameter
bytes each rank holds sharded and gathered, the gather time, and both generate times.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from plpost.generation import eager_sampling, encode_prompts
from plpost.hf import load_causal_lm, load_tokenizer
from plpost.sharding import full_parameters, shard

PROMPTS = ["1+1=", "12+30=", "7+8=", "100+1="]
NEW_TOKENS = 32
REPEATS = 3


def local_bytes(model: torch.nn.Module) -> int:
    return sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model.parameters())


def median_seconds(work) -> float:
    times = []
    for _ in range(REPEATS):
        dist.barrier()
        start = time.perf_counter()
        work()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(rank: int, name: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(name)
    model = load_causal_lm(name).eval()
    full_bytes = local_bytes(model)
    shard(model, init_device_mesh("cpu", (2,)))
    input_ids, attention_mask = encode_prompts(tokenizer, PROMPTS)

    def generate(model) -> None:
        with eager_sampling():
            model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)

    def gather() -> None:
        with full_parameters(model):
            pass

    def gathered_once() -> None:
        with full_parameters(model) as whole:
            generate(whole)

    results = {
        "gather": median_seconds(gather),
        "generate, gathered once": median_seconds(gathered_once),
        "generate, gathered per forward": median_seconds(lambda: generate(model)),
    }
    if rank == 0:
        timings = ", ".join(f"{key} {seconds * 1000:.0f} ms" for key, seconds in results.items())
        print(f"{name}: {full_bytes / 2**20:.1f} MiB of parameters gathered, {local_bytes(model) / 2**20:.1f} MiB "
              f"sharded per rank; {timings}")
    dist.destroy_process_group()


if __name__ == "__main__":
    for index, name in enumerate(sys.argv[1:] or ["plpost:tiny"]):
        mp.spawn(measure, args=(name, 29611 + index), nprocs=2)
