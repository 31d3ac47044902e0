"""A chat template comes with a model folder, which may come from anyone: it renders in a
sandbox with bounded time, memory and output, and every refusal is a one-line UserError."""

from __future__ import annotations

import time

import pytest

from llmscratch.errors import UserError
from llmscratch.tokenizer.hf import MAX_TEMPLATE_OUTPUT, HFTokenizer

tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def backend_json() -> str:
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator(["hello world"], tokenizers.trainers.BpeTrainer(
        vocab_size=270, special_tokens=["<|eot|>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    return tok.to_str()


def render(backend_json: str, template: str) -> str:
    tok = HFTokenizer(backend_json, chat_template=template)
    return tok.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)


def test_a_plain_template_renders(backend_json):
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    assert render(backend_json, template) == "<user>hi<a>"
    assert render(backend_json, "{{ 'ab' * 3 }}{{ range(3) | list | length }}") == "ababab3"  # small is fine


@pytest.mark.parametrize("template, says", [
    ("{{ 'x' * 10**10 }}", "refused"),                                    # 10 GB of x
    ("{{ [0] * 10**9 }}", "refused"),
    ("{{ 2 ** 100000000 }}", "refused"),                                  # a number of 12 MB
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "refused"),
    ("{% for i in range(99999) %}{{ 'y' * 99999 }}{% endfor %}", "refused"),  # 10 GB of output
    ("{{ messages.append(1) }}", "refused"),                             # the sandbox is immutable
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "chat template"),  # no way out of the sandbox
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
])
def test_hostile_templates_are_one_line_errors_quickly(backend_json, template, says):
    t0 = time.perf_counter()
    with pytest.raises(UserError) as e:
        render(backend_json, template)
    assert time.perf_counter() - t0 < 30
    msg = str(e.value)
    assert says in msg and "\n" not in msg and msg.startswith("chat template")


def test_output_limit_is_the_documented_one(backend_json):
    ok = "{{ 'z' * %d }}" % MAX_TEMPLATE_OUTPUT
    assert len(render(backend_json, ok)) == MAX_TEMPLATE_OUTPUT
    with pytest.raises(UserError, match="refused"):
        render(backend_json, "{{ 'z' * %d }}" % (MAX_TEMPLATE_OUTPUT + 1))
