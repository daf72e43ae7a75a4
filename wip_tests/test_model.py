import importlib.util
import json
import os

import pytest
import torch

from model import ModelConfig, Tokenizer, Transformer, generate, load, LLAMA3_SPECIALS

# =============================================================================
# model.py — checked against Hugging Face transformers (tests only)


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
    model-parallel shards split like Meta's (column-parallel on dim 0, row-parallel on dim 1)."""
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
            full["tok_embeddings.weight"] = (v, 1)
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


def _tiny(seed=0, vocab=64, scale=3.0):
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=16, rope_theta=10000.0)
    model = Transformer(cfg).init_weights(seed).eval()
    with torch.no_grad():  # sharper distributions than the init, so greedy choices are not near-ties
        for p in model.parameters():
            p.mul_(scale)
    return model


def test_kv_cache_matches_full_forward():
    model = _tiny()
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
    model = _tiny(1)
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


def test_generate_stops_per_sequence():
    model = _tiny(2)
    prompts = [[5, 6, 7], [9], [1, 2, 3, 4, 5, 6]]
    free = generate(model, prompts, max_new_tokens=10)
    stop = free[0][2]  # the third token of row 0 becomes a stop token
    stopped = generate(model, prompts, max_new_tokens=10, stop_ids=[stop])
    for f, s in zip(free, stopped):
        cut = f.index(stop) if stop in f else len(f)
        assert s == f[:cut]  # each row ends at its own first stop token, the others go on


# =============================================================================
# tokenizer


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


# =============================================================================
# bad input: one clear line naming the value


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
    model = _tiny()
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tensor 'layers.0.mlp.down_proj.weight' .* has shape \(64, 176\), the config needs \(64, 128\)"):
        Transformer.from_pretrained(tmp_path / "m")
    # a tokenizer with more tokens than the model's vocabulary
    _tiny(vocab=200).save_pretrained(tmp_path / "small")
    Tokenizer.bytes().save(tmp_path / "small")
    with pytest.raises(ValueError, match="259 tokens but the model's vocabulary is 200"):
        load(str(tmp_path / "small"))
    (tmp_path / "bad.model").write_text("not base64 at all\n")
    with pytest.raises(ValueError, match="bad.model"):
        Tokenizer.from_file(tmp_path / "bad.model")
