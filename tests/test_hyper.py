"""hyper.py: diagonal scaling against the HyperAdapt paper's properties (rank bound, normalised rank) and
an fp32 reference on a bf16 base; the tests it shares with RoCoFT (ROCOFT_HYPER) are in test_rocoft.py."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import hyper
from conftest import merge, prepare


def test_hyper_ignores_rank_with_a_note(capsys):
    cli.parse_args(["--method", "hyper", "--rank", "7"])
    assert "note: --rank 7 ignored: hyper has no rank" in capsys.readouterr().out


class Toy(nn.Module):
    """One target matrix, y = W x, to train on a regression problem."""

    def __init__(self, W0):
        super().__init__()
        self.q_proj = nn.Linear(W0.shape[1], W0.shape[0], bias=False, dtype=W0.dtype)
        with torch.no_grad():
            self.q_proj.weight.copy_(W0)

    def forward(self, x):
        return self.q_proj(x)


def fit(module, params, W0, steps=150, lr=2e-2):
    """Regress onto T = diag(a*) W0 diag(b*) + noise, so the update is large."""
    g = torch.Generator().manual_seed(3)
    n_out, n_in = W0.shape
    T = (1 + 0.5 * torch.randn(n_out, 1, generator=g, dtype=W0.dtype)) * W0 * (1 + 0.5 * torch.randn(1, n_in, generator=g, dtype=W0.dtype))
    T = T + 0.1 * torch.randn(n_out, n_in, generator=g, dtype=W0.dtype)
    X = torch.randn(128, n_in, generator=g, dtype=W0.dtype)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if not isinstance(params, torch.optim.Optimizer) else params
    for _ in range(steps):
        loss = F.mse_loss(module(X), X @ T.T)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def hyper_delta(W0):
    toy = Toy(W0)
    opt = prepare("hyper", toy, None, targets=["q_proj"], lr=2e-2)
    fit(toy, opt, W0)
    n_params = sum(p.numel() for g in opt.param_groups for p in g["params"])
    merge("hyper", toy, opt)
    return toy.q_proj.weight.detach() - W0, n_params


def test_hyper_rank_bound_on_low_rank_W0():
    g = torch.Generator().manual_seed(0)
    W0 = (torch.randn(24, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 40, generator=g, dtype=torch.float64)) / 6
    dW, _ = hyper_delta(W0)
    rank = torch.linalg.matrix_rank(dW).item()
    assert torch.linalg.matrix_rank(W0).item() == 3
    assert 3 < rank <= min(2 * 3, 24, 40)  # Lemma: rank(ΔW) <= min(2 rank(W0), n_out, n_in); above rank(W0)


def normalised_rank(dW, W0):
    """The paper's measure: #singular values of ΔW >= 1e-2, over rank(W0)."""
    return (torch.linalg.svdvals(dW) >= 1e-2).sum().item() / torch.linalg.matrix_rank(W0).item()


def test_hyper_normalised_rank_far_above_lora_with_same_budget():
    g = torch.Generator().manual_seed(0)
    n_out, n_in = 24, 40
    W0 = torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in)  # full rank 24
    dW_hyper, n_hyper = hyper_delta(W0)
    # a rank-1 LoRA has r (n_out + n_in) = n_out + n_in parameters: the same budget
    B = nn.Parameter(torch.zeros(n_out, 1))
    A = nn.Parameter(torch.randn(1, n_in, generator=g) / math.sqrt(n_in))
    assert B.numel() + A.numel() == n_hyper
    fit(lambda x: F.linear(x, W0) + (x @ A.T) @ B.T, [A, B], W0)
    dW_lora = (B @ A).detach()
    nr_hyper, nr_lora = normalised_rank(dW_hyper, W0), normalised_rank(dW_lora, W0)
    assert nr_lora <= 1 / n_out
    assert nr_hyper >= 0.75 and nr_hyper >= 10 * nr_lora


def test_hyper_bf16_base_sees_small_scale_changes():
    """A bf16 base (the GPU default): scales of 1.003 must change the output; cast to bf16 first they
    round to 1.0 and did not. The reference computes each product in fp32 and rounds once."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    m = hyper.HyperLinear(lin)
    x = torch.randn(4, 64).to(torch.bfloat16)
    with torch.no_grad():
        same = m(x)
        m.a.fill_(1.003)
        m.b.fill_(1.003)
        moved = m(x)
        ref = ((torch.nn.functional.linear((x.float() * m.b).to(torch.bfloat16), lin.weight)).float() * m.a)
    assert not torch.equal(moved, same)
    assert torch.equal(moved, ref.to(torch.bfloat16))
