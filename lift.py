"""
LIFT: Low-rank Informed sparse Fine-Tuning. Liu et al., "LIFT the Veil for the Truth: Principal Weights
Emerge after Rank Reduction for Reasoning-Focused Supervised Fine-Tuning", ICML 2025 (arXiv 2506.00772).

For each target matrix W (n_out x n_in) LIFT trains only k of its entries, the *Principal Weights*:
the k entries of largest magnitude in W', the best rank-r approximation of W (Eq. 1-2). By default
k = r·(n_in + n_out), the parameter count of a rank-r LoRA on that matrix. Training is Adam on those
entries alone (Algorithm 1, Appendix A): per matrix the optimizer keeps the selected flat indices, an
fp32 master copy of their values and the moments m, v, all vectors of length k, nothing the size of
the matrix. Before every `interval`-th optimizer step (Algorithm 1, line 5: t mod T = 0) the mask is
recomputed from the current weights; moments of entries kept in both masks carry over, new entries
start at zero, the step counter t of the bias correction runs on.

LIFT changes no module; its state lives in the optimizer `prepare` returns:
- param_groups hold the compact fp32 value vectors (numel k each, named after their weights), so the
  trainable count is sum(k) and train.py's gradient clipping sees exactly the selected gradients;
- a post-accumulate-grad hook on each target weight gathers the selected entries of the dense
  gradient into that compact .grad (Eq. 3) and frees the dense gradient at once, so no matrix-sized
  gradient outlives its own backward;
- state_dict() carries what a freshly prepared model needs to resume bit-identically: masks, master
  values, moments, t, and the values of every entry ever touched (O(touched), not O(matrix)).
Weight decay is decoupled AdamW decay (Loshchilov & Hutter) applied to the selected entries only:
an entry outside the current mask is frozen, decay included.

Selection ablations (§6.1, Table 17, Appendix G.7): select = principal (LIFT) | magnitude |W| |
gradient | random, and block = 4 for LIFT_Structured, which selects whole 4x4 blocks (block score =
sum of the entries' scores). `gradient` scores |sum of the dense gradients over grad-accum training
batches| at the current weights, at the start and at every refresh. The paper does not say which
gradient it used; the authors' code starts from a random mask and re-scores with the last step's
Adam direction masked to the current selection (zero elsewhere), which is random selection in
effect, so this baseline is ours, not theirs.
"""
import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from distributed import all_reduce_sum_, broadcast_, gathered, rank_world
from targets import LINEAR_NAMES, find_linears, fold, wide

SELECTS = ("principal", "magnitude", "gradient", "random")
SVDS = ("exact", "lowrank")
PAPER = "LIFT (Liu et al., ICML 2025)"


@dataclass
class Settings:
    """LIFT's settings: the paper's math setup (LLaMA on MATH-10K), each default with its source.
    `tiny` is the value the built-in tiny model uses instead."""
    rank: int = field(default=128, metadata={"source": f"{PAPER}, Table 2: the best rank for all four models"})
    targets: tuple[str, ...] = field(default=LINEAR_NAMES, metadata={
        "source": f"{PAPER}, §3.2: every weight matrix of attention and MLP"})
    lr: float = field(default=2e-4, metadata={"source": f"{PAPER}, App. D.1, Table 6 (LLaMA-3.2-1B, LLaMA-3-8B)",
                                              "tiny": 1e-3})
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"source": "the authors' code (finetune_sft.py)"})
    eps: float = field(default=1e-6, metadata={"source": "the authors' code (finetune_sft.py)"})
    weight_decay: float = field(default=0.0, metadata={"source": "the authors' scripts (--weight_decay 0.)"})
    max_grad_norm: float = field(default=0.0, metadata={"source": "the authors' code: no gradient clipping"})
    schedule: str = field(default="linear", metadata={"source": f"{PAPER}, Table 6"})
    warmup_ratio: float = field(default=0.03, metadata={"source": f"{PAPER}, Table 6"})
    epochs: float = field(default=3.0, metadata={"source": f"{PAPER}, Table 6"})
    batch_size: int = field(default=16, metadata={"source": f"{PAPER}, Table 6 (1 x 16 accumulation)"})
    interval: int = field(default=200, metadata={
        "help": "optimizer steps between mask refreshes (Algorithm 1's update_interval)",
        "source": "the authors' code default; App. B.1 sweeps 50-1000, a middle value is best"})
    lra_rank: int | None = field(default=None, metadata={
        "help": "rank of the low-rank approximation W' (default: the rank)",
        "source": f"{PAPER}, §3: r; the authors' configs use 32-128 by model size"})
    select: str = field(default="principal", metadata={
        "help": "which entries train: principal (LIFT), magnitude, gradient, random (the ablation)",
        "choices": SELECTS, "source": f"{PAPER}, Eq. (1)-(2); the others §6.1, Table 17"})
    block: int = field(default=0, metadata={
        "help": "select b x b blocks (4 = LIFT_Structured); 0 = single entries", "source": f"{PAPER}, App. G.7"})
    svd: str = field(default="exact", metadata={
        "help": "SVD of the approximation: exact, or lowrank (randomized, for large matrices)", "choices": SVDS,
        "source": "the exact truncated SVD of Eq. (1)"})

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"--rank must be a positive integer, got {self.rank}")
        if self.select not in SELECTS:
            raise ValueError(f"--lift-select {self.select!r} is not one of {', '.join(SELECTS)}")
        if self.svd not in SVDS:
            raise ValueError(f"--lift-svd {self.svd!r} is not one of {', '.join(SVDS)}")
        if not isinstance(self.block, int) or self.block < 0:
            raise ValueError(f"--lift-block {self.block!r} must be 0 (off) or a block size >= 1 (4 = LIFT_Structured)")
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"--lift-interval {self.interval!r} must be a positive number of optimizer steps")
        if self.lra_rank is not None and (not isinstance(self.lra_rank, int) or self.lra_rank < 1):
            raise ValueError(f"--lift-lra-rank {self.lra_rank!r} must be a positive int (or unset for --rank)")

# -----------------------------------------------------------------------------
# selecting the Principal Weights


def low_rank_approx(weight, rank: int, svd: str = "exact", seed: int = 0) -> torch.Tensor:
    """W' = argmin_{rank(W') <= r} ||W - W'||_F (Eq. 1): the truncated SVD of W in fp32
    (Eckart-Young). For rank >= min(n_out, n_in) that is W itself. svd='lowrank' uses the randomized
    SVD of torch.svd_lowrank (seeded by `seed`, so refreshes are reproducible) for large matrices."""
    W = weight.detach().float()
    if rank >= min(W.shape):
        return W
    if svd == "exact":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    elif svd == "lowrank":
        with torch.random.fork_rng(devices=[] if W.device.type == "cpu" else [W.device], device_type=W.device.type):
            torch.manual_seed(seed)
            # oversampling by r and 6 power iterations: >= 97% of the exact mask on 1024x1024 and
            # 512x1536 matrices at r = 128 (gaussian and power-law spectra)
            U, S, V = torch.svd_lowrank(W, q=min(2 * rank, min(W.shape)), niter=6)
        U, S, Vh = U[:, :rank], S[:rank], V[:, :rank].T
    else:
        raise ValueError(f"svd={svd!r} is not one of {', '.join(SVDS)}")
    return (U * S) @ Vh


def top_k_mask(scores: torch.Tensor, k: int, block: int = 0) -> torch.Tensor:
    """Boolean mask of the k largest scores (Eq. 2). With block=b the mask is made of whole b x b
    blocks: the k / b² blocks whose scores sum largest (LIFT_Structured, Appendix G.7)."""
    if block:
        n_out, n_in = scores.shape
        sums = scores.reshape(n_out // block, block, n_in // block, block).sum((1, 3))
        blocks = top_k_mask(sums, k // (block * block))
        return blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[scores.flatten().topk(k, largest=True, sorted=False).indices] = True  # largest, as the paper means
    return mask.view(scores.shape)


def principal_mask(weight, rank: int, k: int, svd: str = "exact", seed: int = 0, block: int = 0) -> torch.Tensor:
    """The LIFT mask: the k entries of largest |W'|, W' the best rank-`rank` approximation of W."""
    return top_k_mask(low_rank_approx(weight, rank, svd, seed).abs(), k, block)  # Eq. (1), (2)


def selection_scores(weight, select: str, rank: int, svd: str = "exact", seed: int = 0, grad=None) -> torch.Tensor:
    """Per-entry score whose top k are trained: |W'| (LIFT), |W|, |gradient| or uniform noise."""
    if select == "principal":
        return low_rank_approx(weight, rank, svd, seed).abs()
    if select == "magnitude":
        return weight.detach().float().abs()
    if select == "gradient":
        return grad.float().abs()
    if select == "random":
        g = torch.Generator(device=weight.device).manual_seed(seed)
        return torch.rand(weight.shape, generator=g, device=weight.device)
    raise ValueError(f"select={select!r} is not one of {', '.join(SELECTS)}")


def budget(n_out: int, n_in: int, rank: int, block: int = 0) -> int:
    """k = min(r·(n_in + n_out), n_in·n_out), the rank-r LoRA count; whole b x b blocks if block=b."""
    k = min(rank * (n_in + n_out), n_in * n_out)
    if block:
        k = max(block * block, k // (block * block) * block * block)
    return k

# -----------------------------------------------------------------------------
# the optimizer: Adam with LIFT (Algorithm 1)


class LIFTAdamW(torch.optim.Optimizer):
    """AdamW on the selected entries of each target weight only (Algorithm 1), with mask refresh.

    `named_weights`: [(name, weight)], each weight contiguous with requires_grad=True; `ks`: entries
    per weight. `model` and `probe` (a list of (x, y) micro-batches) are needed by select='gradient'."""

    def __init__(self, named_weights, ks, lr, betas, eps, weight_decay, *, select, lra_rank, block, svd,
                 interval, seed=0, total_steps=None, model=None, probe=()):  # defaults: Settings, once
        self.weights = [w for _, w in named_weights]
        self.ks = list(ks)
        self.select, self.lra_rank, self.block, self.svd = select, lra_rank, block, svd
        self.interval, self.seed, self.total_steps = interval, seed, total_steps
        self.model, self.probe = model, list(probe)
        self.t = 0          # optimizer steps taken (Algorithm 1's t; never reset)
        self.n_refresh = 0  # masks recomputed so far
        self._scoring = False
        self.sharded = False  # --fsdp (sharded_weights): each weight a DTensor of this process's rows
        self.index = self._select_all()  # Algorithm 1, line 2: M <- calc_mask(theta_0), as sorted flat indices
        broadcast_(self.index)  # data parallel: every process trains process 0's entries
        self.values = [w.detach().view(-1)[i].float() for w, i in zip(self.weights, self.index)]  # fp32 master copies
        super().__init__([{"params": self.values, "param_names": [n for n, _ in named_weights]}],
                         dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        for v in self.values:  # line 3: moments of the selected entries, as vectors
            self.state[v] = {"exp_avg": torch.zeros_like(v), "exp_avg_sq": torch.zeros_like(v)}
        # every entry ever selected, with its base value W0 (for resume and the sparse adapter)
        self.touched = list(self.index)  # shares the index tensors until a refresh replaces them
        self.touched_w0 = [w.detach().view(-1)[i].clone() for w, i in zip(self.weights, self.index)]
        # fp32 values of every touched entry as last trained (those in the current mask: `values`), so an
        # entry that leaves the mask keeps its exact value even where the weight is bf16
        self.touched_fp32 = [v.detach().clone() for v in self.values]
        for j, w in enumerate(self.weights):
            w._lift_hook = w.register_post_accumulate_grad_hook(self._gather(j))

    def _gather(self, j):
        """Eq. (3): keep vec(g[M = 1]) (accumulated over micro-batches), free the dense gradient."""
        def hook(w):
            if self._scoring:  # gradient selection wants the dense gradient itself
                return
            g = w.grad.reshape(-1).index_select(0, self.index[j]).float()
            v = self.values[j]
            if v.grad is None:
                v.grad = g
            else:
                v.grad.add_(g)
            w.grad = None
        return hook

    # --fsdp: FSDP2 holds each target weight as this process's rows (a DTensor) and hands back its
    # gradient reduce-scattered, after backward, where no hook sees it. The k entries, their fp32 master
    # values and moments stay whole in every process (O(k), as under plain data parallel); the mask is
    # chosen on the whole matrix, gathered (Algorithm 1, line 5), and each process writes its own rows.

    def sharded_weights(self, params: dict):
        """Point at the sharded weights fully_shard put in place of the target weights (by name)."""
        for j, name in enumerate(self.param_groups[0]["param_names"]):
            self.weights[j]._lift_hook.remove()
            self.weights[j] = params[name]
        self.sharded = True

    @staticmethod
    def _rows(t):
        """(this process's rows of a sharded matrix t, flat; the flat index in the whole matrix where
        they start): FSDP2 cuts dim 0 as torch.chunk does, ceil(n_out / N) rows per process."""
        rank, world = rank_world()
        n_out, n_in = t.shape
        return t.to_local().view(-1), min(rank * -(-n_out // world), n_out) * n_in

    @torch.no_grad()
    def collect_gradients(self):
        """--fsdp, after the step's backward passes: Eq. (3) on each process's rows of each dense
        gradient (already summed over processes by the reduce-scatter), the pieces summed into the
        whole compact gradients (one message), the dense gradient shards freed."""
        if not self.sharded:
            return  # (the hooks gathered them during backward)
        grads = []
        for j, w in enumerate(self.weights):
            g = torch.zeros_like(self.values[j])
            if w.grad is not None:
                local, lo = self._rows(w.grad)
                mine = (self.index[j] >= lo) & (self.index[j] < lo + local.numel())
                g[mine] = local[self.index[j][mine] - lo].float()
                w.grad = None
            grads.append(g)
        all_reduce_sum_(grads)
        for v, g in zip(self.values, grads):
            v.grad = g if v.grad is None else v.grad.add_(g)

    def _whole(self, j) -> torch.Tensor:
        """Matrix j whole (--fsdp: gathered from every process, a collective)."""
        return gathered(self.weights[j].detach())

    def _write(self, j, idx, values):
        """W.view(-1)[idx] = values in W's dtype (--fsdp: the entries in this process's rows)."""
        w = self.weights[j]
        if not self.sharded:
            w.detach().view(-1)[idx] = values.to(w.dtype)
            return
        local, lo = self._rows(w.detach())
        mine = (idx >= lo) & (idx < lo + local.numel())
        local[idx[mine] - lo] = values[mine].to(local.dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.t += 1
        group = self.param_groups[0]
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        bias1, bias2 = 1 - beta1 ** self.t, 1 - beta2 ** self.t
        live = [j for j, v in enumerate(group["params"]) if v.grad is not None]
        if live:  # every matrix's compact vectors at once (_foreach_: a few kernels, not ~8 per matrix)
            v = [group["params"][j] for j in live]
            g, m, s = [x.grad for x in v], [self.state[x]["exp_avg"] for x in v], [self.state[x]["exp_avg_sq"] for x in v]
            torch._foreach_mul_(v, 1 - lr * wd)                          # decoupled decay, selected entries only
            torch._foreach_mul_(m, beta1)                                # Algorithm 1, line 15
            torch._foreach_add_(m, g, alpha=1 - beta1)
            torch._foreach_mul_(s, beta2)                                # line 16
            torch._foreach_addcmul_(s, g, g, value=1 - beta2)
            denom = torch._foreach_sqrt(s)                               # line 17
            torch._foreach_div_(denom, math.sqrt(bias2))
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(v, m, denom, value=-lr / bias1)      # line 18
        for j in live:
            self._write(j, self.index[j], group["params"][j])  # write back in the weight's dtype
        # Algorithm 1, line 5: at the start of step t with t mod T = 0, the mask is recomputed from the
        # current weights. The gradient of step t is gathered under the mask during its backward, so
        # the refresh happens here, after step t - 1 (the authors' code does the same).
        if self._refresh_due(self.t + 1, self.total_steps):
            self.refresh()
        return loss

    def _refresh_due(self, nxt: int, total_steps: int | None) -> bool:
        """Algorithm 1, line 5: the mask is recomputed before step nxt when nxt mod T = 0, unless nxt is
        past the run's last step (no refresh after the last step)."""
        return nxt % self.interval == 0 and (total_steps is None or nxt <= total_steps)

    @torch.no_grad()
    def refresh(self):
        """Algorithm 1, lines 5-11: recompute the mask from the current weights (used from the next
        step on); moments and fp32 master values of entries in both masks carry over, new entries
        start with zero moments and their current value."""
        self.n_refresh += 1
        grads = self._probe_gradients() if self.select == "gradient" else [None] * len(self.weights)
        for j in range(len(self.weights)):  # one matrix at a time: transients stay one matrix large
            w = self._whole(j).view(-1)
            new, grads[j] = self._select(j, grads[j], w.view(self.weights[j].shape)), None
            broadcast_([new])
            old, v = self.index[j], self.values[j]
            self._record_fp32(j)  # the leaving entries' exact values, before the mask moves on
            fresh = new[~torch.isin(new, self.touched[j])]  # never touched before: their value is W0
            if fresh.numel():
                self.touched[j], order = torch.cat([self.touched[j], fresh]).sort()
                self.touched_w0[j] = torch.cat([self.touched_w0[j], w[fresh]])[order]
                self.touched_fp32[j] = torch.cat([self.touched_fp32[j], w[fresh].float()])[order]
            pos = torch.searchsorted(old, new).clamp_(max=old.numel() - 1)
            kept = old[pos] == new
            for key in ("exp_avg", "exp_avg_sq"):
                mom = self.state[v][key]
                mom.copy_(torch.where(kept, mom[pos], 0.0))
            # new entries start from their exact last value (fp32; W0 where never trained)
            v.copy_(torch.where(kept, v[pos], self.touched_fp32[j][torch.searchsorted(self.touched[j], new)]))
            v.grad = None  # a gradient gathered under the old mask belongs to other entries
            self.index[j] = new

    def _record_fp32(self, j):
        """Copy matrix j's current fp32 values into touched_fp32 (at their positions in `touched`)."""
        self.touched_fp32[j][torch.searchsorted(self.touched[j], self.index[j])] = self.values[j].detach()

    def exact_values(self, j):
        """fp32 values of matrix j's touched entries (sorted as `touched`): the trained weights, unrounded."""
        self._record_fp32(j)
        return self.touched_fp32[j]

    def _select(self, j, grad=None, w=None):
        """Sorted flat indices of the k entries matrix j trains next (Eq. 1-2 or an ablation), from
        matrix j as it is now (`w`: it whole, where the caller has gathered it)."""
        w, k = self.weights[j] if w is None else w, self.ks[j]
        if k == w.numel():  # budget clamped to the whole matrix: nothing to choose
            idx = torch.arange(w.numel(), device=w.device)
        else:
            seed = (self.seed * 1_000_003 + self.n_refresh) * 1009 + j  # lowrank / random: reproducible
            scores = selection_scores(w, self.select, self.lra_rank, self.svd, seed, grad)
            idx = top_k_mask(scores, k, self.block).view(-1).nonzero().squeeze(1)
        return idx.int() if w.numel() < 2**31 else idx  # int32 where it fits: half the memory

    def _select_all(self):
        grads = self._probe_gradients() if self.select == "gradient" else [None] * len(self.weights)
        out = []
        for j in range(len(self.weights)):
            out.append(self._select(j, grads[j]))
            grads[j] = None
        return out

    def _probe_gradients(self):
        """Dense gradients of the target weights summed over the probe batches, at the current
        weights (transiently as large as a full fine-tuning gradient; only for select='gradient')."""
        self._scoring = True
        try:
            with torch.enable_grad():
                for x, y in self.probe:
                    self.model(x, y)[1].backward()
            grads = [None if w.grad is None else gathered(w.grad) for w in self.weights]
        finally:
            self._scoring = False
            for w in self.weights:
                w.grad = None
        return grads

    def state_dict(self):
        sd = super().state_dict()  # moments per compact vector, hyperparameters
        sd["lift"] = {
            "t": self.t, "n_refresh": self.n_refresh, "total_steps": self.total_steps,
            "index": [i.clone() for i in self.index],
            "master": [v.detach().clone() for v in self.values],
            "touched": [i.clone() for i in self.touched],
            "touched_w0": [b.clone() for b in self.touched_w0],
            "touched_values": [self._whole(j).view(-1)[i].clone() for j, i in enumerate(self.touched)],
            "touched_fp32": [self.exact_values(j).clone() for j in range(len(self.weights))],
        }
        return sd

    @torch.no_grad()
    def load_state_dict(self, state_dict):
        """Restore masks, moments, master values, t, and the weights' touched entries. The weights
        must hold the same base weights the state was trained from (checked on the touched entries)."""
        state_dict = dict(state_dict)
        lift = state_dict.pop("lift", None)
        if lift is None:
            raise ValueError("optimizer state has no 'lift' entry; it was not saved by a LIFT optimizer")
        if len(lift["index"]) != len(self.weights) or any(i.numel() != k for i, k in zip(lift["index"], self.ks)):
            raise ValueError("LIFT optimizer state has other targets or budgets k than this optimizer "
                             f"({[i.numel() for i in lift['index']]} vs {self.ks})")
        for j, w in enumerate(self.weights):  # check everything before changing anything
            touched = lift["touched"][j].to(w.device)
            if not torch.equal(self._base_values(j, touched), lift["touched_w0"][j].to(w.device, w.dtype)):
                raise ValueError(f"weight {self.param_groups[0]['param_names'][j]} is not the base weight "
                                 "this LIFT state was trained from")
        super().load_state_dict(state_dict)
        self.t, self.n_refresh = lift["t"], lift["n_refresh"]
        for j, w in enumerate(self.weights):
            self._write(j, self.touched[j], self.touched_w0[j])  # back to W0 wherever this optimizer wrote
            self.touched[j], self.touched_w0[j] = lift["touched"][j].to(w.device), lift["touched_w0"][j].to(w.device, w.dtype)
            self._write(j, self.touched[j], lift["touched_values"][j].to(w.device))
            # (a checkpoint from before touched_fp32 was kept: the weights' values are the best there is)
            self.touched_fp32[j] = lift.get("touched_fp32", lift["touched_values"])[j].to(w.device, torch.float32).clone()
            self.index[j] = lift["index"][j].to(w.device)
            self.values[j].copy_(lift["master"][j])
            self.values[j].grad = None
        # a run resumed to more steps than its checkpoint's run had: the refresh that run skipped after
        # its last step (none after the last step) is due now, as in a run that was this long throughout
        then, nxt = lift.get("total_steps"), self.t + 1
        if then is not None and not self._refresh_due(nxt, then) and self._refresh_due(nxt, self.total_steps):
            self.refresh()

    def _base_values(self, j, idx):
        """W0 of matrix j at the sorted flat indices idx: the weight itself where this optimizer never
        wrote, the recorded base value where it did."""
        out = self._whole(j).view(-1)[idx].clone()
        mine = self.touched[j]
        pos = torch.searchsorted(mine, idx).clamp_(max=mine.numel() - 1)
        hit = mine[pos] == idx
        out[hit] = self.touched_w0[j][pos[hit]]
        return out

# -----------------------------------------------------------------------------
# the method seam


def prepare(model, s: Settings, batches, *, seed=0, total_steps=None, grad_accum=1, n_train=None,
            lr_first=None) -> LIFTAdamW:
    """Freeze the model, select k Principal Weights in each target Linear, return the LIFT optimizer.
    `total_steps`: no refresh after the last step; `grad_accum`: batches the gradient ablation scores."""
    lra_rank = s.rank if s.lra_rank is None else s.lra_rank
    model.requires_grad_(False)
    named, ks, clamped, full_rank = [], [], {}, set()
    for name, lin in find_linears(model, s.targets):
        w = lin.weight
        n_out, n_in = w.shape
        if s.block and (n_out % s.block or n_in % s.block):
            raise ValueError(f"--lift-block {s.block} does not divide {name}.weight of shape {n_out}x{n_in}")
        asked, k = s.rank * (n_in + n_out), budget(n_out, n_in, s.rank, s.block)
        if k != asked:
            clamped[(n_out, n_in)] = (asked, k)
        if s.select == "principal" and lra_rank >= min(n_out, n_in):
            full_rank.add((n_out, n_in))
        w.requires_grad_(True)  # so autograd reaches it; the hook keeps only the selected entries
        named.append((f"{name}.weight", w))
        ks.append(k)
    for (n_out, n_in), (asked, k) in clamped.items():
        why = "the matrix has only n_in·n_out entries" if asked > n_in * n_out else f"whole {s.block}x{s.block} blocks"
        print(f"lift: rank {s.rank} asks k = r·(n_in+n_out) = {asked} entries of {n_out}x{n_in} weights; "
              f"using k = {k} ({why})")
    for n_out, n_in in sorted(full_rank):
        print(f"lift: LRA rank {lra_rank} >= min({n_out}, {n_in}): W' = W for {n_out}x{n_in} weights "
              "(selection is plain weight magnitude there)")
    probe = list(itertools.islice(batches, max(1, grad_accum))) if s.select == "gradient" else []
    opt = LIFTAdamW(named, ks, s.lr, s.betas, s.eps, s.weight_decay, select=s.select, lra_rank=lra_rank,
                    block=s.block, svd=s.svd, interval=s.interval, seed=seed, total_steps=total_steps, model=model,
                    probe=probe)
    total = sum(w.numel() for _, w in named)
    print(f"lift: training {sum(ks):,} of {total:,} entries ({100 * sum(ks) / total:.2f}%) in {len(ks)} matrices; "
          f"select={s.select}{f' (LRA rank {lra_rank}, svd {s.svd})' if s.select == 'principal' else ''}"
          f"{f' in {s.block}x{s.block} blocks' if s.block else ''}, mask refresh every {s.interval} steps")
    return opt


def merge(model, optimizer: LIFTAdamW, s: Settings) -> None:
    """Set every trained entry to its value (merge_adapter, rounded into the weight's dtype: what the
    steps wrote there already), remove the gradient hooks and freeze the weights again."""
    fold(model, adapter_state(model, optimizer), merge_adapter, s)
    for m in model.modules():
        if isinstance(m, nn.Linear) and hasattr(m.weight, "_lift_hook"):
            m.weight._lift_hook.remove()
            del m.weight._lift_hook
            m.weight.grad = None
            m.weight.requires_grad_(False)


def adapter_state(model, optimizer: LIFTAdamW) -> dict:
    """The sparse update over every entry ever trained: per target `<name>.lift_index` (flat indices into
    the n_out x n_in weight; int32 unless the matrix has 2^31 entries or more) and `<name>.lift_value`
    (their trained values in fp32, from the fp32 master copies: exact on a bf16 base too). Values, not
    differences W - W0: in floating point W0 + (v - W0) is not always v, and the saved model must be
    the trained one bit for bit. Apply with W.view(-1)[index] = value (merge_adapter)."""
    out = {}
    for j, (name, idx) in enumerate(zip(optimizer.param_groups[0]["param_names"], optimizer.touched)):
        out[f"{name}.lift_index"] = idx.clone()
        out[f"{name}.lift_value"] = optimizer.exact_values(j).clone()
    return out


def merge_adapter(base: dict, adapter: dict, s: Settings) -> dict:
    """{weight name: W0 with its trained entries set} in fp32 (targets.wide), for every matrix the adapter changes;
    `base` holds the base weights as stored (any dtype), `adapter` what adapter_state returned."""
    out = {}
    for key in adapter:
        if key.endswith(".lift_index"):
            name = key.removesuffix(".lift_index")
            W = wide(base[name]).clone()
            W.view(-1)[adapter[key].long()] = adapter[f"{name}.lift_value"].to(W.device)
            out[name] = W
    return out
