"""`plpost chat MODEL`: talk to a model in the terminal, in its own chat template, token by token.

MODEL is an export folder (full model or LoRA adapter), a Hub name, ``plpost:tiny``, or a
Lightning checkpoint of any stage (``.../checkpoints/last.ckpt``). `--prompt` answers one message
and exits, for scripts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch
from jinja2 import TemplateError
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from plpost.assets import resolve_pretrained
from plpost.export import CheckpointError, module_from_checkpoint
from plpost.generation import encode_prompts, generation_config
from plpost.hf import DTYPES, load_causal_lm, load_tokenizer
from plpost.quiet import peft_reading_deprecated_attributes
from plpost.sampling import complete

HELP = "/clear forgets the conversation, /system TEXT sets the system prompt (and clears), /quit or Ctrl-D leaves"
SMALLEST_ANSWER_ROOM = 64
"""History is forgotten, oldest turns first, when less than this many tokens (or max_new_tokens,
if smaller) would be left in the model's context for the answer."""


class ChatError(ValueError):
    """A model or setting that cannot chat; the message names the fix."""


def is_classifier(config) -> bool:
    return any(name.endswith("ForSequenceClassification") for name in getattr(config, "architectures", None) or [])


def load_chat_model(
    name_or_path: str, *, dtype: str | None = None, stage: str | None = None, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(causal LM in eval mode, its tokenizer) from any of the forms MODEL takes."""
    path = Path(name_or_path)
    refusal = f"{name_or_path} is a reward model: it scores answers and cannot write them; chat with a policy (an SFT, DPO or PPO export)"
    if path.suffix == ".ckpt":
        module = module_from_checkpoint(path, stage=stage)
        model = module.generation_model()
        if getattr(model, "score", None) is not None or is_classifier(getattr(model, "config", None)):
            raise ChatError(refusal)
        model = model.to(DTYPES[dtype]) if dtype else model
        return model.eval(), module.tokenizer
    if (path / "adapter_config.json").is_file():
        from peft import PeftConfig, PeftModel

        base = PeftConfig.from_pretrained(str(path)).base_model_name_or_path
        with peft_reading_deprecated_attributes():
            model = PeftModel.from_pretrained(load_causal_lm(base, dtype=dtype, trust_remote_code=trust_remote_code), path)
        return model.eval(), load_tokenizer(str(path), trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(resolve_pretrained(name_or_path), trust_remote_code=trust_remote_code)
    if is_classifier(config):
        raise ChatError(refusal)
    model = load_causal_lm(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval(), load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)


class ChatSession:
    """A conversation: its messages so far and the sampling settings its answers are drawn with.

    Args:
        model, tokenizer: the causal LM (any device) and its tokenizer, whose chat template renders
            the conversation with the generation prompt.
        system: the system prompt (None: none).
        temperature: 0 decodes greedily; above 0 samples at that temperature.
        top_p: nucleus sampling threshold (1.0: off).
        max_new_tokens: the longest answer.
        out: where answers stream to, token by token.
    """

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, system: str | None = None,
        temperature: float = 0.7, top_p: float = 1.0, max_new_tokens: int = 256, out: TextIO | None = None,
    ) -> None:
        if temperature < 0:
            raise ChatError(f"temperature must be 0 (greedy) or more, got {temperature}")
        if not 0 < top_p <= 1:
            raise ChatError(f"top_p must be in (0, 1], got {top_p}")
        if max_new_tokens < 1:
            raise ChatError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.out = out
        self.history: list[dict[str, str]] = []
        self.context = getattr(model.config, "max_position_embeddings", None)
        if system is not None:
            self.encode([{"role": "user", "content": "hello"}])  # a template without system turns fails now

    def messages(self, history: list[dict[str, str]]) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system is not None else []) + history

    def encode(self, history: list[dict[str, str]]) -> torch.Tensor:
        try:
            input_ids, _ = encode_prompts(self.tokenizer, [self.messages(history)])
        except TemplateError as error:
            fix = "leave out --system" if self.system is not None else "give a model whose tokenizer has a chat template"
            raise ChatError(f"the chat template cannot render this conversation ({error}): {fix}") from None
        return input_ids

    def clear(self, system: str | None = None) -> None:
        self.history = []
        if system is not None:
            self.system = system

    def fit_context(self, history: list[dict[str, str]]) -> tuple[list[dict[str, str]], torch.Tensor, int]:
        """(history that fits, its prompt ids, the answer's token budget): the oldest turns are
        forgotten until the answer has room in the model's context."""
        input_ids = self.encode(history)
        if self.context is None:
            return history, input_ids, self.max_new_tokens
        room = min(self.max_new_tokens, SMALLEST_ANSWER_ROOM)
        while input_ids.shape[1] + room > self.context and len(history) > 1:
            history = history[2:] if len(history) > 2 else history[1:]  # one user + assistant exchange
            input_ids = self.encode(history)
        if input_ids.shape[1] + room > self.context:
            raise ChatError(
                f"this message is {input_ids.shape[1]} tokens and the model's context is {self.context}: send a shorter one"
            )
        return history, input_ids, min(self.max_new_tokens, self.context - input_ids.shape[1])

    @torch.no_grad()
    def reply(self, text: str) -> str:
        """Streams the answer to `text` to `out` and returns it; both join the history."""
        history, input_ids, budget = self.fit_context([*self.history, {"role": "user", "content": text}])
        forgotten = len(self.history) + 1 - len(history)
        if forgotten:
            print(f"(forgot the {forgotten} oldest messages to fit the model's {self.context}-token context)", file=sys.stderr)
        sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}
        config = generation_config(
            self.tokenizer, max_new_tokens=budget, use_cache=True, **(sampling if self.temperature > 0 else {"do_sample": False})
        )
        device = next(self.model.parameters()).device
        streamer = StreamTo(self.out or sys.stdout, self.tokenizer)
        completion = complete(self.model, input_ids.to(device), torch.ones_like(input_ids).to(device), config,
                              streamer=streamer)
        answer = self.tokenizer.decode(completion[0], skip_special_tokens=True)
        self.history = [*history, {"role": "assistant", "content": answer}]
        return answer


class StreamTo(TextStreamer):
    """transformers' TextStreamer (the answer only, special tokens dropped), into any text stream."""

    def __init__(self, out: TextIO, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


def converse(session: ChatSession, read: Callable[[str], str] = input, out: TextIO | None = None) -> None:
    """The interactive loop: one answer per line read, until /quit or end of input."""
    out = out or sys.stdout
    while True:
        try:
            line = read(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        if not line:
            continue
        command, _, argument = line.partition(" ")
        if command in ("/quit", "/exit"):
            return
        if command == "/clear":
            session.clear()
            out.write("(conversation cleared)\n")
        elif command == "/system":
            session.clear(system=argument.strip() or None)
            out.write(f"(system prompt {'set' if argument.strip() else 'removed'}; conversation cleared)\n")
        elif command.startswith("/"):
            out.write(HELP + "\n")
        else:
            try:
                session.reply(line)
            except KeyboardInterrupt:
                out.write("\n(answer interrupted; it is not kept)\n")
            except ChatError as error:
                out.write(f"({error})\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="plpost chat", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1])
    parser.add_argument("model", help="export folder, Hub name, plpost:tiny, or a Lightning checkpoint (.ckpt)")
    parser.add_argument("--prompt", help="answer this one message, print the answer and exit")
    parser.add_argument("--system", help="the system prompt")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 decodes greedily (default: 0.7)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: 1.0, off)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="the longest answer (default: 256)")
    parser.add_argument("--seed", type=int, help="seed of the sampling, for answers that repeat")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: a GPU if there is one)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="load the weights in this dtype (default: as stored)")
    parser.add_argument("--stage", help="for a checkpoint that does not name its stage (e.g. SFTModule)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model's repository")
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.seed is not None:
        torch.manual_seed(args.seed)
    try:
        model, tokenizer = load_chat_model(
            args.model, dtype=args.dtype, stage=args.stage, trust_remote_code=args.trust_remote_code
        )
        session = ChatSession(
            model.to(device), tokenizer, system=args.system, temperature=args.temperature, top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
        )
        if args.prompt is not None:
            session.reply(args.prompt)
            return
    except (ChatError, CheckpointError) as error:
        parser.exit(2, f"plpost chat: error: {error}\n")
    print(f"plpost chat: {args.model} on {device}. {HELP}.")
    converse(session)
