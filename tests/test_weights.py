"""Hugging Face GPT-2 checkpoints <-> our GPT: parity with transformers, round trips, errors.

Every checkpoint here is a randomly initialised `transformers.GPT2LMHeadModel` saved to
`tmp_path`, so the tests need no network and run in seconds.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from llmscratch.errors import UserError  # noqa: E402
from llmscratch.decoding.generate import generate  # noqa: E402
from llmscratch.models.gpt import GPT, GPTConfig  # noqa: E402
from llmscratch.hf.gpt2 import is_hf_gpt2_dir, load_hf_gpt2, save_hf_gpt2  # noqa: E402

# name -> GPT2Config kwargs. bos/eos must lie inside a small vocabulary or transformers warns.
SHAPES = {
    "tied-32x2": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64),
    "tied-48x3": dict(n_embd=48, n_layer=3, n_head=6, vocab_size=1000, n_positions=96),
    "untied-32x2": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                        tie_word_embeddings=False),
}


def _hf_config(**kw) -> GPT2Config:
    vocab = kw["vocab_size"]
    return GPT2Config(bos_token_id=vocab - 1, eos_token_id=vocab - 1, **kw)


def _make_hf_model(seed: int = 0, **kw) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(_hf_config(**kw)).eval()
    with torch.no_grad():
        # transformers initialises LayerNorms to exactly (1, 0) and biases to 0; perturb them
        # so a mixed-up or untransposed tensor cannot hide behind a trivial value.
        for name, p in model.named_parameters():
            if name.endswith(".bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(SHAPES))
def hf_checkpoint(request, tmp_path_factory):
    """(folder, HF model, GPT2Config kwargs) for each shape in SHAPES, saved as safetensors."""
    kw = SHAPES[request.param]
    model = _make_hf_model(**kw)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return folder, model, kw


@pytest.fixture()
def small_checkpoint(tmp_path):
    """A fresh, writable tied 32x2 checkpoint folder the error tests may damage."""
    model = _make_hf_model(**SHAPES["tied-32x2"])
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    return folder


def _rewrite_tensors(folder, edit) -> None:
    """Load model.safetensors, let `edit(dict)` change it, write it back."""
    path = folder / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_config(folder, **changes) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_logits_match_transformers(hf_checkpoint, attn_implementation):
    folder, _, kw = hf_checkpoint
    # Reload through from_pretrained: checks the saved folder and picks the attention kernel.
    hf = GPT2LMHeadModel.from_pretrained(folder, attn_implementation=attn_implementation).eval()
    ours = load_hf_gpt2(folder)
    assert not ours.training
    assert ours.config.tie_weights == kw.get("tie_word_embeddings", True)
    assert (ours.lm_head.weight is ours.wte.weight) == ours.config.tie_weights
    g = torch.Generator().manual_seed(1)
    for batch, length in [(1, 1), (2, 17), (3, kw["n_positions"])]:
        idx = torch.randint(0, kw["vocab_size"], (batch, length), generator=g)
        with torch.no_grad():
            ref = hf(idx).logits
            got = ours(idx)
        assert got.shape == ref.shape == (batch, length, kw["vocab_size"])
        assert (got - ref).abs().max().item() <= 1e-4


def test_greedy_generation_matches_transformers(hf_checkpoint):
    folder, hf, kw = hf_checkpoint
    ours = load_hf_gpt2(folder)
    prompt = torch.randint(0, kw["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(2))
    # No EOS at all: transformers would otherwise stop (and pad) a row that emits it.
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=50,
            pad_token_id=0, eos_token_id=None,
        )
    got = generate(ours, prompt, max_new_tokens=50)
    assert ref.shape == (2, 55)  # transformers really produced 50 tokens
    assert torch.equal(got, ref)


def test_pytorch_bin_with_prefixed_and_bare_keys(tmp_path):
    """Older uploads: a pickled state dict, either GPT2LMHeadModel's ("transformer.h.0...")
    or the original GPT2Model layout ("h.0...") with its attention-mask buffers."""
    kw = SHAPES["tied-32x2"]
    hf = _make_hf_model(seed=3, **kw)
    state = hf.state_dict()
    bare = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
    for i in range(kw["n_layer"]):  # the buffers old transformers saved, which we must skip
        n = kw["n_positions"]
        bare[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        bare[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    idx = torch.randint(0, kw["vocab_size"], (2, 9))
    with torch.no_grad():
        ref = hf(idx).logits
    for name, tensors in [("prefixed", state), ("bare", bare)]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(_hf_config(**kw).to_dict()))
        torch.save(tensors, folder / "pytorch_model.bin")
        assert is_hf_gpt2_dir(folder)
        ours = load_hf_gpt2(folder)
        with torch.no_grad():
            assert (ours(idx) - ref).abs().max().item() <= 1e-4, name


def test_sharded_safetensors(tmp_path):
    hf = _make_hf_model(seed=4, **SHAPES["tied-48x3"])
    hf.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_hf_gpt2(tmp_path)
    idx = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() <= 1e-4


def test_dtype_and_device_arguments(hf_checkpoint):
    folder, _, _ = hf_checkpoint
    ours = load_hf_gpt2(folder, dtype=torch.bfloat16, device="cpu")
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in ours.parameters())
    assert (ours.lm_head.weight is ours.wte.weight) == ours.config.tie_weights


# --------------------------------------------------------------------------- saving


@pytest.mark.parametrize("tie", [True, False])
def test_saved_model_loads_in_transformers(tmp_path, tie):
    torch.manual_seed(5)
    ours = GPT(GPTConfig.from_name("tiny", vocab_size=100, tie_weights=tie)).eval()
    folder = save_hf_gpt2(ours, tmp_path / "out")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert is_hf_gpt2_dir(folder)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tie)

    hf, info = GPT2LMHeadModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.config.tie_word_embeddings == tie
    hf.eval()
    idx = torch.randint(0, 100, (2, 30))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_is_exact(tmp_path, tie):
    torch.manual_seed(6)
    ours = GPT(GPTConfig.from_name("tiny", vocab_size=300, tie_weights=tie))
    save_hf_gpt2(ours, tmp_path)
    back = load_hf_gpt2(tmp_path)
    assert back.config == ours.config  # dropout is 0 in both
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (back.lm_head.weight is back.wte.weight) == tie


def test_round_trip_keeps_bf16_and_overwrites(tmp_path):
    torch.manual_seed(7)
    ours = GPT(GPTConfig.from_name("tiny", vocab_size=50)).to(torch.bfloat16)
    save_hf_gpt2(GPT(GPTConfig.from_name("tiny", vocab_size=50)), tmp_path)  # replaced below
    save_hf_gpt2(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    back = load_hf_gpt2(tmp_path, dtype=torch.bfloat16)
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), back.parameters()))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp files left


def test_saved_config_is_a_real_gpt2_config(tmp_path):
    save_hf_gpt2(GPT(GPTConfig.from_name("tiny", vocab_size=50257, dropout=0.1)), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert cfg["activation_function"] == "gelu_new" and cfg["layer_norm_epsilon"] == 1e-5
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == 50256
    assert cfg["n_positions"] == cfg["n_ctx"] == 128
    assert cfg["resid_pdrop"] == cfg["embd_pdrop"] == cfg["attn_pdrop"] == 0.1
    hf_cfg = GPT2Config.from_pretrained(tmp_path)
    assert (hf_cfg.n_embd, hf_cfg.n_layer, hf_cfg.n_head) == (64, 2, 4)


def test_save_refuses_models_gpt2_cannot_express(tmp_path):
    with pytest.raises(UserError, match="qkv_bias"):
        save_hf_gpt2(GPT(GPTConfig.from_name("tiny", vocab_size=50, qkv_bias=False)), tmp_path / "a")
    with pytest.raises(UserError, match="GPT"):
        save_hf_gpt2(torch.nn.Linear(2, 2), tmp_path / "b")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        save_hf_gpt2(GPT(GPTConfig.from_name("tiny", vocab_size=50)), tmp_path / "file")


# --------------------------------------------------------------------------- errors


def test_shape_mismatch_names_tensor_and_shapes(small_checkpoint):
    key = "transformer.h.1.mlp.c_fc.weight"  # (32, 128) in Conv1D layout
    _rewrite_tensors(small_checkpoint, lambda t: t.__setitem__(key, torch.zeros(128, 32)))
    with pytest.raises(UserError) as e:
        load_hf_gpt2(small_checkpoint)
    msg = str(e.value)
    assert key in msg and "(128, 32)" in msg and "(32, 128)" in msg
    assert "\n" not in msg


def test_config_and_weights_disagree(small_checkpoint):
    _edit_config(small_checkpoint, n_embd=64)  # weights are 32 wide
    with pytest.raises(UserError, match=r"transformer\.wte\.weight.*\(100, 32\).*\(100, 64\)"):
        load_hf_gpt2(small_checkpoint)


def test_missing_tensor_is_named(small_checkpoint):
    _rewrite_tensors(small_checkpoint, lambda t: t.pop("transformer.h.0.ln_2.bias"))
    with pytest.raises(UserError, match=r"missing 1 tensor.*h\.0\.ln_2\.bias"):
        load_hf_gpt2(small_checkpoint)


def test_missing_layer_lists_a_few(small_checkpoint):
    _edit_config(small_checkpoint, n_layer=4)  # file has only 2 layers: 24 tensors missing
    with pytest.raises(UserError, match=r"missing 24 tensor.*and \d+ more"):
        load_hf_gpt2(small_checkpoint)


def test_unexpected_tensor_is_named(small_checkpoint):
    _rewrite_tensors(small_checkpoint, lambda t: t.__setitem__("transformer.h.9.mlp.c_fc.bias", torch.zeros(3)))
    with pytest.raises(UserError, match=r"unexpected.*transformer\.h\.9\.mlp\.c_fc\.bias"):
        load_hf_gpt2(small_checkpoint)


def test_untied_config_without_head(small_checkpoint):
    _edit_config(small_checkpoint, tie_word_embeddings=False)
    with pytest.raises(UserError, match=r"lm_head\.weight.*tie_word_embeddings"):
        load_hf_gpt2(small_checkpoint)


def test_tied_config_with_different_head(small_checkpoint):
    _rewrite_tensors(small_checkpoint, lambda t: t.__setitem__("lm_head.weight", torch.randn(100, 32)))
    with pytest.raises(UserError, match=r"lm_head\.weight.*differs"):
        load_hf_gpt2(small_checkpoint)
    # the same tensor stored twice is fine
    same = lambda t: t.__setitem__("lm_head.weight", t["transformer.wte.weight"].clone())  # noqa: E731
    _rewrite_tensors(small_checkpoint, same)
    model = load_hf_gpt2(small_checkpoint)
    with safe_open(str(small_checkpoint / "model.safetensors"), framework="pt") as f:
        stored = f.get_tensor("transformer.wte.weight")
    assert model.lm_head.weight is model.wte.weight and torch.equal(model.wte.weight, stored)


def test_missing_folder_config_or_weights(tmp_path, small_checkpoint):
    with pytest.raises(UserError, match="no such folder"):
        load_hf_gpt2(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="config.json"):
        load_hf_gpt2(empty)
    (small_checkpoint / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no weights file"):
        load_hf_gpt2(small_checkpoint)
    (small_checkpoint / "config.json").unlink()
    with pytest.raises(UserError, match="no config.json"):
        load_hf_gpt2(small_checkpoint)
    with pytest.raises(UserError, match="got a file"):
        load_hf_gpt2(tmp_path / "ckpt" / "generation_config.json")


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "malformed JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"model_type": "llama"}', "model_type is 'llama'"),
        ('{"model_type": "gpt2", "n_embd": "32"}', "'n_embd' must be a positive integer"),
        ('{"model_type": "gpt2", "n_layer": 0}', "'n_layer' must be a positive integer"),
        ('{"model_type": "gpt2", "n_embd": 30, "n_head": 4}', "divisible"),
        ('{"model_type": "gpt2", "tie_word_embeddings": "yes"}', "tie_word_embeddings"),
        ('{"model_type": "gpt2", "activation_function": "relu"}', "activation_function 'relu'"),
        ('{"model_type": "gpt2", "layer_norm_epsilon": 1e-6}', "layer_norm_epsilon"),
        ('{"model_type": "gpt2", "n_inner": 10}', "n_inner"),
        ('{"model_type": "gpt2", "scale_attn_by_inverse_layer_idx": true}', "scale_attn_by_inverse"),
    ],
)
def test_malformed_config(small_checkpoint, text, match):
    (small_checkpoint / "config.json").write_text(text)
    with pytest.raises(UserError, match=match) as e:
        load_hf_gpt2(small_checkpoint)
    assert "config.json" in str(e.value)


def test_corrupt_weight_files(small_checkpoint):
    (small_checkpoint / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="model.safetensors"):
        load_hf_gpt2(small_checkpoint)
    (small_checkpoint / "model.safetensors").unlink()
    (small_checkpoint / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="pytorch_model.bin"):
        load_hf_gpt2(small_checkpoint)


class _Evil:
    """Unpickling this would call os.system; weights_only loading must refuse it."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_pickle_with_code_is_refused(small_checkpoint):
    (small_checkpoint / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": torch.zeros(2), "x": _Evil()}, small_checkpoint / "pytorch_model.bin")
    with pytest.raises(UserError, match="refused to unpickle"):
        load_hf_gpt2(small_checkpoint)


def test_is_hf_gpt2_dir(tmp_path, small_checkpoint):
    assert is_hf_gpt2_dir(small_checkpoint)
    assert is_hf_gpt2_dir(str(small_checkpoint))
    assert not is_hf_gpt2_dir(tmp_path / "nope")
    assert not is_hf_gpt2_dir(small_checkpoint / "config.json")  # a file, not a folder
    run = tmp_path / "run"  # one of our run folders: no HF config
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"")
    assert not is_hf_gpt2_dir(run)
    (run / "config.json").write_text('{"model_type": "llama"}')
    assert not is_hf_gpt2_dir(run)
    (run / "config.json").write_text("{broken")
    assert not is_hf_gpt2_dir(run)
    _edit_config(small_checkpoint)
    (small_checkpoint / "model.safetensors").unlink()
    assert not is_hf_gpt2_dir(small_checkpoint)  # config but no weights
