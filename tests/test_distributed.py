"""distributed.py: torchrun data parallel and --fsdp (gloo on the CPU, 2 processes) equal one process with
--grad-accum 2; a process group that never forms or loses a process fails clearly, within its timeout."""
import json
import os
import sys
import time

import numpy as np
import pytest
import torch

import math_data
import train
from conftest import ROOT, _argv, _one_line_error, _weights
from distributed import free_port
from model import ModelConfig, Transformer
from tokenizer import Tokenizer
from weights import from_pretrained, save_pretrained


# data parallel (torchrun, gloo on the CPU, 2 processes)

DP_METHODS = {  # each method's run: several steps, with a LIFT mask refresh, LoRA-SB's init, RoCoFT's Wanda scores
    "full": [], "lora": ["--rank", "2"], "lift": ["--rank", "2", "--lift-interval", "2"],
    "lorasb": ["--rank", "2", "--lorasb-init-samples", "8"], "loraxs": ["--rank", "2"],
    "rocoft": ["--rank", "2", "--rocoft-select", "max", "--rocoft-score-batches", "2"], "hyper": []}


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """GSM8K-shaped rows whose solutions (the targets) run from 8 to ~90 bytes."""
    f = tmp_path_factory.mktemp("uneven") / "train.jsonl"
    rows = [{"question": f"What is {i} + {i % 7}?", "answer": "Add them. " * (i % 9) + f"#### {i + i % 7}"}
            for i in range(64)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def _dp_argv(small_dir, out, method, data):
    return _argv(small_dir, out, "--method", method, "--max-steps", "4", "--lr", "1e-2", "--data", str(data),
                 "--seq-len", "256", "--dtype", "float32", *DP_METHODS[method])  # fp32: equal to fp32 tolerance


GRAD_SPY = """
import torch
GRADS = []  # each step's trainable gradients, as the loop clips them (after the all-reduce)
_clip = torch.nn.utils.clip_grad_norm_
def _spy(params, *a, **k):
    GRADS.append([p.grad.detach().clone() for p in params if p.grad is not None])
    return _clip(params, *a, **k)
torch.nn.utils.clip_grad_norm_ = _spy
"""


def _one_process_grads(argv):
    """train.main(argv) in this process; (its metrics, each step's trainable gradients)."""
    env = {}
    exec(GRAD_SPY, env)
    try:
        return train.main(argv), env["GRADS"]
    finally:
        torch.nn.utils.clip_grad_norm_ = env["_clip"]


def test_torchrun_equals_one_process_with_grad_accum(small_dir, tmp_path, uneven):
    """`torchrun --nproc_per_node=2 train.py --batch-size 4` = `python train.py --batch-size 4
    --grad-accum 2` = `python train.py --batch-size 8`: the same gradient at every step (every target
    token of a step weighs the same, on rows of unequal target length) and the same weights at the end,
    for every method; only process 0 writes; each step all-reduces the trainable gradients only (LIFT:
    its k values, not the dense matrices)."""
    import subprocess
    script = tmp_path / "runs.py"  # one torchrun launch runs every method (one process group)
    script.write_text(GRAD_SPY + "import sys, train\n"
                      f"sys.path.insert(0, {str(ROOT)!r})\n"
                      f"for argv in {[_dp_argv(small_dir, tmp_path / f'{m}-dp', m, uneven) for m in DP_METHODS]!r}:\n"
                      "    GRADS.clear()\n"
                      "    train.main(argv)\n"
                      "    if torch.distributed.get_rank() == 0:\n"
                      "        torch.save(GRADS, argv[argv.index('--out') + 1] + '/grads.pt')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           f"--master-port={free_port()}", str(script)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("data parallel: 2 processes (gloo)") == len(DP_METHODS)  # printed once: process 0
    examples, _ = train.training_examples(math_data.load_problems(str(uneven), "train"), Tokenizer.bytes(), 256, False)
    assert len(examples) == 64 and len({train.n_targets([e]) for e in examples}) >= 9  # unequal target lengths
    for m in DP_METHODS:
        one, one_grads = _one_process_grads(_dp_argv(small_dir, tmp_path / f"{m}-one", m, uneven) + ["--grad-accum", "2"])
        big, big_grads = _one_process_grads(_dp_argv(small_dir, tmp_path / f"{m}-big", m, uneven) + ["--batch-size", "8"])
        dp_grads = torch.load(tmp_path / f"{m}-dp" / "grads.pt", weights_only=True)
        assert len(dp_grads) == len(one_grads) == len(big_grads) == 4
        for step, (a, b, c) in enumerate(zip(dp_grads, one_grads, big_grads)):
            assert len(a) == len(b) == len(c) > 0
            for ga, gb, gc in zip(a, b, c):
                torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6, msg=f"{m} step {step}: 2 processes vs accum 2")
                if m != "rocoft":  # (--rocoft-score-batches counts batches: at batch 8 it scores other examples)
                    torch.testing.assert_close(gc, gb, rtol=1e-4, atol=1e-6, msg=f"{m} step {step}: batch 8 vs accum 2")
        a, b, c = _weights(tmp_path / f"{m}-dp"), _weights(tmp_path / f"{m}-one"), _weights(tmp_path / f"{m}-big")
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{m} {k}")
            if m != "rocoft":
                torch.testing.assert_close(c[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{m} {k}")
        assert any(not torch.equal(b[k], v) for k, v in _weights(small_dir).items())  # it trained
        dp = json.loads((tmp_path / f"{m}-dp" / "metrics.json").read_text())
        assert dp["processes"] == 2 and one["processes"] == 1 and dp["trainable"] == one["trainable"] == big["trainable"]
        # one fp32 message per step: the trainable gradients and 3 numbers (loss, tokens, stop)
        assert dp["allreduce_bytes_per_step"] == 4 * (dp["trainable"] + 3), m
        logged = [[json.loads(l)["loss"] for l in open(tmp_path / r / "log.jsonl")] for r in (f"{m}-dp", f"{m}-one", f"{m}-big")]
        np.testing.assert_allclose(logged[0], logged[1], rtol=1e-5)  # the step's loss: its targets' mean
        if m != "rocoft":
            np.testing.assert_allclose(logged[2], logged[1], rtol=1e-5)
    lift_dp = json.loads((tmp_path / "lift-dp" / "metrics.json").read_text())
    assert lift_dp["trainable"] < lift_dp["model_params"] / 5  # LIFT sends its k values, not its matrices
    with pytest.raises(ValueError, match="--processes 2"):  # the data order depends on the process count
        train.main(_dp_argv(small_dir, tmp_path / "lora-dp", "lora", uneven) + ["--resume"])


def test_data_parallel_failures_are_clear_and_bounded(small_dir, tmp_path):
    """A process group that never forms (one of two processes started) and a process that dies in the
    middle of training: the other fails with a one-line error within its timeout, it does not hang."""
    import subprocess
    def start(rank, port, out, *extra):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        return subprocess.Popen([sys.executable, "train.py", *_argv(small_dir, out, "--method", "lora", "--rank", "2",
                                                                   *extra)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    t = time.time()
    alone = start(0, free_port(), tmp_path / "alone", "--dist-timeout", "3")
    _, err = alone.communicate(timeout=120)
    assert alone.returncode == 2 and "could not meet the others" in err and "--dist-timeout 3" in err, err
    assert err.strip().count("\n") == 0 and time.time() - t < 60
    port = free_port()
    p0, p1 = (start(r, port, tmp_path / "dies", "--max-steps", "100000", "--dist-timeout", "60") for r in (0, 1))
    log = tmp_path / "dies" / "log.jsonl"
    while not (log.exists() and log.read_text().count("\n") >= 2):  # training, steps logged
        assert p0.poll() is None and time.time() - t < 300, p0.communicate()[1][-2000:]
        time.sleep(0.2)
    p1.kill()
    t = time.time()
    _, err = p0.communicate(timeout=120)
    p1.communicate()
    assert p0.returncode == 2 and "error: data parallel, process 0:" in err, err[-2000:]
    assert time.time() - t < 60


# sharded data parallel (torchrun --fsdp: FSDP2, gloo on the CPU, 2 processes)

FSDP_METHODS = list(DP_METHODS)  # LIFT included: its mask refreshed (on the gathered matrices) at step 2
CONSTANT = ["--schedule", "constant", "--warmup-ratio", "0"]  # a run that --resume may extend past its length


def test_fsdp_equals_one_process_with_grad_accum(small_dir, tmp_path, uneven):
    """`torchrun --nproc_per_node=2 train.py --batch-size 4 --fsdp` = `python train.py --batch-size 4
    --grad-accum 2`, for every method it runs: the same logged losses and the same saved model (fp32
    tolerance); the saved model is an ordinary Hugging Face folder (transformers reads it and gives the
    same logits); a sharded run stopped after 2 steps and resumed from its checkpoint (written by
    gathering the shards, read back by cutting them) ends bit-identical to the run that did not stop,
    for every method."""
    import subprocess
    runs = [_dp_argv(small_dir, tmp_path / f"{m}-fsdp", m, uneven) + ["--fsdp"] for m in FSDP_METHODS]
    odd = tmp_path / "odd"  # rows that 2 processes split unevenly (10, 51): LIFT's entries fall on both sides
    save_pretrained(Transformer(ModelConfig(dim=40, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=264, hidden_dim=51,
                                            rope_theta=10000.0, tie_embeddings=True)).init_weights(1), odd)
    Tokenizer.bytes().save(odd)
    runs.append(_dp_argv(odd, tmp_path / "lift-odd-fsdp", "lift", uneven) + ["--fsdp"])
    for m in FSDP_METHODS:  # resume: 2 steps, then --resume to 4, against 4 straight (constant lr)
        whole = _dp_argv(small_dir, tmp_path / f"{m}-straight", m, uneven) + ["--fsdp", *CONSTANT]
        half = _dp_argv(small_dir, tmp_path / f"{m}-resumed", m, uneven) + ["--fsdp", *CONSTANT]
        runs += [whole, [*half, "--max-steps", "2"], [*half, "--resume"]]
    script = tmp_path / "fsdp.py"  # one torchrun launch (one process group) runs them all
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport train\n"
                      f"for argv in {runs!r}:\n    train.main(argv)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           f"--master-port={free_port()}", str(script)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("sharded data parallel (FSDP2): 2 processes (gloo)") == len(runs)
    for m in FSDP_METHODS:
        one = train.main(_dp_argv(small_dir, tmp_path / f"{m}-one", m, uneven) + ["--grad-accum", "2"])
        a, b = _weights(tmp_path / f"{m}-fsdp"), _weights(tmp_path / f"{m}-one")
        assert set(a) == set(b)
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{m} {k}")
        assert any(not torch.equal(b[k], v) for k, v in _weights(small_dir).items())  # it trained
        logged = [[json.loads(l)["loss"] for l in open(tmp_path / r / "log.jsonl")] for r in (f"{m}-fsdp", f"{m}-one")]
        np.testing.assert_allclose(logged[0], logged[1], rtol=1e-5)
        sharded = json.loads((tmp_path / f"{m}-fsdp" / "metrics.json").read_text())
        assert sharded["processes"] == 2 and sharded["trainable"] == one["trainable"]
        # each process holds half of the weights and AdamW moments (+ the padding of odd rows, whole buffers);
        # LIFT's k entries' fp32 values and moments stay whole in each process
        held, alone = [p["held"] for p in sharded["memory_mb"]], one["memory_mb"][0]["held"]
        whole = 3 * 4 * one["trainable"] / 2**20 if m == "lift" else 0
        assert len(held) == 2 and all(0.45 < (h - whole) / (alone - whole) < 0.55 for h in held), (m, held, alone)
    train.main(_dp_argv(odd, tmp_path / "lift-odd-one", "lift", uneven) + ["--grad-accum", "2"])
    a, b = _weights(tmp_path / "lift-odd-fsdp"), _weights(tmp_path / "lift-odd-one")
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"lift, odd rows: {k}")
    for m in FSDP_METHODS:
        a, b = _weights(tmp_path / f"{m}-resumed"), _weights(tmp_path / f"{m}-straight")
        assert all(torch.equal(a[k], b[k]) for k in b), m
        assert "resumed from" in done.stdout
    # the saved folder is a Hugging Face model: transformers' logits equal ours
    from transformers import AutoModelForCausalLM
    ours = from_pretrained(tmp_path / "full-fsdp").eval()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "full-fsdp", torch_dtype=torch.float32).eval()
    x = torch.randint(0, 264, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), rtol=1e-4, atol=1e-4)


def test_fsdp_refusals_are_one_line(small_dir, tmp_path, monkeypatch, capsys):
    """--fsdp without torchrun's processes, and with --eval-every (process 0 alone would gather the
    others' shards), stop before anything loads: one line that says why and what to do instead."""
    code, lines = _one_line_error(_argv(small_dir, tmp_path / "alone", "--method", "lora", "--fsdp"), capsys)
    assert code == 2 and len(lines) == 1 and "torchrun --nproc-per-node" in lines[0], lines
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, lines = _one_line_error(_argv(small_dir, tmp_path / "lift", "--method", "lora", "--fsdp", "--eval-every",
                                        "2"), capsys)  # process 0 alone would gather the others' shards: a hang
    assert code == 2 and len(lines) == 1 and "--eval-every 2 with --fsdp" in lines[0], lines
    assert not (tmp_path / "lift").exists() and not (tmp_path / "alone").exists()
