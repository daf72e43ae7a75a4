"""
The experiments: scripts that use the library (the top-level files) to test the papers' claims and to
measure it; the library never imports them. Run each from the repository root as a module:

    python -m experiments.claims table ...    the papers' Table 2 on real data (table.py, runs.py)
    python -m experiments.claims noise ...    the LIFT / RoCoFT / LoRA-SB / HyperAdapt claims (perturb.py)
    python -m experiments.analyze BASE TUNED  what a fine-tuned model changed, per matrix
    python -m experiments.bench methods       speed and memory, side by side
    python -m experiments.memory              the training-memory plan per method and GPU

Every script's command line answers bad input the same way, before anything is built or loaded: one
line on stderr, `error: ...` naming the flag (or file), the value and what is allowed, and exit
status 2 (command_line, and the checks below).
"""
import math
import os
import sys

# bad input, a missing or unreadable file, a failed write, an optional package not installed, a run
# that diverged: one line and exit status 2; any other exception is a bug and keeps its traceback
USER_ERRORS = (ValueError, OSError, ImportError, FloatingPointError)


def command_line(main, argv=None) -> int:
    """A script's entry point: main(argv), its exit status (0; 2 for USER_ERRORS, one line on stderr;
    130 on Ctrl-C)."""
    try:
        main(argv)
    except KeyboardInterrupt:
        return 130
    except USER_ERRORS as e:
        text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"error: {text or type(e).__name__}", file=sys.stderr)
        return 2
    return 0


def shown(value) -> str:
    """A flag's value as an error line shows it (an empty one as '')."""
    return "''" if value == "" else str(value)


def refuse(flag: str, value, allowed: str):
    """The one-line answer to a bad value: `--flag value is not allowed: allowed`."""
    raise ValueError(f"--{flag.replace('_', '-')} {shown(value)} is not allowed: {allowed}")


def check_counts(args, **bounds):
    """Each named integer flag of `args` unset or within its (low, high) bounds, both included."""
    for name, (low, high) in bounds.items():
        value = vars(args)[name]
        if value is not None and not low <= value <= high:
            refuse(name, value, f"a whole number from {low:,} to {high:,}")


def check_number(flag: str, value: float, low: float = 0.0, high: float = math.inf, allowed: str = ""):
    """A float flag finite, above `low` and at most `high`."""
    if not (math.isfinite(value) and low < value <= high):
        refuse(flag, value, allowed or f"a finite number > {low:g}" + (f" and <= {high:g}" if high < math.inf else ""))


def check_threads(args):
    """--threads from 1 to this machine's CPUs (more threads only wait for each other)."""
    if not 1 <= args.threads <= (os.cpu_count() or 1):
        refuse("threads", args.threads, f"1 to {os.cpu_count() or 1} (the CPUs of this machine)")


def check_model(label: str, name: str):
    """The model a flag (`label`: --model, or a positional's name) names is one weights.load reads,
    checked without reading it: `tiny` (the only preset with a tokenizer), a named GGUF model whose
    package is installed, or an existing file or folder."""
    from model import PRESETS
    from weights import GGUF_MODELS, gguf_path
    if name == "tiny":
        return
    if name in GGUF_MODELS:
        gguf_path(name)  # FileNotFoundError naming the package to install
        return
    if name in PRESETS:
        raise ValueError(f"{label} {name} is not allowed: a preset other than tiny has no tokenizer; pass a model "
                         "folder or a .gguf file")
    if not os.path.exists(name):
        raise FileNotFoundError(f"{label} {shown(name)}: no such folder or file (and not tiny or a named model: "
                                f"{', '.join(GGUF_MODELS)})")
