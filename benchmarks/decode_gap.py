"""Decoding costs the issue-25 profile pointed at, before and after, measured interleaved in
one process on random weights of the `--model` shape (gpt2-124m by default):

1. sampling: one 32-row decode step's top-p draws (each row its own seeded `sample` over the
   50257-token vocabulary, as `BatchDecoder.step` does), with the full-vocabulary sort
   (`sampling.NUCLEUS_CANDIDATES = ()`: exactly the old code) against the top-k candidate
   path, on two kinds of logits: "peaked" (a trained model's shape: a few likely tokens and a
   long tail) and "random-weights" (the random model's own, nearly flat: the nucleus of 0.9
   is most of the vocabulary, so the candidate path must fall back without losing time).
   The tokens drawn are checked identical, and one decode forward pass of the 32 rows is
   timed beside it (the share of the step).
2. chunked prefill: `--rows` short requests decoding when a `--long`-token prompt joins; the
   running rows' time to next token while it is admitted (the largest gap, the stall), with
   the prompt prefilled in one pass (`prefill_chunk=None`, before) against chunks of
   `--chunk` tokens (after), and the long prompt's own time to its first token.
3. past the context window: `--past` new tokens after a prompt that fills a
   `--window`-token context (the model's shape with that context length), re-encoding the
   whole window per token (the default, before) against `context_shift=True` (after; opt-in,
   it changes the tokens past the window).

The machine may be shared: the load average before and after goes into the JSON.

    python benchmarks/decode_gap.py                 # -> benchmarks/results/decode_gap.json
    python benchmarks/decode_gap.py --threads 1     # what the committed JSON ran (a busy machine)
    python benchmarks/decode_gap.py --model tiny --rounds 1 --long 200 --chunk 64 --json /tmp/d.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from llmscratch import GPT, GPTConfig
from llmscratch.decoding import sampling
from llmscratch.decoding.batching import BatchDecoder, DecodeRow
from llmscratch.decoding.generate import generate
from results import write_result  # benchmarks/results.py


def peaked_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ranks = torch.argsort(torch.rand(rows, vocab, generator=g), dim=-1).float() + 1
    return -3.6 * torch.log(ranks) + 0.3 * torch.randn(rows, vocab, generator=g)


def time_draws(logits: torch.Tensor, candidates: tuple, top_p: float) -> tuple[float, list[int]]:
    """Seconds for one row-by-row draw of every row (seed = row), and the tokens."""
    sampling.NUCLEUS_CANDIDATES = candidates
    t0 = time.perf_counter()
    toks = [int(sampling.sample(logits[i: i + 1], 1.0, None, top_p, torch.Generator().manual_seed(i)))
            for i in range(logits.shape[0])]
    return time.perf_counter() - t0, toks


@torch.inference_mode()
def bench_sampling(model, rows: int, rounds: int, top_p: float) -> dict:
    new = sampling.NUCLEUS_CANDIDATES
    dec = BatchDecoder(model, rows)
    dec.add([DecodeRow(list(range(i + 1, i + 33)), 100) for i in range(rows)])
    model_logits = torch.cat([r._logits for r in dec.rows]).float()
    kinds = {"peaked": peaked_logits(rows, model.config.vocab_size, 0), "random-weights": model_logits}
    out, fwd = {}, []
    for kind, logits in kinds.items():
        before, after, same = [], [], True
        for _ in range(rounds):
            tb, a = time_draws(logits, (), top_p)
            ta, b = time_draws(logits, new, top_p)
            before.append(tb)
            after.append(ta)
            same = same and a == b
        out[kind] = {"full_sort_ms": round(1000 * statistics.median(before), 2),
                     "candidates_ms": round(1000 * statistics.median(after), 2),
                     "speedup": round(statistics.median(before) / statistics.median(after), 2),
                     "tokens_identical": same}
    sampling.NUCLEUS_CANDIDATES = new
    for r in dec.rows:
        r._ids.append(0)
    for _ in range(rounds):
        t0 = time.perf_counter()
        dec._forward()
        fwd.append(time.perf_counter() - t0)
    out["forward_pass_ms"] = round(1000 * statistics.median(fwd), 2)
    return out


@torch.inference_mode()
def admission(model, rows: int, long: int, chunk: int | None, new_tokens: int) -> dict:
    """Decode `rows` short rows, admit a `long` prompt after 3 steps; the gaps between the
    running rows' tokens from then until the long row's first token."""
    dec = BatchDecoder(model, rows + 1, prefill_chunk=chunk)
    short = [DecodeRow(list(range(i + 1, i + 17)), new_tokens) for i in range(rows)]
    dec.add(short)
    for _ in range(3):
        dec.step()
    big = DecodeRow([(7 * i) % model.config.vocab_size for i in range(long)], 4)
    gaps, t_admit = [], time.perf_counter()
    last = t_admit
    dec.add([big])
    while not big.tokens and dec.active:
        dec.step()
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    return {"max_gap_ms": round(1000 * max(gaps), 1), "median_gap_ms": round(1000 * statistics.median(gaps), 1),
            "steps_until_long_first_token": len(gaps),
            "long_first_token_ms": round(1000 * (last - t_admit), 1)}


def past_window(preset: str, window: int, new: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(preset, context_length=window)).eval()
    idx = torch.randint(0, model.config.vocab_size, (1, window), generator=torch.Generator().manual_seed(0))
    times = {"sliding (re-encode the window)": [], "context_shift": []}
    for _ in range(rounds):
        for name, shift in (("sliding (re-encode the window)", False), ("context_shift", True)):
            t0 = time.perf_counter()
            generate(model, idx, new, context_shift=shift)
            times[name].append(time.perf_counter() - t0)
    out = {k: {"tokens_per_s": round(new / statistics.median(v), 2)} for k, v in times.items()}
    out["speedup"] = round(statistics.median(times["sliding (re-encode the window)"])
                           / statistics.median(times["context_shift"]), 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-124m", help="model preset (shape only; weights are random)")
    p.add_argument("--rows", type=int, default=32, help="rows of the sampling step")
    p.add_argument("--running", type=int, default=8, help="short rows decoding when the long prompt joins")
    p.add_argument("--long", type=int, default=1000, help="tokens of the prompt that joins")
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk (after)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--window", type=int, default=256, help="context length of the past-the-window run")
    p.add_argument("--past", type=int, default=64, help="new tokens past the window")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own); on a shared, "
                   "oversubscribed machine 1 avoids the thread team waiting at every op for a descheduled peer")
    p.add_argument("--json", help="write here instead of benchmarks/results/decode_gap.json")
    args = p.parse_args()
    load_before = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(args.model)).eval()
    samp = bench_sampling(model, args.rows, args.rounds, args.top_p)
    print("sampling:", samp)
    prefill = {"before (one pass)": [], f"after (chunks of {args.chunk})": []}
    for _ in range(max(1, args.rounds - 1)):  # interleaved: one pass, then chunked, per round
        prefill["before (one pass)"].append(admission(model, args.running, args.long, None, 100))
        prefill[f"after (chunks of {args.chunk})"].append(admission(model, args.running, args.long, args.chunk, 100))
    for k, v in prefill.items():
        print(k, v)
    past = past_window(args.model, args.window, args.past, max(1, args.rounds - 1))
    print("past the window:", past)
    write_result("decode_gap", {
        "args": vars(args), "sampling_32_rows": samp, "chunked_prefill": prefill, "past_the_window": past,
        "torch_threads": torch.get_num_threads(),
        "under_load": {"note": "2-core machine shared with other sessions during the run",
                       "loadavg_at_start": [round(x, 2) for x in load_before],
                       "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
    }, args.json)


if __name__ == "__main__":
    main()
