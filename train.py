"""
The one plain training loop every method shares.

    python train.py --method lift --rank 128        # built-in default: tiny LLaMA, synthetic problems, no downloads
    python train.py --method rocoft                 # RoCoFT with its paper's settings (see --help)
    python train.py --method lora --rank 16 --model ~/Llama-3.2-1B --data gsm8k --eval-data gsm8k
    python train.py --method lift --model smollm2-135m --max-steps 60 --batch-size 8   # a real model on a laptop

Each method lives in its own file and meets this loop through a settings dataclass and two functions:
    Settings (its paper's defaults, each with its source)
    prepare(model, settings, batches, seed=...) -> optimizer      merge(model) -> None
(`full` fine-tuning is the one method written here). `python train.py --method M --help` lists M's
settings with their defaults and sources; a flag overrides only what it names, and the resolved
settings are printed before training. The built-in default pretrains a tiny base model on addition
and subtraction word problems (synth-source, cached under out/), fine-tunes it on multiplication
problems written in the same answer format (synth-target) and prints accuracy before and after:
learning (target) and forgetting (source, and its arithmetic with the equation given).
"""
import argparse
import functools
import hashlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
import types
from contextlib import contextmanager, nullcontext, redirect_stdout
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from pathlib import Path

import torch

import eval_math
import hyper
import lift
import lorasb
import rocoft
from distributed import all_reduce_sum_, rank_world
from model import PRESETS, bf16_fast
from targets import LINEAR_NAMES, adamw
from weights import GGUF_MODELS, gguf_path, load, read_weights, usual_permissions

# -----------------------------------------------------------------------------
# full fine-tuning: the method with no method


@dataclass
class Full:
    """Full fine-tuning, the baseline in every paper's table: every parameter trains. The papers give
    its loop no settings of its own: LIFT's loop (Table 6) where that is stated, else our choice."""
    lr: float = field(default=1e-5, metadata={
        "source": "LIFT (Liu et al., ICML 2025), App. E: full-FT lr grid 1e-5..1e-4, its low end", "tiny": 1e-3})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"source": "not given; PyTorch's AdamW default"})
    eps: float = field(default=1e-8, metadata={"source": "not given; PyTorch's AdamW default"})
    weight_decay: float = field(default=0.0, metadata={"source": "not given; the Hugging Face Trainer's default"})
    max_grad_norm: float = field(default=1.0, metadata={"source": "not given; the Hugging Face Trainer's default"})
    schedule: str = field(default="linear", metadata={"source": "LIFT, Table 6 (its loop, all methods)"})
    warmup_ratio: float = field(default=0.03, metadata={"source": "LIFT, Table 6 (its loop, all methods)"})
    epochs: float = field(default=3.0, metadata={"source": "LIFT, Table 6 (its loop, all methods)"})
    batch_size: int = field(default=16, metadata={"source": "LIFT, Table 6 (its loop, all methods)"})


def prepare(model, s: Full, batches, seed: int = 0):
    """Full fine-tuning: every parameter trains (fp32 AdamW state, fused kernels on CUDA)."""
    model.requires_grad_(True)
    return adamw(model.named_parameters(), s.lr, s.betas, s.eps, s.weight_decay)


def merge(model):
    pass


# --method -> (the file that implements it, its settings: the paper's defaults and their sources)
METHODS = {
    "full": (sys.modules[__name__], Full),
    "lora": (lorasb, lorasb.LoRA),
    "loraxs": (lorasb, lorasb.LoRAXS),
    "lorasb": (lorasb, lorasb.LoRASB),
    "lift": (lift, lift.Settings),
    "rocoft": (rocoft, rocoft.Settings),
    "hyper": (hyper, hyper.Settings),
}
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
# Presets: the built-in default run (no --model, no --data) and the pretraining of its base model.
BUILTIN = dict(batch_size=32, max_steps=150, eval_data="synth-target,synth-source,synth-source-facts")
BUILTIN_PRETRAIN_STEPS = 450  # ~4 minutes once (source accuracy ~95%); fine-tuning ~1.5 minutes each run
PRETRAIN = dict(method="full", settings=dict(lr=2e-3, schedule="cosine", warmup_ratio=0.03, batch_size=32,
                                             betas=(0.9, 0.95), max_grad_norm=1.0, weight_decay=0.0),
                seed=0, grad_accum=1, resume=False, eval_every=0, save_every=0, log_every=100, dtype="float32")

# -----------------------------------------------------------------------------
# command line: run flags, plus each method's settings derived from its dataclass


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (the flag and what is allowed), raised as ValueError so the
    command line prints `error: ...` and exits 2, like every other bad input."""

    def error(self, message):
        raise ValueError(message)


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
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    g.add_argument("--data", default=None, help="training data spec (eval_math.load_problems); default synth-target")
    g.add_argument("--train-limit", type=int, default=None, help="train on at most this many problems")
    g.add_argument("--seq-len", type=int, default=512, help="truncate prompt+solution to this many tokens")
    g.add_argument("--train-on-prompt", action="store_true", help="also put loss on the prompt tokens")
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
    g.add_argument("--threads", type=int, default=1 if not torch.cuda.is_available() else 0,
                   help="CPU threads for torch (0 = torch's default). 1 by default on CPU: on a busy machine OpenMP "
                        "threads that wait for each other are many times slower")
    return p


def parse_args(argv=None):
    """(run flags, the method's resolved settings, where each setting came from)."""
    first = Parser(add_help=False)
    first.add_argument("--method", default="lift")
    first.add_argument("--model", default=None)
    first.add_argument("--data", default=None)
    known, _ = first.parse_known_args(argv)
    method = known.method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    builtin = known.model is None and known.data is None
    tiny = builtin or is_tiny(known.model)  # the tiny model trains with its own lrs, however it is named
    p = build_parser(method, tiny)
    args = p.parse_args(argv)
    args.builtin = builtin
    if args.model is None and args.data is not None:
        p.error("--data needs --model (the built-in default uses neither)")
    if not 0 <= args.forget_prompts <= 100:
        p.error(f"--forget-prompts must be 0 (off) .. 100, got {args.forget_prompts}")
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
    check_settings(s)
    args.data = args.data or "synth-target"
    if args.builtin and args.max_steps is None:
        args.max_steps = BUILTIN["max_steps"]
    if args.eval_data is None:
        args.eval_data = BUILTIN["eval_data"] if args.builtin else args.data
    args.eval_data = "" if args.eval_data == "none" else args.eval_data
    args.out = args.out or str(Path("out") / f"{method}-{Path(args.data).stem}")
    check_run(args)
    return args, s, origin


def is_tiny(model) -> bool:
    """Whether --model is the built-in tiny model: the preset name, or a folder whose config.json
    has the tiny preset's shape (a copy of out/base-tiny-900, say)."""
    if model == "tiny":
        return True
    f = Path(str(model)) / "config.json"
    try:
        d = json.loads(f.read_text()) if f.is_file() else {}
    except ValueError:
        return False  # a corrupt config.json is reported, naming the file, when the model loads
    t = PRESETS["tiny"]
    return (d.get("hidden_size"), d.get("num_hidden_layers"), d.get("vocab_size")) == (t["dim"], t["n_layers"],
                                                                                        t["vocab_size"])


def check_settings(s):
    """The settings every method shares, checked once here: a bad value is one line naming its flag."""
    def bad(flag, value, allowed):
        raise ValueError(f"--{flag} {value} is not allowed: {allowed}")
    if not (math.isfinite(s.lr) and s.lr > 0):
        bad("lr", s.lr, "a positive finite learning rate")
    if not all(0 <= b < 1 for b in s.betas):
        bad("betas", ",".join(map(str, s.betas)), "two numbers in [0, 1)")
    if not (math.isfinite(s.eps) and s.eps > 0):
        bad("eps", s.eps, "a positive number")
    if not (math.isfinite(s.weight_decay) and s.weight_decay >= 0):
        bad("weight-decay", s.weight_decay, "a number >= 0")
    if not (s.max_grad_norm >= 0):
        bad("max-grad-norm", s.max_grad_norm, "a norm > 0, or 0 for no clipping")
    if s.schedule not in ("linear", "cosine", "constant"):
        bad("schedule", s.schedule, "linear, cosine or constant")
    if not (0 <= s.warmup_ratio <= 1):
        bad("warmup-ratio", s.warmup_ratio, "a share of the steps in [0, 1]")
    if not (math.isfinite(s.epochs) and s.epochs > 0):
        bad("epochs", s.epochs, "a positive number of passes (or --max-steps)")
    if s.batch_size < 1:
        bad("batch-size", s.batch_size, "a positive number of examples")
    if hasattr(s, "targets") and (not s.targets or not set(s.targets) <= set(LINEAR_NAMES)):
        bad("targets", ",".join(s.targets) or "''",
            f"comma-separated module names ({', '.join(LINEAR_NAMES)}) or all / attn / mlp")


def check_run(args):
    """The run's own flags, before anything is loaded: counts, the device, the evaluation settings."""
    eval_math.check_at_least(args, grad_accum=1, log_every=1, eval_batch_size=1, seq_len=2, max_steps=0,
                             save_every=0, eval_every=0, threads=0, eval_limit=1, train_limit=1, max_new_tokens=1,
                             pretrain_steps=1, num_beams=1)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA GPU is available here; use --device cpu")
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

# -----------------------------------------------------------------------------
# data: prompt + solution, loss on the solution


def tokenize(problems, tok, seq_len, train_on_prompt=False):
    """Each problem -> (input ids, target ids) with -100 on the prompt; counts truncations."""
    examples, truncated = [], 0
    for p in problems:
        prompt = tok.encode(eval_math.format_prompt(p), bos=True)
        seq = prompt + tok.encode(eval_math.format_target(p), eos=True)
        if len(seq) > seq_len + 1:
            seq, truncated = seq[:seq_len + 1], truncated + 1
        x, y = seq[:-1], seq[1:]
        if not train_on_prompt:  # (a prompt longer than seq_len leaves no target at all)
            n = min(len(prompt) - 1, len(y))
            y = [-100] * n + y[n:]
        examples.append((x, y))
    return examples, truncated


def training_examples(problems, tok, seq_len, train_on_prompt):
    """tokenize, then drop examples with no solution token left, saying how many were cut or dropped."""
    examples, truncated = tokenize(problems, tok, seq_len, train_on_prompt)
    kept = [(x, y) for x, y in examples if any(t != -100 for t in y)]
    if len(kept) < len(examples):
        print(f"note: {len(examples) - len(kept)} examples have no solution tokens within --seq-len {seq_len}; skipped")
    if not kept:
        raise ValueError(f"--seq-len {seq_len} leaves no solution tokens in any example; raise it")
    if truncated:
        print(f"note: {truncated} of {len(kept)} examples were longer than --seq-len {seq_len} and were truncated")
    return kept, truncated


def collate(examples, pad_id, device):
    T = max(len(x) for x, _ in examples)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, (xi, yi) in enumerate(examples):
        x[i, :len(xi)], y[i, :len(yi)] = torch.tensor(xi), torch.tensor(yi)
    return x.to(device), y.to(device)


def micro_batch(examples, i, batch_size, seed):
    """Micro-batch number i of an endless sequence of seeded epoch permutations. A pure function of
    (i, seed), so the data position of a checkpoint is just its step."""
    per_epoch = max(1, len(examples) // batch_size)
    epoch, j = divmod(i, per_epoch)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return [examples[k] for k in order[j * batch_size:(j + 1) * batch_size].tolist()]


def lr_mult(step, total, warmup, schedule):
    """Linear warmup to 1 over `warmup` steps (step 0 already gets 1/warmup), then linear/cosine decay
    or constant. The lr is a pure function of the step: no scheduler state to checkpoint."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

# -----------------------------------------------------------------------------
# checkpoints: atomic, weights_only, resume bit-identical


def trainable_state(model, optimizer, base_keys):
    """What a checkpoint stores of the model: entries the method added (adapter tensors, indices)
    plus base parameters the optimizer trains (full FT)."""
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if k not in base_keys or (k in params and id(params[k]) in trained)}


def save_checkpoint(path, model, optimizer, base_keys, step, args, s):
    ckpt = {"method": args.method, "step": step, "model": trainable_state(model, optimizer, base_keys),
            "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "run": run_defining(args, s)}
    tmp = f"{path}.tmp"
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)  # atomic: a crash mid-write never destroys the last good checkpoint
    except (OSError, RuntimeError) as e:  # a full disk: torch reports it as either
        Path(tmp).unlink(missing_ok=True)
        kept = f"the checkpoint in {path} from before is kept" if Path(path).exists() else "no checkpoint was written"
        raise OSError(f"could not write the checkpoint of step {step} to {path} ({e}); {kept}") from None


def run_defining(args, s) -> dict:
    """What a resumed run must share with its checkpoint: the method's settings, the model, the data
    and its order, the length."""
    run = {k: vars(args)[k] for k in ("method", "data", "train_limit", "seq_len", "train_on_prompt", "grad_accum",
                                      "seed", "max_steps")}
    run["model"] = str(base_dir(args)) if args.builtin else (
        args.model if args.model in PRESETS or not os.path.exists(os.path.expanduser(args.model))
        else os.path.realpath(os.path.expanduser(args.model)))
    # the data order depends on it (each process its shard of a batch); the built-in pretraining runs alone
    run["processes"] = vars(args).get("processes") or rank_world()[1]
    return {**run, **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()}}


def load_checkpoint(path, method, mmap=False):
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {str(path)!r}")
    try:
        # weights_only: a checkpoint never runs code; mmap (for the check before the model loads): read the
        # settings without reading every tensor, which resume() reads anyway
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise ValueError(f"--resume: checkpoint {str(path)!r} is corrupt or unreadable ({type(e).__name__})") from None
    if ckpt.get("method") != method:
        raise ValueError(f"--resume: {str(path)!r} is a checkpoint of method {ckpt.get('method')!r}, not {method!r}")
    return ckpt


def check_resumable(path, args, s):
    """--resume continues only the run its checkpoint belongs to: every run-defining setting equal."""
    then, now = load_checkpoint(path, args.method, mmap=True).get("run", {}), run_defining(args, s)
    for key, value in now.items():
        if key == "max_steps" and s.schedule == "constant" and s.warmup_ratio == 0 and isinstance(then.get(key), int) \
                and not (args.method == "lift" and (then[key] + 1) % s.interval == 0):
            continue  # a constant lr does not depend on the length: extending such a run is exact (unless
            # LIFT skipped the mask refresh due before the old run's would-be next step)
        if then.get(key, 1 if key == "processes" else None) != value:  # (checkpoints from before: 1)
            show = lambda v: ",".join(map(str, v)) if isinstance(v, list) else v
            raise ValueError(f"--resume: the checkpoint was made with --{key.replace('_', '-')} {show(then.get(key))}, "
                             f"this run has {show(value)}; resume needs the same run-defining settings "
                             "(or start afresh with --overwrite)")


def resume(path, model, optimizer, args, s) -> int:
    """Restore the trained state, optimizer and RNG of the checkpoint in --out; returns its step."""
    ckpt = load_checkpoint(path, args.method)
    missing = set(ckpt["model"]) - set(model.state_dict())
    if missing:
        raise ValueError(f"--resume: checkpoint has entries this model lacks: {sorted(missing)[:3]}")
    model.load_state_dict(ckpt["model"], strict=False)
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    if ckpt["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    print(f"resumed from {path} at step {ckpt['step']}")
    return ckpt["step"]


@contextmanager
def stop_requests():
    """Ctrl-C or SIGTERM (what schedulers and `timeout` send) during training: a flag the loop checks
    after each step, to checkpoint and stop; a second Ctrl-C aborts at once."""
    stop = []

    def on_signal(signum, frame):
        if stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.append(signum)
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
              "(Ctrl-C again aborts)", flush=True)

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield stop
        return
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

# -----------------------------------------------------------------------------
# reporting


def print_trainable(model, optimizer, base_total):
    """Trainable numbers per module type (q_proj, ..., from the optimizer's param names), their
    total and share of the base model, so they can be checked against the paper's formula."""
    rows = {}
    for g in optimizer.param_groups:
        for name, p in zip(g["param_names"], g["params"]):
            kind = name.split(".")[-2] if "." in name else name
            n, c = rows.get(kind, (0, 0))
            rows[kind] = (n + 1, c + p.numel())
    total = sum(c for _, c in rows.values())
    print(f"{'module':<26}{'tensors':>8}{'trainable':>14}{'% of model':>12}")
    for kind, (n, c) in rows.items():
        print(f"{kind:<26}{n:>8}{c:>14,}{100 * c / base_total:>11.4f}%")
    print(f"{'total':<26}{sum(n for n, _ in rows.values()):>8}{total:>14,}{100 * total / base_total:>11.4f}%"
          f"   (model: {base_total:,} parameters)")
    return total


def log_step(log, done, total, start, losses, lr, tokens, t0):
    elapsed = time.time() - t0
    rec = {"step": done, "loss": sum(losses) / len(losses), "lr": lr, "tok_s": tokens / elapsed, "elapsed_s": elapsed}
    mem = f", {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if torch.cuda.is_available() else ""
    eta = elapsed / (done - start) * (total - done)
    print(f"step {done}/{total} | loss {rec['loss']:.4f} | lr {lr:.2e} | {rec['tok_s']:,.0f} tok/s"
          f" | {elapsed:.0f}s elapsed, ETA {eta:.0f}s{mem}", flush=True)
    log.write(json.dumps(rec) + "\n")
    log.flush()


def check_finite(value: float, what, step, ckpt_path):
    if not math.isfinite(value):
        kept = f"the last good checkpoint in {ckpt_path} is kept" if ckpt_path.exists() else "no checkpoint was written"
        raise FloatingPointError(f"{what} is {value} at step {step}; stopping: {kept}. Try a lower --lr")

# -----------------------------------------------------------------------------
# the loop


def attach_method(model, tok, args, s, examples, total, warmup):
    """The method's `prepare`: freeze the base, attach its trainable pieces, return its optimizer.
    Methods that look at data first get batches in an order of their own, not the training order."""
    def side_batches():
        i = 0
        while True:
            yield collate(micro_batch(examples, i, s.batch_size, args.seed + 1), tok.pad_id, args.device)
            i += 1

    run = {"seed": args.seed}
    if args.method == "lift":  # no mask refresh after the last step; the gradient ablation scores a full step
        run.update(max_steps=total, grad_accum=args.grad_accum)
    if args.method == "lorasb":  # its init is the first full-FT step: that step's lr, and 0.1% of the data
        run.update(lr_first=s.lr * lr_mult(0, total, warmup, s.schedule), n_train=len(examples))
    torch.manual_seed(args.seed)
    return METHODS[args.method][0].prepare(model, s, side_batches(), **run)


def base_weights(model_path, args) -> dict:
    """The base model's weights as stored, in our names (read_weights: a GGUF dequantized to fp32;
    a preset: its random init, recreated in fp32), with lm_head filled in where it is tied."""
    if model_path in PRESETS:
        return load(model_path, seed=args.seed)[0].state_dict()
    cfg, sd = read_weights(gguf_path(model_path) if model_path in GGUF_MODELS else model_path)
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    return {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}


@torch.no_grad()
def save_merged(model, args, s, model_path) -> dict:
    """Save the fine-tuned model to args.out in the base checkpoint's own dtypes (fp32 in, fp32 out; bf16
    in, bf16 out; a GGUF: fp32), computed in fp32 from the base weights as stored on disk plus the
    method's exact fp32 update (adapter.safetensors; full fine-tuning: its trained weights). A run
    whose base was loaded in bf16 thus never rounds the checkpoint: every tensor the method does not
    train is saved bit-exact. Prints, and returns, how much of the update the saved dtype kept."""
    from safetensors.torch import load_file
    base = base_weights(model_path, args)
    module = METHODS[args.method][0]
    if hasattr(module, "merge_adapter"):
        merged = module.merge_adapter(base, load_file(str(Path(args.out) / "adapter.safetensors")), s)
    else:  # full fine-tuning: the trained weights themselves
        merged = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    sd = {k: merged[k].to(base[k].dtype) if k in merged else base[k] for k in model.state_dict()}
    # the update the saved dtype rounded away: changed entries (in fp32) saved as their base value
    changed = rounded = 0
    for k, W in merged.items():
        moved = W != base[k].float()
        changed += int(moved.sum())
        rounded += int((moved & (sd[k] == base[k])).sum())
    model.save_pretrained(args.out, state_dict=sd)
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in sd.values()})
    where = " (the GGUF's weights dequantized)" if str(model_path).endswith(".gguf") or model_path in GGUF_MODELS else ""
    line = f"saved the merged model in {'/'.join(dtypes)}, the base checkpoint's dtype{where}"
    if rounded:
        line += (f"; {rounded:,} of the {changed:,} entries the update changes ({100 * rounded / changed:.2f}%) are "
                 f"rounded back to their base value in {'/'.join(dtypes)}: adapter.safetensors keeps the exact fp32 update")
    print(line)
    return {"dtype": "/".join(dtypes), "changed": changed, "rounded_away": rounded}


def save_adapter(module, model, optimizer, out: Path):
    """adapter.safetensors: the method's small learned update (before merge folds it into the weights);
    removed for a method that has none, so another method's adapter never sits beside this model."""
    if not hasattr(module, "adapter_state"):
        (out / "adapter.safetensors").unlink(missing_ok=True)
        return
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous().cpu() for k, v in module.adapter_state(model, optimizer).items()}
    try:
        save_file(state, str(out / "adapter.safetensors.tmp"))
        os.replace(out / "adapter.safetensors.tmp", out / "adapter.safetensors")
    except Exception as e:  # a full disk: safetensors raises its own error type
        (out / "adapter.safetensors.tmp").unlink(missing_ok=True)
        raise OSError(f"could not write {out / 'adapter.safetensors'} ({e}); the checkpoint is kept") from None
    usual_permissions(out / "adapter.safetensors")


def train(model, tok, args, s, problems, log_path=None, parallel=True):
    """Fine-tune `model` in place with args.method and its settings `s` on `problems`; returns
    (model, optimizer, info). Checkpoints go to args.out/ckpt.pt; the model is merged before returning.
    Under torchrun (parallel): process r of W takes micro-batches r, r + W, ... of the same sequence,
    so a step sees batch x grad-accum x W examples, and the gradients of the trainable values (LIFT's:
    its k selected entries, never a dense matrix) are summed over the processes in one message;
    process 0 alone writes files."""
    rank, world = rank_world() if parallel else (0, 1)
    out, ckpt_path = Path(args.out), Path(args.out) / "ckpt.pt"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    save = save_checkpoint if rank == 0 else (lambda *a: None)
    examples, truncated = training_examples(problems, tok, args.seq_len, args.train_on_prompt)
    steps_per_epoch = max(1, len(examples) // (s.batch_size * args.grad_accum * world))
    total = args.max_steps if args.max_steps is not None else max(1, round(s.epochs * steps_per_epoch))
    warmup = math.ceil(s.warmup_ratio * total)
    base_keys, base_total = set(model.state_dict()), sum(p.numel() for p in model.parameters())
    model.grad_checkpoint = args.grad_checkpoint  # set before prepare: its data passes (LoRA-SB) use it too
    model.train()
    optimizer = attach_method(model, tok, args, s, examples, total, warmup)
    print(f"\ntrainable parameters of {args.method}" + (f", rank {s.rank}" if hasattr(s, "rank") else "")
          + (f", targets {','.join(s.targets)}:" if hasattr(s, "targets") else ":"))
    n_trainable = print_trainable(model, optimizer, base_total)
    start = resume(ckpt_path, model, optimizer, args, s) if args.resume else 0
    params = [p for g in optimizer.param_groups for p in g["params"]]
    autocast = torch.autocast(torch.device(args.device).type, torch.bfloat16) if precision(args)[1] else nullcontext()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    print(f"training {total} steps ({len(examples)} examples, batch {s.batch_size} x {args.grad_accum} accum, "
          f"lr {s.lr:g} {s.schedule}, warmup {warmup}) -> {out}")
    if world > 1:
        print(f"data parallel: {world} processes ({torch.distributed.get_backend()}), a step's batch {s.batch_size} x "
              f"{args.grad_accum} accum x {world} = {s.batch_size * args.grad_accum * world} examples; each step "
              f"all-reduces {sum(p.numel() for p in params):,} gradient values (the trainable ones) in one message")
    t0, tokens, losses, sent = time.time(), 0, [], 0
    log_file = (log_path or out / "log.jsonl") if rank == 0 else os.devnull
    with open(log_file, "a" if args.resume else "w") as log, stop_requests() as stop:
        for step in range(start, total):
            # this step's learning rate: warmup, then decay; a pure function of the step
            lr = s.lr * lr_mult(step, total, warmup, s.schedule)
            for g in optimizer.param_groups:
                g["lr"] = lr
            # forward and backward over grad_accum micro-batches: the step's gradient is their mean
            # (step loss, tokens, stop requested): kept on the device, no host sync per micro-batch
            stats = torch.zeros(3, device=args.device)
            for j in range(args.grad_accum):
                x, y = collate(micro_batch(examples, (step * args.grad_accum + j) * world + rank, s.batch_size,
                                           args.seed), tok.pad_id, args.device)
                with autocast:
                    _, loss = model(x, y)
                (loss / args.grad_accum).backward()
                stats[0] += loss.detach() / args.grad_accum
                stats[1] += (x != tok.pad_id).sum()  # tokens processed (prompt + solution, no padding)
            if world > 1:  # the mean gradient over the processes, and their stats, in one message
                stats[2] = float(bool(stop))
                grads = [p.grad for p in params if p.grad is not None]
                sent = all_reduce_sum_(grads + [stats])
                torch._foreach_div_(grads, world)
                stats[0] /= world
            # clip the global gradient norm (0 = off); one host sync per step: a NaN loss or gradient stops
            # the run before the optimizer takes the step (never trains on)
            norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm if s.max_grad_norm > 0 else math.inf)
            step_loss, n_tokens, stopping, norm = torch.cat([stats, norm.float().view(1)]).tolist()
            check_finite(step_loss, "loss", step, ckpt_path)
            check_finite(norm, "gradient norm", step, ckpt_path)
            losses.append(step_loss)
            tokens += int(n_tokens)
            if stopping and not stop:  # another process was asked to stop: all stop at this step
                stop.append(signal.SIGTERM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            # report, checkpoint and evaluate on their intervals
            if done % args.log_every == 0 or done == total:
                log_step(log, done, total, start, losses, lr, tokens, t0)
                losses = []
            if args.save_every and done % args.save_every == 0 and done < total:
                save(ckpt_path, model, optimizer, base_keys, done, args, s)
            if args.eval_every and done % args.eval_every == 0 and done < total:  # the learn/forget curve
                log.write(json.dumps({"step": done, "accuracy": run_eval(model, tok, args, f"step {done}")}) + "\n")
            # Ctrl-C / SIGTERM: this step is complete; checkpoint it and stop
            if stop:
                save(ckpt_path, model, optimizer, base_keys, done, args, s)
                print(f"interrupted: checkpoint of step {done} saved to {ckpt_path}; continue with --resume")
                raise KeyboardInterrupt if stop[0] == signal.SIGINT else SystemExit(128 + stop[0])
    save(ckpt_path, model, optimizer, base_keys, total, args, s)
    info = {"steps": total, "trainable": n_trainable, "model_params": base_total, "train_s": time.time() - t0,
            "truncated": truncated, "processes": world, "allreduce_bytes_per_step": sent}
    module = METHODS[args.method][0]
    if rank == 0:
        save_adapter(module, model, optimizer, out)
    module.merge(model)
    model.eval()
    return model, optimizer, info

# -----------------------------------------------------------------------------
# evaluation, the built-in base, main


@functools.lru_cache(maxsize=4)
def eval_problems(eval_data: str, limit, seed) -> tuple:
    """The test problems of every --eval-data spec (loaded once: main checks them before the model)."""
    return tuple(p for spec in eval_data.split(",") for p in eval_math.load_problems(spec, "test", limit=limit, seed=seed))


def run_eval(model, tok, args, label):
    """Accuracy on every --eval-data spec (test split); prints the table, returns {dataset: accuracy}."""
    if not args.eval_data or rank_world()[0] != 0:  # data parallel: process 0 evaluates
        return {}
    problems = list(eval_problems(args.eval_data, args.eval_limit, args.seed))
    result = eval_math.evaluate(model, tok, problems, batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens,
                                protocol=args.protocol, num_beams=args.num_beams)
    print(f"\naccuracy ({label}; {result['protocol']} scoring, {result['decoding']}):")
    eval_math.print_table(result)
    return {name: r["accuracy"] for name, r in result["datasets"].items()}


def precision(args) -> tuple[torch.dtype, bool]:
    """(dtype of the loaded weights, whether steps run under bf16 autocast), from --dtype. float32: fp32
    throughout. bfloat16: weights stored in bf16. auto: bf16 where the device multiplies it natively
    (model.bf16_fast: CUDA GPUs, CPUs with AVX512-BF16/AMX), else fp32; with bf16 the frozen base
    weights are stored in bf16 (full fine-tuning keeps fp32 weights: they are its trained state) and
    the matrix products run under autocast. Trainable values and optimizer state are fp32 always."""
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and bf16_fast(args.device))
    stored = bf16 and not (args.dtype == "auto" and args.method == "full")
    return (torch.bfloat16 if stored else torch.float32), bf16


def base_dir(args) -> Path:
    """Where the pretrained built-in base is cached (one per pretraining length)."""
    return Path("out") / f"base-tiny-{args.pretrain_steps}"


def pretrain_base(args) -> Path:
    """The built-in base: the tiny preset trained from random init (seed 0) on synth-source with full
    training (the PRETRAIN preset), saved once under out/ and reused by every later run."""
    folder = base_dir(args)
    print(f"no cached base model in {folder}: pretraining the tiny model on synth-source "
          f"({args.pretrain_steps} steps; first run only)")
    model, tok = load("tiny", seed=0)
    pre = types.SimpleNamespace(**{**vars(args), **{k: v for k, v in PRETRAIN.items() if k != "settings"},
                                   "max_steps": args.pretrain_steps, "out": str(folder) + ".run", "processes": 1})
    pre.resume = (Path(pre.out) / "ckpt.pt").exists()  # an interrupted pretraining continues where it stopped
    model.to(args.device)
    train(model, tok, pre, Full(**PRETRAIN["settings"]), eval_math.load_problems("synth-source", "train", seed=0),
          parallel=False)
    model.save_pretrained(folder)
    tok.save(folder)
    return folder


def builtin_base(args) -> str:
    """The built-in base model's folder, pretrained first if it is not cached yet (under torchrun by
    process 0 alone, as in a single process, while the others wait)."""
    folder = base_dir(args)
    if not (folder / "model.safetensors").exists():
        if rank_world()[0] == 0:
            pretrain_base(args)
        if rank_world()[1] > 1:
            torch.distributed.barrier()
    return str(folder)


def base_cache(args, model_path) -> Path:
    """Where what is measured once per base model is cached: its accuracy before fine-tuning and
    the text it writes itself (the forgetting measure)."""
    if args.builtin:
        return base_dir(args)
    p = Path(gguf_path(model_path) if model_path in GGUF_MODELS else model_path).resolve()  # smollm2-135m: its file
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file())
    key = "|".join([str(p), str(precision(args)), *(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)])
    return Path(args.out).parent / "base-cache" / f"{p.name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def forgetting_set(model, tok, args, cache: Path):
    """(texts, reference) for eval_math.drift: the base model's own text and predictions,
    computed on the first run and cached (a torch file, read with weights_only=True)."""
    f = cache / f"selftext-{args.forget_prompts}.pt"
    if f.exists():
        d = torch.load(f, weights_only=True)
        return d["texts"], d["ref"]
    print(f"forgetting set: the base model's greedy continuations of {args.forget_prompts} neutral prompts "
          "(first run only)", flush=True)
    texts = eval_math.self_text(model, tok, args.forget_prompts, batch_size=args.eval_batch_size)
    if not texts:
        raise ValueError(f"the base model ended every one of its {args.forget_prompts} neutral continuations at once: "
                         "no text to measure forgetting on; use more --forget-prompts, or 0 to turn it off")
    ref = eval_math.drift_reference(model, tok, texts)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"texts": texts, "ref": ref}, f"{f}.tmp")
    os.replace(f"{f}.tmp", f)
    return texts, ref


def claim_out(args, s):
    """--out, checked before anything is loaded: a checkpoint there is never overwritten without
    --resume or --overwrite, and the folder must be writable. --overwrite deletes nothing here: the
    old files are replaced as the new run writes its own (its log from the first step on)."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out} is a file, not a folder")
    if (out / "ckpt.pt").exists() and not (args.resume or args.overwrite):
        raise ValueError(f"--out {args.out} holds the checkpoint of an earlier run: continue it with --resume, "
                         "or start afresh with --overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {args.out} cannot be written ({e.strerror})") from None
    if args.resume:
        check_resumable(out / "ckpt.pt", args, s)


def start_distributed(args) -> int:
    """Under torchrun (WORLD_SIZE > 1 in the environment): join its process group (nccl on CUDA, each
    process on its own GPU; gloo on CPU) and return this process's rank; 0 without torchrun. A group
    that does not form within --dist-timeout is a one-line error, not a hang."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0
    dist = torch.distributed
    if not dist.is_initialized():
        if "cuda" in args.device:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            args.device = f"cuda:{local}"
            torch.cuda.set_device(local)
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        try:
            dist.init_process_group("nccl" if "cuda" in args.device else "gloo",
                                    timeout=timedelta(seconds=args.dist_timeout))
        except (RuntimeError, TimeoutError, ValueError) as e:  # dist's errors are RuntimeErrors
            raise ConnectionError(f"data parallel: process {os.environ.get('RANK')} of {world} could not meet the "
                                  f"others at {where} within --dist-timeout {args.dist_timeout:g} s "
                                  f"({str(e).splitlines()[0][:200]}); start all of them (torchrun --nproc-per-node, "
                                  "--nnodes)") from None
    return dist.get_rank()


def main(argv=None):
    """One run. Under torchrun every process runs it: process 0 prints, evaluates and writes files and
    returns the metrics; the others train their shard quietly and return None."""
    args, s, origin = parse_args(argv)
    rank = start_distributed(args)
    if rank == 0:
        return run(args, s, origin)
    with open(os.devnull, "w") as null, redirect_stdout(null):
        return run(args, s, origin, rank)


def run(args, s, origin, rank=0):
    print("run: " + " ".join(f"{k}={v}" for k, v in vars(args).items()))
    print_settings(args.method, s, origin)
    # every input checked before the model loads: the output folder, the training and eval data
    if rank == 0:
        claim_out(args, s)
    elif args.resume:
        check_resumable(Path(args.out) / "ckpt.pt", args, s)
    problems = eval_math.load_problems(args.data, "train", limit=args.train_limit, seed=args.seed)
    if args.eval_data:
        eval_problems(args.eval_data, args.eval_limit, args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model_path = args.model
    if args.builtin:
        model_path = builtin_base(args)
    dtype, bf16 = precision(args)
    t0 = time.time()
    model, tok = load(model_path, dtype=dtype, device=args.device, seed=args.seed)
    print(f"loaded {model_path} in {time.time() - t0:.1f}s: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"weights {str(dtype)[6:]}" + (", bf16 autocast" if bf16 else ""))
    if args.seq_len > model.config.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} is more than the model's {model.config.max_seq_len} positions "
                         "(its max_position_embeddings); lower it")
    real = not args.builtin and args.model not in PRESETS  # pretrained weights, not a random preset
    measure_forgetting = rank == 0 and real and args.forget_prompts and args.eval_data  # none: no evaluation
    cache = base_cache(args, model_path) if args.builtin or real else None
    before, forget = None, None
    if rank == 0 and cache is not None and args.eval_data:  # the base's accuracy, once per base, cached
        # the seed picks synthetic problems only: a file's first --eval-limit problems are the same for every seed
        seed = f"-seed{args.seed}" if "synth" in args.eval_data else ""
        name = f"{args.eval_data.replace(',', '+').replace('/', '_')}-{args.eval_limit}{seed}"
        if len(name) > 120:  # several paths: a file name has at most 255 bytes
            name = hashlib.sha1(name.encode()).hexdigest()[:16]
        f = cache / f"eval-{name}-{args.max_new_tokens}-{args.protocol}-{args.num_beams}.json"
        if f.exists():
            before = json.loads(f.read_text())
        else:
            before = run_eval(model, tok, args, "base model")
            f.parent.mkdir(parents=True, exist_ok=True)
            f.with_suffix(".tmp").write_text(json.dumps(before))
            os.replace(f.with_suffix(".tmp"), f)
    if measure_forgetting:
        texts, reference = forgetting_set(model, tok, args, cache)
    model, optimizer, info = train(model, tok, args, s, problems)
    if rank != 0:
        return None
    saved = save_merged(model, args, s, model_path)
    tok.save(args.out)
    label = f"{args.method} r={s.rank}" if hasattr(s, "rank") else args.method
    after = run_eval(model, tok, args, f"{label}, after {info['steps']} steps")
    if measure_forgetting:
        forget = {"texts": len(texts), **eval_math.drift(model, tok, texts, reference)}
    metrics = {"method": args.method, "settings": asdict(s), **info, "accuracy": after, "accuracy_before": before,
               "protocol": args.protocol, "num_beams": eval_math.decoding(args.protocol, args.num_beams),
               "forgetting": forget, "saved": saved}
    if hasattr(s, "rank"):
        metrics["rank"] = s.rank
    Path(args.out, "metrics.json").write_text(json.dumps(metrics, indent=2))
    if before:
        w = {d: max(14, len(d) + 2) for d in after}
        print("\n" + f"{'accuracy':<22}" + "".join(f"{d:>{w[d]}}" for d in w))
        print(f"{'base':<22}" + "".join(f"{100 * before[d]:>{w[d] - 1}.1f}%" for d in w))
        print(f"{label:<22}" + "".join(f"{100 * after[d]:>{w[d] - 1}.1f}%" for d in w))
    if forget:
        f = forget
        print(f"\nforgetting, on {f['tokens']:,} tokens the base model wrote itself ({f['texts']} neutral prompts):")
        print(f"{'':<22}{'loss':>10}{'loss rise':>11}{'KL(base||tuned)':>17}{'agreement':>11}")
        print(f"{'base':<22}{f['base_loss']:>10.4f}{'':>11}{0:>17.5f}{100:>10.1f}%")
        print(f"{label:<22}{f['loss']:>10.4f}{f['loss_rise']:>+11.4f}{f['kl']:>17.5f}{100 * f['agreement']:>10.1f}%")
    print(f"\nsaved to {args.out} (merged model, tokenizer, checkpoint, log.jsonl, metrics.json)")
    return metrics


def cli(argv=None) -> int:
    """The command line: bad input and failed writes are one line on stderr and exit status 2."""
    try:
        main(argv)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, FloatingPointError, ImportError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # torch.distributed's errors: a process died, or hung past --dist-timeout
        if rank_world()[1] == 1:
            raise
        print(f"error: data parallel, process {rank_world()[0]}: {str(e).splitlines()[0][:300]} (another process "
              "stopped, or did not answer within --dist-timeout)", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
