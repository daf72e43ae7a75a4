"""distributed.py: torchrun data parallel (gloo on the CPU, 2 processes) equals one process with
--grad-accum 2; a process group that never forms or loses a process fails clearly, within its timeout."""
import json
import os
import sys
import time

import pytest
import torch

import train
from conftest import ROOT, _argv, _weights


# data parallel (torchrun, gloo on the CPU, 2 processes)

DP_METHODS = {  # each method's run: several steps, with a LIFT mask refresh, LoRA-SB's init, RoCoFT's Wanda scores
    "full": [], "lora": ["--rank", "2"], "lift": ["--rank", "2", "--lift-interval", "2"],
    "lorasb": ["--rank", "2", "--lorasb-init-samples", "8"], "loraxs": ["--rank", "2"],
    "rocoft": ["--rank", "2", "--rocoft-select", "max", "--rocoft-score-batches", "2"], "hyper": []}


def _dp_argv(small_dir, out, method):
    return _argv(small_dir, out, "--method", method, "--max-steps", "4", "--lr", "1e-2", *DP_METHODS[method])


def _free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_equals_one_process_with_grad_accum(small_dir, tmp_path):
    """`torchrun --nproc_per_node=2 train.py --batch-size b` ends with the same weights as `python
    train.py --batch-size b --grad-accum 2`, for every method; only process 0 writes; each step
    all-reduces the trainable gradients only (LIFT: its k values, not the dense matrices)."""
    import subprocess
    script = tmp_path / "runs.py"  # one torchrun launch runs every method (one process group)
    script.write_text("import sys, train\n"
                      f"sys.path.insert(0, {str(ROOT)!r})\n"
                      f"for argv in {[_dp_argv(small_dir, tmp_path / f'{m}-dp', m) for m in DP_METHODS]!r}:\n"
                      "    train.main(argv)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           f"--master-port={_free_port()}", str(script)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("data parallel: 2 processes (gloo)") == len(DP_METHODS)  # printed once: process 0
    for m in DP_METHODS:
        one = train.main(_dp_argv(small_dir, tmp_path / f"{m}-one", m) + ["--grad-accum", "2"])
        a, b = _weights(tmp_path / f"{m}-dp"), _weights(tmp_path / f"{m}-one")
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{m} {k}")
        assert any(not torch.equal(b[k], v) for k, v in _weights(small_dir).items())  # it trained
        dp = json.loads((tmp_path / f"{m}-dp" / "metrics.json").read_text())
        assert dp["processes"] == 2 and one["processes"] == 1 and dp["trainable"] == one["trainable"]
        # one fp32 message per step: the trainable gradients and 3 numbers (loss, tokens, stop)
        assert dp["allreduce_bytes_per_step"] == 4 * (dp["trainable"] + 3), m
    lift_dp = json.loads((tmp_path / "lift-dp" / "metrics.json").read_text())
    assert lift_dp["trainable"] < lift_dp["model_params"] / 5  # LIFT sends its k values, not its matrices
    with pytest.raises(ValueError, match="--processes 2"):  # the data order depends on the process count
        train.main(_dp_argv(small_dir, tmp_path / "lora-dp", "lora") + ["--resume"])


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
    alone = start(0, _free_port(), tmp_path / "alone", "--dist-timeout", "3")
    _, err = alone.communicate(timeout=120)
    assert alone.returncode == 2 and "could not meet the others" in err and "--dist-timeout 3" in err, err
    assert err.strip().count("\n") == 0 and time.time() - t < 60
    port = _free_port()
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
