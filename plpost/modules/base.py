"""What every stage shares: building the policy in `configure_model`, LoRA, `torch.compile`,
optimizer injection, keeping frozen models (reference, reward) out of checkpoints, and safe
training by default: atomic checkpoint writes, exact resumption (random generators), and a stop
on non-finite steps."""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from plpost.callbacks.guards import NonFiniteGuard
from plpost.callbacks.progress import Throughput
from plpost.checkpointing import RNG_STATES_KEY, rng_states_of_all_ranks, set_rng_state, use_atomic_checkpoints
from plpost.hf_compat import enable_activation_checkpointing, without_hub_kernel_routing
from plpost.hf import check_vocabulary_fits, load_causal_lm, load_tokenizer
from plpost.optim import WarmupCosineLR
from plpost.quiet import ignore_eval_mode_notice, peft_reading_deprecated_attributes, quiet_known_noise, remove_filter

STAGE_KEY = "plpost_stage"
"""Checkpoint entry naming the stage class (`module.Class`), so `plpost export` and `plpost chat` rebuild it."""
TRAINED_KEYS = "plpost_trained_keys"
"""Checkpoint entry listing the state-dict keys saved (all but the frozen models')."""


def check_keys_match(missing: list[str], unexpected: list[str]) -> None:
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def drop_frozen_keys(module: PostTrainingModule, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state if k.startswith(prefix) and module.is_frozen_key(k[len(prefix):])]:
        del state[key]


@dataclass
class LoraSettings:
    """LoRA adapters through `peft` (see `peft.LoraConfig` for the meaning of each field).

    Args:
        r: rank of the update matrices.
        alpha: scaling numerator (the update is scaled by alpha / r, or alpha / sqrt(r) with rslora).
        dropout: dropout on the adapter input.
        target_modules: module names to adapt, or "all-linear".
        modules_to_save: modules trained in full and saved with the adapter (e.g. a score head).
        use_rslora: rank-stabilised scaling.
        use_dora: weight-decomposed adapters (DoRA).
        merge_on_export: write merged full weights on export instead of an adapter folder.
        bias: which biases to train ("none", "all", "lora_only").
        extra: any other `peft.LoraConfig` field by name (e.g. ``{layers_to_transform: [0, 1]}``),
            so new peft options need no plpost release.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    merge_on_export: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    extra: dict[str, Any] = field(default_factory=dict)

    def peft_config(self, task_type: str):
        from peft import LoraConfig

        settings = asdict(self)
        extra = settings.pop("extra")
        settings.pop("merge_on_export")
        settings["lora_alpha"] = settings.pop("alpha")
        settings["lora_dropout"] = settings.pop("dropout")
        return LoraConfig(task_type=task_type, **settings, **extra)


# Checkpoints hold the hyperparameters, LoRA settings included, and Lightning reads them back
# with torch.load(weights_only=True) (torch's default), which refuses classes not allowlisted.
torch.serialization.add_safe_globals([LoraSettings])


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


def default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)


class PostTrainingModule(L.LightningModule):
    """Base of the stage modules; `self.policy` is the model being trained.

    Stage subclasses list their frozen submodules in `frozen_modules`; those are never trained,
    never written into checkpoints, and their source is recorded in the checkpoint instead.
    They name the plpost data modules they train on in `data_modules`; a fit with another plpost
    data module stops in `setup`, before any model loads (a data module of one's own is trusted).
    """

    frozen_modules: tuple[str, ...] = ()
    samples_while_training: ClassVar[bool] = False
    """The stage generates from the policy as it trains (see `plpost.sharding.check_strategy`)."""
    data_modules: ClassVar[tuple[type[L.LightningDataModule], ...]] = ()

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        *,
        random_init: bool = False,
        dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        lora: LoraSettings | None = None,
        gradient_checkpointing: bool = False,
        torch_compile: bool = False,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        quiet_known_noise()
        self.model_name = model
        self.tokenizer_name = tokenizer or model
        self.random_init = random_init
        self.dtype_name = dtype
        self.attn_implementation = attn_implementation
        self.trust_remote_code = trust_remote_code
        self.lora = lora
        self.gradient_checkpointing = gradient_checkpointing
        # Not `self.compile`: that would hide nn.Module.compile, which compile_models calls.
        self.torch_compile = torch_compile
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.policy: PreTrainedModel | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._rng_states_to_restore: list[dict[str, Any]] | None = None
        # Frozen models leave the state dict itself, not only the checkpoint file: sharded
        # strategies read and write it through torch.distributed.checkpoint, which needs every
        # key it is given in the checkpoint it loads.
        self.register_state_dict_post_hook(drop_frozen_keys)

    # -- models ---------------------------------------------------------------------------
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name, trust_remote_code=self.trust_remote_code)
        return self._tokenizer

    def load_pretrained(
        self, name_or_path: str | None = None, *, random_init: bool | None = None, frozen: bool = False,
        empty: bool | None = None,
    ) -> PreTrainedModel:
        """`frozen`: a model never trained (a reference, a teacher), kept in the compute dtype.
        `empty`: built on the meta device (default: `builds_empty()`, for a model `shard_models` fills)."""
        return load_causal_lm(
            name_or_path or self.model_name,
            random_init=self.random_init if random_init is None else random_init,
            dtype=self.weights_dtype(frozen=frozen),
            attn_implementation=self.attn_implementation,
            trust_remote_code=self.trust_remote_code,
            empty=self.builds_empty() if empty is None else empty,
        )

    def weights_dtype(self, *, frozen: bool = False) -> str | None:
        """The dtype a trained (or `frozen`) model loads in under the Trainer's precision (see `plpost.precision`)."""
        from plpost.precision import weights_dtype

        return weights_dtype(self._trainer.precision if self._trainer is not None else None, self.dtype_name,
                             frozen=frozen)

    def prepare_trainable(self, model: PreTrainedModel, task_type: str = "CAUSAL_LM") -> PreTrainedModel:
        """Adds LoRA adapters and gradient checkpointing as configured, in train mode.

        from_pretrained returns models in eval mode, and Lightning keeps each submodule's mode.
        """
        model.train()
        self.check_vocabularies(model)
        # With checkpointing, transformers and peft hook the input embeddings so that their output
        # requires grad. Only reentrant checkpointing needs that (plpost's is not reentrant), and
        # torch.compile cannot trace the hook's requires_grad_: it would run the whole forward
        # eagerly. A model to be compiled goes without the hook.
        input_grads_hook = not self.torch_compile
        if self.gradient_checkpointing:
            enable_activation_checkpointing(model)
            model.config.use_cache = False
            if not input_grads_hook:
                model.disable_input_require_grads()
        if self.lora is not None:
            from peft import get_peft_model

            if self.gradient_checkpointing and input_grads_hook:
                model.enable_input_require_grads()
            with peft_reading_deprecated_attributes():
                model = get_peft_model(model, self.lora.peft_config(task_type))
            if self.gradient_checkpointing and not input_grads_hook:
                model.get_base_model().disable_input_require_grads()
        return model

    def check_vocabularies(self, model: PreTrainedModel) -> None:
        """The module's tokenizer, and the data module's if it names another, fit `model`'s embedding."""
        check_vocabulary_fits(self.tokenizer, self.tokenizer_name, model, self.model_name)
        data = self._trainer.datamodule if self._trainer is not None else None
        data_tokenizer = getattr(data, "tokenizer_name", None)
        if data_tokenizer is not None and data_tokenizer != self.tokenizer_name:
            check_vocabulary_fits(data.tokenizer, data_tokenizer, model, self.model_name)

    @classmethod
    def from_hyperparameters(cls, hyperparameters: dict[str, Any]) -> PostTrainingModule:
        """The module as its checkpoint's `hyper_parameters` configure it, unbuilt (no model loaded):
        what `plpost export` and `plpost chat` rebuild a policy from. Keys that are not arguments
        (LightningCLI adds `_class_path` and `_instantiator`) are left out."""
        arguments = inspect.signature(cls.__init__).parameters
        return cls(**{name: value for name, value in hyperparameters.items() if name in arguments})

    def configure_model(self) -> None:
        # Built here, not in __init__, so sharded strategies can build it directly on their devices.
        if self.policy is None:
            self.policy = self.prepare_trainable(self.load_pretrained())
        self.finish_models()

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

    def sharded_modules(self) -> list[torch.nn.Module | None]:
        """The models FSDP2 shards under `ModelParallelStrategy`, trained and frozen alike (see
        `plpost.sharding`): the policy here; stages with a reference, a critic or a head list those too."""
        return [self.policy]

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

        The policy here; a stage that calls a submodule directly (the reward model's backbone)
        or runs another model every step (a frozen reference, a critic) lists those instead.
        """
        return [self.policy]

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
        if not self.torch_compile:
            return
        for module in self.compiled_modules():
            if module is not None and getattr(module, "_compiled_call_impl", None) is None:
                without_hub_kernel_routing(module).compile(**COMPILE_OPTIONS)

    def export_model(self) -> PreTrainedModel:
        """The model that export writes as a Hugging Face folder."""
        return self.policy

    def generation_model(self) -> PreTrainedModel:
        """The model that samples and evaluation callbacks generate with."""
        return self.policy

    # -- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self):
        parameters = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(parameters)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if isinstance(scheduler, WarmupCosineLR) and scheduler.total_steps is None:
            scheduler.total_steps = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def loss_scale(self) -> float:
        """Undoes Lightning's division by accumulate_grad_batches and DDP's gradient averaging.

        Losses here are sums divided by the loss tokens (or pairs) of the whole optimizer step on
        all devices, so the micro-batch losses must add up, not average.
        """
        return float(self.trainer.accumulate_grad_batches * self.trainer.world_size)

    def global_sum(self, value: Tensor) -> Tensor:
        return self.trainer.strategy.reduce(value.detach().float(), reduce_op="sum")

    def log_learning_rate(self) -> None:
        optimizer = self.optimizers(use_pl_optimizer=False)
        optimizer = optimizer[0] if isinstance(optimizer, list) else optimizer
        self.log("train/lr", optimizer.param_groups[0]["lr"], rank_zero_only=True)

    # -- safe defaults --------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        from plpost.precision import check_dtype_fits
        from plpost.sharding import check_strategy

        check_strategy(self.trainer, samples=self.samples_while_training)
        check_dtype_fits(self.dtype_name, self.trainer.precision)
        self.check_data_module(self.trainer.datamodule)
        use_atomic_checkpoints(self.trainer)  # a kill while saving leaves the previous checkpoint whole
        # Frozen models (references, reward models) are in eval mode on purpose.
        self._eval_mode_notice_filter = ignore_eval_mode_notice()
        self._rng_before_models = torch.get_rng_state()  # see finish_models

    def teardown(self, stage: str) -> None:
        remove_filter(getattr(self, "_eval_mode_notice_filter", None))

    def check_data_module(self, data: L.LightningDataModule | None) -> None:
        from plpost.data.base import PostTrainingDataModule

        if not self.data_modules or not isinstance(data, PostTrainingDataModule) or isinstance(data, self.data_modules):
            return
        expected = " or ".join(kind.__name__ for kind in self.data_modules)
        raise TypeError(
            f"{type(self).__name__} trains on a {expected}, not a {type(data).__name__}: give it a {expected} "
            f"(in YAML, data.class_path: plpost.{self.data_modules[0].__name__})"
        )

    def configure_callbacks(self) -> list[L.Callback]:
        # A NaN stops the run by default; a NonFiniteGuard given to the Trainer (e.g. one that
        # skips such steps) is kept, since Lightning would replace it with one returned here.
        # The same holds for the Throughput shown in the progress bar.
        defaults = [NonFiniteGuard(), Throughput()]
        return [d for d in defaults if not any(isinstance(c, type(d)) for c in self.trainer.callbacks)]

    # -- checkpoints ----------------------------------------------------------------------
    def is_frozen_key(self, key: str) -> bool:
        return any(key.startswith(f"{name}.") for name in self.frozen_modules)

    @property
    def strict_loading(self) -> bool:
        """False under `ModelParallelStrategy` when frozen models exist: it loads a full-state checkpoint
        parameter by parameter and would stop at the frozen ones, which checkpoints never hold.
        Every other key is still checked (`check_trained_keys`)."""
        from plpost.sharding import data_parallel_mesh

        return not (self.frozen_modules and data_parallel_mesh(self) is not None) and self._strict_loading in (None, True)

    @strict_loading.setter
    def strict_loading(self, strict: bool) -> None:
        self._strict_loading = strict

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[TRAINED_KEYS] = sorted(self.state_dict().keys())
        checkpoint["plpost_frozen_sources"] = self.frozen_sources()
        checkpoint[STAGE_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint[RNG_STATES_KEY] = rng_states_of_all_ranks()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_states_to_restore = checkpoint.get(RNG_STATES_KEY)
        self.check_trained_keys(checkpoint.get(TRAINED_KEYS))

    def check_trained_keys(self, saved: list[str] | None) -> None:
        """The checkpoint holds what this module trains, no more and no less: what `load_state_dict`
        checks where Lightning calls it, and sharded loading (which fills in parameters one by one) does not."""
        if saved is None or self._strict_loading is False:
            return
        expected = set(self.state_dict().keys())
        check_keys_match(sorted(expected - set(saved)), sorted(set(saved) - expected))

    def on_train_start(self) -> None:
        # Restored here, right before the first batch after a resume, not when the checkpoint is
        # read: what runs in between (sanity-check validation, model and loader setup) draws
        # random numbers that the uninterrupted run did not draw at this point.
        states, self._rng_states_to_restore = self._rng_states_to_restore, None
        if states is not None and len(states) == self.trainer.world_size:
            set_rng_state(states[self.trainer.global_rank])
        elif states is not None:
            rank_zero_warn(f"the checkpoint holds the random generators of {len(states)} processes, not "
                           f"{self.trainer.world_size}; they are not restored, so dropout draws other masks")

    def frozen_sources(self) -> dict[str, str]:
        """Where each frozen model comes from, recorded in checkpoints in place of its weights."""
        return {}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        if strict:
            check_keys_match([k for k in result.missing_keys if not self.is_frozen_key(k)], result.unexpected_keys)
        return result
