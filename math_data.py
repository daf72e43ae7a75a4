"""
The math word problems: the built-in synthetic ones (addition and subtraction for the source task,
multiplication for the target) and loading real ones (GSM8K through `datasets`, GSM8K-format .jsonl,
LLM-Adapters .json files and folders, a dataset name under $NANOPEFT_DATA), each row checked where it
is read (file, row and field named). Prompts, answer extraction and evaluation are eval_math.py's.

A problem is a dict: question, answer (gold final answer as text: a number or an option letter
A-E), solution (worked solution used as the training target, or None), dataset (its name),
template ("alpaca" or "qa", see eval_math.format_prompt), for LLM-Adapters rows input, and for rows
read from a file raw (the row's text fields unstripped, as the LIFT authors' scripts read them).
"""
import collections
import functools
import json
import math
import os
import random
import re
import sys
import zlib
from pathlib import Path

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
