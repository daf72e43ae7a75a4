"""
The command line of train.py: its run flags, plus each method's settings derived from the method's
settings dataclass (its paper's defaults, each with its source; a flag overrides only what it names).
Every flag and setting is checked here, before anything is loaded: a bad value is one line naming it.
"""
import argparse
import json
import math
import os
import types
from dataclasses import dataclass, fields
from pathlib import Path

import torch

import eval_math
from builtin import BUILTIN, BUILTIN_PRETRAIN_STEPS
from methods import METHODS
from model import PRESETS
from targets import LINEAR_NAMES, positive_finite

HELP = """
The one plain training loop every method shares.

    python train.py --method lift --rank 128        # built-in default: tiny LLaMA, synthetic problems, no downloads
    python train.py --method rocoft                 # RoCoFT with its paper's settings (see --help)
    python train.py --method lora --rank 16 --model ~/Llama-3.2-1B --data gsm8k --eval-data gsm8k
    python train.py --method lift --model smollm2-135m --max-steps 60 --batch-size 8   # a real model on a laptop

Each method lives in its own file and meets this loop through the contract in methods.py: Settings
(its paper's defaults, each with its source), prepare(model, settings, batches, *, the run's facts)
-> optimizer, adapter_state, merge_adapter and merge (`full` fine-tuning too: full.py). `python train.py --method M --help` lists M's
settings with their defaults and sources; a flag overrides only what it names, and the resolved
settings are printed before training. The built-in default pretrains a tiny base model on addition
and subtraction word problems (synth-source, cached under out/), fine-tunes it on multiplication
problems written in the same answer format (synth-target) and prints accuracy before and after:
learning (target) and forgetting (source, and its arithmetic with the equation given).
"""  # `python train.py --help`

DTYPES = ("auto", "float32", "bfloat16")  # --dtype
TARGET_GROUPS = {"all": LINEAR_NAMES, "attn": LINEAR_NAMES[:4], "mlp": LINEAR_NAMES[4:]}
# Settings every method has (flags without a prefix); the rest are a method's own knobs, as
# --<method>-<name>. The help text is here, the default and its source in the method's file.
COMMON = {
    "rank": "the method's rank r (what r counts differs per method: README)",
    "targets": "modules to adapt: comma-separated q_proj,...,down_proj, or all / attn / mlp",
    "lr": "peak learning rate",
    "betas": "AdamW betas, comma-separated",
    "eps": "AdamW epsilon",
    "weight_decay": "AdamW decoupled weight decay",
    "max_grad_norm": "clip the gradient's global norm to this (0 = off)",
    "schedule": "learning-rate decay after warmup: linear, cosine or constant",
    "warmup_ratio": "share of the steps spent on linear warmup",
    "epochs": "passes over the training data (--max-steps overrides)",
    "batch_size": "examples per micro-batch; a step is batch-size x grad-accum examples",
}


@dataclass(frozen=True)
class Run:
    """One run's settings besides the method's own (those are its Settings): every flag of
    build_parser, resolved by parse_args (defaults filled in, --eval-data none -> ""), and whether the
    run is the built-in default (no --model, no --data). Built once, here; read everywhere else."""
    method: str
    model: str | None
    data: str
    train_limit: int | None
    seq_len: int
    train_on_prompt: bool
    train_format: str
    max_steps: int | None
    grad_accum: int
    seed: int
    grad_checkpoint: bool
    pretrain_steps: int
    eval_data: str
    eval_limit: int | None
    eval_every: int
    eval_batch_size: int
    max_new_tokens: int | None
    protocol: str
    num_beams: int | None
    forget_prompts: int
    out: str
    resume: bool
    overwrite: bool
    log_every: int
    save_every: int
    device: str
    dtype: str
    dist_timeout: float
    fsdp: bool
    threads: int
    builtin: bool


def _flag(method, f):
    return "--" + (f.name if f.name in COMMON else f"{method}-{f.name}").replace("_", "-")


def _parse_value(f):
    """The command-line parser of a settings field, from its type."""
    if f.name == "targets":
        return lambda v: tuple(TARGET_GROUPS.get(v) or [t for t in v.split(",") if t])
    if f.type == tuple[float, float]:
        return _two_floats
    if isinstance(f.type, types.UnionType):  # int | None, float | None: None is the unset default
        return next(t for t in f.type.__args__ if t is not type(None))
    return f.type  # int, float, str


def _two_floats(v):
    try:
        b = tuple(float(x) for x in v.split(","))
    except ValueError:
        b = ()
    if len(b) != 2:
        raise argparse.ArgumentTypeError(f"needs two comma-separated numbers (beta1,beta2), got {v!r}")
    return b


def _tiny_source(f):
    why = "a short sweep" if f.name == "lr" else "the built-in run is 150 steps"
    return f"{f.metadata['tiny']} on the tiny built-in model ({why})"


def build_parser(method: str, builtin: bool) -> argparse.ArgumentParser:
    p = eval_math.Parser(description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("method")
    g.add_argument("--method", default="lift", help=f"one of: {', '.join(METHODS)}")
    cls = METHODS[method][1]
    own = {f.name: f for f in fields(cls)}
    g = p.add_argument_group(f"settings of {method} (default: its paper's, source in brackets; "
                             "--method M --help shows M's)")
    for name, text in COMMON.items():
        f = own.get(name)
        tiny = builtin and f is not None and "tiny" in f.metadata
        extra = (f" [{method} has no {name}; ignored]" if f is None else f" [default: {_tiny_source(f)}]" if tiny
                 else f" [default {f.default}: {f.metadata['source']}]")
        g.add_argument("--" + name.replace("_", "-"), default=None, type=_parse_value(f) if f else str,
                       help=(text + extra).replace("%", "%%"))
    for m, (_, c) in METHODS.items():  # every method's own knobs; another method's are noted and ignored
        knobs = [f for f in fields(c) if f.name not in COMMON]
        if not knobs:
            continue
        g = p.add_argument_group(f"{m}'s own settings") if m == method else g
        for f in knobs:
            help_ = f"{f.metadata.get('help', '')} [default {f.default}: {f.metadata['source']}]".replace("%", "%%")
            g.add_argument(_flag(m, f), default=None, type=_parse_value(f), dest=f"{m}__{f.name}", metavar=f.name.upper(),
                           choices=f.metadata.get("choices"), help=help_ if m == method else argparse.SUPPRESS)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None, help="model folder (Hugging Face or Meta layout), a .gguf file, a preset, "
                   "or smollm2-135m; default: the built-in tiny base")
    g.add_argument("--data", default=None, help="training data spec (math_data.load_problems); default synth-target")
    g.add_argument("--train-limit", type=int, default=None, help="train on at most this many problems")
    g.add_argument("--seq-len", type=int, default=512, help="truncate prompt+solution to this many tokens")
    g.add_argument("--train-on-prompt", action="store_true", help="also put loss on the prompt tokens")
    g.add_argument("--train-format", default="nanopeft", choices=eval_math.TRAIN_FORMATS,
                   help="how a training example is written (eval_math.training_pair)")
    g = p.add_argument_group("training loop")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs); 0 = evaluate the start")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing per block (saves memory)")
    g.add_argument("--pretrain-steps", type=int, default=BUILTIN_PRETRAIN_STEPS, help="steps to pretrain the built-in base (first run only)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-data", default=None,
                   help="comma-separated eval specs (none = no evaluation); default --data, or for the built-in run "
                        "synth-target,synth-source,synth-source-facts")
    g.add_argument("--eval-limit", type=int, default=None, help="evaluate on at most this many problems per dataset")
    g.add_argument("--eval-every", type=int, default=0,
                   help="evaluate every N steps (0 = only at the end); log.jsonl keeps each accuracy")
    g.add_argument("--eval-batch-size", type=int, default=64)
    g.add_argument("--max-new-tokens", type=int, default=None, help="generation budget per problem; default eval_math's")
    g.add_argument("--protocol", default="nanopeft", choices=eval_math.PROTOCOLS,
                   help="nanopeft (first '#### N', greedy) or llm-adapters (the papers': last number, first capital "
                        "A-E, 4-beam search)")
    g.add_argument("--num-beams", type=int, default=None, help="beams in evaluation (1 = greedy); default: the protocol's")
    g.add_argument("--forget-prompts", type=int, default=100,
                   help="real models: forgetting = drift from the base model on its own greedy continuations of this "
                        "many neutral prompts (1-100, generated once, cached in base-cache/ beside --out; 0 = off)")
    g = p.add_argument_group("output and checkpoints")
    g.add_argument("--out", default=None, help="output folder; default out/<method>-<data>")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that holds a checkpoint (without it such a run is refused)")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = only at the end / on Ctrl-C)")
    g = p.add_argument_group("machine")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", default="auto",
                   help="auto = bf16 base weights and autocast where the device has native bf16 (CUDA, CPUs with "
                        "AVX512-BF16/AMX; full FT keeps fp32 weights), fp32 elsewhere; or float32, bfloat16. "
                        "Trainables are always fp32, and the saved model keeps the base checkpoint's own dtype")
    g.add_argument("--dist-timeout", type=float, default=1800,
                   help="torchrun data parallel: seconds to wait for the other processes (to join, or at a step) "
                        "before failing")
    g.add_argument("--fsdp", action="store_true",
                   help="torchrun: shard the model over the processes (FSDP2 fully_shard per block): weights, "
                        "gradients and optimizer state held once across them, not once per process")
    g.add_argument("--threads", type=int, default=1 if not torch.cuda.is_available() else 0,
                   help="CPU threads for torch (0 = torch's default). 1 by default on CPU: on a busy machine OpenMP "
                        "threads that wait for each other are many times slower")
    return p


def parse_args(argv=None) -> tuple[Run, object, dict]:
    """(the run's settings, the method's resolved settings, where each setting came from)."""
    first = eval_math.Parser(add_help=False)
    first.add_argument("--method", default="lift")
    first.add_argument("--model", default=None)
    first.add_argument("--data", default=None)
    known, _ = first.parse_known_args(argv)
    method = known.method
    for flag, value in (("model", known.model), ("data", known.data)):
        if value is not None and not value.strip():  # '' would fall back to a default, or to ./config.json
            raise ValueError(f"--{flag} {value!r} is not allowed: " + ("a model folder, a .gguf file, a preset or a "
                             "named model" if flag == "model" else "a dataset name, a file or a folder"))
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    builtin = known.model is None and known.data is None
    tiny = builtin or is_tiny(known.model)  # the tiny model trains with its own lrs, however it is named
    p = build_parser(method, tiny)
    args = p.parse_args(argv)
    if args.model is None and args.data is not None:
        p.error("--data needs --model (the built-in default uses neither)")
    if not 0 <= args.forget_prompts <= 100:
        p.error(f"--forget-prompts must be 0 (off) .. 100, got {args.forget_prompts}")
    for flag in ("out", "eval_data"):  # '' would silently mean the default folder / no evaluation
        if vars(args)[flag] is not None and not vars(args)[flag].strip():
            p.error(f"--{flag.replace('_', '-')} '' is not allowed: " + (
                "a folder for the run's files" if flag == "out" else "comma-separated eval specs, or none"))
    # the settings: the paper's defaults, the tiny model's own values, then what the user passed
    cls, given, origin = METHODS[method][1], {}, {}
    for f in fields(cls):
        origin[f.name] = f.metadata["source"]
        if tiny and "tiny" in f.metadata:
            given[f.name], origin[f.name] = f.metadata["tiny"], _tiny_source(f) + (
                "" if builtin else f"; --model {known.model} is the tiny preset")
    if builtin and args.batch_size is None:
        given["batch_size"], origin["batch_size"] = BUILTIN["batch_size"], "the built-in default run"
    flags = vars(args)  # the settings flags leave args: they live in the method's settings
    for name in COMMON:
        value = flags.pop(name)
        if value is None:
            continue
        if name not in origin:
            print(f"note: --{name.replace('_', '-')} {value} ignored: {method} has no {name}")
            continue
        given[name], origin[name] = value, "command line"
    for key in [k for k in flags if "__" in k]:
        m, name = key.split("__")
        value = flags.pop(key)
        if value is None:
            continue
        if m != method:
            print(f"note: --{m}-{name.replace('_', '-')} ignored: it is a setting of {m}, not {method}")
            continue
        given[name], origin[name] = value, "command line"
    s = cls(**given)
    check_settings(method, s)
    data = args.data or "synth-target"
    eval_data = args.eval_data if args.eval_data is not None else BUILTIN["eval_data"] if builtin else data
    run = Run(**{**flags, "builtin": builtin, "data": data, "eval_data": "" if eval_data == "none" else eval_data,
                 "max_steps": BUILTIN["max_steps"] if builtin and args.max_steps is None else args.max_steps,
                 "out": args.out or str(Path("out") / f"{method}-{Path(data).stem}")})
    check_run(run)
    return run, s, origin


def is_tiny(model) -> bool:
    """Whether --model is the built-in tiny model: the preset name, or a folder whose config.json
    has the tiny preset's shape (a copy of out/base-tiny-900, say)."""
    if model == "tiny":
        return True
    f = Path(str(model)) / "config.json"
    try:
        d = json.loads(f.read_text()) if f.is_file() else {}
    except (ValueError, OSError):
        return False  # a corrupt or unreadable config.json is reported, naming the file, when the model loads
    t = PRESETS["tiny"]
    return (d.get("hidden_size"), d.get("num_hidden_layers"), d.get("vocab_size")) == (t["dim"], t["n_layers"],
                                                                                        t["vocab_size"])


def check_settings(method, s):
    """The settings every method shares, checked once here (a method's own: its Settings' __post_init__):
    a bad value is one line naming its flag, the value and what is allowed."""
    def bad(flag, value, allowed):
        raise ValueError(f"--{flag} {value} is not allowed: {allowed}")
    if not positive_finite(s.lr):
        bad("lr", s.lr, "a positive finite learning rate")
    if not all(0 <= b < 1 for b in s.betas):
        bad("betas", ",".join(map(str, s.betas)), "two numbers in [0, 1)")
    if not positive_finite(s.eps):
        bad("eps", s.eps, "a positive number")
    if not (math.isfinite(s.weight_decay) and s.weight_decay >= 0):
        bad("weight-decay", s.weight_decay, "a number >= 0")
    if s.lr * s.weight_decay >= 1:  # AdamW's decoupled decay: W <- (1 - lr * weight_decay) W every step
        bad("weight-decay", s.weight_decay, f"each step multiplies the weights by 1 - lr x weight_decay, which at "
            f"--lr {s.lr:g} needs weight_decay < 1/lr = {1 / s.lr:g} (0 or 0.01-0.1 are usual)")
    if not (math.isfinite(s.max_grad_norm) and s.max_grad_norm >= 0):
        bad("max-grad-norm", s.max_grad_norm, "a finite norm > 0, or 0 for no clipping")
    if s.schedule not in ("linear", "cosine", "constant"):
        bad("schedule", s.schedule, "linear, cosine or constant")
    if not (0 <= s.warmup_ratio <= 1):
        bad("warmup-ratio", s.warmup_ratio, "a share of the steps in [0, 1]")
    if not (positive_finite(s.epochs) and s.epochs <= MAX_EPOCHS):
        bad("epochs", s.epochs, f"a positive number of passes, at most {MAX_EPOCHS:,} (or --max-steps)")
    if s.batch_size < 1:
        bad("batch-size", s.batch_size, "a positive number of examples")
    if hasattr(s, "targets") and (not s.targets or not set(s.targets) <= set(LINEAR_NAMES)):
        bad("targets", ",".join(s.targets) or "''",
            f"comma-separated module names ({', '.join(LINEAR_NAMES)}) or all / attn / mlp")
    for f in fields(s):  # every other float setting of every method: nan and inf name their flag, not a diverged loss
        v = getattr(s, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            bad(_flag(method, f)[2:], v, "a finite number")


MAX_EPOCHS = 10 ** 6  # --epochs: more passes than this is a typo (and epochs x steps must stay a finite count)
SEEDS = 2 ** 32  # --seed in [0, 2**32): torch.Generator takes seeds < 2**64, and the data order seeds each
# epoch with seed * 100003 + epoch (LIFT its refreshes with (seed * 1000003 + n) * 1009 + j)
MAX_DIST_TIMEOUT = 365 * 86400  # --dist-timeout: seconds, at most a year (datetime.timedelta overflows far above)


def check_run(args):
    """The run's own flags, before anything is loaded: counts, the seed, the device, the evaluation settings."""
    eval_math.check_at_least(args, grad_accum=1, log_every=1, eval_batch_size=1, seq_len=2, max_steps=0,
                             save_every=0, eval_every=0, threads=0, eval_limit=1, train_limit=1, max_new_tokens=1,
                             pretrain_steps=1, num_beams=1)
    if not 0 <= args.seed < SEEDS:
        raise ValueError(f"--seed {args.seed} is not allowed: a whole number 0 <= seed < 2**32 ({SEEDS})")
    eval_math.check_device(args.device)
    if not (positive_finite(args.dist_timeout) and args.dist_timeout <= MAX_DIST_TIMEOUT):
        raise ValueError(f"--dist-timeout {args.dist_timeout} is not allowed: a positive number of seconds, at most "
                         f"{MAX_DIST_TIMEOUT} (a year)")
    cpus = os.cpu_count() or 1
    if args.threads > cpus:  # OpenMP would start that many threads (and wait on them) at the first product
        raise ValueError(f"--threads {args.threads} is not allowed: at most the {cpus} CPUs here (0 = torch's default)")
    if args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ValueError("--fsdp shards the model over torchrun's processes: start it with torchrun "
                         "--nproc-per-node N (N >= 2), or leave --fsdp out for one process")
    if args.fsdp and args.eval_every:
        raise ValueError(f"--eval-every {args.eval_every} with --fsdp: evaluating mid-run needs the whole model in one "
                         "process; with --fsdp the saved model is evaluated at the end (--eval-every 0)")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: continue the run, or start it afresh")
    if args.dtype not in DTYPES:
        why = " (fp16 training needs loss scaling, which nanopeft does not do; bf16 does not)" if args.dtype == "float16" else ""
        raise ValueError(f"--dtype {args.dtype}: not supported{why}; choose from {', '.join(DTYPES)}")


def print_settings(method, s, origin):
    print(f"settings of {method}:")
    for f in fields(s):
        v = getattr(s, f.name)
        v = ",".join(map(str, v)) if isinstance(v, tuple) else v
        print(f"  {f.name:<14} {str(v):<24} {origin[f.name]}")
