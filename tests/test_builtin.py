"""builtin.py: the built-in experiment end to end: `python train.py --method lift` with no model or data
pretrains the tiny base once (cached), fine-tunes on synth-target and prints before/after accuracy."""
import re

import train


def test_builtin_default_end_to_end(tmp_path, monkeypatch, capsys):
    """`python train.py --method lift` with no model or data: pretrain the tiny base once (cached),
    fine-tune on synth-target, print before/after accuracy on target, source and its facts."""
    monkeypatch.chdir(tmp_path)
    argv = ["--method", "lift", "--rank", "8", "--pretrain-steps", "3", "--max-steps", "2", "--eval-limit", "4",
            "--max-new-tokens", "6", "--log-every", "1"]
    train.main(argv)
    out = capsys.readouterr().out
    assert "pretraining the tiny model on synth-source (3 steps" in out
    assert (tmp_path / "out" / "base-tiny-3" / "model.safetensors").exists()
    table = out[out.rindex("accuracy    "):]
    assert re.search(r"^accuracy\s+synth-target\s+synth-source\s+synth-source-facts$", table, re.M)
    assert re.search(r"^base\s+\d+\.\d%\s+\d+\.\d%\s+\d+\.\d%$", table, re.M)
    assert re.search(r"^lift r=8\s+\d+\.\d%\s+\d+\.\d%\s+\d+\.\d%$", table, re.M)
    train.main(argv + ["--overwrite"])  # the second run reuses the cached base and its cached accuracy
    assert "pretraining" not in capsys.readouterr().out
