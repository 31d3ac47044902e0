"""Training throughput and model-FLOPs utilization, ours against the peers, one run.

Forward + backward + AdamW step, random tokens, implementations interleaved round by
round; MFU is reported against this machine's measured fp32 and bf16 matmul peaks. Peers:
transformers' GPT2LMHeadModel (`pip install -e ".[bench]"`) and the book's GPTModel and
GPTModelFast (`pip install --no-deps llms-from-scratch`: its declared dependencies pull in
TensorFlow, which its GPT code never imports), each in fp32 and under bf16 autocast.

    python benchmarks/bench_train.py                       # small 8x256 and gpt2-124m 1x1024
    python benchmarks/bench_train.py --shape small:8:256 --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse

import torch

from harness import TrainShape, bench_training, matmul_peak, print_rows  # benchmarks/harness.py
from llmscratch.kernels import reuse_freed_memory
from results import write_result  # benchmarks/results.py


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", default=None,
                   help="PRESET:BATCH:SEQ (repeatable; default small:8:256 and gpt2-124m:1:1024)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-peers", action="store_true", help="skip the peers (transformers, the book's llms-from-scratch)")
    p.add_argument("--json", help="write the results here instead of benchmarks/results/bench_train.json")
    args = p.parse_args()
    reuse_freed_memory()  # as the CLI's training commands do; LLMSCRATCH_MALLOC=system to compare
    specs = args.shape or ["small:8:256", "gpt2-124m:1:1024"]
    shapes = []
    for s in specs:
        name, b, t = s.split(":")
        shapes.append(TrainShape(name, int(b), int(t)))
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    print(f"matmul peak: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s, {torch.get_num_threads()} threads")
    rows = bench_training(shapes, args.rounds, peers=not args.no_peers, peak_fp32=peak32, peak_bf16=peak16)
    print_rows(rows, f"training step (forward + backward + AdamW), median of {args.rounds}")
    write_result("bench_train", {"rounds": args.rounds, "peak_fp32_gflops": peak32,
                                 "peak_bf16_gflops": peak16, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
