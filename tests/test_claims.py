"""claims.py: each claim command (noise, spectral, overlap, compare, lorasb-init, rows, plots) on a micro
configuration, and the measures it rests on."""
import json
import re

import pytest
import torch

from conftest import _claims
from model import load


def test_claims_noise_spectral_overlap_on_known_answers(small_dir, tmp_path, capsys):
    """Noise leaves the model as it was; equal-energy noise on each rule's k entries; at a full-rank
    LRA the LIFT mask IS the magnitude mask (overlap 1), and the k entries are exactly k."""
    import claims
    model, _ = load(str(small_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = _claims(tmp_path, "noise", "--model", str(small_dir), "--ranks", "1,2", "--seeds", "2", "--sigma", "0.5")
    out = capsys.readouterr().out
    assert re.search(r"^\s+1\s+[\d.]+%\s+[\d.]+ ± [\d.]+", out, re.M) and "base loss" in out
    assert {(r["rank"], r["select"]) for r in rows} == {(k, s) for k in (1, 2) for s in claims.SELECTS}
    assert all(len(r["loss"]) == 2 and r["loss"][0] != r["loss"][1] for r in rows)   # two seeds, two draws
    saved = json.loads((tmp_path / "claims" / "noise.json").read_text())
    assert saved["base"]["loss"] > 0 and len(saved["rows"]) == 6
    model2, _ = load(str(small_dir))
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in before.items())
    W = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    for sel in claims.SELECTS:
        m = claims.pick(W, sel, 77, 3, 0)
        assert int(m.sum()) == 77
        rise2, riseF = claims.spectral_rise(W, m, 0.1, 0)
        assert -0.1 < riseF < 0.1 and rise2 > -0.1
    # the same noise energy on any k entries: ||N||_F = 0.1 ||W||_F exactly
    m = claims.pick(W, "random", 77, 3, 0)
    noisy = W.clone()
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(77, generator=g)
    noisy[m] += noise * 0.1 * W.norm() / noise.norm()
    assert claims.spectral_rise(W, m, 0.1, 5)[1] == pytest.approx(float(noisy.norm() / W.norm() - 1), rel=1e-5)
    rows = _claims(tmp_path, "spectral", "--model", str(small_dir), "--sizes", "32", "--seeds", "2", "--rank", "2")
    assert {r["where"] for r in rows} >= {"random 32x32", f"{small_dir} q_proj"}
    rows = _claims(tmp_path, "overlap", "--model", str(small_dir), "--lra-ranks", "1,48", "--rank", "2")
    full = [r for r in rows if r["lra_rank"] == 48]
    assert len(full) == 7 and all(o == 1.0 for r in full for o in r["overlap"])
    assert all(0 <= o <= 1 for r in rows for o in r["overlap"])
    assert "LRA r=48" in capsys.readouterr().out


def test_claims_training_commands_and_plots(small_dir, tmp_path, capsys):
    """compare / lorasb-init / rows on two training steps: tables, JSON, runs reused on a second
    call; plots writes three PNG files."""
    micro = ["--model", str(small_dir), "--steps", "2", "--eval-limit", "2", "--batch-size", "4", "--log-every", "1",
             "--forget-prompts", "2", "--max-new-tokens", "4"]
    table = _claims(tmp_path, "compare", *micro, "--seeds", "2", "--configs", "lora r1,hyper")
    out = capsys.readouterr().out
    assert list(table) == ["lora r1", "hyper"] and all(len(runs) == 2 for runs in table.values())
    assert re.search(r"^hyper\s+[\d,]+\s+[\d.]+%\s+[\d.]+ ± [\d.]+%", out, re.M)
    assert "HyperAdapt Table 2: HyperAdapt >= LoRA r1" in out and ("-> holds" in out or "-> does not hold" in out)
    saved = json.loads((tmp_path / "claims" / "compare.json").read_text())
    assert saved["specs"] == ["synth-target", "synth-source", "synth-source-facts"] and len(saved["runs"]["hyper"]) == 2
    run = saved["runs"]["lora r1"][0]
    assert [s for s, _ in run["curve"]] == [1, 2] and 0 < run["delta"]["rank"] <= 1   # LoRA r=1: rank(ΔW) = 1
    assert [s for s, _ in run["evals"]] == [0, 2] and run["evals"][1][1] == run["accuracy"]  # base, then the end
    _claims(tmp_path, "compare", *micro, "--seeds", "2", "--configs", "lora r1,hyper")
    assert capsys.readouterr().out.count("reusing") == 4                               # nothing re-trained
    _claims(tmp_path, "lorasb-init", *micro, "--seeds", "1")
    assert re.search(r"^lorasb r64 kaiming\s+[\d.]+ ± ", capsys.readouterr().out, re.M)
    _claims(tmp_path, "rows", *micro, "--seeds", "1")
    out = capsys.readouterr().out
    assert "the choice matters" in out and "rows ≈ columns" in out
    assert set(json.loads((tmp_path / "claims" / "rows.json").read_text())["runs"]) == {
        "rocoft r16", "rocoft r16 random", "rocoft r16 max", "rocoft r16 min", "rocoft r16 mixed", "rocoft r16 column"}
    pytest.importorskip("matplotlib")
    written = _claims(tmp_path, "plots", "--figures", str(tmp_path / "fig"))
    assert [p.name for p in written] == ["loss_curves.png", "learn_forget.png", "spectra.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


def test_claims_bad_input(tmp_path):
    import claims
    for argv, msg in ((["nosuch"], "invalid choice: 'nosuch'"), (["noise", "--seeds", "0"], "--seeds 0 is not allowed"),
                      (["compare", "--configs", "lora r9"], "unknown --configs 'lora r9'"),
                      (["noise", "--ranks", "0,2"], "every value must be a positive integer"),
                      (["plots", "--out", str(tmp_path)], "run `python claims.py compare` first")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            claims.main(argv)
    assert claims.cli(["noise", "--sigma", "-1"]) == 2
