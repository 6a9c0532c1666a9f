"""The console messages that plpost's own choices cause and that a user cannot act on, filtered
where plpost causes them.

Each filter matches one message exactly, never a warning category or a whole library, so every
other warning, above all one a user can act on, is shown as before. What is filtered and why:

- "`is_gradient_checkpointing` is deprecated": peft reads it whenever it wraps a model in LoRA.
- Lightning's advertisements ("Tip: ... try installing litlogger / litmodels"), printed by every
  Trainer; not a warning about the run.
- "`isinstance(treespec, LeafSpec)` is deprecated": Lightning's own use of a torch API that torch
  2.13 deprecates, raised in every fit; only a Lightning release can change it.
- "Total length of `list` across ranks is zero": plpost's data modules return an empty list as
  the validation loader when the run has no validation data.
- "You passed in a `val_dataloader` but have no `validation_step`": the same empty list, seen by a
  stage that does not validate (PPO); Lightning then skips the validation loop, as intended.
- "Loading `train_dataloader` to estimate number of stepping batches": plpost's learning-rate
  schedules ask Lightning for the length of the run.
- "Found N module(s) in eval mode at the start of training": plpost keeps frozen models (DPO's and
  PPO's reference, reward models) in eval mode on purpose; filtered only while a stage module fits.
- The "LOAD REPORT" of a sequence-classification model built on a causal LM when the only thing it
  reports is the new, randomly initialised score head (a reward model or critic gets one on purpose).
- The "Loading weights" / "Writing model shards" bars of a model of a few MB, over before they draw.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

LIGHTNING_RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"
LIGHTNING_NOTICES = (
    "💡 Tip: For seamless cloud",  # the litlogger and litmodels advertisements
    "Loading `train_dataloader` to estimate number of stepping batches",
)
WARNINGS = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree"),
    (r"Total length of `list` across ranks is zero", r"lightning\.pytorch\.utilities\.data"),
    (r"You passed in a `val_dataloader` but have no `validation_step`", r"lightning\.pytorch\.trainer\.configuration_validator"),
)
EVAL_MODE_NOTICE = r"Found \d+ module\(s\) in eval mode at the start of training"
TRANSFORMERS_LOADING_LOGGER = "transformers.modeling_utils"
SMALL_MODEL_BYTES = 200 * 2**20
"""Below this size on disk, loading or saving a model takes well under a second: no progress bar."""


class DropMessages(logging.Filter):
    """Drops log records whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_known_noise() -> None:
    """Installs the process-wide filters above (idempotent). Called when a stage module is built,
    which is before the Trainer prints its notices, in the CLI as in Python."""
    logger = logging.getLogger(LIGHTNING_RANK_ZERO_LOGGER)
    if not any(isinstance(existing, DropMessages) for existing in logger.filters):
        logger.addFilter(DropMessages(LIGHTNING_NOTICES))
    for message, module in WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)


@contextlib.contextmanager
def peft_reading_deprecated_attributes() -> Iterator[None]:
    """peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model
    (peft's to change); that FutureWarning is filtered inside this block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        yield


def ignore_eval_mode_notice() -> tuple:
    """Filters Lightning's notice about modules in eval mode and returns the filter's entry, for
    `remove_filter`: stage modules add it when a fit starts and remove it when the fit ends (two
    hooks, so not a `catch_warnings` block)."""
    warnings.filterwarnings("ignore", message=EVAL_MODE_NOTICE)
    return warnings.filters[0]


def remove_filter(entry: tuple) -> None:
    with contextlib.suppress(ValueError):  # already gone, e.g. filters reset by the caller
        warnings.filters.remove(entry)


@contextlib.contextmanager
def lightning_notices_hidden() -> Iterator[None]:
    """Lightning's info notices (devices found, why a fit stopped, exports) are not printed inside
    this block; its warnings are. For a pipeline whose console is its own progress and report."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


class NewHeadReport(logging.Filter):
    """Drops transformers' LOAD REPORT when every key it lists is a MISSING key of `head`."""

    ROW = re.compile(r"^(\S+)\s*\|\s*(\w+)\s*\|")

    def __init__(self, head: str) -> None:
        super().__init__()
        self.head = head

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        rows = [self.ROW.match(line) for line in message.splitlines()[1:]]
        rows = [row.groups() for row in rows if row and row.group(1) != "Key"]
        only_new_head = bool(rows) and all(
            status == "MISSING" and key.startswith(f"{self.head}.") for key, status in rows
        )
        return not only_new_head


@contextlib.contextmanager
def new_head_report_filtered(head: str) -> Iterator[None]:
    """Inside this block, a load report that lists only the new `head` is not printed."""
    logger = logging.getLogger(TRANSFORMERS_LOADING_LOGGER)
    report_filter = NewHeadReport(head)
    logger.addFilter(report_filter)
    try:
        yield
    finally:
        logger.removeFilter(report_filter)


def folder_bytes(path: str | Path) -> int | None:
    """Bytes of the weight files in a local model folder; None for a Hub name (not measured)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    return sum(file.stat().st_size for pattern in ("*.safetensors", "*.bin") for file in folder.glob(pattern))


@contextlib.contextmanager
def no_progress_bars_if_small(size_bytes: int | None) -> Iterator[None]:
    """Transformers' loading / saving bars are hidden inside this block for a model under
    SMALL_MODEL_BYTES; a large model (or one of unknown size) keeps them."""
    from transformers.utils import logging as transformers_logging

    hide = size_bytes is not None and size_bytes < SMALL_MODEL_BYTES and transformers_logging.is_progress_bar_enabled()
    if hide:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hide:
            transformers_logging.enable_progress_bar()
