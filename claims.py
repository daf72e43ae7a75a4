"""
The papers' claims, measured at the scale this repository runs at: one command per claim, each
prints a table (mean ± std over seeds) and writes out/claims/<claim>.json.

    python claims.py noise        # LIFT §4, Fig. 2: noise on Principal Weights hurts far more
    python claims.py spectral     # LIFT App. C.1-C.2: ... and raises the spectral norm more
    python claims.py overlap      # LIFT App. G.9: LIFT's and the magnitude mask overlap little
    python claims.py compare      # matched budgets: LIFT §7.1 / §7.2 (G.3), HyperAdapt Fig. 1 /
                                  # Table 2, LoRA-SB Fig. 2, on one set of runs
    python claims.py lorasb-init  # LoRA-SB Table 4: first-step init vs truncated SVD of noise
    python claims.py rows         # RoCoFT Fig. 5: which rows matters less than the seed
    python claims.py table --data gsm8k/train.jsonl --eval-dir llm-adapters/   # the papers' Table 2
                                  # on SmolLM2-135M: GSM8K train -> the seven arithmetic test sets
    python claims.py plots        # PNGs of compare's (and table's) runs (needs matplotlib)

--model tiny (the default) is the built-in base, pretrained on first use as train.py does;
noise / spectral / overlap also take anything model.load reads (smollm2-135m, a folder, a .gguf).
The training claims run train.py once per method and seed into out/claims/runs/ and reuse a run
whose command has not changed, so a second call only re-reads them.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import analyze
import eval_math
import lift
import train
from targets import LINEAR_NAMES, find_linears
from weights import load

SELECTS = ("principal", "magnitude", "random")  # LIFT's Principal Weights and the two baselines of Fig. 2


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
    f.with_suffix(".tmp").write_text(json.dumps(result, indent=1))
    f.with_suffix(".tmp").replace(f)
    print(f"\nwrote {f}")
    return f


def base_path(args) -> str:
    """--model: 'tiny' is the built-in base (pretrained once, cached under out/ by train.py)."""
    if args.model != "tiny":
        return args.model
    run, _, _ = train.parse_args(["--method", "full", "--pretrain-steps", str(args.pretrain_steps)])
    return train.builtin_base(run)

# -----------------------------------------------------------------------------
# held-out text, for the claims that perturb a model without training it

# Encyclopaedic sentences, none the model was tuned on; the last word is the one Fig. 2b asks for.
FACTS = (
    ("Madrid is located in the country of", " Spain"), ("The capital of France is", " Paris"),
    ("The Eiffel Tower is in the city of", " Paris"), ("Tokyo is the capital of", " Japan"),
    ("The largest ocean on Earth is the", " Pacific"), ("Water is made of hydrogen and", " oxygen"),
    ("The planet closest to the Sun is", " Mercury"), ("The Great Wall is in", " China"),
    ("Berlin is the capital of", " Germany"), ("The opposite of hot is", " cold"),
    ("A week has seven", " days"), ("The Statue of Liberty is in New", " York"),
    ("Rome is the capital of", " Italy"), ("The chemical symbol for gold is", " Au"),
    ("Bees make", " honey"), ("The first month of the year is", " January"),
)


def held_out(tok, real: bool, n: int) -> tuple[list[dict], list[dict]]:
    """(texts for the loss, prompt/answer rows for the answer probability) as token rows
    {prompt, text}. A real model reads the FACTS; the built-in one, test problems of its own
    domain (synth-source), whose answer is the first digit of the step's result."""
    if real:
        ids = [tok.encode(p + a + ".", bos=True) for p, a in FACTS]
        texts = [{"prompt": t[:1], "text": t[1:]} for t in ids]  # every token after the first
        answers = [{"prompt": tok.encode(p, bos=True), "text": tok.encode(a)[:1]} for p, a in FACTS]
        return texts, answers
    problems = eval_math.synthetic_problems("source", "test", n)  # what the built-in base was trained on
    # the built-in model never learned to write questions (their tokens are masked in training):
    # its held-out text is the worked solutions, given the questions
    texts = [{"prompt": tok.encode(eval_math.format_prompt(p), bos=True),
              "text": tok.encode(eval_math.format_target(p))} for p in problems]
    answers = []
    for p in problems:  # P(the result's first digit | the question and the worked step up to "= ")
        sol = eval_math.format_target(p)
        cut = sol.index("= ") + 2
        answers.append({"prompt": tok.encode(eval_math.format_prompt(p) + sol[:cut], bos=True),
                        "text": tok.encode(sol[cut:])[:1]})
    return texts, answers


def text_loss(model, tok, texts) -> float:
    """Mean next-token cross-entropy over every text token."""
    nll = [-lp.gather(1, y[:, None]).squeeze(1) for lp, y in eval_math.text_logprobs(model, tok, texts)]
    return float(torch.cat(nll).mean())


def answer_prob(model, tok, rows) -> float:
    """Mean probability of each row's first text token after its prompt (LIFT Fig. 2b's P("Spain"))."""
    probs, i = [], 0
    for lp, y in eval_math.text_logprobs(model, tok, rows, batch_size=16):
        # text_logprobs yields every text token of a batch, row after row; take each row's first
        for r in rows[i:i + 16]:
            probs.append(float(lp[0, y[0]].exp()))
            lp, y = lp[len(r["text"]):], y[len(r["text"]):]
        i += 16
    return statistics.fmean(probs)


def target_weights(model) -> list[tuple[str, torch.Tensor]]:
    return [(name, lin.weight) for name, lin in find_linears(model, LINEAR_NAMES)]


def pick(W, select: str, k: int, rank: int, seed: int) -> torch.Tensor:
    """The k entries of W a selection rule takes (LIFT's principal, |W|, or uniformly at random)."""
    return lift.top_k_mask(lift.selection_scores(W, select, rank, seed=seed), k)

# -----------------------------------------------------------------------------
# LIFT §4, Fig. 2: Gaussian noise of a fixed scale on k selected entries of every target matrix


def claim_noise(args):
    """Loss on held-out text (and the answer's probability) after N(0, sigma^2) noise on the top-k
    entries of each rule, k = the LoRA-r budget r (n_in + n_out) per matrix (LIFT's budget)."""
    path = base_path(args)
    model, tok = load(path)
    real = not train.is_tiny(path)
    texts, answers = held_out(tok, real, args.texts)
    weights = target_weights(model)
    originals = [w.detach().clone() for _, w in weights]
    base = {"loss": text_loss(model, tok, texts), "answer_prob": answer_prob(model, tok, answers)}
    w_std = statistics.fmean(float(w.detach().float().std()) for _, w in weights)
    print(f"base model: loss {base['loss']:.4f}, answer probability {base['answer_prob']:.4f}; noise sigma "
          f"{args.sigma} (the target weights' mean std is {w_std:.4f}); {len(weights)} matrices, {args.seeds} seeds")
    rows = []
    for rank in args.ranks:
        masks = {sel: [pick(w, sel, lift.budget(*w.shape, rank), rank, 0) for _, w in weights]
                 for sel in ("principal", "magnitude")}
        share = sum(int(m.sum()) for m in masks["principal"]) / sum(w.numel() for _, w in weights)
        for sel in SELECTS:
            losses, probs = [], []
            for seed in range(args.seeds):
                g = torch.Generator().manual_seed(1000 * seed + rank)
                with torch.no_grad():
                    for i, (_, w) in enumerate(weights):
                        m = masks[sel][i] if sel != "random" else pick(w, "random", lift.budget(*w.shape, rank),
                                                                         rank, seed * 7919 + i)
                        noise = torch.randn(int(m.sum()), generator=g) * args.sigma
                        w[m] += noise.to(w.dtype)
                losses.append(text_loss(model, tok, texts))
                probs.append(answer_prob(model, tok, answers))
                with torch.no_grad():
                    for (_, w), w0 in zip(weights, originals):
                        w.copy_(w0)
            rows.append(dict(rank=rank, share=share, select=sel, loss=losses, answer_prob=probs))
            print(f"  r={rank:<4} {sel:<10} loss {pm(losses, digits=4)}", flush=True)
    print(f"\nLIFT §4 / Fig. 2 -- held-out loss after noise N(0, {args.sigma}^2) on the k = r(n_in + n_out) "
          f"entries of each rule, {args.seeds} seeds (base loss {base['loss']:.4f}):")
    print(f"{'r':>5}{'entries':>9}" + "".join(f"{s + ' loss':>22}" for s in SELECTS)
          + "".join(f"{s[:4] + ' P(answer)':>20}" for s in SELECTS))
    for rank in args.ranks:
        rs = {r["select"]: r for r in rows if r["rank"] == rank}
        print(f"{rank:>5}{100 * rs['principal']['share']:>8.2f}%" + "".join(f"{pm(rs[s]['loss'], digits=4):>22}"
                                                                           for s in SELECTS)
              + "".join(f"{pm(rs[s]['answer_prob'], digits=3):>20}" for s in SELECTS))
    write_json(args, "noise", {"claim": "LIFT §4, Fig. 2", "model": args.model, "sigma": args.sigma,
                               "weight_std": w_std, "seeds": args.seeds, "base": base, "rows": rows})
    return rows

# -----------------------------------------------------------------------------
# LIFT App. C.1 (random matrices) and C.2 (the model's): noise of equal Frobenius norm, spectral norm


def spectral_rise(W, mask, scale: float, seed: int) -> tuple[float, float]:
    """(relative rise of ||W||_2, of ||W||_F) after noise of Frobenius norm scale * ||W||_F on the
    entries of `mask`: the same noise energy whichever rule picked them."""
    W = W.detach().float()
    k = int(mask.sum())
    noise = torch.randn(k, generator=torch.Generator().manual_seed(seed))
    noise *= scale * float(torch.linalg.matrix_norm(W)) / float(noise.norm())
    Wn = W.clone()
    Wn[mask] += noise
    s0, s1 = torch.linalg.matrix_norm(W, 2), torch.linalg.matrix_norm(Wn, 2)
    f0, f1 = torch.linalg.matrix_norm(W), torch.linalg.matrix_norm(Wn)
    return float(s1 / s0 - 1), float(f1 / f0 - 1)


def claim_spectral(args):
    """Random n x n Gaussian matrices (C.1, Fig. 8) and the model's target matrices (C.2, Fig. 9):
    rise of the spectral and Frobenius norms after equal-energy noise on each rule's k entries."""
    rows = []

    def add(where, rank, matrices, seeds):
        """Each rule's k = r(n_in + n_out) entries of each matrix, noised with each seed."""
        rises = {sel: [] for sel in SELECTS}
        for i, W in enumerate(matrices):
            k = lift.budget(*W.shape, rank)
            fixed = {sel: pick(W, sel, k, rank, 0) for sel in ("principal", "magnitude")}
            for seed in seeds:
                for sel in SELECTS:
                    m = fixed[sel] if sel in fixed else pick(W, "random", k, rank, 1000 * seed + i)
                    rises[sel].append(spectral_rise(W, m, args.scale, 1000 * seed + i))
        for sel in SELECTS:
            rows.append(dict(where=where, rank=rank, select=sel, spectral=[r[0] for r in rises[sel]],
                             frobenius=[r[1] for r in rises[sel]]))
    for n in args.sizes:  # a fresh random matrix per seed, N(0, 1/n) entries
        matrices = [torch.randn(n, n, generator=torch.Generator().manual_seed(seed)) / n ** 0.5
                    for seed in range(args.seeds)]
        add(f"random {n}x{n}", max(1, n // 32), matrices, [0])
    model, _ = load(base_path(args))
    weights = target_weights(model)
    for kind in LINEAR_NAMES:
        ws = [w for name, w in weights if name.endswith(kind)]
        if ws:
            add(f"{args.model} {kind}", args.rank, ws, range(args.seeds))
    print(f"\nLIFT App. C -- rise of ||W||_2 and ||W||_F (in % of the original) after noise of Frobenius norm "
          f"{args.scale} ||W||_F on the k = r(n_in + n_out) entries each rule picks; {args.seeds} seeds"
          f"{' x layers' if weights else ''}:")
    print(f"{'matrix':<28}{'r':>4}" + "".join(f"{s + ' ||.||_2':>22}" for s in SELECTS)
          + "".join(f"{s[:4] + ' ||.||_F':>18}" for s in SELECTS))
    for where in dict.fromkeys(r["where"] for r in rows):
        rs = {r["select"]: r for r in rows if r["where"] == where}
        print(f"{where:<28}{rs['principal']['rank']:>4}" + "".join(f"{pm(rs[s]['spectral'], 100):>22}" for s in SELECTS)
              + "".join(f"{pm(rs[s]['frobenius'], 100):>18}" for s in SELECTS))
    write_json(args, "spectral", {"claim": "LIFT App. C.1-C.2", "model": args.model, "scale": args.scale,
                                  "seeds": args.seeds, "rows": rows})
    return rows

# -----------------------------------------------------------------------------
# LIFT App. G.9: how much of LIFT's mask is simply the largest weights


def claim_overlap(args):
    """|LIFT mask ∩ magnitude mask| / k per module type (mean ± std over layers), at the budget of
    rank args.rank and LRA ranks args.lra_ranks. Deterministic: exact SVD, no seeds."""
    model, _ = load(base_path(args))
    weights = target_weights(model)
    rows = []
    for kind in LINEAR_NAMES:
        ws = [w for name, w in weights if name.endswith(kind)]
        for lra in args.lra_ranks:
            overlaps = []
            for w in ws:
                k = lift.budget(*w.shape, args.rank)
                p, m = pick(w, "principal", k, lra, 0), pick(w, "magnitude", k, lra, 0)
                overlaps.append(int((p & m).sum()) / k)
            if ws:
                rows.append(dict(module=kind, lra_rank=lra, overlap=overlaps))
    print(f"\nLIFT App. G.9 -- share of LIFT's k = {args.rank}(n_in + n_out) entries that are also the k largest "
          f"|W| ({args.model}), mean ± std over layers, by LRA rank:")
    print(f"{'module':<11}" + "".join(f"{'LRA r=' + str(r):>16}" for r in args.lra_ranks))
    for kind in dict.fromkeys(r["module"] for r in rows):
        print(f"{kind:<11}" + "".join(f"{pm(r['overlap'], 100, 1) + '%':>16}" for r in rows if r["module"] == kind))
    write_json(args, "overlap", {"claim": "LIFT App. G.9", "model": args.model, "rank": args.rank, "rows": rows})
    return rows

# -----------------------------------------------------------------------------
# the training claims: train.py runs, one per configuration and seed, reused while unchanged


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
    argv += getattr(args, "train_flags", [])
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
    held = held_out(tok, not train.is_tiny(args.base), args.texts)[0]
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
        raise ValueError(f"{f} does not exist: run `python claims.py compare` first (or `python claims.py table`)")
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
# the papers' Table 2 on real data: GSM8K train -> the seven LLM-Adapters arithmetic test sets

# The columns of LIFT Table 2, RoCoFT Table 3 and HyperAdapt's arithmetic table (LLM-Adapters' test
# sets, `dataset/<name>/test.json` in its repository), in the papers' order
TABLE_SETS = ("MultiArith", "gsm8k", "AddSub", "AQuA", "SingleEq", "SVAMP", "mawps")
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
    return [str(eval_math._find_named(name, "test", root)) for name in TABLE_SETS]


def close(a: list, b: list, points: float = 1.0) -> tuple[bool, float]:
    """'a is about b': |mean(a) - mean(b)| within max(`points`, 2 x the larger std); (holds, gap)."""
    gap = statistics.fmean(a) - statistics.fmean(b)
    return abs(gap) <= max(points, 2 * max(mean_std(a)[1], mean_std(b)[1])), gap


def claim_table(args):
    """Every method fine-tunes --model on GSM8K train problems and is scored on the seven arithmetic
    test sets (the same first --eval-limit problems of each, LLM-Adapters' answer rule); prints the
    papers' Table 2 layout (a row per method, a column per set, their average, mean ± std over the
    seeds, trainable %), the base model's row, the forgetting (drift on the base's own text) and
    the verdict on each paper's claim. Writes out/claims/table.json (and figures/table.png)."""
    args.eval_data = ",".join(table_sets(args.eval_dir))
    args.train_flags = ["--protocol", "llm-adapters", "--num-beams", str(args.num_beams), "--seq-len", str(args.seq_len)]
    args.base = base_path(args)
    beams = eval_math.decoding("llm-adapters", args.num_beams)
    args.decoding = "greedy" if beams == 1 else f"beam search, {beams} beams"
    seeds = range(args.seeds) if args.only_seed is None else [args.only_seed]
    configs = [c for c in TABLE if c[0] in args.configs]
    n_runs, t0 = len(configs) * len(seeds), time.time()
    table = {}
    for i, (name, flags) in enumerate(configs):
        for seed in seeds:
            done = sum(len(v) for v in table.values())
            if done:
                print(f"[table] run {done + 1}/{n_runs}; {time.time() - t0:.0f}s so far", flush=True)
            table.setdefault(name, []).append(run_train(args, name, flags, seed))
    first = next(iter(table.values()))[0]["metrics"]
    sets = [n.lower() for n in TABLE_SETS]
    before = first.get("accuracy_before") or {}

    def avg(acc):
        return statistics.fmean(acc[s] for s in sets)
    w = max(14, *(len(n) + 2 for n in table))
    head = (f"{'method':<{w}}{'trainable':>13}{'%':>8}" + "".join(f"{n:>14}" for n in TABLE_SETS) + f"{'Avg':>14}"
            + f"{'loss rise':>18}{'KL(base‖tuned)':>20}{'agreement':>16}{'wall s':>8}")
    print(f"\nTable 2 at laptop scale: {args.model}, {args.steps} steps of batch {args.batch_size} on {args.data}, "
          f"{len(seeds)} seed(s); accuracy % on the first {args.eval_limit} problems of each set, LLM-Adapters' "
          f"scoring, {args.decoding}, {args.max_new_tokens} new tokens at most")
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
                               "decoding": args.decoding,
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

# -----------------------------------------------------------------------------
# command line

CLAIMS = {"noise": claim_noise, "spectral": claim_spectral, "overlap": claim_overlap, "compare": claim_compare,
          "lorasb-init": claim_lorasb_init, "rows": claim_rows, "plots": claim_plots, "table": claim_table}


def ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be a positive integer")
    return values


def build_parser():
    p = train.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("claim", choices=list(CLAIMS), help="which claim to measure")
    p.add_argument("--model", default=None, help="tiny (the built-in base; table: smollm2-135m), smollm2-135m, a folder "
                                                 "or a .gguf")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..n-1; the tables show mean ± std (table: 2, else 3)")
    p.add_argument("--out", default="out/claims", help="where the JSON results and the runs go")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    p.add_argument("--pretrain-steps", type=int, default=train.BUILTIN_PRETRAIN_STEPS,
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
    g.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run (compare 150, table 60)")
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
                   help="beams in evaluation (the papers: 4; 1 = greedy, a quarter of the time on a CPU)")
    g.add_argument("--seq-len", type=int, default=320, help="training examples truncated to this many tokens")
    g.add_argument("--only-seed", type=int, default=None,
                   help="run just this seed (to share the seeds among processes; a later call without it reads them all)")
    g.add_argument("--level", type=float, default=0.5,
                   help="compare: the target accuracy at which the source kept is read off each path")
    g.add_argument("--log-every", type=int, default=10, help="training-loss curve resolution")
    g.add_argument("--figures", default="figures", help="plots: where the PNGs go")
    return p


# What a flag left unset means, per claim: the training claims on the built-in task, and the table
CLAIM_DEFAULTS = {
    "table": dict(model="smollm2-135m", seeds=2, steps=60, batch_size=4, data="gsm8k", eval_limit=20, eval_every=0,
                  max_new_tokens=256, configs=",".join(c for c, _ in TABLE)),
    None: dict(model="tiny", seeds=3, steps=train.BUILTIN["max_steps"], batch_size=train.BUILTIN["batch_size"],
               data="synth-target", eval_limit=100, eval_every=15, configs=",".join(c for c, _ in COMPARE)),
}


def main(argv=None):
    args = build_parser().parse_args(argv)
    for k, v in CLAIM_DEFAULTS["table" if args.claim == "table" else None].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for flag in ("seeds", "threads", "texts", "steps", "log_every", "rank", "pretrain_steps", "batch_size",
                 "eval_limit", "num_beams", "seq_len"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is not allowed: it must be >= 1")
    if not (math.isfinite(args.sigma) and args.sigma > 0) or not (math.isfinite(args.scale) and args.scale > 0):
        raise ValueError(f"--sigma {args.sigma} / --scale {args.scale}: both must be positive numbers")
    if not 0 < args.level <= 1 or args.eval_every < 0:
        raise ValueError(f"--level {args.level} must be in (0, 1] and --eval-every {args.eval_every} >= 0")
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    known = dict(TABLE if args.claim == "table" else COMPARE)
    unknown = [c for c in args.configs if c not in known]
    if unknown:
        raise ValueError(f"unknown --configs {unknown[0]!r}; known: {', '.join(known)}")
    if args.only_seed is not None and not 0 <= args.only_seed < args.seeds:
        raise ValueError(f"--only-seed {args.only_seed} is not one of the seeds 0..{args.seeds - 1}")
    if args.claim in ("compare", "lorasb-init", "rows") and args.model != "tiny" and not train.is_tiny(args.model):
        print(f"note: training claims on {args.model} run {len(COMPARE)} x {args.seeds} fine-tunings of it")
    if args.claim == "table":
        print(f"table: {len(args.configs)} methods x {1 if args.only_seed is not None else args.seeds} seed(s) of "
              f"{args.steps} steps on {args.model}, each evaluated on {len(TABLE_SETS)} sets x {args.eval_limit} problems")
    torch.set_num_threads(args.threads)
    return CLAIMS[args.claim](args)


def cli(argv=None) -> int:
    try:
        main(argv)
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
