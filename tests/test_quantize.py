"""int8 weight-only quantization: the math, the layer against its float original, decoding."""

import pytest
import torch

from llmscratch.decoding.generate import generate
from llmscratch.models.gpt import GPT, GPTConfig
from llmscratch.kernels.quantize import Int8Linear, quantize_int8, quantize_weight_int8


def test_quantize_weight_round_trip_error_is_bounded():
    torch.manual_seed(0)
    w = torch.randn(64, 48)
    q, scale = quantize_weight_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert torch.all(q.abs().amax(dim=1) == 127)  # each row uses the full range
    # rounding error at most half a step per element
    assert torch.all((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_matches_float_linear(bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96, bias=bias)
    q = Int8Linear(lin)
    x = torch.randn(3, 5, 64)
    ref = lin(x)
    out = q(x).float()
    assert out.shape == ref.shape
    assert ((out - ref).norm() / ref.norm()) < 0.02
    # the fast kernel and the plain dequantize-then-matmul agree
    deq = x.reshape(-1, 64).bfloat16() @ (q.weight.bfloat16() * q.scale[:, None]).t()
    if q.bias is not None:
        deq = deq + q.bias
    torch.testing.assert_close(out.reshape(-1, 96), deq.float(), atol=0.05, rtol=0.02)


def test_quantized_model_logits_close_and_cache_consistent():
    torch.manual_seed(0)
    cfg = GPTConfig.from_name("tiny", vocab_size=211, context_length=32)
    model = GPT(cfg).eval()
    qmodel = GPT(cfg)
    qmodel.load_state_dict(model.state_dict())
    quantize_int8(qmodel)
    assert isinstance(qmodel.lm_head, Int8Linear) and isinstance(qmodel.h[0].attn.c_attn, Int8Linear)
    assert qmodel.wte.weight.dtype == torch.bfloat16
    idx = torch.randint(0, 211, (2, 12))
    ref, out = model(idx), qmodel(idx).float()
    assert ((out - ref).norm() / ref.norm()) < 0.05
    # KV-cache decoding on the quantized model equals its own full recompute
    assert torch.equal(generate(qmodel, idx, 25), generate(qmodel, idx, 25, use_cache=False))


def test_load_model_int8(tmp_path):
    from llmscratch.checkpoints.run import load_model, save_model
    from llmscratch.errors import UserError
    from llmscratch.tokenizer import get_tokenizer

    torch.manual_seed(0)
    save_model(GPT(GPTConfig.from_name("tiny", context_length=32)), tmp_path / "run", get_tokenizer("gpt2"))
    model, _ = load_model(str(tmp_path / "run"), dtype="int8")
    assert isinstance(model.lm_head, Int8Linear)
    with pytest.raises(UserError, match="unknown weight precision"):
        load_model(str(tmp_path / "run"), dtype="int4")
