"""
RoCoFT: fine-tune only r rows or r columns of each target weight matrix. "RoCoFT: Efficient Finetuning
of Large Language Models with Row-Column Updates" (Kowsher et al., arXiv 2410.10075).

    W = W0 + R   (row mode: R has r non-zero rows; a row is an output feature)        # Eq. (2)
    W = W0 + C   (column mode: C has r non-zero columns; a column is an input feature)

The trainable tensor D is exactly the non-zero block: D = R[index] (r x n_in) in row mode,
D = C[:, index] (n_out x r) in column mode, fp32, zero-initialised, so training starts at W0.
The forward never builds the dense R or C:
    rows:    y = W0 x,  then y[index] += D x          (index_add into the r output positions)
    columns: y = W0 x + D x[index]                    (only the r selected input features)
Trainable numbers per n_out x n_in matrix: r·n_in (rows) or r·n_out (columns); nothing else trains
(the authors' code also trains biases and norms by accident).

Which rows/columns (`rocoft_select`):
  first   the first r (the paper's tables, Section 4)
  random  r distinct indices drawn uniformly: one torch.Generator seeded with the run's seed, then
          torch.randperm(n)[:r] for each target matrix in model order
  max/min/mixed  the ablation's Wanda-style score (Section 6, Eq. (3)): S_ij = |W_ij|·‖X_j‖₂, where
          ‖X_j‖₂ is the L2 norm of input feature j over every real (non-padding) token of the first
          `score_batches` batches given to `prepare`; a row's score sums S over its columns,
          a column's score sums S over its rows. (The paper's text swaps the two vector lengths;
          a row score has one entry per output feature, n_out.) max = the r highest scores, min =
          the r lowest, mixed = the ceil(r/2) highest plus the floor(r/2) lowest. Ties go to the
          lower index (stable sort).
The selected indices are stored sorted, as a buffer `index`, so checkpoints carry them.
"""
import itertools
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from distributed import all_reduce_sum_, rank_world
from model import up_to_last_target
from targets import LINEAR_NAMES, adamw, find_linears, fold, replace_module, wide

MODES = ("row", "column")
SELECTS = ("first", "random", "max", "min", "mixed")
PAPER = "RoCoFT (Kowsher et al.)"
TRAINER = "not in the paper; the authors' code uses the Hugging Face Trainer's default"


@dataclass
class Settings:
    """RoCoFT's settings: the paper's arithmetic setup (MATH-10K), each default with its source.
    `tiny` is the value the built-in tiny model uses instead."""
    rank: int = field(default=3, metadata={"source": f"{PAPER}, App. B, Table 9: rank 3 for every task"})
    targets: tuple[str, ...] = field(default=LINEAR_NAMES, metadata={
        "source": "the authors' code: every Linear (lm_head too, which nanopeft leaves out)"})
    lr: float = field(default=1e-3, metadata={"source": f"{PAPER}, Table 9", "tiny": 1e-2})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"source": TRAINER})
    eps: float = field(default=1e-8, metadata={"source": TRAINER})
    weight_decay: float = field(default=0.0, metadata={"source": f"{PAPER}, Table 9"})
    max_grad_norm: float = field(default=1.0, metadata={"source": TRAINER})
    schedule: str = field(default="cosine", metadata={"source": f"{PAPER}, Table 9"})
    warmup_ratio: float = field(default=0.4, metadata={
        "source": f"{PAPER}, Table 9: 500 warmup steps of ~1,240 (2 epochs of MATH-10K at batch 16)", "tiny": 0.03})
    epochs: float = field(default=2.0, metadata={"source": f"{PAPER}, Table 9"})
    batch_size: int = field(default=16, metadata={"source": f"{PAPER}, Table 9 (8 x 2 accumulation)"})
    mode: str = field(default="row", metadata={
        "help": "row (r output features) or column (r input features)", "choices": MODES,
        "source": f"{PAPER}, Eq. (2); rows in Table 3's best results"})
    select: str = field(default="first", metadata={
        "help": "which rows/columns: first, random, or by Wanda score max, min, mixed", "choices": SELECTS,
        "source": f"{PAPER}, §4 (first r); the others §6's ablation"})
    score_batches: int = field(default=8, metadata={
        "help": "max/min/mixed: micro-batches for the activation norms", "source": "nanopeft (the paper gives none)"})

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"--rank must be a positive integer, got {self.rank}")
        if self.mode not in MODES:
            raise ValueError(f"unknown --rocoft-mode {self.mode!r}; allowed: {', '.join(MODES)}")
        if self.select not in SELECTS:
            raise ValueError(f"unknown --rocoft-select {self.select!r}; allowed: {', '.join(SELECTS)}")
        if not isinstance(self.score_batches, int) or self.score_batches < 1:
            raise ValueError(f"--rocoft-score-batches must be a positive integer, got {self.score_batches}")


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

    real = [None]  # the current batch's non-padding positions [B, T]

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0].detach()[real[0]]  # [real tokens, n_in]
            sq[name] += x.float().pow(2).sum(0)
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in linears]
    seen = tokens = 0
    rank, world = rank_world()  # data parallel: process r takes batches r, r + world, ...; summed below
    try:
        for i, (x, y) in enumerate(itertools.islice(batches, n_batches)):
            if i % world != rank:
                continue
            real[0] = up_to_last_target(y)  # padding is not data: collate pads after a row's last target
            model(x)
            seen, tokens = seen + 1, tokens + int(real[0].sum())
    finally:
        for h in handles:
            h.remove()
    counts = torch.tensor([seen, tokens], dtype=torch.float64)
    all_reduce_sum_([*sq.values(), counts])
    seen, tokens = (int(c) for c in counts)
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


def prepare(model, s: Settings, batches, *, seed=0, total_steps=None, grad_accum=1, n_train=None,
            lr_first=None) -> torch.optim.Optimizer:
    """Freeze the model, replace each target Linear by a RoCoFTLinear on the selected rows/columns,
    and return AdamW over the D blocks only."""
    model.requires_grad_(False)
    linears = find_linears(model, s.targets)
    dim = 0 if s.mode == "row" else 1  # rows are indexed along n_out, columns along n_in
    # a rank larger than the matrix has rows/columns: clamp, one line per shape
    clamped = {}
    for name, m in linears:
        n = m.weight.shape[dim]
        if s.rank > n:
            clamped.setdefault(tuple(m.weight.shape), set()).add(name.split(".")[-1])
    for (n_out, n_in), names in clamped.items():
        n = (n_out, n_in)[dim]
        print(f"rocoft: rank {s.rank} asked but the {n_out}x{n_in} (n_out x n_in) matrices "
              f"({', '.join(sorted(names))}) have {n} {s.mode}s; using {n}")
    if s.select in ("max", "min", "mixed"):
        n_batches = s.score_batches
        if n_train and n_batches > max(1, n_train // s.batch_size):  # more would repeat the data
            n_batches = max(1, n_train // s.batch_size)
            print(f"rocoft: --rocoft-score-batches {s.score_batches} is more than the {n_batches} micro-batches of "
                  f"{s.batch_size} in the {n_train} training examples; using {n_batches}")
        norms = activation_norms(model, linears, batches, n_batches)
    gen = torch.Generator().manual_seed(seed)
    for name, m in linears:
        n = m.weight.shape[dim]
        r = min(s.rank, n)
        if s.select == "first":  # the paper's tables
            index = torch.arange(r)
        elif s.select == "random":
            index = torch.randperm(n, generator=gen)[:r].sort().values
        else:  # Section 6 ablation
            index = pick(wanda_score(m.weight, norms[name], s.mode), r, s.select)
        replace_module(model, name, RoCoFTLinear(m, s.mode, index))
    named = [(f"{n}.D", m.D) for n, m in model.named_modules() if isinstance(m, RoCoFTLinear)]
    return adamw(named, s.lr, s.betas, s.eps, s.weight_decay)


def merge(model, optimizer, s: Settings) -> None:
    """Write D into the selected rows/columns of W (merge_adapter, in fp32, rounded once into W's
    dtype) and put plain nn.Linear modules back."""
    fold(model, adapter_state(model, optimizer), merge_adapter, s)


def adapter_state(model, optimizer=None) -> dict:
    """The learned update: each target's D block and the indices it belongs to."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, RoCoFTLinear):
            out[f"{name}.D"] = m.D.detach()
            out[f"{name}.index"] = m.index
    return out


def merge_adapter(base: dict, adapter: dict, s: Settings) -> dict:
    """{weight name: W0 with D added into its rows (or columns)} in fp32 (targets.wide), for every adapted matrix;
    `base` holds the base weights as stored (any dtype), `adapter` what adapter_state returned."""
    out = {}
    for key in adapter:
        if key.endswith(".D"):
            name = key.removesuffix(".D")
            W, D, index = wide(base[f"{name}.weight"]).clone(), adapter[key], adapter[f"{name}.index"].long()
            if s.mode == "row":
                W[index] += D.to(W.device)
            else:
                W[:, index] += D.to(W.device)
            out[f"{name}.weight"] = W
    return out
