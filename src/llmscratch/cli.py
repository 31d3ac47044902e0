"""The `llmscratch` command line: one thin subcommand per library function.

Every subcommand parses its flags, calls the library, and prints. Mistakes a user can make
arrive as `UserError` and leave as one line on stderr with exit status 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from .errors import UserError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "int8": "int8"}


def _dtype(name: str | None):
    import torch

    if name == "int8":
        return "int8"  # weight-only int8 quantization, see llmscratch.quantize
    return getattr(torch, DTYPES[name]) if name else None


def _add_model_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--model", default=default, required=default is None,
                   help="run folder, Hugging Face GPT-2 folder, or preset name"
                        + (f" (default: {default})" if default else ""))
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: auto)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weights' precision for inference: fp32, bf16, fp16, or int8 (weight-only, "
                        "bf16 activations; fastest on CPU) (default: as stored, fp32)")


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


# ------------------------------------------------------------------------ pretrain
def _add_dataclass_flags(p: argparse.ArgumentParser, cls) -> None:
    """One flag per dataclass field, its help text from the field's metadata. Defaults are
    SUPPRESSed so the command can tell which flags were given (they override --config)."""
    import dataclasses

    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        flag = "--" + f.name.replace("_", "-")
        helptext = f.metadata["help"] + f" (default: {f.default})"
        if f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=helptext)
            continue
        kind = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
        p.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=helptext,
                       choices=f.metadata.get("choices"), metavar=f.name.upper())


def _load_config_file(path: str, cls) -> dict:
    import dataclasses
    import tomllib

    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"--config {path}: not valid TOML ({e})") from None
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k.replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"--config {path}: unknown setting(s) {unknown}; valid: {sorted(names)}")
    return values


def cmd_pretrain(args) -> int:
    """Pretrain a GPT from scratch on a corpus, writing a self-contained run folder."""
    from .train import TrainConfig, pretrain
    from .kernels import reuse_freed_memory

    values = _load_config_file(args.config, TrainConfig) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k not in ("command", "func", "config")})
    try:
        cfg = TrainConfig(**values)
    except TypeError as e:
        raise UserError(f"bad setting: {e}") from None
    reuse_freed_memory()
    result = pretrain(cfg)
    out = result.out
    if result.interrupted:
        print(f"\ninterrupted at step {result.step}: checkpoint saved in {out}; "
              f"continue with --resume --out {out}", file=sys.stderr)
        return 130
    print(f"\ndone: {result.step} steps, {result.tokens_seen:,} tokens; "
          f"validation loss {result.val_loss:.3f} ({result.val_bpb:.3f} bits/byte)")
    if result.sample:
        print(f"\nsample (temperature 0.8, top-k 40):\n{result.sample}\n")
    print(f"run folder:  {out}")
    print(f"checkpoint:  {out / 'model.safetensors'} (+ train_state.safetensors for --resume)")
    print(f"loss plot:   {out / 'loss.png'}")
    print(f"metrics:     {out / 'metrics.jsonl'}")
    print(f"try:         llmscratch generate --model {out} --prompt \"...\"")
    return 0


# ---------------------------------------------------------------------------- eval
def cmd_eval(args) -> None:
    """Loss, perplexity and bits per byte of a model on a dataset or text; or, with the task
    `instruct`, scores of instruction responses (automatic, or 0-100 by a judge endpoint)."""
    if args.task == "instruct":
        from .finetune.commands import cmd_eval_instruct

        return cmd_eval_instruct(args)
    if not args.model or not args.data:
        raise UserError("llmscratch eval needs --model and --data (or: eval instruct --responses FILE)")
    from .checkpoint import load_model
    from .data import load_bin, tokenize_to_bin
    from .datasets import cache_root, load_text
    from .train import evaluate, metrics_from_loss
    from .utils import pick_device

    device = pick_device(args.device)
    model, tokenizer = load_model(args.model, device=device, dtype=_dtype(args.dtype))
    T = min(args.context_length or model.config.context_length, model.config.context_length)
    docs = load_text(args.data, encoding_errors=args.encoding_errors)
    n_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
    ids = load_bin(tokenize_to_bin(docs, tokenizer, cache_root() / "tokens", source=args.data))
    if len(ids) < T + 1:
        raise UserError(f"--data {args.data}: {len(ids)} tokens, fewer than one window of {T} + 1")
    loss = evaluate(model, ids, args.batch_size, T, args.max_batches, device)
    m = metrics_from_loss(loss, n_bytes / len(ids))
    n_windows = (len(ids) - 1) // T
    if args.max_batches:
        n_windows = min(n_windows, args.max_batches * args.batch_size)
    print(f"data         {args.data}: {len(ids):,} tokens ({n_bytes:,} bytes), "
          f"{n_windows} windows of {T}")
    print(f"loss         {m['val_loss']:.4f} nats/token")
    print(f"perplexity   {m['val_ppl']:.2f}")
    print(f"bits/byte    {m['val_bpb']:.4f}")


# ------------------------------------------------------------------ download / convert
def cmd_download(args) -> None:
    """Download OpenAI's GPT-2 weights (Hugging Face format), verify and load-check them."""
    from .hub import download_gpt2

    folder = download_gpt2(args.name, args.out, endpoint=args.endpoint, revision=args.revision)
    print(f"GPT-2 checkpoint ready in {folder}")
    print(f"try: llmscratch generate --model {folder} --prompt \"Hello, I'm a language model,\"")


def cmd_convert(args) -> None:
    """Convert between a Hugging Face GPT-2 folder and an llmscratch run folder."""
    from .hub import convert

    dst = convert(args.src, args.dst, to=args.to)
    print(f"wrote {dst}")


# ----------------------------------------------------------------------------- bench
def cmd_bench(args) -> None:
    """Measure the machine's matmul peak and memory bandwidth, training throughput (with
    MFU), generation speed, tokenizers and peak memory, against the peers that are installed
    (transformers; the book's llms-from-scratch package, installed with `pip install --no-deps`).
    Runs `benchmarks/harness.py` of a source checkout: the harness imports the peers, so it
    is not part of the installed package."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    if not (folder / "harness.py").is_file():
        raise UserError("llmscratch bench runs benchmarks/harness.py from a source checkout of llmscratch "
                        "(git clone, then pip install -e \".[bench]\"); this installation has no benchmarks/ folder")
    sys.path.insert(0, str(folder))  # the harness and its sibling modules, as when run as scripts
    import harness

    harness.run(args)


# ----------------------------------------------------------------------------- serve
def cmd_serve(args) -> None:
    """Serve a model over HTTP: an OpenAI-compatible API (/v1/completions,
    /v1/chat/completions, streaming) and a chat page at /."""
    import os

    from .serve import API_KEY_ENV, serve

    for flag, value in (("--max-concurrency", args.max_concurrency), ("--max-tokens-limit", args.max_tokens_limit),
                        ("--threads", args.threads or 1)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    serve(args.model, host=args.host, port=args.port, max_concurrency=args.max_concurrency,
          max_tokens_limit=args.max_tokens_limit, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
          template=args.template, model_name=args.model_name, device=args.device, dtype=_dtype(args.dtype),
          threads=args.threads)


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

    from .train import TrainConfig

    p = sub.add_parser("pretrain", help="pretrain a GPT from scratch", description=cmd_pretrain.__doc__)
    p.add_argument("--config", help="TOML file of settings (names as below, with _ or -); flags override it")
    _add_dataclass_flags(p, TrainConfig)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("eval", help="loss, perplexity and bits/byte on a dataset; or score instruct responses",
                       description=cmd_eval.__doc__)
    p.add_argument("task", nargs="?", choices=("lm", "instruct"), default="lm",
                   help="lm: language-model loss on --data (default); instruct: score --responses")
    _add_model_args(p, default="")
    p.add_argument("--data", help="dataset name, text file or folder of .txt files (eval lm)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--context-length", type=int, default=None, help="window length (default: the model's)")
    p.add_argument("--max-batches", type=int, default=None, help="evaluate only this many batches")
    p.add_argument("--encoding-errors", choices=("strict", "replace", "ignore"), default="strict")
    from .finetune.commands import add_eval_instruct_args, register as register_finetune

    add_eval_instruct_args(p)
    p.set_defaults(func=cmd_eval)
    register_finetune(sub)  # finetune classify/instruct, classify, chat

    from .hub import gpt2_names

    p = sub.add_parser("download", help="download GPT-2 weights", description=cmd_download.__doc__)
    p.add_argument("name", choices=gpt2_names(), help="which GPT-2")
    p.add_argument("--out", default=None, help="folder (default: the llmscratch cache)")
    p.add_argument("--endpoint", default=None, help="Hub URL (default: $HF_ENDPOINT or huggingface.co)")
    p.add_argument("--revision", default="main")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("convert", help="Hugging Face GPT-2 folder <-> run folder", description=cmd_convert.__doc__)
    p.add_argument("src", help="a Hugging Face GPT-2 folder or an llmscratch run folder")
    p.add_argument("dst", help="new folder to write")
    p.add_argument("--to", choices=("hf", "run"), default=None, help="target format (default: the other one)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("bench", help="speed: machine peak, training MFU, generation", description=cmd_bench.__doc__)
    p.add_argument("--what", nargs="+", choices=("train", "generate", "tokenizer", "memory"),
                   default=["train", "generate", "tokenizer", "memory"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke test")
    p.add_argument("--no-peers", action="store_true", help="skip the peers (transformers, the book's llms-from-scratch)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--no-kernels", dest="kernels", action="store_false",
                   help="measure the plain reference model (llmscratch.kernels not applied)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server and chat page", description=cmd_serve.__doc__)
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-concurrency", type=int, default=4,
                   help="generations running at once; more requests wait in a fair queue (default: 4)")
    p.add_argument("--max-tokens-limit", type=int, default=1024,
                   help="largest max_tokens a request may ask for (default: 1024)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every API call (default: $LLMSCRATCH_API_KEY)")
    p.add_argument("--template", choices=("alpaca", "phi3", "plain"), default=None,
                   help="chat prompt template (default: config.json's \"template\", else plain)")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the folder's name)")
    p.add_argument("--threads", type=int, default=None,
                   help="PyTorch CPU threads (default: cores / max-concurrency, at least 1)")
    p.set_defaults(func=cmd_serve)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)

    warnings.showwarning = one_line_warning
    try:
        code = args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llmscratch generate ... | head`
        return 0
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
