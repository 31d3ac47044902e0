"""The attention progression, and the fast path against the naive formula."""

import math

import pytest
import torch

from llmscratch.models.attention import (
    CausalAttention,
    CausalSelfAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SelfAttention,
    simplified_self_attention,
)


def test_simplified_attention_matches_definition():
    x = torch.randn(5, 3)
    out = simplified_self_attention(x)
    w = torch.empty(5, 5)
    for i in range(5):
        for j in range(5):
            w[i, j] = x[i] @ x[j]
    w = torch.softmax(w, dim=-1)
    assert torch.allclose(out, w @ x, atol=1e-6)
    assert torch.allclose(w.sum(-1), torch.ones(5))


def test_self_attention_weights_are_row_stochastic():
    sa = SelfAttention(4, 6)
    x = torch.randn(2, 7, 4)
    w = sa.attention_weights(x)
    assert w.shape == (2, 7, 7)
    assert torch.allclose(w.sum(-1), torch.ones(2, 7), atol=1e-6)
    assert sa(x).shape == (2, 7, 6)


def test_causal_attention_ignores_the_future():
    ca = CausalAttention(4, 4, context_length=8).eval()
    x = torch.randn(1, 6, 4)
    w = ca.attention_weights(x)
    assert torch.all(w.triu(1) == 0)
    # changing a later token leaves earlier outputs unchanged
    y1 = ca(x)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(1, 2, 4)
    y2 = ca(x2)
    assert torch.allclose(y1[:, :4], y2[:, :4], atol=1e-6)
    assert not torch.allclose(y1[:, 4:], y2[:, 4:])


def test_wrapper_concatenates_heads():
    mha = MultiHeadAttentionWrapper(4, 3, context_length=8, n_head=2).eval()
    x = torch.randn(2, 5, 4)
    out = mha(x)
    assert out.shape == (2, 5, 6)
    # the wrapper's output is its heads' outputs side by side, in order
    assert torch.equal(out, torch.cat([head(x) for head in mha.heads], dim=-1))


def _copy_into_fast(naive: MultiHeadAttention, fast: CausalSelfAttention) -> None:
    with torch.no_grad():
        fast.c_attn.weight.copy_(torch.cat([naive.W_query.weight, naive.W_key.weight, naive.W_value.weight]))
        fast.c_attn.bias.copy_(torch.cat([naive.W_query.bias, naive.W_key.bias, naive.W_value.bias]))
        fast.c_proj.weight.copy_(naive.out_proj.weight)
        fast.c_proj.bias.copy_(naive.out_proj.bias)


@pytest.mark.parametrize("B,T,C,H", [(1, 1, 8, 2), (2, 7, 16, 4), (3, 32, 24, 3)])
def test_fast_path_equals_naive_formula(B, T, C, H):
    naive = MultiHeadAttention(C, C, context_length=64, n_head=H, qkv_bias=True).eval()
    fast = CausalSelfAttention(C, H, qkv_bias=True).eval()
    _copy_into_fast(naive, fast)
    x = torch.randn(B, T, C)
    torch.testing.assert_close(fast(x), naive(x), atol=1e-5, rtol=1e-5)


def test_fast_path_matches_explicit_math_with_gradients():
    """Gradients through sdpa equal gradients through the written-out formula."""
    C, H, T = 16, 4, 9
    naive = MultiHeadAttention(C, C, context_length=T, n_head=H, qkv_bias=True)
    fast = CausalSelfAttention(C, H, qkv_bias=True)
    _copy_into_fast(naive, fast)
    x = torch.randn(2, T, C, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    naive(x).square().sum().backward()
    fast(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        fast.c_attn.weight.grad,
        torch.cat([naive.W_query.weight.grad, naive.W_key.weight.grad, naive.W_value.weight.grad]),
        atol=1e-5, rtol=1e-4,
    )


def test_kv_cache_chunks_equal_full_attention():
    from llmscratch.models.attention import KVCache

    C, H = 16, 4
    attn = CausalSelfAttention(C, H).eval()
    x = torch.randn(2, 10, C)
    full = attn(x)
    cache = KVCache(2, H, 16, C // H)
    parts = [attn(x[:, :4], cache, 0), attn(x[:, 4:7], cache, 4), attn(x[:, 7:8], cache, 7),
             attn(x[:, 8:], cache, 8)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_scaling_keeps_softmax_unsaturated():
    """Without the 1/sqrt(d) scale, scores of wide heads saturate the softmax."""
    torch.manual_seed(1)
    q, k = torch.randn(1, 256), torch.randn(20, 256)
    unscaled = torch.softmax(q @ k.T, -1).max()
    scaled = torch.softmax(q @ k.T / math.sqrt(256), -1).max()
    assert scaled < unscaled


def test_bidirectional_switch_equals_unmasked_formula():
    """causal=False: every query sees every key, i.e. softmax(q k^T / sqrt(hs)) v, no mask."""
    torch.manual_seed(0)
    C, H, T = 16, 4, 6
    attn = CausalSelfAttention(C, H, causal=False).eval()
    x = torch.randn(2, T, C)
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(2, T, H, C // H).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // H), dim=-1)
    ref = attn.c_proj((weights @ v).transpose(1, 2).reshape(2, T, C))
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)
    # and it differs from the causal layer with the same weights (the switch does something)
    causal = CausalSelfAttention(C, H).eval()
    causal.load_state_dict(attn.state_dict())
    assert not torch.allclose(causal(x)[:, :-1], ref[:, :-1], atol=1e-3)
    torch.testing.assert_close(causal(x)[:, -1], ref[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_key_mask_hides_padding(causal):
    """A row padded with junk tokens, masked out, gives the unpadded row's outputs."""
    torch.manual_seed(0)
    C, H = 16, 4
    attn = CausalSelfAttention(C, H, causal=causal).eval()
    x = torch.randn(1, 5, C)
    junk = torch.randn(1, 3, C) * 10
    if causal:  # left padding, as ragged decoding uses
        padded, mask, real = torch.cat([junk, x], 1), torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]), slice(3, 8)
    else:  # right padding, as encoder batches use
        padded, mask, real = torch.cat([x, junk], 1), torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]]), slice(0, 5)
    out = attn(padded, key_mask=mask.bool())
    torch.testing.assert_close(out[:, real], attn(x), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()  # padding queries see themselves: no NaN rows
