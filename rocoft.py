"""
RoCoFT (rocoft.txt): fine-tune only r rows or r columns of each target weight matrix.

    W = W0 + R   (row mode: R has r non-zero rows; a row is an output feature)        # Eq. (2)
    W = W0 + C   (column mode: C has r non-zero columns; a column is an input feature)

The trainable tensor D is exactly the non-zero block: D = R[index] (r x n_in) in row mode,
D = C[:, index] (n_out x r) in column mode, fp32, zero-initialised, so training starts at W0.
The forward never builds the dense R or C:
    rows:    y = W0 x,  then y[index] += D x          (index_add into the r output positions)
    columns: y = W0 x + D x[index]                    (only the r selected input features)
Trainable numbers per n_out x n_in matrix: r·n_in (rows) or r·n_out (columns); nothing else trains
(the authors' code also trains biases and norms by accident, NOTES.md).

Which rows/columns (`rocoft_select`):
  first   the first r (the paper's tables, Section 4)
  random  r distinct indices drawn uniformly: one torch.Generator seeded with args.seed, then
          torch.randperm(n)[:r] for each target matrix in model order
  max/min/mixed  the ablation's Wanda-style score (Section 6, Eq. (3)): S_ij = |W_ij|·‖X_j‖₂, where
          ‖X_j‖₂ is the L2 norm of input feature j over every token of the first
          `rocoft_score_batches` batches given to `prepare`; a row's score sums S over its columns,
          a column's score sums S over its rows. (The paper's text swaps the two vector lengths;
          a row score has one entry per output feature, n_out.) max = the r highest scores, min =
          the r lowest, mixed = the ceil(r/2) highest plus the floor(r/2) lowest. Ties go to the
          lower index (stable sort).
The selected indices are stored sorted, as a buffer `index`, so checkpoints carry them.
"""
import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import adamw, find_linears, plain_linear, replace_module

MODES = ("row", "column")
SELECTS = ("first", "random", "max", "min", "mixed")


class RoCoFTLinear(nn.Module):
    """A frozen nn.Linear plus r trainable rows (or columns) of update, kept as the block D."""

    def __init__(self, base: nn.Linear, mode: str, index: torch.Tensor):
        super().__init__()
        self.weight = base.weight  # frozen W0, same state-dict key and dtype as the Linear had
        self.mode = mode
        self.register_buffer("index", index.to(device=base.weight.device, dtype=torch.long))
        n_out, n_in = base.weight.shape
        shape = (len(index), n_in) if mode == "row" else (n_out, len(index))
        self.D = nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=base.weight.device))

    def forward(self, x):
        y = F.linear(x, self.weight)
        D = self.D.to(x.dtype)
        if self.mode == "row":
            return y.index_add_(-1, self.index, F.linear(x, D))  # R x touches only the r outputs
        return y.add_(F.linear(x[..., self.index], D))            # C x reads only the r inputs

    def extra_repr(self):
        n_out, n_in = self.weight.shape
        return f"{n_in} -> {n_out}, mode={self.mode}, r={len(self.index)}"


@torch.no_grad()
def activation_norms(model, linears, batches, n_batches: int) -> dict:
    """‖X_j‖₂ for every input feature j of every target Linear, over all tokens of `n_batches`
    batches (Wanda's calibration statistic), collected with forward hooks."""
    sq = {name: torch.zeros(m.in_features, dtype=torch.float32, device=m.weight.device) for name, m in linears}

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0].detach()
            sq[name] += x.float().pow(2).reshape(-1, x.shape[-1]).sum(0)
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in linears]
    seen = tokens = 0
    try:
        for x, _ in itertools.islice(batches, n_batches):
            model(x)
            seen, tokens = seen + 1, tokens + x.numel()
    finally:
        for h in handles:
            h.remove()
    print(f"rocoft: Wanda activation norms from {seen} batches ({tokens} tokens)")
    return {name: s.sqrt() for name, s in sq.items()}


def wanda_score(weight: torch.Tensor, norm: torch.Tensor, mode: str) -> torch.Tensor:
    """Eq. (3): S_ij = |W_ij|·‖X_j‖₂, summed over each row (length n_out) or column (length n_in)."""
    S = weight.detach().float().abs() * norm[None, :]
    return S.sum(1) if mode == "row" else S.sum(0)


def pick(score: torch.Tensor, r: int, how: str) -> torch.Tensor:
    """The r indices that `how` (max, min, mixed) picks from `score`, sorted ascending."""
    desc = torch.sort(score, descending=True, stable=True).indices
    if how == "max":
        idx = desc[:r]
    elif how == "min":
        idx = torch.sort(score, stable=True).indices[:r]
    else:  # mixed: ceil(r/2) from the top, floor(r/2) from the bottom (disjoint since r <= n)
        idx = torch.cat([desc[:(r + 1) // 2], desc[len(desc) - r // 2:]])
    return idx.sort().values


def prepare(model, args, batches) -> torch.optim.Optimizer:
    """Freeze the model, replace each target Linear by a RoCoFTLinear on the selected rows/columns,
    and return AdamW over the D blocks only."""
    mode = getattr(args, "rocoft_mode", "row")
    how = getattr(args, "rocoft_select", "first")
    if mode not in MODES:
        raise ValueError(f"unknown rocoft_mode {mode!r}; allowed: {', '.join(MODES)}")
    if how not in SELECTS:
        raise ValueError(f"unknown rocoft_select {how!r}; allowed: {', '.join(SELECTS)}")
    model.requires_grad_(False)
    linears = find_linears(model, args.targets)
    dim = 0 if mode == "row" else 1  # rows are indexed along n_out, columns along n_in
    # a rank larger than the matrix has rows/columns: clamp, one line per shape
    clamped = {}
    for name, m in linears:
        n = m.weight.shape[dim]
        if args.rank > n:
            clamped.setdefault(tuple(m.weight.shape), set()).add(name.split(".")[-1])
    for (n_out, n_in), names in clamped.items():
        n = (n_out, n_in)[dim]
        print(f"rocoft: rank {args.rank} asked but the {n_out}x{n_in} (n_out x n_in) matrices "
              f"({', '.join(sorted(names))}) have {n} {mode}s; using {n}")
    if how in ("max", "min", "mixed"):
        norms = activation_norms(model, linears, batches, getattr(args, "rocoft_score_batches", 8))
    gen = torch.Generator().manual_seed(args.seed)
    for name, m in linears:
        n = m.weight.shape[dim]
        r = min(args.rank, n)
        if how == "first":  # the paper's tables
            index = torch.arange(r)
        elif how == "random":
            index = torch.randperm(n, generator=gen)[:r].sort().values
        else:  # Section 6 ablation
            index = pick(wanda_score(m.weight, norms[name], mode), r, how)
        replace_module(model, name, RoCoFTLinear(m, mode, index))
    named = [(f"{n}.D", m.D) for n, m in model.named_modules() if isinstance(m, RoCoFTLinear)]
    return adamw(named, args)


@torch.no_grad()
def merge(model) -> None:
    """Write D into the selected rows/columns of W (added in fp32, or W's dtype if wider, rounded
    once into W's dtype) and put plain nn.Linear modules back."""
    for name, m in list(model.named_modules()):
        if not isinstance(m, RoCoFTLinear):
            continue
        W = m.weight  # W + D promotes a bf16 W to fp32, so the sum is rounded once
        if m.mode == "row":
            W[m.index] = (W[m.index] + m.D).to(W.dtype)
        else:
            W[:, m.index] = (W[:, m.index] + m.D).to(W.dtype)
        replace_module(model, name, plain_linear(W))


def adapter_state(model, optimizer=None) -> dict:
    """The learned update: each target's D block and the indices it belongs to."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, RoCoFTLinear):
            out[f"{name}.D"] = m.D.detach()
            out[f"{name}.index"] = m.index
    return out
