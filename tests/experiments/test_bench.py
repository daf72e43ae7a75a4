"""experiments/bench.py gpu --micro: the GPU script's code path (every method, with and without checkpointing, the
memory plan beside each) on a micro model on the CPU; bench fsdp: memory per process, sharded and not."""
import sys

from conftest import ROOT


def test_gpu_bench_runs_its_code_path_on_the_cpu():
    """experiments/bench.py gpu --micro: the GPU script's code (every method, without and with checkpointing, the
    memory plan beside each, the LIFT / LoRA checks) on a micro model on the CPU."""
    import subprocess
    done = subprocess.run([sys.executable, "-m", "experiments.bench", "gpu", "--micro", "--steps", "1", "--methods",
                           "full,lora,lift,rocoft-row,lorasb"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.split()[:1] in
            (["full"], ["lora"], ["lift"], ["rocoft-row"], ["lorasb"])]
    assert [(r[0], r[1]) for r in rows] == [(m, c) for c in ("off", "on") for m in
                                           ("full", "lora", "lift", "rocoft-row", "lorasb")]
    assert all(float(r[7]) > 0 for r in rows)  # the plan's GB beside every method
    assert done.stdout.count("LIFT / LoRA step time") == 2


def test_fsdp_bench_measures_each_process(small_dir):
    """experiments/bench.py fsdp: 2-process data parallel against --fsdp on one model, under two allocator
    settings; the table's 'tensors held' halves under --fsdp (the model's shapes split evenly in 2) and
    is the same with either allocator (it counts tensors, not what the allocator keeps)."""
    from experiments import bench
    rows = bench.main(["fsdp", "--model", str(small_dir), "--methods", "lora", "--steps", "1", "--batch", "2",
                       "--seq", "64"])
    assert [(m, malloc, fsdp) for m, malloc, fsdp, _ in rows] == [
        ("lora", a, f) for a in ("default", "65536") for f in (False, True)]
    held = {(malloc, fsdp): mb[0] for _, malloc, fsdp, mb in rows}
    assert held[("default", False)] == held[("65536", False)] > 0
    assert abs(held[("default", True)] / held[("default", False)] - 0.5) < 0.01
    assert all(mb[1] > 0 and mb[2] >= mb[1] for *_, mb in rows)  # resident now, and its peak
