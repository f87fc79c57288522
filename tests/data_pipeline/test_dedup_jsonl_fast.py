"""The compiled JSONL line parser (data_pipeline.kernels.jsonl_scan) against the Python path it
stands in for: on every line it accepts, the text bytes and the output line must be exactly
what io.json_object + io.document + str.encode + io.dumps_doc give; every line it declines
goes to that Python path anyway, so declining is always allowed, accepting wrongly never."""

from __future__ import annotations

import json
import random

import orjson
import pytest

from data_pipeline.documents import LineRejected, document, dumps_doc, json_object
from data_pipeline.kernels import jsonl_scan
from data_pipeline.kernels.minhash import HAVE_NUMBA


@pytest.fixture(autouse=True)
def numba_is_installed() -> None:
    # numba is a runtime dependency (pyproject.toml); without it the fast path silently never
    # runs in production, so its absence is a failure here, not a skip.
    if not HAVE_NUMBA:
        pytest.fail("numba is not importable, but pyproject.toml declares it: pip install -e .")


# Characters that exercise every branch: escapes orjson writes short (\b \t \n \f \r) and
# long (\u00xx), quotes and backslashes, DEL, 2/3/4-byte UTF-8, Unicode whitespace (the text
# must have a non-space character), lone surrogates (UTF-8 cannot hold them), long runs
# (the 64-byte vector copies).
ALPHABET = ["a", "b", " ", "  ", "\n", "\t", "\r", '"', "\\", "/", "\x00", "\x01", "\x08", "\x0b"]
ALPHABET += ["\x0c", "\x1c", "\x1f", "\x7f", "é", "€", "😀", "\u2028", "\u00a0", "\u3000"]
ALPHABET += ["\u0085", "\u1680", "\u205f", "x" * 70, "y" * 130]
SURROGATES = ["\ud800", "\udc00"]


def python_path(raw: bytes) -> tuple:
    """What dedup's Python path makes of one line (default ids aside: jsonl_fast declines
    lines without an id)."""
    try:
        obj = json_object(raw, ("text",))
        if obj is None:
            return ("blank",)
        doc = document(obj, "file:1")
        return ("doc", doc["text"].encode("utf-8"), dumps_doc(doc))
    except (LineRejected, UnicodeEncodeError):
        return ("reject",)


def random_lines(seed: int, count: int = 3000) -> list[bytes]:
    rng = random.Random(seed)

    def text(surrogates: bool = True) -> str:
        pool = ALPHABET + SURROGATES if surrogates else ALPHABET
        return "".join(rng.choice(pool) for _ in range(rng.randint(0, 12)))

    def value(depth: int = 0):
        r = rng.random()
        if r < 0.3:
            return text()
        if r < 0.4:
            return rng.choice(
                [0, 1, -5, 123456789012345678, 12345678901234567890, 1.5, 2**70, 1e300]
            )
        if r < 0.5:
            return rng.choice([True, False, None])
        if r < 0.7 and depth < 3:
            return {text(): value(depth + 1) for _ in range(rng.randint(0, 3))}
        if r < 0.8 and depth < 3:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        return text()

    lines = []
    for _ in range(count):
        obj = {k: value() for k in rng.sample(["text", "id", "meta", "other"], rng.randint(0, 4))}
        if rng.random() < 0.7:  # mostly lines the fast path should take
            obj["text"] = text(False) + rng.choice(["w", "", "é", "\u3000"])
            obj["id"] = text(False)
            if rng.random() < 0.6:
                vals = [text(False), 5, -7, 0, True, False, None, 123456789012345678, 1.5]
                obj["meta"] = {rng.choice("abcdé"): rng.choice(vals) for _ in range(4)}
            if rng.random() < 0.3:
                obj = dict(reversed(list(obj.items())))
        style = rng.randrange(4)
        if style == 0:
            line = json.dumps(obj)  # \uXXXX escapes, ", " and ": "
        elif style == 1:
            line = json.dumps(obj, ensure_ascii=False)
        elif style == 2:
            line = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        else:
            try:
                line = orjson.dumps(obj).decode()
            except TypeError:  # lone surrogates, huge integers
                line = json.dumps(obj)
        raw = line.encode("utf-8", "surrogatepass")
        r = rng.random()
        if r < 0.05:
            raw = raw[: rng.randint(0, len(raw))]  # cut anywhere: mostly invalid JSON
        elif r < 0.08:
            raw = b" \t" + raw + b" \r"
        elif r < 0.1:
            raw = raw + b"x"
        lines.append(raw)
    return lines


HANDMADE = [
    b"",
    b"  \x0b \r",
    b'{"text": "a", "id": "c"}',
    b'{"text": "a", "text": "b", "id": "c"}',  # a repeated key: json keeps the last
    b'{"te\\u0078t": "a", "id": "c"}',  # an escaped key that decodes to "text"
    b'{"text": "caf\xc3\xa9 \xed\xa0\x80", "id": "c"}',  # UTF-8 of a surrogate: invalid
    b'{"text": "ok", "id": "c", "meta": {"a": 1, "a": 2}}',
    b'{"text": "ok", "id": "c", "meta": {"n": -0, "t": true, "z": null, "s": "\\u00e9"}}',
    b'{"text": "ok", "id": "c", "meta": {"m": 007}}',
    b'{"text": "ok", "id": "c", "meta": [1, 2]}',  # not a dict: document() gives {}
    b'{"text": "ok", "id": "c", "meta": {"deep": {"x": 1}}}',
    b'{"text": "ok", "id": "c", "z": NaN}',
    b'{"text": "ok", "id": "c", "z": ' + b"[" * 70 + b"1" + b"]" * 70 + b"}",
    b'{"text": "ok", "id": "c", "z": [1, 2.5e-3, -0.0, {"k": [true, false, null]}]}',
    b'{"text": " \\u3000\\n\\t", "id": "c"}',  # only whitespace: "empty text"
    b'{"text": "pair \\ud83d\\ude00 ok", "id": "c"}',
    b'{"text": "lone \\ud83d ok", "id": "c"}',
    b'{"text": "ok", "id": "lone \\udc00"}',
    b'{"text": "ok", "id": 7}',  # not a string: str(7), left to the Python path
    b'{"text": "ok"}',  # no id: file:line, left to the Python path
    b'["text", "id"]',
    b'{"text": "ok", "id": "c"} {}',
    b"\xef\xbb\xbf" + b'{"text": "ok", "id": "c"}',
    b'{"text": "tab\tin a string", "id": "c"}',  # a raw control character: invalid
]


def check(lines: list[bytes]) -> dict:
    block = b"\n".join(lines)
    status, _, _, text, text_off, out, out_off = jsonl_scan.parse_block(block)
    assert len(status) == len(lines)
    seen = {jsonl_scan.BLANK: 0, jsonl_scan.FAST: 0, jsonl_scan.SLOW: 0}
    for k, raw in enumerate(lines):
        want = python_path(raw)
        seen[int(status[k])] += 1
        if status[k] == jsonl_scan.BLANK:
            assert want == ("blank",), raw
        elif status[k] == jsonl_scan.FAST:
            got = ("doc", text[text_off[k] : text_off[k + 1]].tobytes())
            got += (out[out_off[k] : out_off[k + 1]].tobytes(),)
            assert got == want, raw
        else:
            assert (text_off[k], out_off[k]) == (text_off[k + 1], out_off[k + 1])
    return seen


def test_handmade_lines_are_parsed_as_the_python_path_or_left_to_it():
    assert check(HANDMADE) == {jsonl_scan.BLANK: 2, jsonl_scan.FAST: 5, jsonl_scan.SLOW: 17}


@pytest.mark.parametrize("seed", range(4))
def test_random_lines_are_parsed_as_the_python_path_or_left_to_it(seed):
    seen = check(random_lines(seed))
    assert seen[jsonl_scan.FAST] > 500  # the generator really exercises the fast path


def test_benchmark_style_lines_all_take_the_fast_path():
    """The lines every stage of this pipeline writes (and json.dumps writes) are the common
    case the fast path exists for."""
    docs = [{"text": f'doc {i} \u00e9 "q" \n end', "id": str(i), "meta": {}} for i in range(50)]
    lines = [json.dumps(d).encode() for d in docs] + [dumps_doc(d).rstrip(b"\n") for d in docs]
    assert check(lines)[jsonl_scan.FAST] == 100


def test_newline_count_equals_bytes_count_at_every_length():
    """Whole 64-byte chunks, then the tail byte by byte: every n around the chunk edges."""
    data = bytearray(random.Random(5).choice(b"ab\n") for _ in range(300))
    for n in range(len(data) + 1):
        assert jsonl_scan.count_newlines(data, n) == data.count(b"\n", 0, n)


def test_writable_and_read_only_blocks_share_one_compiled_parser():
    """numba compiles a kernel once per argument type, and a read-only array is another type
    than a writable one: the parser (~25 s to compile) and the MinHash word splitter are handed
    every block read-only (kernels/scratch.py's `read_only`), so bytes and bytearray blocks,
    and batch() and batch_joined(), run one compiled version each."""
    from data_pipeline.kernels import minhash

    line = b'{"text": "a b c d e f", "id": "0"}\n'
    for block in (bytearray(line + bytes(64)), line + bytes(64), line, bytearray(line)):
        jsonl_scan.parse_block(block, len(line))
        jsonl_scan.count_newlines(block, len(line))
    hasher = minhash.MinHasher()
    parsed = jsonl_scan.parse_block(line)
    hasher.batch_joined(parsed[3], parsed[4][:2])  # the parser's writable text buffer
    hasher.batch([b"a b c d e f"])  # np.frombuffer of bytes: read-only
    for kernel in (jsonl_scan._line_ends, jsonl_scan._parse, jsonl_scan._count_newlines):
        assert len(kernel.signatures) == 1, kernel.signatures
    assert len(minhash._spans.signatures) == 1, minhash._spans.signatures
