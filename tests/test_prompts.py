"""One prompts module: the same template, by the same rule, for fine-tuning, chat, eval
instruct and serve."""

from __future__ import annotations

import pytest
import torch

from llmscratch import GPT, GPTConfig, UserError, get_tokenizer
from llmscratch.chat import load_chat
from llmscratch.checkpoint import save_model
from llmscratch.prompts import (
    NO_TEMPLATE,
    TEMPLATES,
    encode_chat,
    encode_conversation,
    format_chat,
    get_template,
    template_for,
)

TOK = get_tokenizer("gpt2")
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "Fig."}, {"role": "user", "content": "Another?"}]


def save_run(path, template=None):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, context_length=128, n_embd=16, n_layer=2, n_head=2))
    save_model(model, path, TOK, extra={"template": template} if template else None)
    return path


@pytest.mark.parametrize("template", [None, "alpaca", "phi3"])
def test_chat_and_serve_build_the_same_prompt_for_the_same_run_folder(tmp_path, template):
    serve = pytest.importorskip("llmscratch.serve")
    run = str(save_run(tmp_path / "run", template))
    chat = load_chat(run, device="cpu", max_new_tokens=8)
    engine = serve.load_engine(run, device="cpu")
    assert chat.template.name == engine.template == template_for(run).name == (template or NO_TEMPLATE)
    chat.history = MSGS[1:3]
    chat.system = "Be brief."
    assert chat.prompt_ids("Another?") == encode_chat(engine.tokenizer, MSGS, engine.template)
    assert chat.template.stops == tuple(serve.template_stops(engine.template))


def test_the_rule_for_a_template(tmp_path):
    assert template_for("tiny").name == "plain"  # a preset: a base model
    assert template_for(save_run(tmp_path / "base")).name == "plain"
    assert template_for(save_run(tmp_path / "phi", "phi3")).name == "phi3"
    assert template_for(tmp_path / "phi", "alpaca").name == "alpaca"  # an override wins
    with pytest.raises(UserError, match="unknown prompt template 'chatml'.*--template"):
        template_for(save_run(tmp_path / "odd", "chatml"))
    with pytest.raises(UserError, match="choose one of: alpaca, phi3, plain"):
        get_template("chatml")


def test_plain_turns_end_with_a_newline_and_mark_the_replies():
    ids, mask = encode_conversation(TOK, "plain", MSGS, for_generation=True)
    assert TOK.decode(ids) == format_chat(MSGS, "plain") == (
        "Be brief.\nUser: Name a fruit.\nAssistant: Fig.\nUser: Another?\nAssistant:")
    assert TOK.eot_id not in ids
    assert TOK.decode([i for i, m in zip(ids, mask) if m]) == " Fig.\n"


def test_a_reply_is_followed_by_end_of_text_and_counts_as_response():
    for name in ("alpaca", "phi3"):
        ids, mask = encode_conversation(TOK, TEMPLATES[name], MSGS[:3])
        assert ids[-1] == TOK.eot_id and mask[-1]
        assert TOK.decode([i for i, m in zip(ids, mask) if m]) == "Fig.<|endoftext|>"
        with pytest.raises(ValueError, match="ends with a user turn"):
            encode_conversation(TOK, name, MSGS[:3], for_generation=True)
