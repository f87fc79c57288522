"""A tiny English-like corpus of our own, for the trainer's default run and for tests.

The text is generated, not downloaded: counting, arithmetic facts written in words, the days
and months in order, and short stories from templates over a small vocabulary. Every sentence
has structure a ~1M-parameter model picks up within a couple of hundred CPU steps (what comes
after "four, five,"; "two plus three is" -> "five"; the object a story's character gave away),
so a falling loss shows the whole stack works. Generation is seeded and uses only
`random.Random`, so the same seed gives the same bytes on every machine.

`build_tiny_shards(out_dir)` writes the corpus as JSONL and builds token shards from it through
the chain (`ingest -> clean -> dedup -> tokenize`, GPT-2 ids; a document stage that is not
installed is passed through). Every rank of a torchrun job calls it at start: an exclusive lock
on `out_dir/.build.lock` lets one process build while the others wait, then find the shards
complete and reuse them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from data_pipeline.files import atomic_write

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = (
    "January February March April May June July August September October November December".split()
)
NAMES = "Anna Tom Lily Sam Mia Ben Emma Leo Nora Max".split()
OBJECTS = "ball book apple cup hat kite box shoe key bird".split()
COLORS = "red blue green yellow black white".split()
PLACES = "park garden house school shop river".split()
ANIMALS = "cat dog cow duck fox hen".split()
SOUNDS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "fox": "yip", "hen": "cluck"}


def number_word(n: int) -> str:
    """0..99 in words: 42 -> "forty-two"."""
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens - 2] + (f"-{_ONES[ones]}" if ones else "")


def _counting(rng: random.Random) -> str:
    start = rng.randrange(0, 90)
    n = rng.randrange(4, 10)
    words = [number_word(i) for i in range(start, min(start + n, 100))]
    return ", ".join(words).capitalize() + "."


def _arithmetic(rng: random.Random) -> str:
    op = rng.choice(["plus", "minus", "times"])
    if op == "plus":
        a, b = rng.randrange(0, 50), rng.randrange(0, 50)
        c = a + b
    elif op == "minus":
        a = rng.randrange(0, 100)
        b = rng.randrange(0, a + 1)
        c = a - b
    else:
        a, b = rng.randrange(0, 10), rng.randrange(0, 10)
        c = a * b
    return f"{number_word(a).capitalize()} {op} {number_word(b)} is {number_word(c)}."


def _calendar(rng: random.Random) -> str:
    seq = rng.choice([DAYS, MONTHS])
    i = rng.randrange(len(seq))
    nxt = seq[(i + 1) % len(seq)]
    return rng.choice([f"After {seq[i]} comes {nxt}.", f"{nxt} comes after {seq[i]}."])


def _story(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    obj, color, place = rng.choice(OBJECTS), rng.choice(COLORS), rng.choice(PLACES)
    animal = rng.choice(ANIMALS)
    return " ".join(
        [
            f"{a} has a {color} {obj}.",
            f"{a} goes to the {place} with the {obj}.",
            f"At the {place}, {a} sees {b} and a {animal}.",
            f"The {animal} says {SOUNDS[animal]}.",
            f"{a} gives the {color} {obj} to {b}.",
            f"Now {b} has the {color} {obj}, and {a} is happy.",
        ]
    )


_GENERATORS = (_counting, _arithmetic, _calendar, _story)


def tiny_documents(seed: int = 0, num_docs: int = 3000) -> list[dict]:
    """`num_docs` documents `{"text", "id", "meta"}` of 8-16 mixed sentences (~800 bytes)."""
    rng = random.Random(seed)
    docs = []
    for i in range(num_docs):
        sentences = [rng.choice(_GENERATORS)(rng) for _ in range(rng.randrange(8, 17))]
        docs.append({"text": " ".join(sentences), "id": f"tiny-{seed}-{i}", "meta": {}})
    return docs


def write_tiny_corpus(path: str | Path, seed: int = 0, num_docs: int = 3000) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Each writer renames its own temporary: concurrent writers never move each other's away.
    atomic_write(
        path, "".join(json.dumps(d, sort_keys=True) + "\n" for d in tiny_documents(seed, num_docs))
    )
    return path


def build_tiny_shards(out_dir: str | Path, seed: int = 0) -> Path:
    """Generate the corpus under `out_dir` and build GPT-2 token shards from it through the
    chain; returns the shard directory. Calling again with the same arguments reuses the
    shards (the chain skips complete steps); concurrent calls build once."""
    out_dir = Path(out_dir)
    with _exclusive(out_dir / ".build.lock"):
        corpus = out_dir / f"tiny-{seed}.jsonl"
        if not corpus.is_file():  # written atomically, so present means complete
            write_tiny_corpus(corpus, seed)
        return _build_shards(out_dir, corpus, seed)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `lock_path` (blocking until it is free). The kernel
    drops it when the process dies, so a killed builder never leaves the others waiting."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_shards(out_dir: Path, corpus: Path, seed: int) -> Path:
    from data_pipeline.chain import ChainConfig, CorpusConfig, run
    from data_pipeline.shards import read_manifest

    cfg = ChainConfig(
        work_dir=str(out_dir / "work"),
        output=str(out_dir / "tokens"),
        sources=[CorpusConfig(name="tiny", input=str(corpus))],
        steps=["clean", "dedup"],
        missing_stages="skip",
        # one process per step and no progress lines: a second of work inside a training
        # run's start-up, not a data job worth logging
        workers=1,
        progress=False,
        tokenize={"tokenizer": {"name": "gpt2"}, "validation_fraction": 0.02, "seed": seed},
    )
    t0 = time.perf_counter()
    report = run(cfg)
    out = Path(report["output"])
    if report["ran"]:  # a reuse says nothing: every rank of every later run would repeat it
        m = read_manifest(out)
        tokens = sum(s["num_tokens"] for s in m["splits"].values())
        docs = sum(s["num_documents"] for s in m["splits"].values())
        print(
            f"tiny corpus: built {docs:,} documents, {tokens:,} GPT-2 tokens into {out} in "
            f"{time.perf_counter() - t0:.1f} s (through the chain: clean, dedup, tokenize)",
            file=sys.stderr,
            flush=True,
        )
    return out
