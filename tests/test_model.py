"""model.py against Hugging Face transformers: logits, the fused target loss (F.cross_entropy on the full
logits), the positions after the last target, the KV cache; bf16_fast's CPU flags, the bf16 preset's RoPE."""
import io

import pytest
import torch
import torch.nn.functional as F

from conftest import _hf_model, tiny_model
from model import ModelConfig, Transformer
from weights import from_pretrained, load


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
    model = from_pretrained(tmp_path).eval()
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
    monkeypatch.delenv("NANOPEFT_BF16", raising=False)
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
    # $NANOPEFT_BF16 answers for the CPU (what the `cpu` fixture uses), never for another device
    monkeypatch.setenv("NANOPEFT_BF16", "1")
    assert M.bf16_fast("cpu") and not M.bf16_fast("meta")
    cpuinfo["text"] = "processor : 0\nflags : fpu avx2 avx512_bf16\n"
    monkeypatch.setattr(M, "open", lambda *a, **k: io.StringIO(cpuinfo["text"]), raising=False)
    monkeypatch.setenv("NANOPEFT_BF16", "0")
    assert not M.bf16_fast("cpu")
    monkeypatch.setenv("NANOPEFT_BF16", "yes")
    with pytest.raises(ValueError, match="NANOPEFT_BF16='yes'"):
        M.bf16_fast("cpu")


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
