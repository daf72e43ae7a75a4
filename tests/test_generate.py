"""generate.py against transformers: batched greedy generation equals one prompt at a time, beam search
equals transformers' (SmolLM2-135M too), and each sequence stops on its own."""
import pytest
import torch

from conftest import tiny_model
from generate import generate
from weights import save_pretrained


def _greedy_no_cache(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_batched_generate_equals_one_at_a_time_and_transformers(tmp_path):
    from transformers import LlamaForCausalLM
    model = tiny_model(1, scale=3.0, rope_theta=10000.0).eval()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 64, (n,), generator=g).tolist() for n in (3, 11, 7, 1, 16)]
    batched = generate(model, prompts, max_new_tokens=12)
    assert [len(b) for b in batched] == [12] * 5
    assert batched == [_greedy_no_cache(model, p, 12) for p in prompts]
    assert batched == [generate(model, [p], max_new_tokens=12)[0] for p in prompts]
    save_pretrained(model, tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    for p, ours in zip(prompts, batched):
        out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                          max_new_tokens=12, min_new_tokens=12, pad_token_id=0, eos_token_id=None)
        assert out[0, len(p):].tolist() == ours


@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_equals_transformers(tmp_path, num_beams):
    """generate(num_beams=n) against transformers' beam search (its defaults: length penalty 1.0,
    early_stopping False), with a stop token the model does write, so hypotheses end at different
    lengths; batched with left padding equals one prompt at a time."""
    from transformers import LlamaForCausalLM
    model = tiny_model(1, scale=3.0, rope_theta=10000.0).eval()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 64, (n,), generator=g).tolist() for n in (3, 11, 7, 1, 16)]
    assert generate(model, prompts, 12, num_beams=1) == generate(model, prompts, 12)
    save_pretrained(model, tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ended = 0
    for eos in (20, 34, 59):  # tokens this model writes: hypotheses end at different lengths
        ours = generate(model, prompts, 12, stop_ids=[eos], num_beams=num_beams)
        assert ours == [generate(model, [p], 12, stop_ids=[eos], num_beams=num_beams)[0] for p in prompts]
        for p, o in zip(prompts, ours):
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                              num_beams=num_beams, max_new_tokens=12, pad_token_id=0,
                              eos_token_id=eos)[0, len(p):].tolist()
            ended += eos in out
            assert o == (out[:out.index(eos)] if eos in out else out), (eos, p)
    assert 2 <= ended < 15                        # some hypotheses ended with the stop token, most ran out


def test_beam_search_equals_transformers_on_smollm2(smol, smol_ref):
    model, tok = smol
    hf, hf_tok = smol_ref
    prompts = [tok.encode(t) for t in ("The capital of France is", "def add(a, b):\n", "Once upon a time")]
    ours = generate(model, prompts, 16, stop_ids=tok.stop_ids, pad_id=tok.pad_id, num_beams=4)
    for p, o in zip(prompts, ours):
        out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                          num_beams=4, max_new_tokens=16, pad_token_id=tok.pad_id,
                          eos_token_id=list(tok.stop_ids))[0, len(p):].tolist()
        cut = next((i for i, t in enumerate(out) if t in tok.stop_ids), len(out))
        assert o == out[:cut]


def test_generate_stops_per_sequence():
    model = tiny_model(2, scale=3.0, rope_theta=10000.0).eval()
    prompts = [[5, 6, 7], [9], [1, 2, 3, 4, 5, 6]]
    free = generate(model, prompts, max_new_tokens=10)
    stop = free[0][2]  # the third token of row 0 becomes a stop token
    stopped = generate(model, prompts, max_new_tokens=10, stop_ids=[stop])
    for f, s in zip(free, stopped):
        cut = f.index(stop) if stop in f else len(f)
        assert s == f[:cut]  # each row ends at its own first stop token, the others go on
