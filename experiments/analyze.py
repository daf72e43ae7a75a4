"""
The papers' weight-update analysis: how a fine-tuned model's weights W differ from the base's W0.

    python -m experiments.analyze out/base-tiny-900 out/lift-synth-target             # a table per module type
    python -m experiments.analyze smollm2-135m out/lift-synth-target --json delta.json  # and every matrix to JSON

Per target matrix (q_proj ... down_proj of every layer), with ΔW = W - W0 in fp32:
  rank          rank of ΔW by torch.linalg.matrix_rank at 10x its default tolerance (LIFT, App. G.3)
  eff_rank      effective rank: exp of the entropy of ΔW's normalised singular values (Roy & Vetterli)
  norm_rank     singular values of ΔW >= 1e-2, over rank(W0) (HyperAdapt's rank analysis)
  alignment     top-k right-singular-subspace alignment of W with W0, k = 128 or the smaller dimension:
                d = (1/k) sum_i sum_j (v'_i . v_j)^2 (LIFT, App. H.1, Eq. (7)-(8)); 1 = same subspace
  spec_change   ||W||_2 - ||W0||_2
  mean_abs      mean |ΔW|
  changed       the share of W's entries that differ from W0 (exactly)
The table averages each over the layers, per module type.
"""
import argparse
import json
import os
import sys

import torch

from eval_math import Parser
from experiments import check_counts, check_model, command_line
from targets import LINEAR_NAMES, find_linears
from weights import load


def delta_metrics(W0: torch.Tensor, W: torch.Tensor, k: int = 128) -> dict:
    """The measures above for one n_out x n_in matrix before (W0) and after (W) fine-tuning."""
    if W0.shape != W.shape:
        raise ValueError(f"W0 is {tuple(W0.shape)} but W is {tuple(W.shape)}: not the same matrix")
    W0, W = W0.detach().float(), W.detach().float()
    D = W - W0
    s = torch.linalg.svdvals(D)
    tol = 10 * max(D.shape) * torch.finfo(D.dtype).eps  # 10x matrix_rank's default rtol
    rank = int(torch.linalg.matrix_rank(D, rtol=tol)) if s[0] > 0 else 0
    p = s / s.sum() if s[0] > 0 else s
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    k = min(k, *W.shape)
    V0 = torch.linalg.svd(W0, full_matrices=False).Vh[:k]  # top-k right singular vectors, as rows
    V = torch.linalg.svd(W, full_matrices=False).Vh[:k]
    return {
        "shape": list(W.shape),
        "rank": rank,
        "eff_rank": float(entropy.exp()) if rank else 0.0,
        "norm_rank": int((s >= 1e-2).sum()) / max(1, int(torch.linalg.matrix_rank(W0))),
        "alignment": float((V @ V0.T).pow(2).sum() / k),  # Eq. (7)-(8)
        "spec_change": float(torch.linalg.matrix_norm(W, 2) - torch.linalg.matrix_norm(W0, 2)),
        "mean_abs": float(D.abs().mean()),
        "changed": float((W != W0).float().mean()),
    }


def compare(base, tuned, targets=LINEAR_NAMES, k: int = 128) -> dict:
    """{matrix name: delta_metrics} over the target Linears two models share."""
    before = dict(find_linears(base, targets))
    after = dict(find_linears(tuned, targets))
    if set(before) != set(after):
        raise ValueError(f"the models have other target matrices: {sorted(set(before) ^ set(after))[:4]}")
    out = {}
    for i, (name, lin) in enumerate(before.items()):
        out[name] = delta_metrics(lin.weight, after[name].weight, k)
        print(f"  {i + 1}/{len(before)} {name}", end="\r", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return out


def print_table(per_matrix: dict, file=None):
    """Each measure averaged over the layers, one row per module type."""
    keys = ("rank", "eff_rank", "norm_rank", "alignment", "spec_change", "mean_abs", "changed")
    print(f"{'module':<11}{'n':>4}" + "".join(f"{k:>13}" for k in keys), file=file)
    for kind in LINEAR_NAMES:
        rows = [m for name, m in per_matrix.items() if name.split(".")[-1] == kind]
        if rows:
            means = [sum(r[k] for r in rows) / len(rows) for k in keys]
            print(f"{kind:<11}{len(rows):>4}" + "".join(f"{v:>13.4g}" for v in means), file=file)


def main(argv=None):
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", help="the model before fine-tuning: a folder, a .gguf file or a name weights.load knows")
    ap.add_argument("tuned", help="the model after fine-tuning (a merged output folder of train.py)")
    ap.add_argument("--json", default=None, help="write every matrix's measures here")
    ap.add_argument("--top-k", type=int, default=128, help="singular vectors in the alignment score")
    args = ap.parse_args(argv)
    check_counts(args, top_k=(1, 65536))
    check_model("base", args.base)
    check_model("tuned", args.tuned)
    if args.json and (os.path.isdir(args.json) or not os.path.isdir(os.path.dirname(args.json) or ".")):
        raise ValueError(f"--json {args.json} is not allowed: a file in an existing folder")
    per_matrix = compare(load(args.base)[0], load(args.tuned)[0], k=args.top_k)
    print(f"ΔW = W - W0, {args.tuned} against {args.base}; averages over layers")
    print_table(per_matrix)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"base": args.base, "tuned": args.tuned, "top_k": args.top_k, "matrices": per_matrix}, f,
                      indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    return per_matrix


def cli(argv=None) -> int:
    return command_line(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
