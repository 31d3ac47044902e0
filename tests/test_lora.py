"""LoRA: adapters start as a no-op, train only themselves, and merge into plain weights
that give the same logits and load like any run folder."""

from __future__ import annotations

import pytest
import torch

from llmscratch import GPT, GPTConfig, UserError
from llmscratch.checkpoints.run import load_model, save_model
from llmscratch.finetune.lora import LoRALinear, apply_lora, has_lora, merge_lora
from llmscratch.tokenizer import get_tokenizer


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, context_length=16, n_embd=32, n_layer=2, n_head=2)).eval()


def test_adapters_start_as_a_noop_and_only_they_train():
    model = tiny_model()
    x = torch.randint(0, 64, (2, 10))
    before = model(x)
    wrapped = apply_lora(model, rank=4, alpha=8)
    assert wrapped == [f"h.{i}.{t}" for i in range(2)
                       for t in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    torch.testing.assert_close(model(x), before)  # B starts at zero
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # rank 4 on each of 4 projections per block: r * (in + out)
    C = 32
    expected = 2 * 4 * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_merged_logits_equal_adapted_logits(tmp_path):
    model = tiny_model()
    apply_lora(model, rank=4, alpha=16)
    # move the adapters away from zero, as training would
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.05)
    x = torch.randint(0, 64, (3, 12))
    adapted = model(x)
    assert merge_lora(model) == 8 and not has_lora(model)
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
    assert set(model.state_dict()) == set(tiny_model().state_dict())  # GPT-2 names again
    # the merged model is a plain run folder
    save_model(model, tmp_path / "run", get_tokenizer("gpt2"))
    loaded, _ = load_model(str(tmp_path / "run"))
    torch.testing.assert_close(loaded(x), adapted, atol=1e-5, rtol=1e-5)


def test_training_moves_only_the_adapters():
    model = tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=2, alpha=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 64, (2, 8))
    model.train()
    for _ in range(3):
        loss = model(x).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    sd = model.state_dict()
    for k, v in base.items():
        wrapped = k.rsplit(".", 1)
        key = k if k in sd else f"{wrapped[0]}.base.{wrapped[1]}"
        torch.testing.assert_close(sd[key], v)  # frozen
    assert any(m.lora_B.abs().sum() > 0 for m in model.modules() if isinstance(m, LoRALinear))


def test_bad_rank_is_a_user_error():
    with pytest.raises(UserError, match="--lora-rank"):
        apply_lora(tiny_model(), rank=0, alpha=8)
