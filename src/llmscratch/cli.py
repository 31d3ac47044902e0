"""The `llmscratch` command line: one thin subcommand per library function.

Every subcommand parses its flags, calls the library, and prints. Mistakes a user can make
arrive as `UserError` and leave as one line on stderr with exit status 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from .errors import UserError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _dtype(name: str | None):
    import torch

    return getattr(torch, DTYPES[name]) if name else None


def _add_model_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--model", default=default, required=default is None,
                   help="run folder, Hugging Face GPT-2 folder, or preset name"
                        + (f" (default: {default})" if default else ""))
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: auto)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weights' precision for inference (default: as stored, fp32)")


# ---------------------------------------------------------------------------- info
def cmd_info(args) -> None:
    """Parameter counts and memory of a preset or saved model."""
    from .model import GPT, GPTConfig

    if args.model in GPTConfig.presets():
        import torch

        with torch.device("meta"):  # shapes only: no memory, no init
            model = GPT(GPTConfig.from_name(args.model))
    else:
        from .checkpoint import load_model

        model, _ = load_model(args.model)
    cfg = model.config
    n = model.num_params()
    n_head = model.num_params(count_tied_head=True)
    print(f"model        {args.model}")
    for field, value in cfg.to_dict().items():
        print(f"  {field:14s} {value}")
    print(f"parameters   {n:,}" + (" (LM head tied to the token embedding)" if cfg.tie_weights else ""))
    if cfg.tie_weights:
        print(f"  counting the head separately: {n_head:,}")
    print(f"  without embeddings: {model.num_params(include_embeddings=False):,}")
    print(f"memory       fp32 {n * 4 / 2**20:,.1f} MB   bf16 {n * 2 / 2**20:,.1f} MB")
    print(f"training     {model.flops_per_token() / 1e9:.2f} GFLOP per token at context {cfg.context_length}")


# ------------------------------------------------------------------------ generate
def cmd_generate(args) -> None:
    """Stream a continuation of --prompt to stdout."""
    from .checkpoint import load_model
    from .generate import stream_text
    from .utils import pick_device

    if args.max_new_tokens < 0:
        raise UserError("--max-new-tokens must be >= 0")
    device = pick_device(args.device)
    model, tokenizer = load_model(args.model, device=device, dtype=_dtype(args.dtype), seed=args.seed or 0)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    for piece in stream_text(model, tokenizer, args.prompt, args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             seed=args.seed, stop_at_eos=not args.ignore_eos, device=device):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default: 100)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the nucleus of mass p")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (and a preset's random init)")


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmscratch",
        description="A GPT-style language model built from scratch: pretrain, load GPT-2, "
                    "fine-tune, generate, chat and serve.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="parameter counts and memory of a model", description=cmd_info.__doc__)
    p.add_argument("--model", default="gpt2-124m", help="preset name or model folder (default: gpt2-124m)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="continue a prompt", description=cmd_generate.__doc__)
    _add_model_args(p, default="tiny")
    p.add_argument("--prompt", required=True, help="text to continue")
    _add_sampling_args(p)
    p.add_argument("--ignore-eos", action="store_true", help="keep going past <|endoftext|>")
    p.set_defaults(func=cmd_generate)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)

    warnings.showwarning = one_line_warning
    try:
        args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llmscratch generate ... | head`
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
