"""HFTokenizer: a Hugging Face tokenizer.json (built here with `tokenizers`) and the model's
own chat template (Llama-3 and Qwen3 forms), checked against transformers' tokenizer, used by
prompts (masks), chat, serve and `download` of a modern repo id on the local fake hub."""

import json

import pytest
import torch

from llmscratch.errors import UserError
from llmscratch.decoding.prompts import encode_conversation, template_for
from llmscratch.tokenizer import get_tokenizer, load_tokenizer
from llmscratch.tokenizer.hf import HFTokenizer

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
QWEN3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message.role == 'assistant' and loop.first %}{{ raise_exception('the first turn must be the user\\'s') }}{% endif %}"
    "{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = {
    "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "qwen3": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
]


def build_tokenizer_folder(folder, kind: str, docs_text: str, template: bool = True):
    """A byte-level BPE tokenizer.json trained here, plus a tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS[kind],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([docs_text[:60_000]], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "eos_token": "<|eot_id|>" if kind == "llama3" else "<|im_end|>",
              "bos_token": "<|begin_of_text|>" if kind == "llama3" else None}
    if template:
        config["chat_template"] = LLAMA3_TEMPLATE if kind == "llama3" else QWEN3_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(params=["llama3", "qwen3"])
def tok_folder(request, tmp_path, docs_text):
    return build_tokenizer_folder(tmp_path / request.param, request.param, docs_text), request.param


def test_encoding_and_template_equal_transformers(tok_folder):
    transformers = pytest.importorskip("transformers")
    folder, kind = tok_folder
    ours = HFTokenizer.from_folder(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    text = "Hello there, general Kenobi! 3.14 ünïcode"
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text)) == text
    assert ours.eot_id == theirs.convert_tokens_to_ids(theirs.eos_token)
    rendered = ours.render_chat(CONVERSATION, add_generation_prompt=True)
    assert rendered == theirs.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    ids, mask = encode_conversation(ours, "model", CONVERSATION, for_generation=True)
    expected = theirs.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert ids == list(expected)
    assert not any(mask)  # a prompt: nothing to learn in it
    ids, mask = encode_conversation(ours, "model", CONVERSATION[:3])  # for training: the reply is masked in
    reply = ours.decode(i for i, m in zip(ids, mask) if m)
    assert reply == ("Blue.<|eot_id|>" if kind == "llama3" else "Blue.<|im_end|>")


# Qwen3's form: the latest reply (after the last user turn) gets an empty <think> block, earlier
# ones do not, so a turn renders differently once the conversation goes on.
QWEN3_THINK_TEMPLATE = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- if m.role == 'assistant' %}"
    "{%- if loop.index0 > ns.last_query %}{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_a_template_that_rewrites_earlier_turns_still_masks_each_reply(tmp_path, docs_text):
    transformers = pytest.importorskip("transformers")
    folder = build_tokenizer_folder(tmp_path / "q", "qwen3", docs_text)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = QWEN3_THINK_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours, theirs = HFTokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(folder)
    talk = CONVERSATION + [{"role": "assistant", "content": "Green."}]
    assert ours.render_chat(talk) == theirs.apply_chat_template(talk, tokenize=False)
    ids, mask = encode_conversation(ours, "model", talk)
    assert ours.decode(ids) == ours.render_chat(talk)
    replies = ours.decode(i for i, m in zip(ids, mask) if m)
    assert replies == "Blue.<|im_end|>Green.<|im_end|>"


def test_specials_typed_by_a_user_stay_text_in_encode_ordinary(tok_folder):
    folder, kind = tok_folder
    tok = HFTokenizer.from_folder(folder)
    marker = SPECIALS[kind][-1]
    assert tok.special_tokens[marker] in tok.encode(marker)
    assert tok.special_tokens[marker] not in tok.encode_ordinary(marker)
    assert tok.decode(tok.encode_ordinary(marker)) == marker


def test_saved_in_a_run_folder_and_loaded_back(tok_folder, tmp_path):
    folder, _ = tok_folder
    tok = HFTokenizer.from_folder(folder)
    tok.save(tmp_path / "run" / "tokenizer.json")
    back = load_tokenizer(tmp_path / "run")
    assert isinstance(back, HFTokenizer)
    assert back.encode("some text") == tok.encode("some text")
    assert back.chat_template == tok.chat_template and back.eot_id == tok.eot_id
    # a Hugging Face tokenizer.json by path works too
    assert isinstance(get_tokenizer(folder / "tokenizer.json"), HFTokenizer)
    # the model's template is picked for both folders, plain for a folder without one
    assert template_for(folder).name == "model"
    assert template_for(tmp_path / "run").name == "model"


def test_no_template_asked_to_chat_is_a_one_line_error(tmp_path, docs_text):
    folder = build_tokenizer_folder(tmp_path / "t", "qwen3", docs_text, template=False)
    tok = HFTokenizer.from_folder(folder)
    assert template_for(folder).name == "plain"
    with pytest.raises(UserError, match="no chat template \\(tokenizer_config.json 'chat_template'\\)"):
        encode_conversation(tok, "model", CONVERSATION, for_generation=True)
    with pytest.raises(UserError, match="the gpt2 tokenizer has none"):
        encode_conversation(get_tokenizer("gpt2"), "model", CONVERSATION, for_generation=True)


def test_template_errors_are_user_errors(tmp_path, docs_text):
    tok = HFTokenizer.from_folder(build_tokenizer_folder(tmp_path / "t", "qwen3", docs_text))
    with pytest.raises(UserError, match="chat template: the first turn must be the user's"):
        tok.render_chat([{"role": "assistant", "content": "hi"}])
    (tmp_path / "t" / "tokenizer.json").write_text("{\"model\": {}}")
    with pytest.raises(UserError, match="tokenizer.json: not a readable Hugging Face tokenizer.json"):
        HFTokenizer.from_folder(tmp_path / "t")


def make_llama_folder(folder, docs_text, kind="llama3"):
    """A random tiny Llama-format checkpoint with its own tokenizer and chat template."""
    from llmscratch.models.gpt import GPT, GPTConfig
    from llmscratch.hf import save_hf

    build_tokenizer_folder(folder, kind, docs_text)
    torch.manual_seed(0)
    vocab = HFTokenizer.from_folder(folder).vocab_size
    save_hf(GPT(GPTConfig.from_name("llama-tiny", vocab_size=vocab)), folder)
    return folder


def test_chat_and_serve_use_the_models_own_template(tmp_path, docs_text):
    from llmscratch.decoding.chat import load_chat
    from llmscratch.serve.engine import load_engine

    folder = make_llama_folder(tmp_path / "m", docs_text)
    chat = load_chat(str(folder), max_new_tokens=5, kernels=False)
    assert chat.template.name == "model"
    expected = encode_conversation(chat.tokenizer, "model", [{"role": "user", "content": "Hi"}], True)[0]
    assert chat.prompt_ids("Hi") == expected
    assert isinstance("".join(chat.send("Name a colour.")), str)
    engine = load_engine(str(folder))
    assert engine.template == "model"
    tok = HFTokenizer.from_folder(folder)
    ids, _ = encode_conversation(engine.tokenizer, engine.template, CONVERSATION, for_generation=True)
    assert tok.decode(ids) == tok.render_chat(CONVERSATION, add_generation_prompt=True)
    # the OpenAI-compatible route lays the messages out with it
    from fastapi.testclient import TestClient

    from llmscratch.serve.app import create_app

    with TestClient(create_app(engine)) as http:
        r = http.post("/v1/chat/completions", json={"model": engine.model_id, "messages": CONVERSATION,
                                                     "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(ids)


def test_download_a_modern_repo_id_from_the_fake_hub(tmp_path, docs_text, monkeypatch):
    import threading
    from http.server import ThreadingHTTPServer

    from test_hub import _HubHandler  # the fake Hub of tests/test_hub.py

    from llmscratch.checkpoints.run import load_model
    from llmscratch.checkpoints.hub import download_model
    from llmscratch.hf import load_hf

    folder = make_llama_folder(tmp_path / "src", docs_text, "qwen3")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler)
    server.repo, server.revision = "HuggingFaceTB/SmolLM2-135M-Instruct", "main"
    server.files = {f: (folder / f).read_bytes()
                    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")}
    server.sha256, server.git_sha1, server.etags, server.redirect, server.requests = {}, {}, True, False, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        out = download_model("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path / "dl", endpoint=url, progress=False)
    finally:
        server.shutdown()
        server.server_close()
    model, tok = load_model(str(out))
    assert isinstance(tok, HFTokenizer) and tok.has_chat_template
    ref = load_hf(folder)
    idx = torch.randint(0, tok.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(idx), ref(idx))
    with pytest.raises(UserError, match="unknown model 'llama-9'.*qwen3-0.6b"):
        download_model("llama-9")


def test_finetune_instruct_with_lora_uses_the_models_own_template(tmp_path, docs_text, instruction_json):
    from llmscratch.decoding.chat import load_chat
    from llmscratch.finetune.instruct import InstructConfig, finetune_instruct

    folder = make_llama_folder(tmp_path / "m", docs_text, "qwen3")
    out = tmp_path / "tuned"
    result = finetune_instruct(InstructConfig(model=str(folder), data=str(instruction_json), out=str(out), epochs=1,
                                              batch_size=2, lr=3e-3, lora_rank=4, mask_prompt=True,
                                              max_new_tokens=3, split="0.7,0.1,0.2", progress=False))
    assert result.metrics["template"] == "model"
    assert json.loads((out / "config.json").read_text())["template"] == "model"
    chat = load_chat(str(out), max_new_tokens=3, kernels=False)  # the run folder keeps the template
    assert chat.template.name == "model" and isinstance(chat.tokenizer, HFTokenizer)
    assert chat.tokenizer.render_chat([{"role": "user", "content": "x"}], True).endswith("<|im_start|>assistant\n")


def test_cli_generate_convert_and_one_line_errors_on_a_llama_folder(tmp_path, docs_text, capsys):
    from llmscratch.cli.main import main

    def run(*args):
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    folder = make_llama_folder(tmp_path / "m", docs_text)
    code, out, err = run("generate", "--model", str(folder), "--prompt", "def f", "--max-new-tokens", "4", "--seed", "1")
    assert code == 0, err
    code, _, err = run("convert", str(folder), str(tmp_path / "run"))
    assert code == 0, err
    assert isinstance(load_tokenizer(tmp_path / "run"), HFTokenizer)
    code, out, err = run("info", "--model", str(tmp_path / "run"))
    assert code == 0 and "parameters" in out.lower(), err
    code, _, err = run("convert", str(tmp_path / "run"), str(tmp_path / "back"))  # and back, tokenizer files too
    assert code == 0, err
    back = HFTokenizer.from_folder(tmp_path / "back")
    assert back.chat_template == LLAMA3_TEMPLATE and back.eos_token == "<|eot_id|>"
    transformers = pytest.importorskip("transformers")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "back").encode("def f", add_special_tokens=False) \
        == back.encode("def f")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "longrope", "factor": 2.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    code, _, err = run("generate", "--model", str(folder), "--prompt", "x")
    assert code == 2 and "Traceback" not in err
    assert "rope_scaling: unsupported rope_type 'longrope'" in err
    assert len(err.strip().splitlines()) == 1
