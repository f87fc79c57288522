"""`data.tokenizer`: which tokenizer made foreign token data, since datatrove's, Megatron's and
HF's files carry no record we can compare (datatrove's `.ds.metadata` holds a free-form name).

- `gpt2`: GPT-2's own ids (50,257, `<|endoftext|>` = 50256 separates documents): what
  datatrove, Megatron and NeMo write with the `gpt2` tokenizer. The record is the one our
  tokenize stage writes for `tokenizer.name=gpt2`, so such data mixes with our gpt2 shards.
- `opt`: OPT's fairseq ids (50,265, `</s>` = 2).
- a directory with `vocab.json` (+ `merges.txt`): its vocabulary decides size and separator
  (`</s>` when present, else `<|endoftext|>`); OPT's files give the record our tokenize stage
  writes for `tokenizer.name=opt tokenizer.path=<that directory>` (file hashes included),
  GPT-2's files (an HF `gpt2` snapshot) a `gpt2` record compared by vocabulary and separator.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.files import sha256_file
from data_pipeline.formats.foreign import FormatError
from data_pipeline.tokenizer import OPT_EOS_ID, Tokenizer, TokenizerSpec

GPT2_VOCAB, GPT2_EOS_ID = 50257, 50256
OPT_VOCAB = 50265
DECLARED_NAMES = ("gpt2", "opt")


def declared_record(value: str | None, data_path: Path) -> dict:
    """The tokenizer record (as in our manifest: name, files, vocab_size, eos_id) of a
    `data.tokenizer` value; refuses a missing one, naming the data it is needed for."""
    if not value:
        raise FormatError(
            f"{data_path}: foreign token data carries no tokenizer record; declare it with "
            "data.tokenizer=gpt2 | opt | <directory with vocab.json>"
        )
    if value == "gpt2":
        return _strip(Tokenizer(TokenizerSpec("gpt2")).describe())
    if value == "opt":
        return {"name": "opt", "vocab_size": OPT_VOCAB, "eos_id": OPT_EOS_ID}
    d = Path(value).expanduser()
    vocab_file = d / "vocab.json"
    if not vocab_file.is_file():
        raise FormatError(f"data.tokenizer={value}: not gpt2, opt or a directory with vocab.json")
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    eos = vocab.get("</s>", vocab.get("<|endoftext|>"))
    if eos is None:
        raise FormatError(f"{vocab_file}: has neither </s> nor <|endoftext|>")
    record = {"name": "gpt2", "path": str(d), "vocab_size": len(vocab), "eos_id": int(eos)}
    if vocab.get("</s>") == OPT_EOS_ID:
        # OPT's files: the very record `tokenizer.name=opt tokenizer.path=<d>` shards carry.
        names = ("vocab.json", "merges.txt")
        record.update(name="opt", files={f: sha256_file(d / f) for f in names if (d / f).is_file()})
    return record


def _strip(record: dict) -> dict:
    """A record without where its files were (a copy elsewhere is the same tokenizer)."""
    return {k: v for k, v in record.items() if k != "path"}


def same_tokenizer(a: dict, b: dict) -> bool:
    """Whether two records name one tokenizer: name, vocabulary and separator, and the file
    hashes where both records have them (`data.tokenizer=opt` names no files)."""
    a, b = _strip(a), _strip(b)
    if "files" not in a or "files" not in b:
        a, b = ({k: v for k, v in r.items() if k != "files"} for r in (a, b))
    return a == b


def check_declared(value: str | None, manifest: dict, path: Path) -> None:
    """Our shards keep their manifest's record; a declared `data.tokenizer` must agree."""
    if not value:
        return
    want = declared_record(value, path)
    got = manifest["tokenizer"]
    if not same_tokenizer(want, got):
        raise FormatError(
            f"{path}: data.tokenizer={value} declares {describe(want)}, but the shards' "
            f"manifest says they were made with {describe(got)}"
        )


def describe(record: dict) -> str:
    return (
        f"{record.get('name')!r} (vocab_size {record.get('vocab_size')}, "
        f"eos_id {record.get('eos_id')})"
    )
