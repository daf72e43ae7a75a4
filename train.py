"""
The one plain training loop every method shares, and a run: load, measure the base, train, save,
evaluate, print the tables.

    python train.py --method lift --rank 128        # built-in default: tiny LLaMA, synthetic problems, no downloads
    python train.py --method lora --rank 16 --model ~/Llama-3.2-1B --data gsm8k --eval-data gsm8k

A method meets the loop through the contract in methods.py (Settings, prepare -> optimizer, merge);
the loop names no method. Where the rest lives: the command line, its Run settings and each method's
settings in cli.py, checkpoints and the saved results in checkpoint.py, the built-in experiment in
builtin.py, the forgetting measure in forgetting.py, torchrun's helpers in distributed.py.
"""
import functools
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext, redirect_stdout
from dataclasses import asdict, replace
from pathlib import Path

import torch

import eval_math
import forgetting
import math_data
from builtin import base_dir, builtin_base
from checkpoint import (check_out, check_resumable, claim_out, open_log, resume, save_adapter, save_checkpoint,
                        save_merged, stop_requests)
from cli import parse_args, print_settings
from distributed import (all_reduce_sum_, gathered, held_mb, per_process, rank_world, resident_mb, shard,
                         start_distributed)
from methods import METHODS, trains_base
from model import PRESETS, bf16_fast
from weights import check_finite, load, model_file, write_atomic

# -----------------------------------------------------------------------------
# data: prompt + solution, loss on the solution


def tokenize(problems, tok, seq_len, train_on_prompt=False, fmt="nanopeft"):
    """Each problem -> (input ids, target ids) with -100 on the prompt; counts truncations. `fmt`:
    how an example is written and tokenized (eval_math.training_ids)."""
    examples, truncated = [], 0
    for p in problems:
        prompt, target = eval_math.training_ids(tok, p, fmt)
        seq = prompt + target
        if len(seq) > seq_len + 1:
            seq, truncated = seq[:seq_len + 1], truncated + 1
        x, y = seq[:-1], seq[1:]
        if not train_on_prompt:  # (a prompt longer than seq_len leaves no target at all)
            n = min(len(prompt) - 1, len(y))
            y = [-100] * n + y[n:]
        examples.append((x, y))
    return examples, truncated


def training_examples(problems, tok, seq_len, train_on_prompt, fmt="nanopeft"):
    """tokenize, then drop examples with no solution token left, saying how many were cut or dropped."""
    examples, truncated = tokenize(problems, tok, seq_len, train_on_prompt, fmt)
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
    order = epoch_order(len(examples), seed * 100003 + epoch)
    return [examples[k] for k in order[j * batch_size:(j + 1) * batch_size]]


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int) -> list[int]:
    """One epoch's seeded permutation of n examples, drawn once: a step reads grad-accum x processes
    micro-batches of it (the others' only to count their target tokens)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def n_targets(examples) -> int:
    """Target tokens (the ones with a loss) in a list of examples."""
    return sum(len(y) - y.count(-100) for _, y in examples)


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


def check_step(value: float, what, step, ckpt_path):
    """A non-finite loss or gradient norm stops the run. Settings and base weights were checked finite
    before training, so after an update it is divergence (the lr); at step 0 no update was taken yet."""
    if not math.isfinite(value):
        kept = f"the last good checkpoint in {ckpt_path} is kept" if ckpt_path.exists() else "no checkpoint was written"
        why = ("Try a lower --lr" if step > 0 else "No update was taken yet: the model as the method prepared it "
               "gives it (check the method's settings, --dtype and the data)")
        raise FloatingPointError(f"{what} is {value} at step {step}; stopping: {kept}. {why}")


def print_accuracy(before: dict, after: dict, label: str):
    """The base model's accuracy and the tuned model's, a column per eval dataset."""
    w = {d: max(14, len(d) + 2) for d in after}
    print("\n" + f"{'accuracy':<22}" + "".join(f"{d:>{w[d]}}" for d in w))
    print(f"{'base':<22}" + "".join(f"{100 * before[d]:>{w[d] - 1}.1f}%" for d in w))
    print(f"{label:<22}" + "".join(f"{100 * after[d]:>{w[d] - 1}.1f}%" for d in w))

# -----------------------------------------------------------------------------
# the loop


def precision(args) -> tuple[torch.dtype, bool]:
    """(dtype of the loaded weights, whether steps run under bf16 autocast), from --dtype. float32: fp32
    throughout. bfloat16, or auto where the device multiplies bf16 natively (model.bf16_fast: CUDA GPUs,
    CPUs with AVX512-BF16/AMX): the matrix products run under bf16 autocast and the frozen base weights
    are stored in bf16. A method whose trained state is the base weights themselves (TRAINS_BASE: full
    fine-tuning) keeps them in fp32, as master weights, so no update rounds away in a bf16 weight.
    Trainable values and optimizer state are fp32 always."""
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and bf16_fast(args.device))
    stored = bf16 and not trains_base(METHODS[args.method][0])
    return (torch.bfloat16 if stored else torch.float32), bf16


def attach_method(model, tok, args, s, examples, total, warmup):
    """The method's `prepare` (methods.py: the contract): freeze the base, attach its trainable pieces,
    return its optimizer. It gets the run's facts, and batches in an order of its own (not the training
    order) for methods that look at data first."""
    def side_batches():
        i = 0
        while True:
            yield collate(micro_batch(examples, i, s.batch_size, args.seed + 1), tok.pad_id, args.device)
            i += 1

    torch.manual_seed(args.seed)
    return METHODS[args.method][0].prepare(model, s, side_batches(), seed=args.seed, total_steps=total,
                                           grad_accum=args.grad_accum, n_train=len(examples),
                                           lr_first=s.lr * lr_mult(0, total, warmup, s.schedule))


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
    # process 0 writes the checkpoints; under --fsdp every process gathers its shards into them
    fsdp = parallel and args.fsdp
    save = functools.partial(save_checkpoint, world=world, write=rank == 0) if rank == 0 or fsdp else (lambda *a: None)
    # the data, and the run's length in optimizer steps (--max-steps, else --epochs passes)
    examples, truncated = training_examples(problems, tok, args.seq_len, args.train_on_prompt, args.train_format)
    if s.batch_size > len(examples):  # never silently another batch than the one asked for
        print(f"note: --batch-size {s.batch_size} is more than the {len(examples)} training examples: each micro-batch "
              f"is all {len(examples)} of them")
    steps_per_epoch = max(1, len(examples) // (s.batch_size * args.grad_accum * world))
    total = args.max_steps if args.max_steps is not None else max(1, round(s.epochs * steps_per_epoch))
    warmup = math.ceil(s.warmup_ratio * total)
    # the method: freeze the base, attach its trainable values, return its optimizer; print their count
    base_keys, base_total = set(model.state_dict()), sum(p.numel() for p in model.parameters())
    model.grad_checkpoint = args.grad_checkpoint  # set before prepare: its data passes (LoRA-SB) use it too
    model.train()
    optimizer = attach_method(model, tok, args, s, examples, total, warmup)
    print(f"\ntrainable parameters of {args.method}" + (f", rank {s.rank}" if hasattr(s, "rank") else "")
          + (f", targets {','.join(s.targets)}:" if hasattr(s, "targets") else ":"))
    n_trainable = print_trainable(model, optimizer, base_total)
    if fsdp:  # FSDP2: every parameter, its gradient and its AdamW moments held once across the processes
        shard(model, optimizer)
    # --resume: the checkpoint's trained values, optimizer state, RNG and step
    start = resume(ckpt_path, model, optimizer, args, s) if args.resume else 0
    # bf16 autocast where precision() says so (the trainable values and Adam's state stay fp32)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    autocast = torch.autocast(torch.device(args.device).type, torch.bfloat16) if precision(args)[1] else nullcontext()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    print(f"training {total} steps ({len(examples)} examples, batch {s.batch_size} x {args.grad_accum} accum, "
          f"lr {s.lr:g} {s.schedule}, warmup {warmup}) -> {out}")
    if fsdp:
        print(f"sharded data parallel (FSDP2): {world} processes ({torch.distributed.get_backend()}), each holding 1/{world} "
              f"of every weight, gradient and AdamW moment; a step's batch {s.batch_size} x {args.grad_accum} accum x "
              f"{world} = {s.batch_size * args.grad_accum * world} examples; gradients reduce-scattered (summed)")
    elif world > 1:
        print(f"data parallel: {world} processes ({torch.distributed.get_backend()}), a step's batch {s.batch_size} x "
              f"{args.grad_accum} accum x {world} = {s.batch_size * args.grad_accum * world} examples; each step "
              f"all-reduces {sum(p.numel() for p in params):,} gradient values (the trainable ones) in one message")
    # the log (process 0 writes it); Ctrl-C / SIGTERM set a flag the loop reads after each step
    t0, tokens, losses, sent = time.time(), 0, [], 0
    log_file = open_log(Path(log_path or out / "log.jsonl"), args.resume) if rank == 0 else open(os.devnull, "w")
    with log_file as log, stop_requests() as stop:
        for step in range(start, total):
            # this step's learning rate: warmup, then decay; a pure function of the step
            lr = s.lr * lr_mult(step, total, warmup, s.schedule)
            for g in optimizer.param_groups:
                g["lr"] = lr
            # the step's micro-batches: grad_accum of this process's, and the other processes' (only counted)
            batches = [micro_batch(examples, (step * args.grad_accum + j) * world + r, s.batch_size, args.seed)
                       for j in range(args.grad_accum) for r in range(world)]
            step_targets = n_targets([e for b in batches for e in b])
            # forward and backward over grad_accum micro-batches. The step's loss is the mean over all its
            # target tokens, in every micro-batch of every process: each micro-batch's mean loss weighs
            # its share of the step's targets, so batch 4 = batch 2 x accum 2 = 2 processes x batch 2.
            # (step loss, tokens, stop requested): kept on the device, no host sync per micro-batch
            stats = torch.zeros(3, device=args.device)
            for batch in batches[rank::world]:
                x, y = collate(batch, tok.pad_id, args.device)
                with autocast:
                    _, loss = model(x, y)
                share = n_targets(batch) / step_targets  # exactly 1.0 for one micro-batch in one process
                (loss * share).backward()
                stats[0] += loss.detach() * share
                stats[1] += (x != tok.pad_id).sum()  # tokens processed (prompt + solution, no padding)
            if hasattr(optimizer, "collect_gradients"):  # (LIFT under --fsdp: its entries of the gradient shards)
                optimizer.collect_gradients()
            if world > 1:  # the step's gradient is the sum of the processes' shares: one message with the stats
                stats[2] = float(bool(stop))
                grads = [] if fsdp else [p.grad for p in params if p.grad is not None]  # (FSDP2 sums them itself)
                sent = all_reduce_sum_(grads + [stats])
            # clip the global gradient norm (0 = off); one host sync per step: a NaN loss or gradient stops
            # the run before the optimizer takes the step (never trains on)
            norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm if s.max_grad_norm > 0 else math.inf)
            step_loss, n_tokens, stopping, norm = torch.cat([stats, gathered(norm).float().view(1)]).tolist()
            check_step(step_loss, "loss", step, ckpt_path)
            check_step(norm, "gradient norm", step, ckpt_path)
            losses.append(step_loss)
            tokens += int(n_tokens)
            if stopping and not stop:  # another process was asked to stop: all stop at this step
                stop.append(signal.SIGTERM)
            # the method's update (its optimizer: LIFT's sparse AdamW, AdamW on the adapters, ...)
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
    # what each process holds after training (now, and its peak, which loading the whole base sets)
    mine = [round(held_mb(model, optimizer), 3), round(resident_mb()), round(resident_mb("VmHWM"))]
    memory = per_process(mine) if world > 1 else [mine]
    if world > 1:
        print("memory per process, MB (tensors held / resident now / resident peak): "
              + ", ".join(" / ".join(f"{v:,.0f}" for v in m) for m in memory))
    # the last checkpoint and the adapter file, then the update folded into the weights (merge)
    save(ckpt_path, model, optimizer, base_keys, total, args, s)
    info = {"steps": total, "trainable": n_trainable, "model_params": base_total, "train_s": time.time() - t0,
            "truncated": truncated, "processes": world, "allreduce_bytes_per_step": sent,
            "memory_mb": [dict(zip(("held", "resident", "resident_peak"), m)) for m in memory]}
    module = METHODS[args.method][0]
    if rank == 0 or fsdp:
        save_adapter(module, model, optimizer, out, write=rank == 0)
    if world > 1:  # the checkpoint and adapter are on disk before any process goes on (a --resume may follow)
        torch.distributed.barrier()
    if not fsdp:  # (sharded: the saved model is made from the saved pieces, checkpoint.save_merged)
        module.merge(model, optimizer, s)
    model.eval()
    return model, optimizer, info

# -----------------------------------------------------------------------------
# evaluation, what is measured once per base model, a run


@functools.lru_cache(maxsize=4)
def eval_problems(eval_data: str, limit, seed) -> tuple:
    """The test problems of every --eval-data spec (loaded once: main checks them before the model)."""
    return tuple(math_data.load_all(eval_data, "test", limit, seed, flag="--eval-data"))


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


def base_cache(args, model_path) -> Path:
    """Where what is measured once per base model is cached: its accuracy before fine-tuning and
    the text it writes itself (the forgetting measure)."""
    if args.builtin:
        return base_dir(args)
    p = Path(model_file(model_path)).resolve()  # smollm2-135m: its file
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file())
    key = "|".join([str(p), str(precision(args)), *(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)])
    return Path(args.out).parent / "base-cache" / f"{p.name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def base_accuracy(model, tok, args, cache: Path) -> dict | None:
    """The base model's accuracy on --eval-data, measured once per base and evaluation setting and
    cached in `cache` (None without --eval-data)."""
    if not args.eval_data:
        return None
    # the seed picks synthetic problems only: a file's first --eval-limit problems are the same for every seed
    seed = f"-seed{args.seed}" if "synth" in args.eval_data else ""
    name = f"{args.eval_data.replace(',', '+').replace('/', '_')}-{args.eval_limit}{seed}"
    if len(name) > 120:  # several paths: a file name has at most 255 bytes
        name = hashlib.sha1(name.encode()).hexdigest()[:16]
    f = cache / f"eval-{name}-{args.max_new_tokens}-{args.protocol}-{args.num_beams}.json"
    try:
        cached = json.loads(f.read_text())
    except FileNotFoundError:
        cached = None
    except ValueError:  # a cut or foreign file (UnicodeDecodeError too): measured again, and replaced
        cached = "?"
    if isinstance(cached, dict) and all(type(v) in (int, float) for v in cached.values()):
        return cached
    if cached is not None:
        print(f"note: {f} is not a cached accuracy; measuring the base model again")
    before = run_eval(model, tok, args, "base model")
    f.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(f, json.dumps(before).encode())
    return before


def check_fits(args, max_seq_len: int):
    """--seq-len, and the evaluation's new tokens and beams (eval_math.check_decoding), against a model of
    max_seq_len positions: one line before anything is evaluated or trained."""
    if args.seq_len > max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} is more than the model's {max_seq_len} positions "
                         "(its max_position_embeddings); lower it")
    if args.eval_data:
        eval_math.check_decoding(max_seq_len, args.max_new_tokens, args.num_beams, args.eval_batch_size, args.protocol)


def main(argv=None):
    """One run. Under torchrun every process runs it: process 0 prints, evaluates and writes files and
    returns the metrics; the others train their shard quietly and return None."""
    args, s, origin = parse_args(argv)
    rank, device = start_distributed(args.device, args.dist_timeout)
    args = replace(args, device=device)
    if rank == 0:
        return run(args, s, origin)
    with open(os.devnull, "w") as null, redirect_stdout(null):
        return run(args, s, origin, rank)


def run(args, s, origin, rank=0):
    print("run: " + " ".join(f"{k}={v}" for k, v in asdict(args).items()))
    print_settings(args.method, s, origin)
    # every input checked before the model loads and before anything is written: the output folder, the
    # training and eval data, what the built-in base's context allows; then --out is claimed
    if rank == 0:
        check_out(args, s)
    elif args.resume:
        check_resumable(Path(args.out) / "ckpt.pt", args, s)
    problems = math_data.load_problems(args.data, "train", limit=args.train_limit, seed=args.seed)
    step = s.batch_size * args.grad_accum * rank_world()[1]
    if args.grad_accum > 1 and step > len(problems):  # accumulating past the data repeats it within a step
        world = f" x {rank_world()[1]} processes" if rank_world()[1] > 1 else ""
        raise ValueError(f"--grad-accum {args.grad_accum} is not allowed here: a step of {step:,} examples "
                         f"(--batch-size {s.batch_size} x --grad-accum {args.grad_accum}{world}) is more than the "
                         f"{len(problems):,} training problems; lower it")
    if args.eval_data:
        eval_problems(args.eval_data, args.eval_limit, args.seed)
    if args.builtin:
        check_fits(args, PRESETS["tiny"]["max_seq_len"])  # known before the base's minutes of pretraining
    if rank == 0:
        claim_out(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model_path = args.model
    if args.builtin:
        model_path = builtin_base(args, train)  # pretrained by this loop on the first run
    dtype, bf16 = precision(args)
    t0 = time.time()
    model, tok = load(model_path, dtype=dtype, device=args.device, seed=args.seed)
    print(f"loaded {model_path} in {time.time() - t0:.1f}s: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"weights {str(dtype)[6:]}" + (", bf16 autocast" if bf16 else ""))
    # the model in hand, before any evaluation or training: the lengths fit its context, its weights are numbers
    check_fits(args, model.config.max_seq_len)
    check_finite(model, str(model_path))  # a nan weight is the model's fault, named so, not a diverged loss later
    real = not args.builtin and args.model not in PRESETS  # pretrained weights, not a random preset
    measure_forgetting = rank == 0 and real and args.forget_prompts and args.eval_data  # none: no evaluation
    cache = base_cache(args, model_path) if args.builtin or real else None
    before = base_accuracy(model, tok, args, cache) if rank == 0 and cache is not None else None
    if measure_forgetting:
        texts, reference = forgetting.forgetting_set(model, tok, args, cache)
    model, optimizer, info = train(model, tok, args, s, problems)
    if args.fsdp:  # every process takes part in gathering full FT's weights; process 0 writes
        saved = save_merged(model, tok, args, s, model_path, write=rank == 0)
        del model, optimizer
        if rank != 0:
            return None
        # what is evaluated is what was saved: the merged model, loaded whole on process 0
        model = load(args.out, dtype=dtype, device=args.device)[0] if args.eval_data else None
    elif rank != 0:
        return None
    else:
        saved = save_merged(model, tok, args, s, model_path)
    label = f"{args.method} r={s.rank}" if hasattr(s, "rank") else args.method
    after = run_eval(model, tok, args, f"{label}, after {info['steps']} steps")
    forget = {"texts": len(texts), **forgetting.drift(model, tok, texts, reference)} if measure_forgetting else None
    metrics = {"method": args.method, "settings": asdict(s), **info, "accuracy": after, "accuracy_before": before,
               "protocol": args.protocol, "num_beams": eval_math.decoding(args.protocol, args.num_beams),
               "forgetting": forget, "saved": saved}
    if hasattr(s, "rank"):
        metrics["rank"] = s.rank
    write_atomic(Path(args.out, "metrics.json"), json.dumps(metrics, indent=2).encode())
    if before:
        print_accuracy(before, after, label)
    if forget:
        forgetting.print_forgetting(forget, label)
    print(f"\nsaved to {args.out} (merged model, tokenizer, checkpoint, log.jsonl, metrics.json)")
    return metrics


def cli(argv=None) -> int:
    """The command line: bad input and failed writes are one line on stderr and exit status 2."""
    try:
        main(argv)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, FloatingPointError, ImportError, ConnectionError) as e:
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)  # one line, always
        return 2
    except (torch.OutOfMemoryError, MemoryError) as e:  # (the device's is a RuntimeError)
        where = "the device" if isinstance(e, torch.OutOfMemoryError) else "this machine"
        what = (str(e).splitlines() or [type(e).__name__])[0][:200]
        print(f"error: out of memory on {where} ({what}); use a smaller --batch-size (with --grad-accum for the same "
              "step), --seq-len or --eval-batch-size, or --grad-checkpoint", file=sys.stderr)
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
