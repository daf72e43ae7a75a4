"""Bad input to the data, evaluation and model-loading side (issue #30): every case is refused, or
bounded, in one line that names the file / row / flag and the value, with the right exception type
(eval_math's command line: exit status 2, one `error:` line, no usage block, no traceback), before
anything huge is allocated, and before the model loads wherever the model is not needed to judge."""
import json
import pickle
import re
import time

import pytest
import torch

import eval_math as E
import math_data
import weights
from conftest import tiny_model
from generate import beam_search, generate
from model import ModelConfig, Transformer
from tokenizer import Tokenizer
from weights import from_pretrained, load, save_pretrained

GSM = {"question": "Tom has 3 pens and buys 4. How many pens?", "answer": "3 + 4 = 7.\n#### 7"}
ADAPTER = {"instruction": "Tom has 3 pens and buys 4. How many pens?", "input": "", "output": "", "answer": "7"}


def one_line(e) -> str:
    text = str(e.value if hasattr(e, "value") else e)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def write(path, rows, jsonl=None):
    jsonl = path.suffix == ".jsonl" if jsonl is None else jsonl
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if jsonl else json.dumps(rows))
    return path

# -----------------------------------------------------------------------------
# limits: bounded by what exists


@pytest.mark.parametrize("split,size", [("test", 1907), ("train", 29197)])
def test_synthetic_limit_above_what_exists_means_all_and_ends(split, size, capsys):
    t = time.time()
    got = math_data.load_problems("synth-source", split, limit=10**12)
    assert time.time() - t < 5 and len(got) == len({p["question"] for p in got}) == size
    assert len(math_data.synthetic_space("source")) == 31104 and len(math_data.synthetic_space("target")) == 18944
    assert got[:300] == math_data.load_problems("synth-source", split, limit=300)   # the first k are the list for k
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(rf"note: limit 1000000000000 is more than synth-source \({size}\) has", err[0])


def test_file_limit_above_its_size_means_all(tmp_path, capsys):
    f = write(tmp_path / "two.json", [ADAPTER, ADAPTER])
    assert len(math_data.load_problems(str(f), limit=10**12)) == 2
    assert "note: limit 1000000000000 is more than two (2) has" in capsys.readouterr().err
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match=r"limit=.* must be a positive number of problems") as e:
            math_data.load_problems(str(f), limit=bad)
        one_line(e)

# -----------------------------------------------------------------------------
# decoding: new tokens and beams against the context and memory, before anything is allocated


@pytest.mark.parametrize("args,says", [
    ((512, 10**9, None, 32, "nanopeft"), "--max-new-tokens 1000000000 is not allowed: .* must be < 512"),
    ((512, 512, None, 32, "nanopeft"), "--max-new-tokens 512 is not allowed"),
    ((512, 0, None, 32, "nanopeft"), "--max-new-tokens 0 is not allowed: .* >= 1"),
    ((512, None, 10**6, 32, "nanopeft"), "--num-beams 1000000 is not allowed: at most 64"),
    ((512, None, 0, 32, "nanopeft"), "--num-beams 0 is not allowed"),
    ((512, None, None, 0, "nanopeft"), "--eval-batch-size 0 is not allowed"),
    ((512, 8.5, None, 1, "nanopeft"), "--max-new-tokens 8.5 is not allowed"),
    ((512, None, None, 1, "greedy"), "unknown protocol 'greedy'"),
])
def test_check_decoding(args, says):
    with pytest.raises(ValueError, match=says) as e:
        E.check_decoding(*args)
    one_line(e)
    E.check_decoding(512, 511, 64, 1, "lift-authors")


def test_generate_refuses_what_the_context_or_memory_cannot_hold(monkeypatch):
    import generate as G
    model, t = tiny_model(), time.time()
    model.config.max_seq_len = 64
    monkeypatch.setattr(G, "free_memory", lambda device: 2**30)   # 1 GiB free, on any machine
    for call, says in ((lambda: generate(model, [[1, 2, 3]], 10**9), "3 tokens plus 1000000000 new tokens is more than the model's 64"),
                       (lambda: generate(model, [[1] * 60], 5), "60 tokens plus 5 new tokens"),
                       (lambda: beam_search(model, [[1, 2]], 50, num_beams=10**6), r"needs ~\d+.\d GiB .* more than the 1.0 GiB"),
                       (lambda: generate(model, [[1, 2]], 4, num_beams=10**6), r"1 prompts x 1000000 beams"),
                       (lambda: generate(model, [[1, 2]] * 10**5, 60), r"100000 prompts x 1 beams"),
                       (lambda: generate(model, [], 4), "at least one prompt"),
                       (lambda: generate(model, [[1], []], 4), "no empty prompt"),
                       (lambda: generate(model, [[1]], 0), "max_new_tokens=0")):
        with pytest.raises(ValueError, match=says) as e:
            call()
        one_line(e)
    assert time.time() - t < 5 and model.layers[0].self_attn.cache is None
    assert len(generate(model, [[1, 2]] * 100, 8)) == 100                # what fits still runs


def test_evaluate_cuts_long_prompts_from_the_left_and_bounds_the_default(capsys):
    """A prompt longer than the context less the new tokens loses its beginning (PROMPT_RULE), BOS kept;
    the default length is at most half the context: the model never sees more than its positions."""
    tok = Tokenizer.bytes()
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=264, multiple_of=16, max_seq_len=96)).init_weights(0)
    long = dict(question="x" * 5000 + " What is 3 + 4?", answer="7", solution=None, dataset="long", template="qa")
    short = dict(long, question="What is 3 + 4?")
    seen = []
    real = E.generate

    def spy(model, prompts, n, *a, **k):
        seen.append((prompts, n))
        return real(model, prompts, n, *a, **k)
    E.generate, t = spy, time.time()
    try:
        m = E.evaluate(model, tok, [long, short], batch_size=2, progress=False)
    finally:
        E.generate = real
    assert m["max_new_tokens"] == 48 and time.time() - t < 10
    prompts = seen[0][0]
    assert max(map(len, prompts)) == 48 and all(p[0] == tok.bos_id for p in prompts)
    assert tok.decode(prompts[0]).endswith("x What is 3 + 4?\nAnswer:") and len(prompts[1]) == 33
    err = capsys.readouterr().err
    assert "more than half the model's 96 positions; decoding 48" in err
    assert "note: 1 of 2 long prompts are longer than 48 tokens" in err and E.PROMPT_RULE in err
    assert E.cut_left([9, 1, 2, 3, 4], 3, 9) == [9, 3, 4] and E.cut_left([1, 2, 3], 2) == [2, 3]

# -----------------------------------------------------------------------------
# data: checked where it is read


BAD_ROWS = [  # (rows, file suffix, what the one line says)
    ([GSM, {"question": "How many?", "answer": "So twelve.\n#### twelve"}], ".jsonl",
     r"row 1 of .*bad\.jsonl: the final answer 'twelve' is not a number nor an option letter A-E"),
    ([GSM, {"question": "How many?", "answer": "So twelve.\n#### twelve"}], ".json", r"row 1 .*'twelve' is not a number"),
    ([dict(ADAPTER, answer="twelve")], ".json", r"row 0 of .*bad\.json: the final answer 'twelve' is not a number"),
    ([dict(ADAPTER, answer="F")], ".json", r"the final answer 'F' is not a number nor an option letter A-E"),
    ([dict(ADAPTER, answer="nan")], ".json", r"the final answer 'nan' is not a number"),
    ([dict(ADAPTER, answer=True)], ".json", r"the final answer True is not a number"),
    ([dict(ADAPTER, answer=[7])], ".json", r"the final answer \[7\] is not a number"),
    ([{"question": 12, "answer": "#### 7"}], ".json", r"row 0 of .*bad\.json: 'question' must be text, not int 12"),
    ([GSM, {"question": 12, "answer": "#### 7"}], ".json", r"row 1 .*'question' must be text, not int 12"),
    ([{"question": 12, "answer": "#### 7"}], ".jsonl", r"row 0 .*'question' must be text, not int 12"),
    ([dict(ADAPTER, instruction=["a", "b"])], ".json", r"row 0 .*'instruction' must be text, not list \['a', 'b'\]"),
    ([dict(ADAPTER, input=3)], ".json", r"row 0 .*'input' must be text, not int 3"),
    ([dict(ADAPTER, output={"a": 1})], ".json", r"row 0 .*'output' must be text, not dict"),
    ([{"question": "q", "answer": 7}], ".json", r"row 0 .*'answer' must be text, not int 7"),
    ([dict(GSM, question="How many? " * 32000)], ".jsonl", r"row 0 .*'question' has 320,000 characters; at most 32,768"),
    ([ADAPTER, "just a string"], ".json", r"row 1 of .*bad\.json is str 'just a string', not an object"),
    ([dict(GSM, question="   ")], ".json", r"row 0 of .*: its question is empty"),
    ([GSM, [1, 2]], ".jsonl", r"row 1 of .*bad\.jsonl is list \[1, 2\], not an object"),
    ([GSM, {"question": "q", "answer": "#### 1"}, GSM], ".jsonl", None),  # then line 2 broken below
]


@pytest.mark.parametrize("rows,suffix,says", BAD_ROWS)
def test_bad_rows_are_refused_naming_file_row_and_value(tmp_path, rows, suffix, says):
    f = write(tmp_path / f"bad{suffix}", rows)
    if says is None:
        f.write_text(f.read_text().replace('"q"', '"q', 1))
        says = r"line 2 of .*bad\.jsonl' is not JSON \(Expecting ',' delimiter at column 19\)"
    t = time.time()
    with pytest.raises(ValueError, match=says) as e:
        math_data.load_problems(str(f), "train")
    assert len(one_line(e)) < 400 and time.time() - t < 5


def test_good_answers_pass():
    rows = [dict(ADAPTER, answer=a) for a in ("7", "-3.5", "1,000", 12, 2.5, "B")]
    got = math_data._to_problems(rows, "f.json", "f")
    assert [p["answer"] for p in got] == ["7", "-3.5", "1000", "12", "2.5", "B"]


def test_a_missing_set_is_named(tmp_path, capsys):
    root = tmp_path / "dataset"
    write(root / "AddSub" / "test.json", [ADAPTER])
    write(root / "SVAMP" / "train.json", [ADAPTER])
    with pytest.raises(ValueError, match=r"1 of its 2 sets have no test\.json/\.jsonl: SVAMP \(train\.json\)") as e:
        math_data.load_problems(str(root), "test")
    one_line(e)
    with pytest.raises(ValueError, match=r"--data: 2 of 3 datasets are missing: 'MultiArith', 'svamp' \(unknown dataset") as e:
        math_data.load_all("AddSub,MultiArith,svamp", data_dir=str(root))
    one_line(e)
    with pytest.raises(ValueError, match=r"--data: split 'test' does not exist for 'svamp'.*splits: train"):
        math_data.load_all("AddSub,svamp", data_dir=str(root))
    with pytest.raises(ValueError, match=r"names under '.*nowhere' \(none, which is no folder here\)"):
        math_data.load_all("svamp", data_dir=str(tmp_path / "nowhere"))
    for data, says in (("", "--data '' names no dataset"), (" , ", "names no dataset"),
                       ("synth-source,,synth-target", "has an empty name between its commas"),
                       ("synth-source,synth-source", "names 'synth-source' twice")):
        with pytest.raises(ValueError, match=says):
            math_data.load_all(data, limit=2)
    with pytest.raises(ValueError, match="'AddSub' and '.*AddSub/test.json' both give a dataset named 'addsub'"):
        math_data.load_all(f"AddSub,{root / 'AddSub' / 'test.json'}", data_dir=str(root))
    assert len(math_data.load_all("AddSub,synth-source", limit=2, data_dir=str(root))) == 3


def test_permission_denied_is_not_reported_missing(tmp_path, monkeypatch):
    """EACCES keeps its reason (this may run as root, so the errors are injected)."""
    f = write(tmp_path / "locked.json", [ADAPTER])
    real = type(f).read_text

    def denied(self, *a, **k):
        if self.name == "locked.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)
    monkeypatch.setattr(type(f), "read_text", denied)
    with pytest.raises(PermissionError, match="Permission denied"):
        math_data.load_problems(str(f))
    real_stat = weights.os.stat

    def stat(p, *a, **k):
        if "locked-model" in str(p):
            raise PermissionError(13, "Permission denied", str(p))
        return real_stat(p, *a, **k)
    monkeypatch.setattr(weights.os, "stat", stat)
    for call in (lambda: load(str(tmp_path / "locked-model")), lambda: from_pretrained(tmp_path / "locked-model")):
        with pytest.raises(PermissionError, match="Permission denied"):
            call()

# -----------------------------------------------------------------------------
# model files: one line naming the file, the key and what is expected


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    save_pretrained(tiny_model(rope_theta=10000.0), d)
    Tokenizer.bytes().save(d)
    return d, json.loads((d / "config.json").read_text())


@pytest.mark.parametrize("change,says", [
    (dict(hidden_size=None), r"config\.json' has no 'hidden_size': it needs a positive integer"),
    (dict(num_attention_heads=None), r"has no 'num_attention_heads'"),
    (dict(hidden_size="192"), r"config\.json': 'hidden_size' is '192' \(str\); expected a positive integer"),
    (dict(num_hidden_layers=0), r"'num_hidden_layers' is 0 \(int\); expected a positive integer"),
    (dict(vocab_size=-5), r"'vocab_size' is -5"),
    (dict(rms_norm_eps="tiny"), r"'rms_norm_eps' is 'tiny' \(str\); expected a positive number"),
    (dict(tie_word_embeddings="yes"), r"'tie_word_embeddings' is 'yes' \(str\); expected true or false"),
    (dict(rope_scaling=[1, 2]), r"'rope_scaling' is \[1, 2\] \(list\); expected an object"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8}), r"has no 'low_freq_factor'"),
    (dict(num_attention_heads=3, head_dim=16), r"config\.json': n_heads=3 is not a multiple of n_kv_heads=2"),
    (dict(num_attention_heads=4, num_key_value_heads=4, head_dim=None, hidden_size=66),
     r"dim=66 is not a multiple of n_heads=4"),
])
def test_malformed_config_json(saved, tmp_path, change, says):
    d, cfg = saved
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(d / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({k: v for k, v in {**cfg, **change}.items() if v is not None}))
    with pytest.raises(ValueError, match=says) as e:
        from_pretrained(folder)
    one_line(e)


def test_malformed_index_params_and_pth(saved, tmp_path):
    d, cfg = saved
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for index, says in (({}, "has no 'weight_map'"), ({"weight_map": []}, "has no 'weight_map'"),
                        ({"weight_map": {"a": "../../etc/passwd"}}, r": 'weight_map' names shard '../../etc/passwd'"),
                        ("[]", "has no 'weight_map'")):
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json'( |: )" + says.lstrip(": ")) as e:
            from_pretrained(tmp_path)
        one_line(e)
    meta = tmp_path / "meta"
    meta.mkdir()
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64, "multiple_of": 16}
    for change, says in ((dict(n_layers=None), r"params\.json' has no 'n_layers'"),
                         (dict(vocab_size=-1), r"'vocab_size' is -1"),
                         (dict(use_scaled_rope="true"), r"'use_scaled_rope' is 'true' \(str\); expected true or false")):
        (meta / "params.json").write_text(json.dumps({k: v for k, v in {**params, **change}.items() if v is not None}))
        with pytest.raises(ValueError, match=says) as e:
            from_pretrained(meta)
        one_line(e)

    class Evil:  # a pickle that would run code when loaded
        def __reduce__(self):
            return (print, ("pwned",))
    (meta / "params.json").write_text(json.dumps(params))
    torch.save({"tok_embeddings.weight": Evil()}, meta / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth' is not a plain torch.save file of tensors "
                                         r"\(torch.load with weights_only=True refused it: UnpicklingError") as e:
        from_pretrained(meta)
    one_line(e)
    (meta / "consolidated.00.pth").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth' is not a plain torch.save file") as e:
        from_pretrained(meta)
    one_line(e)


def test_gguf_without_its_llama_keys(tmp_path):
    import gguf
    import numpy as np
    for skip, says in (("embedding_length", r"has no 'llama\.embedding_length': it needs a positive integer"),
                       ("block_count", r"has no 'llama\.block_count'"), ("head_count", r"has no 'llama\.attention\.head_count'")):
        path = tmp_path / f"no-{skip}.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        for name, add in (("block_count", lambda: w.add_block_count(1)), ("embedding_length", lambda: w.add_embedding_length(8)),
                          ("feed_forward_length", lambda: w.add_feed_forward_length(16)), ("head_count", lambda: w.add_head_count(2))):
            if name != skip:
                add()
        w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(ValueError, match=says) as e:
            load(str(path))
        one_line(e)
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.eos_token_id": 1}
    for extra, says in (({}, "has no tokenizer.ggml.tokens"), ({"tokenizer.ggml.tokens": [1, 2]}, "has no tokenizer.ggml.tokens"),
                        ({"tokenizer.ggml.tokens": ["a"]}, r"tokenizer.ggml.eos_token_id is 1; expected a token id 0..0")):
        with pytest.raises(ValueError, match=says) as e:
            Tokenizer.from_gguf({**fields, **extra}, "m.gguf")
        one_line(e)


# -----------------------------------------------------------------------------
# eval_math.py's command line


def cli(argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        E.main(argv)
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip() and not l.startswith("note:")]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert "usage:" not in err[0] and "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("flags,says", [
    (["--limit", "1e9"], "argument --limit: invalid int value: '1e9'"),
    (["--max-new-tokens", "1e9"], "argument --max-new-tokens: invalid int value: '1e9'"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--protocol", "greedy"], "argument --protocol: invalid choice: 'greedy'"),
    (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (["--split", "validation"], "split 'validation' does not exist for synth-source; splits: train, test"),
    (["--num-beams", "0"], "--num-beams 0 is not allowed: it must be >= 1"),
    (["--num-beams", "1000000"], "--num-beams 1000000 is not allowed: at most 64"),
    (["--batch-size", "0"], "--batch-size 0 is not allowed"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0 is not allowed"),
    (["--limit", "0"], "--limit 0 is not allowed"),
    (["--seed", "-1"], "--seed -1 is not allowed"),
    (["--device", "potato"], "--device 'potato' is not a device"),
    (["--device", "meta"], "--device meta: not supported"),
    (["--data", ""], "--data '' names no dataset"),
    (["--data", "synth-source,,gsm8k"], "has an empty name between its commas"),
    (["--data", "nosuch1,nosuch2"], "--data: 2 of 2 datasets are missing: 'nosuch1', 'nosuch2'"),
    (["--data", "synth-source,synth-source"], "names 'synth-source' twice"),
    (["--out", ""], "--out '' names no folder"),
])
def test_cli_bad_flags_before_the_model_loads(flags, says, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(E, "load", lambda *a, **k: pytest.fail("the model was loaded before the flags were checked"))
    line = cli(["--out", str(tmp_path / "ev"), "--device", "cpu", *flags], capsys)
    assert says in line, line


def test_cli_after_the_model_loads(small_dir, tmp_path, capsys):
    t = time.time()
    base = ["--model", str(small_dir), "--data", "synth-target", "--limit", "2", "--out", str(tmp_path / "ev"),
            "--device", "cpu"]
    line = cli([*base, "--max-new-tokens", str(10**9)], capsys)
    assert "--max-new-tokens 1000000000 is not allowed: the model has 8192 positions" in line and time.time() - t < 10
    nan = tmp_path / "nan"
    model = from_pretrained(small_dir)
    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    save_pretrained(model, nan)
    Tokenizer.bytes().save(nan)
    line = cli([*base[:1], str(nan), *base[2:]], capsys)
    assert "hold non-finite values (nan or inf) in layers.1.mlp.up_proj.weight" in line
    line = cli(["--model", str(tmp_path / "nope"), "--data", "synth-target", "--out", str(tmp_path / "ev"),
                "--device", "cpu"], capsys)
    assert "is neither a preset" in line


def test_configs_the_weights_cannot_back_are_refused_before_building(saved, tmp_path):
    d, cfg = saved
    for change, says in ((dict(num_hidden_layers=10**9), "has 1000000000 layers, its weights 2"),
                         (dict(max_position_embeddings=1), None)):
        folder = tmp_path / f"m{len(change)}{list(change.values())[0]}"
        folder.mkdir()
        (folder / "model.safetensors").symlink_to(d / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({**cfg, **change}))
        t = time.time()
        if says:
            with pytest.raises(ValueError, match=says) as e:
                from_pretrained(folder)
            assert time.time() - t < 5 and one_line(e)
        else:  # a context of one position: loads, and decoding is refused
            model = from_pretrained(folder)
            with pytest.raises(ValueError, match=r"the model has 1 position\(s\): no room for a prompt"):
                E.check_decoding(model.config.max_seq_len, None, None, 1, "nanopeft")
    sd = {k: v for k, v in from_pretrained(d).state_dict().items()}
    sd["norm.weight"] = sd["norm.weight"].long()
    with pytest.raises(ValueError, match=r"tensor 'norm.weight' in 'x' has dtype int64; weights are floating point"):
        weights.from_state_dict(from_pretrained(d).config, sd, "x")


@pytest.mark.parametrize("tj,says", [
    ({"model": {"type": "BPE", "vocab": {"a": 0}}, "added_tokens": [{"id": 1}], "decoder": {"type": "ByteLevel"}},
     r"tokenizer\.json' is malformed \(KeyError: 'content'\)"),
    ({"model": {"type": "BPE", "vocab": {"a": 0}}, "pre_tokenizer": [1], "decoder": {"type": "ByteLevel"}},
     r"tokenizer\.json' is malformed \(AttributeError"),
    ({"model": {"type": "BPE", "vocab": ["a"]}, "decoder": {"type": "ByteLevel"},
      "added_tokens": [{"id": 0, "content": "</s>"}]}, r"the vocabulary must map token strings to ids"),
    ([1], r"is not a readable tokenizer\.json"),
])
def test_malformed_tokenizer_json(tmp_path, tj, says):
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ValueError, match=says) as e:
        Tokenizer.for_model(tmp_path)
    one_line(e)


def test_save_over_a_folder_with_a_foreign_index_deletes_nothing_outside(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "m"
    out.mkdir()
    for index in ('{"weight_map": {"x": "../victim"}}', "[1, 2]", "not json"):
        (out / "model.safetensors.index.json").write_text(index)
        save_pretrained(tiny_model(), out)
        assert victim.read_bytes() == b"precious" and not (out / "model.safetensors.index.json").exists()
        assert from_pretrained(out) is not None


def test_a_preset_without_a_tokenizer_is_refused_before_it_is_built():
    t = time.time()
    with pytest.raises(ValueError, match="preset 'llama-3.1-8b' has no built-in tokenizer"):
        load("llama-3.1-8b")
    assert time.time() - t < 1
