"""One prompts module: the same template, by the same rule, for fine-tuning, chat, eval
instruct and serve."""

from __future__ import annotations

import pytest
import torch

from llmscratch import GPT, GPTConfig, UserError, get_tokenizer
from llmscratch.decoding.chat import load_chat
from llmscratch.checkpoints.run import save_model
from llmscratch.decoding.prompts import (
    ALPACA_PREAMBLE,
    NO_TEMPLATE,
    TEMPLATES,
    alpaca_prompt,
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
    from llmscratch import serve
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


# ------------------------------------------------------------------------- the layouts

def test_alpaca_template_is_the_books_format():
    msgs = [{"role": "user", "content": "Name a colour."}]
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n"
    )
    assert format_chat(msgs, "alpaca") == expected == alpaca_prompt("Name a colour.")
    with_input = [{"role": "user", "content": "Translate.", "input": "Hallo"}]
    assert format_chat(with_input, "alpaca") == alpaca_prompt("Translate.", "Hallo")
    assert "\n\n### Input:\nHallo\n\n### Response:\n" in format_chat(with_input, "alpaca")
    turns = msgs + [{"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another?"}]
    assert format_chat(turns, "alpaca") == (  # a reply ends with <|endoftext|>, as fine-tuning trains it
        ALPACA_PREAMBLE + "\n\n### Instruction:\nName a colour.\n\n### Response:\nRed.<|endoftext|>"
        "### Instruction:\nAnother?\n\n### Response:\n"
    )
    system = [{"role": "system", "content": "Be brief."}] + msgs
    assert format_chat(system, "alpaca").startswith("Be brief.\n\n### Instruction:\n")


def test_phi3_and_plain_templates():
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    assert format_chat(msgs, "phi3") == (
        "<|system|>\nBe kind.\n<|user|>\nHi\n<|assistant|>\nHello!<|endoftext|><|user|>\nBye\n<|assistant|>\n"
    )
    assert format_chat(msgs[1:2], "phi3") == "<|user|>\nHi\n<|assistant|>\n"
    assert format_chat(msgs, None) == "Be kind.\nUser: Hi\nAssistant: Hello!\nUser: Bye\nAssistant:"
    assert format_chat(msgs, "plain") == format_chat(msgs, None)
    with pytest.raises(UserError, match="unknown prompt template 'chatml'"):
        format_chat(msgs, "chatml")


def test_chat_tokens_put_the_turn_boundary_in_and_keep_user_text_plain():
    msgs = [{"role": "user", "content": "say <|endoftext|> please"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "again"}]
    ids = encode_chat(TOK, msgs, "alpaca")
    assert ids.count(TOK.eot_id) == 1  # the boundary after "ok", not the string the user typed
    assert TOK.decode(ids) == format_chat(msgs, "alpaca")


@pytest.mark.parametrize("template", ["alpaca", "phi3"])
def test_chat_layout_equals_what_instruction_finetuning_trains_on(template):
    """What chat/serve send a model is exactly what fine-tuning showed it before a reply: the
    prompt ids equal the training ids of the same conversation up to the first response token."""
    conversations = [
        [{"role": "user", "content": "Name a colour."}],
        [{"role": "user", "content": "Translate.", "input": "Hallo"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
    ]
    for msgs in conversations:
        trained = msgs + [{"role": "assistant", "content": "Sure, here it is."}]
        ids, is_response = encode_conversation(TOK, get_template(template, for_training=True), trained)
        last_reply = max(i for i, r in enumerate(is_response) if not r) + 1
        assert any(is_response[last_reply:]) and all(is_response[last_reply:])
        assert encode_chat(TOK, msgs, template) == ids[:last_reply]


def test_fine_tuning_refuses_a_template_whose_replies_cannot_teach_stopping(tmp_path):
    assert get_template("alpaca", for_training=True) is TEMPLATES["alpaca"]
    with pytest.raises(UserError, match="'plain'.*fine-tune with: alpaca, phi3"):
        get_template("plain", for_training=True)
    from llmscratch.finetune import instruct as finetune
    cfg = finetune.InstructConfig(model="tiny", data="alpaca-1100", out=str(tmp_path / "out"),
                                  template="plain")
    with pytest.raises(UserError, match="'plain'"):
        finetune.finetune_instruct(cfg)
    assert not (tmp_path / "out").exists()  # refused before anything was written
