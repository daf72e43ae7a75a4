"""
Forgetting on a real model: how far fine-tuning moved it from what it could already do.

A pretrained model has no "source task" to lose, and an instruct model cannot do the synthetic
arithmetic, so its forgetting is measured on text it wrote itself: the base model's greedy
continuations of neutral prompts (generated once and cached: forgetting_set), scored three ways:
 - loss rise: the tuned model's cross-entropy on the base's tokens minus the base's own. Only
   a change that makes the base's text less likely counts; a model that grew more confident in
   the same text scores below zero.
 - KL(base || tuned) per token: how far the next-token distributions moved, in any direction.
   Over the base's top-k tokens plus one bucket for the rest (a lower bound on the full KL, and
   exact when the rest's mass is negligible), so the reference fits in a small cache.
 - agreement: the share of the base's greedy tokens the tuned model still predicts first.
No labels needed: the papers' "learn the target, keep the rest" (LIFT §7.1) on a model whose
"rest" is whatever it had learned.
"""
import pickle
from pathlib import Path

import torch

from generate import generate
from weights import write_atomic

NEUTRAL_TOPICS = ("the ocean", "a small village", "the history of bread", "how bees make honey", "the moon",
                  "learning to play the piano", "a rainy afternoon", "the printing press", "mountains in winter",
                  "a busy train station", "how plants grow", "the first day of school", "an old library",
                  "the life of a river", "making tea", "a city at night", "migrating birds", "a friendly dog",
                  "the desert", "building a bridge")
# Each stem ends where a text begins: a bare instruction ("Write about X.") makes SmolLM2-Instruct
# end at once on half the topics; with these it writes all 48 tokens on 119 of 120 (measured).
NEUTRAL_STEMS = ("A short paragraph about {}:\n\n", "Something interesting about {}:", "{} - a short description.\n\n",
                 "Here is a story about {}:\n\n", "Write a short paragraph about {}.\n\n")
KL_TOP_K = 64


def neutral_prompts(n: int = 100) -> list[str]:
    """n prompts with nothing to do with math (20 topics x 5 phrasings, spread evenly)."""
    prompts = [stem.format(topic) for stem in NEUTRAL_STEMS for topic in NEUTRAL_TOPICS]
    if not 1 <= n <= len(prompts):
        raise ValueError(f"the number of neutral prompts must be 1..{len(prompts)}, got {n}")
    return [prompts[i * len(prompts) // n] for i in range(n)]


def self_text(model, tokenizer, n: int = 100, max_new_tokens: int = 48, batch_size: int = 32) -> list[dict]:
    """The model's own greedy continuations of `n` neutral prompts: [{prompt: ids, text: ids}]."""
    prompts = [tokenizer.encode(p, bos=True) for p in neutral_prompts(n)]
    was_training = model.training
    model.eval()
    out = []
    for b in range(0, len(prompts), batch_size):
        batch = prompts[b:b + batch_size]
        for p, t in zip(batch, generate(model, batch, max_new_tokens, tokenizer.stop_ids, tokenizer.pad_id)):
            out.append({"prompt": p, "text": t})
    model.train(was_training)
    return [r for r in out if r["text"]]


def text_logprobs(model, tokenizer, texts: list[dict], batch_size: int = 16):
    """Yield the next-token log-probabilities [n, vocab] (fp32) at each `text` token of the rows,
    given their prompts, and those tokens [n]; one batch at a time."""
    device = model.embed_tokens.weight.device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for b in range(0, len(texts), batch_size):
            rows = texts[b:b + batch_size]
            seqs = [r["prompt"] + r["text"] for r in rows]
            x = torch.full((len(rows), max(map(len, seqs)) - 1), tokenizer.pad_id, dtype=torch.long)
            y = torch.full_like(x, -100)
            for i, (seq, r) in enumerate(zip(seqs, rows)):
                x[i, :len(seq) - 1] = torch.tensor(seq[:-1])
                y[i, len(r["prompt"]) - 1:len(seq) - 1] = torch.tensor(r["text"])
            keep = y != -100
            yield model(x.to(device)).float()[keep.to(device)].log_softmax(-1), y[keep].to(device)
    model.train(was_training)


def drift_reference(model, tokenizer, texts: list[dict], k: int = KL_TOP_K) -> dict:
    """What the base model predicts on its own text: its loss, and per token its top-k ids and
    log-probabilities (the KL reference)."""
    ids, logp, nll = [], [], []
    for lp, y in text_logprobs(model, tokenizer, texts):
        top = lp.topk(k, dim=-1)
        ids.append(top.indices.int().cpu())
        logp.append(top.values.cpu())
        nll.append(-lp.gather(1, y[:, None])[:, 0].cpu())
    return {"top_ids": torch.cat(ids), "top_logp": torch.cat(logp), "loss": float(torch.cat(nll).mean())}


def drift(model, tokenizer, texts: list[dict], ref: dict) -> dict:
    """How far `model` moved from the base of `ref` (drift_reference) on the base's own text:
    {loss, base_loss, loss_rise, kl, agreement, tokens}: the three scores above."""
    nll, kl, agree, at = [], [], [], 0
    for lp, y in text_logprobs(model, tokenizer, texts):
        n = len(y)
        top_ids, p_logp = ref["top_ids"][at:at + n].to(lp.device).long(), ref["top_logp"][at:at + n].to(lp.device)
        at += n
        q_logp = lp.gather(1, top_ids)
        p_rest = (1 - p_logp.exp().sum(1)).clamp(min=1e-12)
        q_rest = (1 - q_logp.exp().sum(1)).clamp(min=1e-12)
        kl.append((p_logp.exp() * (p_logp - q_logp)).sum(1) + p_rest * (p_rest.log() - q_rest.log()))
        nll.append(-lp.gather(1, y[:, None])[:, 0])
        agree.append(lp.argmax(-1) == top_ids[:, 0])
    if at != len(ref["top_ids"]):
        raise ValueError(f"the drift reference covers {len(ref['top_ids'])} tokens, these texts {at}")
    loss = float(torch.cat(nll).mean())
    return {"tokens": at, "base_loss": ref["loss"], "loss": loss, "loss_rise": loss - ref["loss"],
            "kl": float(torch.cat(kl).mean()), "agreement": float(torch.cat(agree).float().mean())}


def forgetting_set(model, tok, args, cache: Path):
    """(texts, reference) for drift: the base model's own text and predictions,
    computed on the first run and cached (a torch file, read with weights_only=True)."""
    f = cache / f"selftext-{args.forget_prompts}.pt"
    if f.exists():
        try:
            d = torch.load(f, weights_only=True)
            return d["texts"], d["ref"]
        except OSError:  # permission denied and the like: the system's own reason
            raise
        except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, KeyError, TypeError, IndexError) as e:
            print(f"note: the forgetting cache {f} is unreadable ({type(e).__name__}); measuring it again", flush=True)
    print(f"forgetting set: the base model's greedy continuations of {args.forget_prompts} neutral prompts "
          "(first run only)", flush=True)
    texts = self_text(model, tok, args.forget_prompts, batch_size=args.eval_batch_size)
    if not texts:
        raise ValueError(f"the base model ended every one of its {args.forget_prompts} neutral continuations at once: "
                         "no text to measure forgetting on; use more --forget-prompts, or 0 to turn it off")
    ref = drift_reference(model, tok, texts)
    cache.mkdir(parents=True, exist_ok=True)
    write_atomic(f, lambda out: torch.save({"texts": texts, "ref": ref}, out))
    return texts, ref


def print_forgetting(f: dict, label: str):
    """The forgetting table: the base row and the tuned model's (f: drift's result plus "texts")."""
    print(f"\nforgetting, on {f['tokens']:,} tokens the base model wrote itself ({f['texts']} neutral prompts):")
    print(f"{'':<22}{'loss':>10}{'loss rise':>11}{'KL(base||tuned)':>17}{'agreement':>11}")
    print(f"{'base':<22}{f['base_loss']:>10.4f}{'':>11}{0:>17.5f}{100:>10.1f}%")
    print(f"{label:<22}{f['loss']:>10.4f}{f['loss_rise']:>+11.4f}{f['kl']:>17.5f}{100 * f['agreement']:>10.1f}%")
