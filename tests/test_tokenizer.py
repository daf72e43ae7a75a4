"""tokenizer.py against transformers and tokenizers: Llama-3's tokenizer.model, byte-level BPE
tokenizer.json files, GGUF vocabularies, the byte tokenizer."""
import importlib.util
import json
import os

import pytest
import torch

from model import ModelConfig
from tokenizer import LLAMA3_SPECIALS, Tokenizer


def _meta_tokenizer_file():
    spec = importlib.util.find_spec("llama_models")
    return os.path.join(spec.submodule_search_locations[0], "llama3", "tokenizer.model")


def test_meta_tokenizer():
    tok = Tokenizer.from_file(_meta_tokenizer_file())
    ids = tok.encode("This is a test sentence.", bos=True, eos=True)
    assert ids == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tok.decode(ids[1:-1]) == "This is a test sentence."
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.n_vocab) == (128000, 128001, 128004, 128256)
    assert 128009 in tok.stop_ids  # <|eot_id|>
    text = "Ünïcödé 🙂 12345 <|eot_id|>\n\n  tabs\tand spaces "
    assert tok.decode(tok.encode(text)) == text
    assert 128009 not in tok.encode(text)  # special-token text in data stays text


def test_tokenizer_json_matches_tokenizer_model(tmp_path):
    from transformers.convert_slow_tokenizer import TikTokenConverter
    names = LLAMA3_SPECIALS + [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(LLAMA3_SPECIALS) + 2)]
    TikTokenConverter(_meta_tokenizer_file(), extra_special_tokens=names).converted().save(str(tmp_path / "tokenizer.json"))
    a, b = Tokenizer.from_file(_meta_tokenizer_file()), Tokenizer.for_model(tmp_path)
    text = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. Ünï 🙂"
    assert a.encode(text, bos=True, eos=True) == b.encode(text, bos=True, eos=True)
    assert (a.bos_id, a.eos_id, a.pad_id, a.stop_ids, a.n_vocab) == (b.bos_id, b.eos_id, b.pad_id, b.stop_ids, b.n_vocab)


def test_tokenizer_found_beside_or_under_original(tmp_path):
    import shutil
    (tmp_path / "original").mkdir()
    shutil.copy(_meta_tokenizer_file(), tmp_path / "original" / "tokenizer.model")
    assert Tokenizer.for_model(tmp_path).encode("hi") == Tokenizer.from_file(_meta_tokenizer_file()).encode("hi")


def test_byte_tokenizer_round_trips_utf8():
    tok = Tokenizer.bytes()
    g = torch.Generator().manual_seed(0)
    chars = "aZ09 \n\t#$,.-é€😀中文<|end_of_text|>"
    for _ in range(20):
        text = "".join(chars[i] for i in torch.randint(0, len(chars), (50,), generator=g).tolist())
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert all(i < 256 for i in ids[1:-1]) and len(ids) == len(text.encode()) + 2
        assert tok.decode(ids[1:-1]) == text
    assert tok.n_vocab <= ModelConfig.from_preset("tiny").vocab_size
    assert tok.decode([72, 260, 105]) == "Hi"  # a padded vocabulary row (260) decodes to nothing


TOKENIZER_STRINGS = [
    "Natalia sold clips to 48 of her friends in April, and then 1234567 in May.",
    "  leading spaces\n\n\n  12  34\t\t5   678\n\n9",
    "x =   42;  y=3.14159\r\n    z = x**2 + y  # comment",
    "Ünïcödé 🙂 中文 日本語 ½ ² Ⅻ ١٢٣ café naïve",
    "def f(a, b):\n    return {'k': [a, b]}\n\n\nclass A:\n\tpass\n",
    "I'm sure we'll see they've CAPS'S   trailing   ",
    "a\x04b\x00c\x07", "", " ", "\n", "1", "$1,000.50 - 20% = 800.40",
]


def test_gguf_tokenizer_equals_transformers(smol, smol_ref, tmp_path):
    """Ours from the GGUF vocabulary, and ours from the tokenizer.json transformers writes for it,
    give transformers' ids; bos/eos/pad/stops are SmolLM2's own."""
    tok, ref = smol[1], smol_ref[1]
    ref.save_pretrained(tmp_path)
    from_json = Tokenizer.for_model(tmp_path)
    for text in TOKENIZER_STRINGS:
        want = ref.encode(text, add_special_tokens=False)
        assert tok.encode(text) == want, text
        assert from_json.encode(text) == want, text
        assert tok.decode(want) == ref.decode(want)
    for t in (tok, from_json):
        assert (t.bos_id, t.eos_id, t.pad_id, t.n_vocab, t.add_bos) == (1, 2, 2, 49152, False)
        assert {0, 2} <= set(t.stop_ids)  # <|endoftext|>, <|im_end|>
        assert t.encode("hi", bos=True, eos=True) == ref.encode("hi", add_special_tokens=False) + [2]
    assert tok.encode("<|im_end|>") != [2]  # special-token text in data stays text


def _trained_bpe(tmp_path, digits: bool):
    """A byte-level BPE trained here with the tokenizers library (the reference), GPT-2 style,
    with or without SmolLM2's Digits(individual_digits) step, plus a hub-style tokenizer_config.json."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    t = HFTokenizer(models.BPE())
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    t.pre_tokenizer = pre_tokenizers.Sequence(steps + [pre_tokenizers.ByteLevel(add_prefix_space=False)])
    t.decoder = decoders.ByteLevel()
    corpus = [s * 3 for s in TOKENIZER_STRINGS] + ["In 2024, 1234 people paid $56.78 for   99 items.\n\n  42"] * 20
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "pad_token": "<|endoftext|>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return t


@pytest.mark.parametrize("digits", [True, False])
def test_byte_level_bpe_json_equals_tokenizers(tmp_path, digits):
    ref = _trained_bpe(tmp_path, digits)
    tok = Tokenizer.for_model(tmp_path)
    for text in TOKENIZER_STRINGS + ["In 2024, 1234 people paid $56.78 for   99 items.\n\n  42"]:
        assert tok.encode(text) == ref.encode(text).ids, text
        assert tok.decode(tok.encode(text)) == text.replace("\x04", "") or "\x04" in text
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.add_bos) == (1, 2, 0, [0, 2], False)
