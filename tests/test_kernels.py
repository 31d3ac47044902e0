"""The opt-in kernels (`llmscratch.kernels`), each against the plain computation it replaces,
and `apply_kernels` against the reference model."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmscratch.models.attention import CausalSelfAttention
from llmscratch.kernels import apply_kernels, has_kernels, lm_head_loss
from llmscratch.kernels import blocked_attention as ba
from llmscratch.kernels.blocked_attention import (
    BlockedCausalSelfAttention,
    blocked_attention_ops,
    blocked_causal_attention,
)
from llmscratch.kernels.linear_cross_entropy import FusedLMHead, fused_lm_loss
from llmscratch.kernels.split_linear import SplitLinear
from llmscratch.models.gpt import GPT, GPTConfig, lm_loss


def tiny(**kw) -> GPTConfig:
    return GPTConfig.from_name("tiny", vocab_size=97, context_length=32, **kw)


# ------------------------------------------------------------------ split-matvec linear
@pytest.mark.parametrize("rows", [1, 3, 8, 9])
@pytest.mark.parametrize("out_features", [6, 7, 50])
def test_split_decode_linear_equals_f_linear(rows, out_features):
    # the two-core decode path of SplitLinear (taken for <= 8 rows without autograd) against
    # the plain F.linear, with an odd output size like GPT-2's 50257-token head
    torch.manual_seed(0)
    lin = SplitLinear(16, out_features)
    lin.force = True  # the split wherever it applies, not only where measured faster
    x = torch.randn(rows, 1, 16)
    with torch.no_grad():
        got = lin(x)
    want = torch.nn.functional.linear(x, lin.weight, lin.bias)
    assert got.shape == want.shape == (rows, 1, out_features)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # with autograd on it is plain F.linear, and gradients flow
    y = lin(x)
    y.sum().backward()
    assert lin.weight.grad is not None


def test_split_path_is_taken_only_where_documented():
    from llmscratch.kernels.split_linear import use_split

    w = torch.randn(10, 16)
    with torch.no_grad():
        assert use_split(torch.randn(8, 16), w)
        assert not use_split(torch.randn(9, 16), w)  # more rows: the matmul kernel wins
        assert not use_split(torch.randn(1, 16).bfloat16(), w.bfloat16())  # bf16 gains nothing
        assert not use_split(torch.randn(1, 16), w[:1])  # one output row
    assert not use_split(torch.randn(1, 16), w)  # autograd on: training keeps F.linear


# ------------------------------------------------------------------ blocked attention
@pytest.mark.parametrize("path", ["hand-written backward", "autograd ops"])
@pytest.mark.parametrize("T,block", [(1, 4), (9, 4), (12, 4), (20, 256)])
def test_blocked_causal_attention_equals_sdpa_with_gradients(T, block, path):
    # the bf16 CPU training path, checked in fp32 against the fused kernel: outputs and the
    # gradients of q, k and v, with the last block shorter than the others, for both the
    # hand-written backward and the plain-ops version autograd differentiates
    fn = blocked_causal_attention if path == "hand-written backward" else blocked_attention_ops
    torch.manual_seed(0)
    # (B, T, nh, hs) viewed as (B, nh, T, hs): strided like the model's q, k, v
    q, k, v = (torch.randn(2, T, 3, 8).transpose(1, 2).requires_grad_(True) for _ in range(3))
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    go = torch.randn(2, 3, T, 8)
    fn(q, k, v, block=block).backward(go)
    F.scaled_dot_product_attention(q2, k2, v2, is_causal=True).backward(go)
    torch.testing.assert_close(fn(q, k, v, block=block),
                               F.scaled_dot_product_attention(q2, k2, v2, is_causal=True), atol=1e-5, rtol=1e-5)
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("T,block", [(300, 128), (512, 16)])
def test_blocked_hand_written_backward_in_bf16_is_close_to_fp32(T, block):
    # the dtype training actually runs it in: bf16 q, k, v (and upstream gradient), against
    # an fp32 reference on the same bf16-rounded inputs. bf16 keeps 8 bits of mantissa, so
    # each element may be off by about 2^-8 relative; norm-wise the output and gradients
    # stay within 0.75%. The key and value gradients are summed over every later block in
    # fp32: with many blocks (512 / 16 = 32) that keeps them closer to fp32 than the same
    # blocked computation left to autograd, which sums them in bf16
    torch.manual_seed(0)
    B, H, hs = 2, 3, 16
    q, k, v = (torch.randn(B, T, H, hs).transpose(1, 2).bfloat16() for _ in range(3))
    go = torch.randn(B, H, T, hs).bfloat16()

    def run(fn, dtype):
        ins = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        out = fn(*ins)
        out.backward(go.to(dtype))
        return [out.detach().float()] + [t.grad.float() for t in ins]

    ref = run(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), torch.float32)
    got = run(lambda a, b, c: blocked_causal_attention(a, b, c, block=block), torch.bfloat16)
    ops = run(lambda a, b, c: blocked_attention_ops(a, b, c, block=block), torch.bfloat16)
    for name, g, o, r in zip(("out", "dq", "dk", "dv"), got, ops, ref):
        assert g.shape == r.shape
        rel = ((g - r).norm() / r.norm()).item()
        rel_ops = ((o - r).norm() / r.norm()).item()
        assert rel < 0.0075, (name, rel)
        assert rel <= 1.05 * rel_ops, (name, rel, rel_ops)
        assert (g - r).abs().max() < 0.05 * r.abs().max(), name


def test_blocked_attention_with_dropout_takes_the_autograd_path():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 8, requires_grad=True) for _ in range(3))
    out = blocked_causal_attention(q, k, v, block=4, dropout_p=0.5)
    out.sum().backward()
    assert out.shape == (1, 2, 10, 8) and q.grad is not None and v.grad is not None
    # dropout changes the result (same seed without dropout differs)
    assert not torch.allclose(out, blocked_causal_attention(q, k, v, block=4))

    # and its gradients are right: with the dropout mask fixed by reseeding, in float64,
    # against finite differences
    def dropped(q, k, v):
        torch.manual_seed(1)
        return blocked_causal_attention(q, k, v, block=4, dropout_p=0.5)

    q64, k64, v64 = (torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(dropped, (q64, k64, v64))
    with torch.no_grad():  # some weights dropped (zero), the kept ones scaled by 1 / (1 - p)
        assert not torch.allclose(dropped(q64, k64, v64), blocked_causal_attention(q64, k64, v64, block=4))


def test_bf16_training_attention_path_is_close_to_fp32():
    # under bf16 autocast with gradients on, BlockedCausalSelfAttention takes the blocked path
    torch.manual_seed(0)
    attn = BlockedCausalSelfAttention.from_attention(CausalSelfAttention(64, 4))
    x = torch.randn(2, 300, 64)
    ref = attn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attn(x)
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max() < 0.05


def test_blocked_attention_is_taken_only_where_documented(monkeypatch):
    calls = []
    real = ba.blocked_causal_attention
    monkeypatch.setattr(ba, "blocked_causal_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    attn = BlockedCausalSelfAttention.from_attention(CausalSelfAttention(32, 2))
    attn.force = True  # wherever it applies, not only where measured faster

    def taken(T=16, bf16=True, grad=True, cache=False) -> bool:
        calls.clear()
        x = torch.randn(1, T, 32)
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if cache:
                from llmscratch.models.attention import KVCache

                c = KVCache(1, 2, 2 * T, 16, dtype=torch.bfloat16)
                attn(x, c, 0)
                calls.clear()
                attn(x, c, T)  # a chunk after a cached prefix
            else:
                attn(x)
        return bool(calls)

    assert taken()
    assert not taken(bf16=False)  # fp32: the fused kernel is as fast
    assert not taken(grad=False)  # inference
    assert not taken(T=ba.BLOCKED_MAX_T + 1)  # long sequences: the fused kernel wins again
    assert not taken(cache=True)  # a cached prefix: the masked fused kernel


# ------------------------------------------------------------------ fused LM-head loss
@pytest.mark.parametrize("chunk", [50, 2**40])
def test_fused_loss_equals_plain_loss_and_gradients(chunk):
    torch.manual_seed(0)
    model = GPT(tiny(tie_weights=False))
    x = torch.randint(0, 97, (3, 20))
    y = torch.randint(0, 97, (3, 20))
    y[0, 4:9] = -100  # ignored positions
    ref = lm_loss(model(x), y)
    ref.backward()
    g_ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = fused_lm_loss(model.hidden_states(x), model.lm_head.weight, y, chunk_elements=chunk * 97)
    (2 * loss).backward()  # a non-unit upstream gradient flows through too
    torch.testing.assert_close(loss, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * g_ref[n], atol=1e-6, rtol=1e-5)


def test_fused_loss_under_bf16_autocast_is_close():
    torch.manual_seed(0)
    model = GPT(tiny())
    x = torch.randint(0, 97, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = lm_loss(model(x), x)
    ref.backward()
    g_ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = fused_lm_loss(model.hidden_states(x), model.lm_head.weight, x)
    fused.backward()
    assert fused.dtype == torch.float32
    assert abs(fused.item() - ref.item()) < 2e-2
    for n, p in model.named_parameters():  # bf16 rounding differs, the direction does not
        cos = F.cosine_similarity(p.grad.flatten(), g_ref[n].flatten(), dim=0)
        assert cos > 0.99, (n, cos.item())


@pytest.mark.parametrize("tie", [True, False])
def test_lm_head_loss_with_kernels_equals_plain_loss_with_gradients(tie, monkeypatch):
    torch.manual_seed(0)
    plain = GPT(tiny(tie_weights=tie))
    fast = GPT(tiny(tie_weights=tie))
    fast.load_state_dict(plain.state_dict())
    apply_kernels(fast, force=True)  # the fused loss, not only where measured faster
    x = torch.randint(0, 97, (3, 20))
    y = torch.randint(0, 97, (3, 20))
    y[1, :5] = -100
    fused_calls = []
    import llmscratch.kernels.linear_cross_entropy as lce

    real = lce.fused_lm_loss
    monkeypatch.setattr(lce, "fused_lm_loss", lambda *a, **k: fused_calls.append(1) or real(*a, **k))
    ref = lm_head_loss(plain, plain.hidden_states(x), y)
    assert not fused_calls  # the reference model: full logits + lm_loss
    torch.testing.assert_close(ref, lm_loss(plain(x), y))
    got = lm_head_loss(fast, fast.hidden_states(x), y)
    assert fused_calls  # the kernel model: the fused head + cross-entropy
    ref.backward()
    got.backward()
    torch.testing.assert_close(got, ref)
    for (n, a), b in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=n)


# ------------------------------------------------------------------ apply_kernels
def test_reference_model_is_plain_and_kernels_swap_in_place():
    torch.manual_seed(0)
    model = GPT(tiny())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is nn.Linear for m in linears)
    assert all(type(b.attn) is CausalSelfAttention for b in model.h)
    assert not has_kernels(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    assert apply_kernels(model) is model
    assert has_kernels(model)
    assert isinstance(model.lm_head, FusedLMHead) and model.lm_head.weight is model.wte.weight
    assert all(type(b.attn) is BlockedCausalSelfAttention and type(b.attn.c_attn) is SplitLinear
               and type(b.mlp.c_fc) is SplitLinear for b in model.h)
    assert [id(p) for p in model.parameters()] == params  # the same Parameters, nothing copied
    assert model.state_dict().keys() == state.keys()
    apply_kernels(model)  # idempotent
    assert [id(p) for p in model.parameters()] == params


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_kernel_model_logits_equal_reference(amp):
    torch.manual_seed(0)
    plain = GPT(tiny()).train()  # train mode + autograd on: the training kernels are taken
    fast = GPT(tiny()).train()
    fast.load_state_dict(plain.state_dict())
    apply_kernels(fast, force=True)  # every kernel where it applies
    x = torch.randint(0, 97, (2, 32))
    with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        ref, got = plain(x), fast(x)
    if amp is None:
        torch.testing.assert_close(got, ref)
    else:  # blocked attention rounds the scores to bf16 where the fused kernel does not
        assert got.dtype == ref.dtype == torch.bfloat16
        assert ((got.float() - ref.float()).norm() / ref.float().norm()) < 0.02
    with torch.no_grad():  # decoding rows: the split path
        torch.testing.assert_close(fast(x[:, :1]), plain(x[:, :1]), atol=1e-5, rtol=1e-5)


def test_kernel_model_generates_the_same_tokens_and_quantizes():
    from llmscratch.decoding.generate import generate
    from llmscratch.kernels.quantize import Int8Linear, quantize_int8

    torch.manual_seed(0)
    plain = GPT(tiny()).eval()
    fast = GPT(tiny()).eval()
    fast.load_state_dict(plain.state_dict())
    apply_kernels(fast, force=True)
    idx = torch.randint(0, 97, (2, 5))
    assert torch.equal(generate(fast, idx, 20), generate(plain, idx, 20))
    quantize_int8(fast)  # the int8 path swaps the kernel linears too
    assert isinstance(fast.lm_head, Int8Linear) and not any(isinstance(m, nn.Linear) for m in fast.modules())
    assert torch.equal(generate(fast, idx, 10), generate(fast, idx, 10, use_cache=False))


# ------------------------------------------------------------------ malloc setting
def test_reuse_freed_memory_applies_on_glibc_and_can_be_turned_off():
    code = "from llmscratch.kernels.malloc import reuse_freed_memory; print(reuse_freed_memory())"
    env = {k: v for k, v in os.environ.items() if k != "LLMSCRATCH_MALLOC"}
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env | {"LLMSCRATCH_MALLOC": "system"})
    assert off.stdout.strip() == "False"
    if sys.platform.startswith("linux"):
        assert on.stdout.strip() == "True"


def test_load_model_applies_kernels_only_when_asked(tmp_path):
    from llmscratch.checkpoints.run import load_model, save_model
    from llmscratch.kernels.quantize import Int8Linear
    from llmscratch.tokenizer import get_tokenizer

    torch.manual_seed(0)
    save_model(GPT(GPTConfig.from_name("tiny", context_length=32)), tmp_path / "run", get_tokenizer("gpt2"))
    plain, _ = load_model(str(tmp_path / "run"))
    fast, _ = load_model(str(tmp_path / "run"), kernels=True)
    assert not has_kernels(plain) and has_kernels(fast)
    assert isinstance(fast.lm_head, FusedLMHead) and fast.lm_head.weight is fast.wte.weight
    idx = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(fast(idx), plain(idx))
    q, _ = load_model(str(tmp_path / "run"), dtype="int8", kernels=True)
    # int8 weights take no kernel (no fp32 linear; blocked attention serves training only):
    # the model runs the reference's own modules, even when the kernels are applied again
    assert isinstance(q.lm_head, Int8Linear) and not has_kernels(q)
    assert not has_kernels(apply_kernels(q, force=True))


@pytest.mark.parametrize("flags,expected", [([], True), (["--no-kernels"], False)])
def test_cli_applies_kernels_by_default_and_no_kernels_gives_the_reference(flags, expected, monkeypatch, capsys):
    import llmscratch.checkpoints.run as checkpoint
    from llmscratch.cli import main

    loaded = []
    real = checkpoint.load_model

    def spy(*a, **k):
        model, tok = real(*a, **k)
        loaded.append(has_kernels(model))
        return model, tok

    monkeypatch.setattr(checkpoint, "load_model", spy)
    assert main(["generate", "--model", "tiny", "--prompt", "hi", "--max-new-tokens", "2", *flags]) == 0
    assert loaded == [expected]


def test_kernels_after_lora_keep_the_lora_layers_and_outputs():
    from llmscratch.finetune.lora import LoRALinear, apply_lora

    torch.manual_seed(0)
    model = GPT(tiny()).train()
    apply_lora(model, rank=2, alpha=4)
    for m in model.modules():  # a trained-looking update, so LoRA changes the outputs
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.1)
    x = torch.randint(0, 97, (2, 16))
    ref = model(x)
    apply_kernels(model)
    assert any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(b.attn) is BlockedCausalSelfAttention for b in model.h)
    torch.testing.assert_close(model(x), ref)


def test_a_bf16_model_keeps_plain_linears_an_fp32_one_gets_the_split():
    """The split runs on fp32 weights only: a model already in bf16 when the kernels are
    applied (as `load_model(dtype=bfloat16, kernels=True)` does) keeps plain `nn.Linear`s,
    so its decoding runs the reference's code; the LM head is swapped either way (the fused
    loss serves bf16 autocast training)."""
    for dtype, block_linear in ((torch.float32, SplitLinear), (torch.bfloat16, nn.Linear)):
        model = apply_kernels(GPT(GPTConfig.from_name("tiny")).to(dtype))
        kinds = {type(m) for name, m in model.named_modules() if name.startswith("h.") and isinstance(m, nn.Linear)}
        assert kinds == {block_linear}, (dtype, kinds)
        assert type(model.lm_head) is FusedLMHead
