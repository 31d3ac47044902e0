"""Chat: streaming replies with the template, history trimmed to the window, /reset and
/exit, and piped stdin through the CLI."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch

from llmscratch import GPT, GPTConfig
from llmscratch.decoding.chat import Chat, chat_loop
from llmscratch.checkpoints.run import save_model
from llmscratch.decoding.prompts import TEMPLATES, encode_conversation
from llmscratch.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("gpt2")


def tiny(context_length=64):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50257, context_length=context_length, n_embd=16, n_layer=2, n_head=2))


def test_reply_streams_the_greedy_continuation_of_the_template(tok):
    model = tiny(128)
    chat = Chat(model, tok, TEMPLATES["alpaca"], max_new_tokens=8)
    pieces = list(chat.send("Name a fruit."))
    reply = "".join(pieces)
    # the same tokens as decoding the templated prompt greedily by hand
    ids, _ = encode_conversation(tok, TEMPLATES["alpaca"], [{"role": "user", "content": "Name a fruit."}],
                                 for_generation=True)
    with torch.no_grad():
        seq = torch.tensor([ids])
        for _ in range(8):
            nxt = model(seq)[0, -1].argmax()
            if int(nxt) == tok.eot_id:
                break
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    assert reply == tok.decode(seq[0, len(ids):].tolist())
    assert chat.history == [{"role": "user", "content": "Name a fruit."},
                            {"role": "assistant", "content": reply.strip()}]


def test_history_is_trimmed_to_the_window(tok):
    chat = Chat(tiny(64), tok, TEMPLATES["phi3"], max_new_tokens=16)
    for i in range(6):
        chat.history += [{"role": "user", "content": f"question number {i} about things"},
                         {"role": "assistant", "content": f"answer number {i} about things"}]
    ids = chat.prompt_ids("last question")
    assert len(ids) <= 64 - 16
    text = tok.decode(ids)
    assert text.endswith("<|user|>\nlast question\n<|assistant|>\n")
    assert "answer number 5" in text and "question number 0" not in text
    assert chat.dropped > 0
    # a single message longer than the window keeps its end (the cue for the reply)
    long_ids = chat.prompt_ids("word " * 200)
    assert len(long_ids) <= 48 and tok.decode(long_ids).endswith("<|assistant|>\n")


def test_loop_handles_reset_exit_and_blank_lines(tok):
    chat = Chat(tiny(128), tok, TEMPLATES["alpaca"], max_new_tokens=3)
    stdin = io.StringIO("hello\n\n/reset\nhi again\n/exit\nnever read\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    assert chat_loop(chat, stdin, stdout, stderr) == 2
    assert "(conversation reset)" in stderr.getvalue()
    assert [m["content"] for m in chat.history if m["role"] == "user"] == ["hi again"]
    assert stdout.getvalue().endswith("\n")


def test_cli_chat_with_piped_stdin(tmp_path, tok):
    save_model(tiny(128), tmp_path / "run", tok, extra={"template": "phi3"})
    r = subprocess.run([sys.executable, "-m", "llmscratch", "chat", "--model", str(tmp_path / "run"),
                        "--max-new-tokens", "4"], input="Name a fruit.\nAnd another?\n",
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "llmscratch", "chat", "--model", str(tmp_path / "run")],
                       input="/exit\nHello\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == ""


def test_reply_ends_at_the_templates_stop_strings(tok):
    """Where the model starts writing the user's next turn itself, the reply ends (as in serve)."""
    import dataclasses

    model = tiny(128)
    full = "".join(Chat(model, tok, TEMPLATES["alpaca"], max_new_tokens=16).send("Name a fruit."))
    assert len(full) > 8
    stop = full[4:7]
    template = dataclasses.replace(TEMPLATES["alpaca"], stops=(stop,))
    chat = Chat(model, tok, template, max_new_tokens=16)
    reply = "".join(chat.send("Name a fruit."))
    assert reply == full[: full.index(stop)]
    assert chat.history[-1] == {"role": "assistant", "content": reply.strip()}
