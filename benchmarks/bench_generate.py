"""Generation speed: llmscratch's KV-cache decoding against transformers' `generate`.

Same random weights (an HF GPT-2 model converted with `load_hf_gpt2`'s logic via
`save_hf_gpt2`/`load_hf_gpt2`), same prompt, greedy decoding, in one process; the
implementations are interleaved round by round so machine noise hits all of them alike.

    python benchmarks/bench_generate.py                 # gpt2-124m shape, batch 1
    python benchmarks/bench_generate.py --batch-size 8 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from llmscratch.generate import generate
from llmscratch.model import GPT, GPTConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-124m", help="model preset (shape only; weights are random)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-uncached", action="store_true", help="skip the slow uncached loop")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    torch.manual_seed(0)
    cfg = GPTConfig.from_name(args.model)
    ours = GPT(cfg).eval()
    runs: dict[str, callable] = {}
    idx = torch.randint(0, cfg.vocab_size, (args.batch_size, args.prompt_len))

    runs["llmscratch (KV cache, fp32)"] = lambda: generate(ours, idx, args.new_tokens)
    ours_bf16 = GPT(cfg).eval()
    ours_bf16.load_state_dict(ours.state_dict())
    ours_bf16.to(torch.bfloat16)
    runs["llmscratch (KV cache, bf16 weights)"] = lambda: generate(ours_bf16, idx, args.new_tokens)
    if not args.no_uncached:
        runs["llmscratch (no cache, fp32)"] = lambda: generate(ours, idx, args.new_tokens, use_cache=False)
    if not args.no_hf:
        from transformers import GPT2LMHeadModel

        from llmscratch.weights import save_hf_gpt2

        with tempfile.TemporaryDirectory() as d:
            save_hf_gpt2(ours, d)
            hf = GPT2LMHeadModel.from_pretrained(d).eval()
        mask = torch.ones_like(idx)

        def run_hf():
            with torch.inference_mode():
                return hf.generate(idx, attention_mask=mask, max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens, do_sample=False,
                                   use_cache=True, pad_token_id=0)

        runs["transformers generate (use_cache, fp32)"] = run_hf
        # same weights, same greedy algorithm: the tokens must agree
        a, b = runs["llmscratch (KV cache, fp32)"](), run_hf()
        print(f"greedy tokens identical to transformers: {torch.equal(a, b)}")

    times: dict[str, list[float]] = {k: [] for k in runs}
    for name, fn in runs.items():  # warm-up
        fn()
    for _ in range(args.rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    n_tok = args.batch_size * args.new_tokens
    result = {k: n_tok / statistics.median(v) for k, v in times.items()}
    ref = result.get("transformers generate (use_cache, fp32)")
    print(f"\n{args.model}, batch {args.batch_size}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads, median of {args.rounds}")
    for k, v in result.items():
        ratio = f"  {v / ref:.2f}x transformers" if ref else ""
        print(f"  {k:42s} {v:8.1f} tokens/s{ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "tokens_per_s": result}, f, indent=2)


if __name__ == "__main__":
    main()
