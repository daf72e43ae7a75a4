"""train.py: the loop against hand-written AdamW (Loshchilov & Hutter, Alg. 2), precision from --dtype,
every method end to end with the papers' trainable counts, real-model runs exported for transformers."""
import json
import math
import re

import numpy as np
import pytest
import torch

import lorasb
import train
from conftest import _argv, _weights
from methods import METHODS
from targets import LINEAR_NAMES, find_linears
from tokenizer import Tokenizer
from weights import from_pretrained, load
import math_data


@pytest.mark.parametrize("dtype,fast,method,expect", [
    ("auto", False, "lora", (torch.float32, False)), ("auto", True, "lora", (torch.bfloat16, True)),
    ("auto", True, "full", (torch.float32, True)), ("float32", True, "lora", (torch.float32, False)),
    ("bfloat16", False, "full", (torch.float32, True)), ("bfloat16", False, "lift", (torch.bfloat16, True))])
def test_precision_from_dtype_flag(monkeypatch, dtype, fast, method, expect):
    """(stored weights, autocast): auto is bf16 frozen weights + autocast only where bf16 is native;
    bfloat16 is bf16 everywhere; full fine-tuning keeps fp32 weights under either (its trained state:
    master weights, so bf16 compute never rounds an update away)."""
    monkeypatch.setattr(train, "bf16_fast", lambda device: fast)
    args = train.parse_args(["--method", method, "--dtype", dtype])[0]
    assert train.precision(args) == expect


def test_bf16_training_on_cpu_keeps_trainables_fp32(small_dir, tmp_path, monkeypatch, capsys):
    """--dtype auto on a CPU with bf16 (faked here): the base weights load in bf16, the steps run under
    CPU autocast, LoRA's factors and their AdamW state stay fp32, and the loss is that of fp32 training
    to bf16 precision."""
    monkeypatch.setattr(train, "bf16_fast", lambda device: True)
    seen = {}
    real = METHODS["lora"][0].prepare

    def spy(model, s, batches, **kw):
        opt = real(model, s, batches, **kw)
        seen["base"] = model.layers[0].self_attn.q_proj.weight.dtype
        seen["trainable"] = {p.dtype for g in opt.param_groups for p in g["params"]}
        return opt
    monkeypatch.setattr(METHODS["lora"][0], "prepare", spy)
    runs = {}
    for dtype in ("auto", "float32"):
        runs[dtype] = train.main(_argv(small_dir, tmp_path / dtype, "--method", "lora", "--rank", "4", "--max-steps", "3",
                                       "--dtype", dtype))
        seen[dtype] = dict(seen)
    assert seen["auto"]["base"] == torch.bfloat16 and seen["auto"]["trainable"] == {torch.float32}
    assert seen["float32"]["base"] == torch.float32
    assert "weights bfloat16, bf16 autocast" in capsys.readouterr().out
    loss = {d: [json.loads(line)["loss"] for line in open(tmp_path / d / "log.jsonl") if '"loss"' in line] for d in runs}
    assert len(loss["auto"]) == 3
    np.testing.assert_allclose(loss["auto"], loss["float32"], rtol=2e-2)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "auto-bf16-cpu"])
def test_every_optimizer_tensor_is_fp32(small_dir, tmp_path, monkeypatch, method, dtype):
    """Whatever --dtype says, what trains is fp32: every tensor the optimizer updates and every tensor of
    its state (Adam's moments; LIFT's master values), after two steps; bf16 is only the frozen base
    weights (not full fine-tuning's: they are what trains) and the autocast matrix products."""
    monkeypatch.setenv("NANOPEFT_BF16", "1")
    seen = {}
    real = METHODS[method][0].prepare

    def spy(model, s, batches, **kw):
        seen["opt"] = real(model, s, batches, **kw)
        seen["base"] = model.layers[0].mlp.down_proj.weight.dtype  # (a target: read before a method wraps it)
        return seen["opt"]
    monkeypatch.setattr(METHODS[method][0], "prepare", spy)
    train.main(_argv(small_dir, tmp_path / "run", "--method", method, "--rank", "2", "--max-steps", "2",
                     "--lorasb-init-samples", "8", "--dtype", dtype.removesuffix("-bf16-cpu")))
    opt = seen["opt"]
    params = [p for g in opt.param_groups for p in g["params"]]
    state = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.is_floating_point()]
    assert params and all(p.dtype == torch.float32 for p in params)
    assert len(state) >= 2 * len(params) and all(t.dtype == torch.float32 for t in state)
    assert seen["base"] == (torch.float32 if dtype == "float32" or method == "full" else torch.bfloat16)


@pytest.mark.parametrize("method", ["lora", "lift"])
def test_train_on_gguf_exports_a_complete_hf_model(smol_file, smol, tmp_path, method, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "run"
    extra = (["--eval-data", "synth-target", "--eval-limit", "2", "--max-new-tokens", "4", "--forget-prompts", "2"]
             if method == "lora" else ["--eval-data", "none"])
    metrics = train.main(["--model", smol_file, "--method", method, "--rank", "2", "--max-steps", "2",
                          "--batch-size", "2", "--train-limit", "8", "--seq-len", "64", "--lr", "1e-3",
                          "--out", str(out), *extra])
    assert metrics["steps"] == 2
    ours, tok = load(str(out))
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "Tom has 3 apples and buys 4 more. How many apples?"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    x = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        a, b = ours.eval()(x), hf(x).logits
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    base = smol[0]
    assert not torch.equal(base.layers[0].self_attn.q_proj.weight, ours.layers[0].self_attn.q_proj.weight)
    if method == "lora":  # the forgetting measure is printed beside accuracy, and its parts add up
        f = metrics["forgetting"]
        assert f["texts"] == 2 and f["tokens"] > 0 and f["loss_rise"] == pytest.approx(f["loss"] - f["base_loss"])
        assert f["kl"] > 0 and 0 <= f["agreement"] <= 1
        assert "forgetting" in capsys.readouterr().out and metrics["accuracy_before"] is not None


def _handwritten_adamw(small_dir, steps, lr, wd, clip, betas, eps, warmup, bf16):
    """Full fine-tuning written out by hand: AdamW (Loshchilov & Hutter, Alg. 2) over fp32 weights, two
    micro-batches of 4 per step whose target tokens weigh the same, global-norm clipping, warmup then
    linear decay; the forward under bf16 autocast when `bf16`. Returns the state dict."""
    from contextlib import nullcontext
    model = from_pretrained(small_dir)
    tok = Tokenizer.bytes()
    examples, _ = train.tokenize(math_data.load_problems("synth-target", "train", limit=64), tok, 96)
    params = dict(model.named_parameters())
    m = {k: torch.zeros_like(p) for k, p in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    (b1, b2), autocast = betas, torch.autocast("cpu", torch.bfloat16) if bf16 else nullcontext()
    for t in range(steps):
        lr_t = lr * ((t + 1) / warmup if t < warmup else 1 - (t - warmup) / (steps - warmup))
        micro = [train.collate(train.micro_batch(examples, 2 * t + j, 4, 0), tok.pad_id, "cpu") for j in range(2)]
        n = sum(int((y != -100).sum()) for _, y in micro)  # the step's target tokens: each weighs 1/n
        for x, y in micro:
            with autocast:
                loss = model(x, y)[1]
            (loss * (int((y != -100).sum()) / n)).backward()
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
    return model.state_dict()


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_full_ft_matches_handwritten_adamw(small_dir, tmp_path, dtype, cpu):
    """Five steps of `--method full` against AdamW written out by hand, with the same batches,
    token-weighted gradient accumulation, clipping, warmup and linear decay. On a CPU without bf16
    instructions --dtype auto is fp32 throughout; on one with them (the `cpu` fixture), and with
    --dtype bfloat16 anywhere, it is bf16 autocast over fp32 master weights and fp32 Adam state: the
    run follows the bf16-autocast reference (to bf16 noise: 1/20 of one step) and is closer to it
    than to the fp32 one; bf16 master weights would round most updates of lr 1e-3 away."""
    hp = dict(steps=5, lr=1e-3, wd=0.1, clip=0.5, betas=(0.9, 0.95), eps=1e-6, warmup=math.ceil(0.4 * 5))
    train.main(_argv(small_dir, tmp_path / "run", "--method", "full", "--max-steps", "5", "--lr", "1e-3",
                     "--weight-decay", "0.1", "--max-grad-norm", "0.5", "--betas", "0.9,0.95", "--eps", "1e-6",
                     "--warmup-ratio", "0.4", "--grad-accum", "2", "--dtype", dtype))
    got = _weights(tmp_path / "run")
    base = _weights(small_dir)
    bf16 = dtype == "bfloat16" or cpu == "bf16-cpu"
    ref = _handwritten_adamw(small_dir, bf16=bf16, **hp)
    for k, p in ref.items():
        assert got[k].dtype == torch.float32, k
        assert torch.allclose(got[k], p, atol=0.05 * hp["lr"] if bf16 else 1e-6, rtol=0), k
    assert (got["layers.0.mlp.up_proj.weight"] != base["layers.0.mlp.up_proj.weight"]).any()
    if bf16:
        fp32 = _handwritten_adamw(small_dir, bf16=False, **hp)
        dist = lambda a: sum((got[k] - a[k]).abs().sum() for k in a)
        assert dist(ref) < dist(fp32) / 2
        changed = sum(int((got[k] != base[k]).sum()) for k in base if k != "lm_head.weight")
        assert changed > 0.99 * sum(v.numel() for k, v in base.items() if k != "lm_head.weight")


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
    ours = from_pretrained(tmp_path / "run").eval()
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "run").eval()
    model, tok = load(str(tmp_path / "run"))
    x = torch.tensor([tok.encode("Question: 3 + 4?", bos=True)])
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= 1e-4
    r = eval_math.evaluate(model, tok, math_data.load_problems("synth-target", "test", limit=4), batch_size=4,
                           max_new_tokens=8)
    assert len(r["predictions"]) == 4


def _expected_trainable(method, r, shapes, n_model):
    """Each paper's count per n_out x n_in target (README's table), summed over the targets."""
    per = {"lora": lambda o, i: r * (i + o), "lift": lambda o, i: min(r * (i + o), i * o),
           "rocoft-row": lambda o, i: r * i, "rocoft-column": lambda o, i: r * o,
           "loraxs": lambda o, i: r * r, "lorasb": lambda o, i: r * r, "hyper": lambda o, i: i + o}
    return n_model if method == "full" else sum(per[method](o, i) for o, i in shapes)


@pytest.mark.parametrize("method", ["full", "lora", "lift", "rocoft-row", "rocoft-column", "loraxs", "lorasb", "hyper"])
def test_every_method_through_train_py(small_dir, tmp_path, capsys, method, cpu):
    """The seam end to end, with --dtype auto on a CPU without and with bf16: train.py's table shows
    the paper's count, training changes the model, the merged folder has the base model's tensors only."""
    name, *mode = method.split("-")
    flags = ["--rocoft-mode", mode[0]] if mode else []
    metrics = train.main(_argv(small_dir, tmp_path / "run", "--method", name, "--rank", "4", "--max-steps", "3",
                               "--lr", "1e-2", "--lorasb-init-samples", "8", *flags))
    base = from_pretrained(small_dir)
    shapes = [tuple(m.weight.shape) for _, m in find_linears(base, LINEAR_NAMES)]
    expected = _expected_trainable(method, 4, shapes, sum(p.numel() for p in base.parameters()))
    assert metrics["trainable"] == expected
    assert f"{expected:,}" in capsys.readouterr().out  # the table's total row
    merged = _weights(tmp_path / "run")
    assert set(merged) == set(base.state_dict())
    assert any(not torch.equal(merged[k], v) for k, v in base.state_dict().items())


def test_eval_every_logs_the_curve_and_protocol_is_recorded(small_dir, tmp_path, capsys):
    """--eval-every N writes each accuracy into log.jsonl (the learn/forget path claims.py reads);
    --protocol picks the scoring and metrics.json says which."""
    out = tmp_path / "run"
    metrics = train.main(_argv(small_dir, out, "--method", "hyper", "--max-steps", "2", "--eval-every", "1",
                               "--eval-data", "synth-target,synth-source", "--eval-limit", "2", "--max-new-tokens", "4",
                               "--forget-prompts", "0", "--protocol", "llm-adapters"))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "accuracy" in r] == [1]            # not at the end: metrics has that
    assert set(next(r for r in log if "accuracy" in r)["accuracy"]) == {"synth-target", "synth-source"}
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
    assert metrics["protocol"] == "llm-adapters" and metrics["num_beams"] == 4
    assert "llm-adapters scoring, beam search, 4 beams)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="invalid choice: 'beam'"):
        train.parse_args(_argv(small_dir, out, "--protocol", "beam"))


def test_truncation_keeps_inputs_and_targets_aligned(small_dir, tmp_path, capsys):
    """--seq-len shorter than the prompts: every example is cut, counted, and still trains."""
    import eval_math
    problems = math_data.load_problems("synth-target", "train", limit=4)
    for seq_len in (8, 80):
        examples, truncated = train.tokenize(problems, Tokenizer.bytes(), seq_len)
        assert all(len(x) == len(y) <= seq_len for x, y in examples)
        assert truncated == sum(len(eval_math.format_prompt(p) + eval_math.format_target(p)) + 2 > seq_len + 1
                                for p in problems)
    with pytest.raises(ValueError, match="--seq-len 8 leaves no solution tokens in any example"):
        train.main(_argv(small_dir, tmp_path / "a", "--method", "full", "--max-steps", "1", "--seq-len", "8"))
    train.main(_argv(small_dir, tmp_path / "b", "--method", "full", "--max-steps", "2", "--seq-len", "80"))
    out = capsys.readouterr().out
    assert re.search(r"note: [1-9]\d* of 64 examples were longer than --seq-len 80", out)
    assert "loss nan" not in out


def test_max_steps_zero_is_the_starting_model(small_dir, tmp_path):
    train.main(_argv(small_dir, tmp_path / "run", "--method", "lora", "--rank", "4", "--max-steps", "0"))
    a, b = _weights(tmp_path / "run"), from_pretrained(small_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lorasb_gradient_estimate_runs_with_activation_checkpointing(small_dir, tmp_path, monkeypatch):
    """--grad-checkpoint is set before prepare, so LoRA-SB's gradient pass is checkpointed too."""
    import torch.utils.checkpoint as ckpt
    calls, inside = [], []
    real_checkpoint, real_grads = ckpt.checkpoint, lorasb.first_step_gradients
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))

    def counted(*a, **k):
        n = len(calls)
        out = real_grads(*a, **k)
        inside.append(len(calls) - n)
        return out
    monkeypatch.setattr(lorasb, "first_step_gradients", counted)
    train.main(_argv(small_dir, tmp_path / "run", "--method", "lorasb", "--rank", "2", "--max-steps", "1",
                     "--lorasb-init-samples", "8", "--grad-checkpoint"))
    assert inside and inside[0] > 0
