"""Issue #30, the training side: train.py's command line against bad input, campaign style. Every bad
input is one line on stderr naming the flag (or file) and the value, exit status 2, no traceback; a run
never writes outside its --out or over files it did not write (the bytes and times of everything the
user owns are compared before and after); a nan names its cause."""
import errno
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

import checkpoint
import train
import weights
from conftest import ROOT, _argv, _one_line_error, prepare, tiny_model
from weights import from_pretrained, save_pretrained


def snapshot(*folders):
    """Every entry under `folders` (links not followed) -> (bytes or link target, mtime): what the user owns."""
    seen = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in dirs + files:
                p = os.path.join(root, name)
                st = os.lstat(p)
                body = os.readlink(p) if os.path.islink(p) else open(p, "rb").read() if os.path.isfile(p) else None
                seen[p] = (body, st.st_mtime_ns)
    return seen


def refused(argv, capsys, *says):
    """train.cli(argv) in this process: exit status 2 and exactly one stderr line holding every `says`."""
    code, err = _one_line_error(argv, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (argv, err)
    assert "Traceback" not in err[0] and all(s in err[0] for s in says), (argv, err[0], says)
    return err[0]


# every flag's bad values, refused before anything loads: (flags, what the line must name)
FLAGS = [
    (["--device", "bogus"], ["--device 'bogus'", "cpu, cuda"]),
    (["--device", "cuda:99"], ["--device cuda:99"]),
    (["--device", "cpu:1"], ["--device 'cpu:1'"]),
    (["--seed", str(2 ** 64)], ["--seed 18446744073709551616", "2**32"]),
    (["--seed", "-1"], ["--seed -1", "0 <= seed"]),
    (["--seed", "1.5"], ["--seed", "'1.5'"]),
    (["--dist-timeout", "-1"], ["--dist-timeout -1.0", "positive"]),
    (["--dist-timeout", "nan"], ["--dist-timeout nan"]),
    (["--dist-timeout", "0"], ["--dist-timeout 0.0"]),
    (["--dist-timeout", "1e20"], ["--dist-timeout 1e+20", "at most"]),
    (["--threads", "100000"], ["--threads 100000", "at most"]),
    (["--threads", "-1"], ["--threads -1"]),
    (["--max-steps", "1e3"], ["--max-steps", "'1e3'"]),
    (["--pretrain-steps", "0"], ["--pretrain-steps 0"]),
    (["--grad-accum", "100"], ["--grad-accum 100", "more than the 64 training problems"]),
    (["--eval-every", "-1"], ["--eval-every -1"]),
    (["--save-every", "-2"], ["--save-every -2"]),
    (["--train-limit", "0"], ["--train-limit 0"]),
    (["--eval-limit", "0"], ["--eval-limit 0"]),
    (["--num-beams", "0"], ["--num-beams 0"]),
    (["--forget-prompts", "101"], ["--forget-prompts", "101"]),
    (["--out", ""], ["--out ''"]),
    (["--eval-data", ""], ["--eval-data ''"]),
    (["--data", ""], ["--data ''"]),
    (["--lr", "inf"], ["--lr inf"]),
    (["--lr", "0"], ["--lr 0.0"]),
    (["--eps", "nan"], ["--eps nan"]),
    (["--betas", "nan,0.9"], ["--betas nan,0.9"]),
    (["--weight-decay", "1e30"], ["--weight-decay 1e+30", "1/lr"]),
    (["--weight-decay", "-1"], ["--weight-decay -1.0"]),
    (["--max-grad-norm", "inf"], ["--max-grad-norm inf"]),
    (["--max-grad-norm", "-1"], ["--max-grad-norm -1.0"]),
    (["--warmup-ratio", "nan"], ["--warmup-ratio nan"]),
    (["--epochs", "1e300"], ["--epochs 1e+300", "at most"]),
    (["--schedule", "step"], ["--schedule step"]),
    (["--batch-size", "-3"], ["--batch-size -3"]),
    (["--rank", "-1"], ["--rank", "-1"]),
    (["--lift-interval", "0"], ["--lift-interval 0"]),
    (["--lift-lra-rank", "0"], ["--lift-lra-rank 0"]),
    (["--lift-block", "-1"], ["--lift-block -1"]),
    (["--lift-svd", "qr"], ["--lift-svd", "'qr'"]),
    (["--method", "lora", "--lora-alpha", "0"], ["--lora-alpha 0.0", "positive finite", "changes nothing"]),
    (["--method", "lora", "--lora-alpha", "nan"], ["--lora-alpha nan"]),
    (["--method", "lora", "--lora-alpha", "-2"], ["--lora-alpha -2.0"]),
    (["--method", "lorasb", "--lorasb-init-std", "inf"], ["--lorasb-init-std inf"]),
    (["--method", "lorasb", "--lorasb-init-samples", "0"], ["--lorasb-init-samples", "0"]),
    (["--method", "rocoft", "--rocoft-score-batches", "0"], ["--rocoft-score-batches", "0"]),
    (["--method", "rocoft", "--rocoft-mode", "diag"], ["--rocoft-mode", "'diag'"]),
    (["--method", "hyper", "--targets", "lm_head"], ["--targets lm_head"]),
    (["--method", "full", "--lr=-1e-3"], ["--lr -0.001"]),
    (["--method", "full", "--lr", "-1e-3"], ["argument --lr: expected one argument", "--lr=-1e-3"]),
]


@pytest.mark.parametrize("flags,says", FLAGS, ids=[" ".join(f) for f, _ in FLAGS])
def test_every_bad_flag_is_one_line_before_anything_loads(small_dir, tmp_path, monkeypatch, capsys, flags, says):
    monkeypatch.setattr(train, "load", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    before = snapshot(small_dir)
    refused(_argv(small_dir, tmp_path / "run", "--method", "lift", "--rank", "2", *flags), capsys, *says)
    assert not (tmp_path / "run").exists() and snapshot(small_dir) == before


def test_out_never_the_base_model_its_cache_or_someone_elses_files(small_dir, tmp_path, monkeypatch, capsys):
    """--out equal to, inside or around the --model folder or a cached built-in base is refused even
    with --overwrite; a folder of the user's files without a sign of a nanopeft run needs --overwrite."""
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "models" / "base"
    shutil.copytree(small_dir, model)
    (tmp_path / "link").symlink_to(model)
    cache = tmp_path / "out" / "base-tiny-450"
    shutil.copytree(small_dir, cache)
    user = tmp_path / "mine"
    user.mkdir()
    for name in ("config.json", "log.jsonl", "metrics.json", "model.safetensors"):
        (user / name).write_bytes(b"mine")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    base = lambda out, *f: _argv(model, out, "--method", "lora", "--rank", "2", "--max-steps", "1", *f)
    for argv, says in [
            (base(model), ["--out", "it is --model"]),
            (base(tmp_path / "link", "--overwrite"), ["it is --model"]),  # the same folder through a link
            (base(model / "tuned"), ["it is inside --model"]),
            (base(tmp_path / "models", "--overwrite"), ["it contains --model"]),
            (base("out/base-tiny-450", "--overwrite"), ["--out out/base-tiny-450", "base-tiny-450 is a cache"]),
            (base("out/base-tiny-450.run/x"), ["base-tiny-450.run is a cache"]),
            (base("out", "--overwrite"), ["it contains a cached built-in base model"]),
            (base("base-cache"), ["base-cache is a cache"]),
            (["--method", "lift", "--out", "out/base-tiny-450"], ["base-tiny-450 is a cache"]),  # the built-in run
            (["--method", "lift", "--pretrain-steps", "7", "--out", "out"], ["contains the built-in base model's"]),
            (["--method", "lift", "--max-new-tokens", "512"], ["--max-new-tokens 512", "512 positions"]),  # before
            (["--method", "lift", "--seq-len", "600"], ["--seq-len 600", "512 positions"]),  # pretraining the base
            (base(user), [f"--out {user}", "config.json", "no sign that a nanopeft run wrote them", "--overwrite"]),
            (base(odd), ["notes.txt", "no nanopeft run wrote"])]:
        refused([str(a) for a in argv], capsys, *says)
    assert snapshot(tmp_path) == before  # nothing anywhere was written, not even a folder


def test_links_in_out_are_replaced_never_written_through(small_dir, tmp_path, capsys):
    """A link planted in --out (the old temporary name ckpt.pt.tmp, the files a run writes, its marker) is
    never followed: the run replaces it with its own file, and the file it pointed at is untouched.
    A crashed run's folder (marker and log only) is taken again without --overwrite."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "run"
    out.mkdir()
    for name in ("ckpt.pt.tmp", "log.jsonl", "metrics.json", "config.json", ".nanopeft", "nanopeft_tokenizer.json"):
        (out / name).symlink_to(victim)
    refused(_argv(small_dir, out, "--max-steps", "1"), capsys, "(a link)", "--overwrite")
    (out / "adapter.safetensors").mkdir()  # a folder where the run writes a file: refused even with --overwrite
    refused(_argv(small_dir, out, "--max-steps", "1", "--overwrite"), capsys, "folder named adapter.safetensors")
    (out / "adapter.safetensors").rmdir()
    (out / "model.safetensors.index.json").write_text('{"weight_map": {"x": "../victim"}}')  # would shadow the model
    before = snapshot(victim.parent / "victim")
    assert train.cli(_argv(small_dir, out, "--method", "lora", "--rank", "2", "--max-steps", "2", "--save-every", "1",
                           "--overwrite")) == 0
    assert snapshot(victim) == before and victim.read_bytes() == b"precious"
    for name in ("log.jsonl", "metrics.json", "config.json", ".nanopeft", "nanopeft_tokenizer.json"):
        assert not (out / name).is_symlink() and (out / name).is_file(), name
    assert not (out / "model.safetensors.index.json").exists() and from_pretrained(out) is not None
    assert not [p for p in out.iterdir() if p.name.startswith(weights.TMP)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "victim"]  # nothing written beside --out
    # --resume into the folder: a link at a name the run writes is refused, a foreign file left alone
    (out / "metrics.json").unlink()
    (out / "metrics.json").symlink_to(victim)
    refused(_argv(small_dir, out, "--method", "lora", "--rank", "2", "--max-steps", "3", "--resume"), capsys,
            "metrics.json (a link)", "--resume would replace")
    assert victim.read_bytes() == b"precious"
    # a run that crashed before its first checkpoint left its marker and log: run again, no flag needed
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copy(out / ".nanopeft", crashed)
    (crashed / "log.jsonl").write_text("")
    assert train.cli(_argv(small_dir, crashed, "--method", "lora", "--rank", "2", "--max-steps", "1")) == 0


def test_a_nan_names_its_cause(small_dir, tmp_path, capsys):
    """A nan base weight is refused after loading, naming the tensor and the model, before training."""
    broken = tmp_path / "broken"
    model = from_pretrained(small_dir)
    with torch.no_grad():
        model.embed_tokens.weight[3, 5] = float("nan")
    save_pretrained(model, broken)
    shutil.copy(small_dir / "nanopeft_tokenizer.json", broken)
    before = snapshot(broken)
    line = refused(_argv(broken, tmp_path / "run", "--max-steps", "1"), capsys, "embed_tokens.weight", str(broken))
    assert "--lr" not in line and snapshot(broken) == before
    assert not (tmp_path / "run" / "ckpt.pt").exists()
    # a loss that is not finite before any update is not blamed on the learning rate
    with pytest.raises(FloatingPointError, match="at step 0; stopping: no checkpoint was written. No update was") as e:
        train.check_step(float("nan"), "loss", 0, tmp_path / "ckpt.pt")
    assert "--lr" not in str(e.value)
    with pytest.raises(FloatingPointError, match="Try a lower --lr"):
        train.check_step(float("inf"), "loss", 3, tmp_path / "ckpt.pt")


def test_os_errors_say_the_real_reason(small_dir, tmp_path, monkeypatch, capsys):
    """Permission denied is said as such, never as a missing file (simulated: the tests may run as root)."""
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(a[0]) if a else None)
    monkeypatch.setattr(tempfile, "mkstemp", denied)
    refused(_argv(small_dir, tmp_path / "ro", "--max-steps", "1"), capsys, f"--out {tmp_path / 'ro'}",
            "cannot be written (Permission denied)")
    monkeypatch.undo()
    out = tmp_path / "run"
    assert train.cli(_argv(small_dir, out, "--method", "full", "--max-steps", "1")) == 0
    monkeypatch.setattr(checkpoint, "open", denied, raising=False)  # reading the checkpoint back
    line = refused(_argv(small_dir, out, "--method", "full", "--max-steps", "2", "--resume"), capsys,
                   "cannot read the checkpoint", "(Permission denied)")
    assert "no checkpoint" not in line
    monkeypatch.undo()
    refused(_argv(small_dir, tmp_path / "none", "--method", "full", "--max-steps", "2", "--resume"), capsys,
            "--resume: no checkpoint at")
    # a checkpoint altered by hand: one line, never a KeyError or a shape mismatch's traceback
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    torch.save({"method": "full"}, out / "ckpt.pt")
    refused(_argv(small_dir, out, "--method", "full", "--max-steps", "2", "--resume"), capsys,
            "not a nanopeft checkpoint")
    name = next(iter(ckpt["model"]))
    ckpt["model"][name] = torch.zeros(3)
    torch.save(ckpt, out / "ckpt.pt")
    refused(_argv(small_dir, out, "--method", "full", "--max-steps", "1", "--resume"), capsys,
            "does not fit this model and method")


def test_counts_past_the_data_are_clamped_not_looped(capsys):
    """LoRA-SB's gradient-estimate sample count and RoCoFT's scoring batches above what the data holds
    use all of it, saying so (the batch iterators are endless: no hang, no growing list)."""
    from conftest import batch_stream
    prepare("lorasb", tiny_model(), batch_stream(), init_samples=10 ** 12, n_train=6)
    prepare("rocoft", tiny_model(), batch_stream(), select="max", score_batches=10 ** 12, batch_size=2, n_train=6)
    out = capsys.readouterr().out
    assert "more than the 6 training examples; using 6" in out
    assert "micro-batches of 2 in the 6 training examples; using 3" in out


def test_a_bad_flag_from_the_shell_is_one_line():
    """The one subprocess case: `python train.py --device bogus` prints one line and exits 2."""
    r = subprocess.run([sys.executable, "train.py", "--device", "bogus"], capture_output=True, text=True, cwd=ROOT)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --device 'bogus'"), r.stderr
