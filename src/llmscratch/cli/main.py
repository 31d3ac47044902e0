"""The `llmscratch` command line: one thin subcommand per library function.

Every subcommand parses its flags, calls the library, and prints. Mistakes a user can make
arrive as `UserError` and leave as one line on stderr with exit status 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from typing import Literal

from ..errors import UserError
from .args import (ModelArgs, Parser, SamplingArgs, add_command, add_config_flags, config_from_args,
                   kernel_choice)
from .bench import cmd_bench
from .info import cmd_info
from .pretrain import cmd_consolidate, cmd_pretrain

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "int8": "int8"}


def _dtype(name: str | None):
    import torch

    if name == "int8":
        return "int8"  # weight-only int8 quantization, see llmscratch.kernels.quantize
    return getattr(torch, DTYPES[name]) if name else None


# The settings of the commands that load a model. Each dataclass field is a flag: its type,
# default and the string under it become the flag's parsing, default and help (cli/args.py).
# `ModelArgs` (--model, --device, --dtype) and `SamplingArgs` are shared with cli/finetune.py.


@dataclass(kw_only=True)
class GenerateArgs(SamplingArgs, ModelArgs):
    """Settings of `llmscratch generate`."""

    prompt: str
    """text to continue"""
    ignore_eos: bool = False
    """keep going past <|endoftext|>"""
    context_shift: bool = False
    """past the context window, drop its oldest half once and go on cached (llama.cpp's context
    shift) instead of re-encoding the whole window every token: much faster there, but each
    token then sees between half and all of the window (docs/generation.md)"""


@dataclass(kw_only=True)
class EvalArgs(ModelArgs):
    """Settings of `llmscratch eval` (both tasks)."""

    model: str = ""
    """run folder, Hugging Face GPT-2 folder, or preset name (required for eval lm; for eval
    instruct it adds the reference loss)"""
    data: str | None = None
    """dataset name, text file or folder of .txt files (default: the data the --model run was
    pretrained on, see --split)"""
    split: Literal["auto", "val", "all"] = "auto"
    """which part of --data: val (the tail the run held out from training, as its validation
    loss was measured), all, or auto (val when --data is the run's own training data, else all)"""
    batch_size: int = 8
    """windows (eval lm) or examples (eval instruct) per forward pass"""
    context_length: int | None = None
    """window length (default: the model's)"""
    max_batches: int | None = None
    """evaluate only this many batches (default: all)"""
    progress: bool = True
    """show a progress bar"""
    encoding_errors: Literal["strict", "replace", "ignore"] = "strict"
    """undecodable bytes in local text: strict, replace or ignore"""


@dataclass(kw_only=True)
class ServeArgs(ModelArgs):
    """Settings of `llmscratch serve`."""

    host: str = "127.0.0.1"
    """address to listen on (default: 127.0.0.1, this machine only)"""
    port: int = 8000
    """port"""
    max_concurrency: int = 4
    """with --max-batch-size 1: generations running at once, one thread each; more requests
    wait in a fair queue"""
    max_batch_size: int = 32
    """requests decoded together as one batch (continuous batching; each takes one KV-cache
    slot, n>1 takes n); 1 turns batching off"""
    max_queue: int = 256
    """requests that may wait for a slot; beyond that the server answers 429 with Retry-After"""
    prefill_chunk: int = 256
    """with batching, a prompt longer than this is prefilled this many tokens per decode step, so
    the running requests keep getting tokens while it is read; 0 = the whole prompt in one pass"""
    context_shift: bool = False
    """a request past the context window drops its oldest half once and goes on cached instead of
    re-encoding the whole window every token (faster; changes the tokens past the window)"""
    max_tokens_limit: int = 1024
    """largest max_tokens a request may ask for"""
    api_key: str | None = None
    """require 'Authorization: Bearer KEY' on every API call (default: $LLMSCRATCH_API_KEY)"""
    template: Literal["alpaca", "phi3", "plain", "model"] | None = None
    """chat prompt template; model = the tokenizer's own (default: config.json's "template", else the
    model's own if it has one, else plain)"""
    model_name: str | None = None
    """the model id clients use (default: the folder's name)"""
    threads: int | None = None
    """PyTorch CPU threads (default: all cores when batching, else cores / max-concurrency)"""


def warn_if_untrained(model: str) -> None:
    """Say loudly, once, that a preset name means random weights."""
    from ..decoding.chat import model_kind as kind_of

    if kind_of(model) == "random":
        print(f"warning: --model {model} is a preset with RANDOM weights (never trained): expect gibberish. "
              "Pass a run folder (llmscratch pretrain) or a GPT-2 (llmscratch download gpt2-124m).",
              file=sys.stderr)


# ------------------------------------------------------------------------ generate
def cmd_generate(args) -> None:
    """Stream a continuation of --prompt to stdout. Sampling settings default to what reads
    best from a small model (temperature 0.8, top-k 40; docs/benchmarks.md#decoding-defaults);
    --temperature 0 is greedy."""
    cfg = config_from_args(GenerateArgs, args)
    from ..checkpoints.run import load_model
    from ..decoding.generate import stream_text
    from ..decoding.sampling import Sampling
    from ..utils import pick_device

    if cfg.max_new_tokens < 0:
        raise UserError("--max-new-tokens must be >= 0")
    Sampling(cfg.temperature, cfg.top_k, cfg.top_p)  # a bad setting fails before the model loads
    device = pick_device(cfg.device)
    warn_if_untrained(cfg.model)
    model, tokenizer = load_model(cfg.model, device=device, dtype=_dtype(cfg.dtype), seed=cfg.seed or 0,
                                  kernels=kernel_choice(cfg, args))
    model.kind.require("generate", "generate")
    sys.stdout.write(cfg.prompt)
    sys.stdout.flush()
    for piece in stream_text(model, tokenizer, cfg.prompt, cfg.max_new_tokens,
                             temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                             seed=cfg.seed, stop_at_eos=not cfg.ignore_eos, device=device,
                             context_shift=cfg.context_shift):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


# ---------------------------------------------------------------------------- eval
def cmd_eval(args) -> None:
    """Loss, perplexity and bits per byte of a model on a dataset or text; or, with the task
    `instruct`, scores of instruction responses (automatic, or 0-100 by a judge endpoint)."""
    cfg = config_from_args(EvalArgs, args)
    if args.task == "instruct":
        from .finetune import cmd_eval_instruct

        return cmd_eval_instruct(args, cfg)
    if args.task == "tasks":
        from .tasks import cmd_eval_tasks

        return cmd_eval_tasks(args, cfg)
    if not cfg.model:
        raise UserError("llmscratch eval needs --model (or: eval instruct --responses FILE)")
    from ..checkpoints.run import load_model
    from ..evaluation.lm import evaluate_lm, evaluate_mlm_data, pretraining_data_of
    from ..utils import pick_device

    own = pretraining_data_of(cfg.model)
    data, val_fraction, what = _eval_data(cfg, own)
    device = pick_device(cfg.device)
    warn_if_untrained(cfg.model)
    model, tokenizer = load_model(cfg.model, device=device, dtype=_dtype(cfg.dtype), kernels=cfg.kernels)
    if model.kind.can("fill-mask"):  # an encoder: masked-token loss and accuracy, as its pretraining measured
        r = evaluate_mlm_data(model, tokenizer, data, batch_size=cfg.batch_size, context_length=cfg.context_length,
                              max_batches=cfg.max_batches, encoding_errors=cfg.encoding_errors, device=device,
                              val_fraction=val_fraction, progress=cfg.progress, seed=(own or {}).get("seed", 0),
                              whole_word=(own or {}).get("whole_word_masking", False))
        print(f"data         {data}, {what}: {r['tokens']:,} tokens, {r['windows']} windows of {r['context_length']}")
        print(f"masked-token loss      {r['loss']:.4f} nats/token (15% of tokens masked, seeded as pretraining's)")
        print(f"masked-token accuracy  {100 * r['accuracy']:.2f}%")
        return
    model.kind.require("score", "eval lm (next-token loss)")  # a decoder's command
    r = evaluate_lm(model, tokenizer, data, batch_size=cfg.batch_size, context_length=cfg.context_length,
                    max_batches=cfg.max_batches, encoding_errors=cfg.encoding_errors, device=device,
                    val_fraction=val_fraction, progress=cfg.progress)
    print(f"data         {data}, {what}: {r['tokens']:,} tokens ({r['bytes']:,} bytes), "
          f"{r['windows']} windows of {r['context_length']}")
    print(f"loss         {r['loss']:.4f} nats/token")
    print(f"perplexity   {r['ppl']:.2f}")
    print(f"bits/byte    {r['bpb']:.4f}")


def _eval_data(cfg: EvalArgs, own: dict | None) -> tuple[str, float | None, str]:
    """`(data, val_fraction or None for all of it, a description of what is evaluated)`
    for `eval lm`, from --data/--split and the data the model was pretrained on (`own`)."""
    from ..evaluation.lm import same_data

    data = cfg.data or (own or {}).get("data")
    if not data:
        raise UserError(f"--data is needed: {cfg.model} records no pretraining data of its own "
                        "(give a dataset name, a text file or a folder of .txt files)")
    is_own = own is not None and same_data(data, own["data"])
    split = cfg.split if cfg.split != "auto" else ("val" if is_own else "all")
    if split == "val":
        if not is_own:
            raise UserError(f"--split val: the held-out split is defined for the data {cfg.model} was pretrained "
                            f"on ({own['data'] if own else 'not recorded'}), not {data}; use --split all")
        share = own["val_fraction"]
        return data, share, (f"the validation split (the last {share:.0%} of the tokens, held out from "
                             "training; --split all for the whole text)")
    if is_own:
        return data, None, "all of it, the training part included (--split val for the held-out part only)"
    if own is None:
        return data, None, "all of it (the model records no training data to hold a split out of)"
    return data, None, "all of it (not the data the run was pretrained on)"


# ------------------------------------------------------------------ download / convert
def cmd_download(args) -> None:
    """Download a checkpoint (Hugging Face format: GPT-2, Llama 3.2, Qwen3, SmolLM2), verify
    and load-check it."""
    from ..checkpoints.hub import download_model

    folder = download_model(args.name, args.out, endpoint=args.endpoint, revision=args.revision)
    print(f"{args.name} checkpoint ready in {folder}")
    if args.name.lower().startswith(("bert", "google-bert/")):  # an encoder
        print(f"try: llmscratch fill-mask --model {folder} \"The capital of France is [MASK].\"")
        return
    print(f"try: llmscratch generate --model {folder} --prompt \"Hello, I'm a language model,\"")


def _run_chat_template(src) -> str | None:
    """The Jinja form of the prompt layout a run folder is chatted with (its recorded
    template, else plain), for the exported `tokenizer_config.json`; None for other folders."""
    from ..checkpoints.run import is_run_dir
    from ..decoding.prompts import template_for

    return template_for(src).jinja() if is_run_dir(src) else None


def cmd_convert(args) -> None:
    """Convert between a Hugging Face folder (GPT-2, Llama, Qwen3, Mistral, BERT) and an llmscratch run folder."""
    from ..checkpoints.convert import convert

    dst = convert(args.src, args.dst, to=args.to, chat_template=_run_chat_template(args.src))
    print(f"wrote {dst}")


def cmd_export(args) -> None:
    """Write a run folder or Hugging Face folder (GPT-2, Llama or Qwen3 style decoder) as one
    GGUF file for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile beside it (chat
    template, stop strings, sampling defaults). The file is written under a temporary name
    and renamed when complete."""
    from ..decoding.export import ExportConfig, export

    gguf, modelfile = export(config_from_args(ExportConfig, args))
    print(f"wrote {gguf}")
    if modelfile is not None:
        print(f"wrote {modelfile}")
        print(f"try: ollama create {gguf.stem} -f {modelfile} && ollama run {gguf.stem}")


# ----------------------------------------------------------------------------- serve
def cmd_serve(args) -> None:
    """Serve a model over HTTP: an OpenAI-compatible API (/v1/completions,
    /v1/chat/completions, streaming) and a chat page at /."""
    cfg = config_from_args(ServeArgs, args)
    import os

    from ..serve import API_KEY_ENV, serve

    for flag, value in (("--max-concurrency", cfg.max_concurrency), ("--max-tokens-limit", cfg.max_tokens_limit),
                        ("--threads", cfg.threads or 1), ("--max-batch-size", cfg.max_batch_size)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if cfg.max_queue < 0:
        raise UserError(f"--max-queue must be at least 0, got {cfg.max_queue}")
    if cfg.prefill_chunk < 0:
        raise UserError(f"--prefill-chunk must be at least 0 (0 = off), got {cfg.prefill_chunk}")
    if not 0 <= cfg.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {cfg.port}")
    serve(cfg.model, host=cfg.host, port=cfg.port, max_concurrency=cfg.max_concurrency,
          max_tokens_limit=cfg.max_tokens_limit, api_key=cfg.api_key or os.environ.get(API_KEY_ENV) or None,
          template=cfg.template, model_name=cfg.model_name, device=cfg.device, dtype=_dtype(cfg.dtype),
          threads=cfg.threads, kernels=kernel_choice(cfg, args), max_batch_size=cfg.max_batch_size,
          max_queue=cfg.max_queue, prefill_chunk=cfg.prefill_chunk, context_shift=cfg.context_shift)


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="llmscratch",
        description="Language models built from scratch: GPT-2 and Llama/Qwen-style decoders and a "
                    "BERT-style encoder. Pretrain one, load Hugging Face weights, fine-tune (classifier, "
                    "instructions, DPO), evaluate, generate, chat and serve. `llmscratch COMMAND --help` "
                    "shows a command's options and examples.",
        epilog="examples:\n"
               "  llmscratch pretrain --out runs/pretrain\n"
               "  llmscratch generate --model runs/pretrain --prompt \"The with statement\"\n"
               "  llmscratch finetune instruct --model gpt2-124m --data alpaca-1100 --out runs/instruct\n"
               "  llmscratch chat --model runs/instruct",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = add_command(sub, "info", cmd_info, "parameter counts and memory of a model", [
        "llmscratch info --model gpt2-124m",
        "llmscratch info --model runs/pretrain",
        "llmscratch info --model runs/spam        # a classifier: its labels and head",
    ])
    p.add_argument("--model", default="gpt2-124m",
                   help="preset name, run folder, Hugging Face folder or classifier folder (default: gpt2-124m)")

    p = add_command(sub, "generate", cmd_generate, "continue a prompt", [
        'llmscratch generate --model gpt2-124m --prompt "Hello, I\'m a language model,"',
        'llmscratch generate --model runs/pretrain --prompt "def " --temperature 0.8 --top-k 40 --seed 1',
    ])
    add_config_flags(p, GenerateArgs)

    from ..train import TrainConfig

    p = add_command(sub, "pretrain", cmd_pretrain, "pretrain a model from scratch: a GPT (next token) or an encoder (masked LM)", [
        "llmscratch pretrain --data python-docs --model small --max-steps 240 --out runs/pretrain",
        "llmscratch pretrain --config run.toml --lr 3e-4   # flags override the file",
        "llmscratch pretrain --resume --out runs/pretrain",
        "llmscratch pretrain --model bert-tiny --tokenizer wordpiece:8192 --out runs/bert   # an encoder: masked LM",
        "torchrun --nproc_per_node 8 -m llmscratch pretrain --config recipes/gpt2-124m.toml --strategy fsdp",
    ])
    add_config_flags(p, TrainConfig, config_file=True)

    p = add_command(sub, "consolidate", cmd_consolidate,
                    "write a run's model.safetensors from its sharded (FSDP) checkpoint", [
                        "llmscratch consolidate runs/gpt2-124m",
                        "llmscratch consolidate runs/gpt2-124m --checkpoint runs/gpt2-124m/sharded/step-00001000",
                    ])
    p.add_argument("run", help="run folder of a `pretrain --strategy fsdp` run")
    p.add_argument("--checkpoint", default=None,
                   help="a sharded checkpoint folder (default: the run's latest complete one, RUN/sharded/step-*)")

    p = add_command(sub, "eval", cmd_eval, "held-out loss (lm; an encoder's masked-token loss), zero-/few-shot tasks, "
                    "instruction scores", [
        "llmscratch eval --model runs/pretrain                 # the run's own held-out validation text",
        "llmscratch eval --model runs/pretrain --data notes.txt",
        "llmscratch eval instruct --responses runs/instruct/responses.json --model runs/instruct",
        "llmscratch eval tasks --model runs/pretrain --tasks pattern arithmetic hellaswag.jsonl --shots 0 3",
    ])
    p.usage = ("llmscratch eval [lm] --model MODEL [--data DATA] [--split {auto,val,all}] [options]\n"
               "       llmscratch eval instruct --responses FILE [--model MODEL] [options]\n"
               "       llmscratch eval tasks --model MODEL --tasks TASK [TASK ...] [options]")
    p.add_argument("task", nargs="?", choices=("lm", "instruct", "tasks"), default="lm",
                   help="lm: language-model loss on --data (default); instruct: score --responses; "
                        "tasks: zero-/few-shot scores on --tasks")
    add_config_flags(p, EvalArgs)
    from .finetune import add_eval_instruct_args, register as register_finetune

    add_eval_instruct_args(p)
    from .tasks import add_eval_tasks_args

    add_eval_tasks_args(p)
    register_finetune(sub)  # finetune classify/instruct, classify, chat
    from .encoder import register as register_encoder

    register_encoder(sub)  # fill-mask, embed
    from .prepare import register as register_prepare

    register_prepare(sub)  # prepare: corpus -> token shards

    from ..checkpoints.hub import MODEL_REPOS

    p = add_command(sub, "download", cmd_download, "download GPT-2, Llama 3.2, Qwen3 or SmolLM2 weights", [
        "llmscratch download gpt2-124m",
        "llmscratch download gpt2-355m --out checkpoints/gpt2-medium",
        "llmscratch download Qwen/Qwen3-0.6B",
    ])
    p.add_argument("name", help="which model: " + ", ".join(MODEL_REPOS) + " (or its Hub repository id, "
                   "e.g. Qwen/Qwen3-0.6B)")
    p.add_argument("--out", default=None, help="folder (default: the llmscratch cache)")
    p.add_argument("--endpoint", default=None, help="Hub URL (default: $HF_ENDPOINT or huggingface.co)")
    p.add_argument("--revision", default="main", help="Hub branch, tag or commit (default: main)")

    p = add_command(sub, "convert", cmd_convert, "Hugging Face folder (GPT-2, Llama, Qwen3, Mistral, BERT) <-> run folder", [
        "llmscratch convert runs/instruct runs/instruct-hf            # to Hugging Face format",
        "llmscratch convert checkpoints/gpt2 runs/gpt2 --to run",
        "llmscratch convert checkpoints/qwen3-0.6b runs/qwen3         # with its tokenizer and chat template",
    ])
    p.add_argument("src", help="a Hugging Face folder (gpt2, llama, qwen3, mistral, bert) or an llmscratch run folder")
    p.add_argument("dst", help="new folder to write")
    p.add_argument("--to", choices=("hf", "run"), default=None, help="target format: hf or run (default: the other one)")

    from ..decoding.export import ExportConfig

    p = add_command(sub, "export", cmd_export, "a model as GGUF for llama.cpp / Ollama (+ a Modelfile)", [
        "llmscratch export --model runs/instruct --out instruct.gguf",
        "llmscratch export --model checkpoints/qwen3-0.6b --out qwen3.gguf --dtype q8_0",
        "llmscratch export --model runs/pretrain --out pretrain.gguf --dtype f16 --force",
    ])
    add_config_flags(p, ExportConfig)

    p = add_command(sub, "bench", cmd_bench, "speed: machine peak, training MFU, generation", [
        "llmscratch bench --what train generate --rounds 3",
        "llmscratch bench --quick --no-peers --json bench.json",
    ])
    p.add_argument("--what", nargs="+", choices=("train", "generate", "tokenizer", "memory"),
                   default=["train", "generate", "tokenizer", "memory"],
                   help="what to measure, one or more of train, generate, tokenizer, memory (default: all)")
    p.add_argument("--rounds", type=int, default=3,
                   help="timed rounds per measurement; the median is reported (default: 3)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke test")
    p.add_argument("--no-peers", action="store_true", help="skip the peers (transformers, the book's llms-from-scratch)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: auto)")
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--no-kernels", dest="kernels", action="store_false",
                   help="measure the plain reference model only (llmscratch.kernels not applied)")
    p.add_argument("--kernels", dest="kernels", action="store_const", const="force",
                   help="force every applicable kernel on, without measuring which win "
                        "(default: each where measured faster, beside the reference model)")

    p = add_command(sub, "serve", cmd_serve, "OpenAI-compatible HTTP server and chat page", [
        "llmscratch serve --model runs/instruct --port 8000",
        "llmscratch serve --model runs/instruct --host 0.0.0.0 --api-key KEY --max-batch-size 32 --max-queue 256",
        "curl localhost:8000/v1/completions -d '{\"prompt\": \"Hello\", \"max_tokens\": 20}'",
    ])
    add_config_flags(p, ServeArgs)

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
