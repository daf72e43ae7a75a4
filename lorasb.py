"""
The LoRA family as a progression, each step a few lines on top of the previous one.
Orientation as everywhere in nanopeft: a target weight W0 is n_out x n_in and y = W x.

1. LoRA    (Hu et al., 2021)      W = W0 + (alpha/r) B A          A (r x n_in), B (n_out x r) trained,
                                                                  B = 0: training starts at W0 exactly.
2. LoRA-XS (Balazy et al., 2024)  W = W0 + B R A                  B, A frozen, from the truncated SVD of W0;
                                                                  only R (r x r) trained, R ~ N(0, 1e-5^2).
3. LoRA-SB (Ponkshe et al., 2024) W = W0 + B R A                  the LoRA-XS structure, but B, A, R from the
                                                                  truncated SVD of the (averaged) first step of
                                                                  full fine-tuning, so training starts at W0 +
                                                                  (best rank-r approximation of that step).

Trainable numbers per matrix: LoRA r (n_in + n_out); LoRA-XS and LoRA-SB r^2.
The update is applied as x -> A -> (R) -> B, never as a dense Delta W: r (n_in + n_out) (+ r^2)
multiply-adds per token. `merge` folds it into plain nn.Linear weights.

Papers: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022); Bałazy et al.,
"LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters" (arXiv 2405.17604); Ponkshe,
Singhal et al., "Initialization using Update Approximation is a Silver Bullet for Extreme Efficient
Low-Rank Fine-Tuning" (LoRA-SB, arXiv 2411.19557).

The seam (methods.py): the settings of each method (LoRA, LoRAXS, LoRASB below, the papers' defaults),
prepare, adapter_state, merge_adapter (the update, stated once) and merge.
"""
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from distributed import all_reduce_sum_, rank_world
from targets import LINEAR_NAMES, adamw, find_linears, fold, positive_finite, replace_module, wide

LORAXS_R_STD = 1e-5  # LoRA-XS: R drawn from N(0, sigma^2), sigma = 1e-5 (the authors' code)
LIFT = "LIFT (Liu et al., ICML 2025)'s LoRA baseline"
XS = "the LoRA-XS authors' MetaMathQA script (run_math_tuning.sh)"
SB = "LoRA-SB (Ponkshe et al.)"
TRAINER = "the Hugging Face Trainer's default (their code)"
ALL = "all seven projections"
INITS = ("gradient", "kaiming", "gaussian")


def _check_rank(rank):
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"--rank must be a positive integer, got {rank}")


@dataclass
class LoRA:
    """LoRA as the papers' math tables run it (LIFT's baseline: LLaMA on MATH-10K). `tiny`: the
    built-in tiny model's value."""
    rank: int = field(default=128, metadata={"source": f"{LIFT}: rank 128 (64 for LLaMA-3-8B), App. D"})
    targets: tuple[str, ...] = field(default=LINEAR_NAMES, metadata={"source": f"{LIFT}: {ALL}"})
    lr: float = field(default=2e-4, metadata={"source": f"{LIFT}, App. D, Table 6", "tiny": 1e-2})
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"source": f"{LIFT} (the authors' code)"})
    eps: float = field(default=1e-8, metadata={"source": f"{LIFT} (the authors' code)"})
    weight_decay: float = field(default=0.0, metadata={"source": f"{LIFT} (the authors' scripts)"})
    max_grad_norm: float = field(default=0.0, metadata={"source": f"{LIFT}: no clipping in the authors' loop"})
    schedule: str = field(default="linear", metadata={"source": f"{LIFT}, Table 6"})
    warmup_ratio: float = field(default=0.03, metadata={"source": f"{LIFT}, Table 6"})
    epochs: float = field(default=3.0, metadata={"source": f"{LIFT}, Table 6"})
    batch_size: int = field(default=16, metadata={"source": f"{LIFT}, Table 6"})
    alpha: float | None = field(default=None, metadata={
        "help": "LoRA scale alpha/r; default alpha = 2r", "source": f"{LIFT}: alpha = 2r (the authors' configs)"})

    def __post_init__(self):
        _check_rank(self.rank)
        if self.alpha is not None and not positive_finite(self.alpha):
            raise ValueError(f"--lora-alpha {self.alpha} is not allowed: a positive finite number (the update is scaled "
                             "by alpha/r, so 0 trains an adapter that changes nothing; unset, alpha = 2r)")


@dataclass
class LoRAXS:
    """LoRA-XS as its authors train LLMs on math (Mistral-7B on MetaMathQA). `tiny`: the built-in
    tiny model's value."""
    rank: int = field(default=64, metadata={"source": XS})
    targets: tuple[str, ...] = field(default=LINEAR_NAMES, metadata={"source": f"{XS}: {ALL}"})
    lr: float = field(default=4e-3, metadata={"source": XS, "tiny": 1e-2})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"source": TRAINER})
    eps: float = field(default=1e-8, metadata={"source": TRAINER})
    weight_decay: float = field(default=0.0, metadata={"source": XS})
    max_grad_norm: float = field(default=1.0, metadata={"source": TRAINER})
    schedule: str = field(default="cosine", metadata={"source": XS})
    warmup_ratio: float = field(default=0.02, metadata={"source": XS})
    epochs: float = field(default=2.0, metadata={"source": XS})
    batch_size: int = field(default=128, metadata={"source": f"{XS} (2 x 64 accumulation)"})

    def __post_init__(self):
        _check_rank(self.rank)


@dataclass
class LoRASB:
    """LoRA-SB's math setup (Mistral-7B / Gemma-2-9B on MetaMathQA): its equations in the paper, the
    numbers its tables lost in the authors' code. `tiny`: the built-in tiny model's value."""
    rank: int = field(default=96, metadata={"source": f"{SB}: r = 96 for LLMs (the authors' code default)"})
    targets: tuple[str, ...] = field(default=LINEAR_NAMES, metadata={"source": f"{SB}, §4.1: {ALL}"})
    lr: float = field(default=1e-4, metadata={"source": f"{SB}, App. C; 1e-4 in the authors' math script",
                                              "tiny": 1e-2})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"source": "the authors' code: torch AdamW"})
    eps: float = field(default=1e-8, metadata={"source": "the authors' code: torch AdamW"})
    weight_decay: float = field(default=0.01, metadata={"source": "the authors' code: torch AdamW's default 0.01"})
    max_grad_norm: float = field(default=1.0, metadata={"source": TRAINER})
    schedule: str = field(default="cosine", metadata={"source": f"{SB}, Table 7; the authors' code"})
    warmup_ratio: float = field(default=0.02, metadata={"source": "the authors' code"})
    epochs: float = field(default=1.0, metadata={"source": "the authors' code"})
    batch_size: int = field(default=32, metadata={"source": "the authors' code (1 x 32 accumulation)"})
    init_samples: int | None = field(default=None, metadata={
        "help": "examples for the first-step gradient estimate (default 0.1% of the training set, at least 64)",
        "source": f"{SB}, §4: a small share of the data (0.1%; their runs used 50-170 examples)"})
    init: str = field(default="gradient", metadata={
        "help": "what B R A is the truncated SVD of: gradient (the first full-FT step, LoRA-SB), or the "
                "ablation's kaiming / gaussian matrix (Table 4)", "choices": INITS,
        "source": f"{SB}, §3.4; Table 4 for the others"})
    init_std: float = field(default=1e-3, metadata={
        "help": "init gaussian: the noise's standard deviation", "source": f"{SB}, Table 4 (several; values lost)"})

    def __post_init__(self):
        _check_rank(self.rank)
        if self.init not in INITS:
            raise ValueError(f"unknown --lorasb-init {self.init!r}; allowed: {', '.join(INITS)}")
        if not positive_finite(self.init_std):
            raise ValueError(f"--lorasb-init-std {self.init_std} is not allowed: a positive number")
        if self.init_samples is not None and (not isinstance(self.init_samples, int) or self.init_samples < 1):
            raise ValueError(f"--lorasb-init-samples must be a positive integer, got {self.init_samples!r}")

# -----------------------------------------------------------------------------
# the adapter module: one class for the whole family


class LowRankLinear(nn.Module):
    """y = W0 x + scale * B (R (A x)), R omitted for LoRA.
    LoRA: A, B are trainable parameters. LoRA-XS/SB: A, B are frozen fp32 buffers (in the state dict,
    so checkpoints carry them) and only R is a parameter. The base weight stays `self.weight`
    (same state-dict key as the nn.Linear it replaces, frozen, its own dtype)."""

    def __init__(self, linear: nn.Linear, A, B, R=None, scale=1.0):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.scale = scale
        if R is None:   # LoRA: A and B train
            self.A, self.B, self.R = nn.Parameter(A), nn.Parameter(B), None
        else:           # LoRA-XS / LoRA-SB: A and B frozen, R trains (Eq. (3))
            self.register_buffer("A", A)
            self.register_buffer("B", B)
            self.R = nn.Parameter(R)

    def forward(self, x):
        h = F.linear(x, self.A.to(x.dtype))                  # [.., r]
        if self.R is not None:
            h = F.linear(h, self.R.to(x.dtype))              # [.., r]
        # the scale multiplies the r-wide h, not the n_out-wide product: the same sum, a smaller pass
        return F.linear(x, self.weight, self.bias) + F.linear(h * self.scale, self.B.to(x.dtype))

    def delta(self) -> torch.Tensor:
        """The dense update scale * B R A (fp32), for the tests."""
        RA = self.A if self.R is None else self.R @ self.A
        return self.scale * (self.B @ RA)

    def extra_repr(self):
        kind = "lora" if self.R is None else "B R A"
        return f"{self.weight.shape[1]} -> {self.weight.shape[0]}, r={self.A.shape[0]}, {kind}, scale={self.scale:g}"


def _fp32(t):
    """A contiguous fp32 copy that shares no storage (slices of an SVD would keep the full factors alive)."""
    return t.to(torch.float32).clone(memory_format=torch.contiguous_format)


def truncated_svd(M, r):
    """M ~= U_r diag(S_r) Vh_r, computed in fp32 (exact SVD, then truncated)."""
    U, S, Vh = torch.linalg.svd(M.float(), full_matrices=False)
    return U[:, :r], S[:r], Vh[:r]

# -----------------------------------------------------------------------------
# 1. LoRA: W = W0 + (alpha/r) B A  (Hu et al., 2021, Eq. (3) there; LoRA-SB paper Eq. (2))


def lora_factors(W0, r, g):
    """A ~ Kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(n_in), 1/sqrt(n_in)) as in the reference LoRA, B = 0,
    so B A = 0 and training starts exactly at W0."""
    n_out, n_in = W0.shape
    A = (torch.rand(r, n_in, generator=g) * 2 - 1) / n_in ** 0.5
    B = torch.zeros(n_out, r)
    return A, B

# -----------------------------------------------------------------------------
# 2. LoRA-XS: W = W0 + B R A with B, A frozen (LoRA-SB paper Eq. (3))


def loraxs_factors(W0, r, g):
    """LoRA-XS initialisation (Balazy et al., 2024): the frozen factors are the truncated SVD of the
    pretrained weight, W0 ~= U_r S_r V_r^T. Their code factors W0^T (row-vector convention) into the
    down-projection U'_r S_r and the up-projection V'_r^T; for our n_out x n_in weights that is
    B = U_r (n_out x r), A = S_r V_r^T (r x n_in). R ~ N(0, 1e-5^2); scale 1 (their LLM runs set
    lora_alpha = r). So B A is the best rank-r approximation of W0 and B R A starts near zero."""
    U, S, Vh = truncated_svd(W0, r)
    B, A = U, S[:, None] * Vh
    R = torch.randn(r, r, generator=g) * LORAXS_R_STD
    return B, R, A

# -----------------------------------------------------------------------------
# 3. LoRA-SB: LoRA-XS initialised from the first step of full fine-tuning (Sec. 3.4, 3.6)


def first_step_gradients(model, linears, batches, n_samples):
    """G = d loss / d W over `n_samples` training examples (Eq. (7)), for the target weights only: the
    gradient of the first full-FT step, whose loss is the mean over all its target tokens (as the
    training loop's steps), so each batch's mean loss weighs its share of the target tokens and G does
    not depend on how the examples are batched. A post-accumulate-grad hook adds each weight's gradient into its fp32 sum the moment
    autograd has it and frees it, so no more dense gradients exist at once than autograd needs
    (Sec. 3.6, 'Algorithm'); the rest of the model stays frozen."""
    G, hooks = {}, []
    for name, lin in linears:
        w = lin.weight
        # the sums live in CPU memory, not on the accelerator: for Llama-3-8B they are ~28 GB of fp32
        G[name] = torch.zeros(w.shape, dtype=torch.float32)

        def add_and_free(p, acc=G[name]):
            acc.add_(p.grad.to("cpu", torch.float32))
            p.grad = None
        w.requires_grad_(True)
        hooks.append(w.register_post_accumulate_grad_hook(add_and_free))
    taken, seen = [], 0  # the n_samples examples (0.1% of the data), to count their target tokens first
    for x, y in batches:
        taken.append((x[:n_samples - seen], y[:n_samples - seen]))
        seen += taken[-1][0].shape[0]
        if seen >= n_samples:
            break
    n_targets = sum(int((y != -100).sum()) for _, y in taken)
    seen, t0, report = 0, time.time(), n_samples / 4
    rank, world = rank_world()  # data parallel: process r takes batches r, r + world, ...; G is summed below
    try:
        with torch.enable_grad():
            for nb, (x, y) in enumerate(taken):
                if nb % world == rank:
                    _, loss = model(x, y)
                    if not torch.isfinite(loss):
                        raise ValueError(f"lorasb: loss is {loss.item()} on batch {nb} of the gradient estimate")
                    (loss * (int((y != -100).sum()) / n_targets)).backward()
                seen += x.shape[0]
                if seen >= report:  # a progress line at every quarter
                    print(f"lorasb: gradient estimate {seen}/{n_samples} examples, {time.time() - t0:.1f}s", flush=True)
                    while report <= seen:
                        report += n_samples / 4
    finally:
        for h in hooks:
            h.remove()
        for _, lin in linears:
            lin.weight.requires_grad_(False)
            lin.weight.grad = None
    for g in G.values():  # one matrix at a time: no second copy of every G
        all_reduce_sum_([g])
    return G


def lorasb_factors(G, r, lr_first):
    """Eq. (6)-(11): the first AdamW step of full FT is Delta W = -eta_1 sign(G) (Adam's first update
    m_hat / sqrt(v_hat) = sign(g)); truncated SVD Delta W ~= U_r S_r V_r^T; B = U_r, A = V_r^T,
    R = S_r. By Eckart-Young, B R A is the best rank-r approximation of Delta W; B, A orthonormal."""
    U, S, Vh = truncated_svd(-lr_first * torch.sign(G), r)
    return U, torch.diag(S), Vh


def ablation_factors(W0, r, init, std, g):
    """LoRA-SB's Table 4 ablation: B R A from the truncated SVD of a matrix that knows nothing of the
    data, a Kaiming-uniform one (as LoRA's A) or N(0, std^2), so only the initialisation differs."""
    n_out, n_in = W0.shape
    M = (torch.rand(n_out, n_in, generator=g) * 2 - 1) / n_in ** 0.5 if init == "kaiming" else \
        torch.randn(n_out, n_in, generator=g) * std
    U, S, Vh = truncated_svd(M, r)
    return U, torch.diag(S), Vh

# -----------------------------------------------------------------------------
# the seam


def prepare(model, s: LoRA | LoRAXS | LoRASB, batches, *, seed: int = 0, total_steps=None, grad_accum=1,
            n_train: int | None = None, lr_first: float | None = None) -> torch.optim.Optimizer:
    """Freeze the model, replace every target Linear by a LowRankLinear initialised as the type of `s`
    says (LoRA, LoRA-XS, LoRA-SB), return AdamW over exactly the adapters' trainable tensors.
    LoRA-SB also needs `lr_first`, the learning rate of the first optimizer step (its eta_1), and
    `n_train`, the training-set size its default sample count is a share of."""
    method = {LoRA: "lora", LoRAXS: "loraxs", LoRASB: "lorasb"}[type(s)]
    model.requires_grad_(False)
    linears = find_linears(model, s.targets)
    g = torch.Generator().manual_seed(seed)
    if method == "lorasb" and s.init == "gradient":
        if lr_first is None or not lr_first > 0:
            raise ValueError(f"lorasb: lr_first={lr_first} must be > 0 (the learning rate of the first optimizer step)")
        n = s.init_samples or min(n_train or 64, max(64, round(0.001 * (n_train or 0))))
        if n_train and n > n_train:  # the estimate would repeat examples (and hold every batch it reads)
            print(f"lorasb: --lorasb-init-samples {n} is more than the {n_train} training examples; using {n_train}")
            n = n_train
        t0 = time.time()
        G = first_step_gradients(model, linears, batches, n)
        print(f"lorasb: averaged first full-FT step from {n} examples over {len(G)} matrices in {time.time() - t0:.1f}s")
    clamped, t0 = {}, time.time()
    for name, lin in linears:
        W0 = lin.weight.detach()
        n_out, n_in = W0.shape
        r = min(s.rank, n_out, n_in)
        if r < s.rank:
            clamped.setdefault((n_out, n_in, r), []).append(name.split(".")[-1])
        if method == "lora":
            A, B = lora_factors(W0, r, g)
            R, scale = None, lora_scale(s, r)
        elif method == "loraxs":
            B, R, A = loraxs_factors(W0, r, g)
            scale = 1.0
        elif s.init != "gradient":
            B, R, A = ablation_factors(W0, r, s.init, s.init_std, g)
            scale = 1.0
        else:
            B, R, A = lorasb_factors(G.pop(name).to(W0.device), r, lr_first)
            scale = 1.0   # Sec. 3.5 / Theorem 5: no scaling factor needed
        dev = W0.device
        R = None if R is None else _fp32(R).to(dev)
        replace_module(model, name, LowRankLinear(lin, _fp32(A).to(dev), _fp32(B).to(dev), R, scale))
    for (n_out, n_in, r), names in clamped.items():
        print(f"{method}: --rank {s.rank} exceeds min(n_out, n_in) of {n_out}x{n_in} matrices "
              f"({', '.join(sorted(set(names)))}, {len(names)} of them); using r={r} there")
    if method != "lora":
        print(f"{method}: truncated SVD of {len(linears)} matrices in {time.time() - t0:.1f}s")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return adamw(params, s.lr, s.betas, s.eps, s.weight_decay)


def lora_scale(s, r: int) -> float:
    """LoRA's alpha / r, with r the matrix's own rank (after clamping); alpha defaults to 2r."""
    return (2 * r if s.alpha is None else s.alpha) / r


def merge(model, optimizer, s) -> None:
    """Fold scale * B R A into each base weight (merge_adapter, in fp32, rounded once into the base
    dtype) and put a plain nn.Linear back: the state dict then has exactly the base model's keys."""
    fold(model, adapter_state(model, optimizer), merge_adapter, s)


def adapter_state(model, optimizer=None) -> dict:
    """The learned update: A, B (LoRA) or A, B, R (LoRA-XS / LoRA-SB) of every adapted layer, keyed as
    in model.state_dict()."""
    return {f"{n}.{k}": t.detach() for n, m in model.named_modules() if isinstance(m, LowRankLinear)
            for k, t in (("A", m.A), ("B", m.B), ("R", m.R)) if t is not None}


def merge_adapter(base: dict, adapter: dict, s) -> dict:
    """{weight name: W0 + scale * B R A} in fp32 (targets.wide), for every adapted matrix; `base` holds the base
    weights as stored (any dtype), `adapter` what adapter_state returned, `s` the run's settings
    (LoRA's scale alpha / r, with r the matrix's own rank after clamping)."""
    out = {}
    for key in adapter:
        if key.endswith(".A"):
            name = key.removesuffix(".A")
            A, B, R = adapter[key], adapter[f"{name}.B"], adapter.get(f"{name}.R")
            scale = lora_scale(s, A.shape[0]) if R is None else 1.0  # LoRA-XS / LoRA-SB: no scale
            RA = A if R is None else R @ A
            out[f"{name}.weight"] = wide(base[f"{name}.weight"]) + scale * (B @ RA).to(base[f"{name}.weight"].device)
    return out
