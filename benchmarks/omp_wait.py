"""How the OpenMP threads wait, on a quiet and on a busy machine: decoding and training speed
under libgomp's default wait policy and the alternatives.

PyTorch's CPU wheel runs its parallel regions on GNU OpenMP (libgomp). Between regions a
worker thread spins for a while before it sleeps (`GOMP_SPINCOUNT`, by default about 300k
iterations when the team fits the CPU count). On a machine where other processes want the
same cores, a spinning thread holds a core that the thread the team waits for needs, and
small parallel regions (a decoding step is a hundred matrix-vector products of well under a
millisecond) can each take milliseconds: measured on a 2-core AMD EPYC at load 9, a
768x768 bf16 matrix-vector product took 6-11 ms with 2 threads against 0.26 ms with
`OMP_WAIT_POLICY=PASSIVE`.

Each policy runs in its own process (libgomp reads the variables once, at start-up); the
policies take turns round by round so that a change of load hits them alike. Cases:
greedy decoding of gpt2-124m (random weights, 20-token prompt, batch 1) in fp32, bf16 and
int8 with the kernels as the CLI applies them, and one training step of the 5-minute
recipe's model shape (`mini`, 8 x 256, AdamW).

    python benchmarks/omp_wait.py                       # ~4 minutes
    python benchmarks/omp_wait.py --rounds 1 --tokens 8 --json /tmp/omp.json   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

POLICIES = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spincount 10k": {"GOMP_SPINCOUNT": "10000"},
    "spincount 30k": {"GOMP_SPINCOUNT": "30000"},
    "spincount 100k": {"GOMP_SPINCOUNT": "100000"},
}
CASES = ("decode fp32", "decode bf16", "decode int8", "train mini 8x256")


def child(case: str, tokens: int) -> None:
    """In a fresh process: time `case` and print one JSON line with its speed."""
    import torch

    from llmscratch.decoding.generate import generate
    from llmscratch.kernels import apply_kernels
    from llmscratch.kernels.quantize import quantize_int8
    from llmscratch.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    if case.startswith("decode"):
        cfg = GPTConfig.from_name("gpt2-124m")
        model = apply_kernels(GPT(cfg).eval())
        dtype = case.split()[1]
        if dtype == "bf16":
            model.to(torch.bfloat16)
        elif dtype == "int8":
            quantize_int8(model)
        idx = torch.randint(0, cfg.vocab_size, (1, 20))
        generate(model, idx, 4)  # warm-up (and the kernels' decisions)
        t0 = time.perf_counter()
        generate(model, idx, tokens)
        seconds = time.perf_counter() - t0
        print(json.dumps({"tokens_per_s": tokens / seconds}))
        return
    cfg = GPTConfig.from_name("mini", vocab_size=8192, context_length=256)
    model = apply_kernels(GPT(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.vocab_size, (8, 257))

    def step():
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    t0 = time.perf_counter()
    steps = 3
    for _ in range(steps):
        step()
    print(json.dumps({"steps_per_s": steps / (time.perf_counter() - t0)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=48, help="greedy tokens per decoding sample")
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES)
    p.add_argument("--policies", nargs="*", default=list(POLICIES), choices=list(POLICIES),
                   help="the wait policies to compare (the first is the baseline of the ratios)")
    p.add_argument("--note", help="recorded with the results (e.g. what else ran)")
    p.add_argument("--json", help="write here instead of benchmarks/results/omp_wait.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.tokens)
        return
    from results import write_result  # benchmarks/results.py

    samples: dict[tuple[str, str], list[float]] = {}
    loads = []
    for _ in range(args.rounds):
        for case in args.cases:
            for policy in args.policies:
                env = POLICIES[policy]
                clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
                loads.append(round(os.getloadavg()[0], 2))
                out = subprocess.run([sys.executable, __file__, "--child", case, "--tokens", str(args.tokens)],
                                     env={**clean, **env}, capture_output=True, text=True, check=True).stdout
                value = next(iter(json.loads(out.strip().splitlines()[-1]).values()))
                samples.setdefault((case, policy), []).append(value)
                print(f"{case:18s} {policy:14s} {value:8.2f}", flush=True)
    rows = []
    for case in args.cases:
        base = statistics.median(samples[(case, args.policies[0])])
        for policy in args.policies:
            env = POLICIES[policy]
            med = statistics.median(samples[(case, policy)])
            rows.append({"case": case, "policy": policy, "env": env, "unit": "tokens/s" if case.startswith("decode")
                         else "steps/s", "median": med, "samples": samples[(case, policy)],
                         "vs_first": med / base})
    print("\n| case | " + " | ".join(args.policies) + " |")
    print("|---|" + "---|" * len(args.policies))
    for case in args.cases:
        cells = [f"{r['median']:.1f} ({r['vs_first']:.2f}x)" for r in rows if r["case"] == case]
        print(f"| {case} | " + " | ".join(cells) + " |")
    print(f"load average during the run: {min(loads)}-{max(loads)}")
    write_result("omp_wait", {"rounds": args.rounds, "tokens": args.tokens, "note": args.note,
                              "load_min": min(loads), "load_max": max(loads), "rows": rows}, args.json)


if __name__ == "__main__":
    main()
