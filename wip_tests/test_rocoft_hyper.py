"""Tests for rocoft.py and hyper.py against dense references, brute force and the papers' properties."""
import copy
import itertools
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hyper  # noqa: E402
import rocoft  # noqa: E402
from model import LINEAR_NAMES, ModelConfig, Transformer, find_linears  # noqa: E402

torch.set_num_threads(1)


def tiny():
    # shapes: q/o 64x64, k/v 32x64, gate/up 176x64, down 64x176
    return Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64,
                                   multiple_of=16)).init_weights(0)


def make_args(**kw):
    a = dict(rank=3, targets=list(LINEAR_NAMES), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
             lr_first=1e-2, max_steps=10, grad_accum=1, batch_size=4, seed=0,
             rocoft_mode="row", rocoft_select="first", rocoft_score_batches=2)
    a.update(kw)
    return SimpleNamespace(**a)


def make_data(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, 64, (4, 16), generator=g)
        y = torch.roll(x, -1, 1)
        y[:, :3] = -100  # a "prompt" that is not trained on
        out.append((x, y))
    return out


def train(model, opt, data, steps):
    losses = []
    for x, y in itertools.islice(itertools.cycle(data), steps):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def modules_of(model, cls):
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


METHODS = [("rocoft", dict(rocoft_mode="row", rocoft_select="random")),
           ("rocoft", dict(rocoft_mode="column", rocoft_select="random")),
           ("hyper", {})]
MOD = {"rocoft": rocoft, "hyper": hyper}


# ---------------------------------------------------------------------------- both methods

@pytest.mark.parametrize("method,kw", METHODS)
def test_starts_as_exact_noop_and_merge_keeps_logits(method, kw):
    data = make_data()
    base = tiny()
    x = data[0][0]
    with torch.no_grad():
        ref = base(x)
    model = tiny()
    opt = MOD[method].prepare(model, make_args(**kw), iter(itertools.cycle(data)))
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # exact no-op at initialisation
    train(model, opt, data, 4)
    with torch.no_grad():
        before = model(x)
        assert (before - ref).abs().max() > 1e-4  # it did learn something
        MOD[method].merge(model)
        after = model(x)
    assert set(model.state_dict()) == set(base.state_dict())
    assert all(type(m) is nn.Linear for _, m in find_linears(model, LINEAR_NAMES))
    assert all(m.weight.dtype == torch.float32 and not m.weight.requires_grad for _, m in find_linears(model, LINEAR_NAMES))
    torch.testing.assert_close(after, before, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("method,kw", METHODS)
def test_trainable_count_matches_formula(method, kw):
    model = tiny()
    shapes = [m.weight.shape for _, m in find_linears(tiny(), LINEAR_NAMES)]
    r = 3
    if method == "hyper":
        expected = sum(n_out + n_in for n_out, n_in in shapes)
    elif kw["rocoft_mode"] == "row":
        expected = sum(r * n_in for n_out, n_in in shapes)
    else:
        expected = sum(r * n_out for n_out, n_in in shapes)
    opt = MOD[method].prepare(model, make_args(rank=r, **kw), iter(itertools.cycle(make_data())))
    params = [p for g in opt.param_groups for p in g["params"]]
    names = [n for g in opt.param_groups for n in g["param_names"]]
    assert sum(p.numel() for p in params) == expected
    assert len(names) == len(params) == (2 if method == "hyper" else 1) * len(shapes)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    # nothing else in the model trains (no norms, embeddings, lm_head)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params}
    sd = dict(model.named_parameters())
    assert all(sd[n] is p for n, p in zip(names, params))


@pytest.mark.parametrize("method,kw", METHODS)
def test_checkpoint_round_trip_is_bit_identical(method, kw):
    data = make_data()
    base_keys = set(tiny().state_dict())
    m1 = tiny()
    opt1 = MOD[method].prepare(m1, make_args(**kw), iter(itertools.cycle(data)))
    train(m1, opt1, data, 3)
    saved = {k: v.clone() for k, v in m1.state_dict().items() if k not in base_keys}
    assert set(saved) == set(MOD[method].adapter_state(m1, opt1))
    opt_state = copy.deepcopy(opt1.state_dict())
    losses1 = train(m1, opt1, data[3:], 3)

    # resume on a fresh base model; a different seed proves the row/column index comes from the checkpoint
    m2 = tiny()
    opt2 = MOD[method].prepare(m2, make_args(**kw, seed=123), iter(itertools.cycle(data)))
    if method == "rocoft":
        assert any(not torch.equal(m.index, saved[f"{n}.index"]) for n, m in modules_of(m2, rocoft.RoCoFTLinear).items())
    missing, unexpected = m2.load_state_dict(saved, strict=False)
    assert not unexpected and set(missing) <= base_keys
    opt2.load_state_dict(opt_state)
    losses2 = train(m2, opt2, data[3:], 3)
    assert losses1 == losses2
    s1, s2 = MOD[method].adapter_state(m1, opt1), MOD[method].adapter_state(m2, opt2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.mark.parametrize("method,kw", METHODS)
def test_bf16_base_keeps_fp32_adapter(method, kw):
    model = tiny().to(torch.bfloat16)
    opt = MOD[method].prepare(model, make_args(**kw), iter(itertools.cycle(make_data())))
    x, y = make_data()[0]
    model(x, y)[1].backward()
    for p in (p for g in opt.param_groups for p in g["params"]):
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
    MOD[method].merge(model)
    assert all(m.weight.dtype == torch.bfloat16 for _, m in find_linears(model, LINEAR_NAMES))


# ---------------------------------------------------------------------------- RoCoFT

@pytest.mark.parametrize("mode", ["row", "column"])
def test_rocoft_changes_only_selected_rows_or_columns(mode):
    data = make_data()
    W0 = {n: m.weight.detach().clone() for n, m in find_linears(tiny(), LINEAR_NAMES)}
    model = tiny()
    opt = rocoft.prepare(model, make_args(rocoft_mode=mode, rocoft_select="random"), iter(itertools.cycle(data)))
    index = {n: m.index.tolist() for n, m in modules_of(model, rocoft.RoCoFTLinear).items()}
    train(model, opt, data, 4)
    rocoft.merge(model)
    for n, m in find_linears(model, LINEAR_NAMES):
        changed = (m.weight - W0[n]) != 0
        touched = changed.any(1) if mode == "row" else changed.any(0)
        assert touched.nonzero().flatten().tolist() == index[n]  # exactly the selected ones, all of them


class DenseRoCoFT(nn.Module):
    """Reference: W = W0 + mask ⊙ Δ with a dense trainable Δ."""

    def __init__(self, W0, mask):
        super().__init__()
        self.register_buffer("W0", W0.detach().clone())
        self.register_buffer("mask", mask)
        self.delta = nn.Parameter(torch.zeros_like(W0))

    def forward(self, x):
        return F.linear(x, self.W0 + self.mask * self.delta)


class DenseHyper(nn.Module):
    """Reference: W' = a ⊙ W0 ⊙ b as a dense matrix."""

    def __init__(self, W0):
        super().__init__()
        self.register_buffer("W0", W0.detach().clone())
        self.a = nn.Parameter(torch.ones(W0.shape[0]))
        self.b = nn.Parameter(torch.ones(W0.shape[1]))

    def forward(self, x):
        return F.linear(x, self.a[:, None] * self.W0 * self.b[None, :])


def swap(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


@pytest.mark.parametrize("method,kw", METHODS)
def test_matches_dense_reference_after_training(method, kw):
    data, steps = make_data(), 6
    args = make_args(**kw)
    model = tiny()
    opt = MOD[method].prepare(model, args, iter(itertools.cycle(data)))
    ref = tiny()
    ref.requires_grad_(False)
    refs = {}
    for n, m in find_linears(ref, LINEAR_NAMES):
        if method == "hyper":
            refs[n] = DenseHyper(m.weight)
        else:
            mask = torch.zeros_like(m.weight)
            idx = model.get_submodule(n).index
            if kw["rocoft_mode"] == "row":
                mask[idx] = 1.0
            else:
                mask[:, idx] = 1.0
            refs[n] = DenseRoCoFT(m.weight, mask)
        swap(ref, n, refs[n])
    ref_opt = torch.optim.AdamW([p for r in refs.values() for p in r.parameters()], lr=args.lr,
                                betas=args.betas, eps=args.eps, weight_decay=0.0)
    l1 = train(model, opt, data, steps)
    l2 = train(ref, ref_opt, data, steps)
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-5
    MOD[method].merge(model)
    moved = 0.0
    for n, r in refs.items():
        W = model.get_submodule(n).weight
        W_ref = r.W0 * r.a[:, None] * r.b[None, :] if method == "hyper" else r.W0 + r.mask * r.delta
        torch.testing.assert_close(W, W_ref, atol=1e-6, rtol=0)
        moved = max(moved, (W_ref - r.W0).abs().max().item())
    assert moved > 1e-3


def brute_force_pick(model, data, n_batches, mode, how, r):
    """Wanda score by the paper's definition, from the full stored activations; pick by sorting."""
    lins = find_linears(model, LINEAR_NAMES)
    X = {n: [] for n, _ in lins}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: X[n].append(inp[0].reshape(-1, inp[0].shape[-1])))
             for n, m in lins]
    with torch.no_grad():
        for x, _ in data[:n_batches]:
            model(x)
    for h in hooks:
        h.remove()
    picks = {}
    for n, m in lins:
        Xn = torch.cat(X[n]).double()                                  # [tokens, n_in]
        norm = Xn.pow(2).sum(0).sqrt()                                 # ‖X_j‖₂
        S = m.weight.double().abs() * norm[None, :]                    # Eq. (3)
        score = (S.sum(1) if mode == "row" else S.sum(0)).tolist()
        order = sorted(range(len(score)), key=lambda i: -score[i])     # highest first, ties by index
        if how == "max":
            chosen = order[:r]
        elif how == "min":
            chosen = sorted(range(len(score)), key=lambda i: score[i])[:r]
        else:
            chosen = order[:math.ceil(r / 2)] + order[len(order) - r // 2:]
        picks[n] = sorted(chosen)
    return picks


@pytest.mark.parametrize("mode", ["row", "column"])
@pytest.mark.parametrize("how", ["max", "min", "mixed"])
def test_rocoft_score_selection_matches_brute_force(mode, how):
    data, r = make_data(), 5
    expected = brute_force_pick(tiny(), data, 2, mode, how, r)
    model = tiny()
    rocoft.prepare(model, make_args(rank=r, rocoft_mode=mode, rocoft_select=how, rocoft_score_batches=2),
                   iter(itertools.cycle(data)))
    got = {n: m.index.tolist() for n, m in modules_of(model, rocoft.RoCoFTLinear).items()}
    assert got == expected


def test_rocoft_first_and_random_selection():
    data = make_data()

    def indices(**kw):
        model = tiny()
        rocoft.prepare(model, make_args(rank=4, **kw), iter(itertools.cycle(data)))
        return {n: m.index.tolist() for n, m in modules_of(model, rocoft.RoCoFTLinear).items()}

    assert all(v == [0, 1, 2, 3] for v in indices(rocoft_select="first").values())
    a, b, c = (indices(rocoft_select="random", rocoft_mode="column", seed=s) for s in (0, 0, 1))
    assert a == b and a != c
    n_in = {n: m.weight.shape[1] for n, m in find_linears(tiny(), LINEAR_NAMES)}
    for n, v in a.items():
        assert len(set(v)) == 4 and v == sorted(v) and 0 <= v[0] and v[-1] < n_in[n]
    assert len({tuple(v) for v in a.values()}) > 1  # matrices get their own draws


def test_rocoft_bad_mode_and_select():
    for kw, bad in ((dict(rocoft_mode="diagonal"), "diagonal"), (dict(rocoft_select="best"), "best")):
        with pytest.raises(ValueError) as e:
            rocoft.prepare(tiny(), make_args(**kw), iter(itertools.cycle(make_data())))
        msg = str(e.value)
        assert bad in msg and "\n" not in msg
    with pytest.raises(ValueError, match="row, column"):
        rocoft.prepare(tiny(), make_args(rocoft_mode="diagonal"), iter(itertools.cycle(make_data())))


def test_rocoft_rank_too_large_is_clamped_with_a_note(capsys):
    model = tiny()
    opt = rocoft.prepare(model, make_args(rank=40), iter(itertools.cycle(make_data())))  # k/v have 32 rows
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "rank 40" in line]
    assert len(lines) == 1 and "32x64" in lines[0] and "using 32" in lines[0]
    shapes = [m.weight.shape for _, m in find_linears(tiny(), LINEAR_NAMES)]
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(min(40, o) * i for o, i in shapes)
    assert all(m.index.tolist() == list(range(32)) for n, m in modules_of(model, rocoft.RoCoFTLinear).items()
               if n.endswith(("k_proj", "v_proj")))


# ---------------------------------------------------------------------------- HyperAdapt

def test_hyper_ignores_rank_with_a_note(capsys):
    hyper.prepare(tiny(), make_args(rank=7), None)
    out = capsys.readouterr().out
    assert "rank 7" in out and "ignored" in out


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
    opt = hyper.prepare(toy, make_args(targets=["q_proj"], lr=2e-2), None)
    fit(toy, opt, W0)
    n_params = sum(p.numel() for g in opt.param_groups for p in g["params"])
    hyper.merge(toy)
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
