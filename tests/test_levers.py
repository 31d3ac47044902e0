"""The training levers from the speedrun literature, each an option that defaults off: ReLU²
MLPs, zero-initialised output projections with an untied head, QK-norm on the GPT-2 block,
logit soft-capping, and sequence-length warmup."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llmscratch.errors import UserError
from llmscratch.models.gpt import GPT, GPTConfig, lm_loss
from llmscratch.train import TrainConfig, pretrain


def tiny(**kw) -> GPTConfig:
    return GPTConfig.from_name("tiny", vocab_size=97, context_length=16, **kw)


def test_relu2_mlp_is_relu_squared():
    torch.manual_seed(0)
    model = GPT(tiny(mlp="relu2")).eval()
    mlp = model.h[0].mlp
    x = torch.randn(2, 5, 64)
    expected = mlp.c_proj(torch.relu(mlp.c_fc(x)) ** 2)
    torch.testing.assert_close(mlp(x), expected, atol=0, rtol=0)
    assert not torch.allclose(mlp(x), mlp.c_proj(F.gelu(mlp.c_fc(x), approximate="tanh")))
    with pytest.raises(UserError, match="mlp must be one of gelu, swiglu, relu2"):
        tiny(mlp="relu3")


def test_zero_init_with_an_untied_head_starts_uniform_and_still_learns():
    torch.manual_seed(0)
    model = GPT(tiny(zero_init=True, tie_weights=False))
    zeros = [n for n, p in model.named_parameters() if n.endswith("weight") and not p.any()]
    assert sorted(zeros) == sorted([f"h.{i}.{m}.c_proj.weight" for i in range(2) for m in ("attn", "mlp")]
                                   + ["lm_head.weight"])
    idx = torch.randint(0, 97, (2, 8))
    logits = model(idx)
    assert not logits.any()  # every token equally likely: loss ln(97)
    assert lm_loss(logits, idx).item() == pytest.approx(torch.log(torch.tensor(97.0)).item())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):  # the head learns first, then the projections get gradient through it
        opt.zero_grad()
        lm_loss(model(idx), idx).backward()
        opt.step()
    assert model.lm_head.weight.any() and model.h[0].mlp.c_proj.weight.any()
    # tied: the head is the embedding, which zero_init leaves alone
    tied = GPT(tiny(zero_init=True))
    assert tied.wte.weight.any() and not tied.h[1].attn.c_proj.weight.any()
    assert GPT(tiny()).h[0].mlp.c_proj.weight.any()  # off by default


def test_logit_softcap_bounds_the_logits_everywhere_the_head_is_used():
    from llmscratch.kernels import apply_kernels, lm_head_loss

    torch.manual_seed(0)
    capped = GPT(tiny(logit_softcap=2.0)).eval()
    plain = GPT(tiny()).eval()
    plain.load_state_dict(capped.state_dict())
    with torch.no_grad():  # large weights, so that uncapped logits pass the cap
        for m in (capped, plain):
            m.wte.weight.mul_(40)
    idx = torch.randint(0, 97, (2, 8))
    raw, out = plain(idx), capped(idx)
    assert raw.abs().max() > 3 and out.abs().max() <= 2
    torch.testing.assert_close(out, 2.0 * torch.tanh(raw / 2.0))
    # the training loss, with the speed kernels swapped in (forced), is the capped one
    apply_kernels(capped, force=True)
    torch.testing.assert_close(lm_head_loss(capped, capped.hidden_states(idx), idx), lm_loss(out, idx))
    with pytest.raises(UserError, match="logit_softcap must be a positive number"):
        tiny(logit_softcap=0)


def test_formats_that_cannot_express_a_cap_refuse_it(tmp_path):
    from llmscratch.hf.registry import save_hf
    from llmscratch.kernels.quantize import quantize_int8

    with pytest.raises(UserError, match="logit_softcap=30.0, value_residual=False"):
        save_hf(GPT(tiny(logit_softcap=30.0)), tmp_path / "gpt2")
    modern = GPTConfig.from_name("llama-tiny", vocab_size=97, logit_softcap=30.0)
    with pytest.raises(UserError, match="logit_softcap=30.0"):
        save_hf(GPT(modern), tmp_path / "llama")
    with pytest.raises(UserError, match="int8 weights do not support"):
        quantize_int8(GPT(tiny(logit_softcap=30.0)))


def test_train_flags_reach_the_model():
    over = TrainConfig(mlp="relu2", qk_norm=True, untied_head=True, zero_init=True, logit_softcap=15.0).model_overrides()
    assert over == dict(mlp="relu2", qk_norm=True, tie_weights=False, zero_init=True, logit_softcap=15.0)
    assert TrainConfig().model_overrides() == {}  # off by default: the presets unchanged
    model = GPT(GPTConfig.from_name("tiny", vocab_size=97, **over))
    assert model.h[0].attn.qk_norm and model.lm_head.weight is not model.wte.weight


def test_sequence_length_warmup_grows_the_windows_and_resumes_exactly(tmp_path, corpus_file):
    from llmscratch.data import BatchSampler
    from llmscratch.train.pretrain import LMBatches

    batches = LMBatches(BatchSampler(torch.arange(5000).numpy(), 4, 64, seed=0), 2, seq_len_warmup=8)
    assert [batches.length(s) for s in range(10)] == [8, 16, 24, 32, 40, 48, 56, 64, 64, 64]
    x, y = batches.get(1, 0, 0, 1, torch.device("cpu"))
    full_x, _ = LMBatches(batches.sampler, 2).get(1, 0, 0, 1, torch.device("cpu"))
    assert x.shape == y.shape == (4, 16) and torch.equal(x, full_x[:, :16])
    assert batches.seen(2) == 2 * 4 * (8 + 16) and batches.seen(10) == 2 * 4 * (8 + 16 + 24 + 32 + 40 + 48 + 56 + 64 * 3)

    kw = dict(data=str(corpus_file), model="tiny", tokenizer="bpe:300", context_length=32, batch_size=4,
              eval_every=3, eval_batches=1, sample_tokens=0, warmup_steps=2, lr=3e-3, precision="fp32",
              progress=False, max_steps=6, seq_len_warmup=4, mlp="relu2", zero_init=True, untied_head=True,
              logit_softcap=20.0, dropout=0.1)
    full = pretrain(TrainConfig(out=str(tmp_path / "full"), **kw))
    first = pretrain(TrainConfig(out=str(tmp_path / "split"), **kw), stop_after=2)
    second = pretrain(TrainConfig(out=str(tmp_path / "split"), resume=True, **kw))
    assert first.step == 2 and second.step == 6
    recs = [json.loads(l) for l in (full.out / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(l) for l in (second.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in recs] == [4 * 8, 4 * (8 + 16), 4 * (8 + 16 + 24), 4 * (8 + 16 + 24 + 32),
                                           4 * (80 + 32), 4 * (80 + 64)]
    assert [r["train_loss"] for r in resumed] == pytest.approx([r["train_loss"] for r in recs], abs=1e-6)
    saved = json.loads((full.out / "config.json").read_text())
    assert saved["model"]["mlp"] == "relu2" and saved["model"]["logit_softcap"] == 20.0
    assert saved["model"]["tie_weights"] is False and saved["train"]["seq_len_warmup"] == 4


def test_value_residual_mixes_the_first_layers_values_and_decodes_with_a_cache():
    torch.manual_seed(0)
    model = GPT(tiny(value_residual=True, n_layer=3)).eval()
    plain = GPT(tiny(n_layer=3)).eval()
    plain.load_state_dict(model.state_dict())  # no new parameters: the same weights load
    idx = torch.randint(0, 97, (2, 10))
    full = model(idx)
    assert not torch.allclose(full, plain(idx))
    # by hand for layer 1: its values are the mean of its own and layer 0's
    seen = {}
    for i in range(2):
        model.h[i].attn.c_attn.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
    attn1 = model.h[1].attn
    captured = {}
    attn1.attend = lambda q, k, v, mask, f=attn1.attend: captured.setdefault("v", v) is not None and f(q, k, v, mask)
    model(idx)
    v0, v1 = (seen[i][..., 2 * 64:].view(2, 10, 4, 16).transpose(1, 2) for i in range(2))
    torch.testing.assert_close(captured["v"], 0.5 * (v1 + v0))
    # incremental decoding with KV caches gives the full pass's logits
    caches = model.make_kv_caches(2)
    steps = [model(idx[:, :6], caches, 0)] + [model(idx[:, t:t + 1], caches, t) for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert TrainConfig(value_residual=True).model_overrides() == {"value_residual": True}
    with pytest.raises(UserError, match="--value-residual and --gradient-checkpointing"):
        TrainConfig(value_residual=True, gradient_checkpointing=True).validate()
