"""How a stage builds its models, the same for every stage: loading (dtype by the Trainer's
precision, attention, meta device for sharded ranks), LoRA and gradient checkpointing, then
sharding (FSDP2) and `torch.compile`, in the order those compose. Mixed into `PostTrainingModule`,
whose `model_name`, `model_settings`, `tokenizer`, `policy` and trainer it reads."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from plpost.hf import check_vocabulary_fits, load_causal_lm
from plpost.hf_compat import enable_activation_checkpointing, without_hub_kernel_routing
from plpost.quiet import peft_reading_deprecated_attributes

COMPILE_OPTIONS: dict[str, Any] = {"dynamic": True}
"""What `torch_compile` passes to `nn.Module.compile` (see `PostTrainingModule.compile_models`)."""


def disable_dropout(model: torch.nn.Module) -> None:
    """Sets every dropout probability in `model` to 0, LoRA's and attention's included, so two
    forwards of the same weights agree exactly (DPO's policy against its reference, PPO's ratio;
    TRL does the same). Attention layers apply dropout functionally from a float attribute read
    at each forward in train mode, not through nn.Dropout, so those are zeroed too."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


class BuildsModels:
    """Model building for `PostTrainingModule` (see the module docstring)."""

    def load_pretrained(
        self, name_or_path: str | None = None, *, random_init: bool | None = None, frozen: bool = False,
        empty: bool | None = None,
    ) -> PreTrainedModel:
        """`frozen`: a model never trained (a reference, a teacher), kept in the compute dtype.
        `empty`: built on the meta device (default: `builds_empty()`, for a model `shard_models` fills)."""
        return load_causal_lm(name_or_path or self.model_name, **self.loading_arguments(random_init, frozen, empty))

    def loading_arguments(self, random_init: bool | None, frozen: bool, empty: bool | None) -> dict[str, Any]:
        """What `load_causal_lm` is given for a model of this stage (see `load_pretrained`)."""
        settings = self.model_settings
        quantized = {}
        if settings.quantization is not None and not frozen:  # quantized straight onto the training device
            device = self._trainer.strategy.root_device if self._trainer is not None else "cpu"
            quantized = {"quantization": settings.quantization, "device": device}
        return {
            "random_init": settings.random_init if random_init is None else random_init,
            "dtype": self.weights_dtype(frozen=frozen),
            "attn_implementation": settings.attn_implementation,
            "trust_remote_code": settings.trust_remote_code,
            "empty": self.builds_empty() if empty is None else empty,
            **quantized,
        }

    def weights_dtype(self, *, frozen: bool = False) -> str | None:
        """The dtype a trained (or `frozen`) model loads in under the Trainer's precision (see `plpost.precision`)."""
        from plpost.precision import weights_dtype

        return weights_dtype(self._trainer.precision if self._trainer is not None else None, self.model_settings.dtype,
                             frozen=frozen)

    def prepare_trainable(self, model: PreTrainedModel, task_type: str = "CAUSAL_LM") -> PreTrainedModel:
        """Adds LoRA adapters and gradient checkpointing as configured, in train mode.

        from_pretrained returns models in eval mode, and Lightning keeps each submodule's mode.
        """
        model.train()
        self.check_vocabularies(model)
        settings = self.model_settings
        # With checkpointing, transformers and peft hook the input embeddings so that their output
        # requires grad. Only reentrant checkpointing needs that (plpost's is not reentrant), and
        # torch.compile cannot trace the hook's requires_grad_: it would run the whole forward
        # eagerly. A model to be compiled goes without the hook.
        input_grads_hook = not settings.torch_compile
        if settings.gradient_checkpointing:
            enable_activation_checkpointing(model)
            model.config.use_cache = False
            if not input_grads_hook:
                model.disable_input_require_grads()
        if settings.quantization is not None:
            from plpost.hf import prepare_quantized_for_training

            model = prepare_quantized_for_training(model)
        if settings.lora is not None:
            from peft import get_peft_model

            if settings.gradient_checkpointing and input_grads_hook:
                model.enable_input_require_grads()
            with peft_reading_deprecated_attributes():
                model = get_peft_model(model, settings.lora.peft_config(task_type))
            if settings.gradient_checkpointing and not input_grads_hook:
                model.get_base_model().disable_input_require_grads()
        return model

    def check_vocabularies(self, model: PreTrainedModel) -> None:
        """The module's tokenizer, and the data module's if it names another, fit `model`'s embedding."""
        check_vocabulary_fits(self.tokenizer, self.tokenizer_name, model, self.model_name)
        data = self._trainer.datamodule if self._trainer is not None else None
        data_tokenizer = getattr(data, "tokenizer_name", None)
        if data_tokenizer is not None and data_tokenizer != self.tokenizer_name:
            check_vocabulary_fits(data.tokenizer, data_tokenizer, model, self.model_name)

    def finish_models(self) -> None:
        """The last step of every stage's `configure_model`, once LoRA, gradient checkpointing and
        the other changes are made: shards (under `ModelParallelStrategy`), then compiles, the order
        FSDP2 and `torch.compile` compose in.

        Then puts the random generator back as `setup` found it: sharded, only rank 0 builds whole
        models (drawing random numbers for new heads, LoRA or `random_init`), so without this the
        ranks would sample with generators in other states than under DDP or on one device."""
        self.shard_models()
        self.compile_models()
        state, self._rng_before_models = getattr(self, "_rng_before_models", None), None
        if state is not None:
            torch.set_rng_state(state)

    def trained_modules(self) -> list[torch.nn.Module | None]:
        """The models this stage trains: the policy here; a stage with a critic or a head adds those."""
        return [self.policy]

    def sharded_modules(self) -> list[torch.nn.Module | None]:
        """The models FSDP2 shards under `ModelParallelStrategy` (see `plpost.sharding`): the
        trained ones and the stage's own frozen models (a reference, a teacher)."""
        return [*self.trained_modules(), *self.stage_frozen_models()]

    def shard_models(self) -> None:
        """Under `ModelParallelStrategy`, shards each of `sharded_modules()` over the data-parallel
        mesh, and makes sure no trainable parameter is left out (it would never be synchronised)."""
        from plpost.sharding import check_all_sharded, data_parallel_mesh, mixed_precision_policy, shard_from_rank0

        mesh = data_parallel_mesh(self)
        if mesh is None:
            return
        for module in self.sharded_modules():
            if module is not None:
                shard_from_rank0(module, mesh, self.trainer.strategy.root_device, mixed_precision_policy(self.trainer))
        check_all_sharded(self)

    def builds_empty(self) -> bool:
        """Whether this process builds its models on the meta device: every rank but 0 under
        `ModelParallelStrategy`, where `shard_models` fills each rank's shards from rank 0's weights."""
        from plpost.sharding import data_parallel_mesh

        return data_parallel_mesh(self) is not None and self.trainer.global_rank != 0

    def compiled_modules(self) -> list[torch.nn.Module | None]:
        """The modules whose forward `torch_compile` compiles: those the steps call themselves.

        The policy and the stage's own frozen models (which run over the same rows at every step);
        a stage that calls a submodule directly (the reward model's backbone, a critic's) lists that instead.
        """
        return [self.policy, *self.stage_frozen_models()]

    def compile_models(self) -> None:
        """With `torch_compile`, compiles the forward of each of `compiled_modules()` in place.

        `nn.Module.compile` keeps the module itself (no `_orig_mod.` wrapper), so parameter names,
        checkpoints, resumption and exports are those of the eager model. Called at the end of
        `configure_model`, after LoRA and the other changes to the model, and again by each
        `fit`/`validate`: a module already compiled is left as it is.

        Shapes are dynamic from the first compile (`dynamic=True`): padded and packed batches
        change width from step to step, and torch's default (`dynamic=None`) would compile a graph
        for the first width only, then compile again, dynamic, at the first other one, in the
        middle of training and for each mode the model runs in (training, no_grad, eval). Each
        graph is an entry in a cache that torch caps at 8 per code object (`recompile_limit`),
        past which further variants run eagerly (after one logged warning), and transformers
        wraps every model's forward in the same decorator, so policy, reference and critic share
        one such cache.
        Measured on the tiny model (CPU, one thread): dynamic compiles in 26 s, the default in
        16 s plus 14 s more at the second step; on batches that all have one width the default
        would only save those 10 s.
        """
        if not self.model_settings.torch_compile:
            return
        for module in self.compiled_modules():
            if module is not None and getattr(module, "_compiled_call_impl", None) is None:
                without_hub_kernel_routing(module).compile(**COMPILE_OPTIONS)
