"""
HyperAdapt (hyperadapt.txt; its method section is lost in the extract, NOTES.md gives it):
scale the rows and columns of each frozen weight matrix,

    W' = diag(a) · W0 · diag(b),   a ∈ R^{n_out}, b ∈ R^{n_in}, both initialised to ones,

so training starts at W' = W0 and trains n_out + n_in numbers per matrix (no rank). The update
    ΔW = (diag(a) − I) W0 diag(b) + W0 (diag(b) − I)
has rank ≤ min(2·rank(W0), n_out, n_in) (the paper's Lemma), far more than a LoRA with the same
number of parameters (rank 1). The forward never builds W':  y = a ⊙ (W0 (b ⊙ x)).
After `merge` the scales are folded into W (no inference latency).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import adamw, find_linears, plain_linear, replace_module


class HyperLinear(nn.Module):
    """A frozen nn.Linear whose outputs are scaled by a and inputs by b (fp32, trainable)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.weight = base.weight  # frozen W0, same state-dict key and dtype as the Linear had
        n_out, n_in = base.weight.shape
        self.a = nn.Parameter(torch.ones(n_out, dtype=torch.float32, device=base.weight.device))
        self.b = nn.Parameter(torch.ones(n_in, dtype=torch.float32, device=base.weight.device))

    def forward(self, x):
        return F.linear(x * self.b.to(x.dtype), self.weight) * self.a.to(x.dtype)  # a ⊙ (W0 (b ⊙ x))

    def extra_repr(self):
        n_out, n_in = self.weight.shape
        return f"{n_in} -> {n_out}"


def prepare(model, args, batches) -> torch.optim.Optimizer:
    """Freeze the model, wrap each target Linear in a HyperLinear, return AdamW over all a and b.
    `args.rank` has no meaning here; `batches` is not used."""
    print(f"hyper: rank {args.rank} ignored (HyperAdapt trains n_out + n_in scales per matrix, no rank)")
    if args.weight_decay:
        print(f"hyper: note: weight_decay {args.weight_decay} pulls the scales a, b toward 0 (not toward 1), "
              "shrinking W; 0 is the usual choice")
    model.requires_grad_(False)
    for name, m in find_linears(model, args.targets):
        replace_module(model, name, HyperLinear(m))
    named = [(f"{n}.{k}", getattr(m, k)) for n, m in model.named_modules() if isinstance(m, HyperLinear)
             for k in ("a", "b")]
    return adamw(named, args)


@torch.no_grad()
def merge(model) -> None:
    """W0 * a[:, None] * b[None, :] (computed in fp32, or W's dtype if wider, rounded once into W's
    dtype); plain nn.Linear modules back."""
    for name, m in list(model.named_modules()):
        if not isinstance(m, HyperLinear):
            continue
        W = m.weight
        W.copy_(W * m.a[:, None] * m.b[None, :])  # bf16 W * fp32 a promotes to fp32
        replace_module(model, name, plain_linear(W))


def adapter_state(model, optimizer=None) -> dict:
    """The learned update: each target's output scales a and input scales b."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, HyperLinear):
            out[f"{name}.a"] = m.a.detach()
            out[f"{name}.b"] = m.b.detach()
    return out
