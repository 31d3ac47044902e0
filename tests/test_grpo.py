"""GRPO (finetune grpo): the loss and its gradients against a plain written-out version, group
advantages, the rewards and tasks, a reward the model can learn rising within a few steps,
exact resume (inside a rollout too), DDP matching one process, and bad input as one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import sigterm_after_steps
from safetensors.torch import load_file

from llmscratch import GPT, GPTConfig, UserError
from llmscratch.checkpoints.run import save_model
from llmscratch.finetune.grpo import (
    IGNORE_INDEX,
    GRPOBatch,
    group_advantages,
    grpo_loss,
    row_seed,
    sequences,
    token_logps,
)
from llmscratch.finetune.grpo_run import GRPOConfig, finetune_grpo
from llmscratch.finetune.rewards import Reward, addition_task, extract_number, load_reward_task, normalise
from llmscratch.tokenizer import BPETokenizer


def _char_tokenizer():
    return BPETokenizer().train("0123456789+=\n", 257)  # bytes only: one token a character


@pytest.fixture(scope="module")
def digit_model(tmp_path_factory):
    return make_digit_model(tmp_path_factory.mktemp("grpo") / "base")


def make_digit_model(out):
    """A tiny char-level GPT trained for a few seconds on "a+b=c" lines: it answers with
    digits (mostly wrong ones), so a reward on its first digit has something to work with."""
    torch.manual_seed(0)
    tok = _char_tokenizer()
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, context_length=32, n_embd=32, n_layer=2, n_head=2))
    text = "".join(e.prompt + e.answer + "\n" for e in addition_task(400, seed=5, digits=2))
    ids = torch.tensor(tok.encode(text))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        starts = torch.randint(0, len(ids) - 33, (16,), generator=gen)
        x = torch.stack([ids[s:s + 32] for s in starts])
        y = torch.stack([ids[s + 1:s + 33] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model(model, out, tok)
    return out


def _cfg(base_model, out, **kw) -> GRPOConfig:
    base = dict(model=str(base_model), task="addition:2", out=str(out), steps=4, batch_size=4, group_size=4,
                max_new_tokens=3, lr=3e-3, eval_every=2, task_size=60, val_size=12, progress=False, kernels=False)
    return GRPOConfig(**{**base, **kw})


# ------------------------------------------------------------------------------ the loss


def _plain_loss(model, prompts, replies, old, ref, adv, clip_low, clip_high, kl_coef):
    """GRPO's loss written out one reply and one token at a time, from a full forward pass
    of each sequence alone."""
    total, count = 0.0, 0
    for p, r, o, rf, a in zip(prompts, replies, old, ref, adv):
        seq = torch.tensor([p + r])
        logp_all = torch.log_softmax(model(seq[:, :-1])[0].float(), dim=-1)
        for j, tok in enumerate(r):
            lp = logp_all[len(p) - 1 + j, tok]
            ratio = torch.exp(lp - o[j])
            obj = torch.min(ratio * a, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * a)
            d = rf[j] - lp
            total = total - obj + kl_coef * (torch.exp(d) - d - 1)
            count += 1
    return total / count


@pytest.mark.parametrize("kl_coef", [0.0, 0.3])
def test_loss_and_gradients_equal_a_plain_implementation(kl_coef):
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=20, context_length=16, n_embd=16, n_layer=1, n_head=2))
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    replies = [[11, 12], [13, 14, 15], [16], [17, 18, 19, 1]]
    inputs, targets = sequences(prompts, replies)
    with torch.no_grad():
        cur = token_logps(model, inputs, targets)
    # old log-probabilities moved so that some ratios leave the clip range both ways
    shift = (torch.rand(targets.shape, generator=torch.Generator().manual_seed(3)) - 0.5) * 1.6
    old = (cur + shift).masked_fill(targets == IGNORE_INDEX, 0.0)
    ref = (cur - 0.3 * shift).masked_fill(targets == IGNORE_INDEX, 0.0)
    adv = torch.tensor([1.0, -0.7, 0.4, -1.2])
    ratio, live = torch.exp(cur - old), targets != IGNORE_INDEX
    assert bool((live & (adv[:, None] > 0) & (ratio > 1.28)).any())  # the upper clip is exercised
    assert bool((live & (adv[:, None] < 0) & (ratio < 0.8)).any())  # and the lower one
    per_row = lambda t: [t[i][targets[i] != IGNORE_INDEX].tolist() for i in range(4)]  # noqa: E731

    n_tokens = int((targets != IGNORE_INDEX).sum())
    batch = GRPOBatch(inputs, targets, old, adv, float(n_tokens), ref)
    ours = grpo_loss(model, batch, clip_low=0.2, clip_high=0.28, kl_coef=kl_coef)
    ours.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    plain = _plain_loss(model, prompts, replies, per_row(old), per_row(ref), adv.tolist(), 0.2, 0.28, kl_coef)
    plain.backward()
    assert torch.allclose(ours, plain, atol=1e-6), (ours, plain)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)
    assert batch.stats["tokens"] == n_tokens
    assert 0 < batch.stats["clipped"] < n_tokens  # the shifts put some tokens in the clipped branch
    assert (batch.stats["kl"] > 0) == (kl_coef > 0)


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    a = group_advantages(rewards, 4)
    std = math.sqrt(3 / 16)  # 1 of 4 right: mean 0.25, population std sqrt(0.25 * 0.75)
    assert torch.allclose(a[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-4))
    assert torch.all(a[4:] == 0)  # a group that all agrees teaches nothing
    plain = group_advantages(rewards, 4, std_normalise=False)
    assert torch.allclose(plain[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))


# ------------------------------------------------------------------------------ rewards and tasks


def test_rewards_and_tasks(tmp_path):
    ex = addition_task(50, seed=3, digits=3)
    assert len({e.prompt for e in ex}) == 50 and ex == addition_task(50, seed=3, digits=3)
    for e in ex:
        a, b = e.prompt.rstrip("=").split("+")
        assert int(e.answer) == int(a) + int(b)
    assert normalise("  The Answer:  42. ") == "the answer: 42"
    assert extract_number("so 3 and then 1,234.") == 1234.0 and extract_number("none") is None
    assert Reward("exact")("p", " 357.", "357") == 1.0 and Reward("exact")("p", "358", "357") == 0.0
    assert Reward("number")("p", "it is 357", "357") == 1.0 and Reward("number")("p", "357 or 3", "357") == 0.0
    assert Reward("regex:^7")("p", "71", "x") == 1.0 and Reward("regex:^7")("p", "17", "x") == 0.0
    assert Reward(r"regex:=(?P<answer>\d+)")("p", "x=12", "12") == 1.0
    assert Reward(r"regex:=(?P<answer>\d+)")("p", "x=13", "12") == 0.0
    assert Reward("exact", r"\d+", 0.5)("p", "12", "13") == 0.5
    f = tmp_path / "task.jsonl"
    f.write_text('{"prompt": "2+2=", "answer": "4"}\n{"prompt": "1+1=", "answer": 2}\n')
    assert [(e.prompt, e.answer) for e in load_reward_task(str(f), 10)] == [("2+2=", "4"), ("1+1=", "2")]


def test_user_reward_function_errors_are_one_line(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text("def good(prompt, reply, answer):\n    return float(reply == answer)\n"
                 "def boom(prompt, reply, answer):\n    raise ValueError('bad reply')\n"
                 "def text(prompt, reply, answer):\n    return 'yes'\n"
                 "def nan(prompt, reply, answer):\n    return float('nan')\n")
    assert Reward(f"{f}:good")("p", "4", "4") == 1.0
    for fn, what in (("boom", "raised ValueError: bad reply"), ("text", "returned 'yes'"), ("nan", "returned nan")):
        with pytest.raises(UserError) as e:
            Reward(f"{f}:{fn}")("2+2=", "4", "4", "task.jsonl:3")
        msg = str(e.value)
        assert "\n" not in msg and f"reward function {f}:{fn}" in msg and what in msg and "task.jsonl:3" in msg
    with pytest.raises(UserError, match="no such file"):
        Reward(f"{tmp_path / 'missing.py'}:good")
    with pytest.raises(UserError, match="has no function 'nope'"):
        Reward(f"{f}:nope")


# ------------------------------------------------------------------------------ training


def test_a_learnable_reward_rises(digit_model, tmp_path):
    """Reward 1 for a reply that starts with a 7: about one reply in ten at the start."""
    r = finetune_grpo(_cfg(digit_model, tmp_path / "seven", reward="regex:^7", steps=8, batch_size=4,
                           group_size=8, eval_every=8, lr=1e-2))
    rewards = [rec["reward"] for rec in r.metrics["history"]]
    assert len(rewards) == 8
    first, last = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert last > first + 0.3, rewards
    assert r.metrics["after"]["val_reward"] > r.metrics["before"]["val_reward"]
    hist = r.metrics["history"]
    assert all(0 <= rec["clip_fraction"] <= 1 and rec["kl"] == 0 and rec["response_length"] > 0 for rec in hist)
    out = tmp_path / "seven"
    for name in ("model.safetensors", "config.json", "metrics.json", "metrics.jsonl", "grpo.png", "loss.png",
                 "heldout.json"):
        assert (out / name).is_file(), name
    assert not (out / "train_state.safetensors").exists() and not list(out.glob("rollout.*"))
    assert json.loads((out / "config.json").read_text())["task"] == "grpo"


@pytest.mark.parametrize("ppo_epochs,stop", [(1, 2), (2, 3)])
def test_resume_equals_the_uninterrupted_run(digit_model, tmp_path, ppo_epochs, stop):
    """Stopped after `stop` steps and resumed: the same weights and records as a run that was
    never stopped. With ppo_epochs 2, step 3 is inside rollout 1, read back from its file."""
    # a reward some replies of most groups earn: nonzero advantages, so the policy term (and
    # with it the stored old log-probabilities) shapes every step
    kw = dict(steps=4, ppo_epochs=ppo_epochs, kl_coef=0.1, grad_accum=2, reward="regex:^1")
    full = finetune_grpo(_cfg(digit_model, tmp_path / "full", **kw))
    part = finetune_grpo(_cfg(digit_model, tmp_path / "part", **kw), stop_after=stop)
    assert part.interrupted and (tmp_path / "part" / "train_state.safetensors").is_file()
    if ppo_epochs > 1:
        assert list((tmp_path / "part").glob("rollout.rank0.1.safetensors"))
    done = finetune_grpo(_cfg(digit_model, tmp_path / "part", resume=True, **kw))
    assert not done.interrupted and done.metrics["steps"] == 4
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "part" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keys = ("reward", "train_loss", "kl", "clip_fraction", "response_length")
    pick = lambda rs: [{k: r[k] for k in keys} for r in rs]  # noqa: E731
    lines = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert pick(lines) == pick(full.metrics["history"])
    assert done.metrics["after"] == full.metrics["after"]
    assert any(r["reward"] > 0 for r in full.metrics["history"])


def test_row_seeds_are_distinct_across_groups_and_rollouts():
    seeds = {row_seed(7, k, pos, j, 8) for k in range(3) for pos in range(4) for j in range(8)}
    assert len(seeds) == 3 * 4 * 8


# ------------------------------------------------------------------------------ bad input


def test_bad_input_is_one_line(digit_model, tmp_path):
    from llmscratch.finetune.classify import save_classifier

    no_answers = tmp_path / "q.jsonl"
    no_answers.write_text('{"prompt": "2+2="}\n')
    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text("".join(json.dumps({"prompt": "1+" * 20 + "1=", "answer": "21"}) + "\n" for _ in range(30)))
    torch.manual_seed(0)
    tok = _char_tokenizer()
    clf = GPT(GPTConfig(vocab_size=tok.vocab_size, context_length=32, n_embd=16, n_layer=1, n_head=2))
    from llmscratch.finetune.classify import add_classification_head

    save_classifier(add_classification_head(clf, 2), tmp_path / "clf", tok, ["a", "b"], 32)
    from llmscratch.models.bert import Bert, BertConfig

    save_model(Bert(BertConfig(vocab_size=tok.vocab_size, context_length=32, n_embd=16, n_layer=1, n_head=2)),
               tmp_path / "enc", tok)
    cases = [
        (dict(task=str(no_answers)), "no 'answer' field"),
        (dict(group_size=1), "--group-size must be at least 2"),
        (dict(task=str(long_prompt), val_size=5), "does not fit the model's context of 32 tokens"),
        (dict(model=str(tmp_path / "clf")), "a text classifier"),
        (dict(model=str(tmp_path / "enc")), "finetune grpo needs a decoder"),
        (dict(reward=str(tmp_path / "nope.py") + ":fn"), "no such file"),
        (dict(task="nothing-like-this"), "not a built-in task"),
        (dict(temperature=0.0), "--temperature must be > 0"),
    ]
    for kw, message in cases:
        out = tmp_path / f"out{len(message)}"
        with pytest.raises(UserError) as e:
            finetune_grpo(_cfg(digit_model, out, **kw))
        assert message in str(e.value) and "\n" not in str(e.value), (kw, str(e.value))
        assert not (out / "config.json").exists()


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "llmscratch", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_cli_trains_and_refuses_bad_input(digit_model, tmp_path):
    out = tmp_path / "cli"
    r = _cli("finetune", "grpo", "--model", str(digit_model), "--task", "addition:2", "--out", str(out),
             "--steps", "2", "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "3", "--task-size", "20",
             "--val-size", "4", "--no-progress", "--no-kernels")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "held-out accuracy" in r.stdout and (out / "grpo.png").is_file()
    bad = _cli("finetune", "grpo", "--model", str(digit_model), "--task", "addition:2", "--out", str(tmp_path / "b"),
               "--group-size", "1")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--group-size" in bad.stderr


def test_sigterm_checkpoints_and_resume_finishes(digit_model, tmp_path):
    """SIGTERM mid-run: the step finishes, a checkpoint is written (exit 130), and --resume
    finishes the run."""
    out = tmp_path / "term"
    args = ["finetune", "grpo", "--model", str(digit_model), "--task", "addition:2", "--out", str(out),
            "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "3", "--task-size", "20", "--val-size", "4",
            "--eval-every", "1000", "--ppo-epochs", "2", "--no-progress", "--no-kernels"]
    code, err = sigterm_after_steps([*args, "--steps", "1000"], out / "metrics.jsonl", steps=3)
    assert code == 130, err[-2000:]
    assert (out / "train_state.safetensors").is_file() and (out / "model.safetensors").is_file()
    stopped = len((out / "metrics.jsonl").read_text().splitlines())
    done = _cli(*args, "--steps", str(stopped + 1), "--resume")  # a resume may lengthen or shorten the run
    assert done.returncode == 0, done.stderr[-2000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == stopped + 1
    assert not (out / "train_state.safetensors").exists() and not list(out.glob("rollout.*"))


@pytest.mark.slow
def test_ddp_matches_one_process(digit_model, tmp_path):
    """Two gloo processes, each sampling its half of the prompts: the weights of one process."""
    args = ["finetune", "grpo", "--model", str(digit_model), "--task", "addition:2", "--steps", "3",
            "--batch-size", "4", "--group-size", "4", "--max-new-tokens", "3", "--task-size", "40", "--val-size", "8",
            "--lr", "3e-3", "--no-progress", "--no-kernels", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = _cli(*args, "--out", str(tmp_path / "one"), env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "llmscratch", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    rew = lambda p: [json.loads(x)["reward"] for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert rew(tmp_path / "one") == pytest.approx(rew(tmp_path / "two"))
