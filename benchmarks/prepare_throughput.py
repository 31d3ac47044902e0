"""`llmscratch prepare` throughput and memory, beside tiktoken's own batch encoder.

1. Builds a corpus of `--size-mb` MB (default 1000) of JSONL documents in `--workdir`
   (files of 100 MB): random slices (300-6,000 characters) of the text this machine has
   (the python-stdlib and python-docs corpora, plus tinyshakespeare and the-verdict when
   `LLMSCRATCH_DATA_DIR` or the cache holds them), each under its own numbered header.
2. Speed, interleaved in rounds on the first `--speed-mb` of it: MB/s of UTF-8 text for
   `prepare` with GPT-2's tokenizer at 1 and 2 workers (reading JSONL, hashing, encoding,
   writing shards: the whole job) against tiktoken's `encode_ordinary_batch` at 1 and 2
   threads on the same documents already in memory (encoding only: the practical limit).
   Our GPT-2 tokenizer *is* tiktoken (`GPT2Tokenizer` builds a `tiktoken.Encoding` from
   GPT-2's files), so what is measured is the pipeline around it.
3. A BPE trained here (`bpe:8192` on the first `--bpe-sample-mb`), encoding `--bpe-mb` with
   prepare at 1 and 2 workers: pure Python, no reference to compare with.
4. Peak RSS of prepare (its own process, and its largest worker) in a fresh process on the
   `--speed-mb` slice and on the whole corpus, same settings (2 workers, GPT-2, 10M-token
   shards): the memory does not grow with the corpus.

Usage:
    python benchmarks/prepare_throughput.py [--size-mb 1000] [--speed-mb 100] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from llmscratch.data.corpora import load_text, python_docs_text, python_stdlib_documents
from llmscratch.data.prepare import PrepareConfig, prepare
from llmscratch.errors import UserError
from llmscratch.tokenizer import build_tokenizer
from results import write_result  # benchmarks/results.py

FILE_MB = 100
HERE = Path(__file__).resolve().parent


def pool_text() -> list[str]:
    texts = [d.text for d in python_stdlib_documents()] + [python_docs_text()]
    for name in ("tinyshakespeare", "the-verdict"):
        try:
            texts += [d.text for d in load_text(name, progress=False)]
        except UserError:
            pass
    return texts


def build_corpus(folder: Path, size_mb: int, seed: int = 0) -> list[Path]:
    """JSONL files of FILE_MB MB each (reused when already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    n_files = max(1, -(-size_mb // FILE_MB))
    paths = [folder / f"part_{i:03d}.jsonl" for i in range(n_files)]
    if all(p.is_file() for p in paths):
        return paths
    pool = pool_text()
    weights = [len(t) for t in pool]
    rng = random.Random(seed)
    doc = 0
    for p in paths:
        tmp = p.with_suffix(".tmp")
        written = 0
        with open(tmp, "w", encoding="utf-8") as f:
            while written < FILE_MB * 1_000_000:
                src = rng.choices(pool, weights)[0]
                n = rng.randint(300, 6000)
                start = rng.randrange(max(1, len(src) - n))
                text = f"Document {doc} ({rng.randint(0, 10**6)})\n{src[start:start + n]}"
                line = json.dumps({"id": doc, "text": text}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                doc += 1
        os.replace(tmp, p)
    return paths


def read_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def text_mb(texts: list[str]) -> float:
    return sum(len(t.encode("utf-8")) for t in texts) / 1e6


def time_tiktoken(enc, texts: list[str], threads: int) -> float:
    """Seconds for encode_ordinary_batch over ~1 MB batches (prepare's batch size)."""
    batches, cur, chars = [], [], 0
    for t in texts:
        cur.append(t)
        chars += len(t)
        if chars >= 1 << 20:
            batches.append(cur)
            cur, chars = [], 0
    if cur:
        batches.append(cur)
    t0 = time.perf_counter()
    for b in batches:
        enc.encode_ordinary_batch(b, num_threads=threads)
    return time.perf_counter() - t0


def time_prepare(src: Path, out: Path, tokenizer: str, workers: int) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = prepare(PrepareConfig(input=str(src), out=str(out), tokenizer=tokenizer, workers=workers,
                                shard_tokens=10_000_000, val_fraction=0.01, progress=False))
    dt = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return dt, res.manifest


RSS_CHILD = """
import json, resource, sys, time
from llmscratch.data.prepare import PrepareConfig, prepare
t0 = time.perf_counter()
res = prepare(PrepareConfig(input=sys.argv[1], out=sys.argv[2], tokenizer="gpt2", workers=2,
                            shard_tokens=10_000_000, val_fraction=0.01, progress=False))
dt = time.perf_counter() - t0
m = res.manifest["splits"]
print(json.dumps({"seconds": dt, "text_bytes": m["train"]["bytes"] + m["val"]["bytes"],
                  "tokens": m["train"]["tokens"] + m["val"]["tokens"],
                  "shards": len(m["train"]["shards"]) + len(m["val"]["shards"]),
                  "self_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "largest_worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def rss_run(src: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", RSS_CHILD, str(src), str(out)], capture_output=True, text=True, env=env)
    shutil.rmtree(out, ignore_errors=True)
    if r.returncode:
        raise SystemExit(f"prepare on {src} failed:\n{r.stderr[-2000:]}")
    row = json.loads(r.stdout.strip().splitlines()[-1])
    row["mb_per_s"] = row["text_bytes"] / 1e6 / row["seconds"]
    row["input"] = str(src)
    return row


def main() -> None:
    global FILE_MB
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1000, help="corpus size for the memory run (default 1000)")
    ap.add_argument("--speed-mb", type=int, default=100, help="the slice the speed is measured on (default 100)")
    ap.add_argument("--bpe-mb", type=int, default=10, help="text encoded with the trained BPE (default 10)")
    ap.add_argument("--bpe-sample-mb", type=float, default=4.0, help="text the BPE is trained on (default 4)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best is kept (default 2)")
    ap.add_argument("--workdir", default="/tmp/prepare_bench", help="where the corpus and shards go")
    ap.add_argument("--keep", action="store_true", help="keep the corpus for the next run")
    ap.add_argument("--file-mb", type=int, default=FILE_MB, help="size of each corpus file (default 100)")
    ap.add_argument("--json", help="write here instead of benchmarks/results/prepare_throughput.json")
    args = ap.parse_args()
    FILE_MB = args.file_mb

    work = Path(args.workdir)
    t0 = time.perf_counter()
    files = build_corpus(work / "corpus", args.size_mb)
    corpus_mb = sum(p.stat().st_size for p in files) / 1e6
    print(f"corpus: {len(files)} files, {corpus_mb:.0f} MB of JSONL ({time.perf_counter() - t0:.0f}s to build)")

    # ---- speed on the first file(s): prepare vs tiktoken, interleaved
    speed_files = files[:max(1, args.speed_mb // FILE_MB)]
    speed_src = speed_files[0] if len(speed_files) == 1 else work / "corpus"
    if len(speed_files) > 1 and len(speed_files) < len(files):
        raise SystemExit("--speed-mb must be one file (--file-mb) or the whole corpus")
    texts = [t for p in speed_files for t in read_texts(p)]
    mb = text_mb(texts)
    from llmscratch.tokenizer import get_tokenizer

    enc = get_tokenizer("gpt2").encoding  # a tiktoken.Encoding (GPT-2's files, offline)
    times: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for n in (1, 2):
            times.setdefault(f"tiktoken_{n}", []).append(time_tiktoken(enc, texts, n))
            dt, manifest = time_prepare(speed_src, work / "out", "gpt2", n)
            times.setdefault(f"prepare_{n}", []).append(dt)
            print(f"round {r}: {n} worker(s): tiktoken {mb / times[f'tiktoken_{n}'][-1]:.2f} MB/s, "
                  f"prepare {mb / dt:.2f} MB/s", flush=True)
    del texts
    gpt2 = {}
    for n in (1, 2):
        tk, ours = mb / min(times[f"tiktoken_{n}"]), mb / min(times[f"prepare_{n}"])
        gpt2[f"{n}_worker{'s' if n > 1 else ''}"] = {
            "tiktoken_encode_ordinary_batch_mb_per_s": round(tk, 3), "prepare_mb_per_s": round(ours, 3),
            "prepare_over_tiktoken": round(ours / tk, 3),
            "all_tiktoken_mb_per_s": [round(mb / t, 3) for t in times[f"tiktoken_{n}"]],
            "all_prepare_mb_per_s": [round(mb / t, 3) for t in times[f"prepare_{n}"]]}

    # ---- a BPE trained here
    sample, budget = [], args.bpe_sample_mb * 1e6
    bpe_texts = read_texts(files[-1])
    for t in bpe_texts:
        sample.append(t)
        budget -= len(t.encode())
        if budget <= 0:
            break
    t1 = time.perf_counter()
    bpe = build_tokenizer("bpe:8192", sample)
    train_s = time.perf_counter() - t1
    bpe_file = work / "bpe8192.json"
    bpe.save(bpe_file)
    bpe_src = work / "bpe_slice.jsonl"
    budget, rows = args.bpe_mb * 1e6, []
    for t in bpe_texts[len(sample):]:
        rows.append(json.dumps({"text": t}, ensure_ascii=False))
        budget -= len(t.encode())
        if budget <= 0:
            break
    bpe_src.write_text("\n".join(rows) + "\n", encoding="utf-8")
    bpe_mb = text_mb([json.loads(r)["text"] for r in rows])
    del bpe_texts
    bpe_rows = {}
    for n in (1, 2):
        dt, _ = time_prepare(bpe_src, work / "out", str(bpe_file), n)
        bpe_rows[f"{n}_worker{'s' if n > 1 else ''}"] = {"prepare_mb_per_s": round(bpe_mb / dt, 3)}
        print(f"bpe:8192, {n} worker(s): {bpe_mb / dt:.2f} MB/s", flush=True)

    # ---- peak RSS: a slice and the whole corpus, in fresh processes
    rss_small = rss_run(files[0], work / "out")
    print(f"RSS, {files[0].name}: {rss_small}", flush=True)
    rss_big = rss_run(work / "corpus", work / "out")
    print(f"RSS, whole corpus: {rss_big}", flush=True)

    load = os.getloadavg()
    write_result("prepare_throughput", {
        "note": ("taken UNDER LOAD: ~8 sessions share this machine's 2 cores (load average "
                 f"{load[0]:.1f} at the end); absolute MB/s are low and noisy, the ratios are interleaved "
                 "in one process, best of the rounds. Our GPT-2 tokenizer is tiktoken's own Rust encoder "
                 "(GPT2Tokenizer builds a tiktoken.Encoding from GPT-2's files); prepare's figure is the "
                 "whole job (read JSONL, hash, encode in worker processes, write shards), tiktoken's is "
                 "encoding alone on texts already in memory."),
        "load_average_at_end": [round(x, 2) for x in load],
        "corpus": {"files": len(files), "jsonl_mb": round(corpus_mb, 1),
                   "made_of": "random 300-6000 character slices of python-stdlib, python-docs "
                              "(and tinyshakespeare, the-verdict where available), numbered"},
        "speed_slice_text_mb": round(mb, 1),
        "rounds": args.rounds,
        "gpt2": gpt2,
        "bpe_8192_trained_here": {"sample_mb": args.bpe_sample_mb, "train_seconds": round(train_s, 1),
                                  "vocab_size": bpe.vocab_size, "text_mb": round(bpe_mb, 1), **bpe_rows},
        "peak_rss": {"settings": "gpt2, 2 workers, shard_tokens 10M, val_fraction 0.01",
                     "slice": rss_small, "whole_corpus": rss_big},
    }, path=args.json)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
