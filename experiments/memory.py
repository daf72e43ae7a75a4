"""
Training memory from shapes: the bytes one training step of each method needs, computed from a
ModelConfig and the method's settings (no model is built), and the largest batch that fits a GPU.

    python -m experiments.memory                     # Llama-3.2-1B / 3.2-3B / Llama-3-8B on one 80 GB GPU, 512 tokens
    python -m experiments.memory --gpu-gb 40 --seq 1024
    python -m experiments.memory --gpus 1,2,4,8,16         # Llama-3-8B / 3-70B sharded (FSDP2) over N GPUs

The terms follow what the code here allocates (model.py, train.py and each method's file):
- weights in their dtype (train.py --dtype auto on a GPU: bf16, but fp32 for full fine-tuning, whose
  weights are what trains; fp32 on a CPU without native bf16);
- trainable tensors in fp32 ("master"), their AdamW moments (2 x fp32) and gradients; LIFT keeps k
  entries per matrix (values, moments, compact gradient, an int32 index, their W0 for resume), and its
  backward makes each dense weight gradient for a moment, one matrix at a time;
- activations: the tensors autograd saves for backward, counted per op (RMSNorm keeps its input in
  fp32, attention q, k, v and its output (flash attention: no T x T matrix), SwiGLU its gate,
  silu(gate) and up, each adapter what its own backward needs); with checkpointing each block's input,
  and one block recomputed in backward. Positions after a row's last target do not run (model.py packs
  them out; attention still runs on the B x T grid);
- the fused loss (model.LinearCrossEntropy): no [B, T, vocab] logits, one 512-row chunk of fp32 logits
  at a time, and dL/dh (for full fine-tuning also dL/dW of lm_head) kept from forward.
The peak is the static part plus the larger of "end of forward" (all activations, the loss running)
and "end of backward" (all gradients): in between, gradients grow as activations are freed. On a CPU
the plan is within ~5% of the bytes a step allocates (the tests measure it); a process's RSS is higher.

Sharded over N processes (torchrun --nproc_per_node=N train.py --fsdp: FSDP2's fully_shard per block and
at the root, distributed.shard), each process holds 1/N of every parameter, gradient and AdamW moment
(dim 0 cut in N, padded to a multiple of N rows), but its own activations (its own micro-batch), whole
buffers (LoRA-XS/SB's frozen A and B), and while it runs the gathered weights of two blocks (the one
running, the next prefetched) and of the root (embedding, final norm, lm_head: gathered from the root's
forward to the end of backward), and in backward those blocks' whole gradients until reduce-scattered.
"""
import argparse
import sys

import torch

import lift
from eval_math import Parser
from experiments import check_number, command_line, refuse
from model import LOSS_CHUNK, ModelConfig, up_to_last_target

GiB = 2**30
# The README table's models (model.PRESETS: the shapes of their config.json), Llama-3-70B for the sharded
# plan, and SmolLM2-135M (its GGUF's shapes) for the checks on CPU.
MODELS = {name: ModelConfig.from_preset(name) for name in ("llama-3.2-1b", "llama-3.2-3b", "llama-3-8b")}
# Llama-3-70B (not a preset: nothing here loads it): the shapes of Meta's Llama-3-70B config.json
MODELS["llama-3-70b"] = ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672,
                                    vocab_size=128256, rope_theta=500000.0, max_seq_len=8192,
                                    tie_embeddings=False)
MODELS["smollm2-135m"] = ModelConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                                     hidden_dim=1536, rope_theta=100000.0, tie_embeddings=True)
SAVES_INPUT = ("full", "lift", "lora", "rocoft-row")  # whose backward needs each target Linear's input x


def _bytes(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def layer_linears(cfg: ModelConfig):
    """(name, n_out, n_in, input group) of one block's Linears; a group shares one input tensor."""
    d, q, kv, h = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.hidden_dim
    return [("q_proj", q, d, "xn1"), ("k_proj", kv, d, "xn1"), ("v_proj", kv, d, "xn1"),
            ("o_proj", d, q, "attn"), ("gate_proj", h, d, "xn2"), ("up_proj", h, d, "xn2"),
            ("down_proj", d, h, "act")]


def base_shapes(cfg: ModelConfig):
    """(block, root): the parameters of one transformer block and the root's own (embedding, lm_head
    unless tied, final norm), FSDP2's groups (distributed.shard), each as (dim 0, numbers per dim-0 row)."""
    block = [(o, i) for _, o, i, _ in layer_linears(cfg)] + [(cfg.dim, 1)] * 2
    root = [(cfg.vocab_size, cfg.dim)] * (1 if cfg.tie_embeddings else 2) + [(cfg.dim, 1)]
    return block, root


def shard_size(shapes, world: int = 1) -> int:
    """Numbers one of `world` processes holds of tensors of `shapes`, as fully_shard cuts them: dim 0 in
    `world` chunks, each padded to ceil(dim 0 / world) rows (world x this: the padded whole, gathered)."""
    return sum(-(-rows // world) * row for rows, row in shapes)


def held(cfg: ModelConfig, groups, world: int = 1) -> int:
    """Numbers one process holds of (block, root) shapes: every block's and the root's, sharded."""
    block, root = groups
    return cfg.n_layers * shard_size(block, world) + shard_size(root, world)


def n_params(cfg: ModelConfig) -> int:
    return held(cfg, base_shapes(cfg))


def _kind(method, s) -> str:
    return f"rocoft-{s.mode}" if method == "rocoft" else method


def _adapted(cfg, method, s):
    """The target Linears of one block, as (name, n_out, n_in, group, r): r clamped as each method does."""
    out, rank, kind = [], getattr(s, "rank", 0), _kind(method, s)
    for name, n_out, n_in, group in layer_linears(cfg):
        if method == "full" or name in s.targets:
            clamp = {"rocoft-row": n_out, "rocoft-column": n_in}.get(kind, min(n_out, n_in))
            r = min(rank, clamp)
            out.append((name, n_out, n_in, group, r))
    return out


def _trainable_per_matrix(kind, s, n_out, n_in, r) -> list:
    """The tensors a method trains for one target matrix, as (dim 0, numbers per row): A and B (LoRA), R
    (LoRA-XS/SB), D (RoCoFT), a and b (HyperAdapt), the k selected entries as one vector (LIFT)."""
    k = lift.budget(n_out, n_in, getattr(s, "rank", 0), getattr(s, "block", 0))
    return {"lora": [(r, n_in), (n_out, r)], "loraxs": [(r, r)], "lorasb": [(r, r)], "lift": [(k, 1)],
            "rocoft-row": [(r, n_in)], "rocoft-column": [(n_out, r)], "hyper": [(n_out, 1), (n_in, 1)]}[kind]


def trainable_shapes(cfg: ModelConfig, method: str, s):
    """(block, root) shapes, as base_shapes, of what AdamW trains: full, every weight; the others, their
    tensors of each target matrix in every block (with each method's clamping), none at the root."""
    if method == "full":
        return base_shapes(cfg)
    kind = _kind(method, s)
    block = [t for _, o, i, _, r in _adapted(cfg, method, s) for t in _trainable_per_matrix(kind, s, o, i, r)]
    return block, []


def trainable(cfg: ModelConfig, method: str, s) -> int:
    """Trainable numbers, by arithmetic (the table in DESIGN.md, with each method's clamping)."""
    return held(cfg, trainable_shapes(cfg, method, s))


def _block(cfg, method, s, N, w, a, first, grid=None) -> int:
    """Bytes autograd saves in one block for the N tokens that run; w: weight/residual dtype bytes, a:
    compute dtype bytes (bf16 under autocast). Counted once per storage, as autograd shares them.
    grid: B x T when the batch is packed (model.Transformer.forward: N < B x T run, attention on the grid)."""
    d, h, H, kind = cfg.dim, cfg.hidden_dim, cfg.n_heads, _kind(method, s)
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    norms = 1 if first and method != "full" else 2      # the first norm's input (embeddings) needs no grad
    out = norms * (4 * N * d + 4 * N)                    # RMSNorm: x.float() and 1/rms
    if method == "full":
        out += norms * w * N * d                         # x / rms, for the norm weight's gradient
    G = grid or N                                        # attention: q, k after RoPE, v, output, logsumexp
    out += a * G * (2 * q + 2 * kv) + 4 * G * H
    if grid:  # packed: index_copy_ into the grid keeps its source, q, k, v (in block 0 those that need grad)
        qkv = [o for name, o, _, g in layer_linears(cfg) if g == "xn1"
               and not (first and method != "full" and name not in s.targets)]
        out += a * N * sum(qkv)
    out += 3 * a * N * h                                 # SwiGLU: gate, silu(gate), up
    src = {"xn1": w, "xn2": w, "attn": a, "act": a}      # dtype bytes of each group's input
    # groups whose input is counted (Linears that share an input share its storage); o_proj's input is
    # attention's output itself, counted above, unless packed (then a copy of the running rows)
    seen = set() if grid else {"attn"}
    for _, n_out, n_in, g, r in _adapted(cfg, method, s):
        # x in the compute dtype: the group's tensor once, or a cast of its own per Linear where the input
        # is in another dtype (autocast over fp32 weights)
        if kind in SAVES_INPUT and (src[g] != a or g not in seen):
            out += a * N * n_in
        # HyperAdapt, a * (W0 (b * x)): x in fp32 for b's gradient (the group's tensor once if it is fp32,
        # else a copy per Linear), and W0 (b * x) in fp32 for a's
        if kind == "hyper":
            out += 4 * N * (n_in * (src[g] != 4 or g not in seen) + n_out)
        seen.add(g)
        if kind in ("lora", "loraxs", "lorasb", "rocoft-row", "rocoft-column"):
            out += a * N * r  # A x (LoRA, LoRA-XS/SB), D x (RoCoFT rows: index_add_ keeps it), x[index]
        if a != 4:            # fp32 tensors cast to the compute dtype, kept for backward; not the factor
            # that meets x in block 0's q, k, v (x there needs no gradient: the embeddings are frozen)
            no_dx = first and g == "xn1"
            cast = {"full": n_out * n_in if w != a else 0, "lora": r * (n_out + (0 if no_dx else n_in)),
                    "rocoft-row": 0 if no_dx else r * n_in, "rocoft-column": 0 if no_dx else r * n_out}
            cast["loraxs"] = cast["lorasb"] = cast["lora"] + r * r
            out += a * cast.get(kind, 0)
    return out


def shares(targets: torch.Tensor) -> dict:
    """plan's `targets` and `padding` for a [B, T] targets tensor (-100: none), as model.Transformer.forward
    sees it: positions after a row's last target do not run."""
    idle = int((~up_to_last_target(targets)).sum())
    return dict(targets=int((targets != -100).sum()) / targets.numel(), padding=idle / targets.numel())


def plan(cfg: ModelConfig, method: str, settings, batch: int, seq: int, weight_dtype=torch.bfloat16,
         grad_checkpoint: bool = False, compute_dtype=torch.bfloat16, targets: float = 1.0,
         padding: float = 0.0, world: int = 1) -> dict:
    """Bytes of one training step of `method` with `settings` (methods.METHODS[method][1]) at batch x seq
    tokens. weight_dtype: the base weights' dtype (train.py: fp32 for full fine-tuning and without native
    bf16); compute_dtype: the matmul outputs' dtype (bf16 under train.py's autocast, else the weights').
    targets: the share of positions with a target (an SFT batch with its prompt masked: ~0.5); padding:
    the share after each row's last target, which does not run (shares(y) gives both for a batch).
    world: processes sharding the model (train.py --fsdp; 1: none), the bytes and `batch` then one
    process's; LIFT's k entries (values, moments, compact gradient, index, W0) stay whole in every process
    there, as train.py keeps them, and the shards of its dense weight gradients wait from backward to the step.
    Returns bytes per component, 'gathered' (FSDP2's gathered weights, 0 at world 1), 'total' (the peak),
    'trainable' (numbers) and 'prepare' (peak of the method's prepare on the device, the model sharded:
    LIFT's SVD, LoRA-SB's gradient pass; LoRA-SB's fp32 gradient sums live in host memory, 'host' bytes)."""
    s, kind = settings, _kind(method, settings)
    w, a, d, V, L = _bytes(weight_dtype), _bytes(compute_dtype), cfg.dim, cfg.vocab_size, cfg.n_layers
    grid = batch * seq
    N = round((1 - padding) * grid)                      # positions that run
    Nt = round(targets * grid)                           # rows of the loss
    packed = grid if N < grid else None
    base, train = base_shapes(cfg), trainable_shapes(cfg, method, s)
    n, held_n = held(cfg, train), held(cfg, train, world)  # trainable numbers: all, and this process's
    mats = [(o, i, r) for _, o, i, _, r in _adapted(cfg, method, s)] if method != "full" else []
    lift_fsdp = kind == "lift" and world > 1
    if lift_fsdp:  # (lift.LIFTAdamW under --fsdp: the k entries whole in every process)
        held_n = n
    # trained numbers, their gradients and moments: fp32, but full trains the weights themselves, in their dtype
    t = w if method == "full" else 4
    k = {"weights": w * held(cfg, base, world), "buffers": 0, "master": 0 if method == "full" else 4 * held_n,
         "adam": 2 * t * held_n, "grads": t * held_n}
    if kind in ("loraxs", "lorasb"):  # frozen fp32 factors A (r x n_in) and B (n_out x r): buffers, not sharded
        k["buffers"] = L * sum(4 * r * (o + i) for o, i, r in mats)
    if kind == "lift":  # int32 index and W0 of each selected entry
        k["buffers"] = (4 + w) * held_n
    # FSDP2: the root's weights whole from its forward to the end of backward, two blocks' while they run
    # (adapters gather with their block; LIFT's values live in its optimizer, full's are the weights); in
    # backward two blocks' gradients whole until reduce-scattered, the root's (full) until backward ends
    k["gathered"] = reduce = reduce_root = 0
    if world > 1:
        adapters = [] if method in ("full", "lift") else train[0]
        k["gathered"] = world * (2 * (w * shard_size(base[0], world) + 4 * shard_size(adapters, world))
                                 + w * shard_size(base[1], world))
        reduce = 2 * world * t * shard_size(train[0], world)
        reduce_root = world * t * shard_size(train[1], world)
    if lift_fsdp:  # dense gradients of the targets: two blocks' whole, then every matrix's shard until the step
        dense = [(o, i) for o, i, _ in mats]
        reduce = 2 * world * w * shard_size(dense, world)
        k["grads"] += w * held(cfg, (dense, []), world)
    # activations: what autograd keeps at the end of forward. Every block's saved tensors, or with
    # checkpointing only each block's input (backward then recomputes one block at a time: 'backward'),
    # and the fused loss's dL/dh (and fp32 dL/dW of lm_head for full), computed in forward
    blocks = [_block(cfg, method, s, N, w, a, i == 0, packed) for i in range(L)]
    glob = 2 * w * grid * cfg.head_dim + N + 4 * N * d + 4 * N  # cos, sin; target mask; the final RMSNorm
    glob += w * N * d + 8 * N if method == "full" else 0         # its x / rms; the embedding's token ids
    k["activations"] = glob + (L * w * N * d if grad_checkpoint else sum(blocks)) + w * Nt * d
    k["activations"] += 4 * V * d if method == "full" else 0
    # loss: while it runs, the final norm's output and its rows at the targets, one chunk of logits
    # (fp32 logits and logsumexp's exp(x - max)), and under autocast with fp32 weights a bf16 lm_head
    k["loss"] = w * (N + Nt) * d + 8 * min(Nt, LOSS_CHUNK) * V + (a * V * d if a != w else 0)
    # backward: one block recomputed (checkpointing), the gradients flowing through a block (dL/dx in fp32
    # at the norms, dL/d of one hidden-wide tensor; a block's own saved tensors are freed as its backward
    # uses them, so no more than this at once, measured), for full the scaled copy of lm_head's dL/dW.
    # LIFT's dense gradient of one matrix lives while its Linear's backward runs, after the loss's tensors
    # are freed: on CPU it adds nothing to LoRA's peak at small sizes, so it counts as max(flow, it)
    flow = N * (a * cfg.hidden_dim + 4 * d)
    if kind == "lift":
        flow = max(flow, w * max(o * i for o, i, _ in mats))
    k["backward"] = (blocks[-1] if grad_checkpoint else 0) + flow + reduce
    k["backward"] += 4 * V * d if method == "full" else 0
    static = k["weights"] + k["buffers"] + k["master"] + k["adam"]
    # gradients arrive as activations are freed: at the end of backward all of them and the first block's
    # activations; full with tied embeddings then adds the embedding's sparse gradient into lm_head's,
    # which costs a dense vocab x dim copy for a moment (measured)
    end = k["grads"] + reduce_root + max(blocks[0] + flow + reduce,
                                         w * V * d if method == "full" and cfg.tie_embeddings else 0)
    k["total"] = static + k["gathered"] + max(k["activations"] + max(k["loss"], k["backward"]), end)
    # prepare: LIFT's exact SVD of the largest target (input copy, U, Vh, W', |W'|: ~5 fp32 matrices) and
    # the indices, then its state; LoRA-SB's first-step gradient pass at the training batch: every target
    # weight needs its gradient, so LIFT's activations, one dense gradient at a time, summed in host memory
    k["prepare"], k["host"] = 0, 0
    if kind == "lift":
        k["prepare"] = k["weights"] + max(5 * 4 * max(o * i for o, i, _ in mats) + 8 * held_n,
                                          static - k["weights"])
    if kind == "lorasb" and s.init == "gradient":
        every = lift.Settings(targets=s.targets, rank=1)
        p = plan(cfg, "lift", every, batch, seq, weight_dtype, grad_checkpoint, compute_dtype, targets, padding,
                 world)
        k["prepare"] = p["total"] - sum(p[c] for c in ("buffers", "master", "adam", "grads"))
        k["host"] = L * sum(4 * o * i for o, i, _ in mats)
    k["trainable"] = n
    return k


def need(cfg, method, settings, batch, seq, **kw) -> int:
    """Bytes the GPU must hold (plan's keywords): the training step's peak or the method's prepare."""
    p = plan(cfg, method, settings, batch, seq, **kw)
    return max(p["total"], p["prepare"])


def largest_batch(cfg, method, settings, seq, gpu_bytes, cap=4096, **kw) -> int:
    """The largest batch whose plan fits `gpu_bytes` (0 if not even batch 1 fits); plan grows with batch."""
    lo, hi = 0, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need(cfg, method, settings, mid, seq, **kw) <= gpu_bytes else (lo, mid - 1)
    return lo


def methods():
    """(label, method, settings) rows of the README table: each method with its paper's defaults; LoRA
    also at r=16 (bench.py's rank)."""
    import methods
    S = {m: cls for m, (_, cls) in methods.METHODS.items()}
    return [("full", "full", S["full"]()), ("lora r128", "lora", S["lora"]()),
            ("lora r16", "lora", S["lora"](rank=16)), ("lift r128", "lift", S["lift"]()),
            ("rocoft r3 rows", "rocoft", S["rocoft"]()), ("loraxs r64", "loraxs", S["loraxs"]()),
            ("lorasb r96", "lorasb", S["lorasb"]()), ("hyper", "hyper", S["hyper"]())]


def one_gpu_table(names, seq, gpu_gb, room):
    """The README table: per model and method, the largest batch on one GPU and the plan's terms there."""
    print(f"Largest batch x {seq} tokens (every token a target) on one {gpu_gb:g} GiB GPU: planned "
          f"peak x 1.10 + 2 GiB must fit.\ntrain.py --dtype auto on CUDA: bf16 weights (full: fp32), bf16 "
          f"autocast. GiB at the largest batch without checkpointing\n(with it where that is 0); 'peak' is not "
          f"the sum: loss buffers and backward transients come and go;\n* = LoRA-SB's initial gradient pass.")
    for name in names:
        cfg = MODELS[name]
        print(f"\n{name} ({n_params(cfg) / 1e9:.2f}B parameters)")
        print(f"{'method':<15}{'trainable':>14}{'batch':>7}{'ckpt':>6}{'weights':>9}{'buffers':>9}{'master':>8}"
              f"{'adam':>6}{'grads':>7}{'acts':>7}{'loss':>6}{'peak':>7}")
        for label, method, s in methods():
            kw = dict(weight_dtype=torch.float32 if method == "full" else torch.bfloat16)
            b0, b1 = (largest_batch(cfg, method, s, seq, room, grad_checkpoint=c, **kw)
                      for c in (False, True))
            p = plan(cfg, method, s, b0 or max(b1, 1), seq, grad_checkpoint=not b0, **kw)
            cols = [f"{p[key] / GiB:.1f}" for key in ("weights", "buffers", "master", "adam", "grads",
                                                       "activations", "loss")]
            star = "*" if p["prepare"] > p["total"] else ""
            cols.append(f"{max(p['total'], p['prepare']) / GiB:.1f}{star}")
            print(f"{label:<15}{p['trainable']:>14,}{b0:>7}{b1:>6}"
                  + "".join(f"{c:>{n}}" for c, n in zip(cols, (9, 9, 8, 6, 7, 7, 6, 7))))
            if p["host"]:
                print(f"{'':<15}(LoRA-SB's gradient sums: {p['host'] / GiB:.1f} GiB of host memory)")


def sharded_table(names, counts, seq, gpu_gb, room):
    """Per model and method, the GiB each GPU needs sharded over each count of GPUs (FSDP2) at the least a
    step takes (micro-batch 1, checkpointing; the method's prepare where that is more), whether it fits,
    and the fewest GPUs that fit."""
    print("GiB per GPU of a training step sharded over N GPUs (torchrun --nproc_per_node=N train.py --fsdp; "
          f"1 GPU:\nno sharding), at the least a step takes: micro-batch 1 x {seq} tokens per GPU with "
          "--grad-checkpoint.\nEach GPU holds 1/N of the weights, gradients and AdamW moments, its own "
          "activations, and two blocks'\nand the root's weights gathered. bf16 weights (full: fp32), bf16 "
          f"autocast. 'no': planned x 1.10 + 2\nGiB exceeds {gpu_gb:g} GiB; 'fewest': the fewest of these GPU "
          "counts that fit ('-': none).")
    print(f"\n{'model':<13}{'method':<14}" + "".join(f"{f'{N} GPU' + 's' * (N > 1):>12}" for N in counts)
          + f"{'fewest':>8}")
    for name in names:
        cfg = MODELS[name]
        for label, method, s in methods():
            kw = dict(weight_dtype=torch.float32 if method == "full" else torch.bfloat16)
            peak = {N: need(cfg, method, s, 1, seq, grad_checkpoint=True, world=N, **kw) for N in counts}
            fewest = next((N for N in counts if peak[N] <= room), "-")
            print(f"{name:<13}{label:<14}"
                  + "".join(f"{peak[N] / GiB:>7.1f}{'yes' if peak[N] <= room else 'no':>5}" for N in counts)
                  + f"{fewest:>8}")
    print("\nLIFT under --fsdp keeps its k entries' state whole in every process (not 1/N), and the shards of "
          "its dense\nweight gradients from backward to the step.")
    # the plan is the sharded step (and prepare as if sharded); train.py gets there from a whole model
    whole = ", ".join(f"{name} {2 * n_params(MODELS[name]) / GiB:.1f} / {4 * n_params(MODELS[name]) / GiB:.1f}"
                      for name in names)
    print("! train.py loads the whole base onto every GPU and runs the method's prepare there before it shards:"
          f"\n  each GPU first holds the whole weights (GiB, bf16 / full's fp32): {whole}.")


def main(argv=None):
    ap = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu-gb", type=float, default=80, help="GPU memory in GiB (an 80 GB A100 has 80 GiB)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--models", help=f"of: {', '.join(MODELS)} (default: llama-3.2-1b,llama-3.2-3b,llama-3-8b; "
                    "with --gpus llama-3-8b,llama-3-70b)")
    ap.add_argument("--gpus", help="comma-separated GPU counts, e.g. 1,2,4,8,16: the plan sharded over each "
                    "(FSDP2, train.py --fsdp) and the fewest that fit")
    args = ap.parse_args(argv)
    check_number("gpu-gb", args.gpu_gb, 2, allowed="GiB of GPU memory, a finite number > 2 (the CUDA context "
                 "and cuBLAS take ~2 GiB)")
    counts = None
    if args.gpus is not None:
        words = [c.strip() for c in args.gpus.split(",")]
        bad = next((c for c in words if not (c.isdecimal() and 1 <= int(c) <= 1024)), None)
        if bad is not None or len(set(map(int, words))) < len(words):
            refuse("gpus", args.gpus, "comma-separated GPU counts, each once, each a whole number from 1 to "
                   "1,024" + (f" ({bad!r} is not one)" if bad is not None else ""))
        counts = sorted(map(int, words))
    default = "llama-3-8b,llama-3-70b" if counts else "llama-3.2-1b,llama-3.2-3b,llama-3-8b"
    names = [m.strip() for m in (default if args.models is None else args.models).split(",")]
    bad = next((m for m in names if m not in MODELS), None)
    if bad is not None or len(set(names)) < len(names):
        refuse("models", args.models, f"comma-separated names, each once, of {', '.join(MODELS)}"
               + (f" ({bad!r} is not one)" if bad is not None else ""))
    shortest = min(names, key=lambda m: MODELS[m].max_seq_len)
    if not 1 <= args.seq <= MODELS[shortest].max_seq_len:
        refuse("seq", args.seq, f"1 to {MODELS[shortest].max_seq_len:,} tokens (the context length of {shortest})")
    # What torch does not count as tensors stays free: the CUDA context and cuBLAS workspaces (~1-2 GiB),
    # and the caching allocator's rounding and fragmentation (reserved runs ~5-10% above allocated).
    room = (args.gpu_gb - 2) * GiB / 1.10
    if counts:
        sharded_table(names, counts, args.seq, args.gpu_gb, room)
    else:
        one_gpu_table(names, args.seq, args.gpu_gb, room)


def cli(argv=None) -> int:
    return command_line(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
