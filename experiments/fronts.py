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

The measures work on saved runs (the folders train.py writes): the sweep trains without evaluating and
measures each saved model once (cached beside it), so a sweep point costs its training and ~1 minute.
"""
import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

import forgetting
import math_data
import train
from weights import write_atomic

# -----------------------------------------------------------------------------
# learning: the loss per solution token on held-out problems, with its standard error


def held_out_examples(problems, tok, fmt: str = "nanopeft", seq_len: int = 512) -> list[tuple[list, list]]:
    """(input ids, target ids) per problem, -100 on the prompt, as training builds them (train.tokenize);
    a problem with no solution token left within seq_len is dropped."""
    examples, _ = train.tokenize(problems, tok, seq_len, False, fmt)
    return [(x, y) for x, y in examples if any(t != -100 for t in y)]


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

# -----------------------------------------------------------------------------
# the sweep: every method at several learning rates, the same steps, batch, data and seeds


def front_configs(batch_size: int) -> list[tuple[str, list[str], float]]:
    """(name, train.py flags, centre lr) per method, at table.py's matched budgets. The centre is the
    paper's lr (the method's Settings), except LoRA-XS: its authors' 4e-3 is set for batch 128 and
    diverges at a laptop's batch, so it is scaled by sqrt(batch / 128) (the square-root rule for Adam)
    and the sweep around it finds the rest."""
    from experiments.table import TABLE
    from methods import METHODS
    out = []
    for name, flags in TABLE:
        cls = METHODS[flags[flags.index("--method") + 1]][1]
        lr = cls().lr * (math.sqrt(batch_size / 128) if name.startswith("loraxs") else 1.0)
        out.append((name, flags, lr))
    return out


def lr_grid(centre: float, factor: float = 3.0) -> list[float]:
    """The centre and one step of `factor` either side: three points that bracket it."""
    return [float(f"{centre / factor:.3g}"), float(f"{centre:.3g}"), float(f"{centre * factor:.3g}")]


def extend(lrs: list[float], learning: dict, factor: float = 3.0) -> float | None:
    """One more lr beyond the grid's edge when the most learning (mean over seeds, non-diverged
    runs) sits at that edge, so the front brackets where the method learns most; None when it is
    bracketed (or the edge run diverged: going further would too)."""
    ok = {lr: v for lr, v in learning.items() if v is not None}
    if not ok:
        return None
    best = max(ok, key=ok.get)
    if best == max(lrs):
        return float(f"{best * factor:.3g}")
    if best == min(lrs):
        return float(f"{best / factor:.3g}")
    return None


PAIRS = (  # (a, b, the paper's words): each claim is "a forgets less / learns more than b"
    ("lift r8", "lora r8", "LIFT §7.1: LIFT forgets less than LoRA at the same budget, and learns as much"),
    ("lift r8", "full", "LIFT §7.1: LIFT forgets less than full fine-tuning"),
    ("lorasb r108", "loraxs r108", "LoRA-SB: its init learns more than LoRA-XS's"),
    ("hyper", "lora r8", "HyperAdapt: about LoRA"),
    ("rocoft r16", "lora r8", "RoCoFT Table 3: about LoRA"),
)


def _cached(path, key: dict, compute):
    """compute() once per key: a JSON file beside the run, recomputed when the key changes."""
    if path.exists():
        d = json.loads(path.read_text())
        if d.get("key") == key:
            return d["value"]
    value = compute()
    write_atomic(path, json.dumps({"key": key, "value": value}).encode())
    return value


def claim_fronts(args) -> dict:
    """Every method of the matched-budget table at three or more lrs around its paper's (extended
    until the most learning is bracketed), `args.steps` steps of batch `args.batch_size` on
    `args.data` in the LIFT authors' format, seeds 0..args.seeds-1; each run a point (held-out loss
    on `args.held_out`'s first `args.held_out_limit` problems, drift on the base's own text); the
    fronts, the verdicts at equal learning, out/claims/fronts.json and figures/fronts.png."""
    from weights import load
    from experiments.runs import run_train, write_json
    interval = max(1, args.steps // 3)  # LIFT's mask refreshes 3 times (the paper's interval: 200 steps)
    model, tok = load(args.base)
    problems = math_data.load_problems(args.held_out, "test", limit=args.held_out_limit)
    examples = held_out_examples(problems, tok, "lift-authors", args.seq_len)
    if len(examples) < 200:
        print(f"note: {len(examples)} held-out problems (fewer than 200): the standard errors are wide")
    texts, reference = forgetting.forgetting_set(model, tok, argparse.Namespace(
        forget_prompts=args.forget_prompts, eval_batch_size=32), Path(args.out) / "fronts-base")
    key = {"held_out": args.held_out, "limit": args.held_out_limit, "seq_len": args.seq_len,
           "forget_prompts": args.forget_prompts, "base": args.base}
    base = _cached(Path(args.out) / "fronts-base" / "point.json", key, lambda: measure(model, tok, examples, texts,
                                                                                          reference))
    sweep = argparse.Namespace(**{**vars(args), "eval_data": "none", "eval_every": 0, "forget_prompts": 0,
                                  "eval_limit": None, "max_new_tokens": None})
    seeds = range(args.seeds) if args.only_seed is None else [args.only_seed]
    points, t0 = [], time.time()

    def point(name, flags, lr, seed):
        extra = ["--lift-interval", str(interval)] if "lift" in flags else []
        run = run_train(sweep, f"{name}-lr{lr:g}", [*flags, *extra, "--lr", f"{lr:g}", "--train-format", "lift-authors",
                                                   "--seq-len", str(args.seq_len)], seed)

        def compute():
            tuned, _ = load(run["folder"])
            p = measure(tuned, tok, examples, texts, reference)
            p["delta"], p["delta_se"] = paired_difference(torch.tensor(p["nll"]), torch.tensor(base["nll"]),
                                                          torch.tensor(base["count"]))
            return p
        p = _cached(Path(run["folder"]) / "fronts-point.json", key, compute)
        final = run["curve"][-1][1] if run["curve"] else math.nan
        return {"method": name, "lr": lr, "seed": seed, "folder": run["folder"], "final_train_loss": final,
                "learning": base["held_out"] - p["held_out"], "diverged": diverged(p, base, final),
                **{k: p[k] for k in ("held_out", "held_out_se", "delta", "delta_se", "kl", "loss_rise", "agreement")}}

    for name, flags, centre in [c for c in front_configs(args.batch_size) if c[0] in args.configs]:
        lrs = lr_grid(centre)
        for _ in range(3):  # the grid, then up to two more lrs until the most learning is bracketed
            for lr in lrs:
                for seed in seeds:
                    if not any(p["method"] == name and p["lr"] == lr and p["seed"] == seed for p in points):
                        print(f"[fronts] {name} lr {lr:g} seed {seed}; {time.time() - t0:.0f}s so far", flush=True)
                        points.append(point(name, flags, lr, seed))
            learning = {lr: statistics.fmean(p["learning"] for p in mine) if not any(p["diverged"] for p in mine)
                        else None for lr in lrs for mine in [[p for p in points if p["method"] == name and p["lr"] == lr]]}
            more = extend(lrs, learning)
            if more is None:
                break
            lrs = sorted([*lrs, more])
    report = print_fronts(points, base, seeds, args)
    write_json(args, "fronts", {"claim": "fronts", "model": args.model, "data": args.data, "held_out": args.held_out,
                                "held_out_problems": len(examples), "steps": args.steps, "batch_size": args.batch_size,
                                "lift_interval": interval, "seeds": list(seeds),
                                "base": {k: base[k] for k in ("held_out", "held_out_se")}, "points": points,
                                "verdicts": report})
    try:
        plot_fronts(points, base, Path(args.figures))
    except ImportError as e:
        print(f"note: no figure ({e})")
    return {"points": points, "base": base, "verdicts": report}


def print_fronts(points: list[dict], base: dict, seeds, args) -> list[dict]:
    """Every run's row (the final training loss, held-out loss ± its error, the paired fall from the
    base, drift, diverged), then each paper's claim judged at equal learning."""
    print(f"\nlearn-forget fronts: {args.model}, {args.steps} steps of batch {args.batch_size} on {args.data} (LIFT's "
          f"mask refreshed every {max(1, args.steps // 3)} steps: a deviation from the paper's 200, so that it "
          f"refreshes within the run); held-out: mean loss per solution token on {args.held_out}, base "
          f"{base['held_out']:.4f} ± {base['held_out_se']:.4f}")
    print(f"{'method':<14}{'lr':>9}{'seed':>5}{'train loss':>11}{'held-out':>18}{'fall vs base':>20}"
          f"{'KL(base‖tuned)':>16}{'agreement':>10}  diverged")
    for p in sorted(points, key=lambda p: (p["method"], p["lr"], p["seed"])):
        print(f"{p['method']:<14}{p['lr']:>9.3g}{p['seed']:>5}{p['final_train_loss']:>11.4f}"
              f"{p['held_out']:>11.4f} ± {p['held_out_se']:.4f}{-p['delta']:>+12.4f} ± {p['delta_se']:.4f}"
              f"{p['kl']:>16.4f}{100 * p['agreement']:>9.1f}%  {p['diverged'] or ''}")
    report = []
    print("\nthe claims, judged at equal learning (seed by seed; gap mean ± its standard error):")
    for a, b, words in PAIRS:
        if not any(p["method"] == a for p in points) or not any(p["method"] == b for p in points):
            continue
        v = verdicts(points, a, b, seeds)
        for kind in ("forgets_less", "learns_more"):
            r = v[kind]
            gap = f"gap {r['gap']:+.4f} ± {r['se']:.4f} over {len(r['gaps'])} seed(s)" if r["gaps"] else ""
            print(f"  {words} — {a} {kind.replace('_', ' ')} than {b} ({r['what']}): {r['claim']} {gap}")
        best = v["best"]
        print("    best lr: " + ", ".join(f"{m} {b_['lr']:g} (fall {b_['learning']:.4f})" for m, b_ in best.items() if b_))
        report.append({"a": a, "b": b, "claim": words, **v})
    return report


def plot_fronts(points: list[dict], base: dict, figures: Path) -> Path:
    """figures/fronts.png: one line per method through its lrs (mean over seeds), learning (the fall of
    the held-out loss) on x, forgetting (drift KL) on y; seeds as dots, diverged runs left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, m in enumerate(dict.fromkeys(p["method"] for p in points)):
        mine = [p for p in points if p["method"] == m and not p["diverged"]]
        lrs = sorted({p["lr"] for p in mine})
        xs = [statistics.fmean(p["learning"] for p in mine if p["lr"] == lr) for lr in lrs]
        ys = [statistics.fmean(p["kl"] for p in mine if p["lr"] == lr) for lr in lrs]
        color = plt.cm.tab10(i % 10)
        ax.plot(xs, ys, "-o", color=color, label=m)
        ax.scatter([p["learning"] for p in mine], [p["kl"] for p in mine], s=8, color=color, alpha=0.5)
    ax.set(xlabel=f"learning: held-out loss fall per solution token (base {base['held_out']:.3f})",
           ylabel="forgetting: KL(base ‖ tuned) on the base's own text", title="learn-forget fronts (one line per method)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    figures.mkdir(parents=True, exist_ok=True)
    fig.savefig(figures / "fronts.png", dpi=110)
    plt.close(fig)
    print(f"wrote {figures / 'fronts.png'}")
    return figures / "fronts.png"
