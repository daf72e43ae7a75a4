"""
Learn-forget fronts: which method learns more and which forgets less, judged at equal learning (LIFT
§7.1's figure, on real data). One run is one point: how much it learned, as the fall of the mean loss
per solution token on held-out GSM8K test solutions (never trained on), and how much it forgot, as its
drift KL(base || tuned) on text the base model wrote itself (forgetting.py). A method swept over
learning rates draws a front; two methods are compared where their fronts overlap:
 - "forgets less": lower drift at the same held-out loss (drift interpolated along each front);
 - "learns more": lower held-out loss at the same drift, and at each method's best lr.
A comparison of two points at different learning is not a finding: a method that learned less also
drifted less. Uncertainty: the seeds (each seed's fronts compared, mean ± std of the gap) and the
held-out measure's own, as a paired standard error over the same problems.

The measures here work on saved runs (the folder train.py writes); the sweep that makes them and its
table live in claims.py (`python -m experiments.claims fronts`).
"""
import math
import statistics

import torch

import eval_math
import forgetting

# -----------------------------------------------------------------------------
# learning: the loss per solution token on held-out problems, with its standard error


def held_out_examples(problems, tok, fmt: str = "nanopeft", seq_len: int = 512) -> list[tuple[list, list]]:
    """(input ids, target ids) per problem, -100 on the prompt (as training builds them,
    eval_math.training_ids); a problem with no solution token left within seq_len is dropped."""
    out = []
    for p in problems:
        prompt, target = eval_math.training_ids(tok, p, fmt)
        seq = (prompt + target)[:seq_len + 1]
        x, y = seq[:-1], seq[1:]
        n = min(len(prompt) - 1, len(y))
        y = [-100] * n + y[n:]
        if any(t != -100 for t in y):
            out.append((x, y))
    return out


@torch.no_grad()
def solution_nll(model, examples) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed negative log-likelihood, target token count) per example, float64 [n] each: the pieces
    of the mean loss per solution token and of its standard error. One example at a time, through the
    model's own training loss (no [T, vocab] logits kept)."""
    was_training = model.training
    model.eval()
    device = model.embed_tokens.weight.device
    nll, count = [], []
    for x, y in examples:
        n = sum(t != -100 for t in y)
        _, loss = model(torch.tensor([x], device=device), torch.tensor([y], device=device))
        nll.append(float(loss) * n)
        count.append(n)
    model.train(was_training)
    return torch.tensor(nll, dtype=torch.float64), torch.tensor(count, dtype=torch.float64)


def loss_per_token(nll, count) -> tuple[float, float]:
    """The mean loss per solution token, sum(nll) / sum(count), and its standard error over the
    problems (the ratio estimator's: problems are the sampled units, tokens within one are not
    independent)."""
    n = len(nll)
    L = float(nll.sum() / count.sum())
    e = nll - L * count
    return L, float(e.pow(2).sum().div(n * (n - 1)).sqrt() / count.mean()) if n > 1 else math.nan


def paired_difference(nll_a, nll_b, count) -> tuple[float, float]:
    """(L_a - L_b, its standard error) over the same problems: per-problem pairs, so what both
    runs find hard cancels out (far tighter than the two errors combined)."""
    return loss_per_token(nll_a - nll_b, count)

# -----------------------------------------------------------------------------
# a run as a point; divergence


def measure(model, tok, examples, texts, reference) -> dict:
    """One model's point: its held-out loss per solution token (and the per-problem sums, for
    paired differences) and its drift from the base (forgetting.drift)."""
    nll, count = solution_nll(model, examples)
    loss, se = loss_per_token(nll, count)
    return {"held_out": loss, "held_out_se": se, "nll": nll.tolist(), "count": count.tolist(),
            **forgetting.drift(model, tok, texts, reference)}


def diverged(point: dict, base: dict, final_train_loss: float, agreement_floor: float = 0.5) -> str | None:
    """Why a run is not a result, or None: a NaN, a held-out loss that ends above the base's (it
    learned nothing and lost some), a training loss that is not finite, or its agreement with the
    base's own greedy tokens collapsed below `agreement_floor`."""
    if not math.isfinite(final_train_loss) or not math.isfinite(point["held_out"]):
        return "not finite"
    if point["held_out"] > base["held_out"]:
        return f"held-out loss {point['held_out']:.4f} above the base's {base['held_out']:.4f}"
    if point["agreement"] < agreement_floor:
        return f"agreement with the base {100 * point['agreement']:.1f}% < {100 * agreement_floor:.0f}%"
    return None

# -----------------------------------------------------------------------------
# fronts and verdicts at equal learning


def interpolate(front: list[tuple[float, float]], x: float) -> float | None:
    """y at x along a front of (x, y) points (sorted by x, linear between neighbours); None outside
    the front's x range: a front is never extrapolated."""
    pts = sorted(front)
    if not pts or not pts[0][0] <= x <= pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[0][1]


def gap_at_equal(front_a, front_b, n_grid: int = 9) -> tuple[float, float, float] | None:
    """The mean of y_a(x) - y_b(x) over x where both fronts reach (their x ranges' overlap, n_grid
    points), and that overlap (lo, hi); None when the fronts do not overlap in x."""
    lo = max(min(x for x, _ in front_a), min(x for x, _ in front_b))
    hi = min(max(x for x, _ in front_a), max(x for x, _ in front_b))
    if lo > hi:
        return None
    xs = [lo + (hi - lo) * i / (n_grid - 1) for i in range(n_grid)] if hi > lo else [lo]
    return statistics.fmean(interpolate(front_a, x) - interpolate(front_b, x) for x in xs), lo, hi


def verdict_at_equal(fronts_a: list, fronts_b: list, what: str) -> dict:
    """Compare two methods' fronts seed by seed (fronts_a[s], fronts_b[s]: lists of (x, y) points of
    seed s, diverged runs left out) at equal x. The gap y_a - y_b, mean ± std over the seeds;
    "a lower" when every seed's gap is below 0 and the mean is beyond 2 standard errors of it,
    "b lower" the same way round, else "cannot be told apart here". `what` names y and x."""
    gaps = [g for g in (gap_at_equal(a, b) for a, b in zip(fronts_a, fronts_b) if len(a) > 1 and len(b) > 1) if g]
    if not gaps:
        return {"what": what, "verdict": "not comparable: the fronts do not overlap (or too few runs)", "gaps": []}
    d = [g[0] for g in gaps]
    mean = statistics.fmean(d)
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.inf
    if all(x < 0 for x in d) and abs(mean) > 2 * se:
        word = "a lower"
    elif all(x > 0 for x in d) and abs(mean) > 2 * se:
        word = "b lower"
    else:
        word = "cannot be told apart here"
    return {"what": what, "verdict": word, "gap": mean, "se": se, "gaps": d,
            "overlap": [min(g[1] for g in gaps), max(g[2] for g in gaps)]}


def fronts_by_seed(points: list[dict], method: str, seeds) -> tuple[list, list]:
    """The method's (learning, drift) and (drift, learning) fronts per seed from its non-diverged
    points: learning = the base's held-out loss minus the run's (higher: learned more)."""
    mine = [p for p in points if p["method"] == method and not p.get("diverged")]
    ld = [[(p["learning"], p["kl"]) for p in mine if p["seed"] == s] for s in seeds]
    return ld, [[(y, x) for x, y in f] for f in ld]


def verdicts(points: list[dict], a: str, b: str, seeds) -> dict:
    """'a forgets less than b' (lower drift at the same learning) and 'a learns more than b' (more
    learning at the same drift), each with its uncertainty; and learning at each one's best lr."""
    la, da = fronts_by_seed(points, a, seeds)
    lb, db = fronts_by_seed(points, b, seeds)
    forget = verdict_at_equal(la, lb, "drift KL at equal held-out loss")
    forget["claim"] = {"a lower": "holds", "b lower": "does not hold"}.get(forget["verdict"], forget["verdict"])
    learn = verdict_at_equal(da, db, "learning at equal drift")
    learn["claim"] = {"b lower": "holds", "a lower": "does not hold"}.get(learn["verdict"], learn["verdict"])
    return {"forgets_less": forget, "learns_more": learn, "best": {m: best_run(points, m) for m in (a, b)}}


def best_run(points: list[dict], method: str) -> dict | None:
    """The method's best lr (the most learning, mean over seeds, of its non-diverged runs)."""
    by_lr = {}
    for p in points:
        if p["method"] == method and not p.get("diverged"):
            by_lr.setdefault(p["lr"], []).append(p["learning"])
    if not by_lr:
        return None
    lr = max(by_lr, key=lambda k: statistics.fmean(by_lr[k]))
    return {"lr": lr, "learning": statistics.fmean(by_lr[lr]), "seeds": len(by_lr[lr])}
