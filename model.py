"""
A self-contained LLaMA (Llama-3 family) in plain PyTorch: config presets, RMSNorm, RoPE with Llama-3
frequency scaling, grouped-query attention with a KV cache, the SwiGLU MLP, the Transformer, and the
training loss fused with lm_head. Module names follow Hugging Face (`layers[i].self_attn.q_proj`,
`mlp.gate_proj`, ...) so checkpoints load by plain copy and the PEFT methods can target layers by the
names the papers use. Loading and saving live in weights.py, generation in generate.py, tokenizers
in tokenizer.py.
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

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
        """Fill the derived sizes; refuse what no model can be built from, one line naming the field
        (weights.py checks a file's keys first and names the file)."""
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "hidden_dim",
                     "head_dim", "max_seq_len"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name}={v!r} must be a positive integer")
        for name in ("norm_eps", "rope_theta", "ffn_dim_multiplier"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < math.inf):
                raise ValueError(f"{name}={v!r} must be a positive number")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not a multiple of n_heads={self.n_heads} and no head_dim is given")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (RoPE rotates the two halves of a head)")
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


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512-BF16 / AMX, aarch64 BF16 (/proc/cpuinfo)
BF16_ENV = "NANOPEFT_BF16"  # CPU: 1 answers as a bf16-capable CPU, 0 as one without; unset: /proc/cpuinfo


def bf16_fast(device="cpu") -> bool:
    """Does `device` multiply bf16 matrices natively, faster than fp32? What --dtype auto asks. CUDA:
    bf16 support (Ampere and newer). CPU: the instructions in /proc/cpuinfo's flags (Linux); without
    them bf16 GEMMs are emulated, and many times slower than fp32 (1.3 vs 84 GFLOP/s on an AVX2 CPU).
    On a CPU $NANOPEFT_BF16=1 / 0 overrides the answer: every machine can run (and test) the path a
    bf16-capable CPU or a GPU takes by default, and a bf16-capable CPU the fp32 path."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    forced = os.environ.get(BF16_ENV, "")
    if forced:
        if forced not in ("0", "1"):
            raise ValueError(f"${BF16_ENV}={forced!r}: use 1 (bf16 as on a bf16-capable CPU), 0 (fp32), or unset it")
        return forced == "1"
    try:
        flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo")
                      if line.startswith(("flags", "Features"))), [])
    except OSError:  # not Linux: fp32, the safe choice
        return False
    return any(f in flags for f in BF16_CPU_FLAGS)
