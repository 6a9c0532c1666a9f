"""The framework-free ceiling: forward + backward + AdamW over the same batches, nothing else.

Batches are tokenized and collated before the clock starts (no data loader), nothing is logged,
and the losses are written the plain way (log-softmax of the whole float32 logits), so this
loop's time is what the model itself costs on these batches.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from benchmarks.data import IGNORE_INDEX, length_grouped_row_order, tokenize_chat, tokenize_pair
from benchmarks.frameworks import DPO_BETA, adamw, attention_implementation
from benchmarks.measure import StepClock, matmul_parameters
from benchmarks.presets import Preset


class Batch(NamedTuple):
    input_ids: Tensor
    attention_mask: Tensor | None
    position_ids: Tensor | None
    labels: Tensor
    lengths: Tensor | None = None
    """Packed rows only: the length of each sequence in the row, in order."""

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(None if t is None else t.to(device, non_blocking=True) for t in self))


def padded(sequences: list[list[int]], labels: list[list[int]], pad_id: int) -> Batch:
    ids = [torch.tensor(s) for s in sequences]
    return Batch(
        pad_sequence(ids, batch_first=True, padding_value=pad_id),
        pad_sequence([torch.ones_like(t) for t in ids], batch_first=True, padding_value=0),
        None,  # right padding: the model's default positions are right
        pad_sequence([torch.tensor(row) for row in labels], batch_first=True, padding_value=IGNORE_INDEX),
    )


def packed(sequences: list[list[int]], labels: list[list[int]]) -> Batch:
    """One row; position ids restart per sequence, which transformers turns into a block-diagonal mask."""
    return Batch(
        torch.tensor([[t for s in sequences for t in s]]),
        None,
        torch.tensor([[p for s in sequences for p in range(len(s))]]),
        # Each sequence's first label is cleared: nothing predicts it from the sequence before.
        torch.tensor([[label for row in labels for label in [IGNORE_INDEX, *row[1:]]]]),
        torch.tensor([len(s) for s in sequences]),
    )


def collate(variant: str, sequences: list[list[int]], labels: list[list[int]], pad_id: int) -> Batch:
    return packed(sequences, labels) if variant == "padding-free" else padded(sequences, labels, pad_id)


def sft_batches(variant: str, preset: Preset, rows: list[dict], tokenizer) -> list[Batch]:
    examples = [tokenize_chat(tokenizer, row["messages"]) for row in rows]
    batches = []
    for start in range(0, preset.steps * preset.batch_size, preset.batch_size):
        ids, labels = zip(*examples[start : start + preset.batch_size])
        batches.append(collate(variant, ids, labels, tokenizer.pad_token_id))
    return batches


def preference_batches(variant: str, preset: Preset, rows: list[dict], tokenizer) -> list[Batch]:
    """The chosen sequences then the rejected ones (one packed row for "padding-free");
    labels are the completion tokens."""
    rows = rows[: preset.steps * preset.batch_size]
    if variant == "length-grouped":
        rows = [rows[i] for i in length_grouped_row_order(preset, rows, tokenizer)]
    all_pairs = [tokenize_pair(tokenizer, row) for row in rows]
    batches = []
    for start in range(0, len(all_pairs), preset.batch_size):
        pairs = all_pairs[start : start + preset.batch_size]
        sequences, labels = [], []
        for side in (1, 2):
            for pair in pairs:
                sequences.append(pair[0] + pair[side])
                labels.append([IGNORE_INDEX] * len(pair[0]) + pair[side])
        batches.append(collate(variant, sequences, labels, tokenizer.pad_token_id))
    return batches


def per_sequence(values: Tensor, batch: Batch) -> Tensor:
    """(sequences,) sums of `values` (rows, time - 1) over each sequence of the batch."""
    if batch.lengths is None:
        return values.sum(-1)
    count = len(batch.lengths)
    segment = torch.repeat_interleave(torch.arange(count, device=values.device), batch.lengths)[1:]
    return torch.zeros(count, dtype=values.dtype, device=values.device).index_add(0, segment, values[0])


def forward_logits(model, batch: Batch) -> Tensor:
    # use_cache=False: with a cache, transformers ignores the restarting position ids of a packed row
    # and lets attention cross from one sequence into the next.
    return model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False
    ).logits


def sft_loss(model, batch: Batch) -> Tensor:
    logits = forward_logits(model, batch)[:, :-1]
    targets = batch.labels[:, 1:]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def reward_loss(model, batch: Batch) -> Tensor:
    if batch.lengths is None:
        rewards = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    else:  # the score head at the last token of each packed sequence
        hidden = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
        rewards = model.score(hidden.last_hidden_state[0, batch.lengths.cumsum(0) - 1])
    chosen, rejected = rewards.squeeze(-1).chunk(2)
    return -F.logsigmoid(chosen.float() - rejected.float()).mean()


def sequence_logps(model, batch: Batch) -> Tensor:
    logits = forward_logits(model, batch)[:, :-1]
    targets = batch.labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logps = logits.float().log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return per_sequence(logps * mask, batch)


def dpo_loss(policy_logps: Tensor, reference_logps: Tensor) -> Tensor:
    ratios = policy_logps - reference_logps
    chosen, rejected = ratios.chunk(2)
    return -F.logsigmoid(DPO_BETA * (chosen - rejected)).mean()


SETTINGS = {
    ("sft", "padding-free"): "packed rows, cross_entropy on float32 logits",
    ("sft", "padded"): "padded rows, cross_entropy on float32 logits",
    ("sft", "checkpointed"): "padded rows, gradient_checkpointing_enable(use_reentrant=False)",
    ("sft", "compiled"): "padded rows, model.compile(dynamic=True)",
    ("reward", "padded"): "padded pairs, HF pooling",
    ("reward", "padding-free"): "packed pairs, score head at each sequence end",
    ("reward", "length-grouped"): "padded pairs in plpost's length-grouped order",
    ("dpo", "live-ref"): "frozen deepcopy, log_softmax on float32 logits",
    ("dpo", "precomputed-ref"): "reference pass before training",
    ("dpo", "padding-free"): "packed pairs, frozen deepcopy",
}


def load(stage: str, model_dir: str, tokenizer, device: torch.device) -> torch.nn.Module:
    kwargs = dict(dtype=torch.float32, attn_implementation=attention_implementation())
    if stage == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, **kwargs)
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    return model.to(device).train()


def run(stage: str, variant: str, preset: Preset, model_dir: str, rows: list[dict], workdir: Path,
        clock: StepClock) -> dict:
    device = torch.device(preset.device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load(stage, model_dir, tokenizer, device)
    if variant == "checkpointed":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if variant == "compiled":
        model.compile(dynamic=True)
    make_batches = sft_batches if stage == "sft" else preference_batches
    batches = make_batches(variant, preset, rows, tokenizer)
    bf16 = preset.precision == "bf16-mixed"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    reference, reference_logps = None, None
    if stage == "dpo":
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        if variant == "precomputed-ref":  # one pass before training, then the copy is freed
            with torch.no_grad(), autocast:
                reference_logps = [sequence_logps(reference, batch.to(device)) for batch in batches]
            reference = None
    optimizer = adamw(preset)(model.parameters())
    for step, batch in enumerate(batches):
        clock.batch(batch.input_ids, batch.attention_mask)
        batch = batch.to(device)
        with autocast:
            if stage == "sft":
                loss = sft_loss(model, batch)
            elif stage == "reward":
                loss = reward_loss(model, batch)
            else:
                if reference_logps is None:
                    with torch.no_grad():
                        reference_step = sequence_logps(reference, batch)
                else:
                    reference_step = reference_logps[step]
                loss = dpo_loss(sequence_logps(model, batch), reference_step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.step_end()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the last loss is {loss.item()}")
    return {"params": matmul_parameters(model), "settings": SETTINGS[stage, variant]}

