"""Peak memory of a real-size model: a random-weight Qwen2.5-0.5B, SFT at sequence length 512, on
CPU, in one process against two processes sharded with FSDP2 (ModelParallelStrategy, gloo).

    python benchmarks/model_scale.py WORKDIR PROCESSES STEPS [checkpointed]

The model folder (WORKDIR/qwen2.5-0.5b-random: the architecture of Qwen2.5-0.5B from its published
config, written out below, with random weights stored in bfloat16 as the real checkpoint's are, and
the bundled tokenizer, whose ids never reach the vocabulary's top rows) is made on the first run.
Each process prints one JSON line: its rank, its peak RSS once the models are built and sharded
(`setup_peak_rss_gib`, at the start of fit) and over the whole run (`peak_rss_gib`, after STEPS
AdamW steps, float32 master weights under 32-true); `checkpointed`: with gradient checkpointing.
Run each measurement on its own: a process of the unsharded run peaks near 10 GB.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from plpost.modules import ModelSettings

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


def model_folder(workdir: Path) -> Path:
    """The random-weight model, written once (1 GB in bfloat16)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from plpost.hf import load_tokenizer

    folder = workdir / "qwen2.5-0.5b-random"
    if (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(QWEN2_5_0_5B, indent=2))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    load_tokenizer("plpost:tiny").save_pretrained(folder)
    return folder


def chats(count: int) -> list[dict]:
    """Chats of SEQUENCE_LENGTH tokens with the bundled byte-level tokenizer (one character, one token)."""
    return [{"messages": [{"role": "user", "content": "q" * 180}, {"role": "assistant", "content": "a" * 310}]}
            for _ in range(count)]


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(workdir: str, processes: int, steps: int, checkpointed: bool = False) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy

    from plpost import ChatDataModule, SFTModule

    folder = str(model_folder(Path(workdir)))
    setup: dict[str, float] = {}

    class SetupPeak(L.Callback):
        def on_fit_start(self, trainer, pl_module) -> None:
            setup["peak"] = peak_rss_gib()

    strategy = (ModelParallelStrategy(data_parallel_size=processes, tensor_parallel_size=1, process_group_backend="gloo")
                if processes > 1 else "auto")
    module = SFTModule(folder, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-5),
                       model_settings=ModelSettings(gradient_checkpointing=checkpointed))
    data = ChatDataModule(folder, train=chats(processes * steps), batch_size=1, shuffle=False,
                          max_length=SEQUENCE_LENGTH)
    trainer = L.Trainer(accelerator="cpu", devices=processes, strategy=strategy, max_steps=steps, precision="32-true",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[SetupPeak()])
    trainer.fit(module, data)
    print(json.dumps({"processes": processes, "rank": trainer.global_rank, "steps": steps, "checkpointed": checkpointed,
                      "parameters": sum(p.numel() for p in module.policy.parameters()),  # a DTensor counts all shards
                      "setup_peak_rss_gib": round(setup["peak"], 2), "peak_rss_gib": round(peak_rss_gib(), 2)}),
          flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), checkpointed=sys.argv[4:] == ["checkpointed"])
