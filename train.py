"""
The one plain training loop every method shares.

    python train.py --method lift --rank 128        # built-in default: tiny LLaMA, synthetic problems, no downloads
    python train.py --method lora --rank 16 --model ~/Llama-3.2-1B --data gsm8k --eval-data gsm8k

Each method lives in its own file and meets this loop through two functions:
    prepare(model, args, batches) -> optimizer      merge(model) -> None
(`full` fine-tuning is the one method written here). The built-in default pretrains a tiny base
model on one-step problems (synth-source, cached under out/), fine-tunes it on two-step problems
(synth-target) and prints accuracy before and after on both: learning and forgetting.
"""
import argparse
import importlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import eval_math
from model import LINEAR_NAMES, PRESETS, adamw, load

# method -> (module that implements it, lr for the tiny built-in model, lr for real LLMs).
# Real-model lrs follow the papers: LIFT 2e-4 (Table 5), LoRA 2e-4, LoRA-SB 1e-4 (math), LoRA-XS 4e-3
# (its authors' MetaMathQA script), RoCoFT 1e-3, HyperAdapt 3e-3; full fine-tuning 1e-5. The tiny
# model's lrs come from short sweeps on the built-in data.
METHODS = {
    "full": ("train", 1e-3, 1e-5),
    "lora": ("lorasb", 3e-3, 2e-4),
    "loraxs": ("lorasb", 1e-2, 4e-3),
    "lorasb": ("lorasb", 1e-2, 1e-4),
    "lift": ("lift", 1e-3, 2e-4),
    "rocoft": ("rocoft", 3e-3, 1e-3),
    "hyper": ("hyper", 1e-2, 3e-3),
}
TARGET_GROUPS = {"all": list(LINEAR_NAMES), "attn": list(LINEAR_NAMES[:4]), "mlp": list(LINEAR_NAMES[4:])}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--method", default="lift", help=f"one of: {', '.join(METHODS)}")
    a("--rank", type=int, default=128, help="the method's rank r (see README: what --rank means per method)")
    a("--model", default=None, help="model folder (Hugging Face or Meta layout) or preset; default: the built-in tiny base")
    a("--data", default=None, help="training data spec (eval_math.load_problems); default synth-target")
    a("--eval-data", default=None, help="comma-separated eval specs (none = skip); default synth-target,synth-source or --data")
    a("--eval-limit", type=int, default=None, help="evaluate on at most this many problems per dataset")
    a("--train-limit", type=int, default=None, help="train on at most this many problems")
    a("--epochs", type=float, default=1.0)
    a("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs); 0 = evaluate the start")
    a("--batch-size", type=int, default=None, help="examples per micro-batch (default 16; built-in default 32)")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--lr", type=float, default=None, help="peak learning rate; default: per method (METHODS in train.py)")
    a("--warmup-ratio", type=float, default=0.03)
    a("--schedule", default="linear", choices=["linear", "cosine", "constant"])
    a("--weight-decay", type=float, default=0.0)
    a("--betas", default="0.9,0.999", help="AdamW betas")
    a("--eps", type=float, default=1e-8, help="AdamW epsilon")
    a("--max-grad-norm", type=float, default=1.0, help="clip gradients to this norm (0 = off)")
    a("--seq-len", type=int, default=512, help="truncate prompt+solution to this many tokens")
    a("--train-on-prompt", action="store_true", help="also put loss on the prompt tokens")
    a("--targets", default="all", help="comma-separated module names (q_proj,...,down_proj) or all / attn / mlp")
    a("--seed", type=int, default=0)
    a("--out", default=None, help="output folder; default out/<method>-<data>")
    a("--resume", action="store_true", help="continue from the checkpoint in --out")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
      help="base weights; auto = bf16 on CUDA (fp32 for full FT, whose weights are the trained state), fp32 on CPU")
    a("--grad-checkpoint", action="store_true", help="activation checkpointing per block (saves memory)")
    a("--log-every", type=int, default=10)
    a("--eval-every", type=int, default=0, help="evaluate every N steps (0 = only at the end)")
    a("--save-every", type=int, default=0, help="checkpoint every N steps (0 = only at the end / on Ctrl-C)")
    a("--eval-batch-size", type=int, default=64)
    a("--max-new-tokens", type=int, default=None, help="generation budget per problem; default eval_math's")
    a("--pretrain-steps", type=int, default=900, help="steps to pretrain the built-in base (first run only)")
    a("--forget-prompts", type=int, default=100,
      help="real models: forgetting = rise of the loss on the base model's own greedy continuations of this "
           "many neutral prompts (1-100, generated once, cached in base-cache/ beside --out; 0 = off)")
    a("--threads", type=int, default=1 if not torch.cuda.is_available() else 0,
      help="CPU threads for torch (0 = torch's default). 1 by default on CPU: the tiny model is too small to "
           "gain from more, and on a busy machine OpenMP threads that wait for each other are many times slower")
    # method flags, namespaced
    a("--lora-alpha", type=float, default=None, help="LoRA only: scale alpha/r, default alpha = 2r (LoRA-XS/SB use scale 1)")
    a("--lift-interval", type=int, default=200, help="LIFT: optimizer steps between mask refreshes (update_interval)")
    a("--lift-lra-rank", type=int, default=None, help="LIFT: rank of the low-rank approximation (default --rank)")
    a("--lift-select", default="principal", choices=["principal", "magnitude", "gradient", "random"],
      help="LIFT: how to choose the trained entries: principal (the paper), magnitude, gradient, random (ablations)")
    a("--lift-block", type=int, default=0, help="LIFT: select b x b blocks (4 = LIFT_Structured); 0 = entries")
    a("--lift-svd", default="exact", choices=["exact", "lowrank"], help="LIFT: exact or randomized SVD")
    a("--rocoft-mode", default="row", help="RoCoFT: row (r output features) or column (r input features)")
    a("--rocoft-select", default="first",
      help="RoCoFT: first (the paper's tables), random, max, min, mixed (Wanda score |W|*||X|| per row/column)")
    a("--rocoft-score-batches", type=int, default=8, help="RoCoFT max/min/mixed: micro-batches for activation norms")
    a("--lorasb-init-samples", type=int, default=None,
      help="LoRA-SB: examples for the gradient estimate (default 0.1%% of the training set, at least 64)")
    args = p.parse_args(argv)
    if args.method not in METHODS:
        p.error(f"unknown method {args.method!r}; available: {', '.join(METHODS)}")
    if args.rank <= 0:
        p.error(f"--rank must be a positive integer, got {args.rank}")
    if not 0 <= args.forget_prompts <= 100:
        p.error(f"--forget-prompts must be 0 (off) .. 100, got {args.forget_prompts}")
    args.builtin = args.model is None and args.data is None
    if args.model is None and args.data is not None:
        p.error("--data needs --model (the built-in default uses neither)")
    args.data = args.data or "synth-target"
    if args.batch_size is None:
        args.batch_size = 32 if args.builtin else 16
    if args.builtin and args.max_steps is None:
        args.max_steps = 300  # ~1-2 minutes on a laptop CPU
    if args.eval_data is None:
        args.eval_data = "synth-target,synth-source" if args.builtin else args.data
    args.eval_data = "" if args.eval_data == "none" else args.eval_data
    args.out = args.out or str(Path("out") / f"{args.method}-{Path(args.data).stem}")
    args.targets = TARGET_GROUPS.get(args.targets) or [t for t in args.targets.split(",") if t]
    args.betas = tuple(float(b) for b in args.betas.split(","))
    if args.lr is None:
        args.lr = METHODS[args.method][1 if args.builtin or args.model == "tiny" else 2]
        print(f"--lr not set: using {args.lr:g}, the default for {args.method} on "
              f"{'the tiny model' if args.builtin or args.model == 'tiny' else 'real LLMs'} (METHODS in train.py)")
    return args

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
# full fine-tuning: the method with no method


def prepare(model, args, batches):
    """Full fine-tuning: every parameter trains."""
    model.requires_grad_(True)
    return adamw(model.named_parameters(), args)


def merge(model):
    pass


def method_module(name):
    return sys.modules[__name__] if METHODS[name][0] == "train" else importlib.import_module(METHODS[name][0])

# -----------------------------------------------------------------------------
# checkpoints: atomic, weights_only, resume bit-identical


def trainable_state(model, optimizer, base_keys):
    """What a checkpoint stores of the model: entries the method added (adapter tensors, indices)
    plus base parameters the optimizer trains (full FT)."""
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if k not in base_keys or (k in params and id(params[k]) in trained)}


def save_checkpoint(path, model, optimizer, base_keys, step, args):
    ckpt = {"method": args.method, "step": step, "model": trainable_state(model, optimizer, base_keys),
            "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}}
    tmp = f"{path}.tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write never destroys the last good checkpoint


def load_checkpoint(path, method):
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # a checkpoint never runs code
    except Exception as e:
        raise ValueError(f"--resume: checkpoint {path!r} is corrupt or unreadable ({type(e).__name__})") from None
    if ckpt.get("method") != method:
        raise ValueError(f"--resume: {path!r} is a checkpoint of method {ckpt.get('method')!r}, not {method!r}")
    return ckpt

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

# -----------------------------------------------------------------------------
# the loop


def train(model, tok, args, problems, log_path=None):
    """Fine-tune `model` in place with args.method on `problems`; returns (model, optimizer, info).
    Checkpoints go to args.out/ckpt.pt; the model is merged before returning."""
    device = args.device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    examples, truncated = tokenize(problems, tok, args.seq_len, args.train_on_prompt)
    kept = [(x, y) for x, y in examples if any(t != -100 for t in y)]
    if len(kept) < len(examples):
        print(f"note: {len(examples) - len(kept)} examples have no solution tokens within --seq-len {args.seq_len}; skipped")
    if not kept:
        raise ValueError(f"--seq-len {args.seq_len} leaves no solution tokens in any example; raise it")
    examples = kept
    if truncated:
        print(f"note: {truncated} of {len(examples)} examples were longer than --seq-len {args.seq_len} and were truncated")
    steps_per_epoch = max(1, len(examples) // (args.batch_size * args.grad_accum))
    total = args.max_steps if args.max_steps is not None else max(1, round(args.epochs * steps_per_epoch))
    warmup = math.ceil(args.warmup_ratio * total)
    args.max_steps_resolved, args.n_train = total, len(examples)
    args.lr_first = args.lr * lr_mult(0, total, warmup, args.schedule)
    if args.lorasb_init_samples is None:
        args.lorasb_init_samples = min(len(examples), max(64, round(0.001 * len(examples))))

    def side_batches():  # for methods that look at data first; its own order, not the training one
        i = 0
        while True:
            yield collate(micro_batch(examples, i, args.batch_size, args.seed + 1), tok.pad_id, device)
            i += 1

    base_keys = set(model.state_dict())
    base_total = sum(p.numel() for p in model.parameters())
    module = method_module(args.method)
    torch.manual_seed(args.seed)
    optimizer = module.prepare(model, argparse.Namespace(**{**vars(args), "max_steps": total}), side_batches())
    print(f"\ntrainable parameters of {args.method} (rank {args.rank}, targets {','.join(args.targets)}):")
    n_trainable = print_trainable(model, optimizer, base_total)
    ckpt_path = out / "ckpt.pt"
    start = 0
    if args.resume:
        ckpt = load_checkpoint(ckpt_path, args.method)
        missing = set(ckpt["model"]) - set(model.state_dict())
        if missing:
            raise ValueError(f"--resume: checkpoint has entries this model lacks: {sorted(missing)[:3]}")
        model.load_state_dict(ckpt["model"], strict=False)
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        if ckpt["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        for key in ("batch_size", "grad_accum", "seed", "train_limit"):  # the data position depends on these
            if ckpt["args"].get(key) != getattr(args, key):
                raise ValueError(f"--resume: the checkpoint was made with --{key.replace('_', '-')} "
                                 f"{ckpt['args'].get(key)}, this run has {getattr(args, key)}; resume needs the same")
        start = ckpt["step"]
        print(f"resumed from {ckpt_path} at step {start}")

    params = [p for g in optimizer.param_groups for p in g["params"]]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if "cuda" in str(device) else nullcontext()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model.grad_checkpoint = args.grad_checkpoint
    model.train()
    print(f"training {total} steps ({len(examples)} examples, batch {args.batch_size} x {args.grad_accum} accum, "
          f"lr {args.lr:g} {args.schedule}, warmup {warmup}) -> {out}")
    log = open(log_path or out / "log.jsonl", "a")
    t0, tokens_seen, losses = time.time(), 0, []
    stop = []  # Ctrl-C: finish the step in flight, checkpoint, exit (a second Ctrl-C aborts at once)

    def on_sigint(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        print("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again aborts)", flush=True)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    try:
        for step in range(start, total):
            lr = args.lr * lr_mult(step, total, warmup, args.schedule)
            for g in optimizer.param_groups:
                g["lr"] = lr
            for j in range(args.grad_accum):
                x, y = collate(micro_batch(examples, step * args.grad_accum + j, args.batch_size, args.seed), tok.pad_id, device)
                with autocast:
                    _, loss = model(x, y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {step} (micro-batch {j}); stopping. "
                                             f"The last good checkpoint in {ckpt_path} is kept; try a lower --lr")
                (loss / args.grad_accum).backward()
                losses.append(loss.item())
                tokens_seen += int((x != tok.pad_id).sum())  # tokens processed (prompt + solution, no padding)
            norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm if args.max_grad_norm > 0 else math.inf)
            if not torch.isfinite(norm):
                raise FloatingPointError(f"gradient norm is {norm.item()} at step {step}; stopping. "
                                         f"The last good checkpoint in {ckpt_path} is kept; try a lower --lr")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if done % args.log_every == 0 or done == total:
                elapsed = time.time() - t0
                rec = {"step": done, "loss": sum(losses) / len(losses), "lr": lr, "tok_s": tokens_seen / elapsed,
                       "elapsed_s": elapsed}
                mem = f", {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if torch.cuda.is_available() else ""
                eta = elapsed / (done - start) * (total - done)
                print(f"step {done}/{total} | loss {rec['loss']:.4f} | lr {lr:.2e} | {rec['tok_s']:,.0f} tok/s"
                      f" | {elapsed:.0f}s elapsed, ETA {eta:.0f}s{mem}", flush=True)
                log.write(json.dumps(rec) + "\n")
                log.flush()
                losses = []
            if args.save_every and done % args.save_every == 0 and done < total:
                save_checkpoint(ckpt_path, model, optimizer, base_keys, done, args)
            if args.eval_every and done % args.eval_every == 0 and done < total:
                run_eval(model, tok, args, f"step {done}")
            if stop:
                save_checkpoint(ckpt_path, model, optimizer, base_keys, done, args)
                print(f"interrupted: checkpoint of step {done} saved to {ckpt_path}; continue with --resume")
                raise KeyboardInterrupt
    finally:
        log.close()
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    save_checkpoint(ckpt_path, model, optimizer, base_keys, total, args)
    info = {"steps": total, "trainable": n_trainable, "train_s": time.time() - t0, "truncated": truncated}
    if hasattr(module, "adapter_state"):
        from safetensors.torch import save_file
        state = {k: v.detach().contiguous().cpu() for k, v in module.adapter_state(model, optimizer).items()}
        save_file(state, str(out / "adapter.safetensors"))
    module.merge(model)
    model.eval()
    return model, optimizer, info


def run_eval(model, tok, args, label):
    """Accuracy on every --eval-data spec (test split); prints the table, returns {dataset: accuracy}."""
    if not args.eval_data:
        return {}
    problems = [p for spec in args.eval_data.split(",")
                for p in eval_math.load_problems(spec, "test", limit=args.eval_limit, seed=args.seed)]
    result = eval_math.evaluate(model, tok, problems, batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens)
    print(f"\naccuracy ({label}):")
    eval_math.print_table(result)
    return {name: r["accuracy"] for name, r in result["datasets"].items()}


def base_dir(args) -> Path:
    """Where the pretrained built-in base is cached (one per pretraining length)."""
    return Path("out") / f"base-tiny-{args.pretrain_steps}"


def pretrain_base(args) -> Path:
    """The built-in base: the tiny preset trained from random init (seed 0) on synth-source with full
    training, saved once under out/ and reused by every later run."""
    folder = base_dir(args)
    print(f"no cached base model in {folder}: pretraining the tiny model on synth-source "
          f"({args.pretrain_steps} steps; first run only)")
    model, tok = load("tiny", seed=0)
    pre = argparse.Namespace(**{**vars(args), "method": "full", "lr": 2e-3, "max_steps": args.pretrain_steps,
                                "schedule": "cosine", "warmup_ratio": 0.03, "batch_size": 32, "grad_accum": 1,
                                "betas": (0.9, 0.95), "max_grad_norm": 1.0, "seed": 0, "targets": list(LINEAR_NAMES),
                                "weight_decay": 0.0, "resume": False, "out": str(folder) + ".run", "eval_every": 0,
                                "save_every": 0, "log_every": 100, "dtype": "float32"})
    model.to(args.device)
    train(model, tok, pre, eval_math.load_problems("synth-source", "train", seed=0))
    model.save_pretrained(folder)
    tok.save(folder)
    return folder


def base_cache(args, model_path) -> Path:
    """Where what is measured once per base model is cached: its accuracy before fine-tuning and
    the text it writes itself (the forgetting measure)."""
    if args.builtin:
        return base_dir(args)
    p = Path(model_path)
    size = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.glob("*.safetensors"))
    return Path(args.out).parent / "base-cache" / f"{p.name}-{size}"


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
    ref = eval_math.drift_reference(model, tok, texts)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"texts": texts, "ref": ref}, f"{f}.tmp")
    os.replace(f"{f}.tmp", f)
    return texts, ref


def main(argv=None):
    args = parse_args(argv)
    print("config: " + " ".join(f"{k}={v}" for k, v in vars(args).items()))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model_path = args.model
    if args.builtin:
        model_path = str(base_dir(args)) if (base_dir(args) / "model.safetensors").exists() else str(pretrain_base(args))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if "cuda" in args.device and args.method != "full" else torch.float32
    t0 = time.time()
    model, tok = load(model_path, dtype=dtype, device=args.device, seed=args.seed)
    print(f"loaded {model_path} in {time.time() - t0:.1f}s: {sum(p.numel() for p in model.parameters()):,} parameters")
    problems = eval_math.load_problems(args.data, "train", limit=args.train_limit, seed=args.seed)
    real = not args.builtin and args.model not in PRESETS  # pretrained weights, not a random preset
    measure_forgetting = real and args.forget_prompts and args.eval_data  # --eval-data none: no evaluation
    cache = base_cache(args, model_path) if args.builtin or real else None
    before, forget = None, None
    if cache is not None and args.eval_data:  # the base's accuracy, computed once per base and cached
        f = cache / f"eval-{args.eval_data.replace(',', '+').replace('/', '_')}-{args.eval_limit}-seed{args.seed}.json"
        if f.exists():
            before = json.loads(f.read_text())
        else:
            before = run_eval(model, tok, args, "base model")
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(before))
    if measure_forgetting:
        texts, reference = forgetting_set(model, tok, args, cache)
    model, optimizer, info = train(model, tok, args, problems)
    model.save_pretrained(args.out)
    tok.save(args.out)
    label = f"{args.method} r={args.rank}"
    after = run_eval(model, tok, args, f"{label}, after {info['steps']} steps")
    if measure_forgetting:
        forget = {"texts": len(texts), **eval_math.drift(model, tok, texts, reference)}
    metrics = {"method": args.method, "rank": args.rank, **info, "accuracy": after, "accuracy_before": before,
               "forgetting": forget}
    Path(args.out, "metrics.json").write_text(json.dumps(metrics, indent=2))
    if before:
        specs = list(after)
        print("\n" + f"{'accuracy':<22}" + "".join(f"{s:>14}" for s in specs))
        print(f"{'base':<22}" + "".join(f"{100 * before[s]:>13.1f}%" for s in specs))
        print(f"{label:<22}" + "".join(f"{100 * after[s]:>13.1f}%" for s in specs))
    if forget:
        f = forget
        print(f"\nforgetting, on {f['tokens']:,} tokens the base model wrote itself ({f['texts']} neutral prompts):")
        print(f"{'':<22}{'loss':>10}{'loss rise':>11}{'KL(base||tuned)':>17}{'agreement':>11}")
        print(f"{'base':<22}{f['base_loss']:>10.4f}{'':>11}{0:>17.5f}{100:>10.1f}%")
        print(f"{label:<22}{f['loss']:>10.4f}{f['loss_rise']:>+11.4f}{f['kl']:>17.5f}{100 * f['agreement']:>10.1f}%")
    print(f"\nsaved to {args.out} (merged model, tokenizer, checkpoint, log.jsonl, metrics.json)")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
