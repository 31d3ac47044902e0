"""Every speed kernel on vs off on this CPU, and what the measured choice makes of it.

Issue 29: the split matrix-vector linear, tuned on an AMD EPYC without AMX, halved batch-1
fp32 decoding on an Intel Xeon with AMX. Since then each kernel is taken only where
`llmscratch.kernels.choice` measured it faster on the machine at hand. This script re-checks
each kernel against the computation it replaces, at the gpt2-124m shapes:

- the split linear (`split_linear.py`) at 1 and 8 rows, fp32 and bf16 weights, for each
  of GPT-2's five weight shapes, with the weight in cache and read from memory (int8 weights have no split kernel: `Int8Linear` is its own
  path, so the int8 rows only appear in the decoding table);
- blocked attention (`blocked_attention.py`), forward + backward in bf16;
- the fused LM-head loss (`linear_cross_entropy.py`), forward + backward, fp32 and bf16;
- end to end, greedy decoding of gpt2-124m (random weights) at batch 1 and 8 in fp32, bf16
  and int8, with the kernels as the measured choice makes them against the reference model
  (`--no-kernels`), in the same interleaved rounds (`harness.bench_generation`).

Kernel and reference are interleaved round by round in one process and reported as ratios
(reference time / kernel time: above 1 the kernel wins) of the medians and of the best
rounds, with the load average before and after, since the machine may be shared. The
choice's own decisions are measured fresh (a temporary cache folder) and recorded.

    python benchmarks/kernels_onoff.py                  # 3-4 minutes on 2 idle cores
    python benchmarks/kernels_onoff.py --quick          # small shapes, a smoke test
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from results import write_result  # benchmarks/results.py


def on_off(kernel, reference, rounds: int) -> dict:
    """Kernel vs reference, interleaved over `rounds` samples (`choice.time_pair`, as the
    measured choice times them, with more rounds): medians, ratios, and the choice's own
    verdict on these samples (`choice.kernel_wins`)."""
    from llmscratch.kernels.choice import kernel_wins, time_pair

    k, r = time_pair(kernel, reference, rounds)
    k_med, r_med = statistics.median(k), statistics.median(r)
    verdict = kernel_wins(k, r)
    return {"kernel_ms": 1e3 * k_med, "reference_ms": 1e3 * r_med, "speedup_median": r_med / k_med,
            "speedup_best": verdict["speedup"], "speedup_paired_median": verdict["speedup_median"],
            "kernel_wins": verdict["use"]}


def split_rows(rounds: int, quick: bool) -> list[dict]:
    """The split against F.linear per shape, with the weight in cache (the same weight timed
    again and again) and read from memory (cycling through copies twice the last-level cache,
    as in decoding a model bigger than it: how the choice measures such a model)."""
    from llmscratch.kernels.choice import last_level_cache_bytes
    from llmscratch.kernels.split_linear import split_linear

    llc = last_level_cache_bytes()
    C = 64 if quick else 768
    shapes = [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C), (97 if quick else 50257, C)]
    rows = []
    with torch.no_grad():  # decoding
        for dtype in (torch.float32, torch.bfloat16):
            for n in (1, 8):
                for out_f, in_f in shapes:
                    w = torch.randn(out_f, in_f, dtype=dtype)
                    x = torch.randn(n, in_f, dtype=dtype)
                    # as the choice measures a model bigger than the last-level cache: each
                    # call reads the next of copies that together are twice that cache
                    copies = [w] + [w.clone() for _ in range(min(63, -(-2 * llc // (w.numel() * w.element_size())) - 1))]
                    turn = {"k": 0, "r": 0}

                    def cycle(side, fn):
                        turn[side] = (turn[side] + 1) % len(copies)
                        return fn(x, copies[turn[side]])

                    for place, kernel, reference in (
                            ("cache", lambda: split_linear(x, w), lambda: F.linear(x, w)),
                            ("memory", lambda: cycle("k", split_linear), lambda: cycle("r", F.linear))):
                        r = on_off(kernel, reference, rounds)
                        rows.append({"kernel": "split_linear", "dtype": str(dtype)[6:], "rows": n,
                                     "shape": f"{out_f}x{in_f}", "weights_from": place, **r})
    return rows


def attention_rows(rounds: int, quick: bool) -> list[dict]:
    from llmscratch.kernels.blocked_attention import blocked_causal_attention, sdpa_causal

    rows = []
    cases = [(2, 16, 64)] if quick else [(12, 64, 256), (12, 64, 1024), (6, 64, 256)]
    for nh, hs, T in cases:
        qkv = [torch.randn(1, nh, T, hs, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
        g = torch.randn(1, nh, T, hs, dtype=torch.bfloat16)

        def step(attend):
            def run():
                attend(*qkv).backward(g)
                for t in qkv:
                    t.grad = None
            return run

        r = on_off(step(blocked_causal_attention), step(sdpa_causal), rounds)
        rows.append({"kernel": "blocked_attention fwd+bwd", "dtype": "bfloat16", "shape": f"{nh} heads x {hs}, T={T}",
                     **r})
    return rows


def fused_loss_rows(rounds: int, quick: bool) -> list[dict]:
    from llmscratch.kernels.linear_cross_entropy import fused_lm_loss
    from llmscratch.models.gpt import lm_loss

    V, C = (97, 64) if quick else (50257, 768)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for n in ((64,) if quick else (256, 1024)):
            h = torch.randn(1, n, C, dtype=dtype, requires_grad=True)
            w = (0.02 * torch.randn(V, C, dtype=dtype)).requires_grad_()
            y = torch.randint(0, V, (1, n))

            def step(loss_of):
                def run():
                    loss_of().backward()
                    h.grad = w.grad = None
                return run

            r = on_off(step(lambda: fused_lm_loss(h, w, y)), step(lambda: lm_loss(F.linear(h, w), y)), rounds)
            rows.append({"kernel": "fused_lm_loss fwd+bwd", "dtype": str(dtype)[6:], "shape": f"{n} rows x {V}x{C}",
                         **r})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per kernel measurement")
    p.add_argument("--decode-rounds", type=int, default=3, help="interleaved rounds per decoding row")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="small shapes, a smoke test")
    p.add_argument("--json", help="write here instead of benchmarks/results/kernels_onoff.json")
    args = p.parse_args()
    os.environ["LLMSCRATCH_CACHE_DIR"] = tempfile.mkdtemp()  # the choice measured fresh, not cached
    from harness import bench_generation  # benchmarks/harness.py
    from llmscratch.kernels import reuse_freed_memory
    from llmscratch.kernels.choice import decisions, machine

    reuse_freed_memory()
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    report: dict = {"choice_machine_key": machine(), "load_before": load_before}
    report["kernels"] = split_rows(args.rounds, args.quick) + attention_rows(args.rounds, args.quick) \
        + fused_loss_rows(args.rounds, args.quick)
    print(f"kernel on vs off, {torch.get_num_threads()} threads; speed-up = reference time / kernel time")
    for r in report["kernels"]:
        extra = f"{r['dtype']:8s} {('rows ' + str(r['rows'])) if 'rows' in r else '':7s}"
        extra += f" {('from ' + r['weights_from']) if 'weights_from' in r else '':11s}"
        print(f"  {r['kernel']:26s} {extra} {r['shape']:26s} median {r['speedup_median']:.2f}x   "
              f"best {r['speedup_best']:.2f}x   {'kernel wins' if r['kernel_wins'] else 'reference'}")
    name = "kernels_onoff" + ("_quick" if args.quick else "")
    write_result(name, {"args": vars(args), **report}, args.json)  # kept if decoding is interrupted
    preset = "tiny" if args.quick else "gpt2-124m"
    decode = []
    for bs in (1, 8):
        rows, _ = bench_generation(preset, bs, 20, args.new_tokens, args.decode_rounds, peers=False, uncached=False)
        decode += rows
    report["decode"] = decode
    print(f"\ndecoding {preset}, prompt 20, {args.new_tokens} new tokens, kernels as chosen vs --no-kernels")
    for r in decode:
        if "vs_reference" in r:
            used = [k for k, v in r["path"].items() if v.startswith("kernel")]
            print(f"  {r['shape']:20s} {r['impl']:28s} {r['tokens_per_s']:7.1f} tok/s  {r['vs_reference']:.2f}x "
                  f"no-kernels   kernels taken: {len(used)} of {len(r['path'])} shape classes")
    report["decisions"] = decisions()
    report["load_after"] = os.getloadavg()
    report["seconds"] = time.perf_counter() - t_start
    write_result(name, {"args": vars(args), **report}, args.json)


if __name__ == "__main__":
    main()
