"""The fine-tuning subcommands of `llmscratch`: `finetune classify`, `finetune instruct`,
`classify`, `chat` and `eval instruct`. Thin: parse flags, call the library, print.

`register(sub)` adds them to the CLI's subparsers; `cli/main.py` calls it once.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import UserError
from .args import SamplingArgs, add_command, add_config_flags, config_from_args, kernel_choice, run_finetune


# The settings of the commands without a library config of their own. Each field is a flag
# (see cli/args.py); the fine-tunes take theirs from ClassifyConfig and InstructConfig.


@dataclass(kw_only=True)
class ChatArgs(SamplingArgs):
    """Settings of `llmscratch chat`."""

    model: str
    """run folder (from finetune instruct), HF folder or preset"""
    template: Literal["alpaca", "phi3", "plain", "model"] | None = None
    """prompt template; model = the tokenizer's own (default: the run folder's config.json, else the
    model's own if it has one, else plain)"""
    system: str | None = None
    """system message (replaces the template's preamble)"""
    max_new_tokens: int = 256
    """longest reply"""
    device: str = "auto"
    """cpu, cuda, cuda:N, mps or auto"""
    kernels: bool = True
    """apply the speed kernels (llmscratch.kernels); --no-kernels runs the plain reference model"""


@dataclass(kw_only=True)
class EvalInstructArgs:
    """Settings of `llmscratch eval instruct` (beside `--model`, `--device`, `--batch-size`)."""

    responses: str | None = None
    """responses.json written by finetune instruct"""
    judge_url: str | None = None
    """OpenAI-compatible API base, e.g. http://localhost:11434/v1"""
    judge_model: str | None = None
    """the judge model's name at --judge-url (e.g. llama3)"""
    template: Literal["alpaca", "phi3", "plain", "model"] | None = None
    """prompt template for the reference loss (default: the model's config.json, else its own, else plain)"""
    scores_out: str | None = None
    """also write all scores to this JSON file"""
    generate: bool = False
    """answer the records' prompts anew with --model (in batches of --batch-size) and score
    those replies instead of the file's"""
    max_new_tokens: int = 256
    """longest reply --generate writes"""


@dataclass(kw_only=True)
class UnlabeledArgs:
    """Settings of `llmscratch finetune unlabeled`: the data and split flags of `finetune classify`."""

    data: str
    """dataset name or .tsv/.csv/.jsonl/.json file of text + label"""
    out: str
    """text file to write (one blank line between texts), e.g. for `llmscratch pretrain --data`"""
    text_column: str | None = None
    """column/field holding the text (default: text; sms-spam: 1)"""
    label_column: str | None = None
    """column/field holding the label (default: label; sms-spam: 0)"""
    format: str | None = None
    """tsv, csv, jsonl or json (default: from the extension)"""
    balance: bool = True
    """as finetune classify --balance"""
    split: str = "0.7,0.1,0.2"
    """as finetune classify --split"""
    split_seed: int = 123
    """as finetune classify --split-seed (its default --seed is 123)"""


# ------------------------------------------------------------------------- commands


def cmd_finetune_unlabeled(args) -> int:
    """Write the texts outside a labeled dataset's validation and test split, without labels."""
    from ..finetune.classify import ClassifyConfig, unlabeled_texts
    from ..utils import atomic_write

    opts = config_from_args(UnlabeledArgs, args)
    cfg = ClassifyConfig(data=opts.data, text_column=opts.text_column, label_column=opts.label_column,
                         format=opts.format, balance=opts.balance, split=opts.split, split_seed=opts.split_seed)
    texts = unlabeled_texts(cfg)
    with atomic_write(Path(opts.out), "w", encoding="utf-8") as f:
        f.write("\n\n".join(texts) + "\n")
    print(f"wrote {len(texts):,} texts of {opts.data} (none from its validation or test split, no labels) "
          f"to {opts.out}")
    return 0


def cmd_finetune_classify(args) -> int:
    """Fine-tune a model into a text classifier (e.g. spam / not spam)."""
    from ..finetune.classify import ClassifyConfig, finetune_classify

    result = run_finetune(finetune_classify, ClassifyConfig, args, "the classifier")
    m = result.metrics
    print(f"train accuracy {100 * m['train_accuracy']:.2f}%  val accuracy {100 * m['val_accuracy']:.2f}%  "
          f"test accuracy {100 * m['test_accuracy']:.2f}%")
    for label, pc in m["per_class"].items():
        print(f"  {label:12s} precision {pc['precision']:.3f}  recall {pc['recall']:.3f}  "
              f"F1 {pc['f1']:.3f}  (support {pc['support']})")
    print(f"classifier: {result.out}  (metrics.json, confusion.png, loss.png)")
    print(f"try:        llmscratch classify --model {result.out} \"some text\"")
    return 130 if result.interrupted else 0


def cmd_finetune_instruct(args) -> int:
    """Instruction-tune a model; writes a run folder and the test set's responses."""
    from ..finetune.instruct import InstructConfig, finetune_instruct

    result = run_finetune(finetune_instruct, InstructConfig, args, "the model")
    m = result.metrics
    if m["val_loss"] is not None:
        print(f"validation loss {m['val_loss']:.4f}")
    print(f"run folder:  {result.out}  (template {m['template']}; metrics.json, loss.png)")
    empty = m.get("n_empty_responses") or 0
    print(f"responses:   {result.out / 'responses.json'} ({m['n_test']} test examples"
          + (f"; {empty} of {m['n_responses']} responses are empty: the model wrote only whitespace, "
             "as greedy decoding of an undertrained model often does; train longer (--epochs, --lr)" if empty
             else "") + ")")
    print(f"try:         llmscratch chat --model {result.out}")
    print(f"             llmscratch eval instruct --responses {result.out / 'responses.json'}")
    return 130 if result.interrupted else 0


def cmd_classify(args) -> None:
    """Print the predicted label and its probability for each text."""
    from ..utils import pick_device
    from ..finetune.classify import classify_texts, load_classifier

    texts = list(args.text)
    if args.file:
        try:
            lines = Path(args.file).read_text(encoding="utf-8").splitlines()
        except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError) as e:
            raise UserError(f"--file {args.file}: cannot read ({e.__class__.__name__})") from None
        texts += [line for line in lines if line.strip()]
    if not texts:
        raise UserError("give a text to classify, or --file FILE with one text per line")
    clf = load_classifier(args.model, pick_device(args.device))
    for text, (label, prob) in zip(texts, classify_texts(clf, texts)):
        shown = text if len(text) <= 60 else text[:57] + "..."
        print(f"{label}\t{prob:.4f}" + (f"\t{shown}" if len(texts) > 1 else ""))


def cmd_chat(args) -> None:
    """Chat with an instruction-tuned model in the terminal (or through a pipe)."""
    from ..decoding.chat import chat_loop, load_chat
    from ..utils import pick_device

    cfg = config_from_args(ChatArgs, args)
    if cfg.max_new_tokens <= 0:
        raise UserError("--max-new-tokens must be positive")
    chat = load_chat(cfg.model, device=pick_device(cfg.device), template=cfg.template,
                     max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                     top_p=cfg.top_p, seed=cfg.seed, system=cfg.system, kernels=kernel_choice(cfg, args))
    chat_loop(chat)


def cmd_eval_instruct(args, common) -> None:
    """Score test-set responses: with a judge endpoint 0-100, else automatic scores.

    `common` holds the settings `eval` shares between its tasks (model, device, batch size)."""
    from ..evaluation.lm import automatic_scores, judge_scores, load_responses, reference_loss
    from ..utils import write_json

    cfg = config_from_args(EvalInstructArgs, args)
    if not cfg.responses:
        raise UserError("llmscratch eval instruct needs --responses FILE (written by finetune instruct)")
    records = load_responses(cfg.responses)
    if cfg.generate:
        records = _generate_responses(records, common, cfg)
    report: dict = {"responses": str(cfg.responses), **automatic_scores(records)}
    print(f"responses    {cfg.responses}: {len(records)} records" + (f", answered anew by {common.model}"
                                                                     if cfg.generate else ""))
    if report["n_empty"]:
        print(f"empty        {report['n_empty']} of {len(records)} responses hold only whitespace (scored 0): "
              "the model wrote nothing")
    print(f"exact match  {100 * report['exact_match']:.2f}%")
    print(f"token F1     {100 * report['token_f1']:.2f}%")
    if common.model:
        from ..checkpoints.run import load_model
        from ..utils import pick_device
        from ..decoding.prompts import template_for

        template = template_for(common.model, cfg.template)
        model, tok = load_model(common.model, device=pick_device(common.device), kernels=common.kernels)
        report.update(reference_loss(model, tok, template, records, batch_size=common.batch_size))
        print(f"ref. loss    {report['ref_loss']:.4f} nats/token (perplexity {report['ref_ppl']:.2f}) "
              f"on {report['ref_tokens']} reference tokens")
    if cfg.judge_url:
        if not cfg.judge_model:
            raise UserError("--judge-url needs --judge-model NAME (the model at that endpoint)")
        judged = judge_scores(records, cfg.judge_url, cfg.judge_model)
        report["judge"] = {"url": cfg.judge_url, "model": cfg.judge_model, **judged}
        if judged["mean"] is None:
            print("judge score  none of the judge's replies held a score 0-100")
        else:
            print(f"judge score  {judged['mean']:.2f} / 100 (mean of {judged['n_scored']} of "
                  f"{len(records)}, judge {cfg.judge_model})")
    if cfg.scores_out:
        write_json(cfg.scores_out, report)
        print(f"wrote {cfg.scores_out}")


def _generate_responses(records: list[dict], common, cfg) -> list[dict]:
    """`eval instruct --generate`: the records with their responses written by --model."""
    from ..checkpoints.run import load_model
    from ..evaluation.lm import generate_responses
    from ..decoding.prompts import template_for
    from ..utils import pick_device

    if not common.model:
        raise UserError("eval instruct --generate needs --model (the model that answers)")
    if cfg.max_new_tokens < 0:
        raise UserError("--max-new-tokens must be >= 0")
    model, tok = load_model(common.model, device=pick_device(common.device), kernels=common.kernels)
    return generate_responses(model, tok, template_for(common.model, cfg.template), records,
                              cfg.max_new_tokens, batch_size=common.batch_size, progress=True)


# ------------------------------------------------------------------------- parsers


def add_eval_instruct_args(p: argparse.ArgumentParser) -> None:
    """The `eval instruct` flags, added to the existing `eval` parser."""
    add_config_flags(p.add_argument_group("eval instruct"), EvalInstructArgs)


def register(sub) -> None:
    """Add `finetune {classify,instruct}`, `classify` and `chat` to the CLI's subparsers."""
    from ..finetune.classify import ClassifyConfig
    from ..finetune.instruct import InstructConfig

    ft = sub.add_parser("finetune", help="fine-tune a model: classify, instruct, dpo (preferences); "
                                         "unlabeled (texts for domain pretraining)",
                        description="Fine-tune a pretrained model. `llmscratch finetune TASK --help` shows "
                                    "a task's options and examples.",
                        epilog="examples:\n"
                               "  llmscratch finetune classify --model gpt2-124m --data sms-spam --out runs/spam\n"
                               "  llmscratch finetune instruct --model gpt2-124m --data alpaca-1100 --out runs/instruct",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ft_sub = ft.add_subparsers(dest="task", metavar="TASK", required=True)

    p = add_command(ft_sub, "classify", cmd_finetune_classify, "text classification (e.g. sms-spam)", [
        "llmscratch finetune classify --model gpt2-124m --data sms-spam --out runs/spam",
        "llmscratch finetune classify --model runs/pretrain --data reviews.csv --text-column review "
        "--label-column stars --trainable lora --lora-rank 8 --out runs/reviews",
    ])
    add_config_flags(p, ClassifyConfig, required=("model", "data", "out"), config_file=True)

    p = add_command(ft_sub, "instruct", cmd_finetune_instruct, "instruction tuning (e.g. alpaca-1100)", [
        "llmscratch finetune instruct --model gpt2-124m --data alpaca-1100 --out runs/instruct",
        "llmscratch finetune instruct --config instruct.toml --epochs 1 --out runs/instruct-1",
    ])
    add_config_flags(p, InstructConfig, required=("model", "data", "out"), config_file=True)
    p = add_command(ft_sub, "unlabeled", cmd_finetune_unlabeled,
                    "write a labeled dataset's texts outside its val/test split, for domain pretraining", [
        "llmscratch finetune unlabeled --data sms-spam --out runs/sms-texts.txt",
        "llmscratch pretrain --data runs/sms-texts.txt --model tiny --out runs/sms-lm",
    ])
    add_config_flags(p, UnlabeledArgs)
    from .dpo import register_dpo

    register_dpo(ft_sub)  # finetune dpo
    from .grpo import register_grpo

    register_grpo(ft_sub)  # finetune grpo

    p = add_command(sub, "classify", cmd_classify, "label texts with a fine-tuned classifier", [
        'llmscratch classify --model runs/spam "You won a prize! Call now"',
        "llmscratch classify --model runs/spam --file messages.txt",
    ])
    p.add_argument("--model", required=True, help="classifier folder written by finetune classify")
    p.add_argument("text", nargs="*", help="text(s) to classify")
    p.add_argument("--file", help="a file with one text per line")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: auto)")

    p = add_command(sub, "chat", cmd_chat, "chat with an instruction-tuned model", [
        "llmscratch chat --model runs/instruct",
        'echo "Name three colors." | llmscratch chat --model runs/instruct --max-new-tokens 64',
    ])
    add_config_flags(p, ChatArgs)
