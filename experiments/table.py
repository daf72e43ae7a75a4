"""
The papers' Table 2 on real data (`python -m experiments.claims table`): every method fine-tunes a model on
GSM8K train, in the LIFT authors' training format, and is scored on the seven LLM-Adapters arithmetic
test sets by the LIFT authors' evaluation (eval_math's lift-authors protocol), mean ± std over seeds,
with the base model's row, the forgetting, and a verdict per paper's claim.
"""
import json
import math
import os
import statistics
import time
from pathlib import Path

import eval_math
import math_data
from experiments.runs import base_path, mean_std, pm, run_train, verdict, write_json

# -----------------------------------------------------------------------------
# the papers' Table 2 on real data: GSM8K train -> the seven LLM-Adapters arithmetic test sets

# The columns of LIFT Table 2, RoCoFT Table 3 and HyperAdapt's arithmetic table (LLM-Adapters' test
# sets, `dataset/<name>/test.json` in its repository), in the papers' order: the list the LIFT
# authors' bash_scripts/eval_math.sh loops over
TABLE_SETS = ("MultiArith", "gsm8k", "AddSub", "AQuA", "SingleEq", "SVAMP", "mawps")
# how the runs are written and scored: the LIFT authors' training format and evaluation (eval_math),
# with the decoding of --num-beams (theirs: 4; the table's default 1, greedy, for a CPU budget)
PROTOCOL = TRAIN_FORMAT = "lift-authors"
# Matched budgets, counted on SmolLM2-135M's 210 target matrices: LoRA r=8 trains 2,442,240 numbers and
# LIFT r=8 the same by definition; RoCoFT 16 rows 2,396,160; LoRA-XS / LoRA-SB r=108 (r^2 per matrix)
# 2,449,440; HyperAdapt has no rank (n_in + n_out per matrix: 305,280). Each at its paper's settings
# (lr, schedule, warmup share, betas, clipping) but for the steps and batch the laptop budget sets.
TABLE = (
    ("full", ["--method", "full"]),
    ("lora r8", ["--method", "lora", "--rank", "8"]),
    ("lift r8", ["--method", "lift", "--rank", "8"]),
    ("rocoft r16", ["--method", "rocoft", "--rank", "16"]),
    ("loraxs r108", ["--method", "loraxs", "--rank", "108"]),
    ("lorasb r108", ["--method", "lorasb", "--rank", "108"]),
    ("hyper", ["--method", "hyper"]),
)


def table_sets(eval_dir) -> list[str]:
    """The seven test files under --eval-dir (default $NANOPEFT_DATA or ./dataset): <name>.json or
    <name>/test.json, names matched ignoring case, as eval_math finds a dataset by name."""
    root = eval_dir or os.environ.get("NANOPEFT_DATA", "dataset")
    return [str(math_data._find_named(name, "test", root)) for name in TABLE_SETS]


def close(a: list, b: list, points: float = 1.0) -> tuple[bool, float]:
    """'a is about b': |mean(a) - mean(b)| within max(`points`, 2 x the larger std); (holds, gap)."""
    gap = statistics.fmean(a) - statistics.fmean(b)
    return abs(gap) <= max(points, 2 * max(mean_std(a)[1], mean_std(b)[1])), gap


def claim_table(args):
    """Every method fine-tunes --model on GSM8K train problems (the LIFT authors' training format) and
    is scored on the seven arithmetic test sets (the same first --eval-limit problems of each, the
    LIFT authors' prompt and answer rules, --num-beams beams); prints the
    papers' Table 2 layout (a row per method, a column per set, their average, mean ± std over the
    seeds, trainable %), the base model's row, the forgetting (drift on the base's own text) and
    the verdict on each paper's claim. Writes out/claims/table.json (and figures/table.png)."""
    args.eval_data = ",".join(table_sets(args.eval_dir))
    common = ["--protocol", PROTOCOL, "--train-format", TRAIN_FORMAT, "--num-beams", str(args.num_beams),
              "--seq-len", str(args.seq_len)]  # every run's, beside its method's flags
    args.base = base_path(args)
    beams = eval_math.decoding(PROTOCOL, args.num_beams)
    args.decoding = "greedy" if beams == 1 else f"beam search, {beams} beams"
    theirs = eval_math.decoding(PROTOCOL, None)
    deviation = "" if beams == theirs else f" (the authors' script: {theirs} beams)"
    seeds = range(args.seeds) if args.only_seed is None else [args.only_seed]
    configs = [c for c in TABLE if c[0] in args.configs]
    n_runs, t0 = len(configs) * len(seeds), time.time()
    table = {}
    for i, (name, flags) in enumerate(configs):
        for seed in seeds:
            done = sum(len(v) for v in table.values())
            if done:
                print(f"[table] run {done + 1}/{n_runs}; {time.time() - t0:.0f}s so far", flush=True)
            table.setdefault(name, []).append(run_train(args, name, [*flags, *common], seed))
    first = next(iter(table.values()))[0]["metrics"]
    sets = [n.lower() for n in TABLE_SETS]
    before = first.get("accuracy_before") or {}

    def avg(acc):
        return statistics.fmean(acc[s] for s in sets)
    w = max(14, *(len(n) + 2 for n in table))
    head = (f"{'method':<{w}}{'trainable':>13}{'%':>8}" + "".join(f"{n:>14}" for n in TABLE_SETS) + f"{'Avg':>14}"
            + f"{'loss rise':>18}{'KL(base‖tuned)':>20}{'agreement':>16}{'wall s':>8}")
    print(f"\nTable 2 at laptop scale: {args.model}, {args.steps} steps of batch {args.batch_size} on {args.data}, "
          f"{len(seeds)} seed(s), the LIFT authors' training format; accuracy % on the first {args.eval_limit} "
          f"problems of each set, the LIFT authors' prompt and scoring, {args.decoding}{deviation}, "
          f"{args.max_new_tokens} new tokens at most")
    print(head)
    if before:
        print(f"{'base':<{w}}{'':>13}{'':>8}" + "".join(f"{100 * before[s]:>14.1f}" for s in sets)
              + f"{100 * avg(before):>14.1f}")
    for name, runs in table.items():
        m = runs[0]["metrics"]
        forget = [r["metrics"].get("forgetting") or {} for r in runs]
        drift = "".join(f"{pm([f[k] for f in forget], 100 if k == 'agreement' else 1, d):>{wd}}" if all(k in f for f in forget)
                        else f"{'-':>{wd}}" for k, d, wd in (("loss_rise", 4, 18), ("kl", 4, 20), ("agreement", 1, 16)))
        print(f"{name:<{w}}{m['trainable']:>13,}{100 * m['trainable'] / m['model_params']:>7.2f}%"
              + "".join(f"{pm([r['metrics']['accuracy'][s] for r in runs], 100, 1):>14}" for s in sets)
              + f"{pm([avg(r['metrics']['accuracy']) for r in runs], 100, 1):>14}" + drift
              + f"{statistics.fmean(r['wall_s'] for r in runs):>8.0f}")
    floor = [n for n, s in zip(TABLE_SETS, sets) if max([before.get(s, 0)] + [r["metrics"]["accuracy"][s]
                                                                               for rs in table.values() for r in rs]) < 0.05]
    if floor:
        print(f"at the floor (every row below 5%, the base included): {', '.join(floor)}")
    # what a difference of means can mean here: one problem's worth, and the binomial sampling std of
    # an average accuracy over all the problems (the test subset is a sample of each set)
    n = args.eval_limit * len(sets)
    p = statistics.fmean(avg(r["metrics"]["accuracy"]) for rs in table.values() for r in rs)
    noise = 100 * math.sqrt(max(p * (1 - p), 1e-12) / n)
    print(f"resolution: one problem is {100 / args.eval_limit:.1f} points on a set and {100 / n:.2f} on the average; "
          f"at the mean accuracy {100 * p:.1f}% the sampling std of an average over {n} problems is {noise:.1f} points")
    # the papers' claims, on the average over the seven sets and on the drift from the base
    A = {n: [100 * avg(r["metrics"]["accuracy"]) for r in rs] for n, rs in table.items()}
    K = {n: [(r["metrics"].get("forgetting") or {}).get("kl", math.nan) for r in rs] for n, rs in table.items()}
    checks = []

    def order(label, a, b, of, higher=True, strict=False, digits=1):
        if a in of and b in of:
            line = verdict(label, of[a], of[b], higher, strict, digits)
            gap = statistics.fmean(of[a]) - statistics.fmean(of[b])
            if of is A and abs(gap) < 2 * noise:
                line += f" (gap {gap:+.1f} points, under 2 sampling stds: not a finding)"
            checks.append(line)

    def about(label, a, b):
        if a in A and b in A:
            ok, gap = close(A[a], A[b])
            checks.append(f"  {label}: {pm(A[a], 1, 1)} vs {pm(A[b], 1, 1)} (gap {gap:+.1f} points; 'about' = within "
                          f"max(1 point, 2 std)) -> {'holds' if ok else 'does not hold'}")
    order("LIFT Table 2: LIFT r8 >= LoRA r8 on the average", "lift r8", "lora r8", A)
    order("LIFT Table 2: LIFT r8 >= full fine-tuning on the average", "lift r8", "full", A)
    order("LIFT §7.1: LIFT r8 drifts less from the base than LoRA r8 (KL, lower)", "lift r8", "lora r8", K, False,
          digits=4)
    order("LIFT §7.1: LIFT r8 drifts less from the base than full fine-tuning (KL, lower)", "lift r8", "full", K, False,
          digits=4)
    about("RoCoFT Table 3: RoCoFT r16 about LoRA r8", "rocoft r16", "lora r8")
    order("LoRA-SB: LoRA-SB r108 > LoRA-XS r108 on the average", "lorasb r108", "loraxs r108", A, strict=True)
    about("HyperAdapt's table: HyperAdapt about LoRA r8", "hyper", "lora r8")
    print("\nthe claims, as measured here (means ordered as the paper says -> holds):")
    print("\n".join(checks))
    runs_json = {n: [{"seed": r["seed"], "folder": r["folder"], "wall_s": r["wall_s"], "curve": r["curve"]}
                     | {k: r["metrics"].get(k) for k in ("accuracy", "trainable", "model_params", "train_s",
                                                          "forgetting", "saved")} for r in rs] for n, rs in table.items()}
    write_json(args, "table", {"claim": "table", "model": args.model, "data": args.data, "steps": args.steps,
                               "batch_size": args.batch_size, "seeds": list(seeds), "eval_limit": args.eval_limit,
                               "sets": list(TABLE_SETS), "eval_files": args.eval_data.split(","),
                               "decoding": args.decoding, "protocol": PROTOCOL, "train_format": TRAIN_FORMAT,
                               "max_new_tokens": args.max_new_tokens, "base": before, "floor": floor,
                               "sampling_std_points": noise,
                               "checks": checks, "runs": runs_json})
    try:
        plot_table(args)
    except ImportError as e:
        print(f"note: no figure ({e})")
    return table


def plot_table(args):
    """figures/table.png: accuracy per test set (and the average) by method, mean over seeds, std as
    error bars, the base model beside them; from out/claims/table.json."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = json.loads((Path(args.out) / "table.json").read_text())
    sets = [s.lower() for s in data["sets"]]
    rows = {"base": [[data["base"].get(s, math.nan) for s in sets]]} if data["base"] else {}
    rows |= {n: [[r["accuracy"][s] for s in sets] for r in rs] for n, rs in data["runs"].items()}
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(rows)
    for i, (name, runs) in enumerate(rows.items()):
        per = [row + [statistics.fmean(row)] for row in runs]  # each run's sets and its average
        ms = [mean_std([100 * x for x in col]) for col in zip(*per)]
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(sets) + 1)]
        ax.bar(xs, [m for m, _ in ms], width, yerr=[s for _, s in ms] if len(per) > 1 else None, label=name,
               color="black" if name == "base" else plt.cm.tab10(i % 10), capsize=2)
    ax.set_xticks(range(len(sets) + 1), [*data["sets"], "Avg"])
    ax.set(ylabel="accuracy, % (mean over seeds; bars: std)",
           title=f"{data['model']}, {data['steps']} steps x batch {data['batch_size']} on GSM8K train; first "
                 f"{data['eval_limit']} problems per set, {data['decoding']}")
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    figs = Path(args.figures)
    figs.mkdir(parents=True, exist_ok=True)
    fig.savefig(figs / "table.png", dpi=110)
    plt.close(fig)
    print(f"wrote {figs / 'table.png'}")
    return figs / "table.png"
