"""Before/after speed of a change, in ONE process: this checkout's model against another
checkout's, step for step, interleaved round by round.

Separate benchmark runs on a shared 2-core machine differ by 10-40% from run to run (the
matmul peak itself moves), far more than a refactor may cost. Interleaving the two versions
in one process, on the same weights and batches, leaves only the difference of the code.
The other checkout's package is imported under another name (`llmscratch_old`), which works
because the package imports itself only relatively.

    git worktree add /tmp/base <commit>
    python benchmarks/compare_commits.py --old /tmp/base --rounds 5

Rows: a training step (forward + backward + fused AdamW; fp32 and bf16 autocast) at `small`
8x256 and `gpt2-124m` 1x1024, and greedy decoding of 200 tokens at gpt2-124m, batch 1 and 8,
with fp32, bf16 and int8 weights. "new" runs with the kernels applied, as the CLI does.

Each decoding row also counts the Python function calls per generated token of each side
(`calls_per_token`, cProfile over 10 and 60 tokens: the difference over 50). Unlike the
speed, that count does not move with the machine's load, so it tells a change in the
per-token work of the code from noise in the timing.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from harness import interleave, ours_train_step  # benchmarks/harness.py
from llmscratch.decoding.generate import generate
from llmscratch.kernels import apply_kernels, reuse_freed_memory
from llmscratch.models.gpt import GPT, GPTConfig
from llmscratch.kernels.quantize import quantize_int8
from results import write_result  # benchmarks/results.py


OLD_CHECKOUT = Path(".")  # set from --old in main()


def import_old(checkout: Path):
    """The other checkout's package, copied to a temp folder as `llmscratch_old`."""
    tmp = Path(tempfile.mkdtemp(prefix="llmscratch-old-"))
    shutil.copytree(checkout / "src" / "llmscratch", tmp / "llmscratch_old")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("llmscratch_old")


def import_first(names: list[str]):
    """The first of `names` that imports (a module that moved between the two checkouts)."""
    for name in names[:-1]:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            pass
    return importlib.import_module(names[-1])


def old_harness(old):
    """The old checkout's benchmarks/harness.py, importing `llmscratch_old` instead of `llmscratch`."""
    import types

    checkout = Path(old.__file__).parent  # the copied package; its harness is read from --old
    source = (OLD_CHECKOUT / "benchmarks" / "harness.py").read_text()
    source = source.replace("from llmscratch.", "from llmscratch_old.").replace(
        "from llmscratch import", "from llmscratch_old import")
    module = types.ModuleType("harness_old")
    module.__file__ = str(checkout / "harness_old.py")
    sys.modules["harness_old"] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def old_config(old, cfg: GPTConfig):
    """`cfg` as the old tree's GPTConfig: the fields it knows (later options, off by default,
    are left out)."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(old.GPTConfig)}
    extra = {k: v for k, v in cfg.to_dict().items() if k not in known}
    assert all(v in (None, False, 0, "gelu", "") for v in extra.values()), f"options the old tree lacks: {extra}"
    return old.GPTConfig(**{k: v for k, v in cfg.to_dict().items() if k in known})


def old_train_step(old, cfg: GPTConfig, B: int, T: int, amp):
    """The old checkout's own training step: its bench's `ours_train_step` where it has one."""
    try:
        bench = importlib.import_module("llmscratch_old.bench")
    except ModuleNotFoundError:  # later trees keep the step in benchmarks/harness.py
        bench = old_harness(old)
    old_cfg = old_config(old, cfg)
    fn = bench.ours_train_step(old_cfg, B, T, amp)
    return fn[0] if isinstance(fn, tuple) else fn


def calls_per_token(fn) -> float:
    """Python function calls per generated token of `fn(n)` (greedy decoding of n tokens)."""
    import cProfile
    import pstats

    counts = []
    for n in (10, 60):
        prof = cProfile.Profile()
        prof.enable()
        fn(n)
        prof.disable()
        counts.append(pstats.Stats(prof).total_calls)
    return (counts[1] - counts[0]) / 50


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", type=Path, required=True, help="the other checkout (a git worktree)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--what", nargs="+", default=["train", "generate"], choices=["train", "generate"])
    p.add_argument("--only", help="run only the cases whose label contains this, e.g. 'small 8x256 bf16'")
    p.add_argument("--new-first", action="store_true",
                   help="run the new version first in each round (the order can favour one side)")
    p.add_argument("--json", help="write the results here instead of benchmarks/results/compare_commits.json")
    args = p.parse_args()
    reuse_freed_memory()  # process-wide: both versions run with the same allocator
    global OLD_CHECKOUT
    OLD_CHECKOUT = args.old
    old = import_old(args.old)
    old_commit = subprocess.run(["git", "-C", str(args.old), "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    new_commit = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
    rows = []

    def record(label: str, tokens: int, fns: dict) -> None:
        if args.new_first:
            fns = {"new": fns["new"], "old": fns["old"]}
        secs = interleave(fns, args.rounds)
        row = {"case": label, "old_tokens_per_s": tokens / secs["old"], "new_tokens_per_s": tokens / secs["new"]}
        row["new_over_old"] = row["new_tokens_per_s"] / row["old_tokens_per_s"]
        rows.append(row)
        print(f"{label:42s} old {row['old_tokens_per_s']:9.1f}  new {row['new_tokens_per_s']:9.1f} tok/s"
              f"   new/old {row['new_over_old']:.3f}", flush=True)

    if "train" in args.what:
        for preset, B, T in (("small", 8, 256), ("gpt2-124m", 1, 1024)):
            cfg = GPTConfig.from_name(preset)
            for amp, name in ((None, "fp32"), (torch.bfloat16, "bf16 autocast")):
                if args.only and args.only not in f"train {preset} {B}x{T} {name}":
                    continue
                new_fn, _ = ours_train_step(cfg, B, T, amp)
                record(f"train {preset} {B}x{T} {name}", B * T,
                       {"old": old_train_step(old, cfg, B, T, amp), "new": new_fn})

    if "generate" in args.what:
        old_generate = old.generate  # the public API: the same name in every layout of the tree
        old_quantize = import_first(["llmscratch_old.kernels.quantize", "llmscratch_old.quantize"]).quantize_int8
        cfg = GPTConfig.from_name("gpt2-124m")
        torch.manual_seed(0)
        ref = GPT(cfg).eval()
        for batch in (1, 8):
            idx = torch.randint(0, cfg.vocab_size, (batch, 20))
            for name in ("fp32", "bf16", "int8"):
                if args.only and args.only not in f"generate gpt2-124m batch {batch} {name}":
                    continue
                new_m = apply_kernels(GPT(cfg).eval())
                old_m = old.GPT(old_config(old, cfg)).eval()
                new_m.load_state_dict(ref.state_dict())
                old_m.load_state_dict(ref.state_dict())
                if name == "bf16":
                    new_m.to(torch.bfloat16), old_m.to(torch.bfloat16)
                elif name == "int8":
                    quantize_int8(new_m), old_quantize(old_m)
                same = torch.equal(generate(new_m, idx, 20), old_generate(old_m, idx, 20))
                record(f"generate gpt2-124m batch {batch} {name}" + ("" if same else " (tokens differ!)"),
                       batch * 200, {"old": lambda m=old_m: old_generate(m, idx, 200),
                                     "new": lambda m=new_m: generate(m, idx, 200)})
                rows[-1]["calls_per_token"] = {
                    "old": calls_per_token(lambda n, m=old_m: old_generate(m, idx, n)),
                    "new": calls_per_token(lambda n, m=new_m: generate(m, idx, n))}
                print(f"{'':42s} Python calls per token: old {rows[-1]['calls_per_token']['old']:.0f}  "
                      f"new {rows[-1]['calls_per_token']['new']:.0f}", flush=True)

    write_result("compare_commits", {"old_commit": old_commit, "new_commit": new_commit,
                                     "rounds": args.rounds, "new_first": args.new_first, "rows": rows},
                 args.json)


if __name__ == "__main__":
    main()
