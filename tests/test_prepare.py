"""`llmscratch prepare` (corpus -> token shards) and `pretrain --data PREPARED_DIR`: formats,
workers, resume, held-out documents, bad input, training from shards with exact resume."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from llmscratch.data.prepare import PrepareConfig, is_validation, prepare
from llmscratch.data.shards import ShardedTokens, open_prepared
from llmscratch.data.sources import PIECE_CHARS, iter_segments
from llmscratch.errors import UserError


@pytest.fixture(scope="module")
def documents(docs_text) -> list[str]:
    """240 documents of 40-600 characters cut from the embedded corpus, seeded."""
    rng = random.Random(3)
    text = docs_text[docs_text.index("The "):]
    docs, pos = [], 0
    for _ in range(240):
        n = rng.randint(40, 600)
        docs.append(text[pos:pos + n].strip() or "x")
        pos += n
    return docs


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory, documents) -> Path:
    """A 300-id byte-level BPE trained on the first documents, saved."""
    from llmscratch.tokenizer import BPETokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    BPETokenizer().train("\n\n".join(documents[:40]), 300).save(path)
    return path


def jsonl(path: Path, docs, field="text", opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, field: d}) + "\n")
    return path


def parquet(path: Path, docs, field="text") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), path, row_group_size=50)
    return path


def run(tmp_path, src, name="out", tok=None, stop_after_shards=None, **kw):
    cfg = PrepareConfig(input=str(src), out=str(tmp_path / name), tokenizer=str(tok), progress=False,
                        **{"shard_tokens": 700, "val_fraction": 0.2, **kw})
    return prepare(cfg, stop_after_shards=stop_after_shards)


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}


def stream(out: Path, split: str) -> np.ndarray:
    ids = getattr(open_prepared(out), split)
    return np.asarray(ids[0:len(ids)])


# ----------------------------------------------------------------------- formats


def test_every_format_streams_the_same_shards(tmp_path, documents, tok_file):
    """jsonl, jsonl.gz, jsonl.zst, parquet, a folder of .txt, a glob and hf:FOLDER (through
    `datasets`' streaming) give byte-identical shards for the same documents."""
    pytest.importorskip("zstandard")
    import zstandard

    src = tmp_path / "src"
    src.mkdir()
    plain = jsonl(src / "a.jsonl", documents)
    jsonl(src / "b.jsonl.gz", documents, opener=gzip.open)
    (src / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    (src / "pq").mkdir()
    parquet(src / "pq" / "d.parquet", documents)
    txt = src / "txt"
    txt.mkdir()
    for i, d in enumerate(documents):
        (txt / f"{i:04d}.txt").write_text(d, encoding="utf-8")
    ref = run(tmp_path, plain, "ref", tok_file)
    assert ref.manifest["splits"]["train"]["documents"] + ref.manifest["splits"]["val"]["documents"] == 240
    assert len(ref.manifest["splits"]["train"]["shards"]) > 3
    want = shard_bytes(ref.out)
    inputs = {"gz": src / "b.jsonl.gz", "zst": src / "c.jsonl.zst", "parquet": src / "pq" / "d.parquet",
              "txt": txt, "glob": f"{src}/a.json*"}
    pytest.importorskip("datasets")
    inputs["hf"] = f"hf:{src / 'pq'}"
    for name, path in inputs.items():
        got = run(tmp_path, path, name, tok_file)
        assert shard_bytes(got.out) == want, name
        assert got.manifest["splits"] == ref.manifest["splits"], name


def test_long_text_file_in_pieces_encodes_like_the_whole(tmp_path, docs_text):
    """A text file read in ~16K-character pieces gives exactly the ids of encoding it whole
    (GPT-2's tokenizer and a BPE of ours), with no end-of-text between its pieces."""
    from llmscratch.tokenizer import BPETokenizer, get_tokenizer

    text = docs_text[:5 * PIECE_CHARS]
    path = tmp_path / "long.txt"
    path.write_text(text, encoding="utf-8")
    assert len(list(iter_segments(str(path)))) >= 4
    bpe = tmp_path / "bpe.json"
    BPETokenizer().train(text[:20_000], 300).save(bpe)
    for spec, tok in (("gpt2", get_tokenizer("gpt2")), (str(bpe), get_tokenizer(bpe))):
        out = run(tmp_path, path, f"o{len(spec)}", spec, val_fraction=0.0, shard_tokens=10_000).out
        assert stream(out, "train").tolist() == tok.encode_ordinary(text), spec


# ------------------------------------------------------------------ the layout


def test_workers_do_not_change_a_byte(tmp_path, documents, tok_file, monkeypatch):
    """1, 2 and 3 worker processes write the same shards (small batches, so the pool really
    has several in flight)."""
    from llmscratch.data import prepare as prep

    monkeypatch.setattr(prep, "BATCH_CHARS", 2000)
    src = jsonl(tmp_path / "c.jsonl", documents)
    one = shard_bytes(run(tmp_path, src, "w1", tok_file, workers=1).out)
    assert len(one) > 8
    assert shard_bytes(run(tmp_path, src, "w2", tok_file, workers=2).out) == one
    assert shard_bytes(run(tmp_path, src, "w3", tok_file, workers=3).out) == one


def test_interrupted_prepare_resumes_to_the_same_bytes(tmp_path, documents, tok_file, monkeypatch):
    from llmscratch.data import prepare as prep

    src = jsonl(tmp_path / "c.jsonl", documents)
    full = run(tmp_path, src, "full", tok_file)
    want = shard_bytes(full.out)
    monkeypatch.setattr(prep, "_WRITE_TOKENS", 64)  # from here a shard file is written in pieces
    first = run(tmp_path, src, "split", tok_file, stop_after_shards=3)
    assert first.interrupted and first.shards_written == 3
    assert not list(first.out.glob(".*.tmp"))  # the unfinished shard's file is gone
    assert not (first.out / "manifest.json").exists() and (first.out / "prepare_state.json").exists()
    kept = shard_bytes(first.out)
    assert kept and all(want[k] == v for k, v in kept.items())  # finished shards are kept
    # what a kill leaves: a half-written temporary and a shard written after the state was saved
    (first.out / ".train_000009.bin.abcd1234.tmp").write_bytes(b"junk")
    (first.out / "train_000009.bin").write_bytes(b"junk")
    again = run(tmp_path, src, "split", tok_file, stop_after_shards=2)  # interrupted once more
    assert again.interrupted
    done = run(tmp_path, src, "split", tok_file)
    assert not done.interrupted and done.shards_written < len(want)
    assert shard_bytes(done.out) == want
    assert sorted(p.name for p in done.out.iterdir()) == sorted([*want, "manifest.json", "tokenizer.json"])
    assert done.manifest["splits"] == full.manifest["splits"]
    # a complete folder: the same command does nothing
    assert run(tmp_path, src, "split", tok_file).shards_written == 0


KILLED_CHILD = """
import sys, time
from llmscratch.data import prepare as prep
close = prep._SplitWriter._close_shard
def slow_close(self):  # time for the parent to kill us between two shards
    close(self)
    time.sleep(0.3)
prep._SplitWriter._close_shard = slow_close
prep.BATCH_CHARS = 3000
prep.prepare(prep.PrepareConfig(input=sys.argv[1], out=sys.argv[2], tokenizer=sys.argv[3], progress=False,
                                shard_tokens=700, val_fraction=0.2, workers=2))
"""


def test_a_killed_prepare_resumes_to_the_same_bytes(tmp_path, documents, tok_file):
    """kill -9 in the middle of a 2-worker prepare; the same prepare again finishes it, and the
    folder is what an uninterrupted run writes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    src = jsonl(tmp_path / "c.jsonl", documents)
    want = shard_bytes(run(tmp_path, src, "full", tok_file).out)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(src), str(out), str(tok_file)], env=env)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and child.poll() is None:
            try:
                state = json.loads((out / "prepare_state.json").read_text())
            except (OSError, ValueError):
                state = {}
            if len(state.get("splits", {}).get("train", {}).get("shards", [])) >= 3:
                break
            time.sleep(0.02)
        assert child.poll() is None, "the prepare finished before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert not (out / "manifest.json").exists()
    done = run(tmp_path, src, "killed", tok_file)
    assert not done.interrupted and 0 < done.shards_written < len(want)
    assert shard_bytes(out) == want
    assert sorted(p.name for p in out.iterdir()) == sorted([*want, "manifest.json", "tokenizer.json"])


def test_validation_is_held_out_documents_chosen_by_their_text(tmp_path, documents, tok_file):
    """The val shards hold exactly the documents whose hash says so, in order, separated by
    <|endoftext|>; shuffling the corpus holds out the same documents."""
    from llmscratch.tokenizer import get_tokenizer

    tok = get_tokenizer(tok_file)

    def rule(d: str) -> bool:  # the documented rule, written out
        digest = hashlib.blake2b(d.encode(), digest_size=8, person=b"llmscratch-val").digest()
        return int.from_bytes(digest, "big") / 2**64 < 0.2

    held = [d for d in documents if rule(d)]
    assert [is_validation(d.encode(), 0.2) for d in documents] == [rule(d) for d in documents]
    assert 20 < len(held) < 80
    out = run(tmp_path, jsonl(tmp_path / "c.jsonl", documents), "a", tok_file).out
    eot = tok.eot_id
    want = []
    for i, d in enumerate(held):
        want += ([eot] if i else []) + tok.encode_ordinary(d)
    assert stream(out, "val").tolist() == want
    train = stream(out, "train")
    assert int((train == eot).sum()) == len(documents) - len(held) - 1
    shuffled = documents[:]
    random.Random(1).shuffle(shuffled)
    out2 = run(tmp_path, jsonl(tmp_path / "s.jsonl", shuffled), "b", tok_file).out
    assert sorted(tok.decode(stream(out2, "val").tolist()).split("<|endoftext|>")) == sorted(held)
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"]["val"]["documents"] == len(held)
    assert m["splits"]["val"]["bytes"] == sum(len(d.encode()) for d in held)
    assert m["dtype"] == "uint16" and m["tokenizer"]["vocab_size"] == 300


def test_a_vocabulary_past_uint16_writes_uint32_shards(tmp_path, documents, tok_file, monkeypatch):
    """The dtype follows the vocabulary (forced here: a >65,536-id tokenizer is slow to train);
    the ids read back are the same."""
    from llmscratch.data import prepare as prep

    src = jsonl(tmp_path / "c.jsonl", documents)
    small = run(tmp_path, src, "u16", tok_file)
    monkeypatch.setattr(prep, "token_dtype", lambda vocab_size: np.dtype(np.uint32))
    big = run(tmp_path, src, "u32", tok_file)
    assert (small.manifest["dtype"], big.manifest["dtype"]) == ("uint16", "uint32")
    assert sum(p.stat().st_size for p in big.out.glob("train_*.bin")) == 4 * big.manifest["splits"]["train"]["tokens"]
    assert stream(big.out, "train").tolist() == stream(small.out, "train").tolist()


def test_sharded_tokens_read_like_one_array(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 60000, n).astype(np.uint16) for n in (5, 17, 1, 30)]
    whole = np.concatenate(parts)
    st = ShardedTokens(parts)
    assert len(st) == len(whole)
    for a, b in [(0, 53), (3, 24), (21, 23), (22, 23), (40, 40), (-5, None)]:
        assert st[a:b].tolist() == whole[a:b].tolist()
    idx = rng.integers(0, len(whole), (4, 9))
    assert (st[idx] == whole[idx]).all() and st[idx].shape == (4, 9)
    assert st[22] == whole[22] and st[-1] == whole[-1]
    with pytest.raises(IndexError):
        st[np.array([len(whole)])]


# -------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, documents, tok_file, capsys):
    from llmscratch.cli import main

    src = jsonl(tmp_path / "c.jsonl", documents[:5], field="body")
    cases = {
        "field": (src, r"c\.jsonl line 1: no field 'text' \(its fields: id, body\); pass --text-field"),
        "pqfield": (parquet(tmp_path / "d.parquet", documents[:5], field="body"), r"d\.parquet: no column 'text'"),
        "missing": (tmp_path / "nope.jsonl", "no such file, folder or glob match"),
        "empty": (jsonl(tmp_path / "e.jsonl", ["", ""]), "holds no text"),
        "format": (tmp_path / "c.csv", "unknown format"),
    }
    (tmp_path / "c.csv").write_text("a,b\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    cases["json"] = (tmp_path / "bad.jsonl", r"bad\.jsonl line 2: not valid JSON")
    for name, (path, message) in cases.items():
        for spec in (str(tok_file), "bpe:300"):
            with pytest.raises(UserError, match=message):
                run(tmp_path, path, name, spec)
            assert not (tmp_path / name).exists(), name
    capsys.readouterr()
    assert main(["prepare", str(src), "--out", str(tmp_path / "cli"), "--tokenizer", str(tok_file),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "no field 'text'" in err
    assert main(["prepare", str(src), "--out", str(tmp_path / "cli"), "--tokenizer", str(tok_file),
                 "--text-field", "body", "--val-fraction", "0", "--no-progress"]) == 0
    # the folder now holds other settings
    with pytest.raises(UserError, match="already holds data prepared with other settings"):
        run(tmp_path, src, "cli", tok_file, text_field="body")


def test_non_utf8_bytes_become_replacement_characters_and_are_counted(tmp_path, tok_file):
    from llmscratch.tokenizer import get_tokenizer

    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf\xe9 au lait\nna\xe2\x82ve\n")  # a latin-1 byte, a cut-off 3-byte character
    res = run(tmp_path, path, "o", tok_file, val_fraction=0.0)
    assert res.replaced_bytes == 3 and res.manifest["replaced_bytes"] == 3 and "latin1.txt" in res.first_bad
    assert get_tokenizer(tok_file).decode(stream(res.out, "train").tolist()) == "caf\ufffd au lait\nna\ufffdve\n"


def test_damaged_shards_are_caught(tmp_path, documents, tok_file):
    out = run(tmp_path, jsonl(tmp_path / "c.jsonl", documents), "o", tok_file).out
    open_prepared(out)
    shard = out / "train_000002.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"train_000002\.bin: sha256 does not match manifest\.json"):
        open_prepared(out)
    open_prepared(out, verify=False)  # sizes only: not noticed
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(UserError, match=r"train_000002\.bin has 1,398 bytes but manifest\.json says 700 tokens"):
        open_prepared(out, verify=False)
    shard.unlink()
    with pytest.raises(UserError, match=r"train_000002\.bin is missing"):
        open_prepared(out)
    (out / "manifest.json").unlink()
    with pytest.raises(UserError, match="not a prepared folder"):
        open_prepared(out)


# ------------------------------------------------------------------- pretraining


TINY = dict(model="tiny", context_length=32, batch_size=4, eval_every=4, eval_batches=2, sample_tokens=4,
            warmup_steps=3, lr=3e-3, precision="fp32", progress=False, seed=7, dropout=0.1, grad_accum=2,
            kernels=False)


def test_pretrain_from_shards_resumes_exactly_and_checks_the_tokenizer(tmp_path, documents, tok_file):
    from safetensors.torch import load_file

    from llmscratch.checkpoints.run import load_model
    from llmscratch.tokenizer import BPETokenizer
    from llmscratch.train import TrainConfig, pretrain

    data = run(tmp_path, jsonl(tmp_path / "c.jsonl", documents), "data", tok_file, shard_tokens=2000).out

    def cfg(name, **kw):
        return TrainConfig(**{**TINY, "data": str(data), "tokenizer": str(tok_file), "out": str(tmp_path / name),
                              **kw})

    full = pretrain(cfg("full", max_steps=8))
    first = pretrain(cfg("split", max_steps=8), stop_after=3)  # mid-interval (evaluations every 4)
    assert first.interrupted
    second = pretrain(cfg("split", max_steps=8, resume=True))
    assert second.step == 8
    lf = [json.loads(x)["train_loss"] for x in (full.out / "metrics.jsonl").read_text().splitlines()]
    ls = [json.loads(x)["train_loss"] for x in (second.out / "metrics.jsonl").read_text().splitlines()]
    assert ls == pytest.approx(lf, abs=1e-6) and len(lf) == 8
    wf, ws = load_file(str(full.out / "model.safetensors")), load_file(str(second.out / "model.safetensors"))
    for k in wf:
        torch.testing.assert_close(ws[k], wf[k], atol=1e-6, rtol=0)
    # the validation loss is the val shards' (bits/byte from their own bytes per token)
    m = json.loads((data / "manifest.json").read_text())["splits"]["val"]
    assert full.val_bpb == pytest.approx(full.val_loss / np.log(2) / (m["bytes"] / m["tokens"]))
    model, tok = load_model(str(full.out))  # the run folder carries the shards' tokenizer
    assert tok.vocab_size == 300 and tok.encode("the") == BPETokenizer.load(tok_file).encode("the")
    # eval lm on the prepared folder: its held-out shards give the run's own validation loss
    from llmscratch.evaluation.lm import evaluate_lm

    r = evaluate_lm(model, tok, str(data), batch_size=4, max_batches=2, val_fraction=0.1, progress=False)
    assert r["loss"] == pytest.approx(full.val_loss, abs=1e-4) and r["tokens"] == m["tokens"]
    assert evaluate_lm(model, tok, str(data), batch_size=4, max_batches=1, progress=False)["tokens"] > m["tokens"]
    # the spec it was prepared with, or the folder's tokenizer, both name the same tokenizer
    pretrain(cfg("byfolder", tokenizer=str(data), max_steps=1))
    with pytest.raises(UserError, match=r"--tokenizer gpt2: .*manifest\.json was prepared with --tokenizer"):
        pretrain(cfg("gpt2", tokenizer="gpt2", max_steps=1))
    # the data re-prepared with another tokenizer under the run's feet
    other = tmp_path / "other.json"
    BPETokenizer().train("\n\n".join(documents[40:80]), 290).save(other)
    run(tmp_path, jsonl(tmp_path / "c.jsonl", documents), "data2", other, shard_tokens=2000)
    import shutil

    shutil.rmtree(data)
    shutil.copytree(tmp_path / "data2", data)
    with pytest.raises(UserError, match=r"manifest\.json was prepared with another tokenizer .* than the run in"):
        pretrain(cfg("split", max_steps=10, resume=True))


def test_pretrain_needs_a_validation_split(tmp_path, documents, tok_file):
    from llmscratch.train import TrainConfig, pretrain

    data = run(tmp_path, jsonl(tmp_path / "c.jsonl", documents), "data", tok_file, val_fraction=0.0).out
    with pytest.raises(UserError, match="validation split has 0 tokens.*larger --val-fraction"):
        pretrain(TrainConfig(**{**TINY, "data": str(data), "tokenizer": str(tok_file),
                                "out": str(tmp_path / "r"), "max_steps": 1}))


def test_masked_lm_pretraining_refuses_shards_in_one_line(tmp_path, documents, tok_file):
    """Masked-LM pretraining (bert-*) reads text only: a prepared folder is named as such,
    not reported as a folder 'holding no .txt files'."""
    from llmscratch.train import TrainConfig, pretrain

    data = run(tmp_path, jsonl(tmp_path / "c.jsonl", documents), "data", tok_file).out
    with pytest.raises(UserError, match="token shards from `llmscratch prepare`, which masked-LM pretraining"):
        pretrain(TrainConfig(model="bert-tiny", data=str(data), out=str(tmp_path / "r"), max_steps=1,
                             progress=False))
    assert not (tmp_path / "r").exists()
