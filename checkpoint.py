"""
What a run writes and reads back: checkpoints (atomic, read with weights_only=True so a checkpoint
never runs code; resume is bit-identical and refuses a checkpoint of other run-defining settings),
the stop requests (Ctrl-C, SIGTERM) that checkpoint and stop, and the run's results: the method's
adapter (adapter.safetensors) and the merged model in the base checkpoint's own dtype.
"""
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from builtin import base_dir
from distributed import rank_world
from methods import METHODS, trains_base
from model import PRESETS, Transformer
from weights import check_state_dict, load, model_file, read_weights, save_pretrained, usual_permissions


def trainable_state(model, optimizer, base_keys):
    """What a checkpoint stores of the model: entries the method added (adapter tensors, indices)
    plus base parameters the optimizer trains (full FT)."""
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if k not in base_keys or (k in params and id(params[k]) in trained)}


def save_checkpoint(path, model, optimizer, base_keys, step, args, s, world=1):
    ckpt = {"method": args.method, "step": step, "model": trainable_state(model, optimizer, base_keys),
            "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "run": run_defining(args, s, world)}
    tmp = f"{path}.tmp"
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)  # atomic: a crash mid-write never destroys the last good checkpoint
    except (OSError, RuntimeError) as e:  # a full disk: torch reports it as either
        Path(tmp).unlink(missing_ok=True)
        kept = f"the checkpoint in {path} from before is kept" if Path(path).exists() else "no checkpoint was written"
        raise OSError(f"could not write the checkpoint of step {step} to {path} ({e}); {kept}") from None


def run_defining(args, s, world: int) -> dict:
    """What a resumed run must share with its checkpoint: the method's settings, the model, the data
    and its order (which depends on the number of processes, `world`), the length."""
    run = {k: asdict(args)[k] for k in ("method", "data", "train_limit", "seq_len", "train_on_prompt", "train_format",
                                      "grad_accum", "seed", "max_steps")}
    run["model"] = str(base_dir(args)) if args.builtin else (
        args.model if args.model in PRESETS or not os.path.exists(os.path.expanduser(args.model))
        else os.path.realpath(os.path.expanduser(args.model)))
    run["processes"] = world  # the data order depends on it (each process its shard of a batch)
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


OLD_DEFAULTS = {"processes": 1, "train_format": "nanopeft"}  # run-defining settings older checkpoints lack


def check_resumable(path, args, s):
    """--resume continues only the run its checkpoint belongs to: every run-defining setting equal."""
    then, now = load_checkpoint(path, args.method, mmap=True).get("run", {}), run_defining(args, s, rank_world()[1])
    for key, value in now.items():
        if key == "max_steps" and s.schedule == "constant" and s.warmup_ratio == 0 and isinstance(then.get(key), int):
            continue  # a constant lr does not depend on the length: extending such a run is exact (LIFT does
            # the mask refresh the shorter run skipped after its last step when its state loads)
        if then.get(key, OLD_DEFAULTS.get(key)) != value:  # (checkpoints from before the setting existed)
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


def save_adapter(module, model, optimizer, out: Path):
    """adapter.safetensors: the method's small learned update (before merge folds it into the weights);
    removed for a method that has none, so another method's adapter never sits beside this model."""
    if trains_base(module):
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


def base_weights(model_path, args) -> dict:
    """The base model's weights as stored, in our names (read_weights: a GGUF dequantized to fp32;
    a preset: its random init, recreated in fp32), checked against its config as loading checks
    them, with lm_head filled in where it is tied."""
    if model_path in PRESETS:
        return load(model_path, seed=args.seed)[0].state_dict()
    path = model_file(model_path)
    cfg, sd = read_weights(path)
    with torch.device("meta"):
        shapes = Transformer(cfg)  # the names and shapes the weights must have, no memory
    return check_state_dict(shapes, sd, str(path))


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
    if trains_base(module):  # full fine-tuning: the trained weights themselves
        merged = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    else:
        merged = module.merge_adapter(base, load_file(str(Path(args.out) / "adapter.safetensors")), s)
    sd = {k: merged[k].to(base[k].dtype) if k in merged else base[k] for k in model.state_dict()}
    # the update the saved dtype rounded away: changed entries (in fp32) saved as their base value
    changed = rounded = 0
    for k, W in merged.items():
        if k == "lm_head.weight" and model.config.tie_embeddings:
            continue  # the same tensor as embed_tokens.weight: counted once
        moved = W != base[k].float()
        changed += int(moved.sum())
        rounded += int((moved & (sd[k] == base[k])).sum())
    save_pretrained(model, args.out, state_dict=sd)
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in sd.values()})
    where = " (the GGUF's weights dequantized)" if model_file(model_path).endswith(".gguf") else ""
    line = f"saved the merged model in {'/'.join(dtypes)}, the base checkpoint's dtype{where}"
    if rounded:
        line += (f"; {rounded:,} of the {changed:,} entries the update changes ({100 * rounded / changed:.2f}%) are "
                 f"rounded back to their base value in {'/'.join(dtypes)}: adapter.safetensors keeps the exact fp32 update")
    print(line)
    return {"dtype": "/".join(dtypes), "changed": changed, "rounded_away": rounded}
