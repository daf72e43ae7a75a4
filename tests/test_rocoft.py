"""rocoft.py: row/column updates against dense references, brute force and the paper's properties; the
tests parametrised over ROCOFT_HYPER check hyper.py's diagonal scaling against its dense reference too."""
import copy
import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rocoft
import train
from conftest import make_batches, merge, modules_of, prepare, run_steps, settings, tiny_model
from methods import METHODS
from targets import LINEAR_NAMES, find_linears
from tokenizer import Tokenizer


ROCOFT_HYPER = [("rocoft", dict(mode="row", select="random")),
           ("rocoft", dict(mode="column", select="random")),
           ("hyper", {})]


@pytest.mark.parametrize("method,kw", ROCOFT_HYPER)
def test_starts_as_exact_noop_and_merge_keeps_logits(method, kw):
    data = make_batches(6, 4, seed=1, task="prompt")
    base = tiny_model()
    x = data[0][0]
    with torch.no_grad():
        ref = base(x)
    model = tiny_model()
    opt = prepare(method, model, iter(itertools.cycle(data)), **kw)
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # exact no-op at initialisation
    run_steps(model, opt, itertools.cycle(data), 4)
    with torch.no_grad():
        before = model(x)
        assert (before - ref).abs().max() > 1e-4  # it did learn something
        merge(method, model, opt)
        after = model(x)
    assert set(model.state_dict()) == set(base.state_dict())
    assert all(type(m) is nn.Linear for _, m in find_linears(model, LINEAR_NAMES))
    assert all(m.weight.dtype == torch.float32 and not m.weight.requires_grad for _, m in find_linears(model, LINEAR_NAMES))
    torch.testing.assert_close(after, before, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("method,kw", ROCOFT_HYPER)
def test_trainable_count_matches_formula(method, kw):
    model = tiny_model()
    shapes = [m.weight.shape for _, m in find_linears(tiny_model(), LINEAR_NAMES)]
    r = 3
    if method == "hyper":
        expected = sum(n_out + n_in for n_out, n_in in shapes)
    elif kw["mode"] == "row":
        expected = sum(r * n_in for n_out, n_in in shapes)
    else:
        expected = sum(r * n_out for n_out, n_in in shapes)
    opt = prepare(method, model, iter(itertools.cycle(make_batches(6, 4, seed=1, task="prompt"))), rank=r, **kw)
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


@pytest.mark.parametrize("method,kw", ROCOFT_HYPER)
def test_checkpoint_round_trip_is_bit_identical(method, kw):
    data = make_batches(6, 4, seed=1, task="prompt")
    base_keys = set(tiny_model().state_dict())
    m1 = tiny_model()
    opt1 = prepare(method, m1, iter(itertools.cycle(data)), **kw)
    run_steps(m1, opt1, itertools.cycle(data), 3)
    saved = {k: v.clone() for k, v in m1.state_dict().items() if k not in base_keys}
    assert set(saved) == set(METHODS[method][0].adapter_state(m1, opt1))
    opt_state = copy.deepcopy(opt1.state_dict())
    losses1 = run_steps(m1, opt1, itertools.cycle(data[3:]), 3)

    # resume on a fresh base model; a different seed proves the row/column index comes from the checkpoint
    m2 = tiny_model()
    opt2 = prepare(method, m2, iter(itertools.cycle(data)), **kw, seed=123)
    if method == "rocoft":
        assert any(not torch.equal(m.index, saved[f"{n}.index"]) for n, m in modules_of(m2, rocoft.RoCoFTLinear).items())
    missing, unexpected = m2.load_state_dict(saved, strict=False)
    assert not unexpected and set(missing) <= base_keys
    opt2.load_state_dict(opt_state)
    losses2 = run_steps(m2, opt2, itertools.cycle(data[3:]), 3)
    assert losses1 == losses2
    s1, s2 = METHODS[method][0].adapter_state(m1, opt1), METHODS[method][0].adapter_state(m2, opt2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.mark.parametrize("method,kw", ROCOFT_HYPER)
def test_bf16_base_keeps_fp32_adapter(method, kw):
    model = tiny_model().to(torch.bfloat16)
    opt = prepare(method, model, iter(itertools.cycle(make_batches(6, 4, seed=1, task="prompt"))), **kw)
    x, y = make_batches(6, 4, seed=1, task="prompt")[0]
    model(x, y)[1].backward()
    for p in (p for g in opt.param_groups for p in g["params"]):
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
    merge(method, model, opt)
    assert all(m.weight.dtype == torch.bfloat16 for _, m in find_linears(model, LINEAR_NAMES))


@pytest.mark.parametrize("mode", ["row", "column"])
def test_rocoft_changes_only_selected_rows_or_columns(mode):
    data = make_batches(6, 4, seed=1, task="prompt")
    W0 = {n: m.weight.detach().clone() for n, m in find_linears(tiny_model(), LINEAR_NAMES)}
    model = tiny_model()
    opt = prepare("rocoft", model, iter(itertools.cycle(data)), mode=mode, select="random")
    index = {n: m.index.tolist() for n, m in modules_of(model, rocoft.RoCoFTLinear).items()}
    run_steps(model, opt, itertools.cycle(data), 4)
    merge("rocoft", model, opt)
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


@pytest.mark.parametrize("method,kw", ROCOFT_HYPER)
def test_matches_dense_reference_after_training(method, kw):
    data, steps = make_batches(6, 4, seed=1, task="prompt"), 6
    model = tiny_model()
    opt = prepare(method, model, iter(itertools.cycle(data)), **kw)
    args = settings(method, **kw)
    ref = tiny_model()
    ref.requires_grad_(False)
    refs = {}
    for n, m in find_linears(ref, LINEAR_NAMES):
        if method == "hyper":
            refs[n] = DenseHyper(m.weight)
        else:
            mask = torch.zeros_like(m.weight)
            idx = model.get_submodule(n).index
            if kw["mode"] == "row":
                mask[idx] = 1.0
            else:
                mask[:, idx] = 1.0
            refs[n] = DenseRoCoFT(m.weight, mask)
        swap(ref, n, refs[n])
    ref_opt = torch.optim.AdamW([p for r in refs.values() for p in r.parameters()], lr=args.lr,
                                betas=args.betas, eps=args.eps, weight_decay=0.0)
    l1 = run_steps(model, opt, itertools.cycle(data), steps)
    l2 = run_steps(ref, ref_opt, itertools.cycle(data), steps)
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-5
    merge(method, model, opt)
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
    data, r = make_batches(6, 4, seed=1, task="prompt"), 5
    expected = brute_force_pick(tiny_model(), data, 2, mode, how, r)
    model = tiny_model()
    prepare("rocoft", model, iter(itertools.cycle(data)), rank=r, mode=mode, select=how, score_batches=2)
    got = {n: m.index.tolist() for n, m in modules_of(model, rocoft.RoCoFTLinear).items()}
    assert got == expected


def test_rocoft_first_and_random_selection():
    data = make_batches(6, 4, seed=1, task="prompt")

    def indices(**kw):
        model = tiny_model()
        prepare("rocoft", model, iter(itertools.cycle(data)), rank=4, **kw)
        return {n: m.index.tolist() for n, m in modules_of(model, rocoft.RoCoFTLinear).items()}

    assert all(v == [0, 1, 2, 3] for v in indices(select="first").values())
    a, b, c = (indices(select="random", mode="column", seed=s) for s in (0, 0, 1))
    assert a == b and a != c
    n_in = {n: m.weight.shape[1] for n, m in find_linears(tiny_model(), LINEAR_NAMES)}
    for n, v in a.items():
        assert len(set(v)) == 4 and v == sorted(v) and 0 <= v[0] and v[-1] < n_in[n]
    assert len({tuple(v) for v in a.values()}) > 1  # matrices get their own draws


def test_rocoft_bad_mode_and_select():
    for kw, bad in ((dict(mode="diagonal"), "diagonal"), (dict(select="best"), "best")):
        with pytest.raises(ValueError) as e:
            prepare("rocoft", tiny_model(), iter(itertools.cycle(make_batches(6, 4, seed=1, task="prompt"))), **kw)
        msg = str(e.value)
        assert bad in msg and "\n" not in msg
    with pytest.raises(ValueError, match="row, column"):
        prepare("rocoft", tiny_model(), iter(itertools.cycle(make_batches(6, 4, seed=1, task="prompt"))), mode="diagonal")


def test_rocoft_rank_too_large_is_clamped_with_a_note(capsys):
    model = tiny_model()
    opt = prepare("rocoft", model, iter(itertools.cycle(make_batches(6, 4, seed=1, task="prompt"))), rank=40)  # k/v have 32 rows
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "rank 40" in line]
    assert len(lines) == 1 and "32x64" in lines[0] and "using 32" in lines[0]
    shapes = [m.weight.shape for _, m in find_linears(tiny_model(), LINEAR_NAMES)]
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(min(40, o) * i for o, i in shapes)
    assert all(m.index.tolist() == list(range(32)) for n, m in modules_of(model, rocoft.RoCoFTLinear).items()
               if n.endswith(("k_proj", "v_proj")))


def test_rocoft_wanda_norms_ignore_padding():
    """Rows of different lengths padded by train.collate: the activation norms equal those of the
    rows run one by one without padding."""
    tok = Tokenizer.bytes()
    model = tiny_model(vocab=264)
    lengths = (5, 12, 9)
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in lengths:
        seq = torch.randint(0, 256, (n + 1,), generator=g).tolist()
        examples.append((seq[:-1], [-100, -100] + seq[3:]))
    x, y = train.collate(examples, tok.pad_id, "cpu")
    linears = find_linears(model, ["q_proj", "down_proj"])
    got = rocoft.activation_norms(model, linears, iter([(x, y)]), 1)
    want = {name: torch.zeros(m.in_features) for name, m in linears}
    for xi, _ in examples:
        one = rocoft.activation_norms(model, linears, iter([(torch.tensor([xi]), torch.tensor([[0] * len(xi)]))]), 1)
        for name in want:
            want[name] += one[name] ** 2
    for name in want:
        torch.testing.assert_close(got[name], want[name].sqrt(), rtol=1e-5, atol=1e-6)
