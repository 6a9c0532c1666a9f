"""`plpost chat`: one-shot answers from every form of model, the interactive loop and its commands,
and refusals that name the fix."""

import io
import shutil
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from conftest import TINY
from lightning.pytorch.callbacks import ModelCheckpoint

from plpost import ChatDataModule, SFTModule
from plpost.callbacks import HFExport
from plpost.chat import ChatError, ChatSession, converse, load_chat_model
from plpost.cli import main
from plpost.generation import generate_texts


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A briefly trained SFT run: its export folder and its last checkpoint."""
    folder = tmp_path_factory.mktemp("sft")
    L.seed_everything(0)
    module = SFTModule(TINY, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    data = ChatDataModule(TINY, train="plpost:data/addition/sft.jsonl", batch_size=32, max_length=32)
    L.Trainer(
        max_steps=40, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[HFExport(str(folder / "model")), ModelCheckpoint(dirpath=folder / "checkpoints", save_last=True)],
    ).fit(module, data)
    return folder


def greedy_answer(model_path: str, text: str, max_new_tokens: int = 8) -> str:
    """The reference: plpost's batch generation, greedy, on the same chat-formatted prompt."""
    model, tokenizer = load_chat_model(model_path)
    return generate_texts(model, tokenizer, [[{"role": "user", "content": text}]], max_new_tokens=max_new_tokens).texts[0]


@pytest.mark.parametrize("form", ["bundled", "export", "checkpoint"])
def test_one_shot_prints_the_greedy_answer_and_exits(form, trained, capsys):
    model = {"bundled": TINY, "export": str(trained / "model"), "checkpoint": str(trained / "checkpoints" / "last.ckpt")}[form]
    main(["chat", model, "--prompt", "37+48", "--temperature", "0", "--max-new-tokens", "8"])
    printed = capsys.readouterr().out
    assert printed == greedy_answer(model, "37+48") + "\n"


def test_the_trained_model_answers_a_sum_in_the_chat_format(trained, capsys):
    """40 steps of SFT teach the format: digits, then the end-of-turn token (which stops generation)."""
    main(["chat", str(trained / "model"), "--prompt", "12+30", "--temperature", "0"])
    answer = capsys.readouterr().out.strip()
    assert answer.isdigit(), answer


def test_interactive_loop_keeps_history_and_obeys_commands(trained):
    model, tokenizer = load_chat_model(str(trained / "model"))
    session = ChatSession(model, tokenizer, temperature=0, max_new_tokens=8, out=io.StringIO())
    lines = iter(["12+30", "1+1", "/clear", "5+5", "/system You add numbers.", "2+2", "/help", "/quit", "never read"])
    shown = io.StringIO()
    converse(session, read=lambda prompt: next(lines), out=shown)
    assert next(lines) == "never read"  # /quit left the loop
    assert [m["role"] for m in session.history] == ["user", "assistant"]  # cleared by /system, then one exchange
    assert session.history[0]["content"] == "2+2" and session.system == "You add numbers."
    assert "(conversation cleared)" in shown.getvalue() and "/clear" in shown.getvalue()  # /help lists commands


def test_history_reaches_the_model_and_is_forgotten_oldest_first_when_the_context_is_full(trained):
    model, tokenizer = load_chat_model(str(trained / "model"))
    session = ChatSession(model, tokenizer, temperature=0, max_new_tokens=8, out=io.StringIO())
    session.reply("12+30")
    second_turn = session.encode(session.history + [{"role": "user", "content": "1+1"}])
    assert second_turn.shape[1] > session.encode([{"role": "user", "content": "1+1"}]).shape[1]
    session.context = second_turn.shape[1] + 7  # no room for 8 new tokens after two turns
    session.reply("1+1")
    assert [m["content"] for m in session.history][0] == "1+1"  # the first exchange was forgotten


def test_sampling_follows_the_seed(capsys):
    answers = []
    for _ in range(2):
        main(["chat", TINY, "--prompt", "3+4", "--temperature", "1.0", "--top-p", "0.9", "--seed", "7",
              "--max-new-tokens", "12"])
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1]


def test_refusals_name_the_fix(reward_model_dir, tmp_path, capsys):
    with pytest.raises(ChatError, match="reward model.*chat with a policy"):
        load_chat_model(reward_model_dir)
    model, tokenizer = load_chat_model(TINY)
    tokenizer.chat_template = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}" \
                              "{% endif %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ChatError, match="leave out --system"):
        ChatSession(model, tokenizer, system="Be brief.")
    with pytest.raises(ChatError, match="temperature"):
        ChatSession(model, tokenizer, temperature=-1)
    with pytest.raises(SystemExit) as exited:
        main(["chat", reward_model_dir, "--prompt", "hi"])
    assert exited.value.code == 2 and "chat with a policy" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_one_shot_and_interactive_in_a_terminal(trained, tmp_path):
    """The installed `plpost` command: one-shot through a pipe, and a real terminal session in tmux
    (typed input, streamed answer, /quit)."""
    done = subprocess.run(["plpost", "chat", str(trained / "model"), "--prompt", "12+30", "--temperature", "0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().isdigit(), done.stderr
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    session = f"plpost-chat-{id(tmp_path)}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "30",
                    f"{sys.executable} -m plpost.cli chat {trained / 'model'} --temperature 0; sleep 30"], check=True)
    try:
        # capture-pane drops trailing spaces, so the prompt ">>> " reads ">>>" on screen
        screen = wait_for(session, ">>>")
        subprocess.run(["tmux", "send-keys", "-t", session, "12+30", "Enter"], check=True)
        screen = wait_for(session, ">>>", count=2)
        assert done.stdout.strip() in screen  # the same greedy answer as the one-shot
        subprocess.run(["tmux", "send-keys", "-t", session, "/quit", "Enter"], check=True)
        wait_for(session, "/quit")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)


def wait_for(session: str, text: str, count: int = 1, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout
        if screen.count(text) >= count:
            return screen
        time.sleep(0.5)
    raise AssertionError(f"{text!r} did not appear {count} times:\n{screen}")
