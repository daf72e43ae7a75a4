"""checkpoint.py: resume is bit-identical to a straight run (Ctrl-C, SIGTERM), no checkpoint is overwritten
or lost (disk full, nan loss), the merged model is saved in the base's dtype changing only what the method trains,
one tensor at a time: the bytes the whole-dict save wrote, in about one matrix's memory."""
import json
import os
import platform
import signal
from types import SimpleNamespace

import pytest
import torch

import train
from checkpoint import save_adapter, save_merged
from conftest import (SETTINGS_OF, _argv, _one_line_error, _weights, batch_stream, make_batches, prepare, run_steps,
                      tiny_model)
from methods import METHODS, trains_base
from model import ModelConfig, Transformer
from tokenizer import Tokenizer
from weights import TMP, from_pretrained, save_pretrained


@pytest.mark.parametrize("method", ["full", "lora", "lift"])
def test_resume_is_bit_identical(small_dir, tmp_path, method, cpu):
    common = ["--method", method, "--rank", "4", "--lr", "3e-3", "--weight-decay", "0.01"]
    train.main(_argv(small_dir, tmp_path / "straight", *common, "--max-steps", "10"))
    # interrupted after step 5 (a Ctrl-C during step 5 finishes the step and checkpoints), then resumed
    calls = []

    def ctrl_c_on_step_5(optimizer, a, k):  # a global post-step hook: every method's optimizer fires it
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGINT)

    from torch.optim.optimizer import register_optimizer_step_post_hook
    handle = register_optimizer_step_post_hook(ctrl_c_on_step_5)
    try:
        with pytest.raises(KeyboardInterrupt):
            train.main(_argv(small_dir, tmp_path / "split", *common, "--max-steps", "10"))
    finally:
        handle.remove()
    ckpt = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 5 and ckpt["method"] == method
    train.main(_argv(small_dir, tmp_path / "split", *common, "--max-steps", "10", "--resume"))
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # with a constant schedule, 5 steps then resumed to 10 equals 10 straight
    const = [*common, "--schedule", "constant", "--warmup-ratio", "0"]
    train.main(_argv(small_dir, tmp_path / "c10", *const, "--max-steps", "10"))
    train.main(_argv(small_dir, tmp_path / "c5", *const, "--max-steps", "5"))
    train.main(_argv(small_dir, tmp_path / "c5", *const, "--max-steps", "10", "--resume"))
    a, b = _weights(tmp_path / "c10"), _weights(tmp_path / "c5")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lift_resumed_past_its_length_refreshes_the_mask_the_shorter_run_skipped(small_dir, tmp_path):
    """A constant-lr LIFT run of 2 steps with mask refreshes every 3 skips the refresh due after its
    last step (none after the last step); resumed to 6 steps it does it when its state loads, so it
    ends bit-identical to 6 steps straight (2 refreshes)."""
    const = ["--method", "lift", "--rank", "2", "--lr", "1e-2", "--schedule", "constant", "--warmup-ratio", "0",
             "--lift-interval", "3", "--dtype", "float32"]
    train.main(_argv(small_dir, tmp_path / "straight", *const, "--max-steps", "6"))
    train.main(_argv(small_dir, tmp_path / "split", *const, "--max-steps", "2"))
    train.main(_argv(small_dir, tmp_path / "split", *const, "--max-steps", "6", "--resume"))
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ckpt = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert ckpt["optimizer"]["lift"]["n_refresh"] == 2


def test_existing_checkpoint_is_never_overwritten_and_resume_refuses_other_settings(small_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train.main(_argv(small_dir, run, "--method", "lora", "--rank", "2", "--max-steps", "2"))
    ckpt = (run / "ckpt.pt").read_bytes()
    assert len((run / "log.jsonl").read_text().splitlines()) == 2
    refused = [(["--max-steps", "2"], "holds the checkpoint of an earlier run: continue it with --resume"),
               (["--max-steps", "2", "--resume", "--lr", "1e-3"], "made with --lr 0.0002, this run has 0.001"),
               (["--max-steps", "2", "--resume", "--rank", "3"], "made with --rank 2, this run has 3"),
               (["--max-steps", "2", "--resume", "--schedule", "cosine"], "--schedule linear, this run has cosine"),
               (["--max-steps", "2", "--resume", "--targets", "q_proj"], "--targets q_proj,k_proj"),
               (["--max-steps", "4", "--resume"], "--max-steps 2, this run has 4"),
               (["--max-steps", "2", "--resume", "--data", "synth-source"], "--data synth-target, this run has synth-source")]
    for flags, says in refused:
        code, err = _one_line_error(_argv(small_dir, run, "--method", "lora", "--rank", "2", *flags), capsys)
        assert code == 2 and len(err) == 1 and says in err[0], (flags, err)
        assert (run / "ckpt.pt").read_bytes() == ckpt  # byte-identical: nothing lost
    code, err = _one_line_error(_argv(tmp_path / "nope", run, "--method", "full", "--max-steps", "1", "--overwrite"),
                                capsys)  # --overwrite with a bad input: the old run is still all there
    assert code == 2 and (run / "ckpt.pt").read_bytes() == ckpt and (run / "adapter.safetensors").exists()
    train.main(_argv(small_dir, run, "--method", "full", "--max-steps", "1", "--overwrite"))
    assert not (run / "adapter.safetensors").exists()  # the LoRA run's adapter is gone with it
    assert len((run / "log.jsonl").read_text().splitlines()) == 1  # a fresh run starts a fresh log
    modes = {f.name: f.stat().st_mode & 0o777 for f in run.iterdir() if f.is_file()}
    assert len(set(modes.values())) == 1, modes  # every file written with the same permissions


def test_sigterm_checkpoints_and_resume_is_bit_identical(small_dir, tmp_path):
    common = ["--method", "lora", "--rank", "2", "--max-steps", "6"]
    train.main(_argv(small_dir, tmp_path / "straight", *common))
    calls = []

    def term_on_step_3(optimizer, a, k):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    from torch.optim.optimizer import register_optimizer_step_post_hook
    handle = register_optimizer_step_post_hook(term_on_step_3)
    try:
        with pytest.raises(SystemExit) as e:
            train.main(_argv(small_dir, tmp_path / "split", *common))
    finally:
        handle.remove()
    assert e.value.code == 143 and torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)["step"] == 3
    train.main(_argv(small_dir, tmp_path / "split", *common, "--resume"))
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_disk_full_keeps_the_last_good_checkpoint_and_no_temporary(small_dir, tmp_path, monkeypatch, capsys):
    import errno
    run = tmp_path / "run"
    real_save, saves = torch.save, []

    def full_on_second(obj, f, *a, **k):
        saves.append(f)
        if len(saves) == 2:
            f.write(b"partial")  # what a full disk leaves: a cut temporary
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_on_second)
    code, err = _one_line_error(_argv(small_dir, run, "--method", "lora", "--rank", "2", "--max-steps", "3",
                                      "--save-every", "1"), capsys)
    assert code == 2 and len(err) == 1 and "could not write the checkpoint of step 2" in err[0]
    assert "No space left on device" in err[0] and "from before is kept" in err[0]
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 1 and not _temporaries(run)
    monkeypatch.setattr(torch, "save", real_save)

    def no_space(path, *a, **k):
        open(path, "xb").write(b"partial")  # model.safetensors cut in the middle
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("weights.write_safetensors", no_space)
    code, err = _one_line_error(_argv(small_dir, tmp_path / "m", "--method", "full", "--max-steps", "1"), capsys)
    assert code == 2 and len(err) == 1 and "could not write the model" in err[0]
    assert not _temporaries(tmp_path / "m") and (tmp_path / "m" / "ckpt.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "run"]  # nothing written beside --out


def _temporaries(out):
    return [p.name for p in out.iterdir() if ".tmp" in p.name or p.name.startswith(TMP)]


def test_resume_with_other_data_order_is_refused(small_dir, tmp_path):
    train.main(_argv(small_dir, tmp_path / "run", "--method", "full", "--max-steps", "1"))
    with pytest.raises(ValueError, match="--grad-accum 1, this run has 2; resume needs the same"):
        train.main(_argv(small_dir, tmp_path / "run", "--method", "full", "--max-steps", "2", "--grad-accum", "2",
                         "--resume"))


def test_nan_loss_stops_and_keeps_last_checkpoint(small_dir, tmp_path, capsys):
    with pytest.raises(FloatingPointError, match=r"(loss|gradient norm) is (nan|inf) at step \d+"):
        train.main(_argv(small_dir, tmp_path / "run", "--method", "full", "--max-steps", "20", "--lr", "1e6",
                         "--save-every", "1", "--max-grad-norm", "0", "--warmup-ratio", "0"))
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] >= 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def _changed_rank(delta):
    return int(torch.linalg.matrix_rank(delta.double(), atol=1e-6 * max(1.0, float(delta.abs().max()))))


def _check_saved_against_base(method, out, base, r):
    """The saved model changes only what `method` may change, computed from the base as stored: LIFT
    only its touched entries (base + the adapter's fp32 delta), LoRA / LoRA-XS / LoRA-SB rank(dW) <= r,
    RoCoFT r rows, HyperAdapt diag(a) W0 diag(b); every other tensor bit-exact."""
    from safetensors.torch import load_file
    saved = load_file(str(out / "model.safetensors"))
    saved = {k.removeprefix("model."): v for k, v in saved.items()}
    adapter = load_file(str(out / "adapter.safetensors")) if method != "full" else {}
    assert set(saved) == set(base)
    for k, b in base.items():
        assert saved[k].dtype == b.dtype, k
        target = k.endswith("_proj.weight")
        if method == "full" or target:
            continue
        assert torch.equal(saved[k], b), k  # embeddings, norms: never touched, never rounded
    n_changed = 0
    for k, b in base.items():
        if not k.endswith("_proj.weight") or method == "full":
            continue
        W, W0 = saved[k].double(), b.double()
        moved = W != W0
        n_changed += int(moved.sum())
        name = k.removesuffix(".weight")
        if method == "lift":
            idx, value = adapter[f"{k}.lift_index"].long(), adapter[f"{k}.lift_value"]
            allowed = torch.zeros(b.numel(), dtype=torch.bool)
            allowed[idx] = True
            assert not (moved.view(-1) & ~allowed).any()
            expect = value.to(b.dtype)
            assert torch.equal(saved[k].view(-1)[idx], expect)
        elif method in ("lora", "loraxs", "lorasb"):
            A, B, R = (adapter.get(f"{name}.{x}") for x in "ABR")
            dW = (2.0 if R is None else 1.0) * B.double() @ (A.double() if R is None else R.double() @ A.double())
            assert _changed_rank(dW) <= r, k  # LoRA's alpha = 2r: scale 2
            if b.dtype == torch.float32:
                assert _changed_rank(W - W0) <= r, k
            # the saved value is W0 + dW (dW's fp32 product) rounded once to the checkpoint's dtype
            torch.testing.assert_close(W, W0 + dW, rtol=torch.finfo(b.dtype).eps, atol=1e-5 * float(dW.abs().max()))
        elif method == "rocoft":
            assert int(moved.any(1).sum()) <= r, k
        elif method == "hyper":
            a, bb = adapter[f"{name}.a"].double(), adapter[f"{name}.b"].double()
            eps = torch.finfo(b.dtype).eps  # the product in fp32 vs float64 here: within one rounding
            torch.testing.assert_close(W, (a[:, None] * W0 * bb[None, :]).to(b.dtype).double(), rtol=2 * eps, atol=0)
    if method != "full":
        assert n_changed > 0  # training did change the targets
    return saved


SAVE_METHODS = ["full", "lora", "loraxs", "lorasb", "lift", "rocoft", "hyper"]


@pytest.mark.parametrize("method", SAVE_METHODS)
@pytest.mark.parametrize("dtype", ["bfloat16", "auto"])
def test_bf16_run_saves_an_fp32_base_in_fp32_changing_only_what_the_method_trains(small_dir, tmp_path, monkeypatch,
                                                                                     capsys, method, dtype):
    """A run with bf16 base weights (--dtype bfloat16, or auto on a CPU with bf16 instructions, faked
    here) saves an fp32 checkpoint in fp32: the merged model is the base as stored on disk plus the
    exact fp32 update, so the method's properties hold on the saved file (not: every weight rounded)."""
    from safetensors.torch import load_file
    monkeypatch.setattr(train, "bf16_fast", lambda device: True)
    r = 2
    metrics = train.main(_argv(small_dir, tmp_path / "run", "--method", method, "--rank", str(r), "--max-steps", "3",
                               "--lr", "1e-2", "--lorasb-init-samples", "8", "--dtype", dtype))
    out = capsys.readouterr().out
    assert "weights bfloat16" in out or method == "full"
    base = load_file(str(small_dir / "model.safetensors"))
    base = {k.removeprefix("model."): v for k, v in base.items()}
    _check_saved_against_base(method, tmp_path / "run", base, r)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["torch_dtype"] == "float32"
    assert metrics["saved"]["dtype"] == "float32" and metrics["saved"]["changed"] > 0
    assert "saved the merged model in float32, the base checkpoint's dtype" in out


@pytest.mark.parametrize("method", SAVE_METHODS)
def test_saved_fp32_model_is_the_trained_model_bit_for_bit(small_dir, tmp_path, monkeypatch, method):
    """An fp32 base trained with --dtype float32: model.safetensors holds exactly the weights the run
    trained in memory (merged), bit for bit, for every method; LIFT through a mask refresh. The changed
    count is at most the model's parameter count (the tied lm_head is embed_tokens: counted once)."""
    from safetensors.torch import load_file
    trained = {}
    real = train.save_merged

    def spy(model, *a, **k):
        trained.update({n: v.detach().clone() for n, v in model.state_dict().items()})
        return real(model, *a, **k)
    monkeypatch.setattr(train, "save_merged", spy)
    metrics = train.main(_argv(small_dir, tmp_path / "run", "--method", method, "--rank", "2", "--max-steps", "6",
                               "--lr", "1e-2", "--lift-interval", "3", "--lorasb-init-samples", "8", "--dtype", "float32"))
    saved = {k.removeprefix("model."): v for k, v in load_file(str(tmp_path / "run" / "model.safetensors")).items()}
    assert saved.keys() <= trained.keys() and "layers.0.self_attn.q_proj.weight" in saved
    for k, v in saved.items():
        assert v.dtype == torch.float32 and torch.equal(v, trained[k]), k
    assert 0 < metrics["saved"]["changed"] <= metrics["model_params"]


@pytest.fixture(scope="module")
def small_bf16_dir(small_dir, tmp_path_factory):
    """The small model stored in bf16 (a checkpoint released in bf16, as Llama's are)."""
    d = tmp_path_factory.mktemp("small-bf16")
    model = from_pretrained(small_dir)
    save_pretrained(model, d, state_dict={k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    Tokenizer.bytes().save(d)
    return d


@pytest.mark.parametrize("method", SAVE_METHODS)
def test_bf16_base_saves_bf16_and_says_what_rounding_lost(small_bf16_dir, tmp_path, capsys, method):
    """A bf16 checkpoint in, a bf16 checkpoint out (config.json says so), changes only where the
    method may change; the share of the update that bf16 rounds away is printed and recorded, and
    adapter.safetensors keeps the exact update in fp32."""
    from safetensors.torch import load_file
    r = 2
    lr = "3e-2" if method == "hyper" else "1e-4"  # HyperAdapt's scales move ~lr per step: 1e-4 is below bf16's 0.4%
    metrics = train.main(_argv(small_bf16_dir, tmp_path / "run", "--method", method, "--rank", str(r), "--max-steps",
                               "3", "--lr", lr, "--lorasb-init-samples", "8", "--dtype", "float32"))
    out = capsys.readouterr().out
    base = {k.removeprefix("model."): v for k, v in load_file(str(small_bf16_dir / "model.safetensors")).items()}
    _check_saved_against_base(method, tmp_path / "run", base, r)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    saved = metrics["saved"]
    assert saved["dtype"] == "bfloat16" and 0 < saved["rounded_away"] < saved["changed"]
    assert f"{saved['rounded_away']:,} of the {saved['changed']:,} entries the update changes" in out
    if method != "full":  # the exact update: fp32, and not rounded to the weights' precision
        adapter = load_file(str(tmp_path / "run" / "adapter.safetensors"))
        floats = [v for k, v in adapter.items() if v.is_floating_point()]
        assert floats and all(v.dtype == torch.float32 for v in floats)


def _save_merged_whole(model, module, s, base_dir, run, path):
    """The reference: what save_merged wrote before it streamed (the adapter read from the folder `run`,
    the model written to `path`). The whole base and every merged matrix in memory at once (8B: 58 GB),
    the dict saved by safetensors.torch.save_file. Returns its counts."""
    from safetensors.torch import load_file, save_file
    base = {k.removeprefix("model."): v for k, v in load_file(str(base_dir / "model.safetensors")).items()}
    tied = model.config.tie_embeddings
    if tied:
        base["lm_head.weight"] = base["embed_tokens.weight"]
    if trains_base(module):
        merged = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    else:
        merged = module.merge_adapter(base, load_file(str(run / "adapter.safetensors")), s)
    sd = {k: merged[k].to(base[k].dtype) if k in merged else base[k] for k in base}
    changed = rounded = 0
    for k, W in merged.items():
        if k == "lm_head.weight" and tied:
            continue
        moved = W != base[k].float()
        changed += int(moved.sum())
        rounded += int((moved & (sd[k] == base[k])).sum())
    if tied:
        del sd["lm_head.weight"]
    save_file({"model." + k if k != "lm_head.weight" else k: v for k, v in sd.items()}, str(path),
              metadata={"format": "pt"})
    return {"changed": changed, "rounded_away": rounded}


@pytest.fixture(scope="module")
def small_untied_bf16_dir(tmp_path_factory):
    """A bf16 checkpoint with its own lm_head (not tied to the embeddings)."""
    d = tmp_path_factory.mktemp("untied-bf16")
    model = tiny_model(seed=3, vocab=264)
    save_pretrained(model, d, state_dict={k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    return d


def _fine_tuned(method, base_dir, out, steps=2):
    """(model, module, settings) after a few steps of `method` from the base in fp32 (as full fine-tuning
    keeps its master weights), its adapter saved in `out` as a run saves it (save_adapter)."""
    model = from_pretrained(base_dir, dtype=torch.float32)
    opt = prepare(method, model, batches=make_batches(), lr=1e-4, rank=2)
    run_steps(model, opt, batch_stream(), steps)
    module = METHODS[method][0]
    out.mkdir()
    save_adapter(module, model, opt, out)
    return model, module, SETTINGS_OF[id(opt)]


@pytest.mark.parametrize("method", ["full", "lora", "lift", "hyper"])
@pytest.mark.parametrize("base", ["small_dir", "small_bf16_dir", "small_untied_bf16_dir"])
def test_streamed_save_is_the_whole_dict_save_byte_for_byte(base, method, tmp_path, request, capsys):
    """save_merged, one tensor at a time, writes the very bytes the whole-dict merge wrote
    (_save_merged_whole: every matrix merged at once, safetensors.torch.save_file), and counts the same
    changed and rounded-away entries: fp32 and bf16 bases, a tied and an untied lm_head."""
    base_dir = request.getfixturevalue(base)
    model, module, s = _fine_tuned(method, base_dir, tmp_path / "run")
    args = SimpleNamespace(method=method, out=str(tmp_path / "run"), seed=0)
    saved = save_merged(model, Tokenizer.bytes(), args, s, str(base_dir))
    expected = _save_merged_whole(model, module, s, base_dir, tmp_path / "run", tmp_path / "whole.safetensors")
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    dtype = "float32" if base == "small_dir" else "bfloat16"
    assert saved == {"dtype": dtype, **expected} and saved["changed"] > 0
    assert f"saved the merged model in {dtype}, the base checkpoint's dtype" in capsys.readouterr().out


def _peak_mb(f):
    """(f(), how far this process's resident memory rose above its level before f while f ran, in MB):
    Linux's peak resident size (VmHWM, reset by /proc/self/clear_refs) against the resident size before.
    It counts everything: tensors, temporaries, the mapped pages of the base file being read. glibc keeps
    freed blocks below its mmap threshold resident for reuse (it raises the threshold up to 32 MB as large
    blocks are freed), which would count blocks no longer in use; an 8B model's matrices (200 MB and more)
    are above it, mapped and unmapped as they come and go. The test's smaller tensors are put in that
    regime: the threshold fixed at 1 MB (mallopt) while f runs, free heap memory handed back before."""
    import ctypes
    libc, M_MMAP_THRESHOLD = ctypes.CDLL("libc.so.6"), -3
    resident = lambda field: int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) / 1024
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    try:
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as reset:
            reset.write("5")  # the peak (VmHWM) starts again from the resident size now
        before = resident("VmRSS:")
        return f(), resident("VmHWM:") - before
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # where glibc's own adjustment of the threshold ends


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK) or platform.libc_ver()[0] != "glibc",
                    reason="needs Linux's /proc/self/clear_refs (the peak resident size reset) and glibc")
@pytest.mark.parametrize("method", ["lora", "full"])
def test_streamed_save_holds_about_one_matrix(method, tmp_path):
    """Saving the merged model holds about one matrix beside the model itself, not the whole model: the
    rise of the process's peak resident memory while save_merged runs (_peak_mb), on a bf16 base of 120 MB
    (240 MB in fp32, 37 tensors), is at most 4 fp32 copies of its largest tensor (16 MB) + 12 MB: the base
    tensor being read, the merged value in fp32, the merge's own temporaries (LoRA: W0 widened, B.A
    scaled, their sum), the rounded copy being written. The whole-dict reference (_save_merged_whole),
    measured the same way, holds the whole base and every merged matrix (and its rounded copy) at once.
    Both write the same bytes. (`pytest -s` prints the two peaks side by side.)"""
    cfg = ModelConfig(dim=1024, n_layers=4, n_heads=8, n_kv_heads=8, vocab_size=4096, multiple_of=256)
    base_dir = tmp_path / "base"
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = Transformer(cfg)
    sd = {k: torch.randn(v.shape).mul_(0.02).to(torch.bfloat16) for k, v in shapes.state_dict().items()}
    save_pretrained(shapes, base_dir, state_dict=sd)
    del sd
    sizes = [v.numel() * 4 / 2 ** 20 for v in shapes.state_dict().values()]  # in fp32, MB
    model, module, s = _fine_tuned(method, base_dir, tmp_path / "run", steps=1)
    args = SimpleNamespace(method=method, out=str(tmp_path / "run"), seed=0)
    saved, streamed = _peak_mb(lambda: save_merged(model, None, args, s, str(base_dir)))
    expected, whole = _peak_mb(lambda: _save_merged_whole(model, module, s, base_dir, tmp_path / "run",
                                                          tmp_path / "whole.safetensors"))
    print(f"\n{method}: peak memory above the model while saving: streamed {streamed:.0f} MB, whole dict "
          f"{whole:.0f} MB (the largest tensor in fp32: {max(sizes):.0f} MB)")
    assert saved == {"dtype": "bfloat16", **expected} and saved["changed"] > 0
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    assert streamed <= 4 * max(sizes) + 12, (streamed, whole)
    assert whole > sum(sizes) / 2  # the measure sees the whole bf16 base the whole-dict save holds
