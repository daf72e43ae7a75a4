"""memory.py: the training-memory plan against the code it describes: autograd's saved tensors, the
allocated peak, the largest batch, public model configs."""
import contextlib
import io
import itertools
import math

import pytest
import torch

from experiments import memory
from methods import METHODS
from model import ModelConfig, Transformer
from targets import find_linears


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
    """Llama-3.2-1B/3B, Llama-3-8B and 3-70B shapes as their config.json files give them, and their sizes."""
    shapes = {"llama-3.2-1b": (2048, 16, 32, 8, 8192, True, 1.24e9), "llama-3.2-3b": (3072, 28, 24, 8, 8192, True, 3.21e9),
              "llama-3-8b": (4096, 32, 32, 8, 14336, False, 8.03e9),
              "llama-3-70b": (8192, 80, 64, 8, 28672, False, 70.55e9)}
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


# -----------------------------------------------------------------------------
# sharded over N processes (FSDP2, train.py --fsdp)

PLAN_KEYS = ("weights", "buffers", "master", "adam", "grads", "activations", "loss", "backward", "total", "prepare",
             "host")
# plan's numbers before it took a process count (commit 5dfe3de), for each of MEM_METHODS: every key above at
# batch 2 x 16, bf16, half the positions targets, a quarter padding; then (total, prepare) at batch 3 x 16, fp32,
# checkpointing
ONE_GPU = [
    ((200320, 0, 0, 400640, 200320, 220856, 43520, 87552, 909368, 0, 0), (1818752, 0)),
    ((200320, 0, 29696, 59392, 29696, 138264, 43520, 10752, 471192, 0, 0), (742256, 0)),
    ((200320, 0, 9216, 18432, 9216, 111768, 43520, 10752, 383256, 0, 0), (664688, 0)),
    ((200320, 44544, 29696, 59392, 29696, 122264, 43520, 12288, 499736, 382592, 0), (796272, 582912)),
    ((200320, 44544, 29696, 59392, 29696, 122264, 43520, 12288, 499736, 382592, 0), (796272, 582912)),
    ((200320, 0, 11520, 23040, 11520, 128888, 43520, 10752, 407288, 0, 0), (686384, 0)),
    ((200320, 0, 10752, 21504, 10752, 101240, 43520, 10752, 377336, 0, 0), (641072, 0)),
    ((200320, 0, 245760, 491520, 245760, 271768, 43520, 10752, 1313504, 0, 0), (1648832, 0)),
    ((200320, 29696, 896, 1792, 896, 111064, 43520, 10752, 387288, 0, 0), (642544, 0)),
    ((200320, 29696, 896, 1792, 896, 111064, 43520, 10752, 387288, 358680, 245760), (642544, 640368)),
    ((200320, 425984, 180224, 360448, 180224, 418200, 43520, 10752, 1628696, 358680, 245760), (1757376, 640368)),
    ((200320, 0, 7424, 14848, 7424, 272792, 43520, 10752, 538904, 0, 0), (756080, 0)),
]


@pytest.mark.parametrize("i", range(len(MEM_METHODS)))
def test_memory_one_process_is_the_one_gpu_plan(i):
    """world=1 (no sharding) gives the numbers plan gave before it knew of processes, and gathers nothing."""
    (method, kw), (terms, (total, prepare)) = MEM_METHODS[i], ONE_GPU[i]
    cfg, s = ModelConfig(**MEM_CFG), METHODS[method][1](**kw)
    p = memory.plan(cfg, method, s, 2, 16, targets=0.5, padding=0.25, world=1)
    assert tuple(p[k] for k in PLAN_KEYS) == terms and p["gathered"] == 0
    assert p == memory.plan(cfg, method, s, 2, 16, targets=0.5, padding=0.25)
    q = memory.plan(cfg, method, s, 3, 16, weight_dtype=torch.float32, compute_dtype=torch.float32,
                    grad_checkpoint=True, world=1)
    assert (q["total"], q["prepare"]) == (total, prepare)


def _held(tensors, world):
    """Numbers one of `world` processes holds of `tensors`, each cut on dim 0 into `world` chunks padded to
    the first chunk's ceil(rows / world) rows (torch.chunk, then FSDP2's padding)."""
    return sum(math.ceil(t.shape[0] / world) * (t.numel() // t.shape[0]) for t in tensors)


@pytest.mark.parametrize("method,kw", MEM_METHODS)
def test_memory_sharded_terms_are_each_process_share(method, kw):
    """At world N each process holds 1/N (padded) of the real model's parameters, of the optimizer's
    trained tensors, their gradients and moments; activations and the loss are its own micro-batch's, as
    at N=1; buffers (LoRA-XS/SB's A and B) stay whole; two blocks' and the root's parameters are gathered.
    Counted on the prepared tiny model's tensors, N=2 and 3 (3 divides none of its widths: padding)."""
    cfg, model, opt, s, x = _mem_prepared(method, kw)
    trained = [p for g in opt.param_groups for p in g["params"]]
    adapters = {id(p) for p in trained} if method != "full" else set()
    base = [p for p in model.parameters() if id(p) not in adapters]
    block_base = [p for p in model.layers[0].parameters() if id(p) not in adapters]
    block_adapters = [p for p in model.layers[0].parameters() if id(p) in adapters]
    in_blocks = {id(p) for p in model.layers.parameters()}
    root = [p for p in model.parameters() if id(p) not in in_blocks]
    one = memory.plan(cfg, method, s, *x.shape, weight_dtype=torch.float32, compute_dtype=torch.float32)
    for world in (2, 3):
        p = memory.plan(cfg, method, s, *x.shape, weight_dtype=torch.float32, compute_dtype=torch.float32,
                        world=world)
        assert p["weights"] == 4 * _held(base, world)
        if method == "lift":  # lift.LIFTAdamW under --fsdp: its k entries whole in every process; the shards of
            # the dense weight gradients (the targets' rows this process holds) wait for the step
            targets = [m.weight for _, m in find_linears(model, s.targets)]
            assert p["grads"] == 4 * _held(trained, 1) + 4 * _held(targets, world)
            assert p["adam"] == 2 * 4 * _held(trained, 1) and p["master"] == 4 * _held(trained, 1)
            assert p["buffers"] == (4 + 4) * _held(trained, 1)  # index and W0 of each selected entry
        else:
            assert p["grads"] == 4 * _held(trained, world) and p["adam"] == 2 * p["grads"]  # fp32, full's too
            assert p["master"] == (0 if method == "full" else 4 * _held(trained, world))
        assert (p["activations"], p["loss"], p["trainable"]) == (one["activations"], one["loss"], one["trainable"])
        if method in ("loraxs", "lorasb"):  # the frozen A and B: module buffers, whole in every process
            whole = sum(b.numel() * 4 for n, b in model.named_buffers() if n.endswith((".A", ".B")))
            assert p["buffers"] == one["buffers"] == whole
        gathered = 2 * world * (4 * _held(block_base, world) + 4 * _held(block_adapters, world))
        assert p["gathered"] == gathered + world * 4 * _held(root, world)
        assert p["weights"] + p["master"] + p["adam"] + p["grads"] < one["weights"] + one["master"] + one["adam"] \
            + one["grads"]


def test_memory_sharded_lora_by_hand():
    """LoRA r=3 over 2 processes on a model with odd widths (vocab 301, FFN 97: padded rows), fp32, counted
    by hand from the shapes: q 64x64, k and v 32x64, o 64x64, gate and up 97x64, down 64x97, two norms of 64
    per block; embedding and lm_head 301x64 and the final norm at the root. Each process holds
    ceil(rows / 2) rows of each: a block 32*64 + 2*16*64 + 32*64 + 2*49*64 + 32*97 + 2*32 = 15584 numbers,
    the root 2*151*64 + 32 = 19360. LoRA's A (3 x n_in) keeps ceil(3/2) = 2 rows, B (n_out x 3) ceil(n_out/2):
    q 2*64 + 32*3 = 224, k and v 128 + 16*3 = 176, o 224, gate and up 128 + 49*3 = 275, down 2*97 + 32*3 = 290:
    1640 per block."""
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=301, hidden_dim=97)
    s = METHODS["lora"][1](rank=3)
    kw = dict(weight_dtype=torch.float32, compute_dtype=torch.float32)
    one, two = (memory.plan(cfg, "lora", s, 4, 16, world=n, **kw) for n in (1, 2))
    block, root, adapters = 15584, 19360, 1640
    assert two["weights"] == 4 * (2 * block + root) == 202112
    assert (two["master"], two["adam"], two["grads"]) == (4 * 2 * adapters, 8 * 2 * adapters, 4 * 2 * adapters)
    # whole, for comparison: 2 * 31040 + 38592 weights, 2 * 2793 trainable (r * (n_in + n_out) per matrix)
    assert (one["weights"], one["master"], one["trainable"]) == (4 * 100672, 4 * 5586, 5586)
    # gathered: two blocks (weights and their adapters) and the root, each as 2 processes' padded shards
    assert two["gathered"] == 2 * 2 * (4 * block + 4 * adapters) + 2 * 4 * root == 430464
    # in backward, two blocks' whole (padded) adapter gradients until reduce-scattered
    assert two["backward"] == one["backward"] + 2 * 2 * 4 * adapters
    # the peak is the end of forward here (activations, the loss running: the same per process), so the step
    # needs what sharding saves less, plus what it gathers
    static = ("weights", "buffers", "master", "adam")
    assert one["total"] == sum(one[k] for k in static) + one["activations"] + one["loss"]
    assert two["total"] == 202112 + 3 * 4 * 2 * adapters + 430464 + one["activations"] + one["loss"]


def test_memory_fewest_gpus_for_llama_3_8b_full_fine_tuning(capsys):
    """Full fine-tuning of Llama-3-8B (fp32 weights: each parameter is 16 bytes with its gradient and two
    moments) does not fit one 80 GiB GPU; sharded over 4 it does, with room to spare. Bounds by hand: a
    block has 2*4096^2 + 2*1024*4096 + 3*14336*4096 + 2*4096 = 218,112,000 parameters, the root 2*128256*4096
    + 4096 = 1,050,677,248 (embedding, lm_head, final norm), 8,030,261,248 in all, every width divisible by
    1, 2, 4, 8 (no padding). At the end of backward a GPU holds its 16P/N bytes, the root gathered and its
    whole gradient (4 bytes each), two blocks gathered and their whole gradients: that is at least the step
    (lower); at most it adds 8 GiB for activations at 512 tokens with checkpointing (upper)."""
    P, block, root = 8_030_261_248, 218_112_000, 1_050_677_248
    assert 32 * block + root == P
    room = (80 - 2) * memory.GiB / 1.10
    cfg, s = memory.MODELS["llama-3-8b"], METHODS["full"][1]()
    for n in (1, 2, 4, 8):
        lower = 16 * P / n + (0 if n == 1 else 4 * root + 4 * root + 2 * 4 * block + 2 * 4 * block)
        upper = lower + 8 * memory.GiB
        need = memory.need(cfg, "full", s, 1, 512, weight_dtype=torch.float32, grad_checkpoint=True, world=n)
        assert lower <= need <= upper, n
    assert 16 * P > room                              # 1 GPU: the state alone does not fit
    assert 16 * P / 4 + 2 * (4 * root + 2 * 4 * block) + 8 * memory.GiB < room  # 4 GPUs fit, even at the upper bound
    memory.main(["--models", "llama-3-8b", "--gpus", "1,2,4,8"])
    row = next(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("llama-3-8b   full"))
    assert row[2:4] == ["120.2", "no"] and row[5] == "no" and row[7] == "yes" and row[-1] == "4"


@pytest.mark.parametrize("value", ["0,2", "2,2", "x", "", "2000", "1.5"])
def test_memory_bad_gpus_one_line(value, capsys):
    assert memory.cli(["--gpus", value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --gpus {value or repr('')} is not allowed: comma-separated GPU counts")
    assert "\n" not in err
