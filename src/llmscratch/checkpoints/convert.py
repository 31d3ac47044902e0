"""`convert`: a checkpoint from one format to the other, for every family.

The two formats are our run folder (`run.py`: `config.json` + `model.safetensors` +
`tokenizer.json`) and a Hugging Face folder of the model's family (`hf/`: GPT-2, Llama,
Qwen3, Mistral, BERT). Reading goes through `load_run_model` / `load_hf`, writing through
`save_model` / `save_hf`, so this module knows no family: a new one in `hf/` converts as is.

The tokenizer travels with the model. Into a run folder goes the Hugging Face folder's own
(a Llama's `tokenizer.json`, a BERT's `vocab.txt`), else the `llmscratch_tokenizer.json` an
earlier export kept, else GPT-2's. Into a Hugging Face folder goes the run's tokenizer in
the family's own format when it has one (a BERT's `vocab.txt`); otherwise a `tokenizer.json`
+ `tokenizer_config.json` that `transformers.AutoTokenizer` loads with the same ids as ours
(byte-level BPE, GPT-2's, WordPiece: `tokenizer.hf_export`), with `chat_template` (the
Jinja layout the model was tuned on) in the config. The run's own `tokenizer.json` is also
kept as `llmscratch_tokenizer.json`; a word-level tokenizer, which has no `tokenizers`
form, only there (with a warning).

Example::

    convert("checkpoints/gpt2-124m", "runs/gpt2")    # a run folder for `--model runs/gpt2`
    convert("runs/my-finetune", "export/my-gpt2")    # loadable by GPT2LMHeadModel.from_pretrained
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from ..hf.common import CONFIG_FILE, TOKENIZER_COPY
from ..hf.registry import has_hf_tokenizer, is_hf_dir, load_hf, load_hf_tokenizer, save_hf
from ..tokenizer import get_tokenizer, load_tokenizer
from ..tokenizer.base import read_tokenizer_file
from ..tokenizer.hf import HF_TOKENIZER_FILE
from ..tokenizer.hf_export import to_hf_tokenizer
from .run import is_run_dir, load_run_model, read_run_config, save_model

__all__ = ["convert", "staged_folder"]

RUN_TOKENIZER = "tokenizer.json"


def _folder_kind(src: Path) -> str:
    """'run' or 'hf' for a checkpoint folder; a UserError naming what is wrong otherwise."""
    if not src.exists():
        raise UserError(f"{src}: no such folder")
    if not src.is_dir():
        raise UserError(f"{src}: expected a checkpoint folder, got a file")
    if is_run_dir(src):
        return "run"
    if is_hf_dir(src) or (src / CONFIG_FILE).is_file():
        # A config.json that is not ours: let load_hf say exactly what is off with it.
        return "hf"
    raise UserError(
        f"{src}: neither an llmscratch run folder nor a Hugging Face GPT-2 folder "
        f"(no {CONFIG_FILE})"
    )


def _check_dst(dst: Path) -> None:
    if dst.exists():
        if not dst.is_dir():
            raise UserError(f"{dst}: exists and is not a folder")
        if any(dst.iterdir()):
            raise UserError(f"{dst}: folder is not empty; choose a new folder")


@contextlib.contextmanager
def staged_folder(dst: Path) -> Iterator[Path]:
    """Yield a new empty folder beside `dst`; when the block succeeds it becomes `dst`.

    `dst` must be absent or empty. The folder gets a plain `mkdir`'s permissions (not
    `mkdtemp`'s private 0700), and on any error it is removed: `dst` is either the whole
    result or untouched, never half-written.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        yield tmp
        if dst.exists():
            dst.rmdir()  # empty (checked by the caller)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: str | None = None,
            chat_template: str | None = None) -> Path:
    """Convert a checkpoint between a Hugging Face folder and our run folder.

    - Hugging Face -> run: `config.json` + `model.safetensors` + `tokenizer.json` (the
      tokenizer as the module docstring says).
    - run -> Hugging Face: the folder of the model's family (`GPT2LMHeadModel`,
      `LlamaForCausalLM`, `Qwen3ForCausalLM`, a BERT class) that transformers'
      `from_pretrained` loads, with the run's tokenizer (see the module docstring).

    The new folder is written under a temporary name next to `dst` and renamed at the
    end, so an interrupted conversion leaves no half-written `dst`.

    Args:
        src: a Hugging Face folder or an llmscratch run folder (detected).
        dst: the folder to create; it must not exist or be empty.
        to: "hf" or "run" to choose the output format; default the other one from `src`'s.
            The same format as `src` re-writes the checkpoint (e.g. a `pytorch_model.bin`
            folder becomes safetensors).
        chat_template: a Jinja chat template for the Hugging Face folder's
            `tokenizer_config.json` (the CLI passes the run's prompt template,
            `Template.jinja()`); a tokenizer with a template of its own keeps that one.

    Returns:
        `dst` as a Path.

    Raises:
        UserError: a bad `to`, a `src` that is neither kind or does not load, or a
            non-empty `dst`.
    """
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if to is not None and to not in ("hf", "run"):
        raise UserError(f"to={to!r} is not valid; use 'hf' or 'run'")
    kind = _folder_kind(src)
    target = to or ("hf" if kind == "run" else "run")
    _check_dst(dst)

    labels = None  # a classifier's, kept in a Hugging Face config's id2label
    if kind == "run":
        model = load_run_model(src)
        labels = read_run_config(src).get("labels")
        tok_file = src / RUN_TOKENIZER
        tokenizer = load_tokenizer(tok_file) if tok_file.is_file() else get_tokenizer("gpt2")
    else:
        model = load_hf(src)
        tok_file = src / TOKENIZER_COPY
        tokenizer = load_hf_tokenizer(src, gpt2_fallback=True)
    tok_file = tok_file if tok_file.is_file() else None
    if tokenizer.vocab_size > model.config.vocab_size:
        warnings.warn(
            f"{src}: the {tokenizer.name} tokenizer has {tokenizer.vocab_size} ids but the model only "
            f"{model.config.vocab_size}; ids past the model's vocabulary will fail",
            stacklevel=2,
        )

    with staged_folder(dst) as tmp:
        if target == "run":
            save_model(model, tmp, tokenizer, extra={"converted_from": str(src)})
        else:
            save_hf(model, tmp, tokenizer=tokenizer, labels=labels)
            if not has_hf_tokenizer(tmp) and not (tmp / HF_TOKENIZER_FILE).is_file():  # none of the family's own
                exported = to_hf_tokenizer(tokenizer, chat_template)
                if exported is not None:
                    exported.save_hf(tmp)
                elif tok_file is not None:
                    warnings.warn(
                        f"{src}: the model uses a {tokenizer.name} tokenizer, which transformers' AutoTokenizer "
                        f"cannot load; it is kept for llmscratch as {dst / TOKENIZER_COPY}",
                        stacklevel=2,
                    )
                if tok_file is not None:
                    read_tokenizer_file(tok_file)  # one of ours (UserError otherwise)
                    shutil.copyfile(tok_file, tmp / TOKENIZER_COPY)  # ours, exactly, for a convert back
    return dst
