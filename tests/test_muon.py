"""Muon: the optimizer step against a step written out by hand, its AdamW half against
PyTorch's AdamW, the orthogonalisation against an SVD, and a short training run."""

from __future__ import annotations

import math

import pytest
import torch

from llmscratch.models.gpt import GPT, GPTConfig
from llmscratch.train.muon import Muon, muon_param_groups, newton_schulz


@pytest.mark.parametrize("shape", [(32, 32), (16, 48), (48, 16)])
def test_newton_schulz_approximates_the_orthogonal_factor(shape):
    torch.manual_seed(0)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k))
    s = torch.logspace(-1.5, 0, k)  # singular values spread over 1.5 orders of magnitude
    g = u @ torch.diag(s) @ v.T
    x = newton_schulz(g)
    # x keeps g's singular vectors: u^T x v is diagonal ...
    core = u.T @ x @ v
    torch.testing.assert_close(core, torch.diag(torch.diagonal(core)), atol=1e-4, rtol=0)
    # ... and its singular values are pushed towards 1 (five steps reach about 0.7-1.2)
    assert torch.diagonal(core).min() > 0.6 and torch.diagonal(core).max() < 1.25


def _plain_muon_step(w, grad, buf, lr, wd, mu=0.95):
    """The step as the docstring writes it, with the quintic spelled out."""
    buf = mu * buf + grad
    n = grad + mu * buf
    wide = n.T if n.shape[0] > n.shape[1] else n
    x = wide / (wide.norm() + 1e-7)
    for _ in range(5):
        a = x @ x.T
        x = 3.4445 * x - 4.7750 * a @ x + 2.0315 * a @ a @ x
    update = x.T if n.shape[0] > n.shape[1] else x
    w = w * (1 - lr * wd) - lr * 0.2 * math.sqrt(max(w.shape)) * update
    return w, buf


def test_muon_step_equals_plain_reference_step():
    torch.manual_seed(0)
    w0 = torch.randn(24, 40)
    w = torch.nn.Parameter(w0.clone())
    opt = Muon([{"params": [w], "muon": True, "weight_decay": 0.1}], lr=0.01)
    ref, buf = w0.clone(), torch.zeros_like(w0)
    for _ in range(3):
        grad = torch.randn_like(w0)
        w.grad = grad.clone()
        opt.step()
        ref, buf = _plain_muon_step(ref, grad, buf, lr=0.01, wd=0.1)
        torch.testing.assert_close(w.detach(), ref, atol=1e-5, rtol=1e-5)


def test_adamw_groups_equal_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(7, 5))
    b = torch.nn.Parameter(a.detach().clone())
    mine = Muon([{"params": [a], "weight_decay": 0.1}], lr=3e-3, betas=(0.9, 0.95))
    theirs = torch.optim.AdamW([b], lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(4):
        g = torch.randn(7, 5)
        a.grad, b.grad = g.clone(), g.clone()
        mine.step()
        theirs.step()
    torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=1e-5)


def test_groups_split_matrices_from_embeddings_and_vectors():
    model = GPT(GPTConfig.from_name("tiny", vocab_size=64))
    muon, adam_decay, adam_no_decay = muon_param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert muon["muon"] and all(".attn." in names[id(p)] or ".mlp." in names[id(p)] for p in muon["params"])
    assert {names[id(p)] for p in adam_decay["params"]} == {"wte.weight", "wpe.weight"}
    assert all(p.dim() == 1 for p in adam_no_decay["params"]) and adam_no_decay["weight_decay"] == 0.0
    total = sum(len(g["params"]) for g in (muon, adam_decay, adam_no_decay))
    assert total == len(list(model.parameters()))  # every parameter once (the tied head too)
    with pytest.raises(ValueError, match="2-D"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(3))], "muon": True}])


def test_muon_trains_a_tiny_model_and_its_state_round_trips():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny", vocab_size=64, dropout=0.0))
    opt = Muon(muon_param_groups(model, 0.0), lr=3e-3)
    x = torch.randint(0, 64, (4, 33))
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    again = Muon(muon_param_groups(model, 0.0), lr=3e-3)
    again.load_state_dict(opt.state_dict())
    saved, loaded = opt.state_dict()["state"], again.state_dict()["state"]
    assert loaded.keys() == saved.keys() and len(saved) > 0
    for k in saved:  # every buffer (momentum, Adam moments, step counts) comes back by value
        assert loaded[k].keys() == saved[k].keys()
        for name, value in saved[k].items():
            assert torch.equal(torch.as_tensor(loaded[k][name]), torch.as_tensor(value)), (k, name)
        assert any(torch.as_tensor(v).abs().sum() > 0 for v in saved[k].values())  # not all zero
