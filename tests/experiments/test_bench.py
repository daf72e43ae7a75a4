"""experiments/bench.py gpu --micro: the GPU script's code path (every method, with and without checkpointing, the
memory plan beside each) on a micro model on the CPU."""
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
