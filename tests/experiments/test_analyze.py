"""analyze.py: the weight-update measures (rank, effective rank, alignment, ...) on matrices whose answer
is known, and on a LoRA run."""
import json
import re

import pytest
import torch

import train
from conftest import _argv
from targets import LINEAR_NAMES


def test_delta_metrics_on_known_matrices():
    from experiments import analyze
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(64, 48, generator=g)
    same = analyze.delta_metrics(W0, W0.clone())
    assert (same["rank"], same["eff_rank"], same["changed"], same["mean_abs"]) == (0, 0.0, 0.0, 0.0)
    assert same["alignment"] == pytest.approx(1.0, abs=1e-5) and same["spec_change"] == 0.0
    low = analyze.delta_metrics(W0, W0 + torch.randn(64, 3, generator=g) @ torch.randn(3, 48, generator=g))
    assert low["rank"] == 3 and 1 < low["eff_rank"] <= 3 and low["changed"] == 1.0
    Q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    equal = analyze.delta_metrics(W0, W0 + Q[:, :4] @ torch.eye(64)[:4, :48])  # 4 equal singular values
    assert equal["rank"] == 4 and equal["eff_rank"] == pytest.approx(4.0, rel=1e-4)
    touched = W0.clone()
    touched.view(-1)[torch.randperm(W0.numel(), generator=g)[:10]] += 0.5
    assert analyze.delta_metrics(W0, touched)["changed"] * W0.numel() == pytest.approx(10)
    # orthogonal top subspaces: right singular vectors e_0..e_3 before, e_4..e_7 after -> alignment 0
    U = Q[:, :4]
    before, after = U @ torch.eye(48)[:4] * 3, U @ torch.eye(48)[4:8] * 3
    assert analyze.delta_metrics(before, after, k=4)["alignment"] == pytest.approx(0.0, abs=1e-6)
    assert analyze.delta_metrics(before, before, k=4)["alignment"] == pytest.approx(1.0, abs=1e-5)
    # HyperAdapt's normalised rank: singular values of ΔW >= 1e-2, over rank(W0) (= 48 here)
    D = Q[:, :3] @ torch.diag(torch.tensor([1.0, 0.5, 1e-3])) @ torch.eye(48)[:3]
    assert analyze.delta_metrics(W0, W0 + D)["norm_rank"] == pytest.approx(2 / 48)
    with pytest.raises(ValueError, match=r"W0 is \(64, 48\) but W is \(48, 64\)"):
        analyze.delta_metrics(W0, W0.T)


def test_analyze_cli_on_a_lora_run(small_dir, tmp_path, capsys):
    """LoRA r=2's ΔW has rank <= 2 in every matrix (its defining property), full rank nowhere."""
    from experiments import analyze
    train.main(_argv(small_dir, tmp_path / "lora", "--method", "lora", "--rank", "2", "--max-steps", "3", "--lr", "1e-2"))
    per_matrix = analyze.main([str(small_dir), str(tmp_path / "lora"), "--json", str(tmp_path / "d.json")])
    assert len(per_matrix) == 14 and all(1 <= m["rank"] <= 2 for m in per_matrix.values())
    saved = json.loads((tmp_path / "d.json").read_text())
    assert saved["matrices"].keys() == per_matrix.keys()
    table = capsys.readouterr().out
    assert all(re.search(rf"^{kind}\s+2\s", table, re.M) for kind in LINEAR_NAMES)
