"""
LIFT's claims about Principal Weights, measured by perturbing a model without training it:

    python -m experiments.claims noise        # LIFT §4, Fig. 2: noise on Principal Weights hurts far more
    python -m experiments.claims spectral     # LIFT App. C.1-C.2: ... and raises the spectral norm more
    python -m experiments.claims overlap      # LIFT App. G.9: LIFT's and the magnitude mask overlap little

Each compares the three selection rules of Fig. 2 (SELECTS) at equal budgets k = r(n_in + n_out).
"""
import statistics

import torch

import eval_math
import lift
import math_data
from cli import is_tiny
from forgetting import text_logprobs
from experiments.runs import base_path, pm, write_json
from targets import LINEAR_NAMES, find_linears
from weights import load

SELECTS = ("principal", "magnitude", "random")  # LIFT's Principal Weights and the two baselines of Fig. 2

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
    problems = math_data.synthetic_problems("source", "test", n)  # what the built-in base was trained on
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
    nll = [-lp.gather(1, y[:, None]).squeeze(1) for lp, y in text_logprobs(model, tok, texts)]
    return float(torch.cat(nll).mean())


def answer_prob(model, tok, rows) -> float:
    """Mean probability of each row's first text token after its prompt (LIFT Fig. 2b's P("Spain"))."""
    probs, i = [], 0
    for lp, y in text_logprobs(model, tok, rows, batch_size=16):
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
    real = not is_tiny(path)
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
