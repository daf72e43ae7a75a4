"""forgetting.py: the drift measures against a dense KL computed here, and the base cache of a named
GGUF model."""
import copy

import pytest
import torch

import forgetting
import train
from conftest import tiny_model
from tokenizer import Tokenizer


def test_drift_measures_against_dense_kl():
    """forgetting.drift on a tiny model: zero for the base itself; for a
    perturbed model, the top-k KL is a lower bound of the dense KL(base || tuned) computed here, and
    equals it when k = vocab."""
    tok = Tokenizer.bytes()
    base = tiny_model(vocab=264).eval()
    texts = forgetting.self_text(base, tok, n=6, max_new_tokens=12)
    assert len(texts) == 6 and all(len(r["text"]) == 12 for r in texts)
    same = forgetting.drift(base, tok, texts, forgetting.drift_reference(base, tok, texts))
    assert same["kl"] == pytest.approx(0, abs=1e-6) and same["agreement"] == 1 and same["loss_rise"] == 0
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.layers[0].mlp.down_proj.weight.add_(0.5 * torch.randn_like(tuned.layers[0].mlp.down_proj.weight))
    dense_kl, dense_nll, n = 0.0, 0.0, 0
    with torch.no_grad():
        for r in texts:
            x = torch.tensor([r["prompt"] + r["text"]])
            p = base(x)[0, len(r["prompt"]) - 1:-1].log_softmax(-1)
            q = tuned(x)[0, len(r["prompt"]) - 1:-1].log_softmax(-1)
            dense_kl += float((p.exp() * (p - q)).sum())
            dense_nll += float(-q.gather(1, torch.tensor(r["text"])[:, None]).sum())
            n += len(r["text"])
    exact = forgetting.drift(tuned, tok, texts, forgetting.drift_reference(base, tok, texts, k=264))
    assert exact["kl"] == pytest.approx(dense_kl / n, rel=1e-3) and exact["loss"] == pytest.approx(dense_nll / n, rel=1e-5)
    approx = forgetting.drift(tuned, tok, texts, forgetting.drift_reference(base, tok, texts, k=8))
    assert 0 < approx["kl"] <= exact["kl"] + 1e-6 and exact["tokens"] == n
    assert forgetting.neutral_prompts(3) == [forgetting.neutral_prompts(100)[i] for i in (0, 33, 66)]
    with pytest.raises(ValueError, match="1..100, got 0"):
        forgetting.neutral_prompts(0)


def test_base_cache_of_a_named_gguf_model(smol_file, tmp_path):
    """--model smollm2-135m (a name, not a path): the base cache is keyed by the GGUF file it names,
    the same folder as for that file's path."""
    import types
    args = types.SimpleNamespace(builtin=False, dtype="auto", method="lora", device="cpu", out=str(tmp_path / "run"))
    by_name = train.base_cache(args, "smollm2-135m")
    assert by_name == train.base_cache(args, smol_file) and by_name.parent == tmp_path / "base-cache"


def test_an_unreadable_forgetting_cache_is_measured_again(tmp_path, capsys):
    """A corrupt or foreign selftext file (torch.load with weights_only=True refuses it) is measured
    again with a note, never a traceback."""
    import types
    tok, base = Tokenizer.bytes(), tiny_model(vocab=264).eval()
    args = types.SimpleNamespace(forget_prompts=2, eval_batch_size=2)
    (tmp_path / "selftext-2.pt").write_bytes(b"not a torch file")
    texts, ref = forgetting.forgetting_set(base, tok, args, tmp_path)
    assert len(texts) == 2 and "is unreadable (" in capsys.readouterr().out
    again, _ = forgetting.forgetting_set(base, tok, args, tmp_path)       # the new cache reads back
    assert again == texts
