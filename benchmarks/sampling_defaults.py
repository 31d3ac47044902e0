"""Which sampling settings show a small model at its best: greedy against sampling.

For a trained run folder, continue prompts (the README's, plus the starts of windows of the
run's own validation text) under each setting and measure what a reader sees:

- `whitespace_only`: share of continuations with no visible character at all;
- `leading_ws_chars`: mean whitespace characters before the first visible one (blank lines
  a user scrolls past before any text);
- `repeated_4grams`: share of the continuation's token 4-grams that repeat an earlier one
  (greedy decoding of a small model loops);
- `distinct_tokens`: distinct tokens / tokens.

Greedy is deterministic, so it runs once per prompt; each sampling setting runs `--seeds`
seeds per prompt. `llmscratch generate`, `chat` and the chat page take their defaults from
what this shows (README, "Decoding defaults").

    llmscratch pretrain --out runs/pretrain
    python benchmarks/sampling_defaults.py --model runs/pretrain
"""

from __future__ import annotations

import argparse
import sys

import torch

from llmscratch.checkpoints.run import load_model
from llmscratch.data import split_train_val, token_ids
from llmscratch.data.corpora import load_text
from llmscratch.errors import UserError
from llmscratch.evaluation.lm import pretraining_data_of
from llmscratch.decoding.generate import generate
from results import write_result  # benchmarks/results.py

SETTINGS = {
    "greedy": dict(temperature=0.0),
    "t0.8_k40": dict(temperature=0.8, top_k=40),
    "t0.7_p0.95": dict(temperature=0.7, top_p=0.95),
    "t1.0": dict(temperature=1.0),
}


def text_metrics(tokenizer, prompt_len: int, out: list[int]) -> dict:
    new = out[prompt_len:]
    text = tokenizer.decode(new)
    stripped = text.lstrip()
    grams = [tuple(new[i:i + 4]) for i in range(len(new) - 3)]
    return {"whitespace_only": float(not stripped), "leading_ws_chars": float(len(text) - len(stripped)),
            "repeated_4grams": 1 - len(set(grams)) / len(grams) if grams else 0.0,
            "distinct_tokens": len(set(new)) / len(new) if new else 0.0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a pretraining run folder")
    p.add_argument("--prompts", type=int, default=8, help="prompts taken from the validation text")
    p.add_argument("--prompt-tokens", type=int, default=8, help="tokens per validation prompt")
    p.add_argument("--new-tokens", type=int, default=60, help="tokens generated per continuation")
    p.add_argument("--seeds", type=int, default=3, help="seeds per prompt for each sampling setting")
    p.add_argument("--json", help="write the results here instead of benchmarks/results/sampling_defaults.json")
    args = p.parse_args()
    try:
        own = pretraining_data_of(args.model)
        if own is None:
            raise UserError(f"{args.model}: not a pretraining run folder (its config.json names no data)")
        model, tok = load_model(args.model, kernels=True)
        ids, _ = token_ids(load_text(own["data"]), tok, source=own["data"], progress=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    val = split_train_val(ids, own["val_fraction"])[1]
    step = max(1, (len(val) - args.prompt_tokens) // args.prompts)
    prompts = [tok.encode("The with statement")]  # the README's prompt
    prompts += [[int(t) for t in val[i:i + args.prompt_tokens]] for i in range(0, step * args.prompts, step)]
    rows = {}
    for name, sampling in SETTINGS.items():
        seeds = [None] if name == "greedy" else list(range(args.seeds))
        runs = []
        for prompt in prompts:
            for seed in seeds:
                out = generate(model, torch.tensor([prompt]), args.new_tokens, seed=seed, **sampling)
                runs.append(text_metrics(tok, len(prompt), out[0].tolist()))
        rows[name] = {"sampling": sampling, "continuations": len(runs),
                      **{k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}}
        r = rows[name]
        print(f"{name:11s} whitespace-only {r['whitespace_only']:.2f}  leading whitespace {r['leading_ws_chars']:5.1f} "
              f"chars  repeated 4-grams {r['repeated_4grams']:.2f}  distinct tokens {r['distinct_tokens']:.2f}")
        readme = generate(model, torch.tensor([prompts[0]]), args.new_tokens, seed=0, **sampling)
        rows[name]["readme_prompt_sample"] = tok.decode(readme[0].tolist())
    write_result("sampling_defaults", {"settings": vars(args), "data": own["data"], "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
