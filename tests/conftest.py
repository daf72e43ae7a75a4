"""Shared by the test files (the suite: CPU, seeded, deterministic; every check against an independent
reference; the precision-dependent runs both as on a CPU without bf16 and on one with it: `cpu`): a tiny model, each method's prepare with test settings, batches, the SmolLM2-135M
fixtures, a small saved model (small_dir) with train.py's arguments for it, and the helpers several files
use (a random transformers model, one-line errors, claims.py runs)."""
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before `datasets` is imported: no hub retries
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository; its modules import by name
sys.path.insert(0, str(ROOT))

import itertools

import pytest
import torch

import train
from methods import METHODS
from model import ModelConfig, Transformer
from targets import LINEAR_NAMES
from tokenizer import Tokenizer
from weights import from_pretrained, load, save_pretrained


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test shapes are tiny: threads only add overhead, and on busy shared cores OpenMP threads
    that wait for each other run many times slower than one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["fp32-cpu", "bf16-cpu"])
def cpu(request, monkeypatch):
    """The two CPUs --dtype auto tells apart, on any machine: one without bf16 instructions (fp32
    throughout) and one with them (bf16 base weights and autocast; $NANOPEFT_BF16=1 makes this CPU
    answer so). A test that takes this fixture runs both ways, so every machine exercises the path a
    bf16-capable CPU or a GPU takes by default, and a bf16-capable CPU the fp32 one."""
    monkeypatch.setenv("NANOPEFT_BF16", "1" if request.param == "bf16-cpu" else "0")
    return request.param


def tiny_model(seed=0, vocab=64, scale=1.0, rope_theta=500000.0):
    """The small random LLaMA every test uses: q/o 64x64, k/v 32x64, gate/up 176x64, down 64x176.
    scale > 1 sharpens its distributions, so greedy choices are not near-ties (generation tests)."""
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=16,
                                    rope_theta=rope_theta)).init_weights(seed)
    if scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
    return model


# the methods' settings in the tests: small ranks, lr 1e-2, plain AdamW without decay
TEST_SETTINGS = {"full": {}, "lift": dict(rank=2), "rocoft": dict(rank=3, score_batches=2), "hyper": {},
                 "lora": dict(rank=8), "loraxs": dict(rank=8), "lorasb": dict(rank=8, init_samples=10)}
TEST_RUN = {"lift": dict(total_steps=1000, grad_accum=2)}  # prepare's arguments beyond the settings


def settings(method, **kw):
    """`method`'s Settings with the test values, then `kw`."""
    cls = METHODS[method][1]
    return cls(**{"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, **TEST_SETTINGS[method], **kw})


def prepare(method, model, batches=None, seed=0, **kw):
    """`method`'s prepare: the keys of `kw` that are its settings go to settings(), other methods'
    settings (rank for HyperAdapt) are dropped, the rest (LIFT's max_steps and grad_accum, LoRA-SB's
    lr_first, default lr) go to prepare itself."""
    names = set(METHODS[method][1].__dataclass_fields__)
    anyone = {f for _, cls in METHODS.values() for f in cls.__dataclass_fields__}
    s = settings(method, **{k: v for k, v in kw.items() if k in names})
    run = {**TEST_RUN.get(method, {}), **{k: v for k, v in kw.items() if k not in anyone}}
    if method == "lorasb":
        run.setdefault("lr_first", s.lr)
    opt = METHODS[method][0].prepare(model, s, batches, seed=seed, **run)
    SETTINGS_OF[id(opt)] = s
    return opt


SETTINGS_OF = {}  # id(optimizer) -> the settings prepare() made it with


def merge(method, model, opt):
    """`method`'s merge of a model prepare() attached it to, with the settings it was prepared with."""
    METHODS[method][0].merge(model, opt, SETTINGS_OF[id(opt)])


@pytest.fixture(scope="session")
def smol_file():
    from weights import gguf_path
    return gguf_path("smollm2-135m")


@pytest.fixture(scope="session")
def smol(smol_file):
    model, tok = load(smol_file)
    return model.eval(), tok


@pytest.fixture(scope="session")
def smol_ref(smol_file):
    """transformers' model and tokenizer, read from the same GGUF file by transformers itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(smol_file)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return hf, AutoTokenizer.from_pretrained(folder, gguf_file=name)


PERM = torch.randperm(64, generator=torch.Generator().manual_seed(123))


def batch_stream(seed=0, B=2, T=16, task="shift"):
    """Endless (x, y) micro-batches of random tokens < 64: task "shift", y is the next token; "prompt",
    the next token with the first 3 positions untrained (-100); "perm", a fixed permutation of x
    (a task the adapters can learn)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        if task == "shift":
            x = torch.randint(0, 64, (B, T + 1), generator=g)
            yield x[:, :-1], x[:, 1:]
        elif task == "prompt":
            x = torch.randint(0, 64, (B, T), generator=g)
            y = torch.roll(x, -1, 1)
            y[:, :3] = -100
            yield x, y
        else:
            x = torch.randint(0, 64, (B, T), generator=g)
            yield x, PERM[x]


def make_batches(n=8, B=2, T=16, seed=0, task="shift"):
    """The first n of batch_stream, as a list."""
    return list(itertools.islice(batch_stream(seed, B, T, task), n))


def targets_of(model):
    return [(n, m.weight) for n, m in model.named_modules() if n.split(".")[-1] in LINEAR_NAMES]


def run_steps(model, opt, batches, steps):
    """Plain training steps (no clipping, constant lr) on an iterator of (x, y); the losses."""
    losses = []
    for x, y in itertools.islice(batches, steps):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def modules_of(model, cls):
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


def _hf_model(seed, **kw):
    """A random transformers.LlamaForCausalLM with weights large enough that logits are O(1)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(**kw)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.08)
    return hf


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """A small random LLaMA with the byte tokenizer, saved as a Hugging Face folder."""
    d = tmp_path_factory.mktemp("small")
    cfg = ModelConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=264, multiple_of=16, rope_theta=10000.0,
                      tie_embeddings=True)
    save_pretrained(Transformer(cfg).init_weights(0), d)
    Tokenizer.bytes().save(d)
    return d


def _argv(small_dir, out, *extra):
    return ["--model", str(small_dir), "--data", "synth-target", "--train-limit", "64", "--eval-data", "none",
            "--batch-size", "4", "--seq-len", "96", "--out", str(out), "--log-every", "1", *extra]


def _weights(out):
    return from_pretrained(out).state_dict()


def _one_line_error(argv, capsys):
    """train.py's command line in this process: (exit status, its stderr lines)."""
    capsys.readouterr()
    code = train.cli(argv)
    return code, [l for l in capsys.readouterr().err.splitlines() if l.strip()]


def _claims(tmp_path, *argv):
    from experiments import claims
    return claims.main([*argv, "--out", str(tmp_path / "claims"), "--threads", "1"])


# GSM8K- and LLM-Adapters-shaped rows (test_math_data.py loads them, test_eval_math.py prompts with them)
GSM_ROWS = [
    {"question": "Natalia sold clips to 48 friends in April, and half as many in May. How many in all?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"},
    {"question": "A house costs $1,200 more than a car that costs $3,000. What do both cost?",
     "answer": "The house costs 3,000 + 1,200 = 4,200.\nBoth cost 3,000 + 4,200 = 7,200.\n#### 7,200"},
]


ADAPTER_ROWS = [
    {"instruction": "Tom has 3 apples and buys 2. How many apples?", "input": "", "output": "", "answer": "5"},
    {"instruction": "What is 2 + 2?", "input": "Answer Choices: (A) 3 (B) 4", "output": "2 + 2 = 4. The answer is B.",
     "answer": "B"},
    {"instruction": "Half of 7?", "input": "", "output": "", "answer": 3.5},
]
