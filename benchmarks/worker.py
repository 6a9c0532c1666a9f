"""One measured run in its own process: `python -m benchmarks.worker SPEC.json RESULT.json`.

run.py writes the spec (preset, stage, variant, framework, model folder, rows file) and reads the
result; a run that fails writes its error instead, so one failure never hides the other results.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from pathlib import Path

from benchmarks.measure import StepClock, model_flops_utilization, peak_memory, process_start_time

STARTED = process_start_time()


def run_spec(spec: dict) -> dict:
    import torch

    from benchmarks.data import read_rows
    from benchmarks.presets import Preset

    preset = Preset(**spec["preset"])
    if preset.threads:
        torch.set_num_threads(preset.threads)
    torch.manual_seed(preset.seed)
    clock = StepClock(preset.warmup_steps, preset.device)
    runner = importlib.import_module(f"benchmarks.frameworks.{spec['framework']}_stages")
    info = runner.run(spec["stage"], spec["variant"], preset, spec["model_dir"], read_rows(spec["rows_file"]),
                      Path(spec["workdir"]), clock)
    result = {**clock.summary(), **peak_memory(preset.device), **info}
    result["setup_s"] = result.pop("first_step_start") - STARTED
    result["threads"] = torch.get_num_threads()
    if preset.device == "cuda":
        result["mfu"] = model_flops_utilization(info["params"], result["tokens_per_s"], spec["peak_flops"])
    return result


def main(spec_file: str, result_file: str) -> int:
    spec = json.loads(Path(spec_file).read_text())
    identity = {key: spec[key] for key in ("stage", "variant", "framework")}
    try:
        result = {**identity, "ok": True, **run_spec(spec)}
    except Exception as error:  # reported in the results table, not raised: the other runs go on
        trace = traceback.format_exc()
        print(trace, file=sys.stderr)
        message = f"{type(error).__name__}: {error}"[:500]
        result = {**identity, "ok": False, "error": message, "traceback": trace[-4000:]}
    Path(result_file).write_text(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main(*sys.argv[1:3]))
