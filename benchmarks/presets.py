"""Benchmark presets: the model, the data shape and the training settings every framework shares.

A case is (stage, variant); each case runs once per framework. Variants:
- sft "padding-free": plpost `ChatDataModule(packing=True)`, TRL `SFTConfig(padding_free=True)`, raw loop
  packed rows. Each micro-batch is one row of concatenated sequences, position ids restarting per
  sequence (no TRL-style fixed-length bin packing: the batches stay the same 8 sequences everywhere).
- sft "padded": every row padded to the longest row of its micro-batch.
- sft "checkpointed": "padded" with activation (gradient) checkpointing on in every framework
  (non-reentrant): each decoder layer's activations are recomputed in the backward pass.
- sft "compiled": "padded" with torch.compile: plpost `SFTModule(torch_compile=True)` and the raw loop
  `model.compile(dynamic=True)`, TRL `torch_compile=True` (its default, shapes dynamic after the
  first recompile). Compiling happens in the untimed warmup steps, so the table shows the
  compiled steady state; the compile time itself is not in it.
- reward "padded", dpo "live-ref" / "precomputed-ref": preference pairs as each framework feeds them
  by default. TRL and the raw loop pad the 2 x batch_size rows (chosen and rejected) to the
  longest; plpost's RewardModule and DPOModule share each pair's prompt (`share_prompt=True`: one
  row of prompt + chosen + rejected per pair, so a prompt is computed once; TRL has no such layout).
  Real tokens count a pair as two sequences in every framework, so tokens/s compare the same work.
- reward / dpo "two-row" (plpost only): `share_prompt=False`, the 2 x batch_size padded rows as in
  TRL; DPO with a live reference. Against "padded" / "live-ref" it measures prompt sharing.
- reward / dpo "padding-free" (raw loop only): the pairs' 2N sequences packed into one row, what a
  packed PreferenceDataModule would gain; DPO with a live reference (TRL's DPO has padding_free
  disabled in 1.16, and neither plpost nor TRL packs preference pairs).
- reward "length-grouped": each framework's default reward setting, on the pairs in the order of
  plpost's `PreferenceDataModule(group_by_length=length_group_batches)` (sorted by length within
  groups of that many batches, batches shuffled within each group; see
  `plpost.data.sampler.length_grouped_order`). plpost draws that order with its sampler from the
  rows as they are; TRL (sequential sampling) and the raw loop are handed the rows already in it,
  so all three train on the same batches. The mix of pairs per step differs from "padded", so
  compare it with "padded" in tokens/s, not steps/s.
- dpo "live-ref" keeps a frozen copy of the reference in memory and runs it every step;
  "precomputed-ref" computes the reference log-probs of every pair once before training
  (plpost `reference="precomputed"`, TRL `precompute_ref_log_probs=True`); that pass is not timed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

STAGES = ("sft", "reward", "dpo")
FRAMEWORKS = ("plpost", "trl", "raw")
VARIANTS = {"sft": ("padding-free", "padded", "checkpointed", "compiled"), "reward": ("padded", "two-row", "length-grouped", "padding-free"),
            "dpo": ("live-ref", "precomputed-ref", "two-row", "padding-free")}
ONLY = {
    ("reward", "padding-free"): ("raw",), ("dpo", "padding-free"): ("raw",),
    ("reward", "two-row"): ("plpost",), ("dpo", "two-row"): ("plpost",),
}
"""Cases that not every framework runs: neither plpost nor TRL (1.16) packs preference pairs, so the
raw loop alone measures what packing would gain; "two-row" is plpost without prompt sharing."""


@dataclass(frozen=True)
class Preset:
    """Everything that must be identical across frameworks (and a few harness settings).

    model: LlamaConfig fields; the vocabulary may exceed the tokenizer's (ids never reach the top
        rows), so the LM head costs what a real vocabulary costs.
    batch_size: sequences per SFT step, pairs per reward / DPO step (2 x batch_size rows per forward).
    max_length: the longest sequence; the synthetic rows are generated within it, so no framework
        truncates anything.
    prompt_median / completion_median / length_sigma: lognormal token lengths (long-tailed).
    precision: "fp32" (32-true) or "bf16-mixed" (fp32 weights and optimizer, bf16 autocast).
    fused_adamw: torch.optim.AdamW(fused=True) in every framework (TRL: optim="adamw_torch_fused").
    cases: (stage, variant) in the order they run; the first ones matter most under a deadline.
    length_group_batches: the "length-grouped" variant's group size, in batches.
    extras_after: run the log-prob memory check and the FSDP smoke after this many cases (None: last).
    logprob_memory: (tokens, vocab, dtype) of the chunked-vs-naive log-softmax measurement, or None.
    fsdp_smoke_steps: steps of each stage under Lightning's FSDP strategy on one GPU (0: skip).
    ppo_rollouts / ppo_prompts / ppo_max_new_tokens: plpost's PPO for that many timed rollouts of
        that many prompts, sampling up to that many tokens each (0 rollouts: skip; see ppo_rollouts.py).
    """

    name: str
    device: str
    model: dict
    batch_size: int
    max_length: int
    prompt_median: int
    completion_median: int
    length_sigma: float
    precision: str
    warmup_steps: int
    timed_steps: int
    learning_rate: float = 1e-5
    fused_adamw: bool = False
    length_group_batches: int = 4
    threads: int | None = None
    seed: int = 0
    cases: tuple[tuple[str, str], ...] = ()
    frameworks: tuple[str, ...] = FRAMEWORKS
    repeats: int = 1
    run_timeout_s: int = 600
    logprob_memory: tuple[int, int, str] | None = None
    fsdp_smoke_steps: int = 0
    ppo_rollouts: int = 0
    ppo_prompts: int = 32
    ppo_max_new_tokens: int = 64
    extras_after: int | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return self.warmup_steps + self.timed_steps

    def with_overrides(self, **overrides) -> Preset:
        return replace(self, **{key: value for key, value in overrides.items() if value is not None})


ALL_CASES = tuple((stage, variant) for stage in STAGES for variant in VARIANTS[stage])
SECONDARY_CASES = (("reward", "length-grouped"), ("reward", "two-row"), ("dpo", "two-row"), ("sft", "checkpointed"),
                   ("sft", "compiled"), ("reward", "padding-free"), ("dpo", "padding-free"))
"""Optimisations and ceilings, run after each preset's headline cases (the first to go under a deadline)."""

PRESETS = {
    "cpu-tiny": Preset(
        name="cpu-tiny",
        device="cpu",
        # plpost:tiny's shape (4 Llama layers of width 128) with a 2k vocabulary: ~1M matmul parameters,
        # small enough that framework overhead and model compute both show.
        model=dict(
            hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=384, vocab_size=2048, tie_word_embeddings=False,
        ),
        batch_size=8,
        max_length=192,
        prompt_median=24,
        completion_median=40,
        length_sigma=0.8,
        precision="fp32",
        warmup_steps=3,
        timed_steps=12,
        # One thread per run: on a shared 2-core machine a 2-thread OpenMP region stalls whenever
        # either thread is descheduled (step times jumped between 3 s and 15 s with 2 threads).
        threads=1,
        cases=(("sft", "padding-free"), ("reward", "padded"), ("dpo", "live-ref"), ("sft", "padded"),
               ("dpo", "precomputed-ref"), *SECONDARY_CASES),
        run_timeout_s=300,
        logprob_memory=(8192, 32000, "bfloat16"),
        ppo_rollouts=4,
        ppo_prompts=32,
        ppo_max_new_tokens=48,
        notes="1 CPU thread per run, fp32, sdpa attention",
    ),
    "gpu-0.5b": Preset(
        name="gpu-0.5b",
        device="cuda",
        # Llama-shaped, ~0.37B parameters (0.31B in the 24 layers, 2 x 33M embedding / head).
        model=dict(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
            intermediate_size=2816, vocab_size=32000, tie_word_embeddings=False,
        ),
        batch_size=8,
        max_length=1024,
        prompt_median=200,
        completion_median=400,
        length_sigma=0.7,
        precision="bf16-mixed",
        warmup_steps=5,
        timed_steps=20,
        fused_adamw=True,
        cases=(("sft", "padding-free"), ("reward", "padded"), ("dpo", "live-ref"), ("dpo", "precomputed-ref"),
               ("sft", "padded"), *SECONDARY_CASES),
        run_timeout_s=150,
        logprob_memory=(8192, 32000, "bfloat16"),
        fsdp_smoke_steps=3,
        # Kept short: it runs with the extras, early, inside gpu.sh's 420 s deadline.
        ppo_rollouts=3,
        ppo_prompts=64,
        ppo_max_new_tokens=128,
        extras_after=3,
        notes="one GPU, bf16-mixed, sdpa attention",
    ),
    "cpu-0.5b": Preset(
        name="cpu-0.5b",
        device="cpu",
        # Qwen2.5-0.5B's shape (benchmarks/model_scale.py has its config) as a Llama: 494M parameters,
        # 136M of them the tied 151936-row embedding; Qwen2 adds only biases to q, k and v.
        model=dict(
            hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
            intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
            rms_norm_eps=1e-6,
        ),
        batch_size=1,
        max_length=512,
        prompt_median=180,
        completion_median=300,
        length_sigma=0.05,
        precision="fp32",
        warmup_steps=1,
        timed_steps=2,
        threads=2,
        cases=(("sft", "padded"), ("dpo", "live-ref")),
        run_timeout_s=1500,
        notes="2 CPU threads per run, fp32, sdpa attention; one process at a time (a run peaks near 10 GB)",
    ),
    # For the harness test: a model so small that a run takes seconds.
    "smoke": Preset(
        name="smoke",
        device="cpu",
        model=dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
            intermediate_size=64, vocab_size=263, tie_word_embeddings=False,
        ),
        batch_size=2,
        max_length=64,
        prompt_median=10,
        completion_median=12,
        length_sigma=0.5,
        precision="fp32",
        warmup_steps=1,
        timed_steps=2,
        threads=1,
        cases=ALL_CASES,
        ppo_rollouts=1,
        ppo_prompts=4,
        ppo_max_new_tokens=8,
        run_timeout_s=120,
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise SystemExit(f"unknown preset {name!r}; expected one of: {', '.join(PRESETS)}")
    return PRESETS[name]
