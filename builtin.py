"""
The built-in experiment: what `python train.py --method M` runs with no --model and no --data, on a
laptop CPU in minutes and without downloads. A tiny LLaMA (the "tiny" preset) is pretrained from
random init on addition and subtraction word problems (synth-source) by full training, once, and
cached under out/; each run fine-tunes that base on multiplication problems in the same answer
format (synth-target) and is scored on both: learning (target) and forgetting (source, and the
source's arithmetic with the equation given, synth-source-facts).
"""
from dataclasses import replace
from pathlib import Path

import torch

import full
import math_data
from distributed import rank_world
from weights import load, save_pretrained

# the fine-tuning run's defaults (no --model, no --data) and the pretraining of its base model
BUILTIN = dict(batch_size=32, max_steps=150, eval_data="synth-target,synth-source,synth-source-facts")
BUILTIN_PRETRAIN_STEPS = 450  # ~4 minutes once (source accuracy ~95%); fine-tuning ~1.5 minutes each run
PRETRAIN = dict(method="full", settings=dict(lr=2e-3, schedule="cosine", warmup_ratio=0.03, batch_size=32,
                                             betas=(0.9, 0.95), max_grad_norm=1.0, weight_decay=0.0),
                seed=0, grad_accum=1, eval_every=0, save_every=0, log_every=100, dtype="float32",
                train_format="nanopeft")


def base_dir(args) -> Path:
    """Where the pretrained built-in base is cached (one per pretraining length)."""
    return Path("out") / f"base-tiny-{args.pretrain_steps}"


def pretrain_base(args, train) -> Path:
    """The built-in base: the tiny preset trained from random init (seed 0) on synth-source with full
    training (the PRETRAIN preset) by `train` (train.py's loop, passed in: this file does not import
    it back), saved once under out/ and reused by every later run."""
    folder = base_dir(args)
    print(f"no cached base model in {folder}: pretraining the tiny model on synth-source "
          f"({args.pretrain_steps} steps; first run only)")
    model, tok = load("tiny", seed=0)
    out = Path(str(folder) + ".run")  # an interrupted pretraining continues where it stopped: resume
    pre = replace(args, **{k: v for k, v in PRETRAIN.items() if k != "settings"}, max_steps=args.pretrain_steps,
                  out=str(out), resume=(out / "ckpt.pt").exists(), overwrite=False)
    model.to(args.device)
    train(model, tok, pre, full.Settings(**PRETRAIN["settings"]),
          math_data.load_problems("synth-source", "train", seed=0), parallel=False)
    save_pretrained(model, folder, tok=tok)  # whole or not at all: model.safetensors (what marks it cached) last
    return folder


def builtin_base(args, train) -> str:
    """The built-in base model's folder, pretrained first by `train` (train.py's loop) if it is not
    cached yet (under torchrun by process 0 alone, as in a single process, while the others wait)."""
    folder = base_dir(args)
    if not (folder / "model.safetensors").exists():
        if rank_world()[0] == 0:
            pretrain_base(args, train)
        if rank_world()[1] > 1:
            torch.distributed.barrier()
    return str(folder)
