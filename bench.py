"""
Speed and memory, side by side, in one run (ratios, not timed tests).

    python bench.py generate     # batched generate vs transformers' generate, same tiny model, same tokens
    python bench.py train        # forward+backward tokens/s of the tiny preset
    python bench.py methods      # step time and peak memory of every method on one ~25M model
    python bench.py methods --model smollm2-135m [--grad-checkpoint]   # the same on a real 135M model
    python bench.py eval --new-tokens 256   # evaluation decoding on SmolLM2 vs transformers' generate
    python bench.py loss                    # the training loss from full logits vs target_loss, SmolLM2

`methods` runs each method in its own process (peak RSS is per process) on the same model, the
same batches and a comparable budget, and prints ratios to LoRA and to full fine-tuning.
transformers is needed only by `generate` (it is a test dependency, not a runtime one).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from model import ModelConfig, Transformer, generate, load


def _timed(fn, repeat=3):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_generate(args):
    import tempfile
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).init_weights(0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)  # sharper than the init: no near-ties between greedy choices
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (int(n),), generator=g).tolist()
               for n in torch.randint(40, 120, (args.batch,), generator=g)]
    new = args.new_tokens
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = LlamaForCausalLM.from_pretrained(d).eval()
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    t_ours, ours = _timed(lambda: generate(model, prompts, new))
    t_hf, theirs = _timed(lambda: hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                                              min_new_tokens=new, pad_token_id=0, eos_token_id=None))
    same = ours == theirs[:, P:].tolist()
    n = args.batch * new
    print(f"batched greedy generate, tiny preset, {args.batch} prompts of 40-120 tokens, {new} new tokens each, "
          f"{torch.get_num_threads()} threads")
    print(f"{'':<14}{'seconds':>9}{'tokens/s':>11}")
    print(f"{'nanopeft':<14}{t_ours:>9.2f}{n / t_ours:>11,.0f}")
    print(f"{'transformers':<14}{t_hf:>9.2f}{n / t_hf:>11,.0f}")
    print(f"speed-up {t_hf / t_ours:.2f}x; identical tokens: {same}")


def bench_train(args):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).init_weights(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (args.batch, args.seq))

    def step():
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t, _ = _timed(step, repeat=5)
    print(f"tiny preset ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), batch {args.batch} x "
          f"{args.seq} tokens, {torch.get_num_threads()} threads: {t * 1e3:.0f} ms/step (fwd+bwd+AdamW), "
          f"{args.batch * args.seq / t:,.0f} tokens/s")


BENCH_CONFIG = dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=264, multiple_of=256)  # ~25M


def _rss_mb(field="VmRSS") -> float:
    """Resident memory of this process from /proc (Linux): VmRSS now, or VmHWM, its peak."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_one(args):
    """One method in this process: steps of forward+backward+clip+step on random tokens. Memory is
    the process's peak RSS during training minus its RSS once the weights are loaded and touched
    (the peak is reset after loading, so dequantizing a GGUF or reading safetensors does not count)."""
    import contextlib
    import gc
    import io
    import itertools
    import train
    torch.manual_seed(0)
    if args.model:
        model = load(args.model)[0]
    else:
        model = Transformer(ModelConfig(**BENCH_CONFIG)).init_weights(0)
    model.grad_checkpoint = args.grad_checkpoint
    model.train()
    sum(float(p.sum()) for p in model.parameters())  # touch every page of the weights
    gc.collect()
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (Linux >= 4.0)
    except OSError:
        pass
    rss_model = _rss_mb()
    vocab = min(model.config.vocab_size, 32000)
    g = torch.Generator().manual_seed(1)
    data = [(x, torch.roll(x, -1, 1)) for x in (torch.randint(0, vocab, (args.batch, args.seq), generator=g) for _ in range(4))]
    name, *mode = args.method.split("-")
    module, settings = train.METHODS[name]
    knobs = {"rank": args.rank, "mode": mode[0] if mode else None, "init_samples": 16}
    s = settings(lr=1e-4, **{k: v for k, v in knobs.items() if v is not None and k in settings.__dataclass_fields__})
    run = {"lift": dict(max_steps=1000), "lorasb": dict(lr_first=1e-4, n_train=1000)}.get(name, {})
    with contextlib.redirect_stdout(io.StringIO()):
        t = time.perf_counter()
        opt = module.prepare(model, s, itertools.cycle(data), seed=0, **run)
        t_prepare = time.perf_counter() - t
    params = [p for gr in opt.param_groups for p in gr["params"]]
    times = []
    for i, (x, y) in enumerate(itertools.islice(itertools.cycle(data), args.warmup + args.steps)):
        t = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    rec = {"method": args.method, "trainable": sum(p.numel() for p in params), "step_s": sorted(times)[len(times) // 2],
           "prepare_s": t_prepare, "peak_mb": _rss_mb("VmHWM"), "model_mb": rss_model,
           "params": sum(p.numel() for p in model.parameters())}
    if hasattr(opt, "refresh"):  # LIFT: one mask refresh of every target matrix
        t = time.perf_counter()
        opt.refresh()
        rec["refresh_s"] = time.perf_counter() - t
    print(json.dumps(rec))


def _complete_chunked(model, tok, prompts, max_new_tokens, chunk=64):
    """The previous eval_math.complete, the baseline of `eval`: decode `chunk` tokens, look for stop
    strings, run prompt + text again for the rows still going (a prefill per chunk)."""
    from eval_math import _cut_at_stop
    ids, texts = [[] for _ in prompts], [""] * len(prompts)
    active, done = list(range(len(prompts))), 0
    while active and done < max_new_tokens:
        step = min(chunk, max_new_tokens - done)
        outs = generate(model, [prompts[i] + ids[i] for i in active], step, tok.stop_ids, tok.pad_id)
        done += step
        running = []
        for i, out in zip(active, outs):
            ids[i] += out
            texts[i], stopped = _cut_at_stop(tok.decode(ids[i]))
            if not stopped and len(out) == step:
                running.append(i)
        active = running
    return texts


def bench_eval(args):
    """eval_math's decoding on SmolLM2-135M and Alpaca-template prompts, batch by batch, against the
    previous chunked decoding and a loop over transformers' generate (stop_strings, same batches)."""
    import os.path
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import eval_math as E
    from model import gguf_path
    model, tok = load(args.model or "smollm2-135m")
    model.eval()
    folder, name = os.path.split(gguf_path("smollm2-135m") if not args.model else args.model)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    problems = [dict(p, template="alpaca", solution=None) for p in E.load_problems("synth-target", limit=args.limit)]
    prompts = [tok.encode(E.format_prompt(p), bos=True) for p in problems]
    prompts.sort(key=len, reverse=True)
    batches = [prompts[i:i + args.batch] for i in range(0, len(prompts), args.batch)]
    new = args.new_tokens

    def hf_loop():
        texts = []
        for b in batches:
            P = max(map(len, b))
            ids = torch.tensor([[tok.pad_id] * (P - len(p)) + p for p in b])
            mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in b])
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, pad_token_id=tok.pad_id,
                                  eos_token_id=list(tok.stop_ids), stop_strings=list(E.STOP_STRINGS), tokenizer=hf_tok)
            for row in out[:, P:].tolist():
                cut = next((j for j, x in enumerate(row) if x in tok.stop_ids), len(row))
                texts.append(E._cut_at_stop(tok.decode(row[:cut]))[0])
        return texts

    runs = {"nanopeft": lambda: [t for b in batches for t in E.complete(model, tok, b, new)],
            "nanopeft, chunked (before)": lambda: [t for b in batches for t in _complete_chunked(model, tok, b, new)],
            "transformers": hf_loop}
    times = {k: [] for k in runs}
    texts = {}
    with torch.no_grad():
        for _ in range(args.repeat):  # interleaved: A B C A B C ..., the median of each
            for k, fn in runs.items():
                t = time.perf_counter()
                texts[k] = fn()
                times[k].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    n_tok = sum(len(tok.encode(t)) for t in texts["nanopeft"])
    print(f"greedy evaluation decoding, {args.model or 'smollm2-135m'}, {len(prompts)} Alpaca-template prompts "
          f"(synth-target questions), batch {args.batch}, up to {new} new tokens, {torch.get_num_threads()} threads, "
          f"median of {args.repeat} interleaved runs, load average {os.getloadavg()[0]:.2f}; "
          f"{n_tok:,} tokens of answers")
    print(f"{'':<28}{'seconds':>9}{'problems/s':>12}{'÷ transformers':>16}{'same texts':>12}")
    for k in runs:
        print(f"{k:<28}{med[k]:>9.2f}{len(prompts) / med[k]:>12.2f}{med[k] / med['transformers']:>16.2f}"
              f"{str(texts[k] == texts['nanopeft']):>12}")


def bench_loss(args):
    """The training step with the loss from full [B, T, vocab] logits (F.cross_entropy) against
    Transformer.target_loss (lm_head only at target positions, fused gradients), LoRA on SmolLM2
    (or --model), with every position a target and with the first 40% of each row a masked prompt."""
    import torch.nn.functional as F
    import lorasb
    model, _ = load(args.model or "smollm2-135m")
    opt = lorasb.prepare(model, lorasb.LoRA(rank=args.rank, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
                         iter(()), seed=0)
    model.train()
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    x = torch.randint(0, V, (args.batch, args.seq), generator=g)
    targets = {"all targets": torch.randint(0, V, (args.batch, args.seq), generator=g)}
    targets["40% prompt"] = targets["all targets"].clone()
    targets["40% prompt"][:, :int(0.4 * args.seq)] = -100

    def full_logits(y):
        logits = model(x)
        return F.cross_entropy(logits.float().view(-1, V), y.reshape(-1), ignore_index=-100)

    def step(loss_fn, y):
        t = time.perf_counter()
        loss = loss_fn(y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t, float(loss)
    fns = {"full logits": full_logits, "target_loss": lambda y: model(x, y)[1]}
    times = {}
    for rep in range(args.steps + 1):  # interleaved; the first round is warm-up
        for name, fn in fns.items():
            for yn, y in targets.items():
                t, _ = step(fn, y)
                if rep:
                    times.setdefault((name, yn), []).append(t)
    print(f"LoRA r{args.rank} training step on {args.model or 'smollm2-135m'}, batch {args.batch} x {args.seq}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} interleaved steps, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'targets':<14}{'full logits s':>15}{'target_loss s':>15}{'ratio':>8}")
    for yn in targets:
        a, b = (sorted(times[(n, yn)])[len(times[(n, yn)]) // 2] for n in fns)
        print(f"{yn:<14}{a:>15.2f}{b:>15.2f}{b / a:>8.2f}")


def bench_methods(args):
    rows = []
    for m in args.methods.split(","):
        cmd = [sys.executable, __file__, "_one", "--method", m, "--rank", str(args.rank), "--batch", str(args.batch),
               "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--threads", str(args.threads)] + (["--model", args.model] if args.model else []) \
            + (["--grad-checkpoint"] if args.grad_checkpoint else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  {m}: done", file=sys.stderr, flush=True)
    ref = {r["method"]: r for r in rows}
    lora, full = ref.get("lora"), ref.get("full")
    model = args.model or f"a ~25M LLaMA ({BENCH_CONFIG})"
    tokens = args.batch * args.seq
    print(f"methods on {model} ({rows[0]['params']:,} parameters), rank {args.rank}, batch {args.batch} x {args.seq} "
          f"tokens, activation checkpointing {'on' if args.grad_checkpoint else 'off'}, {args.threads} threads, "
          f"median of {args.steps} steps; one process per method; load average {os.getloadavg()[0]:.2f}")
    print(f"{'method':<15}{'trainable':>12}{'step ms':>9}{'tokens/s':>10}{'/LoRA':>7}{'peak MB':>9}{'above model':>12}"
          f"{'/LoRA':>7}{'/full':>7}")
    for r in rows:
        above = r["peak_mb"] - r["model_mb"]
        rel = lambda a, b: f"{a / b:>7.2f}" if b else f"{'':>7}"
        print(f"{r['method']:<15}{r['trainable']:>12,}{1e3 * r['step_s']:>9.0f}{tokens / r['step_s']:>10,.0f}"
              f"{rel(r['step_s'], lora['step_s'] if lora else 0)}{r['peak_mb']:>9.0f}{above:>12.0f}"
              f"{rel(above, lora['peak_mb'] - lora['model_mb'] if lora else 0)}"
              f"{rel(above, full['peak_mb'] - full['model_mb'] if full else 0)}")
    if "lift" in ref and "refresh_s" in ref["lift"]:
        r = ref["lift"]
        share = r["refresh_s"] / (r["refresh_s"] + args.interval * r["step_s"])
        print(f"LIFT mask refresh: {r['refresh_s']:.2f} s for all matrices = {100 * share:.1f}% of training time "
              f"at one refresh every {args.interval} steps")
    if "lorasb" in ref:
        print(f"LoRA-SB initialisation (gradient estimate + SVDs): {ref['lorasb']['prepare_s']:.2f} s "
              f"= {ref['lorasb']['prepare_s'] / ref['lorasb']['step_s']:.1f} training steps")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["generate", "train", "methods", "eval", "loss", "_one"])
    ap.add_argument("--batch", type=int, default=None, help="default 32 (generate, train), 4 (methods)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--methods", default="full,lora,lift,rocoft-row,rocoft-column,hyper,loraxs,lorasb")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--interval", type=int, default=200, help="LIFT refresh interval for the amortised cost")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=None, help="methods: a model to load (e.g. smollm2-135m); default a random ~25M LLaMA")
    ap.add_argument("--grad-checkpoint", action="store_true", help="methods: activation checkpointing per block")
    ap.add_argument("--limit", type=int, default=16, help="eval: prompts")
    ap.add_argument("--repeat", type=int, default=3, help="eval: interleaved repetitions (the median is shown)")
    args = ap.parse_args()
    args.batch = args.batch or (4 if args.what in ("methods", "_one", "loss") else 8 if args.what == "eval" else 32)
    torch.set_num_threads(args.threads)
    {"generate": bench_generate, "train": bench_train, "methods": bench_methods, "eval": bench_eval,
     "loss": bench_loss, "_one": bench_one}[args.what](args)
