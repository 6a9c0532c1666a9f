"""Each plpost stage for a few steps under Lightning's FSDP strategy, to show the modules wrap and train.

    python -m benchmarks.fsdp_smoke SPEC.json RESULT.json

One process, stages one after another (a failing stage is reported, the next still runs). Decoder
layers are the FSDP units (`auto_wrap_policy={LlamaDecoderLayer}`); on one device nothing is
actually split, but the wrapping, the sharded optimizer state and the flat-parameter
forward/backward are the code paths a multi-GPU run takes.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from benchmarks.data import read_rows
from benchmarks.frameworks.plpost_stages import PRECISION, ClockCallback, build
from benchmarks.measure import StepClock, peak_memory
from benchmarks.presets import STAGES, VARIANTS, Preset

SMOKE_VARIANT = {"sft": "padded", "reward": "padded", "dpo": "live-ref"}


def smoke(stage: str, preset: Preset, model_dir: str, rows: list[dict], workdir: Path) -> dict:
    variant = SMOKE_VARIANT[stage]
    module, data = build(stage, variant, preset, model_dir, rows, workdir)
    clock = StepClock(1, preset.device)
    if preset.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(
        accelerator="gpu" if preset.device == "cuda" else "cpu",
        devices=1,
        strategy=FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}),
        precision=PRECISION[preset.precision],
        max_steps=preset.fsdp_smoke_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[ClockCallback(clock)],
    )
    start = time.perf_counter()
    trainer.fit(module, data)
    units = [name for name, m in trainer.lightning_module.named_modules() if isinstance(m, FullyShardedDataParallel)]
    loss = trainer.callback_metrics.get("train/loss")
    return {
        "stage": stage, "variant": variant, "ok": loss is not None and bool(torch.isfinite(loss)),
        "steps": len(clock.ends), "fit_s": time.perf_counter() - start,
        "loss": None if loss is None else float(loss),
        "fsdp_units": len(units),
        "fsdp_units_in_reference": sum(name.startswith("reference") for name in units),
        "strategy": type(trainer.strategy).__name__,
        **peak_memory(preset.device),
    }


def main(spec_file: str, result_file: str) -> int:
    spec = json.loads(Path(spec_file).read_text())
    preset = Preset(**spec["preset"])
    results = []
    for stage in spec["stages"]:
        assert stage in STAGES and SMOKE_VARIANT[stage] in VARIANTS[stage]
        try:
            rows = read_rows(spec["rows_files"][stage])
            results.append(smoke(stage, preset, spec["model_dir"], rows, Path(spec["workdir"])))
        except Exception as error:  # reported, and the next stage still runs
            traceback.print_exc()
            results.append({"stage": stage, "ok": False, "error": f"{type(error).__name__}: {error}"[:500]})
        print(json.dumps(results[-1]), flush=True)
    Path(result_file).write_text(json.dumps(results, indent=1))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
