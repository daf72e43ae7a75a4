import json
import math
import os
import signal

import pytest
import torch

import train
from model import ModelConfig, Tokenizer, Transformer

# =============================================================================
# train.py — the shared loop, full FT, checkpoints, the CLI's errors


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """A small random LLaMA with the byte tokenizer, saved as a Hugging Face folder."""
    d = tmp_path_factory.mktemp("small")
    cfg = ModelConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=264, multiple_of=16, rope_theta=10000.0,
                      tie_embeddings=True)
    Transformer(cfg).init_weights(0).save_pretrained(d)
    Tokenizer.bytes().save(d)
    return d


def _argv(small_dir, out, *extra):
    return ["--model", str(small_dir), "--data", "synth-target", "--train-limit", "64", "--eval-data", "none",
            "--batch-size", "4", "--seq-len", "96", "--out", str(out), "--log-every", "1", *extra]


def _weights(out):
    return Transformer.from_pretrained(out).state_dict()


def test_full_ft_matches_handwritten_adamw(small_dir, tmp_path):
    """Five steps of `--method full` against AdamW written out by hand (Loshchilov & Hutter, Alg. 2),
    with the same batches, gradient clipping, warmup and linear decay."""
    steps, lr, wd, clip, (b1, b2), eps = 5, 1e-3, 0.1, 0.5, (0.9, 0.95), 1e-6
    train.main(_argv(small_dir, tmp_path / "run", "--method", "full", "--max-steps", str(steps), "--lr", str(lr),
                     "--weight-decay", str(wd), "--max-grad-norm", str(clip), "--betas", f"{b1},{b2}", "--eps",
                     str(eps), "--warmup-ratio", "0.4", "--grad-accum", "2"))
    got = _weights(tmp_path / "run")

    import eval_math
    model = Transformer.from_pretrained(small_dir)
    tok = Tokenizer.bytes()
    examples, _ = train.tokenize(eval_math.load_problems("synth-target", "train", limit=64), tok, 96)
    params = dict(model.named_parameters())
    m = {k: torch.zeros_like(p) for k, p in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    warmup = math.ceil(0.4 * steps)
    for t in range(steps):
        lr_t = lr * ((t + 1) / warmup if t < warmup else 1 - (t - warmup) / (steps - warmup))
        for j in range(2):
            x, y = train.collate(train.micro_batch(examples, 2 * t + j, 4, 0), tok.pad_id, "cpu")
            (model(x, y)[1] / 2).backward()
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params.values()))
        scale = min(1.0, clip / (norm.item() + 1e-6))
        with torch.no_grad():
            for k, p in params.items():
                g = p.grad * scale
                m[k] = b1 * m[k] + (1 - b1) * g
                v[k] = b2 * v[k] + (1 - b2) * g * g
                mhat, vhat = m[k] / (1 - b1 ** (t + 1)), v[k] / (1 - b2 ** (t + 1))
                p.mul_(1 - lr_t * wd)
                p.sub_(lr_t * mhat / (vhat.sqrt() + eps))
                p.grad = None
    for k, p in model.state_dict().items():
        assert torch.allclose(got[k], p, atol=1e-6, rtol=0), k
    assert (got["layers.0.mlp.up_proj.weight"] != Transformer.from_pretrained(small_dir).layers[0].mlp.up_proj.weight).any()


def test_loss_falls_and_saved_folder_loads_everywhere(small_dir, tmp_path):
    from transformers import LlamaForCausalLM
    import eval_math
    metrics = train.main(_argv(small_dir, tmp_path / "run", "--method", "full", "--max-steps", "30", "--lr", "3e-3",
                               "--eval-data", "synth-target", "--eval-limit", "8", "--max-new-tokens", "8"))
    log = [json.loads(l) for l in open(tmp_path / "run" / "log.jsonl")]
    assert len(log) == 30
    assert sum(r["loss"] for r in log[-5:]) / 5 < 0.6 * sum(r["loss"] for r in log[:5]) / 5
    assert set(metrics["accuracy"]) == {"synth-target"}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 30
    ours = Transformer.from_pretrained(tmp_path / "run").eval()
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "run").eval()
    model, tok = __import__("model").load(str(tmp_path / "run"))
    x = torch.tensor([tok.encode("Question: 3 + 4?", bos=True)])
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= 1e-4
    r = eval_math.evaluate(model, tok, eval_math.load_problems("synth-target", "test", limit=4), batch_size=4,
                           max_new_tokens=8)
    assert len(r["predictions"]) == 4


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_is_bit_identical(small_dir, tmp_path, method):
    common = ["--method", method, "--rank", "4", "--lr", "3e-3", "--weight-decay", "0.01"]
    train.main(_argv(small_dir, tmp_path / "straight", *common, "--max-steps", "10"))
    # interrupted after step 5 (a Ctrl-C during step 5 finishes the step and checkpoints), then resumed
    calls = []

    def ctrl_c_on_step_5(optimizer, a, k):  # a global post-step hook: every method's optimizer fires it
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGINT)

    from torch.optim.optimizer import register_optimizer_step_post_hook
    handle = register_optimizer_step_post_hook(ctrl_c_on_step_5)
    try:
        with pytest.raises(KeyboardInterrupt):
            train.main(_argv(small_dir, tmp_path / "split", *common, "--max-steps", "10"))
    finally:
        handle.remove()
    ckpt = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 5 and ckpt["method"] == method
    train.main(_argv(small_dir, tmp_path / "split", *common, "--max-steps", "10", "--resume"))
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # with a constant schedule, 5 steps then resumed to 10 equals 10 straight
    const = [*common, "--schedule", "constant", "--warmup-ratio", "0"]
    train.main(_argv(small_dir, tmp_path / "c10", *const, "--max-steps", "10"))
    train.main(_argv(small_dir, tmp_path / "c5", *const, "--max-steps", "5"))
    train.main(_argv(small_dir, tmp_path / "c5", *const, "--max-steps", "10", "--resume"))
    a, b = _weights(tmp_path / "c10"), _weights(tmp_path / "c5")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_max_steps_zero_is_the_starting_model(small_dir, tmp_path):
    train.main(_argv(small_dir, tmp_path / "run", "--method", "lora", "--rank", "4", "--max-steps", "0"))
    a, b = _weights(tmp_path / "run"), Transformer.from_pretrained(small_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_last_checkpoint(small_dir, tmp_path, capsys):
    with pytest.raises(FloatingPointError, match=r"(loss|gradient norm) is (nan|inf) at step \d+"):
        train.main(_argv(small_dir, tmp_path / "run", "--method", "full", "--max-steps", "20", "--lr", "1e6",
                         "--save-every", "1", "--max-grad-norm", "0", "--warmup-ratio", "0"))
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] >= 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def _cli_error(argv, capsys):
    """Run train.py's command line; return its one-line error."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "train.py", *argv], capture_output=True, text=True,
                       cwd=os.path.dirname(train.__file__))
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l]
    return lines[-1]


def test_bad_inputs(small_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--method", "dora"])
    assert "unknown method 'dora'; available: full, lora" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--rank", "0"])
    assert "--rank must be a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="'qkv' matches no Linear layer; the model has: down_proj, gate_proj"):
        train.main(_argv(small_dir, tmp_path / "a", "--method", "lora", "--targets", "q_proj,qkv", "--max-steps", "1"))
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        train.main(_argv(tmp_path / "no-such-model", tmp_path / "b", "--max-steps", "1"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        train.main(["--model", str(small_dir), "--data", str(empty), "--out", str(tmp_path / "c"), "--max-steps", "1"])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.main(_argv(small_dir, tmp_path / "d", "--method", "full", "--max-steps", "1", "--resume"))
    train.main(_argv(small_dir, tmp_path / "e", "--method", "full", "--max-steps", "1"))
    with pytest.raises(ValueError, match="checkpoint of method 'full', not 'lora'"):
        train.main(_argv(small_dir, tmp_path / "e", "--method", "lora", "--max-steps", "2", "--resume"))
    (tmp_path / "e" / "ckpt.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        train.main(_argv(small_dir, tmp_path / "e", "--method", "full", "--max-steps", "2", "--resume"))
    # from the command line: one line on stderr, exit status 2
    assert _cli_error(_argv(small_dir, tmp_path / "f", "--targets", "qq", "--max-steps", "1"), capsys).startswith(
        "error: target module 'qq' matches no Linear layer")
