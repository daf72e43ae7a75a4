"""
Speed and memory, side by side, in one run (ratios, not timed tests).

    python -m experiments.bench generate     # batched generate vs transformers' generate, same tiny model, same tokens
    python -m experiments.bench train        # forward+backward tokens/s of the tiny preset
    python -m experiments.bench methods      # step time and peak memory of every method on one ~25M model
    python -m experiments.bench methods --model smollm2-135m [--grad-checkpoint]   # the same on a real 135M model
    python -m experiments.bench eval --batch 32 --limit 64 --new-tokens 320   # evaluation on SmolLM2 vs transformers' generate
    python -m experiments.bench loss                    # the training loss from full logits vs target_loss, SmolLM2
    python -m experiments.bench gpu --steps 10          # on a CUDA GPU: every method on Llama-3.2-1B shapes (a few minutes)
    python -m experiments.bench fsdp --model smollm2-135m   # memory per process: 2-process data parallel vs --fsdp

`methods` runs each method in its own process (peak RSS is per process) on the same model, the
same batches and a comparable budget, and prints ratios to LoRA and to full fine-tuning.
transformers is needed only by `generate` (it is a test dependency, not a runtime one).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from distributed import free_port, resident_mb
from eval_math import Parser
from experiments import check_counts, check_model, check_number, check_threads, command_line, refuse
from generate import generate
from model import PRESETS, ModelConfig, Transformer
from weights import load, save_pretrained


def _timed(fn, repeat=3):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


LONGEST_PROMPT = 120  # generate's prompts: 40 to 120 tokens


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
               for n in torch.randint(40, LONGEST_PROMPT, (args.batch,), generator=g)]
    new = args.new_tokens
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, d)
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
PEERS = ("peft-lora", "hf-full")  # transformers + peft LoRA, transformers full fine-tuning: what users would pick


def sft_batches(n, batch, seq, vocab, seed=1):
    """n GSM8K-style supervised batches (x, y) of random tokens: rows of 75-100% of `seq` tokens,
    right-padded, whose first 35-45% (the Alpaca header + question) and padding have no target
    (-100) — as train.py builds them with the prompt masked."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, vocab, (batch, seq), generator=g)
        y = torch.roll(x, -1, 1)
        for row in range(batch):
            length = int(seq * (0.75 + 0.25 * float(torch.rand((), generator=g))))
            prompt = int(length * (0.35 + 0.10 * float(torch.rand((), generator=g))))
            x[row, length:] = 0
            y[row, :prompt] = -100
            y[row, length - 1:] = -100
        out.append((x, y))
    return out


def _peer(args):
    """(model, optimizer, step's loss function) for a transformers (+ peft) peer on the same weights:
    LoRA with peft's LoraConfig at the same rank and targets, or full fine-tuning; torch's AdamW as
    the Hugging Face Trainer would. The loss is transformers' own (full logits), on the same
    already-shifted targets (shift_labels)."""
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    if args.method == "peft-lora":
        from peft import LoraConfig, get_peft_model
        hf = get_peft_model(hf, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"]))
    params = [p for p in hf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    return hf, opt, lambda x, y: hf(input_ids=x, labels=y, shift_labels=y).loss


def bench_one(args):
    """One method in this process: steps of forward+backward+clip+step on GSM8K-style batches
    (sft_batches). Memory is the process's peak RSS during training minus its RSS once the weights
    are loaded and touched (the peak is reset after loading, so reading the weights does not count).
    The step's floating-point work is counted once, after timing (FlopCounterMode)."""
    import contextlib
    import gc
    import io
    import itertools
    from torch.utils.flop_counter import FlopCounterMode
    import methods
    torch.manual_seed(0)
    if args.method in PEERS:
        model, opt, loss_fn = _peer(args)
        autocast = contextlib.nullcontext()
    else:
        bf16 = args.dtype == "bfloat16" and args.method != "full"  # frozen base weights in bf16, as train.py does
        model = load(args.model_dir, dtype=torch.bfloat16 if bf16 else None)[0]
    model.train()
    sum(float(p.sum()) for p in model.parameters())  # touch every page of the weights
    gc.collect()
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (Linux >= 4.0)
    except OSError:
        pass
    rss_model = resident_mb()
    n_params = sum(p.numel() for p in model.parameters())
    vocab = min(model.config.vocab_size, 32000)
    data = sft_batches(4, args.batch, args.seq, vocab)
    t_prepare = 0.0
    if args.method not in PEERS:
        model.grad_checkpoint = args.grad_checkpoint
        name, *mode = args.method.split("-")
        module, settings = methods.METHODS[name]
        knobs = {"rank": args.rank, "mode": mode[0] if mode else None, "init_samples": 16}
        s = settings(lr=1e-4, **{k: v for k, v in knobs.items() if v is not None and k in settings.__dataclass_fields__})
        run = {"lift": dict(total_steps=1000), "lorasb": dict(lr_first=1e-4, n_train=1000)}.get(name, {})
        with contextlib.redirect_stdout(io.StringIO()):
            t = time.perf_counter()
            opt = module.prepare(model, s, itertools.cycle(data), seed=0, **run)
            t_prepare = time.perf_counter() - t
        loss_fn = lambda x, y: model(x, y)[1]  # noqa: E731
        bf16 = args.dtype == "bfloat16"
        autocast = torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext()
    elif args.grad_checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for gr in opt.param_groups for p in gr["params"]]

    def step(x, y):
        with autocast:
            loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)
    times, losses = [], []
    for i, (x, y) in enumerate(itertools.islice(itertools.cycle(data), args.warmup + args.steps)):
        t = time.perf_counter()
        losses.append(step(x, y))
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    peak = resident_mb("VmHWM")
    with FlopCounterMode(display=False) as counter:
        step(*data[0])
    rec = {"method": args.method, "trainable": sum(p.numel() for p in params), "step_s": times,
           "prepare_s": t_prepare, "peak_mb": peak, "model_mb": rss_model, "params": n_params,
           "flops": counter.get_total_flops(), "first_loss": losses[0]}
    if hasattr(opt, "refresh"):  # LIFT: one mask refresh of every target matrix
        t = time.perf_counter()
        opt.refresh()
        rec["refresh_s"] = time.perf_counter() - t
    print(json.dumps(rec))


def gemm_rate(shapes, repeat=5) -> float:
    """This CPU's fp32 matrix-multiply rate (FLOP/s) at the given (m, k, n) shapes, in this process's
    threads: total flops over the summed median times (the physical limit a training step meets)."""
    flops, secs = 0.0, 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        ts = []
        for _ in range(repeat):
            t = time.perf_counter()
            a @ b
            ts.append(time.perf_counter() - t)
        flops, secs = flops + 2 * m * k * n, secs + sorted(ts)[repeat // 2]
    return flops / secs


def _median(v):
    v = sorted(v)
    return v[len(v) // 2]


def bench_methods(args):
    """Every method (and the peers, with --peers) in its own process, in rounds: A B C .. A B C ..
    (--rounds), so a slow spell of the machine hits every method alike; step time is the median of
    all its steps, memory the largest peak. One model folder serves every process (same weights)."""
    import tempfile
    methods = args.methods.split(",") + (list(PEERS) if args.peers else [])
    with tempfile.TemporaryDirectory() as d:
        if args.model:  # the same weights for ours and transformers': a Hugging Face folder, written once
            model, tok = load(args.model)
        else:
            model, tok = Transformer(ModelConfig(**BENCH_CONFIG)).init_weights(0), None
        save_pretrained(model, d)
        cfg = model.config
        if tok is not None:
            tok.save(d)
        else:
            from tokenizer import Tokenizer
            Tokenizer.bytes().save(d)
        del model
        rows = {}
        for r in range(args.rounds):
            for m in methods:
                cmd = [sys.executable, "-m", "experiments.bench", "_one", "--method", m, "--rank", str(args.rank), "--batch",
                       str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--threads", str(args.threads), "--model-dir", d, "--dtype", args.dtype] \
                    + (["--grad-checkpoint"] if args.grad_checkpoint else [])
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
                if out.returncode:
                    raise SystemExit(f"bench {m} failed:\n{out.stderr[-3000:]}")
                rec = json.loads(out.stdout.strip().splitlines()[-1])
                if m in rows:
                    rows[m]["step_s"] += rec["step_s"]
                    rows[m]["peak_mb"] = max(rows[m]["peak_mb"], rec["peak_mb"])
                else:
                    rows[m] = rec
                print(f"  round {r + 1}/{args.rounds} {m}: {1e3 * _median(rec['step_s']):.0f} ms/step", file=sys.stderr,
                      flush=True)
    for r in rows.values():
        r["step"] = _median(r["step_s"])
    T = args.batch * args.seq
    rate = gemm_rate([(T, cfg.dim, cfg.hidden_dim), (T, cfg.hidden_dim, cfg.dim), (T, cfg.dim, cfg.dim)])
    lora, full = rows.get("lora"), rows.get("full")
    model_name = args.model or f"a ~25M LLaMA ({BENCH_CONFIG})"
    print(f"methods on {model_name} ({rows[methods[0]]['params']:,} parameters), rank {args.rank}, batch {args.batch} x "
          f"{args.seq} tokens (GSM8K-style: 35-45% prompt, 0-25% padding, neither trained), activation checkpointing "
          f"{'on' if args.grad_checkpoint else 'off'}, {args.dtype}, {args.threads} thread(s); step = median of "
          f"{args.rounds} rounds x {args.steps} steps, one process per method and round, interleaved; "
          f"fp32 GEMM rate here {rate / 1e9:.0f} GFLOP/s; load average {os.getloadavg()[0]:.2f}")
    rel = lambda a, b: f"{a / b:>7.2f}" if b else f"{'':>7}"  # noqa: E731
    print(f"{'method':<15}{'trainable':>12}{'step ms':>9}{'tokens/s':>10}{'GEMM %':>8}{'/LoRA':>7}{'/peft':>7}"
          f"{'peak MB':>9}{'above model':>12}{'/LoRA':>7}{'/full':>7}")
    peft_ = rows.get("peft-lora")
    for m in methods:
        r = rows[m]
        above = r["peak_mb"] - r["model_mb"]
        print(f"{m:<15}{r['trainable']:>12,}{1e3 * r['step']:>9.0f}{T / r['step']:>10,.0f}"
              f"{100 * r['flops'] / r['step'] / rate:>8.0f}{rel(r['step'], lora['step'] if lora else 0)}"
              f"{rel(r['step'], peft_['step'] if peft_ else 0)}{r['peak_mb']:>9.0f}{above:>12.0f}"
              f"{rel(above, lora['peak_mb'] - lora['model_mb'] if lora else 0)}"
              f"{rel(above, full['peak_mb'] - full['model_mb'] if full else 0)}")
    goals = []
    if lora and peft_:
        goals.append(("LoRA step / transformers+peft LoRA step", lora["step"] / peft_["step"],
                      0.5 if args.dtype == "bfloat16" else 0.80))
    if lora and "lift" in rows:
        goals.append(("LIFT step / LoRA step", rows["lift"]["step"] / lora["step"], 1.15))
    if full and "lift" in rows:
        above = lambda r: r["peak_mb"] - r["model_mb"]  # noqa: E731
        goals.append(("LIFT memory above the model / full FT's", above(rows["lift"]) / above(full), 0.40))
    for what, value, goal in goals:
        print(f"goal: {what} = {value:.2f} (goal <= {goal:.2f}): {'met' if value <= goal else 'NOT met'}")
    if "lift" in rows and "refresh_s" in rows["lift"]:
        r = rows["lift"]
        share = r["refresh_s"] / (r["refresh_s"] + args.interval * r["step"])
        print(f"LIFT mask refresh: {r['refresh_s']:.2f} s for all matrices = {100 * share:.1f}% of training time "
              f"at one refresh every {args.interval} steps")
    if "lorasb" in rows:
        print(f"LoRA-SB initialisation (gradient estimate + SVDs): {rows['lorasb']['prepare_s']:.2f} s "
              f"= {rows['lorasb']['prepare_s'] / rows['lorasb']['step']:.1f} training steps")
    return rows


def gsm_style_problems(n, seed=0):
    """n GSM8K-style word problems (two or three steps each): prompts that make an instruction-tuned
    model reason for ~100-300 tokens, as GSM8K does (which is not on this machine's disk)."""
    import random
    rng = random.Random(seed)
    names = ["Maria", "James", "Aisha", "Tom", "Lena", "Carlos", "Mei", "Omar"]
    templates = [
        "{n} buys {a} boxes of pencils. Each box holds {b} pencils. {n} gives away {c} pencils and shares the rest "
        "equally among {d} friends. How many pencils does each friend get?",
        "A bakery sells muffins for ${a} each and cookies for ${d} each. On Monday it sold {b} muffins and {c} cookies. "
        "How much money did the bakery make on Monday?",
        "A train travels at {a} miles per hour for {d} hours, then at {b} miles per hour for {c} hours. How many miles "
        "does it travel in total?",
        "{n} saves ${a} every week for {b} weeks, then spends ${c} on a bike and half of what is left on books. How "
        "much money does {n} have now?",
        "A garden has {a} rows of tomato plants with {b} plants in each row. Each plant gives {d} tomatoes, and {c} "
        "tomatoes go bad. How many good tomatoes does the garden give?",
        "A school has {a} classes with {b} students each. {c} students are absent and the rest go on a trip in buses "
        "that hold {d} students each. How many buses are needed?",
    ]
    return [dict(question=rng.choice(templates).format(n=rng.choice(names), a=rng.randint(3, 30), b=rng.randint(4, 25),
                                                        c=rng.randint(2, 20), d=rng.randint(2, 9)),
                 answer="0", dataset="gsm-style", template="alpaca") for _ in range(n)]


def read_bandwidth(mb=512, repeat=5) -> float:
    """This machine's memory read rate (bytes/s, this process's threads): sum a tensor larger than the
    caches. Decoding reads every weight once per step, so this bounds its steps per second."""
    x = torch.ones(mb * 2**18)
    x.sum()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t)
    return x.numel() * 4 / _median(ts)


def bench_eval(args):
    """eval_math's decoding (eval_math.complete: greedy, stop strings checked inside generate) on
    SmolLM2-135M and GSM8K-style Alpaca prompts, batch by batch, against a loop over transformers'
    generate (stop_strings, the same batches), interleaved; then the decode rate beside this machine's
    limits (memory bandwidth, GEMM rate) and how much of the time the prefill takes."""
    import os.path
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import eval_math as E
    from weights import gguf_path
    model, tok = load(args.model or "smollm2-135m")
    model.eval()
    folder, name = os.path.split(gguf_path("smollm2-135m") if not args.model else args.model)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    prompts = [tok.encode(E.format_prompt(p), bos=True) for p in gsm_style_problems(args.limit)]
    prompts.sort(key=len, reverse=True)  # as eval_math.evaluate batches them
    batches = [prompts[i:i + args.batch] for i in range(0, len(prompts), args.batch)]
    new = args.new_tokens

    def hf_loop():
        texts = []
        for b in batches:
            P = max(map(len, b))
            ids = torch.tensor([[tok.pad_id] * (P - len(p)) + p for p in b])
            mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in b])
            out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, pad_token_id=tok.pad_id,
                              eos_token_id=list(tok.stop_ids), stop_strings=list(E.STOP_STRINGS), tokenizer=hf_tok)
            for row in out[:, P:].tolist():
                cut = next((j for j, x in enumerate(row) if x in tok.stop_ids), len(row))
                texts.append(E._cut_at_stop(tok.decode(row[:cut]))[0])
        return texts

    runs = {"nanopeft": lambda: [t for b in batches for t in E.complete(model, tok, b, new)], "transformers": hf_loop}
    times, texts = {k: [] for k in runs}, {}
    with torch.no_grad():
        for _ in range(args.repeat):  # interleaved: A B A B ..., the median of each
            for k, fn in runs.items():
                t = time.perf_counter()
                texts[k] = fn()
                times[k].append(time.perf_counter() - t)
        # the decode rate alone: one batch's generate of 1 token (the prefill) and of 1 + n (n decode steps)
        b, n = batches[0], 64
        t1 = _median([_time(lambda: generate(model, b, 1)) for _ in range(3)])
        tn = _median([_time(lambda: generate(model, b, 1 + n)) for _ in range(3)])
    med = {k: _median(v) for k, v in times.items()}
    n_tok = [len(tok.encode(t)) for t in texts["nanopeft"]]
    print(f"greedy evaluation decoding, {args.model or 'smollm2-135m'}, {len(prompts)} GSM8K-style Alpaca prompts "
          f"({min(map(len, prompts))}-{max(map(len, prompts))} tokens), batch {args.batch}, up to {new} new tokens "
          f"(answers: {min(n_tok)}-{max(n_tok)} tokens, mean {sum(n_tok) / len(n_tok):.0f}), "
          f"{torch.get_num_threads()} thread(s), median of {args.repeat} interleaved runs, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'':<14}{'seconds':>9}{'problems/s':>12}{'speed-up':>10}{'same texts':>12}")
    for k in runs:
        print(f"{k:<14}{med[k]:>9.2f}{len(prompts) / med[k]:>12.2f}{med['transformers'] / med[k]:>10.2f}"
              f"{str(texts[k] == texts['nanopeft']):>12}")
    # the physical limits of a decode step: read every weight once (bandwidth), or do its flops (GEMM rate)
    cfg, B = model.config, len(b)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    flops_per_token = 2 * sum(p.numel() for n_, p in model.named_parameters() if "norm" not in n_)
    bw = read_bandwidth()
    rate = gemm_rate([(512, cfg.dim, cfg.hidden_dim), (512, cfg.hidden_dim, cfg.dim), (512, cfg.dim, cfg.dim)])
    lim_bw, lim_gemm = B * bw / weight_bytes, rate / flops_per_token
    decode = B * n / (tn - t1)
    print(f"decode, batch {B}, {n} steps after the prefill: {decode:,.0f} tokens/s = "
          f"{100 * decode / min(lim_bw, lim_gemm):.0f}% of the lower limit; limits here: memory read "
          f"{bw / 1e9:.1f} GB/s over {weight_bytes / 1e6:.0f} MB of weights per step = {lim_bw:,.0f} tokens/s, "
          f"fp32 GEMM {rate / 1e9:.0f} GFLOP/s over {flops_per_token / 1e6:.0f} MFLOP per token = {lim_gemm:,.0f} "
          f"tokens/s")
    header = len(os.path.commonprefix(prompts))
    n_batches, mean_len = len(batches), sum(map(len, prompts)) / len(prompts)
    print(f"prefill: {t1:.2f} s for the first batch ({B} x {len(b[0])} tokens), ~{100 * t1 * n_batches / med['nanopeft']:.0f}% "
          f"of the evaluation time; the shared Alpaca header is {header} of {mean_len:.0f} prompt tokens "
          f"({100 * header / mean_len:.0f}%), so prefilling it once would save at most "
          f"~{t1 * n_batches / med['nanopeft'] * header / mean_len * 100:.0f}% of it")


MICRO_CONFIG = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=16)  # bench.py gpu --micro
PEAK_BF16_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "A10G": 70, "4090": 165}  # dense, per GPU


def bench_gpu(args):
    """The GPU check, one prepared run of a few minutes: a random model with Llama-3.2-1B's shapes,
    weights and autocast as train.py --dtype auto sets them (bf16 base weights; full fine-tuning fp32
    weights under bf16 autocast), every method for --steps steps at batch x seq GSM8K-style tokens,
    without and with activation checkpointing. Per method: step time, tokens/s, MFU (the step's
    counted flops over the GPU's dense bf16 peak), torch.cuda.max_memory_allocated beside
    memory.plan's prediction; then LIFT / LoRA step time (goal <= 1.15) and memory (<= 1.10).
    --micro runs the same code on the CPU with a micro model (the tests do), without the memory and
    MFU columns."""
    import contextlib
    import gc
    import io
    import itertools
    from torch.utils.flop_counter import FlopCounterMode
    from experiments import memory
    import methods
    from model import bf16_fast
    cuda = torch.cuda.is_available() and not args.micro
    device = "cuda" if cuda else "cpu"
    cfg = ModelConfig(**MICRO_CONFIG) if args.micro else ModelConfig.from_preset("llama-3.2-1b")
    B, T = args.batch, args.seq
    bf16 = bf16_fast(device)
    peak = None
    if cuda:
        gpu = torch.cuda.get_device_name()
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    data = [(x.to(device), y.to(device)) for x, y in sft_batches(3, B, T, min(cfg.vocab_size, 32000))]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    for ckpt in (False, True):
        for m in args.methods.split(","):
            name, *mode = m.split("-")
            module, cls = methods.METHODS[name]
            knobs = {"rank": args.rank, "mode": mode[0] if mode else None, "init_samples": 2 * B}
            s = cls(lr=1e-5, **{k: v for k, v in knobs.items() if v is not None and k in cls.__dataclass_fields__})
            wdtype = torch.bfloat16 if bf16 and name != "full" else torch.float32
            torch.manual_seed(0)
            with torch.device(device):
                model = Transformer(cfg)
                for p in model.parameters():  # random weights, made on the device (a CPU init of 1B is slow)
                    p.data.normal_(0, 0.02)
            model.to(wdtype).train()
            model.grad_checkpoint = ckpt
            run = {"lift": dict(total_steps=10**6), "lorasb": dict(lr_first=1e-5, n_train=10**6)}.get(name, {})
            with contextlib.redirect_stdout(io.StringIO()):
                opt = module.prepare(model, s, itertools.cycle(data), seed=0, **run)
            params = [p for g in opt.param_groups for p in g["params"]]
            autocast = torch.autocast(device, torch.bfloat16) if bf16 else contextlib.nullcontext()

            def step(x, y):
                with autocast:
                    loss = model(x, y)[1]
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()  # the training step's peak, not prepare's
            times = []
            for i, (x, y) in enumerate(itertools.islice(itertools.cycle(data), 2 + args.steps)):
                sync()
                t = time.perf_counter()
                step(x, y)
                sync()
                if i >= 2:
                    times.append(time.perf_counter() - t)
            mem = torch.cuda.max_memory_allocated() if cuda else None
            with FlopCounterMode(display=False) as counter:
                step(*data[0])
            plan = max((memory.plan(cfg, name, s, B, T, weight_dtype=wdtype, grad_checkpoint=ckpt,
                                    compute_dtype=torch.bfloat16 if bf16 else wdtype, **memory.shares(y.cpu()))
                        for _, y in data), key=lambda p: p["total"])  # the batches' prompts and padding
            rows.append(dict(method=m, ckpt=ckpt, trainable=sum(p.numel() for p in params), step=_median(times),
                             flops=counter.get_total_flops(), mem=mem, plan=plan["total"]))
            print(f"  {m} (checkpointing {'on' if ckpt else 'off'}): {1e3 * rows[-1]['step']:.0f} ms/step",
                  file=sys.stderr, flush=True)
            model = opt = params = None  # free them before the next method is built
            gc.collect()
    where = (f"{torch.cuda.get_device_name()}, bf16 peak {peak or '?'} TFLOP/s" if cuda
             else f"CPU, {torch.get_num_threads()} thread(s) (--micro: the code path only)")
    print(f"bench.py gpu: {'micro model' if args.micro else 'random Llama-3.2-1B shapes'} "
          f"({memory.n_params(cfg):,} parameters), batch {B} x {T} tokens, {'bf16' if bf16 else 'fp32'}, rank "
          f"{args.rank}, median of {args.steps} steps; {where}")
    print(f"{'method':<15}{'ckpt':>5}{'trainable':>14}{'step ms':>9}{'tokens/s':>10}{'MFU %':>7}{'max alloc GB':>14}"
          f"{'plan GB':>9}{'alloc/plan':>11}")
    for r in rows:
        mfu = f"{100 * r['flops'] / r['step'] / (peak * 1e12):>7.1f}" if peak else f"{'-':>7}"
        mem = (f"{r['mem'] / 2**30:>14.2f}{r['plan'] / 2**30:>9.2f}{r['mem'] / r['plan']:>11.2f}" if r["mem"]
               else f"{'-':>14}{r['plan'] / 2**30:>9.3f}{'-':>11}")
        print(f"{r['method']:<15}{'on' if r['ckpt'] else 'off':>5}{r['trainable']:>14,}{1e3 * r['step']:>9.0f}"
              f"{B * T / r['step']:>10,.0f}{mfu}{mem}")
    for ckpt in (False, True):
        by = {r["method"]: r for r in rows if r["ckpt"] == ckpt}
        if "lift" in by and "lora" in by:
            t = by["lift"]["step"] / by["lora"]["step"]
            line = f"check (checkpointing {'on' if ckpt else 'off'}): LIFT / LoRA step time {t:.2f} (goal <= 1.15)"
            if by["lift"]["mem"]:
                line += f", memory {by['lift']['mem'] / by['lora']['mem']:.2f} (goal <= 1.10)"
            print(line)
    return rows


def _time(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


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
        a, b = (_median(times[(n, yn)]) for n in fns)
        print(f"{yn:<14}{a:>15.2f}{b:>15.2f}{b / a:>8.2f}")


# -----------------------------------------------------------------------------
# command line

def bench_fsdp(args):
    """Memory per process of `torchrun --nproc_per_node=2 train.py` without and with --fsdp, the same
    model, method, data and steps: the tensors each process holds (exact: 1/2 under --fsdp) and its
    resident memory, under glibc's default allocator and with MALLOC_MMAP_THRESHOLD_=65536 (every
    large tensor its own mapping, handed back to the system when freed)."""
    import tempfile
    root = Path(__file__).resolve().parent.parent
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.methods.split(","):
            for malloc in ("default", "65536"):
                for fsdp in (False, True):
                    out = Path(tmp) / f"{m}-{malloc}-{fsdp}"
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
                           "train.py", "--method", m, "--model", args.model, "--data", "synth-target", "--train-limit",
                           "64", "--eval-data", "none", "--forget-prompts", "0", "--max-steps", str(args.steps),
                           "--batch-size", str(args.batch), "--seq-len", str(args.seq), "--threads", "1", "--log-every",
                           str(args.steps), "--out", str(out), *(["--rank", str(args.rank)] if m != "full" and m != "hyper"
                                                                  else []), *(["--fsdp"] if fsdp else [])]
                    env = {**os.environ, "OMP_NUM_THREADS": "1",
                           **({"MALLOC_MMAP_THRESHOLD_": malloc} if malloc != "default" else {})}
                    done = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
                    if done.returncode != 0:
                        raise RuntimeError(f"bench fsdp: {' '.join(cmd[3:])} failed: {done.stderr.strip()[-500:]}")
                    memory = json.loads((out / "metrics.json").read_text())["memory_mb"]
                    rows.append((m, malloc, fsdp, [sum(p[k] for p in memory) / len(memory)
                                                   for k in ("held", "resident", "resident_peak")]))
                    print(f"  {m} malloc {malloc} {'--fsdp' if fsdp else 'data parallel'}: {rows[-1][3]}", flush=True)
    print(f"\nmemory per process (MB, mean of 2), torchrun --nproc_per_node=2 train.py --model {args.model}, "
          f"{args.steps} steps of batch {args.batch} x {args.seq} tokens; load {os.getloadavg()[0]:.1f}")
    print(f"{'method':<8}{'malloc':<10}{'':<15}{'tensors held':>13}{'resident':>10}{'peak':>8}"
          f"{'held ratio':>12}{'resident ratio':>16}")
    for m, malloc, fsdp, (held, rss, peak) in rows:
        dp = next(r[3] for r in rows if r[:3] == (m, malloc, False))
        ratios = f"{held / dp[0]:>12.2f}{rss / dp[1]:>16.2f}" if fsdp else ""
        print(f"{m:<8}{malloc:<10}{'--fsdp' if fsdp else 'data parallel':<15}{held:>13,.0f}{rss:>10,.0f}{peak:>8,.0f}{ratios}")
    return rows


WHAT = ("generate", "train", "methods", "eval", "loss", "gpu", "fsdp", "_one")  # _one: one method, for `methods`
MAX_TOKENS = 2**16  # positions a batch holds (batch x seq; generate: x prompt + new tokens; eval: x new tokens)


def build_parser():
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=WHAT)
    ap.add_argument("--batch", type=int, default=None, help="default 32 (generate, train), 4 (methods)")
    ap.add_argument("--seq", type=int, default=None, help="default 128; gpu: 512 (--micro: 32)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--methods", default=None, help="default full,lora,lift,rocoft-row,rocoft-column,hyper,loraxs,lorasb "
                                                    "(fsdp: full,lora)")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--interval", type=int, default=200, help="LIFT refresh interval for the amortised cost")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=None, help="methods: a model to load (e.g. smollm2-135m); default a random ~25M LLaMA")
    ap.add_argument("--grad-checkpoint", action="store_true", help="methods: activation checkpointing per block")
    ap.add_argument("--peers", action="store_true", help="methods: also transformers+peft LoRA and transformers full FT "
                    "(needs `pip install peft`)")
    ap.add_argument("--rounds", type=int, default=3, help="methods: interleaved rounds (one process per method each)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="methods: our methods' precision (bfloat16 = bf16 autocast; fast only on CPUs with bf16)")
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--micro", action="store_true", help="gpu: a micro model on the CPU (the code path, for tests)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="gpu: the GPU's dense bf16 peak, if not in the table")
    ap.add_argument("--limit", type=int, default=16, help="eval: prompts")
    ap.add_argument("--repeat", type=int, default=3, help="eval: interleaved repetitions (the median is shown)")
    return ap


def method_names() -> list[str]:
    """What --methods lists: each method of methods.METHODS, and method-mode for one with modes (rocoft-row)."""
    import methods
    names = []
    for name, (_, cls) in methods.METHODS.items():
        mode = cls.__dataclass_fields__.get("mode")
        names += [name] + [f"{name}-{m}" for m in (mode.metadata.get("choices", ()) if mode else ())]
    return names


def needs(what: str, *packages: str):
    """ImportError (one line) unless each package is installed; looked up, not imported."""
    import importlib.util
    for package in packages:
        if importlib.util.find_spec(package) is None:
            raise ImportError(f"bench {what} needs {package} (a test dependency, not a runtime one): pip install {package}")


def check_args(args):
    """Every flag, before anything is built, loaded or imported: one line naming the flag, its value and
    what is allowed. Fills in the subcommand's --batch and --seq defaults."""
    check_counts(args, batch=(1, 4096), new_tokens=(1, 4096), rank=(1, 65536), steps=(1, 10**5), warmup=(0, 10**5),
                 interval=(1, 10**6), rounds=(1, 100), limit=(1, 10**4), repeat=(1, 100))
    check_threads(args)
    if args.seq is not None and not 1 <= args.seq <= MAX_TOKENS:
        refuse("seq", args.seq, f"1 to {MAX_TOKENS:,} tokens (a batch holds at most {MAX_TOKENS:,})")
    if args.peak_tflops is not None:
        check_number("peak-tflops", args.peak_tflops, allowed="the GPU's dense bf16 peak in TFLOP/s, a finite number > 0")
    what = args.what
    if args.batch is None:
        args.batch = 4 if what in ("methods", "_one", "loss") else 8 if what in ("eval", "gpu") else 32
    if args.seq is None:
        args.seq = 512 if what == "gpu" and not args.micro else 32 if args.micro else 128
    known = method_names()
    if args.methods is None:
        args.methods = "full,lora" if what == "fsdp" else "full,lora,lift,rocoft-row,rocoft-column,hyper,loraxs,lorasb"
    names = [m.strip() for m in args.methods.split(",")]
    for m in names:
        if m not in known:
            refuse("methods", args.methods, f"comma-separated names of {', '.join(known)}" + (
                f" ({m!r} is not one; --peers adds {', '.join(PEERS)})" if m else " (an empty name)"))
    if len(set(names)) < len(names):
        refuse("methods", args.methods, "each method once")
    args.methods = ",".join(names)
    if args.method not in known + list(PEERS):
        refuse("method", args.method, f"one of {', '.join(known + list(PEERS))}")
    positions = {"generate": (LONGEST_PROMPT + args.new_tokens, f"(a prompt of up to {LONGEST_PROMPT} + --new-tokens "
                              f"{args.new_tokens})"),
                 "eval": (args.new_tokens, f"--new-tokens {args.new_tokens}")}.get(what, (args.seq, f"--seq {args.seq}"))
    if args.batch * positions[0] > MAX_TOKENS:
        raise ValueError(f"--batch {args.batch} x {positions[1]} = {args.batch * positions[0]:,} tokens is not "
                         f"allowed: a batch holds at most {MAX_TOKENS:,}")
    if what == "generate" and LONGEST_PROMPT + args.new_tokens > PRESETS["tiny"]["max_seq_len"]:
        refuse("new-tokens", args.new_tokens, f"at most {PRESETS['tiny']['max_seq_len'] - LONGEST_PROMPT}: the tiny "
               f"preset has {PRESETS['tiny']['max_seq_len']} positions and the prompts up to {LONGEST_PROMPT}")
    if what == "train" and args.seq > PRESETS["tiny"]["max_seq_len"]:
        refuse("seq", args.seq, f"at most the tiny preset's context, {PRESETS['tiny']['max_seq_len']} tokens")
    if what in ("methods", "gpu", "_one") and args.seq < 3:
        refuse("seq", args.seq, "at least 3 tokens (in fewer, a GSM8K-style row of sft_batches has no target)")
    if what == "gpu" and not args.micro and not torch.cuda.is_available():
        raise ValueError("bench gpu needs a CUDA GPU, and there is none here; --micro runs its code path on the CPU")
    if args.model is not None:
        if what == "eval" and args.model != "smollm2-135m" and not (args.model.endswith(".gguf") and
                                                                    os.path.isfile(args.model)):
            refuse("model", args.model, "smollm2-135m or a .gguf file (eval compares against transformers' GGUF "
                   "loading of the same file)")
        check_model("--model", args.model)
    elif what in ("eval", "loss"):
        check_model("--model", "smollm2-135m")
    if what == "fsdp":
        args.model = args.model or "smollm2-135m"
        check_model("--model", args.model)
        import methods
        for m in args.methods.split(","):
            if m not in methods.METHODS:
                refuse("methods", args.methods, "comma-separated names of " + ", ".join(methods.METHODS))
    if what == "_one" and not (args.model_dir and os.path.isdir(args.model_dir)):
        raise ValueError(f"bench _one needs --model-dir, the model folder `bench methods` writes; got {args.model_dir}")
    if what in ("generate", "eval"):
        needs(what, "transformers")
    if what == "methods" and args.peers or what == "_one" and args.method in PEERS:
        needs("methods --peers", "transformers", "peft")


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    torch.set_num_threads(args.threads)
    return {"generate": bench_generate, "train": bench_train, "methods": bench_methods, "eval": bench_eval,
            "loss": bench_loss, "gpu": bench_gpu, "fsdp": bench_fsdp, "_one": bench_one}[args.what](args)


def cli(argv=None) -> int:
    return command_line(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
