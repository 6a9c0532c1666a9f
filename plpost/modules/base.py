"""What every stage shares: the policy built in `configure_model` (see `plpost.modules.building`),
frozen models kept out of checkpoints (see `plpost.frozen`), optimizer injection, and safe
training by default: atomic checkpoint writes, exact resumption (random generators), and a stop
on non-finite steps."""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from plpost.callbacks.guards import NonFiniteGuard
from plpost.callbacks.progress import Throughput
from plpost.checkpointing import FROZEN_SOURCES_KEY, RNG_STATES_KEY, STAGE_KEY, TRAINED_KEYS, check_keys_match
from plpost.checkpointing import check_saved_keys, is_under, rng_states_of_all_ranks, set_rng_state
from plpost.checkpointing import use_atomic_checkpoints
from plpost.frozen import HoldsFrozenModels
from plpost.hf import load_tokenizer
from plpost.modules.building import BuildsModels
from plpost.modules.settings import ModelSettings, settings_from_flat
from plpost.optim import WarmupCosineLR
from plpost.quiet import ignore_eval_mode_notice, quiet_known_noise, remove_filter

def drop_frozen_keys(module: PostTrainingModule, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    frozen = tuple(f"{prefix}{name}" for name in module.frozen_copies())
    for key in [k for k in state if is_under(k, frozen)]:
        del state[key]


def default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)


def argument_names(cls: type) -> set[str]:
    """The names `cls(...)` takes: those of its `__init__`, and, while an `__init__` forwards `**kwargs`
    to `super().__init__`, those of the next `__init__` in the MRO (as jsonargparse resolves them)."""
    names: set[str] = set()
    for owner in cls.__mro__:
        if "__init__" not in vars(owner):
            continue
        parameters = list(inspect.signature(vars(owner)["__init__"]).parameters.values())[1:]
        names.update(p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names


class PostTrainingModule(BuildsModels, HoldsFrozenModels, L.LightningModule):
    """Base of the stage modules; `self.policy` is the model being trained.

    Frozen models (a reference, a teacher, reward models) are `FrozenCopy` submodules, found by
    `HoldsFrozenModels`: never trained, never written into checkpoints (their source is recorded
    instead). Stages name the plpost data modules they train on in `data_modules`; a fit with
    another plpost data module stops in `setup`, before any model loads (a data module of one's
    own is trusted).

    Each argument is declared once, by the class that uses it: a subclass declares its own and
    passes the rest on with `**kwargs` (the CLI and `from_hyperparameters` read them through the
    bases; a name that no class declares is refused here). A stage with arguments of its own
    declares `model` and `tokenizer` again, first, for the positional form `DPOModule("plpost:tiny")`.

    Args:
        model: Hub name, local folder, or bundled name (``plpost:tiny``) of the model to train.
        tokenizer: the tokenizer (default: the model's); linked from the data in the CLI.
        model_settings: how the model loads and trains (`ModelSettings`: dtype, attention, LoRA,
            gradient checkpointing, compile, ...), the same for every stage.
        optimizer: the optimizer, given the trainable parameters.
        scheduler: the learning-rate schedule, stepped every optimizer step.
    """

    samples_while_training: ClassVar[bool] = False
    """The stage generates from the policy as it trains (see `plpost.sharding.check_strategy`)."""
    data_modules: ClassVar[tuple[type[L.LightningDataModule], ...]] = ()
    task_type: ClassVar[str] = "CAUSAL_LM"
    """peft's task type for the policy's adapters."""

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        *,
        model_settings: ModelSettings = ModelSettings(),
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        quiet_known_noise()
        # The arguments of the stage's own __init__ too (Lightning reads every __init__ frame of this
        # object, as the caller left its locals): the hyperparameters checkpoints and loggers record.
        # Optimizers and schedulers are callables, reward sources and environments Python objects:
        # not hyperparameters.
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "rewards", "environment"])
        self.model_name = model
        self.tokenizer_name = tokenizer or model
        self.model_settings = model_settings
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
            self._tokenizer = load_tokenizer(self.tokenizer_name, trust_remote_code=self.model_settings.trust_remote_code)
        return self._tokenizer

    @classmethod
    def from_hyperparameters(cls, hyperparameters: dict[str, Any]) -> PostTrainingModule:
        """The module as its checkpoint's `hyper_parameters` configure it, unbuilt (no model loaded):
        what `plpost export` and `plpost chat` rebuild a policy from. Keys that are not arguments
        (LightningCLI adds `_class_path` and `_instantiator`) are left out; model settings saved
        one by one (checkpoints older than `model_settings`) are gathered into one."""
        arguments = argument_names(cls)
        hyperparameters = settings_from_flat(dict(hyperparameters))
        return cls(**{name: value for name, value in hyperparameters.items() if name in arguments})

    def configure_model(self) -> None:
        # Built here, not in __init__, so sharded strategies can build it directly on their devices.
        if self.policy is None:
            self.build_models()
        self.finish_models()

    def build_models(self) -> None:
        """The policy's starting weights loaded, the frozen models made from them (a "copy"
        reference, see `build_frozen_models`), then the policy made trainable. Stages that build
        more (a value model, reward sources) extend it."""
        start = self.load_pretrained()
        self.build_frozen_models(start)
        self.policy = self.prepare_trainable(start, self.task_type)

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
            scheduler.total_steps = self.scheduled_steps()
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Lightning zeroes gradients in the next step's closure, after its forward: freed here, the
        # last step's gradients (a whole model's worth unsharded) never sit beside the activations.
        optimizer.zero_grad(set_to_none=True)

    def scheduled_steps(self) -> int:
        """The optimizer steps of the whole fit, which a schedule without `total_steps` spans."""
        return int(self.trainer.estimated_stepping_batches)

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
        check_dtype_fits(self.model_settings.dtype, self.trainer.precision)
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
    @property
    def strict_loading(self) -> bool:
        """False under `ModelParallelStrategy` when frozen models exist: it loads a full-state checkpoint
        parameter by parameter and would stop at the frozen ones, which checkpoints never hold.
        Every other key is still checked (`on_load_checkpoint`)."""
        from plpost.sharding import data_parallel_mesh

        sharded_with_frozen = bool(self.frozen_copies()) and data_parallel_mesh(self) is not None
        return not sharded_with_frozen and self._strict_loading in (None, True)

    @strict_loading.setter
    def strict_loading(self, strict: bool) -> None:
        self._strict_loading = strict

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[TRAINED_KEYS] = sorted(self.state_dict().keys())
        checkpoint[FROZEN_SOURCES_KEY] = self.frozen_sources()
        checkpoint[STAGE_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint[RNG_STATES_KEY] = rng_states_of_all_ranks()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_states_to_restore = checkpoint.get(RNG_STATES_KEY)
        if self._strict_loading is not False:
            check_saved_keys(set(self.state_dict().keys()), checkpoint.get(TRAINED_KEYS))

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

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        if strict:
            frozen = tuple(self.frozen_copies())
            check_keys_match([k for k in result.missing_keys if not is_under(k, frozen)], result.unexpected_keys)
        return result
