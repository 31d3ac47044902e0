"""`llmscratch info`: parameter counts and memory of a preset, a run folder, a Hugging Face
folder or a classifier (an encoder's report is `cli/encoder.py`'s `encoder_info`)."""

from __future__ import annotations


def cmd_info(args) -> None:
    """Parameter counts and memory of a preset, a saved model or a classifier folder."""
    from pathlib import Path

    from ..checkpoints.run import is_run_dir, read_run_config
    from ..models.gpt import GPT, GPTConfig

    # a run folder's config tells a classifier; a Hugging Face folder has none of ours
    run = read_run_config(args.model) if Path(args.model).is_dir() and is_run_dir(args.model) else {}
    if args.model in GPTConfig.presets():
        import torch

        with torch.device("meta"):  # shapes only: no memory, no init
            model = GPT(GPTConfig.from_name(args.model))
    elif run.get("task") == "classify":
        from ..finetune.classify import load_classifier

        # on the CPU: a meta-device copy unties the encoder's MLM decoder and counts it twice
        model, _, labels, max_length = load_classifier(args.model)
    else:
        from ..checkpoints.run import load_model

        model, _ = load_model(args.model)
    if model.kind.can("fill-mask"):  # an encoder (BERT): cli/encoder.py
        from .encoder import encoder_info

        return encoder_info(args.model, model)
    cfg = model.config
    n = model.num_params()
    print(f"model        {args.model}")
    if run.get("task") == "classify":
        print(f"kind         classifier: {len(labels)} labels {labels}, texts cut to {max_length} tokens; "
              f"a head of {model.lm_head.weight.numel() + model.lm_head.bias.numel():,} parameters "
              "on the last token's hidden state")
    else:
        print(f"kind         {model_kind(args.model)}")
    for field, value in cfg.to_dict().items():
        print(f"  {field:14s} {value}" + (f" (the MLP width {cfg.mlp_width})" if field == "intermediate_size"
                                          and not value else ""))
    tied = cfg.tie_weights and model.lm_head.weight is model.wte.weight
    print(f"parameters   {n:,}" + (" (LM head tied to the token embedding)" if tied else ""))
    if tied:
        print(f"  counting the head separately: {model.num_params(count_tied_head=True):,}")
    print(f"  without embeddings: {model.num_params(include_embeddings=False):,}")
    print(f"memory       fp32 {n * 4 / 2**20:,.1f} MB   bf16 {n * 2 / 2**20:,.1f} MB")
    print(f"training     {gflop_text(model.flops_per_token())} per token at context {cfg.context_length}")


def gflop_text(flops: float) -> str:
    """FLOPs in GFLOP with three significant digits (a tiny model's 0.0021, not 0.00)."""
    return f"{flops / 1e9:.3g} GFLOP"


def model_kind(model: str) -> str:
    """One line on what `model` is: random weights (a preset), a base language model, or
    instruction-tuned with its template (`chat.model_kind`)."""
    from ..decoding.chat import model_kind as kind_of
    from ..decoding.prompts import template_for

    kind = kind_of(model)
    if kind == "random":
        return "a preset: random weights, never trained (its text is gibberish)"
    if kind == "instruct":
        return f"instruction-tuned (chat template {template_for(model).name})"
    return "a base language model: it continues text; it was never taught to follow instructions"
