"""perturb.py: LIFT's noise / spectral / overlap claims through `claims.py` on the small saved model,
against answers known without the code: noise leaves the saved model as it was, k entries are exactly
k, equal-energy noise, and a full-rank approximation makes the LIFT mask the magnitude mask."""
import json
import re

import pytest
import torch

from conftest import _claims
from experiments import perturb
from weights import load


def test_claims_noise_spectral_overlap_on_known_answers(small_dir, tmp_path, capsys):
    """Noise leaves the model as it was; equal-energy noise on each rule's k entries; at a full-rank
    LRA the LIFT mask IS the magnitude mask (overlap 1), and the k entries are exactly k."""
    model, _ = load(str(small_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = _claims(tmp_path, "noise", "--model", str(small_dir), "--ranks", "1,2", "--seeds", "2", "--sigma", "0.5")
    out = capsys.readouterr().out
    assert re.search(r"^\s+1\s+[\d.]+%\s+[\d.]+ ± [\d.]+", out, re.M) and "base loss" in out
    assert {(r["rank"], r["select"]) for r in rows} == {(k, s) for k in (1, 2) for s in perturb.SELECTS}
    assert all(len(r["loss"]) == 2 and r["loss"][0] != r["loss"][1] for r in rows)   # two seeds, two draws
    saved = json.loads((tmp_path / "claims" / "noise.json").read_text())
    assert saved["base"]["loss"] > 0 and len(saved["rows"]) == 6
    model2, _ = load(str(small_dir))
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in before.items())
    W = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    for sel in perturb.SELECTS:
        m = perturb.pick(W, sel, 77, 3, 0)
        assert int(m.sum()) == 77
        rise2, riseF = perturb.spectral_rise(W, m, 0.1, 0)
        assert -0.1 < riseF < 0.1 and rise2 > -0.1
    # the same noise energy on any k entries: ||N||_F = 0.1 ||W||_F exactly
    m = perturb.pick(W, "random", 77, 3, 0)
    noisy = W.clone()
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(77, generator=g)
    noisy[m] += noise * 0.1 * W.norm() / noise.norm()
    assert perturb.spectral_rise(W, m, 0.1, 5)[1] == pytest.approx(float(noisy.norm() / W.norm() - 1), rel=1e-5)
    rows = _claims(tmp_path, "spectral", "--model", str(small_dir), "--sizes", "32", "--seeds", "2", "--rank", "2")
    assert {r["where"] for r in rows} >= {"random 32x32", f"{small_dir} q_proj"}
    rows = _claims(tmp_path, "overlap", "--model", str(small_dir), "--lra-ranks", "1,48", "--rank", "2")
    full = [r for r in rows if r["lra_rank"] == 48]
    assert len(full) == 7 and all(o == 1.0 for r in full for o in r["overlap"])
    assert all(0 <= o <= 1 for r in rows for o in r["overlap"])
    assert "LRA r=48" in capsys.readouterr().out
