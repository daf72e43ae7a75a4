"""
Math word problems: loading (GSM8K through `datasets`, GSM8K-format .jsonl, LLM-Adapters .json
files and folders, the built-in synthetic problems), the prompt templates and training formats,
answer extraction and scoring under three protocols (nanopeft's own; "lift-authors", the LIFT
authors' evaluation script reproduced; "llm-adapters", an approximation of LLM-Adapters' rules),
batched greedy or beam evaluation, the accuracy table, and a CLI:

    python eval_math.py --model out/lift --data synth-source,synth-target
    python eval_math.py --model ~/Llama-3.2-1B --data gsm8k,svamp --data-dir ~/LLM-Adapters/dataset
    python eval_math.py --model out/lift --protocol lift-authors --data-dir ~/LLM-Adapters/dataset \\
        --data MultiArith,gsm8k,AddSub,AQuA,SingleEq,SVAMP,mawps     # the LIFT authors' seven sets

A problem is a dict: question, answer (gold final answer as text: a number or an option letter
A-E), solution (worked solution used as the training target, or None), dataset (its name),
template ("alpaca" or "qa", see format_prompt), for LLM-Adapters rows input, and for rows read
from a file raw (the row's text fields unstripped, as the LIFT authors' scripts read them).
"""
import argparse
import collections
import functools
import json
import math
import os
import random
import re
import sys
import time
import zlib
from pathlib import Path

from generate import generate
from model import bf16_fast
from weights import load

GSM8K_HUB = "openai/gsm8k"   # datasets.load_dataset(GSM8K_HUB, "main"): splits train / test
SPLITS = ("train", "test")
SYNTH_SIZES = {"train": 12000, "test": 200}

# -----------------------------------------------------------------------------
# the built-in synthetic problems
# Two domains a ~1.6M-parameter byte-level LLaMA learns on a CPU in minutes (LIFT paper §7.1:
# learn the target, measure forgetting on the source). One answer format for both, so that what
# fine-tuning can destroy is a skill, not a format; texts are short (< 95 bytes):
#   source: a + b (a, b <= 9) or its inverse a - b     "Tom has 7 pens and gets 5 more."  -> "7 + 5 = 12.\n#### 12"
#   target: a * b (a, b in 2..9), the skill to add     "Tom has 3 bags of 4 pens."        -> "3 * 4 = 12.\n#### 12"
# The question's words say which operation ("bags of" / "rows of" / "packs of" only in the target).
# Measured (tiny preset, batch 32, prompt masked): pretraining on source, AdamW lr 2e-3 cosine, 450
# steps -> source 95.5%; then full fine-tuning on target, lr 1e-3, 150 steps: target 87%, while
# the source falls to ~3% (the model multiplies everything). (The first version's two-step target
# taught a format the model then applied everywhere; operands < 20 took 900 steps to reach 77%.)

NAMES = ("Tom", "Amy", "Sam", "Mia", "Ben", "Zoe", "Max", "Ava", "Leo", "Ivy", "Dan", "Eve")
ITEMS = ("apples", "pens", "books", "cards", "eggs", "shells", "coins", "stamps")
SOURCE_TEMPLATES = (  # (operation, question)
    ("+", "{n} has {a} {x} and gets {b} more. How many {x} now?"),
    ("+", "A box has {a} {x}. {n} adds {b}. How many {x} now?"),
    ("-", "{n} has {a} {x} and gives {b} away. How many {x} now?"),
    ("-", "A box has {a} {x}. {n} takes {b}. How many {x} now?"),
)
TARGET_TEMPLATES = (
    "{n} has {a} bags of {b} {x}. How many {x} now?",
    "A box has {a} rows of {b} {x}. How many {x} now?",
    "{n} buys {a} packs of {b} {x}. How many {x} now?",
    "{n} gets {a} bags of {b} {x}. How many {x} now?",
)
SOURCE_MAX, TARGET_FACTOR_MAX = 9, 9
TEST_EVERY = 16  # a question is a test question iff crc32(question) % 16 == 0


SYNTH_DRAWS = 4  # random draws per distinct problem of a domain before the rest are dealt out in a shuffled order


def _source_text(op, template, name, item, a, b):
    r = a + b if op == "+" else a - b
    return template.format(n=name, x=item, a=a, b=b), f"{a} {op} {b} = {r}.\n#### {r}", r


def _source_problem(rng):
    op, t = rng.choice(SOURCE_TEMPLATES)
    n = rng.choice(NAMES)
    if op == "+":  # the one-digit addition table, and its inverse: a - b = c with b, c <= 9
        a, b = rng.randint(1, SOURCE_MAX), rng.randint(1, SOURCE_MAX)
    else:
        b, c = rng.randint(1, SOURCE_MAX), rng.randint(1, SOURCE_MAX)
        a = b + c
    return _source_text(op, t, n, rng.choice(ITEMS), a, b)


def _target_text(template, name, item, a, b):
    return template.format(n=name, x=item, a=a, b=b), f"{a} * {b} = {a * b}.\n#### {a * b}", a * b


def _target_problem(rng):
    t = rng.choice(TARGET_TEMPLATES)
    a, b = rng.randint(2, TARGET_FACTOR_MAX), rng.randint(2, TARGET_FACTOR_MAX)
    return _target_text(t, rng.choice(NAMES), rng.choice(ITEMS), a, b)


def _in_split(question: str, split: str) -> bool:
    return (zlib.crc32(question.encode()) % TEST_EVERY == 0) == (split == "test")


@functools.lru_cache(maxsize=None)
def synthetic_space(domain: str) -> tuple:
    """Every distinct (question, solution, answer) of a domain, in a fixed order: what the random
    draws can make (source: 31,104; target: 18,944), so a limit is bounded by what exists."""
    digits, factors = range(1, SOURCE_MAX + 1), range(2, TARGET_FACTOR_MAX + 1)
    if domain == "source":
        made = (_source_text(op, t, n, x, i + j if op == "-" else i, j)  # "-": a = b + c, b = j, c = i
                for op, t in SOURCE_TEMPLATES for n in NAMES for x in ITEMS for i in digits for j in digits)
    else:
        made = (_target_text(t, n, x, a, b) for t in TARGET_TEMPLATES for n in NAMES for x in ITEMS
                for a in factors for b in factors)
    return tuple({p[0]: p for p in made}.values())


def synthetic_problems(domain: str, split: str = "train", n: int | None = None, seed: int = 0) -> list[dict]:
    """`n` distinct problems of one domain ("source" or "target"), deterministic from `seed`.
    Which split a question belongs to is a function of its text alone (a hash), so train and
    test never share a question, for any seeds; the first k of a longer list are the list for k.
    There are finitely many (synthetic_space): an `n` above that gives all of them. Problems are
    drawn at random (SYNTH_DRAWS draws per distinct problem at most, whatever `n`), then the ones
    not drawn yet follow in a shuffled order, so asking for all of them ends."""
    make = {"source": _source_problem, "target": _target_problem}.get(domain)
    if make is None:
        raise ValueError(f"unknown synthetic domain {domain!r}; known: source, target")
    if split not in SPLITS:
        raise ValueError(f"split {split!r} does not exist for synth-{domain}; splits: {', '.join(SPLITS)}")
    space = synthetic_space(domain)
    n = SYNTH_SIZES[split] if n is None else n
    rng = random.Random(f"nanopeft-synth-{domain}-{seed}")
    out, seen = [], set()
    for _ in range(SYNTH_DRAWS * len(space)):
        if len(out) >= n:
            break
        q, solution, r = make(rng)
        if q not in seen and _in_split(q, split):
            seen.add(q)
            out.append((q, solution, r))
    if len(out) < n:  # the draws ran dry: the rest of the split, in an order the seed picks
        rest = [p for p in space if p[0] not in seen and _in_split(p[0], split)]
        rng.shuffle(rest)
        out += rest[:n - len(out)]
    return [dict(question=q, answer=str(r), solution=solution, dataset=f"synth-{domain}", template="qa")
            for q, solution, r in out]

# -----------------------------------------------------------------------------
# loading


class MissingData(ValueError):
    """A dataset spec that names nothing on disk (load_all reports every missing one at once)."""


def check_limit(limit, flag: str = "limit"):
    """A limit is None (all problems) or a whole number >= 1; one above the data's size means all."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"{flag}={limit!r} must be a positive number of problems (or None for all)")


def load_problems(spec: str, split: str = "test", limit: int | None = None, seed: int = 0,
                  data_dir: str | None = None) -> list[dict]:
    """Problems of one spec:
    - "gsm8k": datasets.load_dataset("openai/gsm8k", "main"), split train or test;
    - "synth-source" / "synth-target": the built-in problems (`limit` = how many, default
      12000 train / 200 test; `seed` picks them);
    - "synth-source-facts": synth-source with the equation given ("Answer: 8 + 5 =" in the
      prompt): the source's arithmetic alone, whatever operation the model would have chosen;
    - a .jsonl / .json file: GSM8K rows (question, answer ending in "#### N") or LLM-Adapters
      rows (instruction, input, output, answer); `split` is not used, a file is one split;
    - a folder: its <split>.jsonl / <split>.json, else every <name>/<split>.json in it (the
      LLM-Adapters `dataset/` layout), each dataset named after its folder;
    - a name such as svamp or math_10k: <data_dir>/<name>/<split>.json or <data_dir>/<name>.json
      (case, '-' and '_' ignored); data_dir defaults to $NANOPEFT_DATA or ./dataset.
    `limit` keeps the first `limit` problems of each dataset; above a dataset's size it means all of
    it (a note says so). Rows are checked as they are read (_to_problems)."""
    check_limit(limit)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"dataset spec {spec!r} is empty: name a dataset, a file or a folder")
    spec = spec.strip()
    if spec in ("synth-source", "synth-target"):
        problems = synthetic_problems(spec.removeprefix("synth-"), split, limit, seed)
    elif spec == "synth-source-facts":
        problems = [{**p, "given": p["solution"][:p["solution"].index(" =") + 2], "dataset": spec}
                    for p in synthetic_problems("source", split, limit, seed)]
    elif spec == "gsm8k":
        problems = _load_gsm8k_hub(split)
    else:
        path = Path(spec).expanduser()
        if not path.exists() and ("/" in spec or path.suffix in (".json", ".jsonl")):
            raise MissingData(f"data path {spec!r} does not exist")
        if not path.exists():
            path = _find_named(spec, split, data_dir)
        problems = _load_folder(path, split) if path.is_dir() else _load_file(path)
    return _first(problems, limit, split)


def _first(problems: list[dict], limit: int | None, split: str) -> list[dict]:
    """The first `limit` problems of each dataset, in order; a note names the datasets that have fewer."""
    if limit is None:
        return problems
    sizes = collections.Counter(p["dataset"] for p in problems)
    short = [f"{name} ({n})" for name, n in sizes.items() if n < limit]
    if short:
        print(f"note: limit {limit} is more than {', '.join(short)} {'has' if len(short) == 1 else 'have'} "
              f"({split} problems): all of them are used", file=sys.stderr)
    taken, out = collections.Counter(), []
    for p in problems:
        taken[p["dataset"]] += 1
        if taken[p["dataset"]] <= limit:
            out.append(p)
    return out


def load_all(data: str, split: str = "test", limit: int | None = None, seed: int = 0, data_dir: str | None = None,
             flag: str = "--data") -> list[dict]:
    """The problems of a comma-separated list of specs (load_problems each). Every spec must give
    its data: the missing ones are named together (never a silent subset), as are an empty list,
    an empty spec and two specs giving one dataset name."""
    specs = [s.strip() for s in str(data).split(",")]
    if not any(specs):
        raise ValueError(f"{flag} {data!r} names no dataset")
    if not all(specs):
        raise ValueError(f"{flag} {data!r} has an empty name between its commas")
    twice = [s for i, s in enumerate(specs) if s in specs[:i]]
    if twice:
        raise ValueError(f"{flag} {data!r} names {twice[0]!r} twice")
    problems, missing, source = [], [], {}
    for spec in specs:
        try:
            got = load_problems(spec, split, limit, seed, data_dir)
        except MissingData as e:
            missing.append((spec, str(e)))
            continue
        for name in dict.fromkeys(p["dataset"] for p in got):
            if name in source:
                raise ValueError(f"{flag}: {source[name]!r} and {spec!r} both give a dataset named {name!r}; "
                                 "evaluate them in two runs, or rename one")
            source[name] = spec
        problems += got
    if len(missing) == 1:
        raise ValueError(f"{flag}: {missing[0][1]}")
    if missing:
        raise ValueError(f"{flag}: {len(missing)} of {len(specs)} datasets are missing: "
                         f"{', '.join(repr(s) for s, _ in missing)} ({missing[0][1]})")
    return problems


def _load_gsm8k_hub(split: str) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} does not exist for gsm8k; splits: {', '.join(SPLITS)}")
    import datasets
    datasets.disable_progress_bars()
    try:
        rows = datasets.load_dataset(GSM8K_HUB, "main", split=split)
    except Exception as e:
        raise ConnectionError(f"could not load {GSM8K_HUB!r} from the Hugging Face hub ({_why(e)}); "
                              "without a network pass a local GSM8K-format .jsonl instead") from None
    return _to_problems(rows, f"{GSM8K_HUB} ({split})", "gsm8k")


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _norm(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def _find_named(spec: str, split: str, data_dir: str | None) -> Path:
    root = Path(data_dir or os.environ.get("NANOPEFT_DATA", "dataset")).expanduser()
    entries = sorted(root.iterdir()) if root.is_dir() else []
    names = {}  # normalised name -> path (a folder or a file)
    for e in entries:
        if e.is_dir() and any(f.suffix in (".json", ".jsonl") for f in e.iterdir()):
            names[_norm(e.name)] = e
        elif e.suffix in (".json", ".jsonl"):
            names.setdefault(_norm(e.stem), e)
    hit = names.get(_norm(spec))
    if hit is None:
        local = ", ".join(sorted(p.name if p.is_dir() else p.stem for p in names.values())) or "none"
        where = "" if root.is_dir() else ", which is no folder here"
        raise MissingData(f"unknown dataset {spec!r}; known: gsm8k, synth-source, synth-target, synth-source-facts, "
                          f"names under {str(root)!r} ({local}{where}), or a path to a .jsonl/.json file or folder")
    if hit.is_dir():
        for ext in (".json", ".jsonl"):
            if (hit / (split + ext)).exists():
                return hit / (split + ext)
        have = sorted(f.stem for f in hit.iterdir() if f.suffix in (".json", ".jsonl"))
        raise MissingData(f"split {split!r} does not exist for {spec!r} in {str(hit)!r}; splits: {', '.join(have)}")
    return hit


def _load_folder(path: Path, split: str) -> list[dict]:
    """<split>.jsonl / <split>.json in the folder, else every <name>/<split>.json(l); a <name>/ that
    holds data files but not this split is named (a folder never gives a silent subset of its sets)."""
    for ext in (".jsonl", ".json"):  # a folder holding train.jsonl / test.jsonl
        if (path / (split + ext)).exists():
            return _load_file(path / (split + ext))
    files, lacking = [], []
    for d in sorted((d for d in path.iterdir() if d.is_dir()), key=lambda d: d.name.lower()):
        data = sorted(f.name for f in d.iterdir() if f.suffix in (".json", ".jsonl"))
        mine = [d / (split + ext) for ext in (".json", ".jsonl") if (d / (split + ext)).exists()]
        if mine:
            files.append(mine[0])
        elif data:
            lacking.append(f"{d.name} ({', '.join(data)})")
    if not files:
        if lacking:
            have = sorted({f.stem for d in path.iterdir() if d.is_dir() for f in d.iterdir() if f.suffix in (".json", ".jsonl")})
            raise MissingData(f"split {split!r} does not exist in folder {str(path)!r}; it has: {', '.join(have)}")
        raise MissingData(f"folder {str(path)!r} holds no {split}.jsonl, {split}.json or <name>/{split}.json")
    if lacking:
        raise MissingData(f"folder {str(path)!r}: {len(lacking)} of its {len(files) + len(lacking)} sets have no "
                          f"{split}.json/.jsonl: {'; '.join(lacking)}; name the sets you want instead of the folder")
    return [p for f in files for p in _load_file(f)]


def _load_file(path: Path) -> list[dict]:
    """A GSM8K-format .jsonl (one row a line; blank lines skipped) or an LLM-Adapters .json list.
    Named after the file, or after its folder when the file is just <split>.json. Read with the json
    module: an error names the line, and no copy lands in datasets' cache."""
    if path.suffix not in (".json", ".jsonl"):
        raise ValueError(f"data file {str(path)!r} must be .jsonl or .json")
    name = (path.parent.name if path.stem in SPLITS else path.stem).lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"dataset {name!r} ({str(path)!r}) is empty")
    if path.suffix == ".jsonl":  # one JSON value a line ("\n" only: U+2028 may stand inside a string)
        rows = []
        for n, line in enumerate(text.split("\n"), 1):
            try:
                rows += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as e:
                raise ValueError(f"line {n} of {str(path)!r} is not JSON ({e.msg} at column {e.colno})") from None
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"cannot read {str(path)!r} as JSON ({e})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{str(path)!r} must hold a JSON list of rows (LLM-Adapters format), not {type(rows).__name__}")
    return _to_problems(rows, str(path), name)


def _strip_calculator(text: str) -> str:
    return re.sub(r"<<[^>]*>>", "", text)  # GSM8K's calculator annotations "48/2=<<48/2=24>>24"


RAW_KEYS = ("instruction", "input", "output", "question", "answer")
# A row's text fields are refused past this many characters: the longest problem of GSM8K and the
# LLM-Adapters sets is under 2,000, and 32,768 characters already fill a Llama-3 8K context.
# (A prompt still longer than a model's context is cut from the left at evaluation: evaluate.)
MAX_TEXT_CHARS = 32768
CHOICES = ("A", "B", "C", "D", "E")  # AQuA's options


def _short(value) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def _text(row: dict, key: str, at: str) -> str:
    """Field `key` of a row as text ('' when absent or null): another type, or more than
    MAX_TEXT_CHARS characters, is refused naming the file, row and field."""
    v = row.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise ValueError(f"{at}: {key!r} must be text, not {type(v).__name__} {_short(v)}")
    if len(v) > MAX_TEXT_CHARS:
        raise ValueError(f"{at}: {key!r} has {len(v):,} characters; at most {MAX_TEXT_CHARS:,} are read "
                         "(no math problem is that long)")
    return v


def _gold(value, at: str) -> str:
    """A final answer as scored: a finite number (',' removed) or an option letter A-E; anything
    else could never be scored correct, and is refused naming the file, row and value."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{at}: the final answer {_short(value)} is not a number nor an option letter A-E")
    text = str(value).replace(",", "").strip()
    if text in CHOICES:
        return text
    try:
        ok = math.isfinite(float(text))
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{at}: the final answer {_short(value)} is not a number nor an option letter A-E "
                         "(it could never be scored correct)")
    return text


def _to_problems(rows, where: str, name: str) -> list[dict]:
    """Rows of either format -> problems, each row checked where it is read: an object with the
    fields its format needs, text where text belongs (_text), a final answer that can be scored
    (_gold); errors name the file, the row (0-based) and the field or value. `question` is stripped
    (nanopeft's prompt); `raw` keeps the row's fields as the file has them: every MultiArith
    instruction starts and ends with a space, every AddSub one ends with one, and the lift-authors
    protocol puts them in its prompt unchanged."""
    problems = []
    for i, row in enumerate(rows):
        at = f"row {i} of {where}"
        if not isinstance(row, dict):
            raise ValueError(f"{at} is {type(row).__name__} {_short(row)}, not an object with question/instruction fields")
        texts = {k: _text(row, k, at) for k in ("instruction", "input", "output", "question")}
        raw = {k: row[k] for k in RAW_KEYS if k in row}
        answer = row.get("answer")
        if texts["instruction"].strip():  # LLM-Adapters: instruction, input, output, answer
            if answer is None or str(answer).strip() == "":
                raise ValueError(f"{at} has no 'answer' (LLM-Adapters rows need instruction and answer)")
            if isinstance(answer, str):
                _text(row, "answer", at)
            problems.append(dict(question=texts["instruction"].strip(), input=texts["input"].strip(),
                                 answer=_gold(answer, at), solution=texts["output"].strip() or None, dataset=name,
                                 template="alpaca", raw=raw))
        elif texts["question"].strip():   # GSM8K: question, answer = solution ending in "#### N"
            answer = _text(row, "answer", at)
            if "####" not in answer:
                raise ValueError(f"{at} has no answer ending in '#### N' (GSM8K rows need question and answer)")
            solution = _strip_calculator(answer).strip()
            problems.append(dict(question=texts["question"].strip(), answer=_gold(solution.rsplit("####", 1)[1].strip(), at),
                                 solution=solution, dataset=name, template="alpaca", raw=raw))
        elif "instruction" in row or "question" in row:
            raise ValueError(f"{at}: its {'instruction' if 'instruction' in row else 'question'} is empty")
        else:
            raise ValueError(f"{at} has neither 'question' (GSM8K) nor 'instruction' (LLM-Adapters)")
    if not problems:
        raise ValueError(f"dataset {name!r} ({where}) has no problems")
    return problems

# -----------------------------------------------------------------------------
# prompt and training target
# nanopeft's own two templates, chosen by problem["template"]:
# - "alpaca": a clean form of the Alpaca instruction template LLM-Adapters trains and tests with
#   (MATH-10K and its test sets, and GSM8K), the question stripped. It is NOT the LIFT authors'
#   text byte for byte (their literal "<s> ", the space after "request.", the unstripped
#   instruction): that is AUTHORS_PROMPT below, used by the lift-authors protocol.
# - "qa": "Question: ...\nAnswer:" for the built-in synthetic problems (short, for a byte model).
# The prompt/target boundary tokenizes cleanly: "qa" prompts end in "Answer:" and targets start
# with " " (a digit follows), "alpaca" prompts end in "### Response:\n" and targets start with a
# non-space; in both cases Llama-3's pre-tokenizer splits exactly at the boundary, so
# encode(prompt) + encode(target) == encode(prompt + target), and trivially so for bytes.

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
STOP_STRINGS = ("\nQuestion:", "### Instruction:", "Below is an instruction")  # a new problem begins (< 24 chars)

# The LIFT authors' own texts ("lift-authors"), as read in zihanghliu/LIFT: the evaluation prompt
# of src/eval/run_math_parallel.py (`i_prompt`) and the training prompt of src/utils/data_utils.py
# (`BASE_PROMPT`). They are not the same text: the training one has two spaces after "request." and
# a line of 16 spaces before "### Response:", the evaluation one a single space and an empty line.
# Both begin with the literal text "<s> ". Their tokenizer (utils/model_utils.py) is
# AutoTokenizer.from_pretrained(name, add_bos_token=False), but their pinned transformers 4.45.2
# ignores add_bos_token for Llama-3's tokenizer class (PreTrainedTokenizerFast): its tokenizer.json
# post-processor still puts <|begin_of_text|> first (huggingface/transformers#30947), and "<s>" is
# no token of Llama-3's vocabulary. So their sequences are BOS, then the text "<s> Below is ...":
# nanopeft's encode(text, bos=True) on a Llama-3 tokenizer gives exactly that. (On Llama-2, where
# "<s>" is the BOS token's text, it would be read as BOS; nanopeft has no SentencePiece tokenizer.)
AUTHORS_PROMPT = ("<s> Below is an instruction that describes a task. Write a response that appropriately "
                  "completes the request. \n\n### Instruction:\n{instruction}\n\n### Response:\n")
AUTHORS_TRAIN_PROMPT = ("<s> Below is an instruction that describes a task. Write a response that appropriately "
                        "completes the request.  \n\n### Instruction:\n{instruction}\n" + " " * 16
                        + "\n### Response:\n")


def format_prompt(problem: dict, protocol: str = "nanopeft") -> str:
    """The text the model sees. nanopeft and llm-adapters: nanopeft's templates (training uses them
    too); a problem with a `given` start of its solution (synth-source-facts) has it in the prompt.
    lift-authors: AUTHORS_PROMPT around the row's instruction as the file has it."""
    if protocol == "lift-authors":
        return AUTHORS_PROMPT.format(instruction=authors_instruction(problem))
    if problem.get("template", "alpaca") == "qa":
        return f"Question: {problem['question']}\nAnswer:" + (" " + problem["given"] if problem.get("given") else "")
    if problem.get("input"):
        return ALPACA_INPUT.format(instruction=problem["question"], input=problem["input"])
    return ALPACA.format(instruction=problem["question"])


def format_target(problem: dict) -> str:
    """What the model is trained to write after the prompt: the worked solution (ending in
    "#### N" for GSM8K and the synthetic data, "The answer is N" for MATH-10K), else just
    "The answer is N". Training sequence = encode(prompt, bos=True) + encode(target, eos=True)."""
    text = problem.get("solution") or f"The answer is {problem['answer']}"
    if problem.get("given"):
        return text[len(problem["given"]):]  # " 13.\n#### 13" after "8 + 5 ="
    return (" " + text) if problem.get("template", "alpaca") == "qa" else text


def authors_instruction(problem: dict, training: bool = False) -> str:
    """The instruction the LIFT authors' scripts put in their prompt, unstripped. Evaluation: the
    row's "instruction" (run_math_parallel.py fills i_prompt with format_map(row): "input" is never
    read); a GSM8K row, which they read from LLM-Adapters' gsm8k/test.json and we may read from
    GSM8K itself, gives its "question". Training (data_utils.py's get_instruction_or_prompt, the
    second of its two definitions, which is the one Python keeps): a non-empty "input" first, then
    "instruction", then "question". Built-in problems have no raw row: their question."""
    raw = problem.get("raw") or {}
    if training and raw.get("input"):
        return str(raw["input"])
    for key in ("instruction", "question"):
        if key in raw:
            return str(raw[key])
    return problem["question"]


def authors_target(problem: dict) -> str:
    """The LIFT authors' training target text (data_utils.py): the row's "output" as the file has it
    (LLM-Adapters rows: its leading newline kept), else a GSM8K answer cut before "####" and stripped,
    its calculator annotations "<<48/2=24>>" kept (built-in problems: their solution, alike); "</s>"
    removed; then " " (they append f" {eos_token}": the end-of-text token comes from encode(eos=True))."""
    raw = problem.get("raw") or {}
    if "output" in raw:
        text = str(raw["output"] or "")
    else:
        text = str(raw.get("answer") or problem.get("solution") or f"The answer is {problem['answer']}")
        text = text.split("####")[0].strip()
    return text.replace("</s>", "") + " "


TRAIN_FORMATS = ("nanopeft", "lift-authors")  # --train-format: how a training example is written


def training_pair(problem: dict, fmt: str = "nanopeft") -> tuple[str, str]:
    """(prompt, target) of one training example in format `fmt` (TRAIN_FORMATS); the loss is on the
    target. "nanopeft": the evaluation's own prompt and format_target. "lift-authors": the LIFT
    authors' BASE_PROMPT (AUTHORS_TRAIN_PROMPT) and authors_target. Token ids: training_ids."""
    if fmt not in TRAIN_FORMATS:
        raise ValueError(f"unknown training format {fmt!r}; known: {', '.join(TRAIN_FORMATS)}")
    if fmt == "lift-authors":
        prompt = AUTHORS_TRAIN_PROMPT.format(instruction=authors_instruction(problem, training=True))
        return prompt, authors_target(problem)
    return format_prompt(problem), format_target(problem)


def training_ids(tok, problem: dict, fmt: str = "nanopeft") -> tuple[list[int], list[int]]:
    """(prompt ids, target ids) of one training example; the loss is on the target ids, the last of
    which is end-of-text. "nanopeft": encode(prompt, bos) + encode(target, eos), its boundary being
    clean. "lift-authors": as their data_utils.py tokenizes, the whole text at once, and the prompt's
    own token count masked. That is not encode(prompt) + encode(target) on Llama-3: LLM-Adapters
    outputs begin with a newline, and Llama-3's pre-tokenizer joins it to the prompt's last token
    (colon and newline) into one token (colon and two newlines), which their mask then covers (the
    prompt alone has as many tokens)."""
    prompt, target = training_pair(problem, fmt)
    if fmt == "nanopeft":
        return tok.encode(prompt, bos=True), tok.encode(target, eos=True)
    # their text ends f"{output} {eos_token}": transformers reads the eos token's text as its id
    ids = tok.encode(prompt + target, bos=True, eos=True)
    n = len(tok.encode(prompt, bos=True))
    return ids[:n], ids[n:]

# -----------------------------------------------------------------------------
# answer extraction and scoring

NUMBER = r"-?\d+\.?\d*"  # the number regex of LLM-Adapters' and the LIFT authors' evaluate scripts

# Three scoring protocols (docs/evaluation.md compares them row by row):
# - "nanopeft" (the default): nanopeft's prompt; the first "#### N", else the first "The answer is
#   N", else the last number (',' and '$' removed); a letter only in an answer-like position
#   (CHOICE_PATTERNS below); greedy; a response ends at end-of-text or a stop string.
# - "lift-authors": the LIFT authors' math evaluation, src/eval/run_math_parallel.py in
#   zihanghliu/LIFT, reproduced: their prompt (AUTHORS_PROMPT), 4-beam search and 256 new tokens
#   (their GenerationConfig: num_beams=4, with temperature / top_p / top_k set but unused, as
#   do_sample stays False), a response ends at the tokenizer's end-of-text token only (their
#   KeyWordsCriteria is given the eos token's *text* where it compares ids, so it never fires), the
#   text is decoded as theirs (authors_text); the last number after removing ',' only ("-$5"
#   reads 5), no number is wrong, |pred - gold| <= 0.001; AQuA: the first capital A-E of the
#   stripped response, any capital A-E, inside a word or not.
# - "llm-adapters": nanopeft's prompt, stop strings and 512 tokens with LLM-Adapters' answer rules
#   (the last number, the first capital A-E, 4 beams), but with '$' removed as nanopeft does. An
#   approximation kept for comparison, not the same as LLM-Adapters' evaluate.py nor as the
#   authors' script: use "lift-authors" to compare with the LIFT paper's table.
# They differ: "The answer is 12 - 4 = 8." scores 12 under nanopeft and 8 under the other two.
# evaluate() records the protocol and the decoding (greedy, or beam search: generate.beam_search,
# equal to transformers').
PROTOCOLS = ("nanopeft", "llm-adapters", "lift-authors")


def extract_answer(completion: str, protocol: str = "nanopeft") -> float | None:
    """The number a completion answers with under `protocol` (see PROTOCOLS); None when there is
    no number at all (their float('inf'), which no gold is within 0.001 of)."""
    if protocol == "lift-authors":  # run_math_parallel.py extract_answer_number: ',' removed, '$' kept
        numbers = re.findall(NUMBER, completion.replace(",", ""))
        return float(numbers[-1]) if numbers else None
    text = completion.replace(",", "").replace("$", "")
    if protocol == "nanopeft":
        m = re.search(r"####\s*(" + NUMBER + ")", text) or re.search(r"(?i:answer is)\s*:?\s*(" + NUMBER + ")", text)
        if m:
            return float(m.group(1))
    numbers = re.findall(NUMBER, text)
    return float(numbers[-1]) if numbers else None


# LLM-Adapters and the LIFT authors take the first capital A-E anywhere, so "Answer: (C)" scores as
# A and any sentence starting with "A" or "All" scores as A. Here only a letter in an answer-like position
# counts: "#### C", "answer is (C)", "option C", "(C)", "C)", or a completion that is just "C";
# patterns are tried in that order and the first match of the first pattern that matches wins.
CHOICE_PATTERNS = (
    r"####\s*\(?([A-E])\b",
    r"(?i:answer is)\s*:?\s*(?i:option\s*)?\(?([A-E])\b",
    r"(?i:option)\s*\(?([A-E])\b",
    r"\(([A-E])\)",
    r"\b([A-E])\)",
    r"^\s*([A-E])\s*[.):]?\s*$",
)


def extract_choice(completion: str, protocol: str = "nanopeft") -> str | None:
    """The option letter (A-E) a completion picks under `protocol`, or None."""
    if protocol in ("llm-adapters", "lift-authors"):
        # their extract_answer_letter: the first match of 'A|B|C|D|E' in the stripped response
        m = re.search(r"[A-E]", completion.strip())
        return m.group(0) if m else None
    for pattern in CHOICE_PATTERNS:
        m = re.search(pattern, completion)
        if m:
            return m.group(1)
    return None


def check_protocol(protocol: str):
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")


def is_choice(problem: dict) -> bool:
    return problem["answer"] in CHOICES


def is_correct(pred, gold) -> bool:
    """Letters must be equal; numbers within 1e-3 (LLM-Adapters' and the LIFT authors' scripts:
    abs(gold - pred) <= 0.001)."""
    gold = str(gold).strip()
    if pred is None:
        return False
    if gold in CHOICES or isinstance(pred, str) and pred in CHOICES:
        return pred == gold
    try:
        return abs(float(pred) - float(gold.replace(",", ""))) <= 1e-3
    except ValueError:
        return str(pred).strip() == gold

# -----------------------------------------------------------------------------
# evaluation

STOP_CHECK = 8  # generated tokens between two looks for a stop string in a row's text


def default_max_new_tokens(problems: list[dict], protocol: str = "nanopeft") -> int:
    """lift-authors: 256 (max_new_tokens=256 in their script). Otherwise 512 unless every problem
    is a built-in "qa" problem with a solution: then 1.5x the longest target in bytes (>= its
    tokens) + 16, so the built-in data decodes ~50 tokens, not 512. Alpaca-template data (GSM8K,
    LLM-Adapters) always gets 512, whatever --limit (the HyperAdapt paper's limit)."""
    if protocol == "lift-authors":
        return 256
    if problems and all(p.get("solution") and p.get("template", "alpaca") == "qa" for p in problems):
        longest = max(len(format_target(p).encode()) for p in problems)
        return min(512, longest + longest // 2 + 16)
    return 512


def _cut_at_stop(text: str) -> tuple[str, bool]:
    cuts = [text.find(s) for s in STOP_STRINGS if s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


# transformers' clean_up_tokenization (4.45.2, the authors' pinned version), which their decode
# applies: every Llama-3 tokenizer_config.json on the Hub sets clean_up_tokenization_spaces: true
HF_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
              (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def authors_text(tokenizer, ids: list[int]) -> str:
    """A response's text as the LIFT authors' generate_completions makes it: batch_decode of prompt +
    output with skip_special_tokens=True (every special token dropped, wherever it stands), the
    decoded prompt's length cut off, and HF_CLEANUP applied (their decode's clean-up). Their prompt
    ends in a newline and every clean-up pattern starts with a space, so cleaning the whole and
    cutting the prompt off equals cleaning the response's text alone: no "### Response:" split, no
    stop string, no strip."""
    special = set(tokenizer.special_tokens.values())
    text = tokenizer.decode([i for i in ids if i not in special])
    for a, b in HF_CLEANUP:
        text = text.replace(a, b)
    return text


def complete(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, num_beams: int = 1,
             protocol: str = "nanopeft") -> list[str]:
    """Completions of token prompts. nanopeft / llm-adapters: stopped at a stop id of the tokenizer or
    a stop string. Greedy: generate looks at each running row's text every STOP_CHECK tokens and
    drops a row that has one from the batch, so every prompt is prefilled once; num_beams > 1: beam
    search, cut at the first stop string afterwards. lift-authors: stopped at the tokenizer's
    end-of-text token alone (their generate(eos_token_id=tokenizer.eos_token_id)), never cut, and
    decoded as theirs (authors_text)."""
    if protocol == "lift-authors":
        outs = generate(model, prompts, max_new_tokens, [tokenizer.eos_id], tokenizer.pad_id, num_beams=num_beams)
        return [authors_text(tokenizer, ids) for ids in outs]

    def has_stop(i, ids):  # only the tail can hold a stop string the last look did not see (each <= 24 tokens)
        return _cut_at_stop(tokenizer.decode(ids[-(STOP_CHECK + 24):]))[1]
    outs = generate(model, prompts, max_new_tokens, tokenizer.stop_ids, tokenizer.pad_id,
                    stop=has_stop if num_beams == 1 else None, check_every=STOP_CHECK, num_beams=num_beams)
    return [_cut_at_stop(tokenizer.decode(ids))[0] for ids in outs]


def decoding(protocol: str, num_beams: int | None) -> int:
    """The beam count of an evaluation: --num-beams if given, else 4 for lift-authors (their script's
    num_beams=4; the LIFT paper itself states no decoding) and llm-adapters (LLM-Adapters'
    evaluate.py), 1 (greedy) for nanopeft's."""
    if num_beams is not None:
        return num_beams
    return 4 if protocol in ("llm-adapters", "lift-authors") else 1


MAX_BEAMS = 64  # each beam is a full copy of its prompt's KV cache; the papers' evaluations use 4


def check_decoding(max_seq_len: int, max_new_tokens: int | None, num_beams: int | None, batch_size: int,
                   protocol: str) -> None:
    """The decoding settings against the model's context, before anything is allocated: one-line
    ValueErrors naming the flag, its value and what is allowed. A prompt needs at least one of the
    model's max_seq_len positions, so max_new_tokens < max_seq_len; beams are capped at MAX_BEAMS (the
    KV cache grows with batch x beams x positions; generate checks that product against free memory
    with the model in hand). None means the protocol's default (default_max_new_tokens, decoding)."""
    check_protocol(protocol)
    if max_seq_len < 2:
        raise ValueError(f"the model has {max_seq_len} position(s): no room for a prompt and a new token")
    for flag, value, low in (("--eval-batch-size", batch_size, 1), ("--max-new-tokens", max_new_tokens, 1),
                             ("--num-beams", num_beams, 1)):
        if value is None and flag != "--eval-batch-size":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{flag} {value!r} is not allowed: it must be a whole number >= {low}")
    if max_new_tokens is not None and max_new_tokens >= max_seq_len:
        raise ValueError(f"--max-new-tokens {max_new_tokens} is not allowed: the model has {max_seq_len} positions and "
                         f"the prompt needs at least one, so it must be < {max_seq_len}")
    if num_beams is not None and num_beams > MAX_BEAMS:
        raise ValueError(f"--num-beams {num_beams} is not allowed: at most {MAX_BEAMS} (each beam keeps its own copy of "
                         "the prompt's KV cache; the papers' evaluations use 4)")


PROMPT_RULE = "their beginning is cut: the last tokens, the question's end and the cue to answer, are kept"


def cut_left(ids: list[int], room: int, bos_id: int | None = None) -> list[int]:
    """The last `room` tokens of a prompt (PROMPT_RULE), its BOS token kept first if it has one."""
    if len(ids) <= room:
        return ids
    if bos_id is not None and ids and ids[0] == bos_id and room > 1:
        return [bos_id] + ids[len(ids) - room + 1:]
    return ids[len(ids) - room:]


def evaluate(model, tokenizer, problems: list[dict], batch_size: int = 32, max_new_tokens: int | None = None,
             progress: bool = True, protocol: str = "nanopeft", num_beams: int | None = None) -> dict:
    """Answers to every problem, scored under `protocol` (PROTOCOLS), decoded greedily or with
    `num_beams` beams (default: decoding(protocol, None)). Each dataset is
    decoded in batches of prompts of similar length (sorted longest first: little padding, peak
    memory first). Returns {"datasets": {name: {n, correct, accuracy, seconds, problems_per_s}},
    "average": mean accuracy over datasets, "batch_size", "max_new_tokens", "protocol",
    "decoding", "predictions": [{dataset, question, completion, extracted, gold, correct}] in the
    order of `problems`}. Prompt, stop rule, default length and answer rules follow `protocol`.
    Within the model's context (max_seq_len): settings checked first (check_decoding), a default
    length of at most half the context, and PROMPT_RULE for longer prompts."""
    if not problems:
        raise ValueError("evaluate got no problems")
    ctx = model.config.max_seq_len
    check_decoding(ctx, max_new_tokens, num_beams, batch_size, protocol)
    num_beams = decoding(protocol, num_beams)
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(problems, protocol)
        if max_new_tokens > ctx // 2:
            print(f"note: the default of {max_new_tokens} new tokens is more than half the model's {ctx} positions; "
                  f"decoding {ctx // 2}", file=sys.stderr)
            max_new_tokens = ctx // 2
    was_training = model.training
    model.eval()
    predictions, results = [None] * len(problems), {}
    for name in dict.fromkeys(p["dataset"] for p in problems):
        idx = [i for i, p in enumerate(problems) if p["dataset"] == name]
        # bos=True: the tokenizer's own default, which is what the authors' call gets (see AUTHORS_PROMPT)
        prompts = {i: tokenizer.encode(format_prompt(problems[i], protocol), bos=True) for i in idx}
        room, cut = ctx - max_new_tokens, [i for i in idx if len(prompts[i]) > ctx - max_new_tokens]
        for i in cut:
            prompts[i] = cut_left(prompts[i], room, tokenizer.bos_id)
        if cut:
            print(f"note: {len(cut)} of {len(idx)} {name} prompts are longer than {room} tokens (the model's {ctx} "
                  f"positions less {max_new_tokens} new tokens); {PROMPT_RULE}", file=sys.stderr)
        order = sorted(idx, key=lambda i: -len(prompts[i]))
        t0, last = time.time(), 0.0
        for b in range(0, len(order), batch_size):
            batch = order[b:b + batch_size]
            texts = complete(model, tokenizer, [prompts[i] for i in batch], max_new_tokens, num_beams, protocol)
            for i, text in zip(batch, texts):
                p = problems[i]
                pred = extract_choice(text, protocol) if is_choice(p) else extract_answer(text, protocol)
                predictions[i] = dict(dataset=name, question=p["question"], completion=text, extracted=pred,
                                      gold=p["answer"], correct=is_correct(pred, p["answer"]))
            now, k = time.time(), b + len(batch)
            if progress and (now - last > 2 or k == len(order)):
                print(f"  {name}: {k}/{len(order)} problems, {k / (now - t0):.1f}/s", file=sys.stderr, flush=True)
                last = now
        seconds = time.time() - t0
        correct = sum(predictions[i]["correct"] for i in idx)
        results[name] = dict(n=len(idx), correct=correct, accuracy=correct / len(idx), seconds=seconds,
                             problems_per_s=len(idx) / max(seconds, 1e-9))
    model.train(was_training)
    return dict(datasets=results, average=sum(r["accuracy"] for r in results.values()) / len(results),
                batch_size=batch_size, max_new_tokens=max_new_tokens, protocol=protocol,
                decoding="greedy" if num_beams == 1 else f"beam search, {num_beams} beams", predictions=predictions)


def print_table(metrics: dict, file=None):
    """dataset, n, correct, accuracy (%), problems/s; an average row when there are several."""
    file = file or sys.stdout
    rows = metrics["datasets"]
    w = max(12, *(len(n) for n in rows))
    print(f"{'dataset':<{w}} {'n':>6} {'correct':>8} {'accuracy':>9} {'problems/s':>11}", file=file)
    for name, r in rows.items():
        print(f"{name:<{w}} {r['n']:>6} {r['correct']:>8} {100 * r['accuracy']:>8.1f}% {r['problems_per_s']:>11.1f}",
              file=file)
    if len(rows) > 1:
        print(f"{'average':<{w}} {'':>6} {'':>8} {100 * metrics['average']:>8.1f}%", file=file)

# -----------------------------------------------------------------------------
# CLI


class Parser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, bad value, bad choice) raise a one-line ValueError instead
    of printing the usage block: a command line prints `error: ...` and exits 2, like any bad input.
    Every command line of the project uses it (eval_math's, train.py's through cli.py, the experiments)."""

    def error(self, message):
        if message.endswith("expected one argument"):  # argparse takes -1e-3 for a flag
            message += " (a value that starts with '-' is written --flag=VALUE, e.g. --lr=-1e-3)"
        raise ValueError(message)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Accuracy of a model on math word problems (decoding and scoring: --protocol).")
    p.add_argument("--model", default="tiny",
                   help="model folder, a .gguf file, smollm2-135m, or a preset name (random init)")
    p.add_argument("--data", default="synth-source,synth-target",
                   help="comma-separated: gsm8k, synth-source, synth-target, synth-source-facts, a name under "
                        "--data-dir, a file or folder")
    p.add_argument("--split", default="test", help="train or test (a folder of your own may hold others)")
    p.add_argument("--limit", type=int, default=None,
                   help="first N problems of each dataset (more than a dataset has: all of it)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: lift-authors 256; else 512, or ~1.5x the longest built-in solution (at most half "
                        "the model's context); must be less than the model's context")
    p.add_argument("--protocol", default="nanopeft", choices=PROTOCOLS,
                   help="nanopeft (first '#### N', greedy), lift-authors (the LIFT authors' script exactly: their "
                        "prompt, 4 beams, 256 tokens, last number, first capital A-E) or llm-adapters (an "
                        "approximation of LLM-Adapters' rules; see docs/evaluation.md)")
    p.add_argument("--num-beams", type=int, default=None,
                   help=f"beams (1 = greedy, at most {MAX_BEAMS}); default: the protocol's")
    p.add_argument("--out", default="out/eval", help="folder for predictions.jsonl and metrics.json")
    p.add_argument("--data-dir", default=None, help="where dataset names are looked up ($NANOPEFT_DATA or ./dataset)")
    p.add_argument("--seed", type=int, default=0, help="picks the synthetic problems (and a preset's init)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 where the device has native bf16 (CUDA, AVX512-BF16/AMX CPUs), "
                        "float32 otherwise")
    return p


def main(argv=None):
    """The command line: bad input is one line on stderr (`error: ...`) and exit status 2, found
    before the model loads wherever the model is not needed to judge it."""
    import torch
    try:
        args = build_parser().parse_args(argv)
        metrics, out = run(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except torch.OutOfMemoryError as e:
        print(f"error: out of memory on the device ({str(e).splitlines()[0][:200]}); use a smaller --batch-size "
              "or fewer --num-beams", file=sys.stderr)
        sys.exit(2)
    except (ValueError, OSError, ConnectionError, ImportError) as e:
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out / 'predictions.jsonl'} and {out / 'metrics.json'}", file=sys.stderr)


def check_at_least(args, **least):
    """Each named flag of `args` is unset or at least its bound: one line naming the flag otherwise."""
    for flag, bound in least.items():
        value = vars(args)[flag]
        if value is not None and value < bound:
            raise ValueError(f"--{flag.replace('_', '-')} {value} is not allowed: it must be >= {bound}")


def check_device(device: str) -> str:
    """--device: cpu, cuda / cuda:N of a GPU that exists here, or mps where available; the torch
    device string. A name torch does not know, or a device this machine lacks, is one line."""
    import torch
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {device}: no Apple GPU (mps) is available here; use --device cpu")
    elif d.type != "cpu":
        raise ValueError(f"--device {device}: not supported; use cpu, cuda or cuda:N")
    return str(d)


def run(args):
    """The CLI's work: every setting checked before the model loads (the data read and checked too),
    then the decoding settings against the model's context, and its weights finite; (metrics, folder)."""
    import torch
    from weights import check_finite
    check_at_least(args, batch_size=1, max_new_tokens=1, limit=1, num_beams=1)
    check_decoding(sys.maxsize, args.max_new_tokens, args.num_beams, args.batch_size, args.protocol)
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed {args.seed} is not allowed: 0 <= seed < 2**63")
    if not args.out.strip():
        raise ValueError("--out '' names no folder")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out} is a file, not a folder for predictions.jsonl and metrics.json")
    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype == "float16" and not device.startswith("cuda"):
        raise ValueError(f"--dtype float16 on {device}: CPUs have no fast fp16 matrix products; use float32 or "
                         "bfloat16 there (float16 is for CUDA GPUs)")
    dtype = getattr(torch, args.dtype or ("bfloat16" if bf16_fast(device) else "float32"))
    problems = load_all(args.data, args.split, args.limit, args.seed, args.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load(args.model, dtype=dtype, device=device, seed=args.seed)
    check_finite(model, args.model)
    check_decoding(model.config.max_seq_len, args.max_new_tokens, args.num_beams, args.batch_size, args.protocol)
    names = sorted({p["dataset"] for p in problems})
    print(f"{len(problems)} problems ({', '.join(names)}), model {args.model}, batch {args.batch_size}", file=sys.stderr)
    metrics = evaluate(model, tokenizer, problems, args.batch_size, args.max_new_tokens, protocol=args.protocol,
                       num_beams=args.num_beams)
    print_table(metrics)
    print(f"protocol {metrics['protocol']}, {metrics['decoding']}, {metrics['max_new_tokens']} new tokens at most")
    with open(out / "predictions.jsonl", "w") as f:
        for p in metrics["predictions"]:
            f.write(json.dumps(p) + "\n")
    summary = {k: v for k, v in metrics.items() if k != "predictions"}
    (out / "metrics.json").write_text(json.dumps({**summary, "args": {**vars(args), "device": device}}, indent=2))
    return metrics, out


if __name__ == "__main__":
    main()
