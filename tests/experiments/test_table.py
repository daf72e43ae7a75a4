"""table.py (`claims.py table`): the real GSM8K and LLM-Adapters files load by path, and the Table 2 layout
end to end on small slices of them."""
import json
import os

import pytest

import eval_math as E
import math_data
from conftest import ROOT, _claims


SHARED_DATA = ROOT.parent / "shared" / "data"  # beside the repository
TABLE_FILES = ("MultiArith", "gsm8k", "AddSub", "AQuA", "SingleEq", "SVAMP", "mawps")


def _real_slice(tmp_path, n=4):
    """Small slices of the real data (GSM8K train .jsonl, the seven LLM-Adapters test .json files),
    written as a user's own copies would be: <dir>/gsm8k/train.jsonl, <dir>/llm-adapters/<Name>.json."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"the real data copies are not at {SHARED_DATA} (only on the development machines)")
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "llm-adapters").mkdir()
    with open(os.path.join(SHARED_DATA, "gsm8k", "train.jsonl")) as f:
        (tmp_path / "gsm8k" / "train.jsonl").write_text("".join(next(f) for _ in range(n)))
    for name in TABLE_FILES:
        rows = json.load(open(os.path.join(SHARED_DATA, "llm-adapters", f"{name}.json")))[:n]
        (tmp_path / "llm-adapters" / f"{name}.json").write_text(json.dumps(rows, indent=1))
    return tmp_path


def test_real_gsm8k_and_llm_adapters_files_load_by_path(tmp_path):
    """The real files' rows load by path as a user's copies would: GSM8K's solution with its '#### N'
    line (calculator annotations removed), LLM-Adapters' instruction/answer, AQuA's answer a letter;
    the raw rows kept for the LIFT authors' prompt (MultiArith's instructions begin and end with a
    space, AddSub's end with one) and training format (GSM8K's annotations kept)."""
    d = _real_slice(tmp_path)
    train_rows = [json.loads(line) for line in (d / "gsm8k" / "train.jsonl").read_text().splitlines()]
    ps = math_data.load_problems(str(d / "gsm8k" / "train.jsonl"), "train")
    assert [p["question"] for p in ps] == [r["question"].strip() for r in train_rows]
    assert [p["answer"] for p in ps] == [r["answer"].rsplit("####", 1)[1].strip().replace(",", "") for r in train_rows]
    assert all("<<" not in p["solution"] and p["template"] == "alpaca" for p in ps)
    assert [E.training_pair(p, "lift-authors")[1] for p in ps] == [r["answer"].split("####")[0].strip() + " "
                                                                   for r in train_rows]
    assert any("<<" in r["answer"] for r in train_rows)
    for name in TABLE_FILES:
        rows = json.loads((d / "llm-adapters" / f"{name}.json").read_text())
        ps = math_data.load_problems(str(d / "llm-adapters" / f"{name}.json"))
        assert {p["dataset"] for p in ps} == {name.lower()}
        assert [p["question"] for p in ps] == [r["instruction"].strip() for r in rows]
        theirs = ("<s> Below is an instruction that describes a task. Write a response that appropriately completes "
                  "the request. \n\n### Instruction:\n{}\n\n### Response:\n")  # run_math_parallel.py's i_prompt
        assert [E.format_prompt(p, "lift-authors") for p in ps] == [theirs.format(r["instruction"]) for r in rows]
        if name in ("MultiArith", "AddSub"):
            assert all(r["instruction"].endswith(" ") for r in rows)
            assert all(r["instruction"].startswith(" ") for r in rows) == (name == "MultiArith")
        if name == "AQuA":
            assert all(p["answer"] in "ABCDE" and E.is_choice(p) for p in ps)
        else:
            assert all(E.is_correct(float(r["answer"]), p["answer"]) for p, r in zip(ps, rows))
    # by name, from a data folder, as --eval-dir and $NANOPEFT_DATA find them (gsm8k.json included)
    from experiments.table import table_sets
    assert table_sets(str(d / "llm-adapters")) == [str(d / "llm-adapters" / f"{n}.json") for n in TABLE_FILES]


def test_claims_table_on_real_slices(small_dir, tmp_path, capsys):
    """`claims.py table` end to end on a small model and slices of the real files: the Table 2
    layout (the seven sets in the papers' order, Avg, the base row, trainable %), the forgetting
    columns, the verdict lines, table.json and figures/table.png; runs are cached (a second call
    re-reads them) and --only-seed splits the seeds among processes."""
    d = _real_slice(tmp_path)
    argv = ["table", "--model", str(small_dir), "--data", str(d / "gsm8k" / "train.jsonl"), "--eval-dir",
            str(d / "llm-adapters"), "--steps", "2", "--batch-size", "2", "--eval-limit", "2", "--max-new-tokens", "4",
            "--seq-len", "900", "--forget-prompts", "0", "--configs", "lora r8,lift r8", "--figures", str(tmp_path / "figs")]
    _claims(tmp_path, *argv, "--only-seed", "1")
    out = capsys.readouterr().out
    assert "lift r8, seed 1" in out and "seed 0" not in out
    _claims(tmp_path, *argv)  # seeds 0 and 1: seed 1 is re-read, seed 0 runs
    out = capsys.readouterr().out
    assert "lora r8 seed 1: reusing" in out and "=== lora r8, seed 0" in out
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("method") and "MultiArith" in line)
    assert lines[at].split()[3:11] == [*TABLE_FILES, "Avg"]
    base = lines[at + 1].split()
    assert base[0] == "base" and len(base) == 1 + 8  # a number per set and the average
    assert "LIFT Table 2: LIFT r8 >= LoRA r8 on the average" in out
    assert "the LIFT authors' training format" in lines[at - 1]
    assert "the LIFT authors' prompt and scoring, greedy (the authors' script: 4 beams)" in lines[at - 1]
    res = json.loads((tmp_path / "claims" / "table.json").read_text())
    assert res["seeds"] == [0, 1] and set(res["runs"]) == {"lora r8", "lift r8"}
    assert res["decoding"] == "greedy" and res["eval_limit"] == 2
    assert res["protocol"] == res["train_format"] == "lift-authors"
    command = json.loads((tmp_path / "claims" / "runs" / "lift r8-seed0" / "claims-command.json").read_text())
    at_flag = command.index("--train-format")
    assert command[at_flag + 1] == "lift-authors" and command[command.index("--protocol") + 1] == "lift-authors"
    for runs in res["runs"].values():
        assert [r["seed"] for r in runs] == [0, 1]
        assert all(set(r["accuracy"]) == {n.lower() for n in TABLE_FILES} for r in runs)
        assert runs[0]["trainable"] == runs[1]["trainable"] > 0 and all(r["wall_s"] > 0 for r in runs)
    assert (tmp_path / "figs" / "table.png").stat().st_size > 1000
    _claims(tmp_path, *argv)
    assert "=== " not in capsys.readouterr().out  # everything cached now
    with pytest.raises(ValueError, match="unknown dataset 'SingleEq'"):
        (d / "llm-adapters" / "SingleEq.json").unlink()
        _claims(tmp_path, *argv)
    with pytest.raises(ValueError, match="--only-seed 2 is not one of the seeds 0..1"):
        _claims(tmp_path, *argv, "--only-seed", "2")
    with pytest.raises(ValueError, match="unknown --configs 'lora r9'; known: full, lora r8"):
        _claims(tmp_path, "table", "--configs", "lora r9")
