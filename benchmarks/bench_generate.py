"""Generation speed: llmscratch's KV-cache decoding against transformers' `generate` and
the book's `generate_text_simple` (when `llms-from-scratch` is installed, without cache).

Same random weights, same prompt, greedy decoding, one process, implementations
interleaved round by round (see `harness.bench_generation`). Each of our KV-cache rows runs
with the kernels as chosen on this machine and beside it the reference model (`no-kernels`
rows): `vs_reference` below 1 would be a kernel that slows decoding; `path` says which path
each shape class took.

    python benchmarks/bench_generate.py                      # gpt2-124m shape, batch 1
    python benchmarks/bench_generate.py --batch-size 8 --json out.json
"""

from __future__ import annotations

import argparse

import torch

from harness import bench_generation, print_paths, print_rows  # benchmarks/harness.py
from llmscratch.kernels import reuse_freed_memory
from llmscratch.kernels.choice import decisions
from results import write_result  # benchmarks/results.py


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-124m", help="model preset (shape only; weights are random)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-uncached", action="store_true", help="skip the slow uncached loop")
    p.add_argument("--no-peers", action="store_true", help="skip the peers (transformers, the book's llms-from-scratch)")
    p.add_argument("--kernels", dest="kernels", action="store_const", const="force", default=True,
                   help="force every applicable kernel on (default: each where measured faster)")
    p.add_argument("--no-kernels", dest="kernels", action="store_false", help="the reference model only")
    p.add_argument("--json", help="write the results here instead of benchmarks/results/bench_generate_batchN.json")
    args = p.parse_args()
    reuse_freed_memory()  # as the CLI's training commands do; LLMSCRATCH_MALLOC=system to compare
    rows, identical = bench_generation(args.model, args.batch_size, args.prompt_len, args.new_tokens,
                                       args.rounds, peers=not args.no_peers, uncached=not args.no_uncached,
                                       kernels=args.kernels)
    if identical is not None:
        print(f"greedy tokens identical to transformers: {identical}")
    print_rows(rows, f"generation: {args.model}, batch {args.batch_size}, prompt {args.prompt_len}, "
                     f"{args.new_tokens} new tokens, {torch.get_num_threads()} threads, median of {args.rounds}")
    print_paths(rows)
    write_result(f"bench_generate_batch{args.batch_size}",
                 {"args": vars(args), "rows": rows, "identical_to_transformers": identical,
                  "kernel_decisions": decisions()}, args.json)


if __name__ == "__main__":
    main()
