"""
The papers' claims, measured at the scale this repository runs at: one command per claim, each
prints a table (mean ± std over seeds) and writes out/claims/<claim>.json.

    python -m experiments.claims noise        # LIFT §4, Fig. 2: noise on Principal Weights hurts far more
    python -m experiments.claims spectral     # LIFT App. C.1-C.2: ... and raises the spectral norm more
    python -m experiments.claims overlap      # LIFT App. G.9: LIFT's and the magnitude mask overlap little
    python -m experiments.claims compare      # matched budgets: LIFT §7.1 / §7.2 (G.3), HyperAdapt Fig. 1 /
                                  # Table 2, LoRA-SB Fig. 2, on one set of runs
    python -m experiments.claims lorasb-init  # LoRA-SB Table 4: first-step init vs truncated SVD of noise
    python -m experiments.claims rows         # RoCoFT Fig. 5: which rows matters less than the seed
    python -m experiments.claims table --data gsm8k/train.jsonl --eval-dir llm-adapters/   # the papers' Table 2
                                  # on SmolLM2-135M: GSM8K train -> the seven arithmetic test sets
    python -m experiments.claims fronts --data gsm8k/train.jsonl --held-out gsm8k/test.jsonl   # learn-forget
                                  # fronts: every method at several lrs, judged at equal learning
    python -m experiments.claims plots        # PNGs of compare's (and table's) runs (needs matplotlib)

--model tiny (the default) is the built-in base, pretrained on first use as train.py does;
noise / spectral / overlap also take anything weights.load reads (smollm2-135m, a folder, a .gguf).
The training claims run train.py once per method and seed into out/claims/runs/ and reuse a run
whose command has not changed, so a second call only re-reads them. This file: the training claims
(compare, lorasb-init, rows), their plots and the command line; noise / spectral / overlap live in
perturb.py, the real-data table in table.py, what they all share (runs, mean ± std, verdicts) in runs.py.
"""
import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch

import eval_math
import math_data
from builtin import BUILTIN, BUILTIN_PRETRAIN_STEPS
from cli import is_tiny
from eval_math import Parser
from experiments import analyze, check_counts, check_model, check_number, check_threads, command_line, fronts, refuse
from experiments.perturb import claim_noise, claim_overlap, claim_spectral, held_out, target_weights, text_loss
from experiments.runs import base_path, mean_std, pm, run_train, verdict, write_json
from experiments.table import TABLE, TABLE_SETS, claim_table, plot_table
from model import PRESETS
from weights import load

BUILTIN_DATA = ("gsm8k", "synth-source", "synth-target", "synth-source-facts")  # math_data.load_problems' names


# -----------------------------------------------------------------------------
# the training claims: train.py runs, one per configuration and seed, reused while unchanged


def analyse_run(base, held, folder: str, spectrum_of: str) -> dict:
    """What a tuned model is, next to its base: analyze.delta_metrics over every target matrix,
    averaged; the normalised singular values of ΔW of the `spectrum_of` matrices (mean over layers,
    for the spectra plot); and its loss on the held-out text of the noise claim (the base's own
    domain: how much of it was forgotten, measured without greedy decoding's all-or-nothing)."""
    tuned, tok = load(folder)
    per = analyze.compare(base, tuned)
    out = {k: statistics.fmean(m[k] for m in per.values())
           for k in ("rank", "eff_rank", "norm_rank", "alignment", "spec_change", "mean_abs", "changed")}
    out["rank_share"] = statistics.fmean(m["rank"] / min(m["shape"]) for m in per.values())
    spectra = []
    for (name, w0), (_, w) in zip(target_weights(base), target_weights(tuned)):
        if name.endswith(spectrum_of):
            s = torch.linalg.svdvals((w - w0).float())
            spectra.append((s / s[0] if s[0] > 0 else s).tolist())
    out["spectrum"] = [statistics.fmean(col) for col in zip(*spectra)] if spectra else []
    out["source_loss"] = text_loss(tuned, tok, held)
    return out


# The matched-budget set: each row of a budget group trains about as many numbers as LoRA at that
# rank does (tiny model: r=8 -> 108,544; r=1 -> 13,568, which is HyperAdapt's n_in + n_out). Every
# method at its tiny-model lr (a sweep at 150 steps), except LIFT: its tiny lr (1e-3) is the one
# for the default --rank 128, where it trains 91% of the model; at r=8 the sweep's best is 1e-2.
COMPARE = (  # (name, train.py flags)
    ("full", ["--method", "full"]),
    ("lora r8", ["--method", "lora", "--rank", "8"]),
    ("lift r8", ["--method", "lift", "--rank", "8", "--lr", "1e-2"]),
    ("rocoft r16", ["--method", "rocoft", "--rank", "16"]),
    ("loraxs r64", ["--method", "loraxs", "--rank", "64"]),
    ("lorasb r64", ["--method", "lorasb", "--rank", "64"]),
    ("lora r1", ["--method", "lora", "--rank", "1"]),
    ("hyper", ["--method", "hyper"]),
)


def accuracy(run, spec):
    return run["metrics"]["accuracy"].get(spec, float("nan"))


def kept_at(run, target: str, source: str, level: float) -> float:
    """The source accuracy where the run's target accuracy first reached `level`, linearly
    interpolated between the evaluations along its learn/forget path; nan if it never did. At equal
    learning, the forgetting of different methods can be compared (LIFT §7.1's 'learn more, forget less')."""
    path = [(a.get(target, math.nan), a.get(source, math.nan)) for _, a in run["evals"]]
    for (t0, s0), (t1, s1) in zip(path, path[1:]):
        if t0 < level <= t1:
            return s0 + (s1 - s0) * (level - t0) / (t1 - t0)
    return path[0][1] if path and path[0][0] >= level else math.nan


def loss_at(run, step):
    """The logged training loss of the last logged step <= `step` (the curve logs every --log-every)."""
    got = [loss for s, loss in run["curve"] if s <= step]
    return got[-1] if got else float("nan")


def summarise(runs: list[dict], base, held) -> dict:
    """Per configuration: the runs' accuracies, losses, trainable counts and analyse_run."""
    table = {}
    for r in runs:
        r["delta"] = analyse_run(base, held, r["folder"], "up_proj")
        table.setdefault(r["name"], []).append(r)
    return table


def pm_reached(xs, scale: float = 100.0) -> str:
    """pm over the values that exist (not nan), with how many of the runs they are when not all."""
    got = [x for x in xs if not math.isnan(x)]
    if not got:
        return "never"
    return pm(got, scale, 1) + "%" + (f" ({len(got)}/{len(xs)})" if len(got) < len(xs) else "")


def print_runs(table: dict, specs: list[str], level: float):
    """One row per configuration: budget, accuracies, the source kept at equal learning, last
    logged loss, seconds, ΔW measures."""
    def mean(runs, f):
        return statistics.fmean(f(r) for r in runs)
    w = max(14, *(len(name) + 2 for name in table))
    ws = {s: max(18, len(s) + 2) for s in specs}
    source = specs[1] if len(specs) > 1 else None
    kept = f"{source} @ {specs[0]} {100 * level:.0f}%" if source else ""
    print(f"\n{'method':<{w}}{'trainable':>11}{'% model':>9}" + "".join(f"{s:>{ws[s]}}" for s in specs)
          + (f"{kept:>{len(kept) + 2}}" if source else "")
          + f"{'source loss':>18}{'final loss':>18}{'train s':>9}{'rank(ΔW)/dim':>14}{'norm rank':>11}{'eff rank':>10}")
    for name, runs in table.items():
        m = runs[0]["metrics"]
        at_level = pm_reached([kept_at(r, specs[0], source, level) for r in runs]) if source else ""
        print(f"{name:<{w}}{m['trainable']:>11,}{100 * m['trainable'] / m['model_params']:>8.2f}%"
              + "".join(f"{pm([accuracy(r, s) for r in runs], 100, 1) + '%':>{ws[s]}}" for s in specs)
              + (f"{at_level:>{len(kept) + 2}}" if source else "")
              + f"{pm([r['delta']['source_loss'] for r in runs], 1, 3):>18}"
              + f"{pm([r['curve'][-1][1] for r in runs], 1, 4):>18}"
              + f"{mean(runs, lambda r: r['metrics']['train_s']):>9.0f}"
              + f"{pm([r['delta']['rank_share'] for r in runs]):>14}"
              + f"{mean(runs, lambda r: r['delta']['norm_rank']):>11.3f}"
              + f"{mean(runs, lambda r: r['delta']['eff_rank']):>10.1f}")


def training_claim(args, name: str, configs) -> tuple[dict, list[str]]:
    args.base = base_path(args)  # resolved (and the built-in base pretrained) once, not per run
    runs = [run_train(args, cname, flags, seed) for cname, flags in configs for seed in range(args.seeds)]
    base, tok = load(args.base)
    held = held_out(tok, not is_tiny(args.base), args.texts)[0]
    args.base_source_loss = text_loss(base, tok, held)
    table = summarise(runs, base, held)
    specs = [s for s in args.eval_data.split(",") if s]
    base_acc = runs[0]["metrics"].get("accuracy_before") or {}
    print(f"\n{name}: {args.steps} steps per run, {args.seeds} seeds, mean ± std; base model: "
          + ", ".join(f"{s} {100 * base_acc.get(s, float('nan')):.1f}%" for s in specs)
          + f", held-out source loss {args.base_source_loss:.4f}")
    print_runs(table, specs, args.level)
    return table, specs


def dump(table: dict) -> dict:
    """The runs as JSON: per configuration, per seed, what the tables and plots read."""
    keep = ("accuracy", "accuracy_before", "trainable", "model_params", "train_s", "forgetting")
    return {name: [{k: r[k] for k in ("seed", "folder", "curve", "evals", "delta", "wall_s")}
                   | {k: r["metrics"].get(k) for k in keep} for r in runs] for name, runs in table.items()}


def claim_compare(args):
    """One set of matched-budget runs, read four ways (the papers' comparisons at equal budgets)."""
    table, specs = training_claim(args, "matched budgets", [c for c in COMPARE if c[0] in args.configs])
    target, source = specs[0], (specs[1] if len(specs) > 1 else None)
    checks = []

    def check(label, a: str, b: str, of, higher=True):
        """Compare configuration a with b on the measure `of(run)`, if both were run."""
        if a in table and b in table:
            checks.append(verdict(label, [of(r) for r in table[a]], [of(r) for r in table[b]], higher))

    def acc(spec):
        return lambda r: accuracy(r, spec)
    check(f"LIFT §7.1: LIFT r8 learns the target ({target}) at least as well as LoRA r8", "lift r8", "lora r8",
          acc(target))
    if source:
        check(f"LIFT §7.1: LIFT r8 keeps more of the source ({source}) than full fine-tuning, at the end", "lift r8",
              "full", acc(source))
        check("LIFT §7.1: ... its held-out source loss (the base's own domain) rises less", "lift r8", "full",
              lambda r: r["delta"]["source_loss"], higher=False)
        check(f"LIFT §7.1: ... and where the target first reached {100 * args.level:.0f}% (equal learning)", "lift r8",
              "full", lambda r: kept_at(r, target, source, args.level))
    check("LIFT §7.2 / G.3: rank(ΔW)/min(n_out, n_in) of LIFT r8 far above LoRA r8's", "lift r8", "lora r8",
          lambda r: r["delta"]["rank_share"])
    check("HyperAdapt Fig. 1: normalised rank of ΔW, HyperAdapt (near 1) above LoRA r1 (near 0)", "hyper", "lora r1",
          lambda r: r["delta"]["norm_rank"])
    check("HyperAdapt Table 2: HyperAdapt >= LoRA r1 on the target", "hyper", "lora r1", acc(target))
    every = args.log_every  # the curve holds the mean loss of each --log-every steps
    for step in sorted({min(every, args.steps), max(every, args.steps // 2 // every * every), args.steps}):
        check(f"LoRA-SB Fig. 2: training loss logged at step {step}, LoRA-SB r64 below LoRA-XS r64", "lorasb r64",
              "loraxs r64", lambda r, step=step: loss_at(r, step), higher=False)
    print("\nthe claims, as measured here (means ordered as the paper says -> holds):")
    print("\n".join(checks))
    write_json(args, "compare", {"claim": "matched budgets", "model": args.model, "steps": args.steps,
                                 "seeds": args.seeds, "specs": specs, "checks": checks,
                                 "base_source_loss": args.base_source_loss, "runs": dump(table)})
    return table


def claim_lorasb_init(args):
    """LoRA-SB Table 4: the same LoRA-XS structure and training, B R A from the truncated SVD of the
    first full-FT step (LoRA-SB) or of a Kaiming / Gaussian matrix."""
    configs = [(f"lorasb r64 {init}", ["--method", "lorasb", "--rank", "64", "--lorasb-init", init.split(":")[0]]
                + (["--lorasb-init-std", init.split(":")[1]] if ":" in init else []))
               for init in ("kaiming", "gaussian:1e-3", "gaussian:1e-2")]
    configs.append(("lorasb r64", ["--method", "lorasb", "--rank", "64"]))  # compare's run, when it has one
    table, specs = training_claim(args, "LoRA-SB Table 4, initialisations", configs)
    first = min(args.log_every, args.steps)
    print(f"\n{'init':<26}{'loss at step ' + str(first):>20}{'final loss':>18}{specs[0]:>18}")
    for name, runs in table.items():
        accs = pm([accuracy(r, specs[0]) for r in runs], 100, 1) + "%"
        print(f"{name:<26}{pm([loss_at(r, first) for r in runs], 1, 4):>20}"
              f"{pm([r['curve'][-1][1] for r in runs], 1, 4):>18}{accs:>18}")
    write_json(args, "lorasb-init", {"claim": "LoRA-SB Table 4", "steps": args.steps, "seeds": args.seeds,
                                     "specs": specs, "runs": dump(table)})
    return table


def claim_rows(args):
    """RoCoFT Fig. 5: rank-16 RoCoFT with each row choice, and columns; is the spread between the
    choices larger than the spread between seeds?"""
    configs = [(f"rocoft r16 {sel}" if sel != "first" else "rocoft r16",
                ["--method", "rocoft", "--rank", "16", "--rocoft-select", sel]) for sel in ("first", "random", "max",
                                                                                           "min", "mixed")]
    configs[0] = ("rocoft r16", ["--method", "rocoft", "--rank", "16"])
    configs.append(("rocoft r16 column", ["--method", "rocoft", "--rank", "16", "--rocoft-mode", "column"]))
    table, specs = training_claim(args, "RoCoFT Fig. 5, which rows", configs)
    target = specs[0]
    means = {name: statistics.fmean(accuracy(r, target) for r in runs) for name, runs in table.items()}
    rows_only = [n for n in means if "column" not in n]
    between = statistics.stdev([means[n] for n in rows_only]) if len(rows_only) > 1 else 0.0
    within = statistics.fmean(mean_std(accuracy(r, target) for r in table[n])[1] for n in rows_only)
    print(f"\n{target}: std between the row choices' means {100 * between:.1f} points; mean std between seeds of "
          f"one choice {100 * within:.1f} points -> the choice matters {'less' if between <= within else 'more'} "
          "than the seed")
    if "rocoft r16 column" in table:  # "about equal": the means closer than the seeds' spread
        rows_acc, cols_acc = ([accuracy(r, target) for r in table[n]] for n in ("rocoft r16", "rocoft r16 column"))
        gap = abs(mean_std(rows_acc)[0] - mean_std(cols_acc)[0])
        spread = max(mean_std(rows_acc)[1], mean_std(cols_acc)[1])
        print(f"  rows ≈ columns: {pm(rows_acc, 100, 1)}% vs {pm(cols_acc, 100, 1)}%, a gap of {100 * gap:.1f} points "
              f"{'within' if gap <= spread else 'beyond'} the seeds' std ({100 * spread:.1f}) -> "
              f"{'holds' if gap <= spread else 'does not hold'}")
    write_json(args, "rows", {"claim": "RoCoFT Fig. 5", "steps": args.steps, "seeds": args.seeds, "specs": specs,
                              "between_choices": between, "between_seeds": within, "runs": dump(table)})
    return table

# -----------------------------------------------------------------------------
# plots of compare's runs


def claim_plots(args):
    """figures/loss_curves.png, learn_forget.png, spectra.png from out/claims/compare.json; table.png from
    table.json."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib (an optional dependency): pip install matplotlib") from None
    written = [plot_table(args)] if (Path(args.out) / "table.json").exists() else []
    f = Path(args.out) / "compare.json"
    if not f.exists():
        if written:
            return written
        raise ValueError(f"{f} does not exist: run `python -m experiments.claims compare` first (or `python -m experiments.claims table`)")
    data = json.loads(f.read_text())
    runs, specs = data["runs"], data["specs"]
    figs = Path(args.figures)
    figs.mkdir(parents=True, exist_ok=True)
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(runs)}

    def save(fig, name):
        fig.tight_layout()
        written.append(figs / name)
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rs in runs.items():
        steps = [s for s, _ in rs[0]["curve"]]
        curves = [[loss for _, loss in r["curve"]] for r in rs if len(r["curve"]) == len(steps)]
        mean = [statistics.fmean(c) for c in zip(*curves)]
        ax.plot(steps, mean, label=name, color=colors[name])
        if len(curves) > 1:
            lo = [min(c) for c in zip(*curves)]
            hi = [max(c) for c in zip(*curves)]
            ax.fill_between(steps, lo, hi, color=colors[name], alpha=0.15)
    ax.set(xlabel="step", ylabel="training loss (mean over seeds; band: min-max)", yscale="log",
           title=f"training loss on {data.get('specs', ['target'])[0]}, matched budgets ({data['model']})")
    ax.legend(fontsize=8, ncol=2)
    save(fig, "loss_curves.png")

    # learned (target accuracy) against forgotten (loss on the base's own held-out text), per run
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for name, rs in runs.items():
        ax.scatter([100 * r["accuracy"][specs[0]] for r in rs], [r["delta"]["source_loss"] for r in rs],
                   label=name, color=colors[name], s=30)
    ax.scatter([100 * (next(iter(runs.values()))[0]["accuracy_before"] or {}).get(specs[0], 0)],
               [data["base_source_loss"]], marker="*", s=160, color="black", label="base model")
    ax.set(xlabel=f"{specs[0]} accuracy, % (learned)", yscale="log",
           ylabel="held-out loss on the base's own domain (forgotten)",
           title="learn vs forget: one point per method and seed")
    ax.legend(fontsize=8)
    save(fig, "learn_forget.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rs in runs.items():
        spectra = [r["delta"]["spectrum"] for r in rs if r["delta"]["spectrum"]]
        if spectra:
            ax.plot(range(1, len(spectra[0]) + 1), [statistics.fmean(c) for c in zip(*spectra)], label=name,
                    color=colors[name])
    ax.set(xlabel="singular value index", ylabel="σ_i / σ_1 of ΔW (mean over layers and seeds)", yscale="log",
           title="spectrum of ΔW = W - W0, up_proj", ylim=(1e-4, 1.5))
    ax.legend(fontsize=8, ncol=2)
    save(fig, "spectra.png")
    for w in written:
        print(f"wrote {w}")
    return written

# -----------------------------------------------------------------------------
# command line

def claim_fronts(args):
    """The learn-forget fronts (experiments/fronts.py): every method at several lrs, judged at equal learning."""
    args.base = base_path(args)
    return fronts.claim_fronts(args)


CLAIMS = {"noise": claim_noise, "spectral": claim_spectral, "overlap": claim_overlap, "compare": claim_compare,
          "lorasb-init": claim_lorasb_init, "rows": claim_rows, "plots": claim_plots, "table": claim_table,
          "fronts": claim_fronts}


def ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be a positive integer")
    return values


def build_parser():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("claim", choices=list(CLAIMS), help="which claim to measure")
    p.add_argument("--model", default=None, help="tiny (the built-in base; table: smollm2-135m), smollm2-135m, a folder "
                                                 "or a .gguf")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..n-1; the tables show mean ± std (table: 2, else 3)")
    p.add_argument("--out", default="out/claims", help="where the JSON results and the runs go")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    p.add_argument("--pretrain-steps", type=int, default=BUILTIN_PRETRAIN_STEPS,
                   help="the built-in base's pretraining length (as train.py)")
    g = p.add_argument_group("noise / spectral / overlap")
    g.add_argument("--ranks", type=ints, default=[1, 4, 16], help="noise: budgets r (k = r(n_in + n_out) per matrix)")
    g.add_argument("--sigma", type=float, default=0.01, help="noise: the noise's std (the paper's 0.01)")
    g.add_argument("--texts", type=int, default=64,
                   help="noise and the training claims, built-in model: held-out source problems")
    g.add_argument("--sizes", type=ints, default=[128, 256, 512, 1024], help="spectral: random matrix sizes")
    g.add_argument("--scale", type=float, default=0.5, help="spectral: noise Frobenius norm / ||W||_F")
    g.add_argument("--rank", type=int, default=8, help="spectral / overlap: the budget r on the model's matrices")
    g.add_argument("--lra-ranks", type=ints, default=[1, 4, 16, 64], help="overlap: LRA ranks")
    g = p.add_argument_group("compare / lorasb-init / rows (train.py runs)")
    g.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run (compare 150, table 60, fronts 30)")
    g.add_argument("--batch-size", type=int, default=None, help="examples per step (compare 32, table 4)")
    g.add_argument("--configs", default=None,
                   help="compare / table: which rows of the matched-budget set (default: all)")
    g.add_argument("--data", default=None, help="training data (train.py --data; compare synth-target, table gsm8k)")
    g.add_argument("--eval-data", default="synth-target,synth-source,synth-source-facts",
                   help="the target first, then the source (and more); table: --eval-dir instead")
    g.add_argument("--eval-limit", type=int, default=None, help="test problems per eval set (compare 100, table 20)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="generation budget (default eval_math's; table 256)")
    g.add_argument("--forget-prompts", type=int, default=100, help="drift from the base on its own text (0 = off)")
    g.add_argument("--eval-every", type=int, default=None,
                   help="accuracy every N steps: each run's learn/forget path (0 = only at the end; compare 15, table 0)")
    g = p.add_argument_group("table (GSM8K train -> the seven arithmetic test sets)")
    g.add_argument("--eval-dir", default=None,
                   help="folder of the LLM-Adapters test sets (<name>.json or <name>/test.json; default $NANOPEFT_DATA "
                        "or ./dataset)")
    g.add_argument("--num-beams", type=int, default=1,
                   help="beams in evaluation (the LIFT authors' script: 4; 1 = greedy, a quarter of the time on a "
                        "CPU, a deviation the table's header names)")
    g.add_argument("--seq-len", type=int, default=320, help="training examples truncated to this many tokens")
    g.add_argument("--only-seed", type=int, default=None,
                   help="run just this seed (to share the seeds among processes; a later call without it reads them all)")
    g = p.add_argument_group("fronts (GSM8K train, every method at several lrs; learning on held-out solutions)")
    g.add_argument("--held-out", default="gsm8k", help="held-out problems with solutions (GSM8K test: never trained on)")
    g.add_argument("--held-out-limit", type=int, default=200, help="the first this many held-out problems (>= 200)")
    g.add_argument("--level", type=float, default=0.5,
                   help="compare: the target accuracy at which the source kept is read off each path")
    g.add_argument("--log-every", type=int, default=10, help="training-loss curve resolution")
    g.add_argument("--figures", default="figures", help="plots: where the PNGs go")
    return p


# What a flag left unset means, per claim: the training claims on the built-in task, and the table
TABLE_DEFAULTS = dict(model="smollm2-135m", seeds=2, steps=60, batch_size=4, data="gsm8k", eval_limit=20, eval_every=0,
                      max_new_tokens=256, configs=",".join(c for c, _ in TABLE))
CLAIM_DEFAULTS = {
    "table": TABLE_DEFAULTS,
    # the table's runs without generation, 30 steps: a sweep point costs ~4-6 min of training and ~4 min for the
    # held-out measure (200 problems) on one core of a 2-core CPU (measured), so 42 points take ~3.2 h or more with
    # two processes (an estimate from those parts, not a measured sweep)
    "fronts": {**{k: v for k, v in TABLE_DEFAULTS.items() if k != "max_new_tokens"}, "steps": 30},
    None: dict(model="tiny", seeds=3, steps=BUILTIN["max_steps"], batch_size=BUILTIN["batch_size"],
               data="synth-target", eval_limit=100, eval_every=15, configs=",".join(c for c, _ in COMPARE)),
}


def check_data(flag: str, value: str, split: str):
    """Each comma-separated spec of a data flag is one math_data.load_problems reads, checked without
    reading it: a built-in name, an existing file or folder, or a dataset name under $NANOPEFT_DATA."""
    for spec in value.split(","):
        path = Path(spec).expanduser()
        if spec in BUILTIN_DATA or path.exists():
            continue
        if not spec or "/" in spec or path.suffix in (".json", ".jsonl"):
            raise FileNotFoundError(f"--{flag} {value}: no such data file or folder {spec!r}")
        try:
            math_data._find_named(spec, split, None)
        except ValueError as e:
            raise ValueError(f"--{flag} {value}: {e}") from None


def check_args(args):
    """Every flag, before the base model is pretrained, built or loaded: one line naming the flag, its
    value and what is allowed. Counts have a floor and a generous ceiling (10**12 steps never finish)."""
    check_counts(args, seeds=(1, 100), pretrain_steps=(1, 10**6), texts=(1, 1000), rank=(1, 65536), steps=(1, 10**6),
                 batch_size=(1, 4096), eval_limit=(1, 10**5), forget_prompts=(0, 100), eval_every=(0, 10**6),
                 num_beams=(1, eval_math.MAX_BEAMS), log_every=(1, 10**6), held_out_limit=(1, 10**5))
    check_threads(args)
    tiny = is_tiny(args.model)  # the name, or a folder holding the tiny preset's shapes
    context = PRESETS["tiny"]["max_seq_len"] if tiny else max(p["max_seq_len"] for p in PRESETS.values())
    which = "the tiny model's context" if tiny else "the longest context of any model here"
    if not 2 <= args.seq_len <= context:
        refuse("seq-len", args.seq_len, f"2 to {context:,} tokens ({which})")
    if args.max_new_tokens is not None and not 1 <= args.max_new_tokens < context:
        refuse("max-new-tokens", args.max_new_tokens, f"1 to {context - 1:,} ({which} is {context:,} positions, and "
               "the prompt needs one)")
    for flag, cap in (("ranks", 65536), ("sizes", 4096), ("lra_ranks", 65536)):
        values = vars(args)[flag]
        if max(values) > cap:
            refuse(flag, ",".join(map(str, values)), f"comma-separated whole numbers from 1 to {cap:,}")
    check_number("sigma", args.sigma, allowed="the noise's std, a finite number > 0")
    check_number("scale", args.scale, allowed="the noise's Frobenius norm over ||W||_F, a finite number > 0")
    check_number("level", args.level, 0, 1, "a target accuracy in (0, 1]")
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    known = dict(TABLE if args.claim in ("table", "fronts") else COMPARE)
    unknown = [c for c in args.configs if c not in known]
    if unknown or not args.configs:
        raise ValueError(f"unknown --configs {unknown[0] if unknown else ''!r}; known: {', '.join(known)}")
    if args.only_seed is not None and not 0 <= args.only_seed < args.seeds:
        raise ValueError(f"--only-seed {args.only_seed} is not one of the seeds 0..{args.seeds - 1}")
    check_model("--model", args.model)
    check_data("data", args.data, "train")
    check_data("eval-data", args.eval_data, "test")
    check_data("held-out", args.held_out, "test")
    if args.eval_dir is not None and not os.path.isdir(args.eval_dir):
        raise FileNotFoundError(f"--eval-dir {args.eval_dir}: no such folder (it holds the LLM-Adapters test sets)")
    for flag in ("out", "figures"):
        folder = vars(args)[flag]
        if not folder or os.path.exists(folder) and not os.path.isdir(folder):
            refuse(flag, folder, "a folder (this is " + ("empty)" if not folder else "a file)"))


def main(argv=None):
    args = build_parser().parse_args(argv)
    flags = vars(args)  # the claim's defaults where a flag was not given
    for k, v in CLAIM_DEFAULTS.get(args.claim, CLAIM_DEFAULTS[None]).items():
        if flags[k] is None:
            flags[k] = v
    check_args(args)
    if args.claim in ("compare", "lorasb-init", "rows") and args.model != "tiny" and not is_tiny(args.model):
        print(f"note: training claims on {args.model} run {len(COMPARE)} x {args.seeds} fine-tunings of it")
    if args.claim == "table":
        print(f"table: {len(args.configs)} methods x {1 if args.only_seed is not None else args.seeds} seed(s) of "
              f"{args.steps} steps on {args.model}, each evaluated on {len(TABLE_SETS)} sets x {args.eval_limit} problems")
    torch.set_num_threads(args.threads)
    return CLAIMS[args.claim](args)


def cli(argv=None) -> int:
    return command_line(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
