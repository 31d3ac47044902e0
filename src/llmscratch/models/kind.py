"""What a model can do, by kind: the one place that says it.

A model class names its kind (`GPT.kind = DECODER`, `Bert.kind = ENCODER`), and a command
asks the kind rather than testing a flag: `model.kind.require("generate", "generate")`
raises the one-line `UserError` a user sees when they give an encoder to `generate` (or a
decoder to `fill-mask`); `model.kind.can("classify-cls")` picks how a classifier reads the
text.

The uses (`USES`):

| use                   | decoder (GPT, Llama, ...) | encoder (BERT) |
|-----------------------|---------------------------|----------------|
| generate              | continues text: `generate`, the completions server, instruction tuning, DPO | no |
| chat                  | `chat`, the chat page     | no             |
| score                 | next-token loss and log-likelihoods: `eval lm`, `eval tasks` | no |
| fill-mask             | no                        | `fill-mask`    |
| embed                 | no                        | `embed`, `/v1/embeddings` |
| classify-last-token   | a head on the last token's hidden state | no |
| classify-cls          | no                        | a head on the pooled `[CLS]` vector |
| export                | Hugging Face folder (`convert`) | Hugging Face folder (`convert`) |

A new kind (a seq2seq model, say) is one more `ModelKind` here and a `kind` on its class.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

USES = ("generate", "chat", "score", "fill-mask", "embed", "classify-last-token", "classify-cls", "export")
"""Everything a command may ask a kind about (see the module docstring)."""


@dataclass(frozen=True)
class ModelKind:
    """A kind of model and the uses (`USES`) it supports."""

    name: str
    """"decoder" or "encoder\""""
    uses: frozenset[str]
    """what a model of this kind can do"""
    wanted: str
    """how an error names this kind when a command needs it"""
    described: str
    """how an error names a model of this kind that a command cannot use, with what to do instead"""

    def can(self, use: str) -> bool:
        """Whether a model of this kind supports `use` (one of `USES`)."""
        if use not in USES:
            raise ValueError(f"unknown use {use!r}; known: {', '.join(USES)}")
        return use in self.uses

    def require(self, use: str, command: str) -> None:
        """A one-line UserError naming `command` unless this kind supports `use`: which kind
        the command needs, and what this model is."""
        if not self.can(use):
            needed = next(kind for kind in KINDS if use in kind.uses)
            raise UserError(f"{command} needs {needed.wanted}; this model is {self.described}")


DECODER = ModelKind(
    name="decoder",
    uses=frozenset({"generate", "chat", "score", "classify-last-token", "export"}),
    wanted="a decoder (GPT)",
    described="a decoder (GPT)",
)
ENCODER = ModelKind(
    name="encoder",
    uses=frozenset({"fill-mask", "embed", "classify-cls", "export"}),
    wanted=("an encoder (a BERT-style model: `llmscratch pretrain --model bert-tiny`, or a Hugging Face "
            "BERT folder)"),
    described=("an encoder (BERT), which fills in [MASK]s rather than continuing text: use "
               "`llmscratch fill-mask` or `llmscratch embed`"),
)
KINDS = (DECODER, ENCODER)
