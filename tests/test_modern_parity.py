"""Parity with transformers for the Llama family: random tiny LlamaForCausalLM /
Qwen3ForCausalLM / MistralForCausalLM saved locally -> our logits within 1e-4 and the same
50 greedy tokens as their `generate`; `save_hf` folders load in transformers without a
warning and back bit-identically; `convert` both ways; bad config.json fields named."""

import json
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmscratch.errors import UserError  # noqa: E402
from llmscratch.decoding.generate import generate  # noqa: E402
from llmscratch.checkpoints.convert import convert  # noqa: E402
from llmscratch.checkpoints.run import load_run_model  # noqa: E402
from llmscratch.models.gpt import GPT, GPTConfig  # noqa: E402
from llmscratch.hf import is_hf_dir, load_hf, save_hf  # noqa: E402

V = 211
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
LLAMA3_SCALING = dict(  # copied at each use: transformers adds rope_theta to the dict it is given
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=16)


def make_hf(kind: str, folder, **kw):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**{**COMMON, "rope_theta": 500000.0, "rope_scaling": dict(LLAMA3_SCALING), **kw})
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen3":
        cfg = transformers.Qwen3Config(**{**COMMON, "head_dim": 24, "tie_word_embeddings": True, **kw})
        model = transformers.Qwen3ForCausalLM(cfg)
    else:
        cfg = transformers.MistralConfig(**{**COMMON, "sliding_window": None, **kw})
        model = transformers.MistralForCausalLM(cfg)
    with torch.no_grad():  # random init's tiny norm weights hide mistakes: make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("kind, kw", [("llama", {}), ("qwen3", {}), ("mistral", {})])
def test_logits_and_50_greedy_tokens_equal_transformers(kind, kw, tmp_path):
    ref = make_hf(kind, tmp_path, **kw)
    ours = load_hf(tmp_path)
    assert is_hf_dir(tmp_path)
    idx = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), ref(idx).logits, atol=1e-4, rtol=0)
        prompt = idx[:1, :5]
        theirs = ref.generate(prompt, max_new_tokens=50, do_sample=False, min_new_tokens=50,
                              pad_token_id=0, eos_token_id=None)
    assert torch.equal(generate(ours, prompt, 50), theirs)


def test_mistral_sliding_window_caps_the_context_and_is_exact_up_to_it(tmp_path):
    """A 24-token window: our context is capped at 24 (full causal attention up to there is
    Mistral's), and the logits of 24 tokens and greedy decoding to 24 equal transformers'
    (whose window applies from the 25th token on: past it the two would differ, and ours
    refuses a longer input)."""
    ref = make_hf("mistral", tmp_path, sliding_window=24)
    ours = load_hf(tmp_path)
    assert ours.config.context_length == 24
    idx = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), ref(idx).logits, atol=1e-4, rtol=0)
        theirs = ref.generate(idx[:1, :5], max_new_tokens=19, do_sample=False, min_new_tokens=19,
                              pad_token_id=0, eos_token_id=None)
        assert torch.equal(generate(ours, idx[:1, :5], 19), theirs)
        with pytest.raises(ValueError, match="context length 24"):
            ours(torch.randint(0, V, (1, 25)))


def capture_transformers_warnings():
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("transformers")
    handler = Keep(level=logging.WARNING)
    logger.addHandler(handler)
    return records, lambda: logger.removeHandler(handler)


@pytest.mark.parametrize("preset_kw", [dict(), dict(qk_norm=True, head_size=24, tie_weights=False),
                                       dict(rope_scaling=dict(LLAMA3_SCALING), rope_theta=500000.0)])
def test_save_hf_loads_in_transformers_without_warnings_and_back(preset_kw, tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig.from_name("llama-tiny", vocab_size=V, **preset_kw)).eval()
    save_hf(ours, tmp_path / "hf")
    records, done = capture_transformers_warnings()
    try:
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    finally:
        done()
    assert records == []
    expected = "Qwen3ForCausalLM" if preset_kw.get("qk_norm") else "LlamaForCausalLM"
    assert type(ref).__name__ == expected
    idx = torch.randint(0, V, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), ref(idx).logits, atol=1e-4, rtol=0)
    back = load_hf(tmp_path / "hf")
    assert back.config == ours.config
    for (n, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n


def test_convert_both_ways_keeps_the_logits(tmp_path):
    ref = make_hf("qwen3", tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "run")
    run = load_run_model(tmp_path / "run")
    convert(tmp_path / "run", tmp_path / "hf2")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    idx = torch.randint(0, V, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(run(idx), ref(idx).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(again(idx).logits, ref(idx).logits, atol=1e-5, rtol=0)


def write_config(folder, **fields):
    make_hf("llama", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(fields)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("fields, message", [
    (dict(model_type="falcon"), "model_type is 'falcon', which is not supported \\(supported: gpt2, llama, qwen3, mistral"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None),
     "rope_scaling: unsupported rope_type 'yarn'"),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4}), "rope_parameters: unsupported rope_type"),
    (dict(num_key_value_heads=3), "num_attention_heads \\(4\\) must be divisible by num_key_value_heads \\(3\\)"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(attention_bias=True), "attention_bias must be false"),
])
def test_bad_config_fields_are_named(fields, message, tmp_path):
    write_config(tmp_path, **fields)
    with pytest.raises(UserError, match=message):
        load_hf(tmp_path)


def test_save_hf_refuses_a_mixed_block():
    model = GPT(GPTConfig.from_name("tiny", vocab_size=V, norm="rmsnorm"))
    with pytest.raises(UserError, match="neither the GPT-2 nor the Llama format"):
        save_hf(model, "unused")
