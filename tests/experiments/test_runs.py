"""runs.py: what every claim shares, on values known by hand: mean ± std, the verdict's rule, and a
train.py run reused only while its recorded command is unchanged."""
import json
import statistics
import types
from pathlib import Path

import pytest

from experiments import runs
import train


def test_mean_std_pm_and_the_verdict_rule():
    assert runs.mean_std([1.0, 2.0, 4.0]) == (pytest.approx(7 / 3), pytest.approx(statistics.stdev([1, 2, 4])))
    assert runs.mean_std([5.0]) == (5.0, 0.0)
    assert runs.pm([0.1, 0.3], 100, 1) == "20.0 ± 14.1"
    assert runs.verdict("c", [2, 3], [1, 1]).endswith("-> holds")
    assert runs.verdict("c", [2, 3], [1, 1], higher=False).endswith("-> does not hold")
    assert runs.verdict("c", [1, 1], [1, 1]).endswith("-> holds")  # ">=": equal means meet it
    assert runs.verdict("c", [1, 1], [1, 1], strict=True).endswith("-> does not hold (equal)")  # "better" does not
    assert "not measurable" in runs.verdict("c", [float("nan")], [1.0])


def test_run_train_reuses_a_run_only_while_its_command_is_unchanged(tmp_path, monkeypatch):
    calls = []

    def fake_main(argv):  # writes what train.main writes, without training
        calls.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"steps": 2, "accuracy": {"a": 0.5}, "accuracy_before": {"a": 0.25}}))
        (out / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n"
                                       + json.dumps({"step": 1, "accuracy": {"a": 0.3}}) + "\n")

    monkeypatch.setattr(train, "main", fake_main)
    args = types.SimpleNamespace(out=str(tmp_path), base="tiny", data="synth-target", eval_data="synth-target",
                                 steps=2, batch_size=4, log_every=1, eval_every=1, threads=1, forget_prompts=0,
                                 eval_limit=None, max_new_tokens=None)
    r = runs.run_train(args, "lora r8", ["--method", "lora"], seed=0)
    assert len(calls) == 1 and calls[0][:2] == ["--method", "lora"]
    assert calls[0][-3:] == ["--out", str(tmp_path / "runs" / "lora r8-seed0"), "--overwrite"]
    assert r["evals"] == [(0, {"a": 0.25}), (1, {"a": 0.3}), (2, {"a": 0.5})] and r["curve"] == [(1, 2.0)]
    runs.run_train(args, "lora r8", ["--method", "lora"], seed=0)
    assert len(calls) == 1  # the same command: read back, not re-run
    args.steps = 3
    runs.run_train(args, "lora r8", ["--method", "lora"], seed=0)
    assert len(calls) == 2 and "3" in calls[1]
