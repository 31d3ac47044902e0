"""Evaluation tasks: acc/acc_norm on a hand-checkable task, batched scoring equal to one
request at a time, seeded few-shot selection that never shows the query, the public layouts,
bad task files, and `llmscratch eval tasks` end to end."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from llmscratch import GPT, GPTConfig, UserError
from llmscratch.checkpoints.run import save_model
from llmscratch.evaluation.tasks import (
    BUILTIN_TASKS,
    Example,
    Task,
    build_context,
    encode_request,
    evaluate_task,
    fewshot_indices,
    load_task,
    loglikelihoods,
    read_task_file,
    score_choices,
)


class ByteTok:
    """Bytes as tokens, 256 = <|endoftext|>: every count below is a count of characters."""

    eot_id = 256
    vocab_size = 257

    def encode(self, text, allowed_special="none"):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


class Unigram(nn.Module):
    """Ignores the context: log p(byte) is a fixed table, so scores can be checked by hand."""

    def __init__(self, logp: dict[str, float]):
        super().__init__()
        rest = 1 - sum(math.exp(v) for v in logp.values())
        table = torch.full((257,), math.log(rest / (257 - len(logp))))
        for ch, v in logp.items():
            table[ord(ch)] = v
        self.table = nn.Parameter(table)
        self.config = SimpleNamespace(context_length=64)

    def forward(self, x):
        return self.table.expand(*x.shape, 257)


def test_acc_and_acc_norm_by_hand():
    # log p(" ") = log p("a") = log 0.3: " a" scores 2 log 0.3, " aaaa" 5 log 0.3. The sum
    # prefers the short choice; per character (1 vs 4 characters; lm-eval's acc_norm
    # divides by len(choice)) the long one: 2 log .3 / 1 < 5 log .3 / 4.
    model = Unigram({" ": math.log(0.3), "a": math.log(0.3), "b": math.log(0.1)})
    exs = [Example("x", ["a", "aaaa"], 1), Example("x", ["a", "aaaa"], 0),
           Example("x", ["b", "a"], 1), Example("x", ["aaaa", "a"], 0)]
    r = evaluate_task(model, ByteTok(), Task("hand", "choice", exs))
    # example: acc (sum) / acc_norm (per char): 0/1, 1/0, 1/1, 0/1
    gold = r.pop("gold_logprob")
    assert r == {"task": "hand", "kind": "choice", "shots": 0, "n": 4, "acc": 0.5, "acc_norm": 0.75,
                 "predictions": [0, 0, 1, 1]}
    assert gold == pytest.approx(3.5 * math.log(0.3))
    # a model that ignores its context: 2 shots change no prediction, and the note says so
    from llmscratch.cli.tasks import shots_notes

    task = Task("hand", "choice", exs * 2)
    rows = [evaluate_task(model, ByteTok(), task, shots=k) for k in (0, 2)]
    notes = shots_notes(rows)
    assert len(notes) == 1 and "hand: 2 shots change no prediction of the 0-shot run" in notes[0]
    assert f"moved {rows[0]['gold_logprob']:.3f} -> {rows[1]['gold_logprob']:.3f} nats" in notes[0]
    rows[1]["predictions"][0] = 1
    assert shots_notes(rows) == []
    lp = loglikelihoods(model, [encode_request(ByteTok(), "x", " aaaa")])[0][0]
    assert lp == pytest.approx(5 * math.log(0.3), rel=1e-6)


def test_encode_request_moves_trailing_space_and_empty_context():
    tok = ByteTok()
    assert encode_request(tok, "Q: 1 ", "2") == (list(b"Q: 1"), list(b" 2"))
    assert encode_request(tok, "", "hi") == ([256], list(b"hi"))


def test_batched_scoring_equals_one_at_a_time():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, context_length=48, n_embd=32, n_layer=2, n_head=2)).eval()
    tok = ByteTok()
    reqs = [encode_request(tok, "The cat sat on the", c) for c in (" mat", " chair by the door", " a")]
    reqs.append(encode_request(tok, "x" * 70, " overflow"))  # longer than the window: left-truncated
    batched = loglikelihoods(model, reqs, batch_size=8)
    alone = [loglikelihoods(model, [r], batch_size=1)[0] for r in reqs]
    for (a, ga), (b, gb) in zip(batched, alone):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    # and equal to the plain computation for the first request
    ctx, cont = reqs[0]
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(model(ids[:, :-1]), -1)[0]
    plain = sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
    assert batched[0][0] == pytest.approx(plain, abs=1e-4)
    # the context once through a KV cache, then every choice as one batch: the same numbers
    ctx = reqs[0][0]
    conts = [cont for _, cont in reqs[:3]] + [list(b" z"), [113]]  # 113: a one-token choice
    cached = score_choices(model, ctx, conts)
    for (a, ga), (b, gb) in zip(cached, loglikelihoods(model, [(ctx, c) for c in conts], batch_size=1)):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_fewshot_selection_is_seeded_and_never_the_query():
    for i in range(10):
        shots = fewshot_indices(10, i, 5, seed=3)
        assert i not in shots and len(set(shots)) == 5
        assert shots == fewshot_indices(10, i, 5, seed=3)
    assert any(fewshot_indices(10, i, 5, 3) != fewshot_indices(10, i, 5, 4) for i in range(10))
    task = Task("t", "choice", [Example(f"q{i}", [f"a{i}", "z"], 0) for i in range(6)])
    ctx = build_context(task, 2, 3, seed=1)
    assert ctx.endswith("q2") and ctx.count("\n\n") == 3 and "q2 a2" not in ctx
    assert [f"q{j} a{j}" in ctx for j in fewshot_indices(6, 2, 3, 1)] == [True] * 3


def test_more_shots_than_examples(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"context": f"q{i}", "choices": ["a", "b"], "gold": 0}) + "\n"
                            for i in range(3)))
    with pytest.raises(UserError, match=rf"^{path}: --shots 3 needs at least 4 examples"):
        evaluate_task(Unigram({}), ByteTok(), read_task_file(path), shots=3)


@pytest.mark.parametrize("line, message", [
    ({"context": "q", "choices": ["a", "b"], "gold": 2}, "gold index 2 out of range for 2 choice"),
    ({"context": "q", "choices": [], "gold": 0}, "empty choices"),
    ({"context": "q", "choices": ["a"]}, "no 'gold' field"),
    ({"question": {"stem": "q", "choices": [{"text": "a", "label": "A"}]}, "answerKey": "C"},
     "answerKey 'C' is not one of the choice labels"),
    ({"foo": 1}, "unknown task layout"),
])
def test_bad_task_files_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = {"context": "q", "choices": ["a", "b"], "gold": 0} if "context" in line else line
    path.write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(UserError, match=f"^{path}:[12]: {message}"):
        read_task_file(path)


def test_public_layouts(tmp_path):
    hs = tmp_path / "hellaswag.jsonl"
    hs.write_text(json.dumps({"activity_label": "Baking", "ctx_a": "She mixes the flour.", "ctx_b": "then she",
                              "endings": ["bakes [title] it.", "sings.", "flies.", "runs."], "label": "0"}) + "\n")
    t = read_task_file(hs)
    assert t.kind == "choice" and t.examples[0].context == "Baking: She mixes the flour. Then she"
    assert t.examples[0].choices[0] == "bakes. it." and t.examples[0].gold == 0
    arc = tmp_path / "arc.jsonl"
    arc.write_text(json.dumps({"question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["A", "B"]},
                               "answerKey": "B"}) + "\n")
    (ex,) = read_task_file(arc).examples
    assert (ex.context, ex.choices, ex.gold) == ("Question: Which is a gas?\nAnswer:", ["ice", "steam"], 1)
    lam = tmp_path / "lambada.jsonl"
    lam.write_text(json.dumps({"text": "he opened the door and saw his dog"}) + "\n")
    t = read_task_file(lam)
    assert t.kind == "greedy" and t.examples[0].context.endswith("his") and t.examples[0].choices == ["dog"]
    # " " is the likeliest byte everywhere, so "dog" is not the greedy continuation of " "
    r = evaluate_task(Unigram({" ": math.log(0.3), "d": math.log(0.2), "o": math.log(0.2), "g": math.log(0.2)}),
                      ByteTok(), t)
    assert r["acc"] == 0.0 and r["ppl"] == pytest.approx(math.exp(-(math.log(0.3) + 3 * math.log(0.2)) / 4))
    assert evaluate_task(Unigram({" ": math.log(0.5)}), ByteTok(),
                         Task("sp", "greedy", [Example("a", ["  "], 0)]))["acc"] == 1.0
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"prompt": "1 + 1 =", "answer": "2"}) + "\n")
    assert read_task_file(gen).kind == "generate"


def test_builtin_tasks_are_deterministic_and_well_formed():
    for name in BUILTIN_TASKS:
        a, b = load_task(name), load_task(name)
        assert [e.context for e in a.examples] == [e.context for e in b.examples]
        assert len(a.examples) >= 100
        for e in a.examples:
            assert (e.answer if a.kind == "generate" else 0 <= e.gold < len(e.choices))
    cloze = load_task("python-docs-cloze").examples[0]
    assert len(cloze.choices) == 4 and len(set(cloze.choices)) == 4


def test_copy_task_only_the_context_tells_the_answer():
    from collections import Counter

    task = load_task("copy")
    for e in task.examples:
        assert len(set(e.choices)) == 4 and all(c.endswith('"') for c in e.choices)
        named = [c for c in e.choices if f'a = "{c}' in e.context]
        assert named == [e.choices[e.gold]]  # the gold name is the one in the prompt, the others are not
    # the gold position is spread out, so a model blind to the prompt scores about chance (25%)
    assert max(Counter(e.gold for e in task.examples).values()) < 0.35 * len(task.examples)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from llmscratch.tokenizer import BPETokenizer

    out = tmp_path_factory.mktemp("run")
    tok = BPETokenizer().train("Sequence: red blue green Next: 1 + 2 = 3\n" * 20, 300)
    torch.manual_seed(0)
    save_model(GPT(GPTConfig(vocab_size=tok.vocab_size, context_length=128, n_embd=32, n_layer=2, n_head=2)),
               out, tok)
    return out


def test_cli_eval_tasks(tmp_path, tiny_run, capsys):
    from llmscratch.cli.main import main

    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"context": f"{i} + 1 =", "choices": [str(i + 1), str(i + 2)], "gold": 0}) + "\n"
                            for i in range(6)))
    scores = tmp_path / "scores.json"
    code = main(["eval", "tasks", "--model", str(tiny_run), "--tasks", str(data), "arithmetic", "--shots", "0", "2",
                 "--limit", "4", "--no-kernels", "--scores-out", str(scores)])
    out = capsys.readouterr().out
    assert code == 0 and "mine" in out and "exact_match" in out
    results = json.loads(scores.read_text())["results"]
    assert [(r["task"], r["shots"], r["n"]) for r in results] == [("mine", 0, 4), ("mine", 2, 4),
                                                                  ("arithmetic", 0, 4), ("arithmetic", 2, 4)]
    assert main(["eval", "tasks", "--model", str(tiny_run), "--tasks", str(data), "--shots", "9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mine.jsonl: --shots 9 needs at least 10 examples" in err
    assert main(["eval", "--model", str(tiny_run), "--tasks", "pattern"]) == 2  # eval lm still wants --data


def test_exact_match_by_hand(tmp_path, tiny_run):
    """exact_match against a hand computation: each prompt's greedy continuation worked out
    with full forward passes (cut at the first newline); the answers of examples 0 and 2 are
    that text with spaces around it (a hit: both sides are stripped), those of 1 and 3 are
    it plus "x" (a miss): exact_match is 2/4."""
    from llmscratch.checkpoints.run import load_model
    from llmscratch.evaluation.tasks import evaluate_task, read_task_file

    model, tok = load_model(str(tiny_run))
    prompts = ["1 + 2 =", "Sequence: red", "Next: 1 +", "blue green"]
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps({"prompt": p, "answer": "-"}) + "\n" for p in prompts))
    task = read_task_file(probe)
    hand = []
    with torch.no_grad():
        for p in prompts:
            ids, new = tok.encode(p, allowed_special="none"), []
            for _ in range(task.max_new_tokens):
                nxt = int(model(torch.tensor([ids + new]))[0, -1].argmax())
                if nxt == tok.eot_id:
                    break
                new.append(nxt)
            hand.append(tok.decode(new).split(task.stop)[0])
    data = tmp_path / "gen.jsonl"
    answers = [f"  {h} " if i % 2 == 0 else h + "x" for i, h in enumerate(hand)]
    data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(prompts, answers)))
    result = evaluate_task(model, tok, read_task_file(data), shots=0)
    assert result["kind"] == "generate" and result["n"] == 4
    assert result["exact_match"] == 0.5
