"""
HyperAdapt: scale the rows and columns of each frozen weight matrix. Gurung & Campbell, "HyperAdapt:
Simple High-Rank Adaptation" (arXiv 2509.18629):

    W' = diag(a) · W0 · diag(b),   a ∈ R^{n_out}, b ∈ R^{n_in}, both initialised to ones,

so training starts at W' = W0 and trains n_out + n_in numbers per matrix (no rank). The update
    ΔW = (diag(a) − I) W0 diag(b) + W0 (diag(b) − I)
has rank ≤ min(2·rank(W0), n_out, n_in) (the paper's Lemma), far more than a LoRA with the same
number of parameters (rank 1). The forward never builds W':  y = a ⊙ (W0 (b ⊙ x)).
After `merge` the scales are folded into W (no inference latency).
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from targets import LINEAR_NAMES, adamw, find_linears, fold, replace_module, wide

PAPER = "HyperAdapt (Gurung & Campbell), arithmetic reasoning hyperparameters"


@dataclass
class Settings:
    """HyperAdapt's settings: the paper's arithmetic setup (Math10K), each default with its source.
    No rank: n_out + n_in scales per matrix. `tiny` is the value the built-in tiny model uses instead."""
    targets: tuple[str, ...] = field(default=LINEAR_NAMES, metadata={"source": f"{PAPER}: Q, K, V, O, Gate, Up, Down"})
    lr: float = field(default=3e-3, metadata={"source": PAPER, "tiny": 1e-1})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"source": "not given; PyTorch's AdamW default"})
    eps: float = field(default=1e-8, metadata={"source": "not given; PyTorch's AdamW default"})
    weight_decay: float = field(default=0.0, metadata={
        "source": "not given; 0, since decay pulls the scales toward 0, not toward 1"})
    max_grad_norm: float = field(default=1.0, metadata={"source": PAPER})
    schedule: str = field(default="cosine", metadata={"source": PAPER})
    warmup_ratio: float = field(default=0.86, metadata={
        "source": f"{PAPER}: 100 warmup steps of ~116 (3 epochs of Math10K at batch 256)", "tiny": 0.03})
    epochs: float = field(default=3.0, metadata={"source": PAPER})
    batch_size: int = field(default=256, metadata={"source": PAPER})


class HyperLinear(nn.Module):
    """A frozen nn.Linear whose outputs are scaled by a and inputs by b (fp32, trainable)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.weight = base.weight  # frozen W0, same state-dict key and dtype as the Linear had
        n_out, n_in = base.weight.shape
        self.a = nn.Parameter(torch.ones(n_out, dtype=torch.float32, device=base.weight.device))
        self.b = nn.Parameter(torch.ones(n_in, dtype=torch.float32, device=base.weight.device))

    def forward(self, x):
        # a ⊙ (W0 (b ⊙ x)); each product in fp32, rounded once to x's dtype: scales cast to bf16 first
        # would lose every change below bf16's resolution (0.4-0.8% near 1) on a bf16 base
        h = F.linear((x.float() * self.b).to(x.dtype), self.weight)
        return (h.float() * self.a).to(x.dtype)

    def extra_repr(self):
        n_out, n_in = self.weight.shape
        return f"{n_in} -> {n_out}"


def prepare(model, s: Settings, batches, *, seed=0, total_steps=None, grad_accum=1, n_train=None,
            lr_first=None) -> torch.optim.Optimizer:
    """Freeze the model, wrap each target Linear in a HyperLinear, return AdamW over all a and b.
    `batches` is not used: HyperAdapt starts from a = b = 1, W' = W0."""
    if s.weight_decay:
        print(f"hyper: note: weight_decay {s.weight_decay} pulls the scales a, b toward 0 (not toward 1), "
              "shrinking W; 0 is the usual choice")
    model.requires_grad_(False)
    for name, m in find_linears(model, s.targets):
        replace_module(model, name, HyperLinear(m))
    named = [(f"{n}.{k}", getattr(m, k)) for n, m in model.named_modules() if isinstance(m, HyperLinear)
             for k in ("a", "b")]
    return adamw(named, s.lr, s.betas, s.eps, s.weight_decay)


def merge(model, optimizer, s: Settings) -> None:
    """W0 * a[:, None] * b[None, :] (merge_adapter, in fp32, rounded once into W's dtype); plain
    nn.Linear modules back."""
    fold(model, adapter_state(model, optimizer), merge_adapter, s)


def adapter_state(model, optimizer=None) -> dict:
    """The learned update: each target's output scales a and input scales b."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, HyperLinear):
            out[f"{name}.a"] = m.a.detach()
            out[f"{name}.b"] = m.b.detach()
    return out


def merge_adapter(base: dict, adapter: dict, s: Settings) -> dict:
    """{weight name: diag(a) W0 diag(b)} in fp32 (targets.wide), for every adapted matrix; `base` holds the base
    weights as stored (any dtype), `adapter` what adapter_state returned."""
    out = {}
    for key in adapter:
        if key.endswith(".a"):
            name = key.removesuffix(".a")
            out[f"{name}.weight"] = wide(base[f"{name}.weight"]) * adapter[key][:, None] * adapter[f"{name}.b"][None, :]
    return out
