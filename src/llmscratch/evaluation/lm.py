"""Evaluating models: a language model's loss on text, and an instruction-tuned model's
test-set responses (`responses.json`).

`evaluate_lm(model, tokenizer, data)`: loss, perplexity and bits per byte on a dataset or
text, prepared exactly as pretraining prepares its validation tail (`llmscratch eval`).

Responses, two ways, as a practitioner would:

- Automatic scores: exact match and a token-overlap F1 between each response and its
  reference output (SQuAD-style: lower-cased words, punctuation and articles removed),
  and, given the model, its loss and perplexity on the reference outputs (response tokens
  only, conditioned on the prompt).
- A judge: a larger model behind any OpenAI-compatible chat endpoint (`POST
  {url}/chat/completions`, e.g. Ollama's or vLLM's) scores each response 0-100 against
  the reference; the mean is the headline number. Plain `urllib`, no SDK.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import torch

from ..data import split_train_val, token_ids
from ..data.corpora import load_text
from ..data.shards import ShardedTokens, is_prepared_dir, open_prepared
from ..data.tokens import tokenizer_fingerprint
from ..errors import UserError
from ..finetune.common import iter_batches
from ..decoding.chat import respond_batch
from ..finetune.instruct import IGNORE_INDEX, collate_instruct
from ..models.gpt import lm_loss
from ..decoding.prompts import encode_conversation
from ..train import evaluate as mean_lm_loss
from ..train import metrics_from_loss


def pretraining_data_of(model: str | os.PathLike) -> dict | None:
    """`{"data", "val_fraction", "seed", "whole_word_masking"}` of the pretraining run in the
    folder `model` (from its config.json), or None for anything else (a preset, a GPT-2
    folder, a fine-tuned run)."""
    from ..checkpoints.run import read_run_config

    if not Path(model).is_dir():
        return None
    try:
        train = read_run_config(model).get("train")
    except UserError:
        return None
    if not isinstance(train, dict) or not isinstance(train.get("data"), str):
        return None
    return {"data": train["data"], "val_fraction": float(train.get("val_fraction", 0.1)),
            "seed": int(train.get("seed", 0)), "whole_word_masking": bool(train.get("whole_word_masking"))}


def same_data(a: str, b: str) -> bool:
    """Whether two `--data` values name the same text: equal names, or paths to the same file."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def evaluate_lm(model, tokenizer, data, *, batch_size: int = 8, context_length: int | None = None,
                max_batches: int | None = None, encoding_errors: str = "strict",
                device: torch.device | None = None, progress: bool = True,
                val_fraction: float | None = None) -> dict:
    """Loss (nats/token), perplexity and bits per byte of a language model on text.

    The text goes through pretraining's own preparation (`load_text`, then `token_ids`:
    tokenized once and cached, `<|endoftext|>` between documents) and pretraining's own
    validation loss (`train.evaluate`, non-overlapping windows in order), so a model
    evaluated on the validation text of its run gets the number its training reported.

    Args:
        model: a `GPT` (or any model mapping ids to logits with a `config.context_length`).
        tokenizer: the model's tokenizer.
        data: a dataset name, a text file or a folder of `.txt` files (as `load_text`
            takes them), or a list of `Document`s or strings.
        batch_size: windows per forward pass.
        context_length: window length, at most the model's (default: the model's).
        max_batches: evaluate only the first this many batches (default: all).
        encoding_errors: undecodable bytes in local text: strict, replace or ignore.
        device: where to run (default: where the model's weights are).
        progress: show progress bars (tokenizing, only the first time: it is cached; and
            evaluating).
        val_fraction: evaluate only the validation tail pretraining holds out with this
            share (`data.split_train_val`), as its validation loss was measured; None: all.

    Returns:
        `{"loss", "ppl", "bpb", "tokens", "bytes", "windows", "context_length"}`.
    """
    device = device if device is not None else next(model.parameters()).device
    T = min(context_length or model.config.context_length, model.config.context_length)
    if isinstance(data, (str, os.PathLike)) and is_prepared_dir(data):  # `llmscratch prepare` shards
        source = str(data)
        ids, bytes_per_token = _prepared_ids(source, tokenizer, held_out=val_fraction is not None)
    else:
        if isinstance(data, (str, os.PathLike)):
            source = str(data)
            data = load_text(source, encoding_errors=encoding_errors)
        else:
            source = None
        ids, bytes_per_token = token_ids(data, tokenizer, source=source, progress=progress)
        if val_fraction is not None:
            ids = split_train_val(ids, val_fraction)[1]
    if len(ids) < T + 1:
        raise UserError(f"--data {source or 'documents'}: {len(ids)} tokens, fewer than one window of {T} + 1")
    loss = mean_lm_loss(model, ids, batch_size, T, max_batches, device, progress=progress)
    m = metrics_from_loss(loss, bytes_per_token)
    n_windows = (len(ids) - 1) // T
    if max_batches:
        n_windows = min(n_windows, max_batches * batch_size)
    return {"loss": m["val_loss"], "ppl": m["val_ppl"], "bpb": m["val_bpb"], "tokens": len(ids),
            "bytes": round(bytes_per_token * len(ids)), "windows": n_windows, "context_length": T}


def evaluate_mlm_data(model, tokenizer, data, *, batch_size: int = 8, context_length: int | None = None,
                      max_batches: int | None = None, encoding_errors: str = "strict",
                      device: torch.device | None = None, progress: bool = True,
                      val_fraction: float | None = None, whole_word: bool = False, seed: int = 0) -> dict:
    """An encoder's masked-token loss (nats/token) and accuracy on text, as its pretraining
    measured them: the same preparation, windows of `[CLS] ... [SEP]`, 15% of the tokens
    selected (80/10/10), masks seeded by (`seed`, batch), so the run's own validation text
    with its seed gives the `val_loss` / `val_mlm_acc` its training reported.

    Returns:
        `{"loss", "accuracy", "masked", "tokens", "windows", "context_length"}`.
    """
    from ..train.mlm import MaskedWindows, MaskingRule, evaluate_mlm

    device = device if device is not None else next(model.parameters()).device
    T = min(context_length or model.config.context_length, model.config.context_length)
    window = T - 2  # room for [CLS] and [SEP]
    source = str(data) if isinstance(data, (str, os.PathLike)) else None
    if source is not None:
        data = load_text(source, encoding_errors=encoding_errors)
    ids, _ = token_ids(data, tokenizer, source=source, progress=progress)
    if val_fraction is not None:
        ids = split_train_val(ids, val_fraction, window)[1]
    if len(ids) < window + 1:
        raise UserError(f"--data {source or 'documents'}: {len(ids)} tokens, fewer than one window of {window} + 1")
    masker = MaskedWindows(tokenizer, MaskingRule(whole_word=whole_word))
    m = evaluate_mlm(model, ids, masker, batch_size, window, max_batches, device, seed=seed)
    n_windows = (len(ids) - 1) // window
    if max_batches:
        n_windows = min(n_windows, max_batches * batch_size)
    return {"loss": m["val_loss"], "accuracy": m["val_mlm_acc"], "tokens": len(ids), "windows": n_windows,
            "context_length": T}


def _prepared_ids(folder: str, tokenizer, held_out: bool):
    """`(ids, bytes per token)` of a prepared folder: its validation shards (`held_out`, the
    documents pretraining held out), or all its shards."""
    data = open_prepared(folder)
    if tokenizer_fingerprint(tokenizer) != data.fingerprint:
        raise UserError(f"--data {folder}: prepared with another tokenizer ({data.manifest['tokenizer']['spec']}) "
                        "than the model's")
    splits = ["val"] if held_out else ["train", "val"]
    parts = [s for s in splits if getattr(data, s) is not None]
    if not parts:
        raise UserError(f"--data {folder}: no validation shards; use --split all")
    ids = ShardedTokens([a for s in parts for a in getattr(data, s).arrays])
    info = data.manifest["splits"]
    return ids, sum(info[s]["bytes"] for s in parts) / max(1, sum(info[s]["tokens"] for s in parts))


def load_responses(path: str | Path) -> list[dict]:
    """The records of a `responses.json` (instruction, input, output, response).

    Raises:
        UserError: missing file, malformed JSON (with line), or a record without fields.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--responses {path}: no such file") from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise UserError(f"--responses {path}: cannot read ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list) or not data:
        raise UserError(f"{path}: expected a non-empty JSON array of response records")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise UserError(f"{path}: record {i + 1} is not an object")
        for key in ("instruction", "output", "response"):
            if not isinstance(rec.get(key), str):
                raise UserError(f"{path}: record {i + 1} has no string field {key!r}")
        if not isinstance(rec.get("input", ""), str):
            raise UserError(f"{path}: record {i + 1}: input must be a string")
    return data


# ---------------------------------------------------------------- automatic scores


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalized texts are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of word precision and recall (multiset overlap of normalized words).

    Example: token_f1("the cat sat", "a cat sat down") -> P 2/2, R 2/3 -> 0.8
    """
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


def automatic_scores(records: list[dict]) -> dict:
    """Mean exact match and token F1 over the records, and how many responses are empty."""
    n = len(records)
    return {
        "n": n,
        "n_empty": sum(not r["response"].strip() for r in records),
        "exact_match": sum(exact_match(r["response"], r["output"]) for r in records) / n,
        "token_f1": sum(token_f1(r["response"], r["output"]) for r in records) / n,
    }


def generate_responses(model, tokenizer, template, records: list[dict], max_new_tokens: int = 256,
                       batch_size: int = 16, progress: bool = False) -> list[dict]:
    """The records with each `"response"` written anew by `model` (greedy), `batch_size`
    conversations at a time as one ragged batch (`decoding.chat.respond_batch`)."""
    replies = respond_batch(model, tokenizer, template, [_messages(r)[:-1] for r in records], max_new_tokens,
                            batch_size, progress=progress)
    return [dict(r, response=reply) for r, reply in zip(records, replies)]


def _messages(rec: dict) -> list[dict]:
    """The conversation a record's reference output answers."""
    context = rec.get("messages") or [{"role": "user", "content": rec["instruction"],
                                       "input": rec.get("input", "")}]
    return list(context) + [{"role": "assistant", "content": rec["output"]}]


@torch.no_grad()
def reference_loss(model, tokenizer, template, records: list[dict], batch_size: int = 8) -> dict:
    """Loss (nats/token) and perplexity of the model on the reference outputs.

    Only response tokens (and their end-of-text) count: the prompt is context. A
    conversation longer than the window loses the start of its prompt.
    """
    device = next(model.parameters()).device
    model.eval()
    keep = model.config.context_length + 1
    encoded = []
    for r in records:
        ids, mask = encode_conversation(tokenizer, template, _messages(r))
        # cut a long prompt from the left: the reference output is what is being scored
        encoded.append((ids[-keep:], mask[-keep:]))
    total, count = 0.0, 0
    for x, y in iter_batches(encoded, batch_size, lambda b: collate_instruct(
            b, tokenizer.eot_id, mask_prompt=True, max_length=model.config.context_length)):
        x, y = x.to(device), y.to(device)
        n = int((y != IGNORE_INDEX).sum())
        if n:
            total += lm_loss(model(x), y).item() * n
            count += n
    if count == 0:
        raise UserError("no reference tokens fit in the model's context window")
    loss = total / count
    return {"ref_loss": loss, "ref_ppl": math.exp(min(loss, 50.0)), "ref_tokens": count}


# -------------------------------------------------------------------------- judge


def judge_prompt(rec: dict) -> str:
    """The question put to the judge for one record."""
    task = rec["instruction"] + (f"\n\nInput:\n{rec['input']}" if rec.get("input", "").strip() else "")
    return (
        "You are grading an assistant's answer to a task.\n\n"
        f"Task:\n{task}\n\n"
        f"Reference answer:\n{rec['output']}\n\n"
        f"Assistant's answer:\n{rec['response']}\n\n"
        "Score the assistant's answer from 0 to 100, where 100 means it is as correct and "
        "helpful as the reference. Reply with the integer score only."
    )


def parse_score(text: str) -> int | None:
    """The first integer 0-100 in a judge's reply ("Score: 85/100" -> 85), or None."""
    for m in re.finditer(r"\d+(?:\.\d+)?", text):
        value = float(m.group())
        if 0 <= value <= 100:
            return int(round(value))
    return None


def ask_judge(url: str, model: str, prompt: str, api_key: str | None = None, timeout: float = 120.0) -> str:
    """One chat completion from an OpenAI-compatible endpoint; returns the reply text.

    Args:
        url: the API base, e.g. `http://localhost:11434/v1` (`/chat/completions` is added).
        model: the judge model's name at that endpoint.
        api_key: sent as a Bearer token when given.

    Raises:
        UserError: the server is unreachable, answers with an HTTP error, or not in the
            OpenAI chat format.
    """
    endpoint = url.rstrip("/") + "/chat/completions"
    body = json.dumps({"model": model, "temperature": 0, "seed": 123,
                       "messages": [{"role": "user", "content": prompt}]}).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            payload = json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        raise UserError(f"--judge-url {endpoint}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"--judge-url {endpoint}: cannot reach the judge ({reason})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"--judge-url {endpoint}: the reply is not JSON") from None
    try:
        return payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise UserError(f"--judge-url {endpoint}: not an OpenAI chat completion reply "
                        "(no choices[0].message.content)") from None


def judge_scores(records: list[dict], url: str, model: str, api_key: str | None = None,
                 progress: bool = True) -> dict:
    """Score every record with the judge.

    Returns:
        `{"scores": [int | None, ...], "mean": mean of the parsed scores, "n_scored": ...}`;
        a reply with no number 0-100 counts as unscored (None), not as 0.
    """
    from ..utils import progress_bar

    api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
    scores = []
    for rec in progress_bar(records, desc="judging", disable=not progress, dynamic_ncols=True):
        scores.append(parse_score(ask_judge(url, model, judge_prompt(rec), api_key)))
    valid = [s for s in scores if s is not None]
    return {"scores": scores, "mean": sum(valid) / len(valid) if valid else None, "n_scored": len(valid)}
