"""What a GPU run needs, checked on the CPU: MFU (by hand), the GPU peak table, TensorBoard
beside metrics.jsonl, `--compile` training like eager, and the GPT-2 124M recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmscratch.cli.args import load_config_file
from llmscratch.models.gpt import GPT, GPTConfig
from llmscratch.train import TrainConfig, pretrain
from llmscratch.train.mfu import device_peak_flops, gpu_peak_tflops, mfu

REPO = Path(__file__).resolve().parents[1]
TINY = dict(model="tiny", tokenizer="bpe:320", context_length=32, batch_size=4, eval_every=3, eval_batches=2,
            sample_tokens=0, warmup_steps=2, lr=3e-3, precision="fp32", progress=False, seed=7, dropout=0.0)


def test_flops_per_token_and_mfu_by_hand():
    # GPT-2's block at width C: qkv C*3C+3C, attention out C*C+C, MLP C*4C+4C and 4C*C+C,
    # two LayerNorms 2*2C = 12C^2 + 13C; plus ln_f 2C and the (tied) head's matmul V*C
    L, C, V, T = 2, 64, 320, 32  # tiny: 4 heads of 16
    model = GPT(GPTConfig.from_name("tiny", vocab_size=V, context_length=T))
    n_blocks = L * (12 * C * C + 13 * C) + 2 * C
    assert model.num_params(include_embeddings=False) == n_blocks
    by_hand = 6 * (n_blocks + V * C) + 12 * L * C * T  # 6N + attention (12·L·C·T)
    assert by_hand == 6 * (100_096 + 20_480) + 49_152 == 772_608
    assert model.flops_per_token() == by_hand
    # 2,000 tokens/s on 2 devices of 1 TFLOP/s peak each
    assert mfu(by_hand, 2000.0, 1e12, devices=2) == pytest.approx(772_608 * 2000 / 2e12)
    assert mfu(by_hand, 2000.0, 1e12, devices=2) == pytest.approx(7.72608e-4)


def test_gpu_peak_table_names_what_torch_reports():
    names = {"NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 PCIe": 756, "NVIDIA H200": 989,
             "NVIDIA A100-SXM4-80GB": 312, "NVIDIA A100-PCIE-40GB": 312, "NVIDIA L4": 121, "NVIDIA A10G": 70,
             "NVIDIA GeForce RTX 4090": 165, "NVIDIA GeForce RTX 3090": 71, "NVIDIA L40S": 362}
    for name, tflops in names.items():
        assert gpu_peak_tflops(name) == tflops, name
    assert gpu_peak_tflops("Some Future Accelerator") is None


def test_cpu_peak_is_measured_and_leaves_the_rng_alone(monkeypatch):
    before = torch.get_rng_state()
    peak = device_peak_flops(torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)  # exact resume depends on it
    assert 1e8 < peak < 1e14  # a real CPU's fp32 matmul rate
    monkeypatch.setenv("LLMSCRATCH_PEAK_TFLOPS", "2.5")
    assert device_peak_flops(torch.device("cpu")) == 2.5e12


def test_metrics_carry_mfu_and_tensorboard_logs_them(tmp_path, corpus_file):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = pretrain(TrainConfig(**TINY, data=str(corpus_file), out=str(tmp_path / "run"), max_steps=3,
                               logger="tensorboard"))
    records = [json.loads(line) for line in (res.out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    flops = GPT(GPTConfig.from_name("tiny", vocab_size=320, context_length=32)).flops_per_token()
    peak = device_peak_flops(torch.device("cpu"))
    for r in records:  # mfu is the formula applied to the step's own tokens/s
        assert r["mfu"] == pytest.approx(flops * r["tokens_per_s"] / peak)
    events = EventAccumulator(str(res.out / "tensorboard"))
    events.Reload()
    assert {"train_loss", "mfu", "lr", "val_loss"} <= set(events.Tags()["scalars"])
    logged = [(e.step, e.value) for e in events.Scalars("train_loss")]
    assert logged == [(r["step"], pytest.approx(r["train_loss"])) for r in records]


@pytest.mark.slow
def test_compile_trains_like_eager(tmp_path, corpus_file):
    """`--compile` (torch.compile of the model and its loss) on the CPU: the same losses as eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = pretrain(TrainConfig(**TINY, data=str(corpus_file), out=str(tmp_path / "eager"), max_steps=2,
                                 kernels=False))
    assert counters["stats"]["unique_graphs"] == 0
    compiled = pretrain(TrainConfig(**TINY, data=str(corpus_file), out=str(tmp_path / "compiled"), max_steps=2,
                                    kernels=False, compile=True))
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo did capture the loss module

    def losses(out):
        return [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert compiled.step == 2
    assert losses(compiled.out) == pytest.approx(losses(eager.out), abs=1e-4)


def test_gpt2_124m_recipe_parses_and_builds_the_model():
    values = load_config_file(str(REPO / "recipes" / "gpt2-124m.toml"), TrainConfig)
    cfg = TrainConfig(**values)
    cfg.validate()
    assert (cfg.model, cfg.tokenizer, cfg.lr, cfg.weight_decay, cfg.beta1, cfg.beta2) == (
        "gpt2-124m", "gpt2", 6e-4, 0.1, 0.9, 0.95)
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name(cfg.model, vocab_size=50257, **cfg.model_overrides()))
    T = model.config.context_length
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd, T) == (12, 12, 768, 1024)
    assert round(model.num_params() / 1e6, 1) == 124.4  # GPT-2 small, tied head counted once
    tokens_per_step = cfg.batch_size * cfg.grad_accum * T
    assert tokens_per_step == 2**19  # ~0.5M tokens per optimizer step
    assert 9.9e9 < cfg.max_steps * tokens_per_step < 10.1e9  # ~10B tokens
    assert 0 < cfg.warmup_steps < cfg.max_steps // 10 and cfg.precision == "bf16" and cfg.compile


def test_cuda_training_puts_flash_attention_first():
    """The loop's SDPA priority on CUDA (entered here without a GPU: it only sets the order)."""
    from torch.nn.attention import SDPBackend

    from llmscratch.train.loop import flash_attention_first

    before = torch._C._get_sdp_priority_order()
    with flash_attention_first(torch.device("cuda")):
        order = torch._C._get_sdp_priority_order()
        assert order[0] == int(SDPBackend.FLASH_ATTENTION) and order[-1] != int(SDPBackend.FLASH_ATTENTION)
        assert order.index(int(SDPBackend.MATH)) > order.index(int(SDPBackend.CUDNN_ATTENTION))
    assert torch._C._get_sdp_priority_order() == before
    with flash_attention_first(torch.device("cpu")):  # the CPU's dispatch is left alone
        assert torch._C._get_sdp_priority_order() == before
