"""lift.py: Principal Weights (Eq. 1-3) and the sparse AdamW of Algorithm 1 against brute-force and dense
references."""
import copy
import io
import itertools

import pytest
import torch

import lift
from conftest import make_batches, merge, prepare, targets_of, tiny_model


def ref_low_rank(W, r):
    """Brute force Eq. (1): full SVD in float64, keep the r largest singular triplets."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=True)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def ref_top_k(scores, k):
    """Brute force Eq. (2): sort all entries, mark the first k."""
    order = torch.argsort(scores.flatten(), descending=True, stable=True)
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(scores.shape)


def assert_same_selection(mask, scores, k, rtol=1e-5):
    """mask == brute-force top-k of scores, except possibly at entries within rounding of the k-th value."""
    assert mask.dtype == torch.bool and int(mask.sum()) == k
    ref = ref_top_k(scores, k)
    diff = mask ^ ref
    if diff.any():
        kth = scores.flatten().sort(descending=True).values[k - 1]
        assert ((scores[diff] - kth).abs() <= rtol * kth.abs()).all(), f"{int(diff.sum())} entries differ"


def flat_mask(idx, shape):
    m = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    m[idx] = True
    return m.view(shape)


@pytest.mark.parametrize("shape,rank,k", [((24, 40), 3, 100), ((48, 16), 1, 64), ((33, 33), 7, 400), ((40, 24), 5, 960)])
def test_principal_mask_matches_bruteforce(shape, rank, k):
    W = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape) + rank))
    mask = lift.principal_mask(W, rank, k)
    assert mask.shape == W.shape and int(mask.sum()) == k
    assert_same_selection(mask, ref_low_rank(W, rank).abs(), k)


def test_full_rank_is_magnitude_selection():
    W = torch.randn(20, 30, generator=torch.Generator().manual_seed(1))
    for rank in (20, 25, 1000):
        assert torch.equal(lift.principal_mask(W, rank, 150), ref_top_k(W.abs(), 150))
    assert not torch.equal(lift.principal_mask(W, 2, 150), ref_top_k(W.abs(), 150))  # rank reduction matters


def test_lowrank_svd_agrees_with_exact_on_low_rank_matrix():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(64, 4, generator=g) @ torch.randn(4, 96, generator=g) + 1e-3 * torch.randn(64, 96, generator=g)
    k = lift.budget(64, 96, 4)
    exact, approx = lift.principal_mask(W, 4, k), lift.principal_mask(W, 4, k, svd="lowrank", seed=3)
    assert int(approx.sum()) == k and (exact & approx).sum() / k > 0.99
    assert torch.equal(approx, lift.principal_mask(W, 4, k, svd="lowrank", seed=3))  # reproducible


def test_optimizer_matches_dense_masked_adamw():
    lr, betas, eps, wd, accum, interval, steps = 5e-3, (0.9, 0.95), 1e-8, 0.1, 3, 10, 32
    base = tiny_model()
    model, ref = copy.deepcopy(base), copy.deepcopy(base)
    batches = make_batches(12)
    opt = prepare("lift", model, iter(batches), lr=lr, betas=betas, weight_decay=wd, grad_accum=accum,
                  interval=interval)
    rank = opt.lra_rank
    lifted = targets_of(model)
    assert [n + ".weight" for n, _ in lifted] == opt.param_groups[0]["param_names"]

    # dense reference: masks by brute force, dense moments kept zero outside the mask
    ref_w = [w for _, w in targets_of(ref)]
    for w in ref_w:
        w.requires_grad_(True)
    ks = [lift.budget(*w.shape, rank) for w in ref_w]
    masks = [ref_top_k(ref_low_rank(w.detach(), rank).abs(), k) for w, k in zip(ref_w, ks)]
    m = [torch.zeros_like(w) for w in ref_w]
    v = [torch.zeros_like(w) for w in ref_w]
    carried, err = 0, 0.0
    for t in range(1, steps + 1):  # Algorithm 1, t = 1..N
        if t % interval == 0:  # lines 5-11 at the start of step t, dense form: mask from the current weights
            with torch.no_grad():
                new_masks = [ref_top_k(ref_low_rank(w, rank).abs(), k) for w, k in zip(ref_w, ks)]
                for j in range(len(ref_w)):
                    kept = int((masks[j] & new_masks[j]).sum())
                    carried += 0 < kept < ks[j]
                    m[j], v[j] = m[j] * new_masks[j], v[j] * new_masks[j]
                masks = new_masks
        for j, (_, w) in enumerate(lifted):
            assert torch.equal(flat_mask(opt.index[j], w.shape), masks[j])
        before = [w.detach().clone() for _, w in lifted]
        idx_before = [i.clone() for i in opt.index]
        for i in range(accum):
            x, y = batches[((t - 1) * accum + i) % len(batches)]
            (model(x, y)[1] / accum).backward()
            assert all(w.grad is None for _, w in lifted)  # dense grads freed inside backward
            assert all(p.grad is None for p in model.parameters())
            (ref(x, y)[1] / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            b1, b2 = betas
            for j, w in enumerate(ref_w):
                g = w.grad * masks[j]
                w.grad = None
                m[j] = b1 * m[j] + (1 - b1) * g
                v[j] = b2 * v[j] + (1 - b2) * g * g
                m_hat, v_hat = m[j] / (1 - b1 ** t), v[j] / (1 - b2 ** t)
                new = w * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
                w.copy_(torch.where(masks[j], new, w))
            for j, (_, w) in enumerate(lifted):  # between refreshes only masked entries change
                assert not ((w.detach() != before[j]) & ~flat_mask(idx_before[j], w.shape)).any()
        for (_, w), r in zip(lifted, ref_w):
            err = max(err, float((w.detach() - r.detach()).abs().max()))
            assert err <= 1e-6, f"step {t}"
    print("max |W - W_ref| over all steps:", err)
    assert opt.t == steps and opt.n_refresh == 3 and carried > 0  # refreshes moved some entries, kept others

    # optimizer state is O(k) per matrix: vectors of length k, plus the touched entries
    sd = opt.state_dict()
    for j, (_, w) in enumerate(lifted):
        k, n_touched = ks[j], opt.touched[j].numel()
        assert n_touched <= (1 + opt.n_refresh) * k < w.numel()
        tensors = [sd["state"][j]["exp_avg"], sd["state"][j]["exp_avg_sq"]] + [sd["lift"][key][j] for key in
                   ("index", "master", "touched", "touched_w0", "touched_values")]
        assert all(x.numel() <= n_touched for x in tensors)
        assert sum(x.numel() for x in tensors) == 4 * k + 3 * n_touched


def test_trainable_count_and_clamping_announced(capsys):
    model = tiny_model()
    opt = prepare("lift", model, iter(make_batches(2)), rank=40)
    out = capsys.readouterr().out
    expect = sum(min(40 * (w.shape[0] + w.shape[1]), w.numel()) for _, w in targets_of(model))
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == expect
    assert "5120" in out and "4096" in out and "3840" in out and "2048" in out  # 64x64 and 32x64 clamp
    assert "LRA rank 40 >= min" in out
    assert all(p.dtype == torch.float32 for p in opt.param_groups[0]["params"])


def test_magnitude_selection():
    model = tiny_model()
    opt = prepare("lift", model, iter(make_batches(2)), rank=3, select="magnitude")
    for j, (_, w) in enumerate(targets_of(model)):
        assert torch.equal(flat_mask(opt.index[j], w.shape), ref_top_k(w.detach().abs(), lift.budget(*w.shape, 3)))


def test_gradient_selection_initial_and_refresh():
    base, batches = tiny_model(), make_batches(6)
    model = copy.deepcopy(base)
    opt = prepare("lift", model, itertools.cycle(batches), select="gradient", grad_accum=2, interval=2, lr=5e-2)

    def brute(ref):  # summed dense gradient over the first grad_accum batches, plain autograd
        ws = [w for _, w in targets_of(ref)]
        for w in ws:
            w.requires_grad_(True)
        for x, y in batches[:2]:
            ref(x, y)[1].backward()
        return [ref_top_k(w.grad.abs(), lift.budget(*w.shape, 2)) for w in ws]

    for j, ref_mask in enumerate(brute(copy.deepcopy(base))):
        assert torch.equal(flat_mask(opt.index[j], ref_mask.shape), ref_mask)
    model(*batches[2])[1].backward()  # step 1; step 2 has t mod 2 = 0: the mask is recomputed before it
    opt.step()
    opt.zero_grad()
    assert opt.n_refresh == 1
    now = copy.deepcopy(model)
    merge("lift", now, opt)
    for j, ref_mask in enumerate(brute(now)):
        assert_same_selection(flat_mask(opt.index[j], ref_mask.shape), ref_mask.float(), int(ref_mask.sum()))


def test_random_selection():
    model = tiny_model()
    idx0 = prepare("lift", copy.deepcopy(model), iter([]), rank=4, select="random").index
    idx1 = prepare("lift", copy.deepcopy(model), iter([]), rank=4, select="random").index
    idx2 = prepare("lift", copy.deepcopy(model), iter([]), rank=4, select="random", seed=1).index
    counts = torch.zeros(176 * 64)
    for j, (_, w) in enumerate(targets_of(model)):
        k = lift.budget(*w.shape, 4)
        assert idx0[j].numel() == k == idx0[j].unique().numel() and int(idx0[j].max()) < w.numel()
        assert torch.equal(idx0[j], idx1[j]) and not torch.equal(idx0[j], idx2[j])
        if w.numel() == counts.numel():
            counts[idx0[j]] += 1
    # 4 matrices of 176x64 at k/numel = 0.43 each: every entry picked ~1.7 times; no region is favoured
    rows = counts.view(176, 64).sum(1)
    assert rows.min() > 0.5 * rows.mean() and rows.max() < 1.5 * rows.mean()


def test_structured_blocks_match_bruteforce():
    model = tiny_model()
    opt = prepare("lift", model, iter([]), rank=3, block=4)
    for j, (_, w) in enumerate(targets_of(model)):
        n_out, n_in = w.shape
        k = lift.budget(n_out, n_in, 3, block=4)
        assert k % 16 == 0 and opt.index[j].numel() == k
        s = ref_low_rank(w.detach(), 3).abs()
        blocks = torch.tensor([[float(s[4 * a:4 * a + 4, 4 * b:4 * b + 4].sum()) for b in range(n_in // 4)]
                               for a in range(n_out // 4)], dtype=torch.float64)
        got = flat_mask(opt.index[j], w.shape)
        got_blocks = got.view(n_out // 4, 4, n_in // 4, 4).all(3).all(1)
        assert torch.equal(got, got_blocks.repeat_interleave(4, 0).repeat_interleave(4, 1))  # whole blocks only
        assert_same_selection(got_blocks, blocks, k // 16)


def lift_train(model, opt, batches, steps, start, accum=2):
    for t in range(start, start + steps):
        for i in range(accum):
            x, y = batches[(t * accum + i) % len(batches)]
            (model(x, y)[1] / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_checkpoint_resume_is_bit_identical():
    base, batches = tiny_model(), make_batches(10)
    kw = dict(lr=3e-2, weight_decay=0.05, interval=5)
    a = copy.deepcopy(base)
    opt_a = prepare("lift", a, iter(batches), **kw)
    lift_train(a, opt_a, batches, 12, 0)
    assert opt_a.n_refresh == 2
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)  # as train.py loads checkpoints
    at_save = [p.detach().clone() for p in a.parameters()]

    b = copy.deepcopy(base)
    opt_b = prepare("lift", b, iter(batches), **kw)
    opt_b.load_state_dict(sd)
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb)
    # some entries were trained under an earlier mask and since deselected; they came back too
    gone = [(w.detach().view(-1) != w0.detach().view(-1)) & ~flat_mask(i, w.shape).view(-1)
            for (_, w), (_, w0), i in zip(targets_of(a), targets_of(base), opt_a.index)]
    assert sum(int(g.sum()) for g in gone) > 0
    lift_train(a, opt_a, batches, 8, 12)  # crosses the refreshes after steps 15 and 20
    lift_train(b, opt_b, batches, 8, 12)
    assert opt_b.n_refresh == 4
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb)

    # the sparse adapter: W0 with the touched indices set to their values is the trained weight, bit for bit
    adapter = lift.adapter_state(a, opt_a)
    for (name, w), (_, w0) in zip(targets_of(a), targets_of(base)):
        idx, value = adapter[f"{name}.weight.lift_index"], adapter[f"{name}.weight.lift_value"]
        assert idx.numel() < w.numel()
        rebuilt = w0.detach().clone().view(-1)
        rebuilt[idx.long()] = value
        assert torch.equal(rebuilt.view(w.shape), w.detach())

    opt_a.load_state_dict(sd)  # rolling back a trained optimizer works too: it undoes its own writes first
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), at_save))

    other = tiny_model().init_weights(1)  # another base model: refused
    opt_c = prepare("lift", other, iter(batches), **kw)
    with pytest.raises(ValueError, match="not the base weight"):
        opt_c.load_state_dict(sd)


def test_merge_and_bf16_weights():
    model, batches = tiny_model().to(torch.bfloat16), make_batches(4)
    opt = prepare("lift", model, iter(batches), lr=1e-2, interval=2)
    lift_train(model, opt, batches, 2, 0)
    # after the refresh, entries kept in both masks still carry their fp32 master values
    masters = torch.cat([p for p in opt.param_groups[0]["params"]])
    assert opt.n_refresh == 1 and (masters != masters.to(torch.bfloat16).float()).any()
    lift_train(model, opt, batches, 1, 2)
    for j, (_, w) in enumerate(targets_of(model)):
        assert w.dtype == torch.bfloat16 and opt.param_groups[0]["params"][j].dtype == torch.float32
        assert torch.equal(w.detach().view(-1)[opt.index[j]], opt.param_groups[0]["params"][j].to(torch.bfloat16))
    x = batches[0][0]
    before = model(x)
    keys = set(tiny_model().state_dict())
    merge("lift", model, opt)
    assert set(model.state_dict()) == keys and torch.equal(model(x), before)
    assert not any(hasattr(w, "_lift_hook") or w.requires_grad for _, w in targets_of(model))


@pytest.mark.parametrize("bad,match", [(dict(select="wanda"), "--lift-select 'wanda'"),
                                       (dict(block=3), "--lift-block 3 does not divide"),
                                       (dict(interval=0), "--lift-interval 0"), (dict(svd="qr"), "--lift-svd 'qr'"),
                                       (dict(lra_rank=-1), "--lift-lra-rank -1")])
def test_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        prepare("lift", tiny_model(), iter([]), **bad)
