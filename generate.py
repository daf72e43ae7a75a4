"""
Generation: batched greedy / sampled decoding with the KV cache (`generate`, stop strings checked
inside the loop, finished rows leave the batch) and beam search (`beam_search`, equal to
transformers' on the same weights).

Run `python generate.py` for a tiny demo: build the built-in model, generate a few tokens.
"""
import torch
import torch.nn.functional as F

from model import Transformer


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids=(), pad_id: int = 0,
             temperature: float = 0.0, top_k: int | None = None, stop=None, check_every: int = 8,
             num_beams: int = 1) -> list[list[int]]:
    """Batched decoding with a KV cache; returns the new tokens of each prompt (without the stop
    token). Prompts of different lengths are left-padded; each row's positions start at 0 on its
    first real token and padded keys are masked, so a row decodes exactly as it would alone.
    Greedy when temperature == 0. The prompts are run once; then one token per step. `stop(i, ids)`,
    if given, is asked every `check_every` new tokens of a running row i (ids: its new tokens so far)
    and True ends that row there (eval_math: a stop string in its text). A row that has ended leaves
    the batch and the KV cache, so the rest decode without it. num_beams > 1: beam_search."""
    if num_beams > 1:
        return beam_search(model, prompts, max_new_tokens, stop_ids, pad_id, num_beams)
    check_room(model, prompts, max_new_tokens, num_beams)
    B, P = len(prompts), max(len(p) for p in prompts)
    tokens, positions, valid, mask = _left_pad(model, prompts, max_new_tokens, pad_id)
    stop_set, out, rows = set(stop_ids), [[] for _ in prompts], list(range(B))  # rows: batch row -> prompt
    model.setup_cache(B, P + max_new_tokens)
    try:
        logits = model(tokens, positions=positions[:, :P], mask=mask[:, None], start=0, last_only=True)
        for t in range(max_new_tokens):
            nxt = _sample(logits[:, -1], temperature, top_k)
            keep = []
            for j, (i, tok) in enumerate(zip(rows, nxt.tolist())):
                if tok in stop_set:
                    continue
                out[i].append(tok)
                if not (stop is not None and len(out[i]) % check_every == 0 and stop(i, out[i])):
                    keep.append(j)
            if t == max_new_tokens - 1 or not keep:
                break
            if len(keep) < len(rows):  # ended rows leave the batch and the cache
                idx = torch.tensor(keep, device=nxt.device)
                rows, nxt, positions, valid = [rows[j] for j in keep], nxt[idx], positions[idx], valid[idx]
                for layer in model.layers:
                    layer.self_attn.cache = tuple(c[idx] for c in layer.self_attn.cache)
            s = P + t
            logits = model(nxt[:, None], positions=positions[:, s:s + 1], mask=valid[:, None, None, :s + 1], start=s)
    finally:
        model.clear_cache()
    return out


def check_room(model: Transformer, prompts: list[list[int]], max_new_tokens: int, num_beams: int = 1):
    """Before anything is allocated: the longest prompt plus the new tokens fit the model's
    positions (max_seq_len), and what decoding allocates fits the device's free memory
    (decoding_bytes); one-line ValueErrors otherwise (a caller cuts or refuses long prompts first)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and no empty prompt (at least one token each)")
    for name, v in (("max_new_tokens", max_new_tokens), ("num_beams", num_beams)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} is not allowed: a whole number >= 1")
    P, ctx = max(len(p) for p in prompts), model.config.max_seq_len
    if P + max_new_tokens > ctx:
        raise ValueError(f"a prompt of {P} tokens plus {max_new_tokens} new tokens is more than the model's {ctx} "
                         "positions; shorten the prompt or ask for fewer new tokens")
    need, free = decoding_bytes(model, len(prompts), P, max_new_tokens, num_beams), free_memory(model.embed_tokens.weight.device)
    if free is not None and need > free:
        raise ValueError(f"decoding {len(prompts)} prompts x {num_beams} beams x {P + max_new_tokens} positions needs "
                         f"~{need / 2**30:.1f} GiB (KV cache, masks, beams), more than the {free / 2**30:.1f} GiB free on "
                         f"{model.embed_tokens.weight.device}: use a smaller batch, fewer beams or fewer new tokens")


def decoding_bytes(model: Transformer, B: int, P: int, T: int, K: int = 1) -> int:
    """What generate / beam_search allocate besides the weights, in bytes: the KV cache (2 tensors
    per layer of [B*K, n_kv_heads, P + T, head_dim]), the prefill's [B, P, P] mask and last logits,
    and for beams the [B, K', T] int64 hypotheses (run, finished and the 2K candidates: ~6 copies)
    and the [B*K, vocab] fp32 log-probabilities (~3 copies). An estimate within a small factor."""
    cfg, size = model.config, model.embed_tokens.weight.element_size()
    kv = 2 * cfg.n_layers * B * K * cfg.n_kv_heads * (P + T) * cfg.head_dim * size
    logits = B * K * cfg.vocab_size * 4 * (3 if K > 1 else 1)
    beams = 6 * B * K * T * 8 if K > 1 else 0
    return kv + B * P * P + B * P * cfg.dim * 4 + logits + beams


def free_memory(device) -> int | None:
    """Bytes free for new tensors on `device`: CUDA's free memory plus what PyTorch holds cached but
    unused; on a CPU the kernel's MemAvailable (and the cgroup's limit when lower). None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    try:  # a container's own limit (cgroup v2)
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            free = min(free, int(limit) - int(open("/sys/fs/cgroup/memory.current").read()))
    except (OSError, ValueError):
        pass
    return free


def _left_pad(model, prompts, max_new_tokens, pad_id):
    """(tokens [B, P], positions [B, P + new], valid [B, P + new], prefill mask [B, P, P]) for prompts
    left-padded to the longest, P: positions count from each row's first real token, padded cache
    slots are invalid keys; in the prefill a query at slot t sees real key slots s <= t, and a pad
    query itself (so no attention row is empty; its output is never used)."""
    device = model.embed_tokens.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    valid = torch.ones(B, P + max_new_tokens, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[i, :P - len(p)] = False
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    slot = torch.arange(P, device=device)
    mask = (slot[None, :, None] >= slot[None, None, :]) & (valid[:, None, :P] | torch.eye(P, dtype=torch.bool, device=device))
    return tokens, positions, valid, mask


def beam_search(model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids=(), pad_id: int = 0,
                num_beams: int = 4, length_penalty: float = 1.0) -> list[list[int]]:
    """Batched beam search as transformers' generate(num_beams=n) does it by default, step for step:
    each prompt keeps n running hypotheses (sums of log-probabilities); of the best
    max(2, 1 + #stop ids) * n continuations, those among the first n that end (a stop token, or the
    last step) join the prompt's n finished ones, scored sum / generated_length ** length_penalty,
    the best n that did not end run on (the KV cache rows reordered to follow them); a prompt stops
    taking finished hypotheses once no running one can beat its worst finished one (transformers'
    heuristic for early_stopping=False). Returns each prompt's best finished hypothesis, without
    its stop token (the LLM-Adapters evaluation the papers used decodes with 4 beams)."""
    check_room(model, prompts, max_new_tokens, num_beams)
    device = model.embed_tokens.weight.device
    B, P, K, T = len(prompts), max(len(p) for p in prompts), num_beams, max_new_tokens
    tokens, positions, valid, mask = _left_pad(model, prompts, T, pad_id)
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    keep = max(2, 1 + len(set(stop_ids))) * K
    first_k = torch.arange(keep, device=device) < K
    run_seq = torch.full((B, K, T), pad_id, dtype=torch.long, device=device)
    run_score = torch.zeros(B, K, device=device)
    run_score[:, 1:] = -1.0e9                     # the n copies of a prompt: only the first may expand
    fin_seq, fin_score = run_seq.clone(), torch.full((B, K), -1.0e9, device=device)
    fin = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    positions, valid = positions.repeat_interleave(K, 0), valid.repeat_interleave(K, 0)
    flat = torch.arange(B, device=device)[:, None] * K   # row of a prompt's first beam in the cache
    model.setup_cache(B, P + T)
    try:  # the prompts run once; their cache rows are copied to every beam
        logits = model(tokens, positions=positions[::K, :P], mask=mask[:, None], start=0, last_only=True)
        for layer in model.layers:
            layer.self_attn.cache = tuple(c.repeat_interleave(K, 0) for c in layer.self_attn.cache)
        logits = logits.repeat_interleave(K, 0)
        for t in range(T):
            logp = logits[:, -1].float().log_softmax(-1).view(B, K, -1) + run_score[:, :, None]
            V = logp.shape[-1]
            top_lp, top_i = logp.view(B, K * V).topk(keep)
            beam, tok = top_i // V, top_i % V
            cand = run_seq.gather(1, beam[:, :, None].expand(B, keep, T)).clone()
            cand[:, :, t] = tok
            ends = torch.isin(tok, stop) | (t == T - 1)
            # the n best that did not end run on
            running = top_lp + ends.float() * -1.0e9
            nxt = running.topk(K)[1]
            run_seq, run_score = cand.gather(1, nxt[:, :, None].expand(B, K, T)), running.gather(1, nxt)
            src = (beam.gather(1, nxt) + flat).flatten()
            # those among the first n that ended compete with the finished ones
            just = ends & first_k[None, :]
            score = top_lp / ((t + 1) ** length_penalty)
            score = score + (~improvable).float() * -1.0e9
            score = score + (~just) * -1.0e9
            merged = torch.cat((fin_score, score), 1)
            best = merged.topk(K)[1]
            fin_seq = torch.cat((fin_seq, cand), 1).gather(1, best[:, :, None].expand(B, K, T))
            fin_score, fin = merged.gather(1, best), torch.cat((fin, just), 1).gather(1, best)
            worst = torch.where(fin, fin_score.min(1, keepdim=True)[0], -1.0e9)
            improvable = improvable & (run_score[:, :1] / ((t + 1) ** length_penalty) > worst).any(-1, keepdim=True)
            if t == T - 1 or not bool(improvable.any()) or bool(ends.all()):
                break
            for layer in model.layers:
                layer.self_attn.cache = tuple(c[src] for c in layer.self_attn.cache)
            s = P + t
            logits = model(run_seq[:, :, t].reshape(-1, 1), positions=positions[:, s:s + 1],
                           mask=valid[:, None, None, :s + 1], start=s)
    finally:
        model.clear_cache()
    out = []
    for row in fin_seq[:, 0].tolist():
        cut = next((j for j, x in enumerate(row) if x in stop_ids), len(row))
        out.append(row[:cut])
    return out


def _sample(logits, temperature, top_k):
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    return torch.multinomial(F.softmax(logits, -1), 1)[:, 0]


if __name__ == "__main__":
    from dataclasses import asdict

    from weights import load
    torch.manual_seed(0)
    model, tok = load("tiny")
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny LLaMA: {n/1e6:.2f}M parameters, config {asdict(model.config)}")
    prompts = ["Question: What is 2 + 3?\nAnswer:", "Hi"]
    outs = generate(model, [tok.encode(p, bos=True) for p in prompts], max_new_tokens=16, stop_ids=tok.stop_ids)
    for p, o in zip(prompts, outs):
        print(repr(p), "->", repr(tok.decode(o)), "(random weights: noise is expected)")
