"""
What a run writes and reads back: its --out folder (claimed before anything loads: never the base
model's folder or the built-in base's cache, never a folder of someone else's files without
--overwrite), checkpoints (read with weights_only=True so a checkpoint never runs code; resume is
bit-identical and refuses a checkpoint of other run-defining settings), the stop requests (Ctrl-C,
SIGTERM) that checkpoint and stop, and the run's results: the method's adapter (adapter.safetensors)
and the merged model in the base checkpoint's own dtype. Every file is written fresh under a unique
temporary name and renamed into place (weights.write_atomic, weights.save_pretrained): a crash leaves the old file or the
new one, and a link planted in --out is replaced, never written through.
"""
import json
import os
import re
import signal
import threading
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from builtin import base_dir
from distributed import gathered, is_sharded, rank_world, sharded_like
from methods import METHODS, trains_base
from model import PRESETS, Transformer
from weights import TMP, check_state_dict, load, model_file, open_weights, save_pretrained, write_atomic


def trainable_state(model, optimizer, base_keys):
    """What a checkpoint stores of the model: entries the method added (adapter tensors, indices)
    plus base parameters the optimizer trains (full FT). Whole tensors: under --fsdp each is gathered
    from the processes' shards (every process calls this, in the same order)."""
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    return {k: gathered(v.detach()).cpu().clone() for k, v in model.state_dict().items()
            if k not in base_keys or (k in params and id(params[k]) in trained)}


def optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with whole tensors (--fsdp: each sharded moment gathered), so a
    checkpoint has one layout, sharded run or not."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: gathered(v).cpu() if is_sharded(v) else v for k, v in st.items()}
                   for i, st in sd["state"].items()}
    return sd


def save_checkpoint(path, model, optimizer, base_keys, step, args, s, world=1, write=True):
    """ckpt.pt: the trained values, optimizer state, RNG, step and run-defining settings. Under --fsdp
    every process calls it (the tensors are gathered) and process 0 alone writes (`write`)."""
    ckpt = {"method": args.method, "step": step, "model": trainable_state(model, optimizer, base_keys),
            "optimizer": optimizer_state(optimizer), "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "run": run_defining(args, s, world)}
    if not write:
        return
    try:  # atomic: a crash mid-write never destroys the last good checkpoint
        write_atomic(path, lambda f: torch.save(ckpt, f))
    except (OSError, RuntimeError) as e:  # a full disk: torch reports it as either
        kept = f"the checkpoint in {path} from before is kept" if Path(path).exists() else "no checkpoint was written"
        raise OSError(f"could not write the checkpoint of step {step} to {path} ({e}); {kept}") from None


def run_defining(args, s, world: int) -> dict:
    """What a resumed run must share with its checkpoint: the method's settings, the model, the data
    and its order (which depends on the number of processes, `world`), the length."""
    flags = asdict(args)
    run = {k: flags[k] for k in ("method", "data", "train_limit", "seq_len", "train_on_prompt", "train_format",
                                 "grad_accum", "seed", "max_steps")}
    run["model"] = str(base_dir(args)) if args.builtin else (
        args.model if args.model in PRESETS or not os.path.exists(os.path.expanduser(args.model))
        else os.path.realpath(os.path.expanduser(args.model)))
    run["processes"] = world  # the data order depends on it (each process its shard of a batch)
    return {**run, **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()}}


def load_checkpoint(path, method, mmap=False):
    try:
        open(path, "rb").close()
    except FileNotFoundError:
        raise FileNotFoundError(f"--resume: no checkpoint at {str(path)!r}") from None
    except OSError as e:  # permission denied is not "missing"
        raise OSError(f"--resume: cannot read the checkpoint {str(path)!r} ({e.strerror})") from None
    try:
        # weights_only: a checkpoint never runs code; mmap (for the check before the model loads): read the
        # settings without reading every tensor, which resume() reads anyway
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise ValueError(f"--resume: checkpoint {str(path)!r} is corrupt or unreadable ({type(e).__name__})") from None
    parts = {"method": str, "step": int, "model": dict, "optimizer": dict, "rng": torch.Tensor, "cuda_rng": list}
    if (not isinstance(ckpt, dict) or any(not isinstance(ckpt.get(k), t) for k, t in parts.items()) or ckpt["step"] < 0
            or not isinstance(ckpt.get("run", {}), dict)
            or not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values())):
        raise ValueError(f"--resume: {str(path)!r} is not a nanopeft checkpoint (it lacks the parts a run saves: "
                         f"{', '.join(parts)}, run)")
    if ckpt["method"] != method:
        raise ValueError(f"--resume: {str(path)!r} is a checkpoint of method {ckpt['method']!r}, not {method!r}")
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
    try:  # (the run-defining settings matched: a checkpoint that does not fit was altered by hand)
        own = model.state_dict()  # --fsdp: each whole tensor cut to this process's shard
        model.load_state_dict({k: sharded_like(v, own[k]) for k, v in ckpt["model"].items()}, strict=False)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for i, st in ckpt["optimizer"]["state"].items():  # (Adam's moments have their parameter's shape)
            st.update({k: sharded_like(v, params[i]) for k, v in st.items() if v.shape == params[i].shape})
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        if ckpt["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    except (KeyError, IndexError, TypeError, RuntimeError) as e:
        raise ValueError(f"--resume: the checkpoint {str(path)!r} does not fit this model and method "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
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


# The files a run writes into --out (the merged model, every tokenizer's files, the adapter, the checkpoint,
# the log, the metrics) and its marker, written first: together, the sign of "an earlier nanopeft run's
# folder", which a new run may write over. Temporaries start with TMP and have unique names.
MARKER = ".nanopeft"
OUTPUTS = frozenset({MARKER, "config.json", "model.safetensors", "adapter.safetensors", "ckpt.pt", "log.jsonl",
                     "metrics.json", "nanopeft_tokenizer.json", "tokenizer.json", "tokenizer_config.json",
                     "generation_config.json", "tokenizer.model"})
SHADOW = "model.safetensors.index.json"  # beside model.safetensors, a loader would read its shards instead
# folders whose files other runs read back, never an --out (nor a folder inside one): the built-in base
# cached by builtin.base_dir, its pretraining run (.run), and the base measurements of train.base_cache
CACHES = re.compile(r"base-tiny-\d+(\.run)?|base-cache")


def open_log(path: Path, append: bool):
    """log.jsonl for writing: a fresh run's is a new file renamed into place at once (a fresh run starts a
    fresh log); --resume appends to the earlier run's, opened without following a link."""
    if not append:
        write_atomic(path, b"")
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666), "w")


def protected(args) -> list[tuple[str, Path]]:
    """(what, where) a run reads and never writes into: the base model it trains from, and every
    built-in base cached under ./out (with its pretraining folder)."""
    if args.builtin:
        found = [("the built-in base model's cache", base_dir(args)), ("its pretraining folder",
                                                                       Path(f"{base_dir(args)}.run"))]
    else:
        found = [] if args.model in PRESETS else [(f"--model {args.model}", Path(model_file(args.model)).expanduser())]
    found += [("a cached built-in base model", p) for p in Path("out").glob("base-tiny-*")]
    return [(what, Path(os.path.realpath(p))) for what, p in found]


def check_out_place(args):
    """--out is never the folder of the base model the run reads, inside it or around it, nor a cache."""
    out = Path(os.path.realpath(args.out))
    for part in out.parts:
        if CACHES.fullmatch(part):
            raise ValueError(f"--out {args.out} is not allowed: {part} is a cache other runs read back (a built-in "
                             "base model or base measurements), which a run never writes into; choose another folder")
    for what, p in protected(args):
        rel = ("is" if out == p else "is inside" if out.is_relative_to(p) else "contains" if p.is_relative_to(out)
               else "")
        if rel:
            where = "" if what.endswith(str(p)) else f" ({p})"
            raise ValueError(f"--out {args.out} is not allowed: it {rel} {what}{where}, which the run reads and never "
                             "writes into; choose another folder")


def _ours(entry: Path) -> bool:
    """Whether an entry of --out is one an earlier run writes: a plain file (not a link) of one of its
    names, or one of its temporaries."""
    return not entry.is_symlink() and (entry.name.startswith(TMP) or (entry.name in OUTPUTS and entry.is_file()))


def _show(entries) -> str:
    kind = lambda e: " (a link)" if e.is_symlink() else " (a folder)" if e.is_dir() else ""
    more = f" and {len(entries) - 4} more" if len(entries) > 4 else ""
    return ", ".join(e.name + kind(e) for e in entries[:4]) + more


def check_out(args, s):
    """--out, checked before anything is loaded or written. Refused: the base model's folder, a folder
    inside or around it, a cache (check_out_place); a file; a folder holding anything but an earlier
    nanopeft run's files (OUTPUTS, and its MARKER or ckpt.pt), unless --overwrite (which still deletes
    nothing here: the run's files replace their namesakes as it writes them); the checkpoint of an
    earlier run without --resume or --overwrite; with --resume, other run-defining settings, or a link or
    folder at a name the run writes (other files there are left alone). An empty or new folder is fine."""
    out = Path(args.out)
    check_out_place(args)
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {args.out} is a file, not a folder")
        entries = sorted(out.iterdir()) if out.exists() else []
    except OSError as e:
        raise ValueError(f"--out {args.out} cannot be read ({e.strerror})") from None
    ckpt = out / "ckpt.pt"
    if args.overwrite:  # a folder where the run writes a file: the rename would fail after training
        if folders := [e for e in entries if e.name in OUTPUTS and e.is_dir() and not e.is_symlink()]:
            raise ValueError(f"--out {args.out} holds a folder named {folders[0].name}, where the run writes a file; "
                             "move it, or choose another --out")
    elif args.resume:  # the checkpoint's folder: the run's own files, links and folders are not its
        if bad := [e for e in entries if (e.name in OUTPUTS or e.name == SHADOW) and not _ours(e)]:
            raise ValueError(f"--out {args.out} holds {_show(bad)}, which no nanopeft run wrote and --resume would "
                             "replace; move it, or start afresh with --overwrite")
    elif ckpt.exists():
        raise ValueError(f"--out {args.out} holds the checkpoint of an earlier run: continue it with --resume, "
                         "or start afresh with --overwrite")
    elif foreign := [e for e in entries if not _ours(e)]:
        raise ValueError(f"--out {args.out} holds files no nanopeft run wrote ({_show(foreign)}); nothing was changed: "
                         "choose a new or empty --out, or replace the run's files there with --overwrite")
    elif entries and not (out / MARKER).is_file():
        raise ValueError(f"--out {args.out} holds {_show(entries)} but no sign that a nanopeft run wrote them (its "
                         f"{MARKER} or ckpt.pt); nothing was changed: choose a new or empty --out, or replace them "
                         "with --overwrite")
    if args.resume:
        check_resumable(ckpt, args, s)


def claim_out(args):
    """--out (checked: check_out) made and marked as a nanopeft run's (MARKER), once every input is checked."""
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / MARKER, json.dumps({"written_by": "nanopeft train.py", "method": args.method}).encode())
    except OSError as e:
        raise ValueError(f"--out {args.out} cannot be written ({e.strerror or e})") from None


def save_adapter(module, model, optimizer, out: Path, write=True):
    """adapter.safetensors: the method's small learned update (before merge folds it into the weights);
    removed for a method that has none, so another method's adapter never sits beside this model.
    Under --fsdp every process calls it (the tensors are gathered) and process 0 writes (`write`)."""
    if trains_base(module):
        if write:
            (out / "adapter.safetensors").unlink(missing_ok=True)
        return
    from safetensors.torch import save
    state = {k: gathered(v.detach()).contiguous().cpu() for k, v in module.adapter_state(model, optimizer).items()}
    if not write:
        return
    try:
        write_atomic(out / "adapter.safetensors", save(state))
    except Exception as e:  # a full disk: safetensors raises its own error type
        raise OSError(f"could not write {out / 'adapter.safetensors'} ({e}); the checkpoint is kept") from None


def base_weights(model_path, args) -> tuple:
    """The base model's weights as stored, in our names, to be read one at a time: ({name: a meta tensor
    of its stored shape and dtype}, read(name) -> the tensor), checked against its config as loading
    checks them (a tied lm_head's entry is the embeddings'; it is never read). weights.open_weights: a
    Hugging Face folder is read tensor by tensor, a GGUF (dequantized to fp32) or a Meta folder whole;
    a preset: its random init, recreated in fp32 (presets are small)."""
    if model_path in PRESETS:
        sd = load(model_path, seed=args.seed)[0].state_dict()
        return {k: v.to("meta") for k, v in sd.items()}, sd.__getitem__
    path = model_file(model_path)
    cfg, layout, read = open_weights(path)
    with torch.device("meta"):
        shapes = Transformer(cfg)  # the names and shapes the weights must have, no memory
    return check_state_dict(shapes, layout, str(path)), read


@torch.no_grad()
def save_merged(model, tok, args, s, model_path, write=True) -> dict | None:
    """Save the fine-tuned model and its tokenizer to args.out in the base checkpoint's own dtypes (fp32 in,
    fp32 out; bf16 in, bf16 out; a GGUF: fp32), computed in fp32 from the base weights as stored on disk plus the
    method's exact fp32 update (adapter.safetensors; full fine-tuning: its trained weights). A run
    whose base was loaded in bf16 thus never rounds the checkpoint: every tensor the method does not
    train is saved bit-exact. Prints, and returns, how much of the update the saved dtype kept.
    One tensor at a time: read from the base, merged (merge_adapter on one matrix, as targets.fold),
    rounded, counted, written (weights.save_pretrained) and let go: beside the tensor being written it
    holds about one matrix in fp32 and its merge's temporaries, not the whole model (8B: 58 GB).
    Under --fsdp every process calls it (full FT's weights are gathered, a collective: tensor by tensor,
    in state_dict order, on every process) and process 0 writes (`write`)."""
    from safetensors.torch import load_file
    module = METHODS[args.method][0]
    own = model.state_dict() if trains_base(module) else {}  # full fine-tuning: the trained weights themselves
    tied = {"lm_head.weight"} if model.config.tie_embeddings else set()  # embed_tokens.weight: saved, counted once
    if not write:  # process 0 makes the same gathers, in the same order, as it writes
        for k in own:
            if k not in tied:
                gathered(own[k].detach())
        return None
    layout, read = base_weights(model_path, args)
    layout = {**{k: layout[k] for k in own}, **layout}  # full FT: written in state_dict order, the gathers' order
    adapter = {} if trains_base(module) else load_file(str(Path(args.out) / "adapter.safetensors"))
    count = {"changed": 0, "rounded_away": 0}

    def merged(k: str) -> torch.Tensor:
        """Weight k as saved: the base's value plus the update, in fp32, rounded once into the base's dtype."""
        W0 = read(k)
        if k in own:
            W = gathered(own[k].detach()).float().cpu()
        elif mine := {a: v for a, v in adapter.items() if a.startswith(k.rpartition(".")[0] + ".")}:
            W = module.merge_adapter({k: W0}, mine, s)[k]  # one matrix and its adapter's entries
        else:
            return W0  # the method does not change it: saved bit-exact
        out = W.to(W0.dtype)
        for w, w0, o in zip(*(t.reshape(-1).split(1 << 24) for t in (W, W0, out))):  # (small temporaries)
            moved = w != w0  # the update the saved dtype rounded away: changed entries saved as their base value
            count["changed"] += int(moved.count_nonzero())
            count["rounded_away"] += int((moved & (o == w0)).count_nonzero())
        return out

    save_pretrained(model, args.out, tok=tok, layout=layout, tensor=merged)  # (a stale index and its shards go)
    dtypes = "/".join(sorted({str(v.dtype).removeprefix("torch.") for v in layout.values()}))
    where = " (the GGUF's weights dequantized)" if model_file(model_path).endswith(".gguf") else ""
    line = f"saved the merged model in {dtypes}, the base checkpoint's dtype{where}"
    changed, rounded = count["changed"], count["rounded_away"]
    if rounded:
        line += (f"; {rounded:,} of the {changed:,} entries the update changes ({100 * rounded / changed:.2f}%) are "
                 f"rounded back to their base value in {dtypes}: adapter.safetensors keeps the exact fp32 update")
    print(line)
    return {"dtype": dtypes, **count}
