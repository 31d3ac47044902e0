"""The lm-evaluation-harness adapter, offline: a task YAML pointing at a local JSONL file gives
the same acc/acc_norm through lm_eval as through our own harness; the three request types;
and lm_eval's command line with `--model llmscratch`. lm-eval is in the `test` extra, so CI
runs this file; without it (a plain install) the file skips and says how to get it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason='lm-eval not installed (pip install -e ".[eval]"; it is in the test extra)')

from llmscratch import GPT, GPTConfig  # noqa: E402
from llmscratch.checkpoints.run import load_model, save_model  # noqa: E402
from llmscratch.evaluation.lm_eval_adapter import LLMScratchLM  # noqa: E402
from llmscratch.evaluation.tasks import encode_request, evaluate_task, loglikelihoods, read_task_file  # noqa: E402
from llmscratch.tokenizer import BPETokenizer  # noqa: E402

WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "candle", "forest", "window", "garden"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    rows = [{"context": f"The {w} is", "choices": ["red", "very big", "a thing", WORDS[(i + 1) % 10]],
             "gold": i % 4} for i, w in enumerate(WORDS * 2)]
    data = root / "local.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "local.yaml").write_text(f"""task: llmscratch_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    tok = BPETokenizer().train(" ".join(f"The {w} is red very big a thing" for w in WORDS) * 5, 300)
    torch.manual_seed(0)
    run = root / "run"
    save_model(GPT(GPTConfig(vocab_size=tok.vocab_size, context_length=32, n_embd=32, n_layer=2, n_head=2)), run, tok)
    return {"data": data, "tasks": tasks, "run": run}


@pytest.fixture(autouse=True)
def _offline_hf(monkeypatch, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "hf-cache"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))


def test_lm_eval_accuracy_equals_our_harness(setup):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model, tok = load_model(str(setup["run"]))
    ours = evaluate_task(model, tok, read_task_file(setup["data"]), shots=0)
    out = simple_evaluate(model=LLMScratchLM(model=model, tokenizer=tok, batch_size=4), tasks=["llmscratch_local"],
                          num_fewshot=0, task_manager=TaskManager(include_path=str(setup["tasks"])))
    theirs = out["results"]["llmscratch_local"]
    assert theirs["acc,none"] == pytest.approx(ours["acc"])
    assert theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    assert 0 < ours["acc"] < 1 or 0 < ours["acc_norm"] < 1  # not a degenerate all/nothing task


class Req:
    def __init__(self, *args):
        self.args = args


def test_rolling_and_generate(setup):
    model, tok = load_model(str(setup["run"]))
    lm = LLMScratchLM(model=model, tokenizer=tok)
    short = "The apple is red"
    (rolled,) = lm.loglikelihood_rolling([Req(short)])
    assert rolled == pytest.approx(loglikelihoods(model, [encode_request(tok, "", short)])[0][0], abs=1e-4)
    # a text over the 32-token window: every token scored exactly once, with up to 32 tokens of context
    long = " ".join(f"The {w} is red" for w in WORDS * 3)
    ids = [tok.eot_id] + tok.encode(long, allowed_special="none")
    assert len(ids) > 64
    plain = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            start = (t - 1) // 32 * 32 + 1  # the window the token falls in
            ctx = ids[max(0, min(start + 32, len(ids)) - 33):t]
            plain += torch.log_softmax(model(torch.tensor([ctx])), -1)[0, -1, ids[t]].item()
    assert lm.loglikelihood_rolling([Req(long)])[0] == pytest.approx(plain, abs=1e-3)
    (gen,) = lm.generate_until([Req("The apple", {"until": ["is"], "max_gen_toks": 5})])
    # by hand: five argmax steps of full forward passes (ending at <|endoftext|>), cut at "is"
    ids, new = tok.encode("The apple", allowed_special="none"), []
    with torch.no_grad():
        for _ in range(5):
            nxt = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            if nxt == tok.eot_id:
                break
            new.append(nxt)
    assert gen == tok.decode(new).split("is")[0]


@pytest.mark.slow
def test_lm_eval_command_line(setup, tmp_path):
    # `llmscratch-lm-eval` is lm_eval's command line with `--model llmscratch` registered
    # (pyproject's console script; `python -m llmscratch.evaluation.lm_eval_adapter` is the same)
    script = Path(sys.executable).parent / "llmscratch-lm-eval"
    assert script.is_file(), "the package's console script llmscratch-lm-eval is not installed"
    r = subprocess.run([str(script), "--model", "llmscratch",
                        "--model_args", f"path={setup['run']},kernels=false", "--tasks", "llmscratch_local",
                        "--include_path", str(setup["tasks"]), "--limit", "8", "--output_path", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "llmscratch_local" in r.stdout and "acc_norm" in r.stdout
    # the scores it wrote are our harness's on the same 8 examples
    (written,) = tmp_path.rglob("results*.json")
    theirs = json.loads(written.read_text())["results"]["llmscratch_local"]
    model, tok = load_model(str(setup["run"]))
    ours = evaluate_task(model, tok, read_task_file(setup["data"]), shots=0, limit=8)
    assert theirs["acc,none"] == pytest.approx(ours["acc"]) and theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"])
