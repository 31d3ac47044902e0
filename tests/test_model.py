"""GPTConfig validation and presets, the GPT model's shapes, init, tying and loss."""

import dataclasses

import pytest
import torch

from llmscratch.errors import UserError
from llmscratch.models.gpt import GPT, GPTConfig, lm_loss


def tiny(**kw) -> GPTConfig:
    return GPTConfig.from_name("tiny", vocab_size=97, context_length=32, **kw)


def test_presets_and_overrides():
    cfg = GPTConfig.from_name("gpt2-124m")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.context_length, cfg.vocab_size) == (12, 12, 768, 1024, 50257)
    assert GPTConfig.from_name("gpt2-1558m").n_embd == 1600
    assert GPTConfig.from_name("tiny", n_layer=3).n_layer == 3
    for name in ("tiny", "small", "gpt2-355m", "gpt2-774m"):
        assert name in GPTConfig.presets()


def test_config_is_frozen_and_replaceable():
    cfg = tiny()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_layer = 5
    assert dataclasses.replace(cfg, n_layer=5).n_layer == 5


def test_invalid_configs_name_the_problem():
    with pytest.raises(UserError, match="divisible by n_head"):
        GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(UserError, match="unknown model preset 'gpt5'.*gpt2-124m.*tiny"):
        GPTConfig.from_name("gpt5")
    with pytest.raises(UserError, match="n_layer"):
        GPTConfig(n_layer=0)
    with pytest.raises(UserError, match="unknown GPTConfig field"):
        GPTConfig.from_name("tiny", n_layers=3)
    with pytest.raises(UserError, match="dropout"):
        GPTConfig(dropout=1.5)


def test_gpt2_124m_parameter_count():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name("gpt2-124m"))
    assert model.num_params() == 124_439_808  # GPT-2 small, head tied
    assert model.num_params(count_tied_head=True) == 124_439_808 + 50257 * 768
    with torch.device("meta"):
        untied = GPT(GPTConfig.from_name("gpt2-124m", tie_weights=False))
    assert untied.num_params() == 124_439_808 + 50257 * 768


def test_forward_shapes_and_tying():
    model = GPT(tiny())
    idx = torch.randint(0, 97, (3, 11))
    assert model(idx).shape == (3, 11, 97)
    hidden = model.hidden_states(idx)  # after ln_f: forward is the LM head of these
    assert hidden.shape == (3, 11, 64)
    torch.testing.assert_close(model(idx), model.lm_head(hidden))
    assert model.lm_head(hidden[:, -1]).shape == (3, 97)  # decoding's last-position logits
    assert model.lm_head.weight is model.wte.weight
    assert GPT(tiny(tie_weights=False)).lm_head.weight is not GPT(tiny(tie_weights=False)).wte.weight
    assert GPT(tiny(qkv_bias=False)).h[0].attn.c_attn.bias is None


def test_context_overflow_is_an_error():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="exceeds the context length 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_init_gives_uniform_initial_loss():
    """A fresh model predicts near-uniformly: loss close to ln(vocab)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny", vocab_size=1000))
    idx = torch.randint(0, 1000, (4, 65))
    loss = lm_loss(model(idx[:, :-1]), idx[:, 1:])
    assert abs(loss.item() - torch.log(torch.tensor(1000.0)).item()) < 0.1
    c_proj = model.h[0].attn.c_proj.weight.std().item()
    assert c_proj < 0.02 * 0.6  # scaled residual init: 0.02 / sqrt(2 * n_layer)


def test_loss_ignores_masked_targets():
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    masked = targets.clone()
    masked[:, 3:] = -100
    ref = torch.nn.functional.cross_entropy(logits[:, :3].reshape(-1, 7), targets[:, :3].reshape(-1))
    torch.testing.assert_close(lm_loss(logits, masked), ref)


def test_seeded_model_is_deterministic():
    torch.manual_seed(123)
    a = GPT(tiny())
    torch.manual_seed(123)
    b = GPT(tiny())
    idx = torch.arange(20).view(2, 10)
    assert torch.equal(a(idx), b(idx))


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(tiny())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 97, (2, 16))
    first = None
    for _ in range(60):
        loss = lm_loss(model(x[:, :-1]), x[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = GPT(tiny())
    x = torch.randint(0, 97, (2, 16))
    lm_loss(model(x), x).backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    lm_loss(model(x), x).backward()
    for a, p in zip(g1, model.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_left_padded_rows_with_positions_equal_each_row_alone():
    """A ragged batch (left padding, per-row positions, a key mask), prefilled and then
    decoded one token at a time through the KV cache, gives each row's own logits."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny", vocab_size=97)).eval()
    rows = [torch.randint(0, 97, (n,)) for n in (7, 3, 5)]
    width = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width + 2, dtype=torch.bool)
    for i, r in enumerate(rows):
        idx[i, width - len(r):] = r
        mask[i, width - len(r):] = True
    positions = (mask[:, :width].long().cumsum(1) - 1).clamp(min=0)
    caches = model.make_kv_caches(len(rows), width + 2)
    with torch.no_grad():
        logits = model(idx, caches, 0, positions, mask[:, :width])
        nxt = torch.randint(0, 97, (len(rows), 1))
        step = model(nxt, caches, width, positions[:, -1:] + 1, mask[:, :width + 1])
        for i, r in enumerate(rows):
            alone = model(torch.cat([r, nxt[i]])[None])
            torch.testing.assert_close(logits[i, width - len(r):], alone[0, :-1], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(step[i, 0], alone[0, -1], atol=1e-5, rtol=1e-4)
