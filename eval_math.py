"""
Evaluating on math word problems (the problems themselves: math_data.py): the prompt templates and
training formats, answer extraction and scoring under three protocols (nanopeft's own;
"lift-authors", the LIFT authors' evaluation script reproduced; "llm-adapters", an approximation of
LLM-Adapters' rules), batched greedy or beam evaluation within the model's context, the accuracy
table, and a CLI:

    python eval_math.py --model out/lift --data synth-source,synth-target
    python eval_math.py --model ~/Llama-3.2-1B --data gsm8k,svamp --data-dir ~/LLM-Adapters/dataset
    python eval_math.py --model out/lift --protocol lift-authors --data-dir ~/LLM-Adapters/dataset \\
        --data MultiArith,gsm8k,AddSub,AQuA,SingleEq,SVAMP,mawps     # the LIFT authors' seven sets
"""
import argparse
import json
import re
import sys
import time
from pathlib import Path

from generate import generate
from math_data import CHOICES, load_all
from model import bf16_fast
from weights import load

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
    elif d.index is not None:
        raise ValueError(f"--device {device!r} is not allowed: cpu takes no number; use cpu, cuda or cuda:N")
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
