"""memory.py: the training-memory plan against the code it describes: autograd's saved tensors, the
allocated peak, the largest batch, public model configs."""
import contextlib
import io
import itertools

import pytest
import torch

from experiments import memory
from methods import METHODS
from model import ModelConfig, Transformer


MEM_CFG = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=96)  # distinct widths
MEM_METHODS = [("full", {}), ("lora", dict(rank=4)), ("lora", dict(rank=4, targets=("q_proj", "down_proj"))),
               ("lift", dict(rank=4)), ("lift", dict(rank=4, block=4)), ("rocoft", dict(rank=3)),
               ("rocoft", dict(rank=3, mode="column")), ("rocoft", dict(rank=200)), ("loraxs", dict(rank=4)),
               ("lorasb", dict(rank=4, init_samples=2)), ("lorasb", dict(rank=100, init_samples=2)), ("hyper", {})]


def _mem_prepared(method, kw, dtype=torch.float32, batch=2, seq=16, cfg=MEM_CFG):
    """A small model with `method` attached as bench.py attaches it, its optimizer, settings and a batch."""
    cfg = ModelConfig(**cfg)
    model = Transformer(cfg).init_weights(0).to(dtype)
    model.train()
    x = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    module, cls = METHODS[method]
    s = cls(lr=1e-4, **kw)
    run = {"lift": dict(total_steps=10), "lorasb": dict(lr_first=1e-4, n_train=100)}.get(method, {})
    with contextlib.redirect_stdout(io.StringIO()):
        opt = module.prepare(model, s, itertools.repeat((x, x.roll(-1, 1))), seed=0, **run)
    return cfg, model, opt, s, x


@pytest.mark.parametrize("method,kw", MEM_METHODS)
def test_memory_trainable_count_matches_prepare(method, kw):
    cfg, _, opt, s, _ = _mem_prepared(method, kw)
    actual = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert memory.trainable(cfg, method, s) == actual
    assert memory.plan(cfg, method, s, 1, 8)["trainable"] == actual


def _sft_targets(x):
    """x's next tokens as targets, with a prompt and padding without targets (-100) as train.py's
    batches have them: row 0's last 4 positions run no more (model.Transformer.forward packs the rest)."""
    y = x.roll(-1, 1)
    y[:, :5] = -100
    y[0, -4:] = -100
    return y


def _saved_bytes(model, x, y):
    """Bytes of the distinct storages autograd saves in one forward + loss (weights and buffers excluded)."""
    own = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            seen[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y)
    return sum(seen.values())


@pytest.mark.parametrize("sft", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,kw", MEM_METHODS)
def test_memory_activations_match_saved_tensors(method, kw, dtype, sft):
    """plan's activation term is what autograd keeps, counted per op, for every target a target or a
    prompt-masked, padded batch: within 3% (the rest: tiny int/bool tensors, layer-0 corner cases)."""
    cfg, model, _, s, x = _mem_prepared(method, kw, dtype)
    y = _sft_targets(x) if sft else x.roll(-1, 1)
    p = memory.plan(cfg, method, s, *x.shape, weight_dtype=dtype, compute_dtype=dtype, **memory.shares(y))
    assert p["activations"] == pytest.approx(_saved_bytes(model, x, y), rel=0.03)


def test_memory_shares_of_a_batch():
    y = torch.full((2, 10), 7)
    y[:, :4] = -100   # prompts
    y[1, 6:] = -100   # row 1's padding: positions 6-9 do not run
    assert memory.shares(y) == pytest.approx(dict(targets=8 / 20, padding=4 / 20))


def test_memory_checkpointing_keeps_block_inputs_only():
    cfg, model, _, s, x = _mem_prepared("lora", dict(rank=4))
    model.grad_checkpoint = True
    p = memory.plan(cfg, "lora", s, *x.shape, weight_dtype=torch.float32, compute_dtype=torch.float32,
                    grad_checkpoint=True)
    assert p["activations"] == pytest.approx(_saved_bytes(model, x, x.roll(-1, 1)), rel=0.03)
    for method, kw in MEM_METHODS:
        s = METHODS[method][1](**kw)
        on, off = (memory.plan(cfg, method, s, 8, 64, grad_checkpoint=c) for c in (True, False))
        assert on["activations"] < off["activations"] and on["total"] < off["total"], method


class _AllocPeak:
    """Peak bytes of every CPU allocation (temporaries inside kernels too), from the profiler's memory events."""

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile
        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        self.prof.__exit__(*exc)
        events = sorted((e for e in self.prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
        self.now = self.peak = 0
        for e in events:
            self.now += e.nbytes()
            self.peak = max(self.peak, self.now)


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("method,kw", [("full", {}), ("lora", dict(rank=4)), ("lift", dict(rank=4)), ("hyper", {})])
def test_memory_plan_matches_allocated_peak(method, kw, ckpt):
    """plan's total minus the weights (which exist before) is the peak of what prepare and two training
    steps on a prompt-masked, padded batch allocate (the second step with the optimizer's state): within
    10% on CPU, fp32. Widths where activations, not fixed costs, dominate, as in real models (0.91-1.03
    on the 25M bench model and SmolLM2-135M, every method, with and without checkpointing)."""
    cfg = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, hidden_dim=384)
    with _AllocPeak() as prep:
        cfg, model, opt, s, x = _mem_prepared(method, kw, batch=4, seq=64, cfg=cfg)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
    model.grad_checkpoint = ckpt
    params = [p for g in opt.param_groups for p in g["params"]]
    y = _sft_targets(x)

    def step():
        model(x, y)[1].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    with _AllocPeak() as first:
        step()
    with _AllocPeak() as second:
        step()
    p = memory.plan(cfg, method, s, *x.shape, weight_dtype=torch.float32, compute_dtype=torch.float32,
                    grad_checkpoint=ckpt, **memory.shares(y))
    assert p["total"] - p["weights"] == pytest.approx(prep.now - weights + first.now + second.peak, rel=0.10)


def test_memory_largest_batch_fits_and_next_does_not():
    cfg = ModelConfig(**MEM_CFG)
    for method, kw in MEM_METHODS:
        s = METHODS[method][1](**kw)
        kw_ = dict(weight_dtype=torch.float32, compute_dtype=torch.float32)

        def need(b, method=method, s=s, kw_=kw_):
            return max(memory.plan(cfg, method, s, b, 32, **kw_)[k] for k in ("total", "prepare"))
        gpu = need(5) + 1  # room for exactly 5
        b = memory.largest_batch(cfg, method, s, 32, gpu, **kw_)
        assert b == 5 and need(b) <= gpu < need(b + 1), method
        assert memory.largest_batch(cfg, method, s, 32, need(1) - 1, **kw_) == 0
        assert all(need(b) < need(b + 1) for b in range(1, 8))


def test_memory_presets_match_public_configs():
    """Llama-3.2-1B/3B and Llama-3-8B shapes as their config.json files give them, and their sizes."""
    shapes = {"llama-3.2-1b": (2048, 16, 32, 8, 8192, True, 1.24e9), "llama-3.2-3b": (3072, 28, 24, 8, 8192, True, 3.21e9),
              "llama-3-8b": (4096, 32, 32, 8, 14336, False, 8.03e9)}
    for name, (d, L, H, KV, h, tied, n) in shapes.items():
        c = memory.MODELS[name]
        assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.tie_embeddings, c.vocab_size) == \
            (d, L, H, KV, h, tied, 128256)
        assert memory.n_params(c) == pytest.approx(n, rel=0.005)


def test_memory_cli_table(capsys):
    memory.main(["--models", "llama-3.2-1b"])
    rows = {}
    for line in capsys.readouterr().out.splitlines():  # label, trainable, batch, batch with checkpointing, ...
        label, cols = line[:15].strip(), line[15:].split()
        if label in ("full", "lora r128", "lift r128"):
            rows[label] = cols
    assert rows["lora r128"][0] == rows["lift r128"][0] == "90,177,536"  # LIFT r's budget: LoRA r's count
    assert 0 < int(rows["full"][1]) < int(rows["lora r128"][1]) < int(rows["lora r128"][2])
