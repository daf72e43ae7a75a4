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

Seam (see train.py): prepare(model, args, batches) -> optimizer, merge(model), adapter_state(model,
optimizer). args.method picks one of METHODS. Flags read here: rank, targets, seed, lr, betas, eps,
weight_decay (optimizer), lora_alpha (LoRA), lr_first and lorasb_init_samples (LoRA-SB).
"""
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import adamw, find_linears, plain_linear, replace_module

METHODS = ("lora", "loraxs", "lorasb")
LORAXS_R_STD = 1e-5  # LoRA-XS: R drawn from N(0, sigma^2), sigma = 1e-5 (the authors' code)

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
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(h, self.B.to(x.dtype))

    def delta(self) -> torch.Tensor:
        """The dense update scale * B R A (fp32), for merge and the tests only."""
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
    """G = sum of d loss / d W over `n_samples` training examples (Eq. (7)), for the target weights only.
    Each batch's mean loss is weighted by its share of the examples, so G is the example-averaged
    gradient. A post-accumulate-grad hook adds each weight's gradient into its fp32 sum the moment
    autograd has it and frees it, so no more dense gradients exist at once than autograd needs
    (Sec. 3.6, 'Algorithm'); the rest of the model stays frozen."""
    G, hooks = {}, []
    for name, lin in linears:
        w = lin.weight
        G[name] = torch.zeros(w.shape, dtype=torch.float32, device=w.device)

        def add_and_free(p, acc=G[name]):
            acc.add_(p.grad)
            p.grad = None
        w.requires_grad_(True)
        hooks.append(w.register_post_accumulate_grad_hook(add_and_free))
    batches, seen, nb, t0, report = iter(batches), 0, 0, time.time(), n_samples / 4
    try:
        with torch.enable_grad():
            while seen < n_samples:
                x, y = next(batches)
                x, y = x[:n_samples - seen], y[:n_samples - seen]
                _, loss = model(x, y)
                if not torch.isfinite(loss):
                    raise ValueError(f"lorasb: loss is {loss.item()} on batch {nb} of the gradient estimate")
                (loss * (x.shape[0] / n_samples)).backward()
                seen, nb = seen + x.shape[0], nb + 1
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
    return G


def lorasb_factors(G, r, lr_first):
    """Eq. (6)-(11): the first AdamW step of full FT is Delta W = -eta_1 sign(G) (Adam's first update
    m_hat / sqrt(v_hat) = sign(g)); truncated SVD Delta W ~= U_r S_r V_r^T; B = U_r, A = V_r^T,
    R = S_r. By Eckart-Young, B R A is the best rank-r approximation of Delta W; B, A orthonormal."""
    U, S, Vh = truncated_svd(-lr_first * torch.sign(G), r)
    return U, torch.diag(S), Vh

# -----------------------------------------------------------------------------
# the seam


def prepare(model, args, batches) -> torch.optim.Optimizer:
    """Freeze the model, replace every target Linear by a LowRankLinear initialised as args.method
    says (lora | loraxs | lorasb), return AdamW over exactly the adapters' trainable tensors."""
    method = args.method
    if method not in METHODS:
        raise ValueError(f"lorasb.prepare: method {method!r} is not one of {', '.join(METHODS)}")
    model.requires_grad_(False)
    linears = find_linears(model, args.targets)
    g = torch.Generator().manual_seed(args.seed)
    alpha = getattr(args, "lora_alpha", None)
    if method == "lorasb":
        lr_first, n = args.lr_first, args.lorasb_init_samples
        if not lr_first > 0:
            raise ValueError(f"lorasb: lr_first={lr_first} must be > 0 (the learning rate of the first optimizer step)")
        if not (isinstance(n, int) and n > 0):
            raise ValueError(f"lorasb: lorasb_init_samples={n!r} must be a positive integer")
        t0 = time.time()
        G = first_step_gradients(model, linears, batches, n)
        print(f"lorasb: averaged first full-FT step from {n} examples over {len(G)} matrices in {time.time() - t0:.1f}s")
    clamped, t0 = {}, time.time()
    for name, lin in linears:
        W0 = lin.weight.detach()
        n_out, n_in = W0.shape
        r = min(args.rank, n_out, n_in)
        if r < args.rank:
            clamped.setdefault((n_out, n_in, r), []).append(name.split(".")[-1])
        if method == "lora":
            A, B = lora_factors(W0, r, g)
            R, scale = None, (2 * r if alpha is None else alpha) / r   # alpha defaults to 2r
        elif method == "loraxs":
            B, R, A = loraxs_factors(W0, r, g)
            scale = 1.0
        else:
            B, R, A = lorasb_factors(G.pop(name), r, lr_first)
            scale = 1.0   # Sec. 3.5 / Theorem 5: no scaling factor needed
        dev = W0.device
        R = None if R is None else _fp32(R).to(dev)
        replace_module(model, name, LowRankLinear(lin, _fp32(A).to(dev), _fp32(B).to(dev), R, scale))
    for (n_out, n_in, r), names in clamped.items():
        print(f"{method}: --rank {args.rank} exceeds min(n_out, n_in) of {n_out}x{n_in} matrices "
              f"({', '.join(sorted(set(names)))}, {len(names)} of them); using r={r} there")
    if method != "lora":
        print(f"{method}: truncated SVD of {len(linears)} matrices in {time.time() - t0:.1f}s")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return adamw(params, args)


def merge(model) -> None:
    """Fold scale * B R A into each base weight (computed in fp32, stored in the base dtype) and put a
    plain nn.Linear back, in place: the state dict then has exactly the base model's keys."""
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankLinear)]:
        with torch.no_grad():
            m.weight.copy_((m.weight.float() + m.delta()).to(m.weight.dtype))
        replace_module(model, name, plain_linear(m.weight, m.bias))


def adapter_state(model, optimizer=None) -> dict:
    """The learned update: A, B (LoRA) or A, B, R (LoRA-XS / LoRA-SB) of every adapted layer, keyed as
    in model.state_dict()."""
    return {f"{n}.{k}": t.detach() for n, m in model.named_modules() if isinstance(m, LowRankLinear)
            for k, t in (("A", m.A), ("B", m.B), ("R", m.R)) if t is not None}
