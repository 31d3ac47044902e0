"""Shared fixtures: data the tests bring themselves, named datasets through the product's own
resolution, an offline environment, and the CI rule that a skip is a failure.

Tests never read `../shared` by path. Core behaviour runs on text the project has (the
embedded `python-docs` corpus) or makes (seeded synthetic sets, below). Tests about the named
files themselves ask for them with `named_dataset(name)`, which resolves them like the
product does (`$LLMSCRATCH_DATA_DIR` -> cache -> download) and skips with a one-line reason
when nothing can supply them. `.ci/run` points `LLMSCRATCH_DATA_DIR` at the shared copy, and
under `CI=true` any skip not on `tests/ci_skip_allowlist.txt` fails the run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Only what the user (or .ci/run) set: never a guessed path next to the clone.
DATA_DIR = os.environ.get("LLMSCRATCH_DATA_DIR") or ""
ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ALLOWLIST = REPO / "tests" / "ci_skip_allowlist.txt"


# --------------------------------------------------------------------------- environment


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory):
    """Point every cache at a temp folder: nothing written to the user's home, no hub."""
    cache = tmp_path_factory.getbasetemp() / "llmscratch-cache"
    monkeypatch.setenv("LLMSCRATCH_CACHE_DIR", str(cache))
    if DATA_DIR:
        monkeypatch.setenv("LLMSCRATCH_DATA_DIR", DATA_DIR)
    else:
        monkeypatch.delenv("LLMSCRATCH_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    torch.manual_seed(0)


# --------------------------------------------------------------------------- named datasets

_resolved: dict[str, Path | str] = {}


@pytest.fixture(scope="session")
def named_dataset(tmp_path_factory):
    """`named_dataset("sms-spam")` -> the file's Path, or a skip naming why it can't be had.

    Resolution is the product's (`llmscratch.data.corpora.dataset_path`): the data folder named
    by the user's `LLMSCRATCH_DATA_DIR` (whatever a test module did to the variable), then
    this session's cache, then a verified download. Offline with no data folder the download
    fails at once (no DNS), and the test skips with that one line.
    """
    from llmscratch.data.corpora import dataset_path
    from llmscratch.errors import UserError

    cache = tmp_path_factory.getbasetemp() / "llmscratch-cache"

    def find(name: str) -> Path | str:
        """The file's Path, or the one-line reason it can't be had."""
        if name not in _resolved:
            with pytest.MonkeyPatch.context() as mp:
                if DATA_DIR:
                    mp.setenv("LLMSCRATCH_DATA_DIR", DATA_DIR)
                else:
                    mp.delenv("LLMSCRATCH_DATA_DIR", raising=False)
                mp.delenv("LLMSCRATCH_DOWNLOAD_BASE", raising=False)
                try:
                    _resolved[name] = dataset_path(name, cache, progress=False)
                except UserError as e:
                    _resolved[name] = str(e).splitlines()[0]
        return _resolved[name]

    def resolve(name: str) -> Path:
        got = find(name)
        if isinstance(got, str):
            pytest.skip(f"dataset {name!r} not available (no LLMSCRATCH_DATA_DIR, no cache, "
                        f"no network): {got}")
        return got

    resolve.find = find
    return resolve


# --------------------------------------------------------------------------- data we make


@pytest.fixture(scope="session")
def docs_text() -> str:
    """The embedded corpus: CPython's language reference (~465 KB), on every machine."""
    from llmscratch.data.corpora import python_docs_text

    return python_docs_text()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder holding a random `tiny` GPT (seed 0) with GPT-2's tokenizer: a model to
    serve, load or damage (copy it first) without training one."""
    import torch

    from llmscratch.checkpoints.run import save_model
    from llmscratch.models.gpt import GPT, GPTConfig
    from llmscratch.tokenizer import get_tokenizer

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("run")
    save_model(GPT(GPTConfig.from_name("tiny")), out, get_tokenizer("gpt2"))
    return out


@pytest.fixture(scope="module")
def untied_tiny_run(tmp_path_factory) -> Path:
    """Like `tiny_run` with an untied head, so greedy text varies from prompt to prompt
    (context 128): the batched server's and the decoder's runs."""
    from llmscratch.checkpoints.run import save_model
    from llmscratch.models.gpt import GPT, GPTConfig
    from llmscratch.tokenizer import get_tokenizer

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("untied-run")
    save_model(GPT(GPTConfig.from_name("tiny", tie_weights=False)), out, get_tokenizer("gpt2"))
    return out


def generate_alone(model, ids: list[int], n: int, eos_id: int, **kw) -> list[int]:
    """The completion the library generates for `ids` by itself (cut at `eos_id`): what a
    batched path must reproduce."""
    from llmscratch import generate

    out = generate(model, torch.tensor([ids]), n, eos_id=eos_id, **kw)[0, len(ids):].tolist()
    return out[: out.index(eos_id)] if eos_id in out else out


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, docs_text) -> Path:
    """A 20 KB slice of the embedded corpus as a text file (the size of the-verdict): small
    enough that tokenizers and tiny training runs take seconds."""
    path = tmp_path_factory.mktemp("corpus") / "docs20k.txt"
    start = docs_text.index("The ")  # skip the module's header lines
    path.write_text(docs_text[start:start + 20_000], encoding="utf-8")
    return path


SPAM_WORDS = ["WIN", "free", "prize", "cash", "claim", "urgent", "txt", "call now", "£1000",
              "ringtone", "offer", "winner", "guaranteed", "reply STOP"]
HAM_WORDS = ["lunch", "see you", "tonight", "mum", "home", "late", "ok", "thanks", "meeting",
             "dinner", "love", "tomorrow", "bus", "sorry"]


def synthetic_sms(n_ham: int = 120, n_spam: int = 40, seed: int = 0) -> list[tuple[str, str]]:
    """A seeded spam/ham set in the shape of the UCI collection: (label, text) rows, ham the
    majority, spam made of advertising words and numbers, ham of everyday words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_ham):
        words = rng.sample(HAM_WORDS, rng.randint(3, 6))
        rows.append(("ham", " ".join(words) + rng.choice([".", "?", "", " :)"])))
    for _ in range(n_spam):
        words = rng.sample(SPAM_WORDS, rng.randint(3, 6))
        rows.append(("spam", " ".join(words) + f" {rng.randint(10000, 99999)}!"))
    rng.shuffle(rows)
    return rows


@pytest.fixture(scope="session")
def sms_tsv(tmp_path_factory) -> Path:
    """The synthetic spam/ham set as a headerless `label<TAB>text` file, like the UCI file."""
    path = tmp_path_factory.mktemp("sms") / "sms.tsv"
    path.write_text("".join(f"{label}\t{text}\n" for label, text in synthetic_sms()), encoding="utf-8")
    return path


INSTRUCTION_RECORDS = [
    {"instruction": "Rewrite the sentence in the past tense.", "input": "I walk to school.",
     "output": "I walked to school."},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {"instruction": "Give the plural of the word.", "input": "mouse", "output": "mice"},
    {"instruction": "Translate to Spanish.", "input": "Thank you", "output": "Gracias"},
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
    {"instruction": "Add the two numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Give an antonym of the word.", "input": "hot", "output": "cold"},
    {"instruction": "Correct the spelling.", "input": "freind", "output": "friend"},
    {"instruction": "Classify the animal as mammal or bird.", "input": "eagle", "output": "bird"},
    {"instruction": "What is 10 divided by 2?", "input": "", "output": "5."},
    {"instruction": "Make the sentence passive.", "input": "The cat chased the mouse.",
     "output": "The mouse was chased by the cat."},
    {"instruction": "Give a synonym of the word.", "input": "big", "output": "large"},
]


def synthetic_instructions(n: int = 200, seed: int = 0) -> list[dict]:
    """A seeded set of Alpaca-style records from a few task templates, each with a checkable
    answer: plurals, antonyms, past tense, sums."""
    rng = random.Random(seed)
    plurals = [("cat", "cats"), ("mouse", "mice"), ("child", "children"), ("box", "boxes"),
               ("leaf", "leaves"), ("city", "cities"), ("foot", "feet"), ("tooth", "teeth")]
    antonyms = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("light", "dark"),
                ("early", "late"), ("happy", "sad"), ("open", "closed"), ("high", "low")]
    past = [("I walk to school.", "I walked to school."), ("She sings well.", "She sang well."),
            ("They eat lunch.", "They ate lunch."), ("We go home.", "We went home.")]
    out = []
    for _ in range(n):
        kind = rng.randrange(4)
        if kind == 0:
            word, answer = rng.choice(plurals)
            out.append({"instruction": "Give the plural of the word.", "input": word, "output": answer})
        elif kind == 1:
            word, answer = rng.choice(antonyms)
            out.append({"instruction": "Give an antonym of the word.", "input": word,
                        "output": f"The opposite of {word} is {answer}."})
        elif kind == 2:
            sentence, answer = rng.choice(past)
            out.append({"instruction": "Rewrite the sentence in the past tense.", "input": sentence,
                        "output": answer})
        else:
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            out.append({"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a + b}."})
    return out


@pytest.fixture(scope="session")
def instruction_json(tmp_path_factory) -> Path:
    """A handful of Alpaca-style instruction records as a JSON file."""
    path = tmp_path_factory.mktemp("instruct") / "instructions.json"
    path.write_text(json.dumps(INSTRUCTION_RECORDS, indent=1), encoding="utf-8")
    return path


def sigterm_after_steps(cli_args: list[str], metrics: Path, steps: int = 3, timeout: float = 120):
    """Run `python -m llmscratch *cli_args`, SIGTERM it once `metrics` has `steps` lines, and
    return `(returncode, stderr)`: what an interrupted run leaves is the caller's to check."""
    proc = subprocess.Popen([sys.executable, "-m", "llmscratch", *cli_args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


# --------------------------------------------------------------------------- CI: no silent skips


def _allowed_skips() -> list[str]:
    """Test-id prefixes allowed to skip in CI, one per line, each with its reason after '#'."""
    if not ALLOWLIST.is_file():
        return []
    out = []
    for line in ALLOWLIST.read_text(encoding="utf-8").splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            out.append(entry)
    return out


_SKIPS: list[tuple[str, str]] = []  # (test id, reason) of every skip this session


def _record_skip(report) -> None:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    _SKIPS.append((report.nodeid, reason))


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _record_skip(report)


def pytest_collectreport(report):
    if report.skipped:  # a whole module skipped at import (module-level importorskip)
        _record_skip(report)


def pytest_sessionfinish(session, exitstatus):
    if not ON_CI:
        return
    allowed = _allowed_skips()
    bad = [(n, r) for n, r in _SKIPS
           if not any(n.startswith(a) for a in allowed)]
    if bad:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"CI=true: {len(bad)} test(s) skipped that are not on {ALLOWLIST.name}:"]
        lines += [f"  {n}: {r}" for n, r in bad]
        if tr is not None:
            tr.write_line("\n".join(lines), red=True)
        else:
            print("\n".join(lines))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
