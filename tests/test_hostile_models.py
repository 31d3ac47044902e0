"""Hand-made, hostile model folders through the command line: each is one line on stderr
starting "error:" and exit status 2, never a traceback, a hang or a huge allocation.

And the sampling settings that pass the range check but underflow in float32 (top_p 1e-50,
temperature 1e-300): they sample the likeliest token instead of failing.
"""

from __future__ import annotations

import json
import struct
import time

import pytest
import torch

from llmscratch import GPT, GPTConfig, get_tokenizer
from llmscratch.cli.main import main
from llmscratch.hf.registry import save_hf
from llmscratch.models.bert import Bert, BertConfig
from llmscratch.models.configs import MAX_LAYERS, MAX_PARAMS

TOK = get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


def copy_of(run, tmp_path, name="bad"):
    dst = tmp_path / name
    dst.mkdir()
    for f in run.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def one_line_error(capsys, argv, match: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    assert match in err, err
    return err


COMMANDS = [["info", "--model"], ["generate", "--prompt", "hi", "--max-new-tokens", "1", "--model"],
            ["convert", "--to", "hf", "{out}"]]


def each_command(capsys, folder, tmp_path, match):
    for cmd in COMMANDS:
        if cmd[0] == "convert":
            argv = ["convert", str(folder), str(tmp_path / "converted"), "--to", "hf"]
        else:
            argv = cmd + [str(folder)]
        one_line_error(capsys, argv, match)
        assert not (tmp_path / "converted").exists()  # nothing half-written


@pytest.mark.parametrize("damage", ["half", "20 bytes", "header of 2^60"])
def test_a_truncated_safetensors_in_a_run_folder(run, tmp_path, capsys, damage):
    bad = copy_of(run, tmp_path)
    data = (run / "model.safetensors").read_bytes()
    data = {"half": data[: len(data) // 2], "20 bytes": data[:20],
            "header of 2^60": struct.pack("<Q", 2**60) + data[8:]}[damage]
    (bad / "model.safetensors").write_bytes(data)
    each_command(capsys, bad, tmp_path, "not a readable safetensors file")


def edit_config(folder, **fields):
    p = folder / "config.json"
    cfg = json.loads(p.read_text())
    cfg["model"].update(fields)
    p.write_text(json.dumps(cfg))


def test_a_million_layers_is_refused_at_once(run, tmp_path, capsys):
    bad = copy_of(run, tmp_path)
    edit_config(bad, n_layer=1_000_000)
    t0 = time.monotonic()
    each_command(capsys, bad, tmp_path, f"over the limit of {MAX_LAYERS} layers")
    assert time.monotonic() - t0 < 30  # it used to build modules until memory ran out


@pytest.mark.parametrize("n_embd, match", [(10**9, "over the limit of"),  # 2.4e19 parameters
                                           (1e9, "must be a positive integer"),  # JSON's 1e9 is a float
                                           (2**16, "more than this machine's")])  # 100B+: no machine here
def test_an_impossible_width_is_one_line(run, tmp_path, capsys, n_embd, match, monkeypatch):
    import llmscratch.utils as utils

    monkeypatch.setattr(utils, "physical_memory", lambda: 64 * 2**30)  # the same on every machine
    bad = copy_of(run, tmp_path)
    edit_config(bad, n_embd=n_embd, n_head=1)
    each_command(capsys, bad, tmp_path, match)


def test_size_estimate_matches_the_built_models():
    """The bound is checked on an estimate from the config alone: within 2% of the real
    count of the weight matrices for each family's shape."""
    for name in ("tiny", "gpt2-124m", "llama-tiny", "qwen3-0.6b"):
        cfg = GPTConfig.from_name(name)
        with torch.device("meta"):
            n = GPT(cfg).num_params(include_embeddings=True)
        assert abs(cfg.estimated_params() - n) / n < 0.02, name
    for name in ("bert-mini", "bert-base"):
        cfg = BertConfig.from_name(name)
        with torch.device("meta"):
            n = sum(p.numel() for p in Bert(cfg).parameters() if p.dim() == 2)
        assert abs(cfg.estimated_params() - n) / n < 0.02, name
    assert GPTConfig.from_name("gpt2-124m").estimated_params() < MAX_PARAMS


def test_garbage_tokenizer_json_in_a_llama_folder(tmp_path, capsys):
    folder = save_hf(GPT(GPTConfig.from_name("llama-tiny", vocab_size=300)), tmp_path / "llama")
    (folder / "tokenizer.json").write_bytes(bytes(range(128, 256)) * 20)  # not UTF-8
    one_line_error(capsys, ["generate", "--model", str(folder), "--prompt", "hi"], "tokenizer.json: not UTF-8 text")
    (folder / "tokenizer.json").write_text('{"model": 5}')
    one_line_error(capsys, ["generate", "--model", str(folder), "--prompt", "hi"], "tokenizer.json")


def test_garbage_tokenizer_json_in_a_run_folder(run, tmp_path, capsys):
    bad = copy_of(run, tmp_path)
    (bad / "tokenizer.json").write_bytes(bytes(range(128, 256)) * 20)
    one_line_error(capsys, ["generate", "--model", str(bad), "--prompt", "hi"], "tokenizer.json")


def test_info_reads_a_hugging_face_folder(tmp_path, capsys):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny"))
    folder = save_hf(model, tmp_path / "hf")
    assert main(["info", "--model", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"parameters   {model.num_params():,}" in out and "n_layer        2" in out


# ------------------------------------------------------------------ sampling that underflows
@pytest.mark.parametrize("flags", [["--top-p", "1e-50", "--temperature", "1"], ["--temperature", "1e-300"],
                                   ["--temperature", "5e-324", "--top-p", "1e-300"]])
def test_cli_sampling_that_underflows_gives_greedy_tokens(run, capsys, flags):
    base = ["generate", "--model", str(run), "--prompt", "Once upon", "--max-new-tokens", "6", "--seed", "3"]
    assert main(base + ["--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert main(base + flags) == 0, capsys.readouterr().err
    assert capsys.readouterr().out == greedy


def test_tiny_temperature_shares_a_tie(run):
    """Two tied likeliest tokens both come up at temperature 1e-300 (not always the first,
    which greedy would take): the rescaled draw keeps their equal share."""
    from llmscratch.decoding.sampling import sample

    logits = torch.tensor([[2.0, 5.0, 5.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample(logits, 1e-300, generator=g)[0]) for _ in range(40)}
    assert picks == {1, 2}
