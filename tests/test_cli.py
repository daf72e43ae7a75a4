"""cli.py: settings from each method's declaration (an unset flag takes the paper's default, --help shows
its source); bad settings, files and flags fail in one line, exit status 2, before the model loads."""
import os
import sys
from dataclasses import fields, replace

import pytest

import cli
import eval_math as E
import train
from conftest import ROOT, _argv, _one_line_error
from methods import METHODS
from tokenizer import Tokenizer
from weights import load, save_pretrained


# bad input and faults: one line, exit status 2, nothing lost

BEFORE_LOAD = [  # (flags added to a small run, what the one line says); each fails before the model loads
    (["--lr=-1e-3"], "--lr -0.001 is not allowed: a positive finite learning rate"),
    (["--lr", "nan"], "--lr nan is not allowed"),
    (["--max-steps", "-1"], "--max-steps -1 is not allowed: it must be >= 0"),
    (["--epochs", "0"], "--epochs 0.0 is not allowed"),
    (["--warmup-ratio", "5"], "--warmup-ratio 5.0 is not allowed: a share of the steps in [0, 1]"),
    (["--batch-size", "0"], "--batch-size 0 is not allowed"),
    (["--grad-accum", "0"], "--grad-accum 0 is not allowed: it must be >= 1"),
    (["--log-every", "0"], "--log-every 0 is not allowed: it must be >= 1"),
    (["--targets", ""], "--targets '' is not allowed"),
    (["--targets", ","], "--targets '' is not allowed"),
    (["--betas", "0.9"], "--betas: needs two comma-separated numbers (beta1,beta2), got '0.9'"),
    (["--targets", "q_proj,v_prj"], "--targets q_proj,v_prj is not allowed"),
    (["--betas", "0.9,1.5"], "--betas 0.9,1.5 is not allowed: two numbers in [0, 1)"),
    (["--rank", "0"], "--rank must be a positive integer, got 0"),
    (["--method", "dora"], "unknown method 'dora'; available: full, lora"),
    (["--lift-select", "wanda"], "--lift-select: invalid choice: 'wanda'"),
    (["--device", "cuda"], "--device cuda: no CUDA GPU is available here; use --device cpu"),
    (["--eval-data", "bogus"], "unknown dataset 'bogus'"),
    (["--eval-data", "synth-target", "--eval-batch-size", "0"], "--eval-batch-size 0 is not allowed"),
    (["--max-new-tokens", "-1"], "--max-new-tokens -1 is not allowed"),
    (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
    (["--seq-len", "1"], "--seq-len 1 is not allowed"),
]


@pytest.mark.parametrize("flags,says", BEFORE_LOAD)
def test_bad_settings_fail_in_one_line_before_the_model_loads(small_dir, tmp_path, monkeypatch, capsys, flags, says):
    monkeypatch.setattr(train, "load", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    code, err = _one_line_error(_argv(small_dir, tmp_path / "run", "--method", "lift", *flags), capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert "Traceback" not in err[0] and "PosixPath" not in err[0]


def test_bad_files_fail_in_one_line(small_dir, tmp_path, capsys):
    """Files that are not what they claim, named in one line; the run loses nothing."""
    import shutil
    cut = tmp_path / "cut"
    shutil.copytree(small_dir, cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:len(data) // 2])
    broken = tmp_path / "broken"
    shutil.copytree(small_dir, broken)
    (broken / "config.json").write_text("{not json")
    binary = tmp_path / "data.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    cases = [(["--model", str(cut)], "model.safetensors' is not a readable safetensors file"),
             (["--model", str(broken)], "config.json' is not valid JSON"),
             (["--data", str(binary)], "data.jsonl' is not UTF-8 text"),
             (["--model", str(tmp_path / "nope")], "nope"),
             (["--seq-len", "9000"], "--seq-len 9000 is more than the model's 8192 positions")]
    for flags, says in cases:
        argv = _argv(small_dir, tmp_path / "run", "--method", "lora", "--max-steps", "1", *flags)
        argv = argv[2:] if flags[0] == "--model" else argv  # the case's own --model replaces small_dir
        code, err = _one_line_error(argv, capsys)
        assert code == 2 and len(err) == 1 and says in err[0] and "PosixPath" not in err[0], (flags, err)
    out = tmp_path / "f"
    out.write_text("a file")
    code, err = _one_line_error(_argv(small_dir, out, "--max-steps", "1"), capsys)
    assert code == 2 and "is a file, not a folder" in err[0]
    for flags, says in ((["--max-new-tokens", "-1"], "--max-new-tokens -1 is not allowed"),
                        (["--batch-size", "0"], "--batch-size 0 is not allowed"),
                        (["--out", str(out)], "is a file, not a folder"),
                        (["--device", "cuda"], "no CUDA GPU")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            E.main(["--model", str(small_dir), "--data", "synth-target", "--limit", "2", "--out", str(tmp_path / "ev"),
                    *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and says in err[0], err


def test_a_copy_of_the_tiny_model_trains_with_the_tiny_lr(tmp_path, capsys):
    save_pretrained(load("tiny")[0], tmp_path / "copy")
    Tokenizer.bytes().save(tmp_path / "copy")
    _, s, origin = cli.parse_args(["--method", "lift", "--model", str(tmp_path / "copy"), "--data", "synth-target"])
    assert s.lr == 1e-3 and "is the tiny preset" in origin["lr"]


def _cli_error(argv, capsys):
    """Run train.py's command line; return its one-line error."""
    import subprocess
    r = subprocess.run([sys.executable, "train.py", *argv], capture_output=True, text=True,
                       cwd=os.path.dirname(train.__file__))
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l]
    return lines[-1]


def test_train_bad_inputs(small_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown method 'dora'; available: full, lora"):
        cli.parse_args(["--method", "dora"])
    with pytest.raises(ValueError, match="--rank must be a positive integer, got 0"):
        cli.parse_args(["--rank", "0"])
    with pytest.raises(ValueError, match="--targets q_proj,qkv is not allowed: comma-separated module names"):
        train.main(_argv(small_dir, tmp_path / "a", "--method", "lora", "--targets", "q_proj,qkv", "--max-steps", "1"))
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        train.main(_argv(tmp_path / "no-such-model", tmp_path / "b", "--max-steps", "1"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        train.main(["--model", str(small_dir), "--data", str(empty), "--out", str(tmp_path / "c"), "--max-steps", "1"])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.main(_argv(small_dir, tmp_path / "d", "--method", "full", "--max-steps", "1", "--resume"))
    train.main(_argv(small_dir, tmp_path / "e", "--method", "full", "--max-steps", "1"))
    with pytest.raises(ValueError, match="checkpoint of method 'full', not 'lora'"):
        train.main(_argv(small_dir, tmp_path / "e", "--method", "lora", "--max-steps", "2", "--resume"))
    (tmp_path / "e" / "ckpt.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        train.main(_argv(small_dir, tmp_path / "e", "--method", "full", "--max-steps", "2", "--resume"))
    # from the command line: one line on stderr, exit status 2
    assert _cli_error(_argv(small_dir, tmp_path / "f", "--targets", "qq", "--max-steps", "1"), capsys).startswith(
        "error: --targets qq is not allowed")


def test_dtype_float16_is_refused_in_one_line(small_dir, tmp_path, capsys):
    line = _cli_error(_argv(small_dir, tmp_path / "run", "--max-steps", "1", "--dtype", "float16"), capsys)
    assert line.startswith("error: --dtype float16: not supported") and "auto, float32, bfloat16" in line
    assert not (tmp_path / "run").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        E.main(["--model", str(small_dir), "--data", "synth-target", "--limit", "1", "--dtype", "float16",
                "--out", str(tmp_path / "eval")])
    assert e.value.code == 2 and "--dtype float16 on cpu" in capsys.readouterr().err


@pytest.mark.parametrize("method", list(METHODS))
def test_settings_unset_flag_takes_declared_default_and_set_flag_overrides(method, capsys):
    cls = METHODS[method][1]
    args, s, origin = cli.parse_args(["--method", method, "--model", "m", "--data", "d"])
    assert s == cls()  # every unset flag: the paper's default, declared once in the method's file
    for f in fields(cls):
        assert f.metadata["source"] and origin[f.name] == f.metadata["source"]
    args, s, origin = cli.parse_args(["--method", method, "--model", "m", "--data", "d", "--lr", "0.123",
                                        "--betas", "0.8,0.9"])
    assert (s.lr, s.betas, origin["lr"]) == (0.123, (0.8, 0.9), "command line")
    assert replace(s, lr=cls().lr, betas=cls().betas) == cls()  # nothing else moved
    _, tiny, origin = cli.parse_args(["--method", method])  # the built-in run: the tiny model's own lr
    assert tiny.lr == next(f for f in fields(cls) if f.name == "lr").metadata["tiny"] and "tiny" in origin["lr"]


def test_rocoft_alone_runs_its_paper_and_help_shows_sources(capsys):
    _, s, _ = cli.parse_args(["--method", "rocoft", "--model", "m", "--data", "d"])
    assert (s.rank, s.lr, s.schedule, s.epochs, s.mode, s.select) == (3, 1e-3, "cosine", 2.0, "row", "first")
    _, s, _ = cli.parse_args(["--method", "lift", "--model", "m", "--data", "d", "--rank", "128"])
    assert (s.rank, s.betas, s.eps, s.max_grad_norm) == (128, (0.9, 0.95), 1e-6, 0.0)
    with pytest.raises(SystemExit):
        cli.parse_args(["--method", "rocoft", "--model", "m", "--help"])
    out = capsys.readouterr().out
    assert "--rocoft-mode" in out and "default 3: RoCoFT" in out and "Table 9" in out
    cli.parse_args(["--method", "lora", "--lift-interval", "5"])
    assert "--lift-interval ignored: it is a setting of lift, not lora" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--lift-select: invalid choice: 'wanda'"):  # choices: the declaration's
        cli.parse_args(["--method", "lift", "--lift-select", "wanda"])


def test_train_py_writes_no_default_twice():
    """Every settings flag defaults to None (the method's declaration decides); no method reads a
    Namespace with getattr."""
    for method in METHODS:
        p = cli.build_parser(method, builtin=False)
        settings_flags = [a for a in p._actions if a.dest in cli.COMMON or "__" in a.dest]
        assert settings_flags and all(a.default is None for a in settings_flags)
    for f in [*ROOT.glob("*.py"), *(ROOT / "experiments").glob("*.py")]:
        assert "getattr(" + "args" not in f.read_text(), f  # spelled apart, so grep finds nothing here either


def test_sources_cite_papers_not_our_files():
    sources = [*ROOT.glob("*.py"), *(ROOT / "experiments").glob("*.py")]
    assert {"model.py", "train.py", "cli.py", "lift.py", "claims.py", "table.py"} <= {p.name for p in sources}
    for f in sources:  # every source file of the repository
        text = f.read_text()
        for name in ("lift.txt", "rocoft.txt", "lorasb.txt", "hyperadapt.txt", "NOTES.md"):
            assert name not in text, (f, name)
