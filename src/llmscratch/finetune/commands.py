"""The fine-tuning subcommands of `llmscratch`: `finetune classify`, `finetune instruct`,
`classify`, `chat` and `eval instruct`. Thin: parse flags, call the library, print.

`register(sub)` adds them to the CLI's subparsers; `cli.py` calls it once.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..errors import UserError


def _add_finetune_flags(p: argparse.ArgumentParser, cls) -> None:
    """One flag per config field, with the field's docstring-comment as help."""
    import ast
    import inspect

    from .common import FinetuneConfig

    # Field docs are the string literal right after each field (read from the source, so
    # the help text and the dataclass cannot drift apart).
    docs: dict[str, str] = {}
    for klass in (FinetuneConfig, cls):
        try:
            body = ast.parse(inspect.getsource(klass)).body[0].body
        except (OSError, TypeError):  # no source shipped (e.g. a .pyc-only install): bare help
            continue
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = str(b.value.value)
    skip = {"max_steps", "warmup_steps", "model", "data", "out"}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        doc = docs.get(f.name, "")
        helptext = doc if "default" in doc else f"{doc} (default: {f.default})"
        if f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helptext)
            continue
        kind = {"int": int, "float": float, "int | None": int, "str | None": str}.get(str(f.type), str)
        p.add_argument(flag, type=kind, default=f.default, help=helptext, metavar=f.name.upper())


def _config(cls, args):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


# ------------------------------------------------------------------------- commands


def cmd_finetune_classify(args) -> int:
    """Fine-tune a model into a text classifier (e.g. spam / not spam)."""
    from ..kernels import reuse_freed_memory
    from .classify import ClassifyConfig, finetune_classify

    reuse_freed_memory()
    result = finetune_classify(_config(ClassifyConfig, args))
    m = result.metrics
    if result.interrupted:
        print(f"\ninterrupted after {m['steps']} steps; the classifier as trained so far is in {result.out}",
              file=sys.stderr)
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
    from ..kernels import reuse_freed_memory
    from .instruct import InstructConfig, finetune_instruct

    reuse_freed_memory()
    result = finetune_instruct(_config(InstructConfig, args))
    m = result.metrics
    if result.interrupted:
        print(f"\ninterrupted after {m['steps']} steps; the model as trained so far is in {result.out}",
              file=sys.stderr)
    if m["val_loss"] is not None:
        print(f"validation loss {m['val_loss']:.4f}")
    print(f"run folder:  {result.out}  (template {m['template']}; metrics.json, loss.png)")
    print(f"responses:   {result.out / 'responses.json'} ({m['n_test']} test examples)")
    print(f"try:         llmscratch chat --model {result.out}")
    print(f"             llmscratch eval instruct --responses {result.out / 'responses.json'}")
    return 130 if result.interrupted else 0


def cmd_classify(args) -> None:
    """Print the predicted label and its probability for each text."""
    from ..utils import pick_device
    from .classify import classify_texts, load_classifier

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
    from ..chat import chat_loop, load_chat
    from ..utils import pick_device

    if args.max_new_tokens <= 0:
        raise UserError("--max-new-tokens must be positive")
    chat = load_chat(args.model, device=pick_device(args.device), template=args.template,
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                     top_p=args.top_p, seed=args.seed, system=args.system)
    chat_loop(chat)


def cmd_eval_instruct(args) -> None:
    """Score test-set responses: with a judge endpoint 0-100, else automatic scores."""
    from ..evaluate import automatic_scores, judge_scores, load_responses, reference_loss
    from ..utils import write_json

    if not args.responses:
        raise UserError("llmscratch eval instruct needs --responses FILE (written by finetune instruct)")
    records = load_responses(args.responses)
    report: dict = {"responses": str(args.responses), **automatic_scores(records)}
    print(f"responses    {args.responses}: {len(records)} records")
    print(f"exact match  {100 * report['exact_match']:.2f}%")
    print(f"token F1     {100 * report['token_f1']:.2f}%")
    if args.model:
        from ..checkpoint import load_model
        from ..utils import pick_device
        from ..prompts import template_for

        template = template_for(args.model, args.template)
        model, tok = load_model(args.model, device=pick_device(args.device))
        report.update(reference_loss(model, tok, template, records, batch_size=args.batch_size))
        print(f"ref. loss    {report['ref_loss']:.4f} nats/token (perplexity {report['ref_ppl']:.2f}) "
              f"on {report['ref_tokens']} reference tokens")
    if args.judge_url:
        if not args.judge_model:
            raise UserError("--judge-url needs --judge-model NAME (the model at that endpoint)")
        judged = judge_scores(records, args.judge_url, args.judge_model)
        report["judge"] = {"url": args.judge_url, "model": args.judge_model, **judged}
        if judged["mean"] is None:
            print("judge score  none of the judge's replies held a score 0-100")
        else:
            print(f"judge score  {judged['mean']:.2f} / 100 (mean of {judged['n_scored']} of "
                  f"{len(records)}, judge {args.judge_model})")
    if args.scores_out:
        write_json(args.scores_out, report)
        print(f"wrote {args.scores_out}")


# ------------------------------------------------------------------------- parsers


def add_eval_instruct_args(p: argparse.ArgumentParser) -> None:
    """The `eval instruct` flags, added to the existing `eval` parser."""
    g = p.add_argument_group("eval instruct")
    g.add_argument("--responses", help="responses.json written by finetune instruct")
    g.add_argument("--judge-url", help="OpenAI-compatible API base, e.g. http://localhost:11434/v1")
    g.add_argument("--judge-model", help="the judge model's name at --judge-url (e.g. llama3)")
    g.add_argument("--template", choices=("alpaca", "phi3", "plain"), default=None,
                   help="prompt template for the reference loss (default: the model's config.json, else plain)")
    g.add_argument("--scores-out", help="also write all scores to this JSON file")


def register(sub) -> None:
    """Add `finetune {classify,instruct}`, `classify` and `chat` to the CLI's subparsers."""
    from .classify import ClassifyConfig
    from .instruct import InstructConfig

    ft = sub.add_parser("finetune", help="fine-tune a model: classifier or instruction follower",
                        description="Fine-tune a pretrained model.")
    ft_sub = ft.add_subparsers(dest="task", metavar="TASK", required=True)

    p = ft_sub.add_parser("classify", help="text classification (e.g. sms-spam)",
                          description=cmd_finetune_classify.__doc__)
    p.add_argument("--model", required=True, help="run folder, Hugging Face GPT-2 folder or preset")
    p.add_argument("--data", required=True, help="sms-spam, or a .tsv/.csv/.jsonl/.json file of text + label")
    p.add_argument("--out", required=True, help="folder for the classifier, metrics and plots")
    _add_finetune_flags(p, ClassifyConfig)
    p.set_defaults(func=cmd_finetune_classify)

    p = ft_sub.add_parser("instruct", help="instruction tuning (e.g. alpaca-1100)",
                          description=cmd_finetune_instruct.__doc__)
    p.add_argument("--model", required=True, help="run folder, Hugging Face GPT-2 folder or preset")
    p.add_argument("--data", required=True,
                   help="alpaca-1100, an Alpaca .json/.jsonl, or a chat .jsonl with messages")
    p.add_argument("--out", required=True, help="run folder to write (usable by generate and chat)")
    _add_finetune_flags(p, InstructConfig)
    p.set_defaults(func=cmd_finetune_instruct)

    p = sub.add_parser("classify", help="label texts with a fine-tuned classifier", description=cmd_classify.__doc__)
    p.add_argument("--model", required=True, help="classifier folder written by finetune classify")
    p.add_argument("text", nargs="*", help="text(s) to classify")
    p.add_argument("--file", help="a file with one text per line")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("chat", help="chat with an instruction-tuned model", description=cmd_chat.__doc__)
    p.add_argument("--model", required=True, help="run folder (from finetune instruct), HF folder or preset")
    p.add_argument("--template", choices=("alpaca", "phi3", "plain"), default=None,
                   help="prompt template (default: the run folder's config.json, else plain)")
    p.add_argument("--system", default=None, help="system message (replaces the template's preamble)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_chat)
