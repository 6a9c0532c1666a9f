"""Rebuild plpost's bundled assets: the tiny tokenizer, the tiny "pretrained" base model and the
two-digit addition datasets that the default demo and the tests run on, offline.

    python scripts/build_assets.py                      # writes into plpost/assets/
    python scripts/build_assets.py --out-dir /tmp/x     # somewhere else
    python scripts/build_assets.py --skip-model         # the tokenizer and data only; the weights stay

Runtime: about 2 minutes on 2 idle CPU cores (pretraining 450 steps at ~0.2-0.25 s each; the
tokenizer and data take seconds). Cores shared with other jobs make it several times longer.

What it writes (under --out-dir):
  tiny/                 tokenizer (byte-level, no merges) + Llama config, fp32 safetensors,
                        generation config; loads with AutoTokenizer / AutoModelForCausalLM.
  data/addition/        sft.jsonl (20,000 rows), preference.jsonl (6,000), prompts.jsonl (4,000),
                        eval.jsonl (300 held-out problems).
  data/calculator/      sft.jsonl (4,000 rows): addition with the `add` tool of
                        plpost.tasks.calculator on offer in half of them; its RL prompts and
                        evaluation are the addition files.

Reproducibility: the data files are byte-identical on every run (fixed seeds; only
`random.random()` draws, whose stream Python keeps stable across versions). The weights are
identical for the same torch version and thread count; other CPUs or thread counts may differ
in the last bits of float arithmetic, and so in the weights, but not in behaviour.

Over 300 lines: one script builds every bundled asset (tokenizer, datasets, model) so they stay
consistent with each other; each section is short and none is used elsewhere.

Why the base model is pretrained at all: SFT must have something to teach. The corpus below
teaches digits and number text (counting, copying, reversing, number words, bare "37+48"
expressions) but never the chat format and never an addition result, so the base model is a
plausible pretrained LM that does not answer chat prompts.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script, the repo root is not on the path

from plpost.tasks.addition import AdditionProblem, random_index, sample_problems  # noqa: E402
from plpost.tasks.calculator import calculator_tool_schemas, direct_demonstration, tool_demonstration  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Tokenizer

PAD, BOS, END = "<pad>", "<|bos|>", "<|end|>"
ROLE_TOKENS = ["<|user|>", "<|assistant|>", "<|system|>", "<|tool|>"]
SPECIAL_TOKENS = [PAD, BOS, END, *ROLE_TOKENS]  # ids 0..6, in this order; <pad> must be id 0

# <|role|>content<|end|> per message; no <|bos|>: every sequence would pay a token for a
# marker that carries no information here (sequences are short, and never packed in post-training).
# The {% generation %} block spans the assistant content, its tool calls AND its <|end|>, so the
# assistant mask trains the model to call tools and to stop. The generation prompt is the bare
# <|assistant|> header, which makes the prompt a token prefix of the full conversation.
# Tools are listed by name only, and a call is one line of JSON: 256 positions leave no room for
# schemas. Arguments given as a JSON string are written as they are, in place of the object.
CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "{{- '<|system|>tools: ' -}}"
    "{%- for tool in tools -%}"
    "{{- (tool['function'] if tool['function'] is defined else tool)['name'] -}}"
    "{{- ', ' if not loop.last else '' -}}"
    "{%- endfor -%}"
    "{{- '<|end|>' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] -%}"
    "{{ raise_exception('unknown role ' + message['role'] + ': expected system, user, assistant or tool') }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}"
    "{{- message['content'] if message['content'] is not none else '' -}}"
    "{%- for call in message['tool_calls'] or [] -%}"
    "{%- set function = call['function'] if call['function'] is defined else call -%}"
    "{%- set arguments = function['arguments'] if function['arguments'] is string else function['arguments'] | tojson -%}"
    "{{- '<call>{\"name\": ' + function['name'] | tojson + ', \"arguments\": ' + arguments + '}</call>' -}}"
    "{%- endfor -%}"
    "<|end|>{% endgeneration %}"
    "{%- else -%}"
    "{{ message['content'] }}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
# What tokenizer.parse_response reads to turn one generated assistant turn back into a message:
# text up to <|end|> is the content, each <call>...</call> one call (its JSON is name + arguments).
# The content defaults to "" and is kept unstripped, so that every turn parses back to exactly the
# message that rendered it (a turn of calls alone included).
RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant", "content": ""},
    "start_anchor": "<|assistant|>",
    "fields": {
        "tool_calls": {
            "open": "<call>",
            "close": "</call>",
            "repeats": True,
            "content": "json",
            "transform": {"type": "function", "function": "{content}"},
        },
        "content": {"close": "<|end|>", "content": "text", "content_args": {"strip": False}},
    },
}
MAX_LENGTH = 256


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable unicode character.

    Written out because transformers no longer exports it; the ByteLevel pre-tokenizer and
    decoder of `tokenizers` use the same map, so the vocabulary below matches them.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: 7 special tokens, then one token per byte (ids 7..262).

    With no merges every UTF-8 byte is its own token, so any text round-trips losslessly and
    every ASCII digit is a single token (arithmetic sees digits, not chunks of numbers).
    """
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for byte, char in sorted(gpt2_bytes_to_unicode().items()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: GPT-2's word-splitting regex only matters for choosing merges; there are none.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=END,
        extra_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        response_template=RESPONSE_TEMPLATE,
        model_max_length=MAX_LENGTH,
        clean_up_tokenization_spaces=False,  # "a ." must decode to "a .", not "a."
    )


# ---------------------------------------------------------------------------------------------
# Datasets

EVAL_SIZE, SFT_SIZE, PREFERENCE_SIZE, PROMPTS_SIZE = 300, 20_000, 6_000, 4_000
FORGOTTEN_CARRY_SHARE = 0.65
EVAL_SEED, SFT_SEED, SFT_MISTAKE_SEED, PREFERENCE_SEED, PROMPTS_SEED = 0, 1, 2, 3, 4
# Calculator SFT: half the rows offer the tool, and 30% of those call it. A model that learns this
# calls the tool only sometimes, and forgets carries when it does not: RL has a reward to gain.
CALCULATOR_SFT_SIZE, CALCULATOR_TOOL_ROWS, TOOL_DEMONSTRATION_SHARE = 4_000, 2_000, 0.30
CALCULATOR_SEED, CALCULATOR_MISTAKE_SEED, CALCULATOR_CALL_SEED, CALCULATOR_SHUFFLE_SEED = 5, 6, 7, 8


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def shuffled(items: list, seed: int) -> list:
    """A copy of `items` in a random order: Fisher-Yates on random() only (see random_index)."""
    items, rng = list(items), random.Random(seed)
    for i in range(len(items)):
        j = i + random_index(rng, len(items) - i)
        items[i], items[j] = items[j], items[i]
    return items


def forgotten_carry_rows(problems: list[AdditionProblem], share: float, seed: int) -> set[int]:
    """Indexes of exactly round(share * #carry problems) of the carry problems, chosen at random.

    Choosing an exact count (rather than a coin per row) ships the stated share, not a noisy one.
    Which rows are wrong is random, so the same problem may appear both right and wrong.
    """
    carry_rows = shuffled([index for index, problem in enumerate(problems) if problem.has_carry], seed)
    return set(carry_rows[: round(share * len(carry_rows))])


def sft_rows(problems: list[AdditionProblem], forgotten_share: float, seed: int) -> list[dict]:
    """Chat rows where exactly round(share * #carry rows) carry rows show the forgotten carry."""
    wrong = forgotten_carry_rows(problems, forgotten_share, seed)
    return [
        {
            "messages": [
                user(problem.question),
                assistant(problem.forgotten_carry_answer if index in wrong else problem.answer),
            ]
        }
        for index, problem in enumerate(problems)
    ]


def calculator_sft_rows(
    problems: list[AdditionProblem],
    *,
    tool_rows: int,
    demonstration_share: float,
    forgotten_share: float,
    call_seed: int,
    mistake_seed: int,
    shuffle_seed: int,
) -> list[dict]:
    """Chat rows for `problems`: the last `tool_rows` carry the calculator's `tools`, and exactly
    round(demonstration_share * tool_rows) of those, chosen at random, are tool demonstrations.
    Every other row answers directly, and exactly round(forgotten_share * #carry problems) of the
    direct rows' carry problems show the forgotten carry (tool results are always right).
    The rows come shuffled, so a training run sees rows with and without tools mixed from the start.
    """
    offered = range(len(problems) - tool_rows, len(problems))
    demonstrated = set(shuffled(list(offered), call_seed)[: round(demonstration_share * tool_rows)])
    direct = [index for index in range(len(problems)) if index not in demonstrated]
    wrong = {direct[k] for k in forgotten_carry_rows([problems[index] for index in direct], forgotten_share, mistake_seed)}
    tools = calculator_tool_schemas()
    rows = []
    for index, problem in enumerate(problems):
        if index in demonstrated:
            messages = tool_demonstration(problem)
        else:
            messages = direct_demonstration(problem, problem.forgotten_carry_answer if index in wrong else problem.answer)
        rows.append({"messages": messages, "tools": tools} if index in offered else {"messages": messages})
    return shuffled(rows, shuffle_seed)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_datasets(data_root: Path) -> None:
    eval_problems = build_addition_data(data_root / "addition")
    build_calculator_data(data_root / "calculator", eval_problems)


def build_addition_data(data_dir: Path) -> list[AdditionProblem]:
    """Writes the addition files; returns the held-out eval problems, which no training file may hold."""
    eval_problems = sample_problems(EVAL_SIZE, EVAL_SEED, distinct=True)
    # Every training file draws from the same pool: all problems except the held-out ones.
    sft_problems = sample_problems(SFT_SIZE, SFT_SEED, exclude=eval_problems)
    preference_problems = sample_problems(PREFERENCE_SIZE, PREFERENCE_SEED, exclude=eval_problems)
    prompt_problems = sample_problems(PROMPTS_SIZE, PROMPTS_SEED, exclude=eval_problems)

    sft = sft_rows(sft_problems, FORGOTTEN_CARRY_SHARE, SFT_MISTAKE_SEED)
    preference = [
        {"prompt": [user(p.question)], "chosen": [assistant(p.answer)], "rejected": [assistant(p.plausible_mistake)]}
        for p in preference_problems
    ]
    prompts = [{"prompt": [user(p.question)], "answer": p.answer} for p in prompt_problems]
    evaluation = [{"prompt": [user(p.question)], "answer": p.answer, "has_carry": p.has_carry} for p in eval_problems]

    for name, rows in [("sft", sft), ("preference", preference), ("prompts", prompts), ("eval", evaluation)]:
        write_jsonl(data_dir / f"{name}.jsonl", rows)

    sft_carry = [row for row, p in zip(sft, sft_problems) if p.has_carry]
    sft_forgotten = sum(row["messages"][1]["content"] != p.answer for row, p in zip(sft, sft_problems))
    sft_correct = len(sft) - sft_forgotten
    print(f"data: eval {len(evaluation)} distinct held-out problems ({sum(p.has_carry for p in eval_problems)} with carry)")
    print(
        f"data: sft {len(sft)} rows, {len({*sft_problems})} distinct problems, {len(sft_carry)} need a carry, "
        f"{sft_forgotten} show the forgotten carry ({sft_forgotten / len(sft_carry):.1%} of carry rows); "
        f"{sft_correct / len(sft):.1%} of demonstrations are correct"
    )
    print(f"data: preference {len(preference)} pairs ({sum(p.has_carry for p in preference_problems)} forgotten-carry rejections)")
    print(f"data: prompts {len(prompts)} rows ({sum(p.has_carry for p in prompt_problems)} with carry)")
    return eval_problems


def build_calculator_data(data_dir: Path, eval_problems: list[AdditionProblem]) -> None:
    problems = sample_problems(CALCULATOR_SFT_SIZE, CALCULATOR_SEED, exclude=eval_problems)
    rows = calculator_sft_rows(
        problems,
        tool_rows=CALCULATOR_TOOL_ROWS,
        demonstration_share=TOOL_DEMONSTRATION_SHARE,
        forgotten_share=FORGOTTEN_CARRY_SHARE,
        call_seed=CALCULATOR_CALL_SEED,
        mistake_seed=CALCULATOR_MISTAKE_SEED,
        shuffle_seed=CALCULATOR_SHUFFLE_SEED,
    )
    write_jsonl(data_dir / "sft.jsonl", rows)

    with_tools = [row for row in rows if "tools" in row]
    calls = sum(len(row["messages"]) == 4 for row in with_tools)
    answered = [row["messages"] for row in rows if len(row["messages"]) == 2]
    direct = [(question_problem(asked["content"]), shown["content"]) for asked, shown in answered]
    carries = sum(problem.has_carry for problem, _ in direct)
    forgotten = sum(shown != problem.answer for problem, shown in direct)
    print(
        f"data: calculator sft {len(rows)} rows, {len(with_tools)} offer the tools and {calls} of those call add "
        f"({calls / len(with_tools):.1%}); {forgotten} of the {carries} direct answers needing a carry "
        f"forget it ({forgotten / carries:.1%})"
    )


def question_problem(question: str) -> AdditionProblem:
    """The problem a user message asks, "37+48" -> AdditionProblem(37, 48)."""
    a, b = question.split("+")
    return AdditionProblem(int(a), int(b))


# ---------------------------------------------------------------------------------------------
# Pretraining corpus: digits and number text, never the chat format, never an addition result.

ONES = "zero one two three four five six seven eight nine".split()
TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for 0..199, e.g. 137 -> "one hundred thirty-seven"."""
    if n >= 100:
        rest = n % 100
        return "one hundred" + (f" {number_words(rest)}" if rest else "")
    if n < 10:
        return ONES[n]
    if n < 20:
        return TEENS[n - 10]
    return TENS[n // 10] + (f"-{ONES[n % 10]}" if n % 10 else "")


def randint(rng: random.Random, low: int, high: int) -> int:
    """Uniform in [low, high], from random() only (see random_index)."""
    return low + random_index(rng, high - low + 1)


def random_number(rng: random.Random) -> str:
    return str(randint(rng, 0, 10 ** randint(rng, 1, 4) - 1))


def corpus_document(rng: random.Random) -> str:
    """One short line of number text, of a randomly chosen kind."""
    kind = rng.random()
    if kind < 0.25:  # counting up: the successor of every number, carries into the tens included
        start = randint(rng, 0, 190)
        return " ".join(str(start + i) for i in range(randint(rng, 4, 12)))
    if kind < 0.35:  # counting down
        start = randint(rng, 20, 199)
        return " ".join(str(start - i) for i in range(randint(rng, 4, 12)))
    if kind < 0.45:  # counting by tens: the tens digit moving while the units stay
        start = randint(rng, 0, 99)
        return " ".join(str(start + 10 * i) for i in range(randint(rng, 3, 9)))
    if kind < 0.55:
        number = random_number(rng)
        return f"copy {number} -> {number}"
    if kind < 0.65:
        number = random_number(rng)
        return f"reverse {number} -> {number[::-1]}"
    if kind < 0.75:
        return " ".join(str(randint(rng, 0, 9)) for _ in range(randint(rng, 3, 10)))
    if kind < 0.90:  # addition expressions, deliberately without their results
        count = randint(rng, 2, 6)
        return " ".join(f"{randint(rng, 10, 99)}+{randint(rng, 10, 99)}" for _ in range(count))
    n = randint(rng, 0, 199)
    return f"{n} is {number_words(n)}"


def corpus_tokens(tokenizer: PreTrainedTokenizerFast, n_tokens: int, seed: int) -> torch.Tensor:
    """A stream of at least `n_tokens` token ids: documents joined by newlines."""
    rng = random.Random(seed)
    documents, length = [], 0
    while length < n_tokens:
        document = corpus_document(rng)
        # Guards for the promise in the module docstring: no results, no chat tokens.
        assert "=" not in document and "<|" not in document, document
        documents.append(document)
        length += len(document) + 1  # ASCII: one byte, one token
    # verbose=False: the stream is far longer than model_max_length on purpose; it is cut into windows.
    ids = tokenizer("\n".join(documents) + "\n", add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids[:n_tokens], dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Base model


def base_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=384,
        max_position_embeddings=MAX_LENGTH,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def pretrain(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    peak_lr: float,
    warmup_steps: int,
    seed: int,
) -> float:
    """A plain causal-LM loop over fresh corpus windows (no repeats); returns the held-out loss.

    AdamW, linear warmup then cosine decay to 10% of the peak. Hand-written rather than
    Lightning because this script must not depend on the library it builds assets for.
    """
    stream = corpus_tokens(tokenizer, (steps + 1) * batch_size * seq_len, seed=seed)
    windows = stream.view(steps + 1, batch_size, seq_len)
    held_out = windows[-1]
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.01)

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    recent, started = [], time.perf_counter()
    report_every = max(1, steps // 8)
    for step in range(steps):
        batch = windows[step]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        recent.append(loss.item())
        if (step + 1) % report_every == 0 or step + 1 == steps:
            mean = sum(recent) / len(recent)
            print(f"pretrain: step {step + 1:4d}/{steps}  loss {mean:.3f}  ({time.perf_counter() - started:.0f}s)")
            recent = []
    model.eval()
    with torch.no_grad():
        held_out_loss = model(input_ids=held_out, labels=held_out).loss.item()
    print(f"pretrain: held-out loss {held_out_loss:.3f} (uniform over the vocabulary would be {math.log(len(tokenizer)):.3f})")
    return held_out_loss


def show_samples(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    """Greedy continuations: number text is continued; a chat prompt is not answered."""
    chat_prompt = tokenizer.apply_chat_template([user("37+48")], add_generation_prompt=True, tokenize=False)
    for prompt in ["12 13 14", "copy 5207 ->", "reverse 381 ->", "45 is", chat_prompt]:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=16, do_sample=False)
        completion = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=False)
        print(f"sample: {prompt!r} -> {completion!r}")


def build_model(tokenizer: PreTrainedTokenizerFast, model_dir: Path, args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    model = LlamaForCausalLM(base_config(tokenizer))
    print(f"model: LlamaForCausalLM, {sum(p.numel() for p in model.parameters()):,} parameters")
    pretrain(
        model,
        tokenizer,
        steps=args.pretrain_steps,
        batch_size=32,
        seq_len=128,
        peak_lr=1e-3,  # 3e-3 sometimes stalls on a plateau (loss ~1.0 instead of ~0.75)
        warmup_steps=max(1, args.pretrain_steps // 20),
        seed=args.seed,
    )
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    show_samples(model, tokenizer)
    model.save_pretrained(model_dir)  # fp32 safetensors
    for path in model_dir.iterdir():
        path.chmod(0o644)  # safetensors writes owner-only files; packaged assets must be readable by all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "plpost" / "assets")
    parser.add_argument("--pretrain-steps", type=int, default=450, help="32 x 128-token windows per step")
    parser.add_argument("--seed", type=int, default=0, help="model init and pretraining corpus")
    parser.add_argument(
        "--skip-model", action="store_true",
        help="write the tokenizer and the data only, keeping the model files in --out-dir as they are",
    )
    args = parser.parse_args()
    started = time.perf_counter()

    model_dir = args.out_dir / "tiny"
    if model_dir.exists() and not args.skip_model:
        shutil.rmtree(model_dir)  # no stale files from an earlier layout
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(model_dir, save_jinja_files=False)  # template inside tokenizer_config.json
    print(f"tokenizer: {len(tokenizer)} tokens, specials {dict(zip(SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)))}")

    build_datasets(args.out_dir / "data")
    # The weights never see the chat template (pretraining has no chat text), so a change to the
    # tokenizer's templates alone does not ask for them to be trained again.
    if not args.skip_model:
        build_model(tokenizer, model_dir, args)
    print(f"done in {time.perf_counter() - started:.0f}s -> {args.out_dir}")


if __name__ == "__main__":
    main()
