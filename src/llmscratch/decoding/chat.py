"""Chat with an instruction-tuned model in the terminal.

`Chat` keeps the conversation, lays it out with the model's prompt template (`prompts`:
the one recorded in its run folder by `finetune instruct`, else the plain transcript, the
same rule `serve` follows) and streams each reply token by token through the decoding
engine (`engine.Engine.stream`), ending it at `<|endoftext|>` or the template's stop strings. The model only sees
`context_length` tokens, so before each reply the oldest exchanges are dropped until the
prompt plus the reply fit the window.

`chat_loop` is the REPL behind `llmscratch chat`: one line is one message, `/reset`
forgets the history, `/exit` (or end of input) quits. It works with piped stdin too
(`echo "Name a fruit." | llmscratch chat --model runs/instruct`).
"""

from __future__ import annotations

import itertools
import re
import sys
from typing import IO, Iterable, Iterator

import torch

from ..errors import UserError
from ..utils import progress_bar
from .engine import Engine
from .prompts import NO_TEMPLATE, Template, encode_conversation, get_template, read_template, template_for
from .sampling import Sampling

HELP = "commands: /reset forgets the conversation, /exit quits"
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n){2,}")  # more than one blank line


def model_kind(model: str) -> str:
    """What `model` (a preset name or a folder) is, for chat and serve: `"random"` (a
    preset: random weights), `"instruct"` (a run folder from `finetune instruct`, which
    records its template, or a model whose default template is a chat format) or `"base"`
    (a pretrained language model: it continues text)."""
    import os

    from ..models.gpt import GPTConfig

    if model in GPTConfig.presets() and not os.path.isdir(model):
        return "random"
    if read_template(model):
        return "instruct"
    try:  # a model whose default template is not the plain transcript was made to chat
        default = template_for(model).name
    except UserError:
        return "base"
    return "base" if default == NO_TEMPLATE else "instruct"


def model_note(model: str, template: str) -> str | None:
    """The one-line warning chat and serve give, once, when `model` was never taught to chat
    (None for an instruction-tuned model)."""
    kind = model_kind(model)
    if kind == "instruct":
        return None
    what = ("a preset with random weights (never trained): its replies are gibberish" if kind == "random" else
            "a base language model, not instruction-tuned: it continues text and was never taught to answer")
    return (f"{model} is {what}. Messages are laid out with the {template} template; for a chat model, "
            "fine-tune it with `llmscratch finetune instruct`.")


class Chat:
    """A conversation with a model: `send(text)` streams the reply, `reset()` starts over.

    Args:
        model / tokenizer: a `GPT` and its tokenizer.
        template: the prompt layout (a `prompts.Template` or its name).
        max_new_tokens: longest reply.
        temperature / top_k / top_p / seed: sampling (temperature 0 = greedy).
        system: a system message replacing the template's default preamble.
        note: a line for the user before the first message (e.g. `model_note`'s warning
            that the model was never instruction-tuned); `chat_loop` prints it once.

    Raises:
        SamplingError: a sampling setting out of range (`sampling.Sampling`).
    """

    def __init__(self, model, tokenizer, template: Template | str, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, system: str | None = None, note: str | None = None):
        self.sampling = Sampling(temperature, top_k, top_p, seed)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.engine = Engine(self.model, tokenizer)
        self.template = get_template(template)
        self.max_new_tokens = max_new_tokens
        self.system = system
        self.note = note
        self.history: list[dict] = []  # user/assistant messages, oldest first
        self.dropped = 0  # exchanges trimmed away for the last prompt

    def reset(self) -> None:
        self.history = []

    def prompt_ids(self, text: str) -> list[int]:
        """The prompt for the reply to `text`: template + as much recent history as fits.

        The window holds the prompt and the reply, so the prompt gets `context_length -
        max_new_tokens` tokens (at least half the window). Whole exchanges are dropped
        oldest first; a single message that is still too long keeps its last tokens.
        """
        ctx = self.model.config.context_length
        budget = ctx - min(self.max_new_tokens, ctx // 2)
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        history = list(self.history)
        self.dropped = 0
        while True:
            messages = system + history + [{"role": "user", "content": text}]
            ids, _ = encode_conversation(self.tokenizer, self.template, messages, for_generation=True)
            if len(ids) <= budget or not history:
                return ids[-budget:]
            history = history[2:]  # one user message and its reply
            self.dropped += 1

    def send(self, text: str) -> Iterator[str]:
        """Stream the reply to `text` as text pieces; the exchange joins the history."""
        engine = self.engine
        row = engine.row(self.prompt_ids(text), self.max_new_tokens, self.sampling, engine.eos_id,
                         self.template.stops)
        parts: list[str] = []
        for piece in engine.stream(row):
            if piece:
                parts.append(piece)
                yield piece
        reply = "".join(parts)
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply.strip()}]


def chat_loop(chat: Chat, stdin: IO[str] | None = None, stdout: IO[str] | None = None,
              stderr: IO[str] | None = None) -> int:
    """Read messages line by line and stream replies until `/exit` or end of input.

    On a terminal each message is typed after a `>>> ` prompt; from a pipe or a file the
    output is a transcript: each message echoed as `>>> message`, its reply below it, and a
    blank line between exchanges, so the replies of several messages stay apart.

    Returns:
        The number of replies given.
    """
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    interactive = stdin.isatty() and stdout.isatty()
    if chat.note:
        print(f"note: {chat.note}", file=stderr)
    if interactive:
        print(f"chatting with the model; {HELP}", file=stderr)
    replies = 0
    while True:
        if interactive:
            stdout.write("\n>>> ")
            stdout.flush()
        line = stdin.readline()
        if not line:  # end of input (Ctrl-D, or the pipe is exhausted)
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            break
        if text == "/reset":
            chat.reset()
            print("(conversation reset)", file=stderr)
            continue
        if text.startswith("/") and text.split()[0] in ("/help", "/?"):
            print(HELP, file=stderr)
            continue
        if not interactive:  # a transcript: each message echoed as the prompt shows it, exchanges apart
            stdout.write(("\n" if replies else "") + f">>> {text}\n")
        pieces = chat.send(text)
        first = next(pieces, "")
        if chat.dropped:
            print(f"(history trimmed: dropped the {chat.dropped} oldest exchange(s) to fit the context)",
                  file=stderr)
        if not _write_trimmed(itertools.chain([first], pieces), stdout):
            print("(no reply: the model wrote only whitespace" +
                  (", as a model never taught to chat often does)" if chat.note else ")"), file=stderr)
        stdout.write("\n")
        stdout.flush()
        replies += 1
    return replies


def _write_trimmed(pieces: Iterable[str], out: IO[str]) -> bool:
    """Stream the reply's pieces to `out` without its leading and trailing whitespace, and
    with runs of blank lines cut to one (a small model can write hundreds of newlines).
    Whitespace is held back until text follows it. Returns whether any text was written."""
    wrote, pending = False, ""
    for piece in pieces:
        if not wrote:
            piece = piece.lstrip()
        text = pending + piece
        body = text.rstrip()
        pending = text[len(body):]
        if body:
            body = _BLANK_LINES.sub("\n\n", body)
            out.write(body)
            out.flush()
            wrote = True
    return wrote


def load_chat(model: str, device=None, template: str | None = None, kernels: bool = True, **kwargs) -> Chat:
    """A `Chat` with the model in `model` (run folder, HF folder or preset) and the template
    recorded in its config.json unless `template` names one (`prompts.template_for`); the
    speed kernels applied unless `kernels=False` (`load_model`). A model that was never
    instruction-tuned gets `model_note`'s warning as the chat's `note`."""
    from ..checkpoints.run import load_model

    chosen = template_for(model, template)  # before loading: a bad name fails fast
    Sampling(kwargs.get("temperature", 0.0), kwargs.get("top_k"), kwargs.get("top_p"))  # fails before loading
    m, tok = load_model(model, device=device, kernels=kernels)
    m.kind.require("chat", "chat")
    kwargs.setdefault("note", model_note(model, chosen.name))
    return Chat(m, tok, chosen, **kwargs)


# ------------------------------------------------------- replies for evaluation
@torch.no_grad()
def respond(model, tokenizer, template: Template, messages: list[dict], max_new_tokens: int = 256,
            temperature: float = 0.0, top_k: int | None = None, seed: int | None = None) -> str:
    """The model's reply to a conversation that ends with a user turn (stops at `<|endoftext|>`),
    decoded alone (`engine.Engine.stream`)."""
    engine = Engine(model, tokenizer)
    ids, _ = encode_conversation(tokenizer, template, messages, for_generation=True)
    ids = ids[-model.config.context_length:]  # the start of a prompt longer than the window cannot be seen anyway
    row = engine.row(ids, max_new_tokens, Sampling(temperature, top_k, None, seed), tokenizer.eot_id)
    with engine.evaluating():
        return "".join(engine.stream(row)).strip()


RESPONSE_BATCH_SIZE = 16
"""Test responses generated at once by `finetune instruct` (`respond_batch`)."""


def respond_batch(model, tokenizer, template: Template, conversations: list[list[dict]],
                  max_new_tokens: int = 256, batch_size: int = RESPONSE_BATCH_SIZE,
                  temperature: float = 0.0, top_k: int | None = None, seed: int | None = None,
                  progress: bool = False) -> list[str]:
    """`respond` to many conversations as one ragged batch (`batching`): at most
    `batch_size` replies are generated at once, and a finished reply's row goes to the next
    conversation. Each reply equals `respond` on its conversation alone (the decoding engine's
    ragged batch, `engine.Engine.run`)."""
    engine, ctx = Engine(model, tokenizer), model.config.context_length
    sampling = Sampling(temperature, top_k, None, seed)
    # the start of a prompt longer than the window cannot be seen anyway: cut it silently
    rows = [engine.row(encode_conversation(tokenizer, template, m, for_generation=True)[0][-ctx:],
                       max_new_tokens, sampling, tokenizer.eot_id) for m in conversations]
    with progress_bar(total=len(rows), desc="test responses", disable=not progress, dynamic_ncols=True) as bar:
        engine.run(rows, batch_size, on_done=lambda _: bar.update(1))
    return [r.text.strip() for r in rows]
