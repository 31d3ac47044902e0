"""DPO preference tuning: the loss against a plain implementation, log 2 at the start, held-out
preference accuracy and margin going up, exact resume, bad input, and the CLI chain
finetune instruct -> finetune dpo -> eval instruct."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from llmscratch import GPT, GPTConfig, UserError
from llmscratch.checkpoints.run import save_model
from llmscratch.evaluation.lm import load_responses
from llmscratch.finetune.dpo import (
    DPOConfig,
    collate_pairs,
    dpo_loss,
    encode_pair,
    finetune_dpo,
    read_preference_records,
    reference_logps,
)
from llmscratch.decoding.prompts import TEMPLATES
from llmscratch.tokenizer import BPETokenizer

THINGS = ["apple", "river", "garden", "window", "sunset", "teacher", "bridge", "forest", "music", "coffee",
          "letter", "mountain", "kitten", "candle", "library", "ocean", "pencil", "castle", "rain", "bicycle"]


def synthetic_pairs(n: int = 30, seed: int = 0) -> list[dict]:
    """Alpaca-style preference records: the chosen reply is polite, the rejected one rude."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        thing = THINGS[i % len(THINGS)]
        adj = rng.choice(["nice", "good", "lovely"])
        out.append({"instruction": f"Describe the {thing}.", "input": "" if i % 3 else thing,
                    "output": f"The {thing} is {adj}.", "chosen": f"The {thing} is {adj}.",
                    "rejected": f"The {thing} is stupid and awful, get lost."})
    return out


@pytest.fixture(scope="module")
def tiny_instruct(tmp_path_factory):
    """A tiny run folder recorded as instruction-tuned with the alpaca template."""
    out = tmp_path_factory.mktemp("inst")
    corpus = " ".join(r["instruction"] + " " + r["chosen"] + " " + r["rejected"] for r in synthetic_pairs())
    corpus += TEMPLATES["alpaca"].prompt("x", "y")
    tok = BPETokenizer().train(corpus * 3, 320)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, context_length=192, n_embd=32, n_layer=2, n_head=2))
    save_model(model, out, tok, extra={"template": "alpaca"})
    return out


def _batch(tiny_instruct, n=4, ref=None):
    from llmscratch.checkpoints.run import load_model

    model, tok = load_model(str(tiny_instruct))
    recs = read_preference_records_from(synthetic_pairs(n))
    pairs = [encode_pair(tok, TEMPLATES["alpaca"], r) for r in recs]
    examples = [(c, r, float("nan"), float("nan")) for c, r in pairs]
    collate = partial(collate_pairs, pad_id=tok.eot_id)
    if ref is None:
        ref = reference_logps(model, examples, collate)
    examples = [(c, r, rc, rr) for (c, r, _, _), (rc, rr) in zip(examples, ref)]
    return model, pairs, collate(examples)


def read_preference_records_from(records):
    return [{"messages": [{"role": "user", "content": r["instruction"], "input": r["input"]}],
             "chosen": r["chosen"], "rejected": r["rejected"]} for r in records]


def test_loss_is_log2_when_policy_equals_reference(tiny_instruct):
    model, _, batch = _batch(tiny_instruct)
    loss = dpo_loss(model.train(), batch, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)


def plain_dpo_loss(model, pairs, ref, beta):
    """The DPO loss written out: each sequence alone (no padding), response tokens only."""
    def logp(ids, mask):
        x = torch.tensor([ids[:-1]])
        lp = F.log_softmax(model(x)[0].float(), dim=-1)
        return sum(lp[t, ids[t + 1]] for t in range(len(ids) - 1) if mask[t + 1])

    losses = []
    for (chosen, rejected), (rc, rr) in zip(pairs, ref):
        z = beta * ((logp(*chosen) - rc) - (logp(*rejected) - rr))
        losses.append(-torch.log(torch.sigmoid(z)))
    return sum(losses) / len(losses)


def test_gradients_match_a_plain_dpo_implementation(tiny_instruct):
    _, _, (_, _, start) = _batch(tiny_instruct)
    # a reference unlike the policy, so the loss is not log 2 and the gradient not trivial
    ref = [(float(c) + 0.8 * i - 1, float(r) - 0.5 * i) for i, (c, r) in enumerate(zip(*start.chunk(2)))]
    model, pairs, batch = _batch(tiny_instruct, ref=ref)
    model.train()
    ours = dpo_loss(model, batch, beta=0.5)
    ours.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain = plain_dpo_loss(model, pairs, ref, 0.5)
    plain.backward()
    assert ours.item() == pytest.approx(plain.item(), rel=1e-5)
    assert abs(ours.item() - math.log(2)) > 0.1
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def _write(path, records, jsonl=False):
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def test_dpo_raises_heldout_accuracy_and_margin(tmp_path, tiny_instruct):
    data = _write(tmp_path / "pairs.json", synthetic_pairs(30))
    out = tmp_path / "dpo"
    result = finetune_dpo(DPOConfig(model=str(tiny_instruct), data=str(data), out=str(out), epochs=2,
                                    batch_size=4, lr=3e-3, beta=0.5, split="0.6,0.2,0.2", max_new_tokens=4,
                                    progress=False))
    before, after = result.metrics["before"], result.metrics["after"]
    assert before["reward_margin"] == pytest.approx(0, abs=1e-4) and before["val_loss"] == pytest.approx(math.log(2))
    assert after["pref_accuracy"] > 0.8 and after["reward_margin"] > 0.5
    assert after["val_loss"] < math.log(2)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "pref_accuracy" in r]
    assert len(evals) >= 8 and all(k in evals[0] for k in ("reward_margin", "chosen_logp", "rejected_logp"))
    assert before["pref_ties"] == 1.0 and before["pref_accuracy"] == 0.0  # tied, not wrong
    from llmscratch.finetune.dpo import dpo_figure
    fig = dpo_figure([before | {"examples": 0}] + records)
    acc_ax, *rest = fig.axes
    assert any(list(line.get_ydata()) == [0.5, 0.5] for line in acc_ax.get_lines())  # the chance line
    assert len(acc_ax.get_lines()[0].get_xdata()) == len(evals) + 1
    assert all(ax.yaxis.get_major_formatter().get_useOffset() is False for ax in fig.axes)
    for name in ("loss.png", "dpo.png", "metrics.json", "model.safetensors"):
        assert (out / name).is_file(), name
    assert not (out / "train_state.safetensors").exists()
    # the test responses, before and after, as eval instruct reads them
    b, a = load_responses(out / "responses_before.json"), load_responses(out / "responses.json")
    assert len(a) == len(b) == 6 and a[0]["instruction"] == b[0]["instruction"] == "Describe the sunset."
    assert json.loads((out / "config.json").read_text())["task"] == "dpo"


def test_dpo_resume_equals_uninterrupted(tmp_path, tiny_instruct):
    data = _write(tmp_path / "pairs.jsonl", synthetic_pairs(20), jsonl=True)

    def run(name, **kw):
        return DPOConfig(model=str(tiny_instruct), data=str(data), out=str(tmp_path / name), epochs=2,
                         batch_size=4, lr=3e-3, lora_rank=4, split="0.7,0.1,0.2", max_new_tokens=3,
                         progress=False, **kw)

    full = finetune_dpo(run("full"))
    first = finetune_dpo(run("split"), stop_after=3)
    assert first.interrupted and first.metrics["steps"] == 3
    with pytest.raises(UserError, match=r"different settings: beta \(0.1 -> 0.3\)"):
        finetune_dpo(run("split", resume=True, beta=0.3))
    second = finetune_dpo(run("split", resume=True))
    assert second.metrics["steps"] == full.metrics["steps"] == 8
    curve = lambda r: [h["train_loss"] for h in r.metrics["history"]]  # noqa: E731
    assert curve(second) == pytest.approx(curve(full), abs=1e-6)
    wf, ws = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "split" / "model.safetensors"))
    for k in wf:
        torch.testing.assert_close(ws[k], wf[k], atol=1e-6, rtol=0)


def test_reads_alpaca_preference(named_dataset):
    named_dataset("alpaca-preference")
    recs = read_preference_records("alpaca-preference")
    assert len(recs) == 1100 and recs[0]["chosen"] and recs[0]["rejected"]


def test_reads_prompt_chosen_rejected_jsonl(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}], jsonl=True)
    (rec,) = read_preference_records(str(path))
    assert rec["messages"] == [{"role": "user", "content": "Say hi.", "input": ""}]
    assert (rec["chosen"], rec["rejected"], rec["output"]) == ("Hi!", "No.", "Hi!")


def test_bad_preference_input(tmp_path, tiny_instruct):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
                   + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    with pytest.raises(UserError, match=rf"^{bad}:2: no 'rejected' field"):
        read_preference_records(str(bad))
    clf = tmp_path / "clf"
    model = GPT(GPTConfig(vocab_size=320, context_length=16, n_embd=16, n_layer=1, n_head=2))
    save_model(model, clf, extra={"task": "classify"})
    good = _write(tmp_path / "good.json", synthetic_pairs(10))
    with pytest.raises(UserError, match="text classifier .* cannot be tuned with DPO"):
        finetune_dpo(DPOConfig(model=str(clf), data=str(good), out=str(tmp_path / "o"), progress=False))
    assert not (tmp_path / "o").exists()


def cli(*args):
    return subprocess.run([sys.executable, "-m", "llmscratch", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_finetune_instruct_then_dpo_then_eval_instruct(tmp_path, tiny_instruct):
    inst_data = _write(tmp_path / "inst.json", [{"instruction": r["instruction"], "input": r["input"],
                                                 "output": r["chosen"]} for r in synthetic_pairs(20)])
    pairs = _write(tmp_path / "pairs.json", synthetic_pairs(20))
    common = ["--batch-size", "4", "--max-new-tokens", "3", "--split", "0.7,0.1,0.2", "--no-progress"]
    r = cli("finetune", "instruct", "--model", str(tiny_instruct), "--data", str(inst_data),
            "--out", str(tmp_path / "inst"), "--epochs", "1", "--lr", "1e-3", *common)
    assert r.returncode == 0, r.stderr
    r = cli("finetune", "dpo", "--model", str(tmp_path / "inst"), "--data", str(pairs), "--out",
            str(tmp_path / "dpo"), "--lr", "1e-3", "--beta", "0.5", *common)
    assert r.returncode == 0, r.stderr
    assert "held-out preference accuracy" in r.stdout and "eval instruct" in r.stdout
    assert "before held-out preference accuracy 0.00% (every pair tied: no preference yet, chance is 50%)" in r.stdout
    r = cli("eval", "instruct", "--responses", str(tmp_path / "dpo" / "responses.json"))
    assert r.returncode == 0 and "exact match" in r.stdout, r.stderr
    r = cli("finetune", "dpo", "--model", str(tmp_path / "inst"), "--data", str(tmp_path / "nope.json"),
            "--out", str(tmp_path / "dpo2"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nope.json" in r.stderr
