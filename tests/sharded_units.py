"""Which of the bundled model's embedding and head weights are whole at each point of one sharded
training step, on 2 CPU processes (gloo), for the model as bundled (tied) and with a head of its own.

    python tests/sharded_units.py PORT

Prints, from rank 0, one JSON object: {"tied": [[point, embeddings, head], ...], "untied": [...]},
each weight "whole" (gathered) or "sharded" (this rank's rows only)."""

import gc
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def states(model: torch.nn.Module) -> list[str]:
    from torch.distributed.tensor import DTensor

    modules = (model.get_input_embeddings(), model.get_output_embeddings())
    return ["sharded" if isinstance(module._parameters["weight"], DTensor) else "whole" for module in modules]


def one_step(tied: bool) -> list[list[str]]:
    from torch.distributed.device_mesh import init_device_mesh

    from plpost.hf import load_causal_lm
    from plpost.sharding import shard

    model = load_causal_lm("plpost:tiny")
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    shard(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    seen: list[list[str]] = []

    def probe(point: str):
        return lambda *_: seen.append([point, *states(model)])

    first, last = model.model.layers[0], model.model.layers[-1]
    first.register_forward_pre_hook(probe("forward of the first layer"))
    last.register_full_backward_pre_hook(probe("backward of the last layer"))
    first.register_full_backward_pre_hook(probe("backward of the first layer"))
    logits = model(input_ids=torch.randint(0, 100, (1, 16))).logits
    logits.float().logsumexp(-1).sum().backward()
    seen.append(["after the backward", *states(model)])
    return seen


def run(rank: int, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    seen = {"tied": one_step(tied=True), "untied": one_step(tied=False)}
    if rank == 0:
        print(json.dumps(seen), flush=True)
    # The probes make each sharded model a reference cycle. Left to the interpreter's exit, its
    # collectives' state is freed after gloo's threads, and the process aborts ("terminate called
    # without an active exception") in about 4 runs of 10.
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=2)
