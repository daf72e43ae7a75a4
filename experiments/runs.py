"""
What every claim shares: train.py runs cached by their command (out/claims/runs/), the built-in
base, mean ± std over seeds, the verdict line, the JSON record of a claim.
"""
import json
import math
import statistics
import time
from pathlib import Path

import train
from builtin import builtin_base
from cli import parse_args
from weights import write_atomic


def mean_std(xs) -> tuple[float, float]:
    xs = list(xs)
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def pm(xs, scale: float = 1.0, digits: int = 2) -> str:
    """'mean ± std' of xs (times scale)."""
    m, s = mean_std(xs)
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def write_json(args, name: str, result: dict) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    f = out / f"{name}.json"
    write_atomic(f, json.dumps(result, indent=1).encode())
    print(f"\nwrote {f}")
    return f


def base_path(args) -> str:
    """--model: 'tiny' is the built-in base (pretrained once, cached under out/: builtin.py)."""
    if args.model != "tiny":
        return args.model
    run, _, _ = parse_args(["--method", "full", "--pretrain-steps", str(args.pretrain_steps)])
    return builtin_base(run, train.train)


def run_train(args, name: str, flags: list[str], seed: int) -> dict:
    """train.main on the base with `flags`, into out/claims/runs/<name>-seed<seed>; a folder whose
    recorded command equals this one is read, not re-run. Returns its metrics and loss curve."""
    folder = Path(args.out) / "runs" / f"{name}-seed{seed}"
    argv = [*flags, "--model", args.base, "--data", args.data, "--eval-data", args.eval_data,
            "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--seed", str(seed),
            "--log-every", str(args.log_every), "--eval-every", str(args.eval_every), "--threads", str(args.threads),
            "--forget-prompts", str(args.forget_prompts)]
    argv += ["--eval-limit", str(args.eval_limit)] if args.eval_limit else []
    argv += ["--max-new-tokens", str(args.max_new_tokens)] if args.max_new_tokens else []
    key = folder / "claims-command.json"
    if (folder / "metrics.json").exists() and key.exists() and json.loads(key.read_text()) == argv:
        print(f"{name} seed {seed}: reusing {folder}", flush=True)
    else:
        print(f"\n=== {name}, seed {seed}: python train.py {' '.join(argv)}", flush=True)
        t0 = time.time()
        train.main(argv + ["--out", str(folder), "--overwrite"])
        (folder / "wall_s").write_text(f"{time.time() - t0:.1f}")
        key.write_text(json.dumps(argv))
    metrics = json.loads((folder / "metrics.json").read_text())
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]
    # the learn/forget curve: the base's accuracy at step 0, every --eval-every, the final one
    evals = [(0, metrics["accuracy_before"])] if metrics.get("accuracy_before") else []
    evals += [(c["step"], c["accuracy"]) for c in log if "accuracy" in c] + [(metrics["steps"], metrics["accuracy"])]
    return dict(name=name, seed=seed, folder=str(folder), metrics=metrics, evals=evals,
                curve=[(c["step"], c["loss"]) for c in log if "loss" in c],
                wall_s=float((folder / "wall_s").read_text()))


def verdict(label: str, a: list, b: list, higher: bool = True, strict: bool = False, digits: int = 3) -> str:
    """'label: a vs b -> holds / does not hold' with means ± std; holds when the means order as claimed
    (`strict`: a claim of 'better', which equal means do not meet)."""
    a, b = [x for x in a if not math.isnan(x)], [x for x in b if not math.isnan(x)]
    if not a or not b:
        return f"  {label}: not measurable (a configuration never got there)"
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    if strict and ma == mb:
        return f"  {label}: {pm(a, 1, digits)} vs {pm(b, 1, digits)} -> does not hold (equal)"
    ok = ma >= mb if higher else ma <= mb
    return f"  {label}: {pm(a, 1, digits)} vs {pm(b, 1, digits)} -> {'holds' if ok else 'does not hold'}"
