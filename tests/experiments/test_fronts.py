"""experiments/fronts.py: the held-out loss per solution token and its (paired) standard error against
numpy, the per-problem sums against the model's own batch loss, and verdicts at equal learning on
fronts built so that comparing single points would say the opposite."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import eval_math
import forgetting
import math_data
import train
from conftest import tiny_model
from experiments import fronts
from tokenizer import Tokenizer
from weights import load


def test_loss_per_token_and_paired_error_against_numpy():
    g = np.random.default_rng(0)
    count = g.integers(5, 60, 200).astype(float)
    hard = g.gamma(2.0, 0.5, 200)  # per-problem difficulty both runs share
    nll_a = count * (hard + g.normal(0, 0.05, 200))
    nll_b = count * (hard + 0.03 + g.normal(0, 0.05, 200))
    L, se = fronts.loss_per_token(torch.tensor(nll_a), torch.tensor(count))
    assert L == pytest.approx(nll_a.sum() / count.sum(), rel=1e-12)
    resid = nll_a - L * count  # the ratio estimator's standard error, written out
    assert se == pytest.approx(math.sqrt((resid ** 2).sum() / (200 * 199)) / count.mean(), rel=1e-9)
    d, se_d = fronts.paired_difference(torch.tensor(nll_a), torch.tensor(nll_b), torch.tensor(count))
    assert d == pytest.approx((nll_a - nll_b).sum() / count.sum(), rel=1e-9)
    _, se_b = fronts.loss_per_token(torch.tensor(nll_b), torch.tensor(count))
    assert se_d < 0.25 * math.hypot(se, se_b)  # pairing cancels what both find hard
    assert abs(d + 0.03) < 3 * se_d


def test_solution_sums_are_the_models_training_loss():
    """sum(nll) / sum(count) over held-out examples = the model's token-mean loss on them in one batch;
    prompts carry no loss."""
    model, tok = tiny_model(vocab=264), Tokenizer.bytes()
    problems = math_data.load_problems("synth-target", "test", limit=6)
    ex = fronts.held_out_examples(problems, tok, seq_len=96)
    nll, count = fronts.solution_nll(model, ex)
    x, y = train.collate(ex, tok.pad_id, "cpu")
    with torch.no_grad():  # the reference: full logits and plain cross-entropy, not the model's fused loss
        ref = torch.nn.functional.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), ignore_index=-100,
                                                reduction="none").view(y.shape).sum(1)
    torch.testing.assert_close(nll, ref.double(), rtol=1e-5, atol=1e-4)
    assert count.tolist() == [train.n_targets([e]) for e in ex]
    assert all(len(eval_math.training_ids(tok, p)[1]) == c for p, c in zip(problems, count.tolist()))


def test_a_point_comparison_and_the_front_comparison_disagree():
    """a's only point learned little and drifted little, b's learned much and drifted much: comparing
    those points says 'a forgets less'. Along the fronts, at equal learning, b drifts less: the
    verdict says a does not forget less; and b learns more at equal drift."""
    a = [(1.0, 0.5), (2.0, 1.5), (3.0, 3.0)]
    b = [(1.0, 0.3), (2.0, 1.0), (3.0, 2.0)]
    pts = [{"method": m, "seed": s, "lr": lr, "learning": x + 0.01 * s, "kl": y + 0.01 * s}
           for m, front in (("a", a), ("b", b)) for s in (0, 1) for lr, (x, y) in zip((1e-4, 3e-4, 1e-3), front)]
    v = fronts.verdicts(pts, "a", "b", seeds=(0, 1))
    assert v["forgets_less"]["claim"] == "does not hold" and v["forgets_less"]["gap"] > 0
    assert v["learns_more"]["claim"] == "does not hold"
    v = fronts.verdicts(pts, "b", "a", seeds=(0, 1))
    assert v["forgets_less"]["claim"] == "holds" and v["learns_more"]["claim"] == "holds"
    assert v["best"]["b"]["lr"] == 1e-3
    # fronts that do not overlap in learning are never compared; seeds that disagree are no finding
    far = [{**p, "learning": p["learning"] + 10} for p in pts if p["method"] == "b"]
    assert fronts.verdicts([p for p in pts if p["method"] == "a"] + far, "a", "b", (0, 1))[
        "forgets_less"]["verdict"].startswith("not comparable")
    mixed = [{**p, "kl": p["kl"] + (0.5 if p["seed"] == 0 else -0.5)} if p["method"] == "b" else p for p in pts]
    assert fronts.verdicts(mixed, "a", "b", (0, 1))["forgets_less"]["claim"] == "cannot be told apart here"


def test_interpolation_never_extrapolates():
    front = [(3.0, 30.0), (1.0, 10.0), (2.0, 25.0)]
    assert fronts.interpolate(front, 1.5) == pytest.approx(17.5)
    assert fronts.interpolate(front, 0.5) is None and fronts.interpolate(front, 3.5) is None


def test_diverged_runs_are_named_and_left_out():
    base = {"held_out": 1.0}
    ok = {"held_out": 0.9, "agreement": 0.9}
    assert fronts.diverged(ok, base, 1.2) is None
    assert "above the base" in fronts.diverged({"held_out": 1.1, "agreement": 0.9}, base, 1.2)
    assert fronts.diverged(ok, base, math.nan) == "not finite"
    assert "agreement" in fronts.diverged({"held_out": 0.9, "agreement": 0.3}, base, 1.2)
    pts = [{"method": "a", "seed": 0, "lr": 1.0, "learning": 5.0, "kl": 1.0, "diverged": "not finite"},
           {"method": "a", "seed": 0, "lr": 0.1, "learning": 1.0, "kl": 1.0}]
    assert fronts.best_run(pts, "a")["lr"] == 0.1


def test_measure_on_a_tiny_model_zero_drift_for_the_base():
    model, tok = tiny_model(vocab=264), Tokenizer.bytes()
    texts = forgetting.self_text(model, tok, n=4, max_new_tokens=8)
    ref = forgetting.drift_reference(model, tok, texts)
    ex = fronts.held_out_examples(math_data.load_problems("synth-target", "test", limit=4), tok, seq_len=96)
    p = fronts.measure(model, tok, ex, texts, ref)
    assert p["kl"] == pytest.approx(0, abs=1e-6) and p["agreement"] == 1.0
    assert p["held_out"] > 0 and p["held_out_se"] > 0 and len(p["nll"]) == 4


def test_the_sweep_end_to_end_on_a_small_model(small_dir, tmp_path, capsys):
    """Two methods at lrs around their papers', one seed, a few steps on synthetic problems: every run is
    a cached point with its held-out loss, paired fall and drift; the grid brackets the most learning;
    LIFT's interval is scaled to refresh within the run; a second call re-reads everything."""
    import argparse
    data = tmp_path / "train.jsonl"  # GSM8K-shaped rows, few and short: the runs cost little
    data.write_text("".join(json.dumps({"question": f"What is {i} + {i % 5}?", "answer": f"{i} + {i % 5} = "
                                        f"{i + i % 5}.\n#### {i + i % 5}"}) + "\n" for i in range(16)))
    args = argparse.Namespace(model=str(small_dir), base=str(small_dir), data=str(data), held_out=str(data),
                              held_out_limit=8, seeds=1, only_seed=None, steps=3, batch_size=4, seq_len=320, threads=1,
                              log_every=1, forget_prompts=4, out=str(tmp_path / "claims"),
                              figures=str(tmp_path / "figs"), configs=["lora r8", "lift r8"])
    out = fronts.claim_fronts(args)
    pts = out["points"]
    ex = fronts.held_out_examples(math_data.load_problems(str(data), limit=8), Tokenizer.bytes(), "lift-authors", 320)
    for m in ("lora r8", "lift r8"):
        mine = sorted((p for p in pts if p["method"] == m), key=lambda p: p["lr"])
        assert len(mine) >= 3
        ok = [p for p in mine if not p["diverged"]]
        assert ok  # (every lr diverging would leave no front)
        best = max(ok, key=lambda p: p["learning"])  # not at an edge the sweep could have extended past
        assert best is not mine[-1] or len(mine) == 5
        assert best["learning"] > 2 * best["delta_se"] > 0  # training on these problems lowers their loss
        for p in mine:  # the point's held-out loss, from its own saved model
            tuned, _ = load(p["folder"])
            nll, count = fronts.solution_nll(tuned, ex)
            assert p["held_out"] == pytest.approx(float(nll.sum() / count.sum()), rel=1e-6)
    printed = capsys.readouterr().out
    assert "LIFT's mask refreshed every 1 steps" in printed and "judged at equal learning" in printed
    lift_run = json.loads((Path(next(p["folder"] for p in pts if p["method"] == "lift r8")) / "metrics.json").read_text())
    assert lift_run["settings"]["interval"] == 1
    again = fronts.claim_fronts(args)
    assert [p["held_out"] for p in again["points"]] == [p["held_out"] for p in pts]
    assert "reusing" in capsys.readouterr().out
    assert (tmp_path / "claims" / "fronts.json").exists()
