"""math_data.py: every loader on files written here (GSM8K .jsonl, the hub path, LLM-Adapters .json,
folders and names), rows checked where they are read, and the synthetic problems."""
import json
import re
import time

import pytest

import eval_math as E
import math_data
from conftest import ADAPTER_ROWS, GSM_ROWS


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gsm8k_jsonl(tmp_path):
    """A GSM8K .jsonl gives the rows datasets' json builder reads from it (the independent reference)."""
    import datasets
    f = write_jsonl(tmp_path / "mygsm.jsonl", GSM_ROWS)
    f.write_text(f.read_text().replace("\n", "\n\n", 1))       # a blank line is skipped
    ps = math_data.load_problems(str(f))
    assert [p["raw"] for p in ps] == list(datasets.load_dataset("json", data_files=str(f), split="train"))
    assert [p["answer"] for p in ps] == ["72", "7200"] and {p["dataset"] for p in ps} == {"mygsm"}
    assert ps[0]["question"] == GSM_ROWS[0]["question"]
    assert ps[0]["solution"] == "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\n#### 72"
    assert E.format_target(ps[0]).endswith("#### 72")
    assert E.format_prompt(ps[0]) == E.ALPACA.format(instruction=GSM_ROWS[0]["question"])
    assert math_data.load_problems(str(f), limit=1) == ps[:1]


def test_gsm8k_hub_path_with_local_file(tmp_path, monkeypatch):
    """The hub code path (`gsm8k`) with datasets.load_dataset answering from a local file of
    the same shape: same hub id, config and split asked for, same problems as the jsonl."""
    import datasets
    local, real, calls = write_jsonl(tmp_path / "test.jsonl", GSM_ROWS), datasets.load_dataset, []

    def fake(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        return real("json", data_files=str(local), split="train")
    monkeypatch.setattr(datasets, "load_dataset", fake)
    ps = math_data.load_problems("gsm8k", "test")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert [{**p, "dataset": "x"} for p in ps] == [{**p, "dataset": "x"} for p in math_data.load_problems(str(local))]
    assert {p["dataset"] for p in ps} == {"gsm8k"}


def test_gsm8k_hub_offline_is_a_clear_error(monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    t = time.time()
    with pytest.raises(ConnectionError, match=r"openai/gsm8k.*local GSM8K-format \.jsonl") as e:
        math_data.load_problems("gsm8k", "test")
    assert "\n" not in str(e.value) and time.time() - t < 10


def test_llm_adapters_json(tmp_path):
    f = tmp_path / "mix.json"
    f.write_text(json.dumps(ADAPTER_ROWS))
    ps = math_data.load_problems(str(f))
    assert [p["answer"] for p in ps] == ["5", "B", "3.5"] and ps[0]["solution"] is None
    assert E.format_prompt(ps[0]) == E.ALPACA.format(instruction=ADAPTER_ROWS[0]["instruction"])
    assert "### Input:\nAnswer Choices: (A) 3 (B) 4\n\n### Response:\n" in E.format_prompt(ps[1])
    assert E.format_target(ps[0]) == "The answer is 5" and E.format_target(ps[1]) == ADAPTER_ROWS[1]["output"]
    assert E.is_choice(ps[1]) and not E.is_choice(ps[0])


def test_folder_of_datasets_and_names(tmp_path):
    root = tmp_path / "dataset"
    for name, rows in (("AQuA", ADAPTER_ROWS[1:2]), ("SVAMP", ADAPTER_ROWS[:1] * 3), ("gsm8k", ADAPTER_ROWS[2:])):
        (root / name).mkdir(parents=True)
        (root / name / "test.json").write_text(json.dumps(rows))
    (root / "math_10k.json").write_text(json.dumps(ADAPTER_ROWS))
    ps = math_data.load_problems(str(root), "test")
    assert [p["dataset"] for p in ps] == ["aqua", "gsm8k", "svamp", "svamp", "svamp"]
    assert len(math_data.load_problems(str(root), limit=2)) == 4       # limit is per dataset
    assert [p["dataset"] for p in math_data.load_problems("svamp", data_dir=str(root))] == ["svamp"] * 3
    assert len(math_data.load_problems("MATH-10K", data_dir=str(root))) == 3
    with pytest.raises(ValueError, match=r"split 'train' does not exist .* it has: test"):
        math_data.load_problems(str(root), "train")
    with pytest.raises(ValueError, match=r"split 'train' does not exist for 'svamp'.*splits: test"):
        math_data.load_problems("svamp", "train", data_dir=str(root))


def test_bad_rows_name_row_and_file(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [GSM_ROWS[0], {"question": "no answer here"}])
    with pytest.raises(ValueError, match=r"^row 1 of .*bad\.jsonl has no answer ending in '#### N'"):
        math_data.load_problems(str(f))
    g = tmp_path / "bad.json"
    g.write_text(json.dumps([ADAPTER_ROWS[0], ADAPTER_ROWS[1], {"text": "hello"}]))
    with pytest.raises(ValueError, match=r"^row 2 of .*bad\.json has neither 'question' \(GSM8K\) nor 'instruction'"):
        math_data.load_problems(str(g))
    g.write_text(json.dumps([{"instruction": "Q?", "input": "", "output": "x"}]))
    with pytest.raises(ValueError, match=r"^row 0 of .*bad\.json has no 'answer'"):
        math_data.load_problems(str(g))


def test_eval_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'nosuch'; known: gsm8k, synth-source, synth-target"):
        math_data.load_problems("nosuch", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"data path '.*missing\.jsonl' does not exist"):
        math_data.load_problems(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "empty.json").write_text("[]")
    for f in ("empty.jsonl", "empty.json"):
        with pytest.raises(ValueError, match="'empty'.* (is empty|has no problems)"):
            math_data.load_problems(str(tmp_path / f))
    for spec in ("gsm8k", "synth-source"):
        with pytest.raises(ValueError, match=r"split 'validation' does not exist .*splits: train, test"):
            math_data.load_problems(spec, "validation")
    with pytest.raises(ValueError, match="limit=0"):
        math_data.load_problems("synth-target", limit=0)
    with pytest.raises(ValueError, match="no problems"):
        E.evaluate(None, None, [])


def test_synthetic_deterministic_disjoint_correct():
    for domain in ("source", "target"):
        train, test = math_data.load_problems(f"synth-{domain}", "train"), math_data.load_problems(f"synth-{domain}", "test")
        assert (len(train), len(test)) == (12000, 200)
        assert train == math_data.load_problems(f"synth-{domain}", "train") and test[:50] == math_data.load_problems(f"synth-{domain}", limit=50)
        other = math_data.load_problems(f"synth-{domain}", "test", seed=1)
        assert other != test
        train_q = {p["question"] for p in train}
        assert len(train_q) == len(train) and len({p["question"] for p in test}) == len(test)
        assert not train_q & {p["question"] for p in test + other}  # disjoint, for any seed
        for p in train[:500] + test:
            # one arithmetic step, checked independently, on the question's two numbers; the two
            # domains share the answer format and differ in the operation (+/- vs *)
            steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", p["solution"])
            assert len(steps) == 1
            (a, op, b, r), = steps
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(r) >= 0
            assert (op == "*") == (domain == "target")
            assert int(b) <= 9 and (int(a) <= 9 or op == "-") and int(r) >= (1 if op != "*" else 4)
            assert p["solution"] == f"{a} {op} {b} = {r}.\n#### {r}" and p["answer"] == r
            assert [int(x) for x in re.findall(r"\d+", p["question"])] == [int(a), int(b)]
            assert len((E.format_prompt(p) + E.format_target(p)).encode()) < 110
    # the target's questions never read like the source's: the words say which operation to do
    assert all(any(w in p["question"] for w in ("bags of", "rows of", "packs of")) for p in math_data.load_problems("synth-target"))
    assert not any("of" in p["question"].split() for p in math_data.load_problems("synth-source"))


def test_source_facts_give_the_equation_and_keep_the_text():
    """synth-source-facts: the same problems and full text as synth-source, with the equation moved
    into the prompt, so only the arithmetic is asked; unknown specs name it among the known."""
    src, facts = math_data.load_problems("synth-source", limit=20), math_data.load_problems("synth-source-facts", limit=20)
    for s, f in zip(src, facts):
        assert E.format_prompt(s) + E.format_target(s) == E.format_prompt(f) + E.format_target(f)
        assert E.format_prompt(f).endswith(f"Answer: {f['given']}") and re.fullmatch(r"\d+ [-+] \d+ =", f["given"])
        assert E.format_target(f) == f" {f['answer']}.\n#### {f['answer']}" and f["dataset"] == "synth-source-facts"
    with pytest.raises(ValueError, match="synth-source-facts"):
        math_data.load_problems("nosuch")
