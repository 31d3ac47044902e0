"""End-to-end CLI runs on tiny settings: info, generate, errors, and the library's streaming."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from llmscratch.checkpoints.run import load_model, save_model
from llmscratch.cli import main
from llmscratch.decoding.generate import stream_text
from llmscratch.models.gpt import GPT, GPTConfig
from llmscratch.tokenizer import get_tokenizer


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmscratch", *args], capture_output=True, text=True,
                          timeout=300)


def test_info_prints_gpt2_counts(capsys):
    assert main(["info", "--model", "gpt2-124m"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "163,037,184" in out
    assert "fp32 474.7 MB" in out and "bf16 237.4 MB" in out


def test_generate_from_preset_streams_text():
    r = run("generate", "--model", "tiny", "--prompt", "Hello", "--max-new-tokens", "5", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello") and len(r.stdout) > len("Hello\n")


def test_generate_from_run_folder_is_deterministic(tmp_path):
    torch.manual_seed(0)
    tok = get_tokenizer("gpt2")
    model = GPT(GPTConfig.from_name("tiny", context_length=32))
    save_model(model, tmp_path / "run", tok)
    args = ("generate", "--model", str(tmp_path / "run"), "--prompt", "The", "--max-new-tokens", "8",
            "--temperature", "0.9", "--top-k", "50", "--seed", "3")
    a, b = run(*args), run(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout
    # the CLI's text is exactly the library's
    m, t = load_model(str(tmp_path / "run"))
    lib = "".join(stream_text(m, t, "The", 8, temperature=0.9, top_k=50, seed=3))
    assert a.stdout == "The" + lib + "\n"


def test_long_prompt_warns_and_truncates(tmp_path):
    torch.manual_seed(0)
    save_model(GPT(GPTConfig.from_name("tiny", context_length=16)), tmp_path / "r", get_tokenizer("gpt2"))
    r = run("generate", "--model", str(tmp_path / "r"), "--prompt", "word" * 40, "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr
    assert "warning: prompt of 40 tokens is longer than the context length 16" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args,message", [
    (["generate", "--model", "nope", "--prompt", "x"], "not a preset"),
    (["info", "--model", "/nonexistent/dir"], "not a preset"),
    (["generate", "--model", "tiny", "--prompt", "x", "--device", "cuda:7"], "CUDA is not available"),
    (["generate", "--model", "tiny", "--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens"),
])
def test_user_errors_are_one_line(args, message, capsys):
    if "cuda:7" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and err.count("\n") == 1


def test_not_a_model_folder(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("hi")
    assert main(["generate", "--model", str(tmp_path), "--prompt", "a"]) == 2
    assert "neither an llmscratch run folder nor a Hugging Face" in capsys.readouterr().err


def test_stream_text_waits_for_whole_characters():
    """Byte-level tokens can split a UTF-8 character; the stream never shows half of one."""

    class ByteTok:
        eot_id = 256

        def encode(self, s):
            return list(s.encode())

        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    class Scripted(torch.nn.Module):
        """A fake model that emits the bytes of 'é€' then end-of-text."""

        def __init__(self):
            super().__init__()
            self.script = list("é€".encode()) + [256]
            self.config = GPTConfig(vocab_size=257, context_length=64, n_embd=4, n_layer=1, n_head=1)
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.lm_head = torch.nn.Identity()  # the "hidden states" below are the logits

        def make_kv_caches(self, *a, **k):
            return None

        def hidden_states(self, idx, caches=None, start=0):
            n = idx.shape[1] + start - 1  # tokens generated so far = position - prompt length
            step = max(0, n)
            logits = torch.full((idx.shape[0], 1, 257), -1e9)
            logits[:, :, self.script[min(step, len(self.script) - 1)]] = 0
            return logits

    pieces = list(stream_text(Scripted(), ByteTok(), "a", 10))
    assert "".join(pieces) == "é€"
    assert all("\ufffd" not in p for p in pieces)


def test_bench_quick_writes_json(tmp_path):
    import json

    out = tmp_path / "bench.json"
    r = run("bench", "--quick", "--no-peers", "--what", "train", "generate", "--rounds", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["machine"]["matmul_fp32_gflops"] > 0
    assert {row["impl"] for row in report["train"]} == {"llmscratch fp32", "llmscratch bf16-autocast"}
    assert all(row["tokens_per_s"] > 0 for row in report["generate_batch1"])
    assert report["kernels"] is True and all(row["kernels"] is True for row in report["train"])
    _assert_rows_ran_what_they_name(report["train"])
    for bs in (1, 8):
        _assert_rows_ran_what_they_name(report[f"generate_batch{bs}"], prompt_len=20)
    assert {"llmscratch KV cache fp32", "llmscratch KV cache bf16", "llmscratch KV cache int8"} <= {
        row["impl"] for row in report["generate_batch1"]}


def _assert_rows_ran_what_they_name(rows, prompt_len=None):
    """Each bench row's `ran` (recorded by a hook on the model's first projection during the
    timed call) matches the shape and the precision its `shape` and `impl` name."""
    assert rows
    for r in rows:
        ran, name, shape = r["ran"], r["impl"], r["shape"].split()
        if prompt_len is None:  # training: "PRESET BxT"
            assert (ran["batch"], ran["seq_len"]) == tuple(map(int, shape[-1].split("x"))), r
        else:  # generation: "PRESET batch B"; the first forward is the prefill of the prompt
            assert (ran["batch"], ran["seq_len"]) == (int(shape[-1]), prompt_len), r
        if "int8" in name:
            assert (ran["weight_dtype"], ran["dtype"]) == ("int8", "bfloat16"), r
        elif "bf16" in name:
            assert ran["dtype"] == "bfloat16", r
        else:
            assert "fp32" in name and ran["dtype"] == ran["weight_dtype"] == "float32", r


def _harness(monkeypatch):
    """benchmarks/harness.py of this checkout (the bench harness is not in the package)."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import harness

    return harness


def test_bench_runs_the_peers_on_the_same_shape(monkeypatch):
    # transformers comes with the test extras; the book's package (`pip install --no-deps
    # llms-from-scratch`) is installed by .ci/run. Without it the book's rows go unchecked
    # and the test ends in a skip saying so (under CI=true, a failure).
    import importlib.util

    bench = _harness(monkeypatch)

    book = importlib.util.find_spec("llms_from_scratch") is not None
    rows = bench.bench_training([bench.TrainShape("tiny", 2, 32)], rounds=1)
    impls = {r["impl"] for r in rows}
    assert {"transformers fp32 (sdpa)", "transformers bf16-autocast"} <= impls
    if book:
        assert {"book GPTModel fp32", "book GPTModelFast fp32", "book GPTModelFast bf16-autocast"} <= impls
    assert all(r["tokens_per_s"] > 0 and "vs_fastest_peer" in r for r in rows)
    _assert_rows_ran_what_they_name(rows)

    gen, identical = bench.bench_generation("tiny", 2, prompt_len=5, new_tokens=6, rounds=1)
    assert identical is True  # our greedy tokens equal transformers' on the same weights
    gen_impls = {r["impl"] for r in gen}
    assert {"transformers generate fp32", "transformers generate bf16"} <= gen_impls
    if book:
        assert "book no cache fp32" in gen_impls
    _assert_rows_ran_what_they_name(gen, prompt_len=5)
    if not book:
        pytest.skip("llms-from-scratch is not installed: the book's rows were not checked")
