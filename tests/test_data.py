"""Tests for llmscratch.data: sliding windows, token storage, splits and batch samplers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmscratch.data import (
    BatchSampler,
    SlidingWindowDataset,
    create_dataloader,
    iter_eval_batches,
    load_bin,
    split_train_val,
    token_ids,
    tokenize_to_bin,
)
from llmscratch.data.corpora import Document
from llmscratch.errors import UserError


class ByteTokenizer:
    """A stand-in tokenizer: UTF-8 bytes are ids 0..255, 256 is <|endoftext|>. Counts calls."""

    name = "fake-bytes"
    vocab_size = 257
    eot_id = 256

    def __init__(self):
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return list(text.encode("utf-8"))


# --------------------------------------------------------------------------- sliding window


def test_sliding_window_known_example():
    ids = np.arange(10)
    ds = SlidingWindowDataset(ids, context_length=4, stride=1)
    assert len(ds) == 6
    x, y = ds[0]
    assert x.tolist() == [0, 1, 2, 3] and y.tolist() == [1, 2, 3, 4]
    x, y = ds[5]
    assert x.tolist() == [5, 6, 7, 8] and y.tolist() == [6, 7, 8, 9]
    assert x.dtype == torch.int64

    ds = SlidingWindowDataset(ids, context_length=4, stride=4)
    assert [(x.tolist(), y.tolist()) for x, y in ds] == [
        ([0, 1, 2, 3], [1, 2, 3, 4]),
        ([4, 5, 6, 7], [5, 6, 7, 8]),
    ]


def test_sliding_window_accepts_memmap_tensor_and_list(tmp_path):
    ids = np.arange(20, dtype=np.uint16)
    ids.tofile(tmp_path / "ids.bin")
    mm = np.memmap(tmp_path / "ids.bin", dtype=np.uint16, mode="r")
    for source in (mm, torch.arange(20), list(range(20))):
        ds = SlidingWindowDataset(source, 5, 3)
        x, y = ds[2]
        assert x.tolist() == [6, 7, 8, 9, 10] and torch.equal(y, x + 1)


def test_too_short_corpus():
    with pytest.raises(UserError, match=r"corpus has 4 tokens; need at least context_length\+1 = 5"):
        SlidingWindowDataset(np.arange(4), context_length=4, stride=1)
    with pytest.raises(UserError, match="stride"):
        SlidingWindowDataset(np.arange(40), context_length=4, stride=0)


def test_dataloader_is_seeded():
    ids = np.arange(200)

    def batches(seed):
        return [x.tolist() for x, _ in create_dataloader(ids, 4, 8, 8, seed=seed)]

    first = batches(0)
    assert first == batches(0)
    assert first != batches(1)
    loader = create_dataloader(ids, 4, 8, 8, shuffle=False)
    x, y = next(iter(loader))
    assert x.shape == (4, 8) and torch.equal(y, x + 1)
    assert x[:, 0].tolist() == [0, 8, 16, 24]


def test_dataloader_too_few_windows():
    with pytest.raises(UserError, match="batch_size"):
        create_dataloader(np.arange(20), batch_size=8, context_length=4, stride=4)


# --------------------------------------------------------------------------- token storage


def test_tokenize_to_bin_roundtrip_and_cache(tmp_path):
    tok = ByteTokenizer()
    docs = [Document("a", "hi"), Document("b", "yo!")]
    path = tokenize_to_bin(docs, tok, tmp_path, progress=False)
    assert tok.calls == 2
    ids = load_bin(path)
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint16
    assert ids.tolist() == [104, 105, 256, 121, 111, 33]  # eot between, not after
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["count"] == 6 and meta["dtype"] == "uint16" and meta["tokenizer"] == "fake-bytes"

    again = tokenize_to_bin(docs, tok, tmp_path, progress=False)
    assert again == path and tok.calls == 2  # cache hit: nothing encoded

    # Moving a character across the document boundary is a different corpus.
    other = tokenize_to_bin([Document("a", "hiy"), Document("b", "o!")], tok, tmp_path, progress=False)
    assert other != path and load_bin(other).tolist() == [104, 105, 121, 256, 111, 33]


def test_token_ids_are_the_cached_bin_with_bytes_per_token(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMSCRATCH_CACHE_DIR", str(tmp_path))
    tok = ByteTokenizer()
    docs = [Document("a", "hé"), Document("b", "yo!")]  # é is 2 UTF-8 bytes: 6 bytes in all
    ids, bytes_per_token = token_ids(docs, tok, source="test", progress=False)
    assert isinstance(ids, np.memmap)
    assert ids.tolist() == [104, 195, 169, 256, 121, 111, 33]  # 6 byte tokens + 1 separator
    assert bytes_per_token == pytest.approx(6 / 7)
    assert list((tmp_path / "tokens").glob("*.bin"))  # cached under the cache root
    again, _ = token_ids(docs, tok, progress=False)
    assert tok.calls == 2 and again.tolist() == ids.tolist()  # the cache answered


def test_tokenize_to_bin_uint32_for_big_vocab(tmp_path):
    class BigVocab(ByteTokenizer):
        name = "big"
        vocab_size = 100_000
        eot_id = 99_999

    path = tokenize_to_bin(["a", "b"], BigVocab(), tmp_path, progress=False)
    ids = load_bin(path)
    assert ids.dtype == np.uint32 and ids.tolist() == [97, 99_999, 98]


def test_tokenizer_identity_is_part_of_the_key(tmp_path):
    class Saving(ByteTokenizer):
        def __init__(self, merges):
            super().__init__()
            self.merges = merges

        def save(self, prefix):
            with open(prefix + ".model", "w") as f:
                f.write(self.merges)

    p1 = tokenize_to_bin(["text"], Saving("m1"), tmp_path, progress=False)
    p2 = tokenize_to_bin(["text"], Saving("m2"), tmp_path, progress=False)
    p3 = tokenize_to_bin(["text"], Saving("m1"), tmp_path, progress=False)
    assert p1 != p2 and p1 == p3


def test_truncated_bin_is_user_error(tmp_path):
    path = tokenize_to_bin(["hello world"], ByteTokenizer(), tmp_path, progress=False)
    with open(path, "r+b") as f:
        f.truncate(4)
    with pytest.raises(UserError, match="truncated"):
        load_bin(path)
    # ...and the cache does not trust it either.
    tok = ByteTokenizer()
    assert tokenize_to_bin(["hello world"], tok, tmp_path, progress=False) == path
    assert tok.calls == 1 and len(load_bin(path)) == 11


def test_out_of_range_ids_are_refused(tmp_path):
    class Broken(ByteTokenizer):
        vocab_size = 100

    with pytest.raises(ValueError, match="outside"):
        tokenize_to_bin(["\u00ff"], Broken(), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []  # atomic: nothing half-written


# --------------------------------------------------------------------------- split


def test_split_train_val_views():
    ids = np.arange(100)
    train, val = split_train_val(ids, 0.1)
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))
    assert np.shares_memory(train, ids) and np.shares_memory(val, ids)
    with pytest.raises(UserError, match=r"validation split .* has 10 tokens"):
        split_train_val(ids, 0.1, context_length=16)
    with pytest.raises(UserError, match="val_fraction"):
        split_train_val(ids, 1.5)
    train, val = split_train_val(ids, 0.0, context_length=16)
    assert len(train) == 100 and len(val) == 0


# --------------------------------------------------------------------------- batch sampler


def test_batch_sampler_is_a_function_of_seed_and_step():
    ids = np.arange(1000, dtype=np.uint16)
    a = BatchSampler(ids, batch_size=4, context_length=16, seed=7)
    b = BatchSampler(ids, batch_size=4, context_length=16, seed=7)
    x, y = a.get_batch(3)
    assert x.shape == (4, 16) and x.dtype == torch.int64 and torch.equal(y, x + 1)
    # Out of order, on a fresh sampler: same batch (this is what makes resume exact).
    b.get_batch(100)
    assert torch.equal(b.get_batch(3)[0], x)
    assert not torch.equal(a.get_batch(4)[0], x)
    assert not torch.equal(BatchSampler(ids, 4, 16, seed=8).get_batch(3)[0], x)


def test_batch_sampler_epoch_covers_every_window_once():
    ids = np.arange(16 * 10 + 1)  # exactly 10 windows, no slack
    s = BatchSampler(ids, batch_size=5, context_length=16, seed=0)
    assert s.windows_per_epoch == 10
    firsts = torch.cat([s.get_batch(step)[0][:, 0] for step in range(2)])
    assert sorted(firsts.tolist()) == list(range(0, 160, 16))
    nxt = torch.cat([s.get_batch(step)[0][:, 0] for step in range(2, 4)])
    assert sorted(nxt.tolist()) == list(range(0, 160, 16)) and not torch.equal(nxt, firsts)


def test_batch_sampler_handles_batches_spanning_epochs():
    ids = np.arange(3 * 8 + 1)  # 3 windows, batch of 4 always spans two epochs
    s = BatchSampler(ids, batch_size=4, context_length=8, seed=1)
    for step in range(5):
        x, y = s.get_batch(step)
        assert x.shape == (4, 8) and torch.equal(y, x + 1)
        assert set(x[:, 0].tolist()) <= {0, 8, 16}


def test_batch_sampler_ranks_partition_the_global_batch():
    ids = np.arange(5000)
    s = BatchSampler(ids, batch_size=8, context_length=32, seed=3)
    for step in (0, 17):
        full_x, full_y = s.get_batch(step)
        parts = [s.get_batch(step, rank=r, world_size=2) for r in range(2)]
        assert parts[0][0].shape == (4, 32)
        assert torch.equal(torch.cat([p[0] for p in parts]), full_x)
        assert torch.equal(torch.cat([p[1] for p in parts]), full_y)


def test_batch_sampler_errors():
    ids = np.arange(100)
    s = BatchSampler(ids, batch_size=6, context_length=8, seed=0)
    with pytest.raises(UserError, match="not divisible by world_size 4"):
        s.get_batch(0, rank=0, world_size=4)
    with pytest.raises(UserError, match="rank 2"):
        s.get_batch(0, rank=2, world_size=2)
    with pytest.raises(UserError, match="corpus has 8 tokens"):
        BatchSampler(np.arange(8), batch_size=1, context_length=8)


def test_iter_eval_batches_walks_in_order():
    ids = np.arange(4 * 10 + 1)  # 10 windows of 4
    batches = list(iter_eval_batches(ids, batch_size=3, context_length=4))
    assert [x.shape[0] for x, _ in batches] == [3, 3, 3, 1]
    starts = torch.cat([x[:, 0] for x, _ in batches]).tolist()
    assert starts == list(range(0, 40, 4))
    assert all(torch.equal(y, x + 1) for x, y in batches)
    assert len(list(iter_eval_batches(ids, 3, 4, max_batches=2))) == 2
    shards = [list(iter_eval_batches(ids, 3, 4, rank=r, world_size=2)) for r in range(2)]
    assert [len(s) for s in shards] == [2, 2]
    assert torch.equal(shards[1][0][0], batches[1][0])
