import inspect
import json
import os
import tempfile

# Tests run offline: nothing may reach the Hub or W&B servers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tokenized data is cached; tests keep theirs in a folder of their own, not the user's cache.
os.environ.setdefault("PLPOST_DATA_CACHE", tempfile.mkdtemp(prefix="plpost-data-cache-"))

import pytest  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForSequenceClassification  # noqa: E402

from jsonargparse._parameter_resolvers import ParamData, get_signature_parameters  # noqa: E402

from plpost.hf import load_tokenizer  # noqa: E402

TINY = "plpost:tiny"


def cli_parameters(cls: type) -> list[ParamData]:
    """The arguments of `cls` as LightningCLI's parser (jsonargparse) resolves them: through each
    `**kwargs` an `__init__` forwards to `super().__init__`, each with the help text it finds in the
    docstrings. jsonargparse exports no resolver; this is the one its `add_class_arguments` calls."""
    return get_signature_parameters(cls)


def cli_signature(cls: type) -> inspect.Signature:
    """`cli_parameters` as a signature, to bind calls against: a name no class in the chain declares
    fails. An argument after a keyword-only one reached `cls` through `**kwargs`: keyword-only too."""
    parameters, keyword_only = [], False
    for p in cli_parameters(cls):
        keyword_only = keyword_only or p.kind is inspect.Parameter.KEYWORD_ONLY
        kind = inspect.Parameter.KEYWORD_ONLY if keyword_only else p.kind
        parameters.append(inspect.Parameter(p.name, kind, default=p.default, annotation=p.annotation))
    return inspect.Signature(parameters)

# pytest-xdist runs one worker per core: each worker computing on every core would oversubscribe
# them (a model this small gains nothing from more than one thread anyway).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def bundled_pairs(count: int) -> list[dict]:
    """The first `count` rows of the bundled addition preference pairs."""
    from plpost.assets import resolve_pretrained

    with open(resolve_pretrained("plpost:data/addition/preference.jsonl")) as lines:
        return [json.loads(next(lines)) for _ in range(count)]


@pytest.fixture(scope="session")
def other_reference(tmp_path_factory) -> str:
    """A reference that is not the policy (the tiny model with random weights), so log-ratios are not 0."""
    from plpost.hf import load_causal_lm

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("other-reference")
    load_causal_lm(TINY, random_init=True).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(TINY)


@pytest.fixture(scope="session")
def pad_is_eos_tokenizer_dir(tmp_path_factory):
    """The bundled tokenizer saved with pad == eos, as many instruct tokenizers ship."""
    tokenizer = load_tokenizer(TINY)
    tokenizer.pad_token = tokenizer.eos_token
    path = tmp_path_factory.mktemp("pad-is-eos")
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def reward_model_dir(tmp_path_factory, tokenizer):
    """A randomly initialised AutoModelForSequenceClassification saved as RewardModule exports one."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    path = tmp_path_factory.mktemp("reward-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


class GradientCapture(L.Callback):
    """Keeps the gradients of the first optimizer step, after all accumulated micro-batches."""

    def __init__(self) -> None:
        self.gradients: dict[str, torch.Tensor] | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.gradients is None:
            self.gradients = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def first_step_gradients(module: L.LightningModule, data: L.LightningDataModule, accumulate: int) -> dict:
    """The gradients of one optimizer step of `module` on the first batches of `data`."""
    L.seed_everything(0)
    capture = GradientCapture()
    trainer = L.Trainer(
        max_steps=1, accumulate_grad_batches=accumulate, callbacks=[capture], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, data)
    return capture.gradients


def chat(*turns: str) -> list[dict]:
    """Alternating user/assistant messages from their contents."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)]


def supervised_spans(input_ids, labels) -> list[list[int]]:
    """The runs of consecutive supervised tokens."""
    spans, current = [], []
    for token, label in zip(input_ids, labels):
        if label != -100:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return spans


@pytest.fixture(scope="session")
def sft_export(tmp_path_factory) -> str:
    """The bundled model after a short SFT on the addition chats: it answers in the chat format and
    ends its answers, so GRPO's groups hold right and wrong answers (the base model's are all wrong and
    all cut off, which leaves GRPO nothing to learn from)."""
    from plpost import ChatDataModule, SFTModule
    from plpost.callbacks import HFExport

    path = str(tmp_path_factory.mktemp("tiny-sft"))
    L.seed_everything(0)
    model = SFTModule("plpost:tiny", optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3))
    data = ChatDataModule("plpost:tiny", train={"path": "plpost:data/addition/sft.jsonl", "limit": 4000},
                          batch_size=64, max_length=64)
    L.Trainer(max_steps=150, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[HFExport(path)]).fit(model, data)
    return path


def is_tool_demonstration(row: dict) -> bool:
    """A chat row in which the assistant calls a tool."""
    return any("tool_calls" in message for message in row["messages"])


@pytest.fixture(scope="session")
def tool_sft_export(tmp_path_factory) -> str:
    """The bundled model after a short SFT on the calculator's tool demonstrations only: offered the
    `add` tool, it calls it, reads the result and answers with it (the shipped mix of direct answers
    would have it call the tool only sometimes)."""
    from plpost import ChatDataModule, SFTModule
    from plpost.assets import resolve_pretrained
    from plpost.callbacks import HFExport

    with open(resolve_pretrained("plpost:data/calculator/sft.jsonl")) as lines:
        rows = [row for row in map(json.loads, lines) if is_tool_demonstration(row)]
    path = str(tmp_path_factory.mktemp("tiny-tool-sft"))
    L.seed_everything(0)
    model = SFTModule("plpost:tiny", optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    data = ChatDataModule("plpost:tiny", train=rows, batch_size=16, max_length=128)
    L.Trainer(max_steps=300, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[HFExport(path)]).fit(model, data)
    return path
