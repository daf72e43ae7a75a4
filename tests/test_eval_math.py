"""eval_math.py: answer extraction and scoring, the prompts and training formats, batched evaluation and
stop strings against plain generate, its command line (the data it reads: test_math_data.py)."""
import json
import re

import pytest
import torch

import eval_math as E
import math_data
from conftest import GSM_ROWS, tiny_model
from generate import generate
from tokenizer import LLAMA3_PAT, Tokenizer


ANSWER_CASES = [
    ("3 * 4 = 12. 12 + 5 = 17.\n#### 17", 17.0),           # hashes
    ("#### 1,234", 1234.0),                                  # comma in the hashed answer
    ("She pays $1,250.50 in total.", 1250.5),                # dollars + commas + decimals
    ("The temperature drops to -5 degrees.", -5.0),          # negative
    ("x = 3.75", 3.75),                                      # decimal
    ("So 18 apples.", 18.0),                                 # number before a full stop
    ("The answer is 42. Next, Tom buys 7 pens.", 42.0),      # "The answer is" beats the last number
    ("the answer is: $18.", 18.0),
    ("The answer is -3", -3.0),
    ("#### 17\nQuestion: Tom has 3 bags", 17.0),             # trailing text after the answer
    ("5 + 7 = 12 and then 12 - 2 = 10 cookies remain", 10.0),  # last number
    ("I do not know.", None),                                # no number at all
    ("", None),
]


@pytest.mark.parametrize("text, expected", ANSWER_CASES)
def test_extract_answer(text, expected):
    assert E.extract_answer(text) == expected


CHOICE_CASES = [
    ("Answer: the correct option is (C).", "C"),
    ("A train covers 60 km in an hour, so the answer is D.", "D"),
    ("The answer is (B). Not (A).", "B"),
    ("Among the options, B) 12 fits best.", "B"),
    ("All options are close; option E is right.", "E"),
    ("#### C", "C"),
    ("E", "E"),
    ("B.", "B"),
    ("All of them look wrong.", None),
    ("Since E = m c^2, energy grows.", None),
    ("Answer: 12 apples", None),
]


@pytest.mark.parametrize("text, expected", CHOICE_CASES)
def test_extract_choice(text, expected):
    assert E.extract_choice(text) == expected


def test_protocols_score_as_their_rules_say(memorized):
    """nanopeft takes the first '#### N' / 'answer is N'; llm-adapters (an approximation of
    LLM-Adapters' rules) the last number and the first capital A-E; evaluate() records which one
    scored, and the decoding."""
    s = "The answer is 12 - 4 = 8."
    assert E.extract_answer(s) == 12 and E.extract_answer(s, "llm-adapters") == 8
    assert E.extract_answer("#### 5\nthen 7 more", "llm-adapters") == 7
    assert E.extract_answer("She pays $1,250.50 in total.", "llm-adapters") == 1250.5
    assert E.extract_answer("no number", "llm-adapters") is None
    assert E.extract_choice("All options fit; (C)", "llm-adapters") == "A"
    assert E.extract_choice("All options fit; (C)") == "C"
    assert E.extract_choice("the answer is (d)", "llm-adapters") is None
    model, tok, seen = memorized
    problems = seen + math_data.load_problems("synth-source", limit=3)
    ours = E.evaluate(model, tok, problems, batch_size=4, progress=False)
    theirs = E.evaluate(model, tok, problems, batch_size=4, progress=False, protocol="llm-adapters", num_beams=1)
    assert (ours["protocol"], theirs["protocol"], theirs["decoding"]) == ("nanopeft", "llm-adapters", "greedy")
    beams = E.evaluate(model, tok, problems, batch_size=4, progress=False, protocol="llm-adapters")  # 4 beams by default
    assert beams["decoding"] == "beam search, 4 beams" and ours["decoding"] == "greedy"
    prompts = [tok.encode(E.format_prompt(p), bos=True) for p in problems]
    ref = [E._cut_at_stop(tok.decode(o))[0] for o in generate(model, prompts, beams["max_new_tokens"], tok.stop_ids,
                                                               tok.pad_id, num_beams=4)]
    assert [p["completion"] for p in beams["predictions"]] == ref
    with pytest.raises(ValueError, match="--num-beams 0 is not allowed"):
        E.evaluate(model, tok, problems, num_beams=0)
    for a, b in zip(ours["predictions"], theirs["predictions"]):
        assert a["completion"] == b["completion"]                    # the same text, scored two ways
        last = re.findall(r"-?\d+\.?\d*", b["completion"].replace(",", ""))
        assert b["extracted"] == (float(last[-1]) if last else None)
        assert b["correct"] == (b["extracted"] is not None and abs(b["extracted"] - float(b["gold"])) <= 1e-3)
    with pytest.raises(ValueError, match="unknown protocol 'beam'; known: nanopeft, llm-adapters, lift-authors"):
        E.evaluate(model, tok, problems, protocol="beam")


def test_extract_choice_beats_first_capital_rule():
    """LLM-Adapters' rule (first A-E anywhere) on the same sentences is wrong where ours is right."""
    def first_capital(s):
        m = re.findall(r"A|B|C|D|E", s.strip())
        return m[0] if m else None
    wrong = [t for t, want in CHOICE_CASES if want and first_capital(t) != want]
    assert len(wrong) >= 3 and all(E.extract_choice(t) == w for t, w in CHOICE_CASES if t in wrong)


def test_is_correct():
    assert E.is_correct(17.0, "17") and E.is_correct(17.0009, "17") and not E.is_correct(17.002, "17")
    assert E.is_correct(-5.0, "-5") and E.is_correct(1250.5, "1,250.50")
    assert E.is_correct("C", "C") and not E.is_correct("A", "C") and not E.is_correct(3.0, "C")
    assert not E.is_correct(None, "3") and not E.is_correct(None, "A")


# -----------------------------------------------------------------------------
# lift-authors: the LIFT authors' run_math_parallel.py and data_utils.py (zihanghliu/LIFT)

LIFT_AUTHORS_CASES = [  # (completion, lift-authors' number, nanopeft's number)
    ("The answer is 5.\n\n### Instruction: … 3 + 4 = 7", 7.0, 5.0),  # no cut: the last number of all
    ("-$5", 5.0, -5.0),                                     # '$' kept: the '-' is not next to a digit
    ("1,234.5", 1234.5, 1234.5),                            # commas removed
    ("She pays $1,250.50 in total.", 1250.5, 1250.5),
    ("#### 18\nthen 3 more", 3.0, 18.0),
    ("It is 5.", 5.0, 5.0),                                 # "5." is a number
    ("no number here", None, None),                         # theirs: inf, wrong for any gold
    ("", None, None),
]


@pytest.mark.parametrize("text, theirs, ours", LIFT_AUTHORS_CASES)
def test_lift_authors_number_rule(text, theirs, ours):
    assert E.extract_answer(text, "lift-authors") == theirs and E.extract_answer(text) == ours
    assert E.is_correct(theirs, "7") == (theirs == 7.0)     # None is never correct


def test_lift_authors_letter_rule():
    """AQuA: the first capital A-E of the stripped response, wherever it stands; a letter after a
    stop string still counts (nothing is cut), a lower-case one never."""
    assert E.extract_choice("The answer is (C).", "lift-authors") == "C"
    assert E.extract_choice("All options fit; (C)", "lift-authors") == "A"  # inside a word
    assert E.extract_choice("the answer is (d)", "lift-authors") is None
    later = "Let me think.\n\n### Instruction: the next one\nThe answer is (B)."
    assert E.extract_choice(later, "lift-authors") == "B"
    assert E.extract_choice(E._cut_at_stop(later)[0]) is None  # what nanopeft's stop cut leaves


def test_lift_authors_prompt_bytes(tmp_path):
    """Their evaluation prompt byte for byte: '<s> ' first, one space after 'request.', the
    instruction as the file has it (a GSM8K row's question; an LLM-Adapters row's instruction with
    its spaces, its input unused); `question` stays stripped for nanopeft's own prompt."""
    rows = [GSM_ROWS[0], {"instruction": " Sam has 13 books and gets 17. How many? ", "input": "",
                          "output": "\nA: 13 + 17 = 30. The answer is 30.", "answer": "30.0"},
            {"instruction": "Pick one. ", "input": "(A) 1 (B) 2", "output": "B", "answer": "B"}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    gsm, sam, pick = math_data.load_problems(str(tmp_path / "rows.json"))
    head = "<s> Below is an instruction that describes a task. Write a response that appropriately completes the request. "
    assert E.format_prompt(gsm, "lift-authors") == (head + "\n\n### Instruction:\nNatalia sold clips to 48 friends in "
                                                    "April, and half as many in May. How many in all?\n\n### Response:\n")
    assert E.format_prompt(sam, "lift-authors") == (head + "\n\n### Instruction:\n Sam has 13 books and gets 17. "
                                                    "How many? \n\n### Response:\n")
    assert E.format_prompt(pick, "lift-authors") == head + "\n\n### Instruction:\nPick one. \n\n### Response:\n"
    assert sam["question"] == "Sam has 13 books and gets 17. How many?"
    assert E.format_prompt(sam) == E.format_prompt(sam, "llm-adapters") == E.ALPACA.format(instruction=sam["question"])
    synth = math_data.load_problems("synth-target", limit=1)[0]
    want = f"{head}\n\n### Instruction:\n{synth['question']}\n\n### Response:\n"
    assert E.format_prompt(synth, "lift-authors") == want


def _llama3_tokenizer():
    import importlib.util
    spec = importlib.util.find_spec("llama_models")
    if spec is None:
        pytest.skip("llama_models (Meta's Llama-3 tokenizer.model) is not installed")
    return Tokenizer.from_file(f"{spec.submodule_search_locations[0]}/llama3/tokenizer.model")


def test_lift_authors_training_format(tmp_path):
    """training_pair: their BASE_PROMPT (two spaces after 'request.', 16 spaces before '### Response:',
    a non-empty input instead of the instruction) and target (the output as the file has it, or a
    GSM8K answer before '####' with its calculator annotations, '</s>' removed, then ' ');
    training_ids: their tokenization, the whole text at once with the prompt's token count masked,
    which on Llama-3 is not encode(prompt) + encode(target) when the output starts with a newline."""
    rows = [GSM_ROWS[0], {"instruction": " Sam has 13 books and gets 17. How many? ", "input": "",
                          "output": "\nA: 13 + 17 = 30. The answer is 30.</s>", "answer": "30.0"},
            {"instruction": "Pick one.", "input": " (A) 1 (B) 2", "output": "B", "answer": "B"}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    gsm, sam, pick = math_data.load_problems(str(tmp_path / "rows.json"))
    head = ("<s> Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.  \n\n### Instruction:\n")
    tail = "\n                \n### Response:\n"
    assert E.training_pair(sam, "lift-authors") == (head + " Sam has 13 books and gets 17. How many? " + tail,
                                                    "\nA: 13 + 17 = 30. The answer is 30. ")
    assert E.training_pair(gsm, "lift-authors") == (
        head + GSM_ROWS[0]["question"] + tail,
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips. ")
    assert E.training_pair(pick, "lift-authors") == (head + " (A) 1 (B) 2" + tail, "B ")
    synth = math_data.load_problems("synth-target", "train", limit=1)[0]
    assert E.training_pair(synth, "lift-authors")[1] == synth["solution"].split("\n####")[0] + " "
    assert E.training_pair(gsm) == (E.format_prompt(gsm), E.format_target(gsm))
    with pytest.raises(ValueError, match="unknown training format 'alpaca'; known: nanopeft, lift-authors"):
        E.training_pair(gsm, "alpaca")
    tok = _llama3_tokenizer()
    for p in (sam, gsm):
        prompt, target = E.training_pair(p, "lift-authors")
        a, b = E.training_ids(tok, p, "lift-authors")
        assert a + b == tok.encode(prompt + target, bos=True, eos=True) and len(a) == len(tok.encode(prompt, bos=True))
        assert a[0] == tok.bos_id and tok.decode(a[1:]).startswith("<s> Below") and b[-1] == tok.eos_id
        assert tok.decode(b[-2:-1]) == " "                     # their f"{output} {eos_token}"
        ours = (tok.encode(E.format_prompt(p), bos=True), tok.encode(E.format_target(p), eos=True))
        assert E.training_ids(tok, p) == ours
    a, b = E.training_ids(tok, sam, "lift-authors")  # ':\n' + '\nA' -> one token ':\n\n', masked as the prompt's
    assert tok.decode(a[-1:]) == ":\n\n" and tok.decode(b[:2]) == "A:"
    prompt, target = E.training_pair(sam, "lift-authors")
    assert a + b != tok.encode(prompt, bos=True) + tok.encode(target, eos=True)
    prompt, target = E.training_pair(gsm, "lift-authors")     # a stripped GSM8K answer: a clean boundary
    assert E.training_ids(tok, gsm, "lift-authors") == (tok.encode(prompt, bos=True), tok.encode(target, eos=True))


def test_lift_authors_decoding_and_evaluate_wiring(monkeypatch):
    """4 beams and 256 new tokens unless given; generate gets the end-of-text id alone and no stop
    callback; the prompt is theirs; the completion is the whole output, scored by their rules."""
    assert [E.decoding("lift-authors", n) for n in (None, 1, 2)] == [4, 1, 2]
    assert (E.decoding("nanopeft", None), E.decoding("llm-adapters", None)) == (1, 4)
    synth = math_data.load_problems("synth-target", limit=2)
    assert E.default_max_new_tokens(synth, "lift-authors") == 256 and E.default_max_new_tokens(synth) < 100
    tok, calls = Tokenizer.bytes(), []

    def fake_generate(model, prompts, max_new_tokens, stop_ids=(), pad_id=0, stop=None, check_every=8, num_beams=1):
        calls.append(dict(prompts=prompts, n=max_new_tokens, stop_ids=list(stop_ids), stop=stop, beams=num_beams))
        return [tok.encode("12 apples.\n\n### Instruction: then 3 + 4 = 7") + [tok.bos_id] for _ in prompts]
    monkeypatch.setattr(E, "generate", fake_generate)
    m = E.evaluate(tiny_model(), tok, synth, progress=False, protocol="lift-authors")
    assert (m["max_new_tokens"], m["decoding"], m["protocol"]) == (256, "beam search, 4 beams", "lift-authors")
    assert calls[0]["stop_ids"] == [tok.eos_id] and calls[0]["stop"] is None
    assert (calls[0]["n"], calls[0]["beams"]) == (256, 4)
    theirs = [tok.encode(E.format_prompt(p, "lift-authors"), bos=True) for p in synth]
    assert sorted(calls[0]["prompts"]) == sorted(theirs)
    assert {p["completion"] for p in m["predictions"]} == {"12 apples.\n\n### Instruction: then 3 + 4 = 7"}
    assert [p["extracted"] for p in m["predictions"]] == [7.0, 7.0]
    E.evaluate(tiny_model(), tok, synth, max_new_tokens=9, progress=False, protocol="lift-authors", num_beams=1)
    assert (calls[-1]["n"], calls[-1]["beams"]) == (9, 1)
    ours = E.evaluate(tiny_model(), tok, synth, progress=False)
    assert {p["completion"] for p in ours["predictions"]} == {"12 apples.\n\n"} and calls[-1]["stop"] is not None


def test_lift_authors_evaluate_does_not_cut_at_stop_strings(monkeypatch):
    """On a tiny random model, greedy and 4-beam: the completions are generate's output to the
    end-of-text token, special tokens dropped and transformers' clean-up applied, even where they
    hold a stop string (which nanopeft's protocol cuts at)."""
    from transformers import PreTrainedTokenizerBase
    tok, model = Tokenizer.bytes(), tiny_model(1, vocab=264)
    special = set(tok.special_tokens.values())

    def theirs(ids):  # batch_decode(skip_special_tokens=True) with clean_up_tokenization_spaces=True
        return PreTrainedTokenizerBase.clean_up_tokenization(None, tok.decode([i for i in ids if i not in special]))
    ids = tok.encode("x , y . He 's here ? ok") + [tok.bos_id, tok.pad_id]
    assert E.authors_text(tok, ids) == theirs(ids) == "x, y. He's here? ok"
    problems = math_data.load_problems("synth-source", limit=3) + math_data.load_problems("synth-target", limit=2)
    prompts = [tok.encode(E.format_prompt(p, "lift-authors"), bos=True) for p in problems]
    plain = generate(model, prompts, 40, [tok.eos_id], tok.pad_id)
    texts = [tok.decode(o) for o in plain]
    common = max(sorted(set("".join(t[4:20] for t in texts))), key=lambda c: sum(c in t[4:20] for t in texts))
    monkeypatch.setattr(E, "STOP_STRINGS", (common,))  # a character this random model writes early
    got = E.evaluate(model, tok, problems, batch_size=2, max_new_tokens=40, progress=False, protocol="lift-authors",
                     num_beams=1)
    assert [p["completion"] for p in got["predictions"]] == [theirs(o) for o in plain]
    assert sum(common in p["completion"] for p in got["predictions"]) >= 2
    cut = E.evaluate(model, tok, problems, batch_size=2, max_new_tokens=40, progress=False)
    assert not any(common in p["completion"] for p in cut["predictions"])
    beams = E.evaluate(model, tok, problems, batch_size=2, max_new_tokens=12, progress=False, protocol="lift-authors")
    ref = generate(model, prompts, 12, [tok.eos_id], tok.pad_id, num_beams=4)
    assert beams["decoding"] == "beam search, 4 beams"
    assert [p["completion"] for p in beams["predictions"]] == [theirs(o) for o in ref]


def test_prompt_target_boundary_tokenizes_cleanly():
    """encode(prompt) + encode(target) == encode(prompt + target): checked for the byte tokenizer,
    and for Llama-3's pre-tokenizer regex (BPE never merges across its pieces)."""
    regex = pytest.importorskip("regex")
    tok = Tokenizer.bytes()
    probs = math_data.load_problems("synth-target", limit=5) + math_data.load_problems("synth-source", limit=5)
    probs += [dict(question=r["question"], answer="1", solution=r["answer"], template="alpaca") for r in GSM_ROWS]
    probs += [dict(question="Q?", input="(A) 1 (B) 2", answer="B", solution=None, template="alpaca")]
    for p in probs:
        a, b = E.format_prompt(p), E.format_target(p)
        assert tok.encode(a, bos=True) + tok.encode(b, eos=True) == tok.encode(a + b, bos=True, eos=True)
        assert regex.findall(LLAMA3_PAT, a) + regex.findall(LLAMA3_PAT, b) == regex.findall(LLAMA3_PAT, a + b)


@pytest.fixture(scope="module")
def memorized():
    """A tiny model trained (as train.py builds sequences) until it reproduces 4 problems."""
    torch.manual_seed(0)
    tok, model = Tokenizer.bytes(), tiny_model(vocab=264)
    seen = math_data.load_problems("synth-target", "train", limit=4)
    seqs = [(tok.encode(E.format_prompt(p), bos=True), tok.encode(E.format_target(p), eos=True)) for p in seen]
    T = max(len(a) + len(b) for a, b in seqs) - 1
    x, y = torch.full((4, T), tok.pad_id), torch.full((4, T), -100)
    for i, (a, b) in enumerate(seqs):
        s = torch.tensor(a + b)
        x[i, :len(s) - 1], y[i, len(a) - 1:len(s) - 1] = s[:-1], s[len(a):]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(120):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model, tok, seen


def test_evaluate_tiny_model(memorized):
    model, tok, seen = memorized
    problems = seen + math_data.load_problems("synth-source", limit=3) + math_data.load_problems("synth-target", limit=3)
    m1 = E.evaluate(model, tok, problems, batch_size=1, progress=False)
    m4 = E.evaluate(model, tok, problems, batch_size=4, progress=False)
    assert m1["predictions"] == m4["predictions"]                 # batch size changes no prediction
    preds = m4["predictions"]
    assert [p["question"] for p in preds] == [p["question"] for p in problems]  # original order
    for p, pr in zip(seen, preds):                               # memorized: the exact target, stopped at eos
        assert pr["completion"] == E.format_target(p) and pr["correct"]
    for name, r in m4["datasets"].items():
        kept = [pr for pr in preds if pr["dataset"] == name]
        assert r["n"] == len(kept) and r["correct"] == sum(pr["correct"] for pr in kept)
        assert r["accuracy"] == sum(pr["correct"] for pr in kept) / len(kept)
    for pr in preds:  # each flag agrees with an independent check of the completion's "#### N"
        m = re.search(r"#### (-?\d+)", pr["completion"])
        assert pr["correct"] == (m is not None and m.group(1) == pr["gold"])
    assert m4["datasets"]["synth-source"]["correct"] < 3         # never trained on: not all correct
    assert m4["average"] == sum(r["accuracy"] for r in m4["datasets"].values()) / 2


@pytest.mark.parametrize("check_every", [1, 3, 8])
def test_stop_strings_in_generate_equal_generate_then_cut(monkeypatch, check_every):
    """complete(): generate with the stop-string test inside (rows leave the batch when they stop)
    gives exactly the texts of one plain generate call cut at the first stop string, for any
    check interval; a stop callback ends a row where it says, and only that row."""
    tok, model = Tokenizer.bytes(), tiny_model(1, vocab=264)
    problems = math_data.load_problems("synth-source", limit=3) + math_data.load_problems("synth-target", limit=2)
    prompts = [tok.encode(E.format_prompt(p), bos=True) for p in problems]
    plain = generate(model, prompts, 40, tok.stop_ids, tok.pad_id)
    texts = [tok.decode(o) for o in plain]
    common = max(sorted(set("".join(t[4:20] for t in texts))), key=lambda c: sum(c in t[4:20] for t in texts))
    monkeypatch.setattr(E, "STOP_STRINGS", (common, "\nQuestion:"))  # a character this random model writes early
    monkeypatch.setattr(E, "STOP_CHECK", check_every)
    cut = [E._cut_at_stop(tok.decode(o))[0] for o in plain]
    assert E.complete(model, tok, prompts, 40) == cut
    assert sum(E._cut_at_stop(tok.decode(o))[1] for o in plain) >= 2   # the test exercises stopping
    asked = []

    def stop_row_1_at_5(i, ids):
        asked.append(i)
        return i == 1 and len(ids) >= 5
    out = generate(model, prompts, 40, tok.stop_ids, tok.pad_id, stop=stop_row_1_at_5, check_every=check_every)
    n1 = -(-5 // check_every) * check_every  # the first check at or after 5 tokens
    assert out[1] == plain[1][:n1] and [o for i, o in enumerate(out) if i != 1] == [o for i, o in enumerate(plain) if i != 1]
    assert asked.count(1) == n1 // check_every
    got = E.evaluate(model, tok, problems, batch_size=2, max_new_tokens=40, progress=False)
    assert [p["completion"] for p in got["predictions"]] == cut


def test_stop_strings_and_default_length():
    assert E._cut_at_stop(" 3 + 4 = 7.\n#### 7\nQuestion: Tom has") == (" 3 + 4 = 7.\n#### 7", True)
    assert E._cut_at_stop("12\n\n### Instruction:\nNext") == ("12\n\n", True)
    assert E._cut_at_stop("#### 72 apples") == ("#### 72 apples", False)
    synth = math_data.load_problems("synth-target")
    longest = max(len(E.format_target(p)) for p in synth)
    assert longest < E.default_max_new_tokens(synth) <= 2 * longest + 16 < 100
    assert E.default_max_new_tokens([dict(question="q", answer="1", solution=None)]) == 512
    # Alpaca-template data (GSM8K, LLM-Adapters) keeps the papers' 512 whatever its solutions' length
    gsm = [dict(question="q", answer="1", solution="1 + 0 = 1.\n#### 1", template="alpaca")]
    assert E.default_max_new_tokens(gsm) == E.default_max_new_tokens(gsm * 50) == 512


def test_cli(tmp_path, capsys):
    E.main(["--model", "tiny", "--data", "synth-source,synth-target", "--limit", "3", "--batch-size", "2",
            "--max-new-tokens", "4", "--out", str(tmp_path), "--device", "cpu"])
    out = capsys.readouterr().out
    assert re.search(r"synth-source\s+3\s+\d+\s+[\d.]+%", out) and "average" in out
    preds = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(preds) == 6 and metrics["datasets"]["synth-target"]["n"] == 3 and metrics["max_new_tokens"] == 4
    with pytest.raises(SystemExit) as e:
        E.main(["--data", "nosuch", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: --data: unknown dataset 'nosuch'")
