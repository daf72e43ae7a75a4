"""
Byte-level BPE tokenizers on tiktoken: Meta's Llama-3 `tokenizer.model`, any Hugging Face byte-level
BPE `tokenizer.json` (Llama-3, GPT-2, SmolLM2, Qwen, ...), the vocabulary inside a llama.cpp GGUF
file, and the built-in byte vocabulary of the tiny model (no download).

tiktoken merges the adjacent pair whose concatenation has the lowest rank; Hugging Face's BPE
merges the pair listed first in `merges`. The two agree when a token's id is the position of the
merge that creates it, which is how byte-level BPE vocabularies are built, so rank = token id
(checked on load: a vocabulary in another order is refused, never tokenized differently).
"""
import functools
import json
import shutil
import unicodedata
from pathlib import Path

LLAMA3_PAT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
GPT2_PAT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"  # ByteLevel(use_regex)
QWEN2_PAT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# llama.cpp's tokenizer.ggml.pre names -> the split regex (a GGUF stores the name only). For names with a
# Digits step as well (smollm, starcoder) transformers' GGUF loader applies GPT-2's regex alone; so do we.
GGUF_PRE = {"llama-bpe": LLAMA3_PAT, "llama3": LLAMA3_PAT, "qwen2": QWEN2_PAT, "gpt2": GPT2_PAT, "default": GPT2_PAT,
            "smollm": GPT2_PAT, "starcoder": GPT2_PAT}
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
BOS_NAMES = ("<|begin_of_text|>", "<s>")  # tokenizers that name one of these put it at the start
END_NAMES = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>", "<|endoftext|>", "<|im_end|>", "</s>")  # end generation


def byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the printable character that stands for each byte."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in visible]
    return {chr(b): b for b in visible} | {chr(256 + i): b for i, b in enumerate(extra)}


def _malformed(read):
    """For a reader of a vocabulary file (its last argument: the file's path): a structure other than
    it expects (a key missing, a list where an object belongs) is one ValueError naming the file,
    not a KeyError / TypeError traceback."""
    @functools.wraps(read)
    def checked(cls, *args):
        try:
            return read(cls, *args)
        except (KeyError, TypeError, AttributeError, IndexError) as e:
            raise ValueError(f"{str(args[-1])!r} is malformed ({type(e).__name__}: {str(e)[:160]})") from None
    return checked


class Tokenizer:
    """tiktoken BPE plus what a model needs around it: bos/eos/pad ids, the ids that end a
    generation (`stop_ids`), whether a sequence starts with bos, and how to save it beside a model."""

    def __init__(self, name: str, ranks: dict, special_tokens: dict, pat_str: str, bos: str | None, eos: str,
                 pad: str, stops: list[str], source: str | None = None, add_bos: bool = True,
                 split_digits: bool = False, n_vocab: int | None = None, unk_id: int | None = None,
                 normalizer: str | None = None, prefix_space: bool = False, hf: dict | None = None):
        import tiktoken
        self.model = tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special_tokens)
        self.source = source  # the file it came from (tokenizer.model / tokenizer.json / .gguf); None for bytes
        self.special_tokens = special_tokens
        self.bos_id = special_tokens[bos] if bos is not None else None
        self.eos_id, self.pad_id = special_tokens[eos], special_tokens[pad]
        self.stop_ids = sorted({special_tokens[s] for s in stops})
        self.add_bos = add_bos and self.bos_id is not None
        self.split_digits, self.unk_id = split_digits, unk_id
        self.normalizer, self.prefix_space = normalizer, prefix_space
        # ids >= n_vocab are bytes the vocabulary lacks (ranked after it so tiktoken can run):
        # Hugging Face maps them to unk, or drops them when there is none
        self.n_vocab = n_vocab or self.model.n_vocab
        self.hf = hf  # {"tokenizer.json": dict, "tokenizer_config.json": dict} written by save()

    # -- the built-in vocabulary and Meta's file ------------------------------------------------

    @classmethod
    def bytes(cls) -> "Tokenizer":
        """256 single-byte tokens (rank = byte value, so no merges ever apply) + 3 specials."""
        specials = {"<|begin_of_text|>": 256, "<|end_of_text|>": 257, "<|pad|>": 258}
        return cls("nanopeft-bytes", {bytes([i]): i for i in range(256)}, specials, r"[\s\S]+",
                   "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", ["<|end_of_text|>"])

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        """Llama-3 `tokenizer.model`: base64 token + rank per line, then Meta's 256 specials."""
        from tiktoken.load import load_tiktoken_bpe
        path = str(path)
        try:
            ranks = load_tiktoken_bpe(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"tokenizer file {path!r} does not exist") from None
        except OSError:  # permission denied and the like: the system's own reason
            raise
        except Exception as e:
            raise ValueError(f"tokenizer file {path!r} is not a tiktoken BPE file ({e})") from None
        names = LLAMA3_SPECIALS + [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(LLAMA3_SPECIALS) + 2)]
        specials = {s: len(ranks) + i for i, s in enumerate(names)}
        return cls(Path(path).name, ranks, specials, LLAMA3_PAT, "<|begin_of_text|>", "<|end_of_text|>",
                   "<|finetune_right_pad_id|>", ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], source=path)

    # -- Hugging Face tokenizer.json -------------------------------------------------------------

    @classmethod
    @_malformed
    def from_hf_json(cls, path) -> "Tokenizer":
        """A byte-level BPE `tokenizer.json`, with bos/eos/pad taken as a hub download has them:
        `tokenizer_config.json`, then `generation_config.json` / `config.json` beside it, then the
        usual token names. The pre-tokenizer's split regex (Llama-3's Split, GPT-2's ByteLevel) and
        a Digits step are followed; anything that is not byte-level BPE is refused."""
        path = Path(path)
        try:
            tj = json.loads(path.read_text())
            vocab, merges = tj["model"]["vocab"], tj["model"].get("merges", [])
        except OSError:  # missing, permission denied: the system's own reason
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{str(path)!r} is not a readable tokenizer.json ({type(e).__name__}: {e})") from None
        model, pre, dec = tj["model"], tj.get("pre_tokenizer") or {}, tj.get("decoder") or {}
        steps = pre.get("pretokenizers", [pre]) if pre else []
        kinds = [s.get("type") for s in steps]
        byte_level = "ByteLevel" in kinds or dec.get("type") == "ByteLevel"
        if model.get("type") != "BPE" or not byte_level or model.get("byte_fallback") or "Metaspace" in kinds:
            raise ValueError(f"{str(path)!r} is not a byte-level BPE tokenizer (model {model.get('type')}, "
                             f"pre-tokenizer {kinds or None}, decoder {dec.get('type')}); SentencePiece tokenizers "
                             "(Llama-2, TinyLlama) are not supported")
        pat, split_digits, prefix_space = None, False, False
        for s in steps:
            if s.get("type") == "Split" and "Regex" in s.get("pattern", {}):
                pat = s["pattern"]["Regex"]
            elif s.get("type") == "ByteLevel":
                prefix_space = bool(s.get("add_prefix_space"))
                if s.get("use_regex", True) and pat is None:
                    pat = GPT2_PAT
            elif s.get("type") == "Digits":
                split_digits = True if s.get("individual_digits") else "runs"
            else:
                raise ValueError(f"{str(path)!r}: pre-tokenizer step {s.get('type')!r} is not supported "
                                 "(supported: Split, ByteLevel, Digits)")
        norm = (tj.get("normalizer") or {}).get("type")
        if norm not in (None, "NFC", "NFD", "NFKC", "NFKD"):
            raise ValueError(f"{str(path)!r}: normalizer {norm!r} is not supported (supported: none, NFC, NFKC)")
        # every added token decodes; all of them (special or not) are plain text when encoding
        specials = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
        merges = [m.split(" ") if isinstance(m, str) else m for m in merges]
        near = _read_json(path.parent / "tokenizer_config.json")
        ids = _config_ids(path.parent)
        bos, eos, pad, stops = _pick_specials(specials, near, ids, str(path))
        add_bos = near.get("add_bos_token")
        if add_bos is None:
            add_bos = _post_processor_adds(tj.get("post_processor"), bos)
        return cls._bpe(path.name, vocab, merges, specials, pat or r"[\s\S]+", bos, eos, pad, stops, str(path),
                        add_bos, split_digits, model.get("unk_token"), norm, prefix_space,
                        hf={"tokenizer.json": tj, "tokenizer_config.json": near or None})

    @classmethod
    def _bpe(cls, name, vocab: dict[str, int], merges, specials, pat, bos, eos, pad, stops, source, add_bos,
             split_digits, unk, normalizer, prefix_space, hf) -> "Tokenizer":
        """tiktoken ranks from a byte-level vocabulary (printable strings -> bytes, rank = id)."""
        if not isinstance(vocab, dict) or not all(isinstance(t, str) and type(i) is int and i >= 0 for t, i in vocab.items()):
            raise ValueError(f"{source!r}: the vocabulary must map token strings to ids >= 0")
        bad = next((m for m in merges if not (isinstance(m, (list, tuple)) and len(m) == 2
                                               and all(isinstance(x, str) for x in m))), None)
        if bad is not None:
            raise ValueError(f"{source!r}: merge {bad!r} is not a pair of tokens")
        to_byte = byte_decoder()
        ranks = {}
        for tok, i in vocab.items():
            if tok in specials:
                continue
            try:
                ranks[bytes(to_byte[c] for c in tok)] = i
            except KeyError:
                raise ValueError(f"{source!r}: token {tok!r} is not a byte-level token (characters outside "
                                 "GPT-2's byte alphabet); not a byte-level BPE vocabulary") from None
        last = -1
        for a, b in merges:  # the merge order must be the id order (see the module docstring)
            i = vocab.get(a + b)
            if i is None or i < last:
                raise ValueError(f"{source!r}: merge {a!r} + {b!r} does not create tokens in id order; "
                                 "this vocabulary cannot be run as tiktoken ranks")
            last = i
        n_vocab = max([*vocab.values(), *specials.values()]) + 1
        for byte in range(256):  # bytes the vocabulary lacks: ranked after it, mapped to unk / dropped
            ranks.setdefault(bytes([byte]), n_vocab + 1000 + byte)
        return cls(name, ranks, specials, pat, bos, eos, pad, stops, source=source, add_bos=add_bos,
                   split_digits=split_digits, n_vocab=n_vocab, unk_id=vocab.get(unk) if unk else None,
                   normalizer=normalizer, prefix_space=prefix_space, hf=hf)

    # -- llama.cpp GGUF --------------------------------------------------------------------------

    @classmethod
    @_malformed
    def from_gguf(cls, fields: dict, path: str) -> "Tokenizer":
        """The vocabulary inside a GGUF file (`tokenizer.ggml.*`: tokens, merges, token types, bos/eos/
        pad ids). Only the byte-level BPE kind ("gpt2") is supported. The GGUF names its pre-tokenizer
        (`tokenizer.ggml.pre`) but holds no regex; like transformers' GGUF loader we use GPT-2's."""
        kind = fields.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"{path!r}: tokenizer.ggml.model is {kind!r}, not byte-level BPE ('gpt2'); "
                             "SentencePiece vocabularies (Llama-2, TinyLlama) are not supported")
        tokens, types = fields.get("tokenizer.ggml.tokens"), fields.get("tokenizer.ggml.token_type", [])
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise ValueError(f"{path!r} has no tokenizer.ggml.tokens (a list of token strings); it holds no vocabulary")
        if not isinstance(types, list):
            raise ValueError(f"{path!r}: tokenizer.ggml.token_type is {type(types).__name__}, not a list")
        if "tokenizer.ggml.eos_token_id" not in fields:
            raise ValueError(f"{path!r} has no tokenizer.ggml.eos_token_id: nothing would end a generation")
        for key in ("eos_token_id", "bos_token_id", "padding_token_id", "unknown_token_id"):
            v = fields.get(f"tokenizer.ggml.{key}")
            if v is not None and not (isinstance(v, int) and 0 <= v < len(tokens)):
                raise ValueError(f"{path!r}: tokenizer.ggml.{key} is {v!r}; expected a token id 0..{len(tokens) - 1}")
        pre = fields.get("tokenizer.ggml.pre", "default")
        pat = GGUF_PRE.get(pre)
        if pat is None:
            print(f"note: {path}: pre-tokenizer {pre!r} is not known here; splitting with GPT-2's regex")
            pat = GPT2_PAT
        vocab = {t: i for i, t in enumerate(tokens)}
        specials = {tokens[i]: i for i, ty in enumerate(types) if ty == 3}  # 3 = CONTROL
        merges = [m.split(" ") if isinstance(m, str) else m for m in fields.get("tokenizer.ggml.merges", [])]
        name = lambda key: tokens[fields[key]] if key in fields else None
        eos = name("tokenizer.ggml.eos_token_id")
        bos, pad, unk = name("tokenizer.ggml.bos_token_id"), name("tokenizer.ggml.padding_token_id") or eos, \
            name("tokenizer.ggml.unknown_token_id")
        add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", bos in BOS_NAMES))
        for t in (bos, eos, pad):
            if t is not None:
                specials.setdefault(t, vocab[t])
        stops = [eos] + [t for t in END_NAMES if t in specials]
        config = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk, "add_bos_token": add_bos,
                  "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": fields.get("context_length")}
        if "tokenizer.chat_template" in fields:
            config["chat_template"] = fields["tokenizer.chat_template"]
        tj = _hf_tokenizer_json(vocab, merges, specials, bos if add_bos else None, None, pat)
        # like transformers' GGUF loader, bytes outside the vocabulary are dropped (BPE without unk)
        return cls._bpe(Path(path).name, vocab, merges, specials, pat, bos, eos, pad, stops, path, add_bos,
                        False, None, None, False, hf={"tokenizer.json": tj, "tokenizer_config.json": config})

    # -- finding and saving ----------------------------------------------------------------------

    @classmethod
    def for_model(cls, path) -> "Tokenizer":
        """The tokenizer of a model folder: `tokenizer.model` beside the weights (Meta), else
        `tokenizer.json` (Hugging Face), else `original/tokenizer.model` (a Llama-3 download without
        tokenizer.json), else the marker nanopeft writes for its byte-level vocabulary."""
        path = Path(path)
        if (path / "tokenizer.model").exists():  # a Meta folder
            return cls.from_file(path / "tokenizer.model")
        if (path / "tokenizer.json").exists():  # a Hugging Face folder: saved again with its configs
            return cls.from_hf_json(path / "tokenizer.json")
        if (path / "original" / "tokenizer.model").exists():
            return cls.from_file(path / "original" / "tokenizer.model")
        if (path / "nanopeft_tokenizer.json").exists():
            return cls.bytes()
        raise FileNotFoundError(f"no tokenizer in {str(path)!r}: looked for tokenizer.model, original/tokenizer.model, "
                                "tokenizer.json, nanopeft_tokenizer.json")

    def save(self, folder):
        """Put the tokenizer beside saved weights so `for_model` (and transformers) find it again:
        Meta's file is copied; a tokenizer.json / GGUF vocabulary is written as tokenizer.json +
        tokenizer_config.json, with generation_config.json naming the ids that end a generation."""
        folder = Path(folder)
        if self.source is None:
            (folder / "nanopeft_tokenizer.json").write_text(json.dumps({"type": "bytes"}))
            return
        if self.hf is None:
            shutil.copyfile(self.source, folder / "tokenizer.model")
            return
        names = {i: t for t, i in self.special_tokens.items()}
        config = self.hf["tokenizer_config.json"] or {
            "bos_token": names.get(self.bos_id), "eos_token": names[self.eos_id], "pad_token": names[self.pad_id],
            "add_bos_token": self.add_bos, "tokenizer_class": "PreTrainedTokenizerFast"}
        if self.source.endswith(".json"):
            shutil.copyfile(self.source, folder / "tokenizer.json")
        else:
            (folder / "tokenizer.json").write_text(json.dumps(self.hf["tokenizer.json"], ensure_ascii=False))
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        gen = {"bos_token_id": self.bos_id, "eos_token_id": self.stop_ids, "pad_token_id": self.pad_id}
        (folder / "generation_config.json").write_text(json.dumps(gen, indent=2))

    # -- use -------------------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`; `bos=True` starts a sequence, with the bos token where this tokenizer
        adds one (Llama-3 does, SmolLM2 does not). Special-token text in the input stays plain text."""
        if self.normalizer:
            text = unicodedata.normalize(self.normalizer, text)
        if self.prefix_space and text and not text[0].isspace():
            text = " " + text
        if self.split_digits:  # Hugging Face's Digits pre-tokenizer runs before the regex
            import regex  # tiktoken's own dependency
            pieces = regex.split(r"(\p{N})" if self.split_digits is True else r"(\p{N}+)", text)
        else:
            pieces = [text]
        ids = [i for p in pieces if p for i in self.model.encode(p, allowed_special=set(), disallowed_special=())]
        if ids and max(ids) >= self.n_vocab:  # bytes outside the vocabulary
            ids = [i if i < self.n_vocab else self.unk_id for i in ids]
            ids = [i for i in ids if i is not None]
        return ([self.bos_id] if bos and self.add_bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; ids that are no token (a model's padded vocabulary rows) decode to nothing."""
        try:
            return self.model.decode(list(ids))
        except KeyError:
            known = []
            for i in ids:
                try:
                    self.model.decode_single_token_bytes(i)
                    known.append(i)
                except KeyError:
                    pass
            return self.model.decode(known)


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        raise ValueError(f"{str(path)!r} is not valid JSON") from None
    if not isinstance(d, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, not {type(d).__name__}")
    return d


def _config_ids(folder: Path) -> dict:
    """bos/eos/pad token ids from generation_config.json over config.json (eos may be a list)."""
    ids = {}
    for f in ("config.json", "generation_config.json"):
        d = _read_json(folder / f)
        ids.update({k: d[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if d.get(k) is not None})
    return ids


def _pick_specials(specials: dict, near: dict, ids: dict, where: str):
    """(bos or None, eos, pad, stops) as token names: tokenizer_config.json first, then the ids of
    generation_config.json / config.json, then the usual names."""
    by_id = {i: t for t, i in specials.items()}

    def named(key):  # tokenizer_config.json holds a string or {"content": ...}
        v = near.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return v if v in specials else None

    def from_id(key):
        v = ids.get(key)
        return by_id.get(v[0] if isinstance(v, list) and v else v)

    eos = named("eos_token") or from_id("eos_token_id") or next((t for t in END_NAMES if t in specials), None)
    if eos is None:
        raise ValueError(f"{where!r} names no end-of-text token: none of {', '.join(END_NAMES)} is a special token "
                         "and no tokenizer_config.json / generation_config.json says which one is")
    bos = named("bos_token") or from_id("bos_token_id") or next((t for t in BOS_NAMES if t in specials), None)
    pad = named("pad_token") or from_id("pad_token_id") or \
        ("<|finetune_right_pad_id|>" if "<|finetune_right_pad_id|>" in specials else eos)
    eos_ids = ids.get("eos_token_id", [])
    stops = [eos] + [by_id[i] for i in (eos_ids if isinstance(eos_ids, list) else [eos_ids]) if i in by_id]
    stops += [t for t in END_NAMES if t in specials]  # the end of a text, a turn, a tool call
    return bos, eos, pad, stops


def _post_processor_adds(post: dict | None, bos: str | None) -> bool:
    """Whether tokenizer.json's post-processor starts a sequence with a special token (Llama-3's
    TemplateProcessing does); with no template, tokenizers that call their bos <s> or
    <|begin_of_text|> add it."""
    steps = (post or {}).get("processors", [post]) if post else []
    for s in steps:
        if s and s.get("type") == "TemplateProcessing":
            return bool(s.get("single")) and "SpecialToken" in s["single"][0]
    return bos in BOS_NAMES


def _hf_tokenizer_json(vocab, merges, specials, bos, unk, pat=GPT2_PAT) -> dict:
    """A tokenizer.json for a GGUF vocabulary: byte-level BPE with its split regex (GPT-2's as
    ByteLevel's own, any other as a Split step before it), as transformers builds it."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": pat == GPT2_PAT}
    pre_tokenizer = byte_level if pat == GPT2_PAT else {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pat}, "behavior": "Isolated", "invert": False}, byte_level]}
    single = ([{"SpecialToken": {"id": bos, "type_id": 0}}] if bos else []) + [{"Sequence": {"id": "A", "type_id": 0}}]
    post = {"type": "TemplateProcessing", "single": single,
            "pair": single + [{"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [vocab[bos]], "tokens": [bos]}} if bos else {}}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for t, i in sorted(specials.items(), key=lambda x: x[1])]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": pre_tokenizer, "post_processor": post,
            "decoder": {**byte_level, "add_prefix_space": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": merges}}
