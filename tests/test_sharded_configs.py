"""Every tiny config, run by the `plpost` command on 2 CPU processes sharded with FSDP2 (the
README's override of the strategy), trains its two steps and exports a folder that transformers
loads whole (that the export holds the trained weights is tests/test_fsdp.py's check)."""

import os
import shutil
import subprocess

import pytest
import transformers
from test_configs import TINY_CONFIGS, short_run_args

SHARDED = [
    "--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.strategy=ModelParallelStrategy",
    "--trainer.strategy.data_parallel_size=2", "--trainer.strategy.tensor_parallel_size=1",
    "--trainer.strategy.process_group_backend=gloo",
]


@pytest.mark.slow
@pytest.mark.parametrize("config", TINY_CONFIGS, ids=lambda c: c.name)
def test_tiny_config_trains_sharded_on_two_processes(config, tmp_path):
    command = [shutil.which("plpost"), "fit", *short_run_args(config), *SHARDED]
    done = subprocess.run(command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    exports = [folder for folder in tmp_path.glob("outputs/*/model") if any(folder.glob("*.safetensors"))]
    assert exports, f"{config.name}: no exported model under outputs/"
    for folder in exports:  # whole models, gathered from both ranks' shards, that transformers loads
        architecture = transformers.AutoConfig.from_pretrained(folder).architectures[0]
        _, loading = getattr(transformers, architecture).from_pretrained(folder, output_loading_info=True)
        assert not any(loading.values()), loading  # no key missing, unexpected or of another shape
