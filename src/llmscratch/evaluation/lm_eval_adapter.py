"""llmscratch models in EleutherAI's lm-evaluation-harness (`pip install -e ".[eval]"`).

Importing this module registers the model type `llmscratch` with `lm_eval`. The harness
finds no model plugins by itself (lm_eval 0.4's model names are a fixed table in
`lm_eval/models/__init__.py`, with no entry-point discovery), so a bare `lm_eval --model
llmscratch` cannot know ours. The package's `llmscratch-lm-eval` command is lm_eval's own
command line with the model registered first, taking the same arguments:

    llmscratch-lm-eval --model llmscratch --model_args path=runs/instruct \\
        --tasks hellaswag --num_fewshot 0

(`python -m llmscratch.evaluation.lm_eval_adapter ...` is the same command)

or from Python: `lm_eval.simple_evaluate(model=LLMScratchLM(path=...), tasks=[...])`.

`LLMScratchLM` implements the three request types on our model and tokenizer, through the
same code as `llmscratch eval tasks` (`tasks.encode_request`, `tasks.loglikelihoods`,
`tasks.generate_until`), so both harnesses give the same scores on the same task:

- `loglikelihood`: log p(continuation | context) and whether it is the greedy continuation;
- `loglikelihood_rolling`: the log-likelihood of a whole text in windows of the model's
  context length, each predicting new tokens with as much preceding text as fits;
- `generate_until`: greedy continuation cut at the first of the request's stop strings.

`model_args`: `path` (run folder, Hugging Face GPT-2 folder or preset), `device` (auto),
`batch_size` (16), `kernels` (true).
"""

from __future__ import annotations

import sys

from ..errors import UserError
from .tasks import encode_request, generate_until, loglikelihoods

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    HAVE_LM_EVAL = True
except ImportError:  # the [eval] extra is not installed: the module still imports
    HAVE_LM_EVAL = False
    LM = object  # type: ignore[assignment,misc]

    def register_model(*names):  # type: ignore[no-redef]
        return lambda cls: cls

MISSING = 'lm-evaluation-harness is not installed; pip install -e ".[eval]" (or pip install lm-eval)'


def _bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("llmscratch")
class LLMScratchLM(LM):
    """An llmscratch model behind lm_eval's `LM` interface."""

    def __init__(self, path: str = "tiny", device: str = "auto", batch_size: int | str = 16,
                 kernels: bool | str = True, model=None, tokenizer=None, **_ignored) -> None:
        if not HAVE_LM_EVAL:
            raise UserError(MISSING)
        super().__init__()
        from ..checkpoints.run import load_model
        from ..utils import pick_device

        if model is None:
            model, tokenizer = load_model(str(path), device=pick_device(device), kernels=_bool(kernels))
        self.model, self.tok = model.eval(), tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
        return cls.create_from_arg_obj(args, additional_config)

    @classmethod
    def create_from_arg_obj(cls, args: dict, additional_config: dict | None = None):
        import torch

        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k in ("batch_size", "device")}
        if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            extra.pop("device")  # lm_eval's default, cuda:0, on a machine without CUDA: ours picks
        return cls(**{**extra, **args})

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_request(self.tok, *r.args) for r in requests]
        return loglikelihoods(self.model, pairs, self.batch_size)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        L = self.model.config.context_length
        out = []
        for r in requests:
            ids = [self.tok.eot_id] + self.tok.encode(r.args[0], allowed_special="none")
            pieces = []
            for start in range(1, len(ids), L):
                end = min(start + L, len(ids))
                pieces.append((ids[max(0, end - L - 1):start], ids[start:end]))
            out.append(sum(lp for lp, _ in loglikelihoods(self.model, pieces, self.batch_size)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            text = generate_until(self.model, self.tok, context, stop="",
                                  max_new_tokens=int(kwargs.get("max_gen_toks", 64)))
            for s in until:
                text = text.split(s)[0]
            out.append(text)
        return out


def main(argv: list[str] | None = None) -> None:
    """lm_eval's command line, with `--model llmscratch` registered."""
    if not HAVE_LM_EVAL:
        sys.exit(f"error: {MISSING}")
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
