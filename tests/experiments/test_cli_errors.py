"""Every experiment's command line (claims, bench and its subcommands, memory, analyze) answers bad input
with one line on stderr, `error: ...` naming the flag or file and the bad value, and exit status 2, before
anything is built, loaded, pretrained or spawned (those fail the test here if reached)."""
import importlib
import importlib.util
import sys
import time

import pytest
import torch


BIG = str(10**12)
NO = "/nonexistent/nanopeft"


def cases(script, base, bad):
    """(script, argv, the words the error line must hold): `base` then each bad tail; the words are the
    tail's last flag and the value after it unless given."""
    out = []
    for tail, *need in bad:
        last = max(i for i, a in enumerate(tail) if a.startswith("--")) if not need else 0
        out.append(pytest.param(script, [*base, *tail], need or [a.split("=")[0] for a in tail[last:last + 2]],
                                id=f"{script}-{' '.join([*base, *tail])[:60]}"))
    return out


def NUMBERS(flag, *bad):
    """One bad tail per value of `flag`."""
    return [([flag, v],) for v in bad]

CASES = [
    *cases("claims", [], [([], "claim"), (["nosuch"], "nosuch"), (["noise", "--nope"],), (["noise", "--seeds"],)]),
    *cases("claims", ["noise"], [
        *NUMBERS("--seeds", "x", "0", "-1", "101", BIG), *NUMBERS("--threads", "0", "100000", "1.5"),
        *NUMBERS("--texts", "0", BIG), *NUMBERS("--sigma", "nan", "inf", "-1", "0", "x"),
        (["--sigma", "1e999"], "--sigma", "inf"),
        *NUMBERS("--ranks", "0,2", "x", "4," + BIG), *NUMBERS("--pretrain-steps", "0", BIG),
        *NUMBERS("--model", NO, "llama-3-8b", ""), *NUMBERS("--out", "FILE", "")]),
    *cases("claims", ["spectral"], [*NUMBERS("--scale", "nan", "-0.5", "inf"), *NUMBERS("--sizes", "0", "100000"),
                                    *NUMBERS("--rank", "0", BIG)]),
    *cases("claims", ["overlap"], [*NUMBERS("--lra-ranks", "x", BIG)]),
    *cases("claims", ["compare"], [
        *NUMBERS("--steps", "0", BIG), *NUMBERS("--batch-size", "0", BIG), *NUMBERS("--eval-limit", "0", BIG),
        *NUMBERS("--max-new-tokens", "0", "512", BIG), *NUMBERS("--forget-prompts", "-1", "101"),
        *NUMBERS("--eval-every", "-1", BIG), *NUMBERS("--level", "0", "1.5", "nan"), *NUMBERS("--log-every", "0"),
        *NUMBERS("--configs", "lora r9", ","), *NUMBERS("--data", NO + ".jsonl", "nosuch-set"),
        *NUMBERS("--eval-data", "synth-target,nosuch.jsonl"), *NUMBERS("--seq-len", "1", "513")]),
    *cases("claims", ["table"], [*NUMBERS("--eval-dir", NO), *NUMBERS("--num-beams", "0", "65"),
                                 *NUMBERS("--seq-len", BIG), *NUMBERS("--only-seed", "-1", "2")]),
    *cases("claims", ["plots"], [*NUMBERS("--figures", "FILE")]),
    *cases("claims", ["fronts"], [*NUMBERS("--held-out", NO + ".jsonl", "nosuch-set"),
                                  *NUMBERS("--held-out-limit", "0", BIG), *NUMBERS("--configs", "lora r9")]),
    *cases("bench", [], [([], "what"), (["nosuch"], "nosuch"), (["train", "--nope"],), (["train", "--micro=1"],)]),
    *cases("bench", ["train"], [*NUMBERS("--batch", "x", "0", "-1", BIG), *NUMBERS("--seq", "0", "513", BIG),
                                (["--batch", "4096"], "--batch 4096 x --seq 128", "65,536"),
                                (["--batch", "600", "--seq", "512"], "--batch 600 x --seq 512"),
                                *NUMBERS("--threads", "0", "100000"), *NUMBERS("--rank", "0", BIG)]),
    *cases("bench", ["generate"], [*NUMBERS("--new-tokens", "0", "393", BIG), *NUMBERS("--batch", "10000"),
                                   (["--batch", "200", "--new-tokens", "300"], "--batch 200", "--new-tokens 300")]),
    *cases("bench", ["methods"], [
        *NUMBERS("--methods", "lora,nosuch", "lora,lora", "", "peft-lora"), *NUMBERS("--steps", "0", BIG),
        *NUMBERS("--warmup", "-1", BIG), *NUMBERS("--rounds", "0", BIG), *NUMBERS("--dtype", "float16"),
        *NUMBERS("--model", NO, "llama-3-8b"), *NUMBERS("--seq", "2", BIG), *NUMBERS("--interval", "0"),
        *NUMBERS("--method", "nosuch")]),
    *cases("bench", ["eval"], [*NUMBERS("--limit", "0", BIG), *NUMBERS("--repeat", "0", BIG),
                               *NUMBERS("--model", "DIR"), *NUMBERS("--new-tokens", "0", BIG)]),
    *cases("bench", ["loss"], [*NUMBERS("--model", NO), *NUMBERS("--steps", "0")]),
    *cases("bench", ["gpu", "--micro"], [*NUMBERS("--peak-tflops", "nan", "-1", "inf", "x"), *NUMBERS("--seq", "1"),
                                         *NUMBERS("--methods", "rocoft-diagonal")]),
    *cases("bench", ["_one"], [([], "--model-dir"), *NUMBERS("--model-dir", NO)]),
    *cases("bench", ["fsdp"], [*NUMBERS("--methods", "nosuch", "rocoft-row", "lora,lora"), *NUMBERS("--model", NO)]),
    *cases("memory", [], [(["--nope"],), *NUMBERS("--gpu-gb", "nan", "inf", "0", "-1", "2", "x"),
                          *NUMBERS("--seq", "0", "x", "9000", BIG),
                          *NUMBERS("--models", "nosuch", "", "llama-3-8b,llama-3-8b")]),
    *cases("analyze", [], [([], "base"), ([NO, "tiny"], "base", NO), (["tiny", NO], "tuned", NO),
                           (["tiny", "llama-3-8b"], "tuned", "llama-3-8b")]),
    *cases("analyze", ["tiny", "tiny"], [*NUMBERS("--top-k", "0", "x", BIG),
                                         *NUMBERS("--json", NO + "/d.json", "DIR")]),
]
if not torch.cuda.is_available():
    CASES += cases("bench", [], [(["gpu"], "gpu", "--micro")])
if importlib.util.find_spec("peft") is None:
    CASES += cases("bench", ["methods"], [(["--peers"], "--peers", "peft")])


@pytest.fixture
def nothing_loads(monkeypatch):
    """Building, loading, pretraining, training or spawning anything fails the test: the checks come first."""
    import model
    import train
    import weights
    from experiments import analyze, bench, claims, memory, perturb, runs, table

    def boom(*a, **k):
        raise AssertionError("reached past the checks: something is built, loaded or run")
    monkeypatch.setattr(model.Transformer, "__init__", boom)
    for mod, name in ((weights, "load"), (bench, "load"), (claims, "load"), (perturb, "load"), (analyze, "load"),
                      (train, "main"), (runs, "builtin_base"), (claims, "run_train"), (table, "run_train"),
                      (memory, "plan"), (bench.subprocess, "run"), (torch, "set_num_threads")):
        monkeypatch.setattr(mod, name, boom)


@pytest.mark.parametrize("script, argv, need", CASES)
def test_bad_input_is_one_line_and_exit_2(script, argv, need, nothing_loads, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    where = {"FILE": str(tmp_path / "file"), "DIR": str(tmp_path)}
    argv = [where.get(a, a) for a in argv]
    need = [where.get(n, n) for n in need]
    cli = importlib.import_module(f"experiments.{script}").cli
    capsys.readouterr()
    t = time.perf_counter()
    code = cli(argv)
    took = time.perf_counter() - t
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and not out, (code, err, out)
    assert all(n in lines[0] for n in need), (need, lines[0])
    assert took < 3, f"{took:.1f} s before the error"


def test_command_line_keeps_real_bugs(capsys):
    """command_line: user errors (multi-line ones too) become one line; anything else keeps its traceback."""
    from experiments import command_line

    def bad(argv):
        raise ValueError("first\n  second")

    def bug(argv):
        raise KeyError("a bug")
    assert command_line(bad, []) == 2
    assert capsys.readouterr().err == "error: first second\n"
    with pytest.raises(KeyError):
        command_line(bug, [])


@pytest.mark.parametrize("script, argv", [("claims", ["noise", "--seeds", "0"]), ("bench", ["train", "--batch", "0"]),
                                          ("memory", ["--gpu-gb", "nan"]), ("analyze", ["tiny", NO])])
def test_scripts_run_as_modules_answer_in_one_line(script, argv, nothing_loads, monkeypatch, capsys):
    """`python -m experiments.<script>` (its __main__ block, run here by runpy): one line and exit status 2."""
    import runpy
    import warnings
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as done, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the module is already imported: it runs again
        runpy.run_module(f"experiments.{script}", run_name="__main__")
    err = capsys.readouterr().err
    assert done.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
