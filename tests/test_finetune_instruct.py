"""Instruction fine-tuning: templates, the masking collate, data reading, and an end-to-end
run whose output folder generates like any run folder."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from llmscratch import GPT, GPTConfig, UserError
from llmscratch.checkpoints.run import load_model, read_run_config, save_model
from llmscratch.finetune.data import read_instruction_records
from llmscratch.finetune.instruct import (
    TEMPLATES,
    InstructConfig,
    collate_instruct,
    encode_conversation,
    finetune_instruct,
    respond,
)
from llmscratch.tokenizer import BPETokenizer, get_tokenizer

RECORDS = [{"instruction": f"Repeat the word {w}.", "input": "" if i % 2 else f"{w} {w}",
            "output": f"{w}"} for i, w in enumerate(["apple", "pear", "plum", "fig", "lime", "kiwi",
                                                       "date", "yuzu", "sloe", "nut"] * 2)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    corpus = " ".join(r["instruction"] + " " + r["output"] for r in RECORDS)
    corpus += TEMPLATES["alpaca"].prompt("x", "y") + TEMPLATES["phi3"].prompt("x", "y")
    tok = BPETokenizer().train(corpus * 3, 320)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, context_length=96, n_embd=32, n_layer=2, n_head=2))
    save_model(model, out, tok)
    return out


def test_alpaca_template_matches_the_book_layout():
    tok = get_tokenizer("gpt2")
    msgs = [{"role": "user", "content": "Add 2 and 2.", "input": "2, 2"}, {"role": "assistant", "content": "4"}]
    ids, mask = encode_conversation(tok, TEMPLATES["alpaca"], msgs)
    text = tok.decode(ids)
    assert text == ("Below is an instruction that describes a task. Write a response that appropriately "
                    "completes the request.\n\n### Instruction:\nAdd 2 and 2.\n\n### Input:\n2, 2"
                    "\n\n### Response:\n4<|endoftext|>")
    # the response and its end-of-text are the only response tokens
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "4<|endoftext|>"
    prompt, _ = encode_conversation(tok, TEMPLATES["alpaca"], msgs[:1], for_generation=True)
    assert ids[:len(prompt)] == prompt
    phi, _ = encode_conversation(tok, TEMPLATES["phi3"], msgs)
    assert tok.decode(phi) == "<|user|>\nAdd 2 and 2.\n2, 2\n<|assistant|>\n4<|endoftext|>"


def test_collate_pads_keeps_first_eot_and_masks_the_rest():
    eot = 0
    batch = [([5, 6, 7, eot], [False, False, True, True]), ([8, eot], [False, True])]
    x, y = collate_instruct(batch, pad_id=eot)
    assert x.tolist() == [[5, 6, 7], [8, eot, eot]]
    assert y.tolist() == [[6, 7, eot], [eot, -100, -100]]
    x, y = collate_instruct(batch, pad_id=eot, mask_prompt=True)
    assert y.tolist() == [[-100, 7, eot], [eot, -100, -100]]
    x, y = collate_instruct(batch, pad_id=eot, max_length=2)
    assert x.tolist() == [[5, 6], [8, eot]] and y.tolist() == [[6, 7], [eot, -100]]


def test_reads_alpaca_1100(named_dataset):
    named_dataset("alpaca-1100")  # the real file (or a skip saying why it can't be had)
    recs = read_instruction_records("alpaca-1100")
    assert len(recs) == 1100 and recs[0]["messages"][1]["role"] == "assistant"


def test_reads_alpaca_json_and_chat_jsonl(instruction_json, tmp_path):
    recs = read_instruction_records(str(instruction_json))
    assert len(recs) == 12 and [m["role"] for m in recs[0]["messages"]] == ["user", "assistant"]
    assert recs[0]["messages"][0]["input"] == "I walk to school."
    assert recs[1]["messages"][0]["input"] == ""  # no input: an empty one
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello."}]}) + "\n")
    (rec,) = read_instruction_records(str(chat))
    ids, mask = encode_conversation(get_tokenizer("gpt2"), TEMPLATES["alpaca"], rec["messages"])
    assert get_tokenizer("gpt2").decode(ids).startswith("Be brief.\n\n### Instruction:\nHi")


@pytest.mark.parametrize("content, name, message", [
    ('[{"instruction": "a", "input": "", "output": "b"},\n {"instruction": "c", "output": }]', "d.json",
     r"d.json:2: malformed JSON"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a"\n', "d.jsonl", r"d.jsonl:2: malformed JSON"),
    ('[{"instruction": "a", "input": "", "output": "  "}]', "d.json", "record 1: empty output"),
    ('[{"prompt": "a"}]', "d.json", "no 'instruction' field"),
    ('{"messages": [{"role": "user", "content": "a"}]}\n', "d.jsonl", "d.jsonl:1: the last message"),
    ('{"messages": [{"role": "bot", "content": "a"}]}\n', "d.jsonl", "role 'bot'"),
])
def test_bad_instruction_files(tmp_path, content, name, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=message) as e:
        read_instruction_records(str(path))
    assert "\n" not in str(e.value)


def test_too_small_dataset_writes_nothing(tmp_path, tiny_run):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(RECORDS[:3]))
    with pytest.raises(UserError, match="dataset too small"):
        finetune_instruct(InstructConfig(model=str(tiny_run), data=str(data), out=str(tmp_path / "o"),
                                         progress=False))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("template, lora", [("alpaca", 0), ("phi3", 4)])
def test_finetune_instruct_end_to_end(tmp_path, tiny_run, template, lora, capsys):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(RECORDS))
    out = tmp_path / "inst"
    cfg = InstructConfig(model=str(tiny_run), data=str(data), out=str(out), template=template,
                         epochs=3, batch_size=4, lr=3e-3, lora_rank=lora, mask_prompt=bool(lora),
                         max_new_tokens=5, split="0.7,0.1,0.2", progress=False)
    result = finetune_instruct(cfg)
    responses = json.loads((out / "responses.json").read_text())
    assert len(responses) == 4
    # the Alpaca layout's preamble makes some examples longer than the 96-token context: said, counted
    err = capsys.readouterr().err
    if template == "alpaca":
        assert 0 < result.metrics["n_truncated"] < 16
        assert f"{result.metrics['n_truncated']} of 16 train/val examples are longer than 96 tokens" in err
    else:
        assert result.metrics["n_truncated"] == 0 and "are cut to it" not in err
    assert result.metrics["n_empty_responses"] == sum(not r["response"].strip() for r in responses)
    assert set(responses[0]) == {"instruction", "input", "output", "response"}
    assert responses[0]["output"] == RECORDS[16]["output"]
    assert read_run_config(out)["template"] == template
    hist = result.metrics["history"]
    assert [h["epoch"] for h in hist if "epoch" in h] == [1, 2, 3]
    losses = [h["train_loss"] for h in hist if "train_loss" in h]
    assert losses[-1] < losses[0]
    assert (out / "loss.png").is_file() and (out / "metrics.json").is_file()
    # a plain run folder: loads with load_model and answers with the template
    model, tok = load_model(str(out))
    messages = [{"role": "user", "content": "Repeat the word fig."}]

    def by_hand(net):  # the template's prompt, five argmax steps of full forward passes
        ids, _ = encode_conversation(tok, TEMPLATES[template], messages, for_generation=True)
        new = []
        with torch.no_grad():
            for _ in range(5):
                window = (ids + new)[-net.config.context_length:]  # a long prompt slides the window
                nxt = int(net(torch.tensor([window]))[0, -1].argmax())
                if nxt == tok.eot_id:
                    break
                new.append(nxt)
        return tok.decode(new).strip()

    assert respond(model, tok, TEMPLATES[template], messages, 5) == by_hand(model)
    # the tuned model may answer with blanks: a random one of its shape writes words
    torch.manual_seed(0)
    other = GPT(model.config).eval()
    reply = respond(other, tok, TEMPLATES[template], messages, 5)
    assert reply and reply == by_hand(other)
    assert not any("lora" in k for k in model.state_dict())


def test_instruct_resume_mid_epoch_equals_uninterrupted(tmp_path, tiny_run):
    """LoRA adapters with dropout: stopped at step 5 (4 steps an epoch: mid-epoch, not an
    evaluation), resumed == trained straight through (weights, losses, responses)."""
    data = tmp_path / "d.json"
    data.write_text(json.dumps(RECORDS))

    def run(name, **kw):
        return InstructConfig(model=str(tiny_run), data=str(data), out=str(tmp_path / name), epochs=3,
                              batch_size=4, lr=3e-3, lora_rank=4, dropout=0.1, max_new_tokens=5,
                              split="0.7,0.1,0.2", progress=False, **kw)

    full = finetune_instruct(run("full"))
    first = finetune_instruct(run("split"), stop_after=5)
    assert first.interrupted and first.metrics["steps"] == 5
    assert (tmp_path / "split" / "train_state.safetensors").is_file()
    with pytest.raises(UserError, match="unfinished run; pass --resume"):
        finetune_instruct(run("split"))
    with pytest.raises(UserError, match=r"different settings: lora_rank \(4 -> 8\)"):
        finetune_instruct(dataclasses.replace(run("split", resume=True), lora_rank=8))
    second = finetune_instruct(run("split", resume=True))
    assert not second.interrupted and second.metrics["steps"] == full.metrics["steps"] == 12
    assert not (tmp_path / "split" / "train_state.safetensors").exists()  # done: state removed

    def curve(result):
        return [h["train_loss"] for h in result.metrics["history"]]

    assert curve(second) == pytest.approx(curve(full), abs=1e-6)
    wf = load_file(str(tmp_path / "full" / "model.safetensors"))
    ws = load_file(str(tmp_path / "split" / "model.safetensors"))
    for k in wf:
        torch.testing.assert_close(ws[k], wf[k], atol=1e-6, rtol=0)
    responses = lambda name: json.loads((tmp_path / name / "responses.json").read_text())  # noqa: E731
    assert responses("split") == responses("full")


# --------------------------------------------------------------------- eval instruct

import http.server  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

from llmscratch.evaluation.lm import exact_match, judge_scores, parse_score, token_f1  # noqa: E402

RESPONSES = [
    {"instruction": "Name a fruit.", "input": "", "output": "An apple.", "response": "an apple"},
    {"instruction": "Translate.", "input": "Hallo", "output": "Hello there", "response": "Hello"},
]


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "llmscratch", *args], capture_output=True, text=True,
                          timeout=120, **kw)


def test_automatic_scores_known_answers():
    assert exact_match("An Apple!", "an apple") == 1.0
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert token_f1("dog", "cat") == 0.0
    assert parse_score("Score: 85/100") == 85 and parse_score("no idea") is None


class _Judge(http.server.BaseHTTPRequestHandler):
    """A tiny OpenAI-compatible chat endpoint: replies with the next canned score."""

    replies: list[str] = []
    requests: list[dict] = []
    status = 200

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, **body})
        if type(self).status != 200:
            self.send_error(type(self).status, "judge down")
            return
        content = type(self).replies[(len(type(self).requests) - 1) % len(type(self).replies)]
        payload = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    _Judge.replies, _Judge.requests, _Judge.status = ["Score: 80", "I'd give it 60."], [], 200
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_judge_scores_against_a_local_openai_server(judge_server):
    result = judge_scores(RESPONSES, judge_server, "llama3", progress=False)
    assert result["scores"] == [80, 60] and result["mean"] == 70
    req = _Judge.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["model"] == "llama3"
    prompt = req["messages"][0]["content"]
    assert "Name a fruit." in prompt and "An apple." in prompt and "an apple" in prompt


def test_cli_eval_instruct_with_judge_and_errors(tmp_path, judge_server):
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(RESPONSES))
    r = cli("eval", "instruct", "--responses", str(path), "--judge-url", judge_server, "--judge-model", "llama3",
            "--scores-out", str(tmp_path / "scores.json"))
    assert r.returncode == 0, r.stderr
    assert "judge score  70.00 / 100" in r.stdout and "exact match  50.00%" in r.stdout
    assert json.loads((tmp_path / "scores.json").read_text())["judge"]["scores"] == [80, 60]
    _Judge.status = 500
    r = cli("eval", "instruct", "--responses", str(path), "--judge-url", judge_server, "--judge-model", "m")
    last = r.stderr.strip().splitlines()[-1]  # above it: the progress bar
    assert r.returncode == 2 and last.startswith("error: ") and "HTTP 500" in last
    r = cli("eval", "instruct", "--responses", str(path), "--judge-url", "http://127.0.0.1:9/v1",
            "--judge-model", "m")
    assert r.returncode == 2 and "cannot reach the judge" in r.stderr
    (tmp_path / "bad.json").write_text('[{"instruction": "a",\n "output": }]')
    r = cli("eval", "instruct", "--responses", str(tmp_path / "bad.json"))
    assert r.returncode == 2 and "bad.json:2: malformed JSON" in r.stderr


def test_cli_eval_instruct_says_how_many_responses_are_empty(tmp_path):
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(RESPONSES + [{**RESPONSES[0], "response": " \n "}]))
    r = cli("eval", "instruct", "--responses", str(path))
    assert r.returncode == 0, r.stderr
    assert "empty        1 of 3 responses hold only whitespace" in r.stdout
    path.write_text(json.dumps(RESPONSES))
    assert "empty" not in cli("eval", "instruct", "--responses", str(path)).stdout


def test_cli_eval_instruct_reference_loss_and_lm_eval_still_work(tmp_path, tiny_run, corpus_file):
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(RESPONSES))
    r = cli("eval", "instruct", "--responses", str(path), "--model", str(tiny_run))
    assert r.returncode == 0, r.stderr
    assert "ref. loss" in r.stdout and "perplexity" in r.stdout
    r = cli("eval", "--model", str(tiny_run), "--data", str(corpus_file), "--max-batches", "1")
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout
    r = cli("eval", "--data", str(corpus_file))
    assert r.returncode == 2 and "--model" in r.stderr
