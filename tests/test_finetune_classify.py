"""Classification fine-tuning: data reading, balancing, splits, the last-token head,
end-to-end training to a loadable classifier, and one-line errors on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from llmscratch import GPT, GPTConfig, UserError
from llmscratch.checkpoints.run import save_model
from llmscratch.finetune.classify import (
    ClassifyConfig,
    add_classification_head,
    balance_classes,
    classifier_logits,
    classification_metrics,
    classify_texts,
    collate_classification,
    encode_texts,
    finetune_classify,
    load_classifier,
    set_trainable,
    stratified_split,
)
from llmscratch.finetune.data import read_labeled
from llmscratch.tokenizer import BPETokenizer
from conftest import sigterm_after_steps

SPAM = ["WIN a free prize now call", "free cash claim your prize", "urgent you won a free trip",
        "claim free ringtones now", "cash prize waiting call now", "you won free cash text WIN"]
HAM = ["see you at lunch today", "are we meeting later", "ok i will call you tonight",
       "thanks for dinner mum", "running late see you soon", "what time is the game"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny run folder (2 layers, 32 wide) with a 300-token BPE: trains in seconds."""
    out = tmp_path_factory.mktemp("run")
    tok = BPETokenizer().train(" ".join(SPAM + HAM) * 5, 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, context_length=32, n_embd=32, n_layer=2, n_head=2))
    save_model(model, out, tok)
    return out


def write_tsv(path, rows, header=("label", "text")):
    lines = (["\t".join(header)] if header else []) + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def toy_rows(n_per_class=10):
    rows = []
    for i in range(n_per_class):
        rows.append(("spam", SPAM[i % len(SPAM)]))
        rows.append(("ham", HAM[i % len(HAM)]))
    return rows


# ----------------------------------------------------------------------------- data


def test_sms_spam_is_read_without_quote_handling(named_dataset):
    named_dataset("sms-spam")  # the real file (or a skip saying why it can't be had)
    rows = read_labeled("sms-spam")
    labels = [r[1] for r in rows]
    assert len(rows) == 5574
    assert labels.count("ham") == 4827 and labels.count("spam") == 747
    # 54 messages begin with a quote; CSV quoting would have eaten them
    assert sum(t.startswith('"') for t, _, _ in rows) == 54
    # balanced and split, seeded and proportional (one test: one skip without the file)
    bal = balance_classes(rows, seed=123)
    assert [r[1] for r in bal].count("ham") == [r[1] for r in bal].count("spam") == 747
    train, val, test = stratified_split(bal, (0.7, 0.1, 0.2), seed=123)
    assert (len(train), len(val), len(test)) == (1046, 150, 298)
    for part in (train, val, test):
        labels = [r[1] for r in part]
        assert labels.count("ham") == labels.count("spam")
    again = stratified_split(bal, (0.7, 0.1, 0.2), seed=123)
    assert [r[0] for r in again[2]] == [r[0] for r in test]
    other = stratified_split(bal, (0.7, 0.1, 0.2), seed=1)
    assert [r[0] for r in other[2]] != [r[0] for r in test]


def test_balance_and_split_of_the_synthetic_set(sms_tsv):
    """The same properties on the seeded synthetic set (120 ham, 40 spam), on any machine."""
    rows = read_labeled(str(sms_tsv), text_column="1", label_column="0")
    assert [r[1] for r in rows].count("spam") == 40
    bal = balance_classes(rows, seed=123)
    assert [r[1] for r in bal].count("ham") == [r[1] for r in bal].count("spam") == 40
    train, val, test = stratified_split(bal, (0.7, 0.1, 0.2), seed=123)
    assert (len(train), len(val), len(test)) == (56, 8, 16)
    for part in (train, val, test):
        labels = [r[1] for r in part]
        assert labels.count("ham") == labels.count("spam")
    assert [r[0] for r in stratified_split(bal, (0.7, 0.1, 0.2), seed=123)[2]] == [r[0] for r in test]
    assert [r[0] for r in stratified_split(bal, (0.7, 0.1, 0.2), seed=1)[2]] != [r[0] for r in test]


def test_unlabeled_texts_leave_out_val_and_test_and_split_seed_fixes_the_split(sms_tsv, tmp_path):
    """`finetune unlabeled` writes every text outside the val/test split classify makes with
    the same settings (train + what balancing left out), no labels; --split-seed fixes the
    split whatever the training --seed."""
    from llmscratch.finetune.classify import _prepare_splits, unlabeled_texts

    kw = dict(data=str(sms_tsv), text_column="1", label_column="0")
    _, train, val, test = _prepare_splits(ClassifyConfig(**kw, seed=5, split_seed=123))
    assert [r[0] for r in _prepare_splits(ClassifyConfig(**kw, seed=123))[3]] == [r[0] for r in test]
    assert [r[0] for r in _prepare_splits(ClassifyConfig(**kw, seed=5))[3]] != [r[0] for r in test]
    texts = unlabeled_texts(ClassifyConfig(**kw, split_seed=123))
    rows = read_labeled(str(sms_tsv), text_column="1", label_column="0")
    held_out = {r[0].strip() for r in val + test}
    assert not held_out & set(texts)
    assert set(texts) == {r[0].strip() for r in rows} - held_out  # train and the unbalanced rest
    assert len(texts) > len(train)
    out = tmp_path / "texts.txt"
    cli = [sys.executable, "-m", "llmscratch", "finetune", "unlabeled", "--data", str(sms_tsv),
           "--text-column", "1", "--label-column", "0", "--out", str(out)]
    done = subprocess.run(cli, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    written = out.read_text(encoding="utf-8")
    assert written == "\n\n".join(texts) + "\n"
    assert "\tspam" not in written and not written.startswith(("ham", "spam"))


def test_csv_jsonl_and_header_columns(tmp_path):
    (tmp_path / "d.csv").write_text('msg,cls\n"hello, world",a\n"x ""quoted""",b\n', encoding="utf-8")
    rows = read_labeled(str(tmp_path / "d.csv"), text_column="msg", label_column="cls")
    assert [(t, y) for t, y, _ in rows] == [("hello, world", "a"), ('x "quoted"', "b")]
    (tmp_path / "d.jsonl").write_text('{"text": "hi", "label": 1}\n\n{"text": "yo", "label": 0}\n')
    rows = read_labeled(str(tmp_path / "d.jsonl"))
    assert [(t, y) for t, y, _ in rows] == [("hi", "1"), ("yo", "0")]


@pytest.mark.parametrize("content, suffix, kwargs, message", [
    ("label\tbody\nspam\tx\n", ".tsv", {}, "wrong columns"),
    ("label\ttext\nspam\t   \n", ".tsv", {}, ":2: empty text"),
    ("label\ttext\nspam\n", ".tsv", {}, ":2: expected 2 tab-separated fields"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": \n', ".jsonl", {}, ":2: malformed JSON"),
    ('{"txt": "a", "label": "x"}\n', ".jsonl", {}, ":1: no text field 'text'"),
])
def test_bad_files_give_one_line_errors(tmp_path, content, suffix, kwargs, message):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message) as e:
        read_labeled(str(path), **kwargs)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_too_small_and_unknown_label_errors_write_nothing(tmp_path, tiny_run):
    small = write_tsv(tmp_path / "small.tsv", [("spam", "a"), ("ham", "b"), ("spam", "c"), ("ham", "d")])
    out = tmp_path / "out"
    with pytest.raises(UserError, match="dataset too small"):
        finetune_classify(ClassifyConfig(model=str(tiny_run), data=str(small), out=str(out), progress=False))
    assert not out.exists()
    train = write_tsv(tmp_path / "train.tsv", toy_rows())
    val = write_tsv(tmp_path / "val.tsv", [("ham", "hi"), ("eggs", "x")])
    with pytest.raises(UserError, match=r"val.tsv:3: unknown label 'eggs'"):
        finetune_classify(ClassifyConfig(model=str(tiny_run), data=str(train), val_data=str(val),
                                         test_data=str(train), out=str(out), progress=False))
    assert not out.exists()


# ---------------------------------------------------------------------------- model


def test_prediction_reads_the_last_real_token():
    torch.manual_seed(0)
    model = add_classification_head(GPT(GPTConfig.from_name("tiny", vocab_size=100, n_embd=32)), 3).eval()
    a, b = [5, 6, 7], [8, 9, 10, 11, 12]
    idx, lengths, _ = collate_classification([(a, 0), (b, 1)], pad_id=99)
    assert idx[0].tolist() == [5, 6, 7, 99, 99]
    batched = classifier_logits(model, idx, lengths)  # (2, 3)
    alone = classifier_logits(model, torch.tensor([a]), torch.tensor([3]))
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)
    assert batched.shape == (2, 3)


def test_default_trainable_is_last_block_final_norm_and_head():
    model = add_classification_head(GPT(GPTConfig.from_name("tiny", vocab_size=100, n_embd=32)), 2)
    line = set_trainable(model, "last-1", extra=(model.lm_head,))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("h.1.", "ln_f.", "lm_head.")) for n in trainable)
    assert "lm_head.weight" in trainable and "h.0.attn.c_attn.weight" not in trainable
    assert "trainable" in line
    with pytest.raises(UserError, match="last-N"):
        set_trainable(model, "some")


def test_metrics_known_answer():
    m = classification_metrics([0, 0, 1, 1], [0, 1, 1, 1], ["a", "b"])
    assert m["accuracy"] == 0.75
    assert m["confusion_matrix"] == [[1, 1], [0, 2]]
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["a"]["recall"] == 0.5


# ----------------------------------------------------------------------- end to end


@pytest.mark.parametrize("trainable", ["all", "lora"])
def test_finetune_writes_a_loadable_classifier(tmp_path, tiny_run, trainable):
    data = write_tsv(tmp_path / "toy.tsv", toy_rows(10))
    out = tmp_path / "clf"
    cfg = ClassifyConfig(model=str(tiny_run), data=str(data), out=str(out), epochs=4, batch_size=4,
                         lr=3e-3, trainable=trainable, lora_rank=4 if trainable == "lora" else 0,
                         progress=False, seed=1)
    result = finetune_classify(cfg)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.json", "loss.png", "confusion.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("train_accuracy", "val_accuracy", "test_accuracy", "per_class", "confusion_matrix"):
        assert key in metrics
    assert set(metrics["per_class"]) == {"ham", "spam"}
    assert sum(map(sum, metrics["confusion_matrix"])) == metrics["n_test"]
    assert metrics["train_accuracy"] >= 0.75  # a separable toy task is learned
    losses = [r["train_loss"] for r in metrics["history"] if "train_loss" in r]
    assert losses[-1] < losses[0]
    # the folder loads back as the trained model: same predictions as at the end of training
    model, tok, labels, max_length = load_classifier(out)
    assert labels == ["ham", "spam"] and result.metrics["max_length"] == max_length
    assert not any("lora" in n for n in model.state_dict())  # adapters were merged
    preds = classify_texts(out, SPAM[:2] + HAM[:2])
    assert all(0.5 <= p <= 1.0 for _, p in preds)
    # ... and the reloaded folder IS the in-memory model: same logits, same predictions
    texts = SPAM + HAM + ["an unseen text, longer than the others, about nothing in particular"]
    enc = encode_texts(tok, texts, max_length)
    idx, lengths, _ = collate_classification([(ids, 0) for ids in enc], tok.eot_id)
    with torch.no_grad():
        reloaded = classifier_logits(model, idx, lengths)
        in_memory = classifier_logits(result.model.eval(), idx, lengths)
    torch.testing.assert_close(reloaded, in_memory, atol=1e-6, rtol=0)
    assert classify_texts(out, texts) == classify_texts((result.model, tok, labels, max_length), texts)


def test_classify_resume_mid_epoch_equals_uninterrupted(tmp_path, tiny_run):
    """Dropout on, stopped at step 6 (4 steps an epoch: mid-epoch, not an evaluation),
    resumed: the same weights, loss curve and metrics as a run trained straight through."""
    data = write_tsv(tmp_path / "toy.tsv", toy_rows(10))

    def run(name, **kw):
        return ClassifyConfig(model=str(tiny_run), data=str(data), out=str(tmp_path / name), epochs=3,
                              batch_size=4, lr=3e-3, trainable="all", dropout=0.1, progress=False, seed=1, **kw)

    full = finetune_classify(run("full"))
    first = finetune_classify(run("split"), stop_after=6)
    assert first.interrupted and first.metrics["steps"] == 6
    assert (tmp_path / "split" / "train_state.safetensors").is_file()
    second = finetune_classify(run("split", resume=True))
    assert not second.interrupted and second.metrics["steps"] == full.metrics["steps"] == 12
    assert not (tmp_path / "split" / "train_state.safetensors").exists()

    def curve(result):
        return [h["train_loss"] for h in result.metrics["history"]]

    assert curve(second) == pytest.approx(curve(full), abs=1e-6)
    assert [h["epoch"] for h in second.metrics["history"] if "val_loss" in h] == [1, 1.5, 2, 3]
    wf = load_file(str(tmp_path / "full" / "model.safetensors"))
    ws = load_file(str(tmp_path / "split" / "model.safetensors"))
    for k in wf:
        torch.testing.assert_close(ws[k], wf[k], atol=1e-6, rtol=0)
    for key in ("train_accuracy", "val_accuracy", "test_accuracy", "confusion_matrix"):
        assert second.metrics[key] == full.metrics[key]


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "llmscratch", *args], capture_output=True, text=True,
                          timeout=300, **kw)


@pytest.mark.slow
def test_sigterm_during_finetuning_saves_and_resume_finishes(tmp_path, tiny_run, sms_tsv):
    out = tmp_path / "clf"
    args = ["finetune", "classify", "--model", str(tiny_run), "--data", str(sms_tsv), "--out", str(out),
            "--text-column", "1", "--label-column", "0", "--batch-size", "8", "--lr", "1e-3",
            "--no-progress"]
    metrics = out / "metrics.jsonl"
    returncode, err = sigterm_after_steps([*args, "--epochs", "1000"], metrics)
    assert returncode == 130, err
    assert "interrupted after" in err
    state = load_file(str(out / "train_state.safetensors"))
    assert "rng.cpu" in state
    step = len(metrics.read_text().splitlines())
    assert json.loads(metrics.read_text().splitlines()[-1])["step"] == step
    # 56 training examples, 7 steps an epoch: enough epochs for two more steps at least
    epochs = step // 7 + 1
    r = _cli(*args, "--epochs", str(epochs), "--resume")
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout
    assert len(metrics.read_text().splitlines()) == epochs * 7 > step
    assert not (out / "train_state.safetensors").exists()
    assert load_classifier(out)[2] == ["ham", "spam"]


@pytest.mark.slow
def test_ddp_finetuning_matches_one_process(tmp_path, tiny_run, sms_tsv):
    """torchrun with 2 CPU processes fine-tunes the classifier along the single-process loss
    trajectory (7 batches of 8 an epoch: 4 rows per process)."""
    def args(out):
        return ["finetune", "classify", "--model", str(tiny_run), "--data", str(sms_tsv), "--out", str(out),
                "--text-column", "1", "--label-column", "0", "--batch-size", "8", "--epochs", "2",
                "--lr", "1e-3", "--trainable", "all", "--no-progress"]

    r = _cli(*args(tmp_path / "single"))
    assert r.returncode == 0, r.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "llmscratch", *args(tmp_path / "ddp")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]

    def curve(out):
        return [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert len(curve(tmp_path / "ddp")) == 14
    assert curve(tmp_path / "ddp") == pytest.approx(curve(tmp_path / "single"), abs=1e-4)
    ws = load_file(str(tmp_path / "single" / "model.safetensors"))
    wd = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    for k in ws:
        torch.testing.assert_close(wd[k], ws[k], atol=1e-4, rtol=1e-4)


def test_cli_finetune_and_classify(tmp_path, tiny_run):
    data = write_tsv(tmp_path / "toy.tsv", toy_rows(8))
    out = tmp_path / "clf"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "llmscratch", *args], capture_output=True, text=True)

    r = cli("finetune", "classify", "--model", str(tiny_run), "--data", str(data), "--out", str(out),
            "--epochs", "1", "--batch-size", "8", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout
    r = cli("classify", "--model", str(out), "free cash prize now")
    assert r.returncode == 0, r.stderr
    label, prob = r.stdout.split()[:2]
    assert label in ("ham", "spam") and 0.0 <= float(prob) <= 1.0
    r = cli("finetune", "classify", "--model", str(tiny_run), "--data", str(tmp_path / "nope.tsv"),
            "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nope.tsv" in r.stderr
    assert not (tmp_path / "o2").exists()
