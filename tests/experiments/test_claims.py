"""claims.py: the training claims (compare, lorasb-init, rows), the plots and the command line on a
micro configuration, and the measures they rest on."""
import json
import re

import pytest

from conftest import _claims


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
    from experiments import claims
    for argv, msg in ((["nosuch"], "invalid choice: 'nosuch'"), (["noise", "--seeds", "0"], "--seeds 0 is not allowed"),
                      (["compare", "--configs", "lora r9"], "unknown --configs 'lora r9'"),
                      (["noise", "--ranks", "0,2"], "every value must be a positive integer"),
                      (["plots", "--out", str(tmp_path)], "run `python -m experiments.claims compare` first")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            claims.main(argv)
    assert claims.cli(["noise", "--sigma", "-1"]) == 2
