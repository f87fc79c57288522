"""Reading and writing JSONL documents: inputs of any supported form, rejects, atomic outputs.

Every malformed input line is counted and written to a rejects file with its file:line, so
nothing is dropped silently; outputs appear only when complete (temporary name, then rename).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import orjson
import zstandard

from data_pipeline.config_limits import AT_LEAST_1, NON_NEGATIVE, check_limits
from data_pipeline.files import publish_file, temporary_beside

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".ndjson", ".zst", ".gz")

# orjson parses and writes documents faster than the json module, and parsing and writing are
# most of what a stage's reader does. The json module stays the reference: a line orjson refuses
# is parsed again by json, so what is accepted or rejected, and the reject's reason, are json's.
_BIG = float(1 << 63)


def _has_big_float(o) -> bool:
    """True when `o` holds a float of magnitude >= 2^63. orjson turns an integer literal
    beyond 64 bits into a float, where json keeps the exact int; such a line is parsed again
    by json (a genuine large float only costs that second parse)."""
    t = type(o)
    if t is float:
        return not -_BIG < o < _BIG
    if t is dict:
        return any(type(v) is not str and _has_big_float(v) for v in o.values())
    if t is list:
        return any(type(v) is not str and _has_big_float(v) for v in o)
    return False


def loads_line(raw: bytes):
    """The JSON value of one input line, as `json.loads(raw.decode("utf-8"))` gives it: the
    same value, and the same exceptions (UnicodeDecodeError, json.JSONDecodeError). orjson
    refuses what json accepts in three cases (lone surrogates, NaN/Infinity, numbers beyond
    float range) and rounds integers beyond 64 bits: json parses those lines."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw.decode("utf-8"))
    if type(obj) is dict and not _has_big_float(obj):
        return obj
    return json.loads(raw.decode("utf-8"))


NO_SOURCE = "(none)"  # the per-source key (reports, manifests) of a document without meta.source


def source_name(doc: dict) -> str:
    """A document's `meta.source` as a per-source key: NO_SOURCE when it has none, a
    non-string source as its JSON text."""
    meta = doc.get("meta")
    src = meta.get("source") if isinstance(meta, dict) else None
    if src is None:
        return NO_SOURCE
    return src if isinstance(src, str) else json.dumps(src)


def dumps_doc(doc: dict) -> bytes:
    """One JSONL line (with its newline), compact, non-ASCII kept as UTF-8. orjson refuses
    integers beyond 64 bits and non-string keys, and writes NaN/Infinity as null; json writes
    what orjson refuses. A lone surrogate raises UnicodeEncodeError (UTF-8 cannot hold it)."""
    try:
        return orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError:
        line = json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n"
        return line.encode("utf-8")


def expand_inputs(spec: str | Path | list) -> list[Path]:
    """A file, a directory (every supported file below it), a glob, or a list of those; sorted,
    so the order of documents never depends on the file system."""
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in expand_inputs(s)]
    s = str(spec)
    p = Path(s)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES))
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(f) for f in glob.glob(s, recursive=True) if Path(f).is_file())
    if not files:
        raise FileNotFoundError(f"input={s}: no such file, directory or glob match")
    return files


_ZSTD_MAGIC = 0xFD2FB528
_READ = 1 << 20  # decompressed bytes per read: what one read may add to memory


def _zstd_complete(path: Path) -> bool:
    """True when the file is whole zstd frames (skippable ones included) end to end, read from the
    frame and block headers alone (a few bytes per block of up to 128 KiB). zstandard's
    stream_reader returns a clean EOF on a truncated file, and a decompressobj cannot bound what one
    call returns (an RLE block of 4 bytes gives 128 KiB: a 1 MiB read could give 32 GiB), so the
    data are read with the first and the ending is checked here."""
    with open(path, "rb") as f:
        size, pos = os.fstat(f.fileno()).st_size, 0
        while pos < size:
            f.seek(pos)
            head = f.read(18)  # the longest frame header: magic and 14 bytes
            magic = int.from_bytes(head[:4], "little")
            if magic & 0xFFFFFFF0 == 0x184D2A50:  # skippable frame: magic, length, data
                if len(head) < 8:
                    return False
                pos += 8 + int.from_bytes(head[4:8], "little")
                continue
            if magic != _ZSTD_MAGIC:
                return True  # not zstd at all: the decompressor names that error
            try:
                pos += zstandard.frame_header_size(head)
                checksum = zstandard.get_frame_parameters(head).has_checksum
            except zstandard.ZstdError:
                return False
            last = 0
            while not last:
                f.seek(pos)
                b = f.read(3)
                if len(b) < 3:
                    return False
                v = int.from_bytes(b, "little")
                last, kind = v & 1, (v >> 1) & 3
                pos += 3 + (1 if kind == 1 else v >> 3)  # an RLE block stores one byte
            pos += 4 if checksum else 0
        return pos == size


class _ZstdRaw(io.RawIOBase):
    """The decompressed bytes of a (multi-frame) zstd file, at most len(b) per readinto;
    EOFError at the end when the last frame never ended (a truncated file). 2 GiB windows
    are allowed because some Pushshift dumps use them."""

    def __init__(self, path: Path, src: IO[bytes]):
        dctx = zstandard.ZstdDecompressor(max_window_size=2**31)
        self._r = dctx.stream_reader(src, read_size=_READ, read_across_frames=True)
        self._path, self._checked = path, False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._r.readinto(b)
        if n == 0 and not self._checked:  # a buffered reader may ask again at the end
            if not _zstd_complete(self._path):
                raise EOFError("zstd stream ends inside a frame (truncated file)")
            self._checked = True
        return n


class Counted:
    """A binary file whose reads are reported to `progress` (its `update(n)`): bytes of the
    file itself, so a compressed file's progress is measured against its size on disk."""

    def __init__(self, raw: IO[bytes], progress):
        self.raw, self.progress = raw, progress

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.progress.update(len(data))
        return data

    def __getattr__(self, name: str):
        return getattr(self.raw, name)


_REPORT_EVERY = 1 << 20  # bytes of an uncompressed file between progress updates


class TooLong:
    """A line longer than the reader's limit, streamed past: its first bytes and its length
    (newline included)."""

    __slots__ = ("head", "length")

    def __init__(self, head: bytes, length: int):
        self.head, self.length = head, length


def _lines(f: IO[bytes], max_line_bytes: int | None, keep: int) -> Iterator[bytes | TooLong]:
    """Lines of a buffered binary file; with a limit, a longer line is read in bounded pieces
    and given as TooLong (its first `keep` bytes and its length), never held whole."""
    if max_line_bytes is None:
        yield from f
        return
    limit = max_line_bytes + 1  # the content and its newline
    while line := f.readline(limit):
        if len(line) < limit or line[-1] == 10:
            yield line
            continue
        head, length = line[:keep], len(line)
        del line
        while part := f.readline(_READ):
            length += len(part)
            if part[-1] == 10:
                break
        yield TooLong(head, length)


def iter_lines(
    path: str | Path, progress=None, max_line_bytes: int | None = None, keep: int = 4096
) -> Iterator[bytes | TooLong]:
    """Raw lines (with their newline) of a plain, .gz or .zst file, decompressed at most
    1 MiB per read. Raises EOFError after the last complete line when compressed data is
    truncated. `progress` (optional, with `update(n)`) is told the bytes of the file read so
    far. With `max_line_bytes`, a line longer than that (newline not counted) comes as a
    TooLong holding its first `keep` bytes and its length; without, lines come whole."""
    path = Path(path)
    with open(path, "rb") as raw:
        src = (
            raw
            if progress is None or path.suffix not in (".gz", ".zst")
            else Counted(raw, progress)
        )
        if path.suffix == ".gz":
            with gzip.GzipFile(fileobj=src) as f:  # its reads are bounded (max_length)
                yield from _lines(f, max_line_bytes, keep)
            return
        if path.suffix == ".zst":
            with io.BufferedReader(_ZstdRaw(path, src), _READ) as f:
                yield from _lines(f, max_line_bytes, keep)
            return
        if progress is None:
            yield from _lines(raw, max_line_bytes, keep)
            return
        n = 0
        for line in _lines(raw, max_line_bytes, keep):
            n += len(line) if type(line) is bytes else line.length
            if n >= _REPORT_EVERY:
                progress.update(n)
                n = 0
            yield line
        progress.update(n)


# Allowed values of the bounded-input keys, on every stage, the chain and ingest.
INPUT_LIMITS = {
    "max_line_bytes": AT_LEAST_1,
    "max_rejects": NON_NEGATIVE,
    "reject_text_bytes": NON_NEGATIVE,
}


@dataclass(frozen=True)
class InputLimits:
    """What one task reads and sets aside at most: the `max_line_bytes`, `max_rejects` and
    `reject_text_bytes` keys of every stage and of the chain (docs/data-pipeline.md)."""

    # Longer lines are rejects, streamed past: a 4 GiB line must not be 4 GiB of memory.
    max_line_bytes: int = 64 << 20
    # Rejects written to the rejects file per task; the rest are counted (not_written).
    max_rejects: int = 10_000
    # Bytes of a rejected line kept in its record (with the line's full length).
    reject_text_bytes: int = 4096

    def __post_init__(self) -> None:
        check_limits(self, "", INPUT_LIMITS)

    @classmethod
    def of(cls, cfg) -> InputLimits:
        """The limits a stage config (or the chain's) sets."""
        return cls(cfg.max_line_bytes, cfg.max_rejects, cfg.reject_text_bytes)

    def fingerprint(self) -> dict:
        """For a stage's work fingerprint: other limits reject other lines."""
        return asdict(self)


class Rejects:
    """Collects bad input lines: counts per file and reason, and a JSONL file of what was set
    aside (file, line, reason, the first `limits.reject_text_bytes` of the raw text and its
    length in bytes) so nothing is lost. After `limits.max_rejects` records the rest are only
    counted (`not_written`): 8 MiB of one-byte lines, a record of ~50 bytes each, would
    otherwise write ~400 MB. `limits`
    also carries the readers' `max_line_bytes`."""

    def __init__(self, path: str | Path | None, limits: InputLimits | None = None):
        self.path = Path(path) if path else None
        self.limits = limits or InputLimits()
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.written = self.not_written = 0
        self._f = None

    def add(
        self, file: str | Path, line: int, reason: str, raw: bytes | str = b"", length=None
    ) -> None:
        """One reject; `length`: the line's length in bytes when `raw` is only its start."""
        self.counts[str(file)][reason] += 1
        if self.path is None:
            return
        if self.written >= self.limits.max_rejects:
            self.not_written += 1
            return
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "w", encoding="utf-8")
        cap = self.limits.reject_text_bytes
        if isinstance(raw, bytes):
            size = len(raw) if length is None else length
            raw = raw[:cap].decode("utf-8", errors="replace")
        else:
            size = len(raw.encode("utf-8", errors="surrogatepass")) if length is None else length
            raw = raw[:cap]
        rec = {"file": str(file), "line": line, "reason": reason, "raw": raw, "bytes": size}
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.written += 1

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def report(self) -> dict:
        return {
            "total": self.total,
            "not_written": self.not_written,
            "by_file": {f: dict(c) for f, c in sorted(self.counts.items())},
        }

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class LineRejected(Exception):
    """A bad input line: `reason` and `raw` as they go to Rejects.add."""

    def __init__(self, reason: str, raw: bytes | str):
        super().__init__(reason)
        self.reason, self.raw = reason, raw


def json_object(raw: bytes, required: tuple[str, ...] = ()) -> dict | None:
    """The object on one input line; None for a blank line; LineRejected for invalid UTF-8
    or JSON, a value that is not an object, or a missing required field."""
    if not raw or raw.isspace():  # = not raw.strip(), without copying the line
        return None
    try:
        obj = loads_line(raw)
    except UnicodeDecodeError as e:
        raise LineRejected(f"invalid utf-8 ({e.reason} at byte {e.start})", raw) from None
    except json.JSONDecodeError as e:
        raise LineRejected(f"invalid json ({e.msg})", raw) from None
    if not isinstance(obj, dict):
        raise LineRejected("not a json object", raw)
    missing = [k for k in required if k not in obj]
    if missing:
        raise LineRejected(f"missing field {missing[0]!r}", raw)
    return obj


def document(obj: dict, default_id: str) -> dict:
    """The document `{"text", "id", "meta"}` of an input object that has a `text`; a missing
    `id` becomes `default_id` (`file:line`); LineRejected for an empty or non-string text."""
    text = obj["text"]
    if not isinstance(text, str):
        raise LineRejected("text is not a string", json.dumps(obj)[:10000])
    if not text.strip():
        raise LineRejected("empty text", json.dumps(obj)[:10000])
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    return {"text": text, "id": str(obj.get("id", default_id)), "meta": meta}


def iter_json_lines(
    path: str | Path, rejects: Rejects, required: tuple[str, ...] = (), progress=None
) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each good line; bad ones (invalid UTF-8 or JSON, not an
    object, missing a required field, a line longer than `rejects.limits.max_line_bytes`,
    truncated compressed data) go to `rejects`. `progress`: as for iter_lines."""
    lineno, lim = 0, rejects.limits
    lines = iter_lines(path, progress, lim.max_line_bytes, lim.reject_text_bytes)
    try:
        for lineno, raw in enumerate(lines, start=1):
            if type(raw) is TooLong:
                reason = too_long_reason(lim.max_line_bytes)
                rejects.add(path, lineno, reason, raw.head, raw.length)
                continue
            try:
                obj = json_object(raw, required)
            except LineRejected as e:
                rejects.add(path, lineno, e.reason, e.raw)
                continue
            if obj is not None:
                yield lineno, obj
    except TRUNCATED_ERRORS as e:
        rejects.add(path, lineno + 1, truncated_reason(e))


TRUNCATED_ERRORS = (zstandard.ZstdError, EOFError, gzip.BadGzipFile, OSError)


def too_long_reason(max_line_bytes: int) -> str:
    return f"line longer than max_line_bytes={max_line_bytes}"


def truncated_reason(e: Exception) -> str:
    return f"truncated or corrupt compressed data ({e})"


def read_documents(inputs, rejects: Rejects, progress=None) -> Iterator[dict]:
    """Documents `{"text", "id", "meta"}` from JSONL inputs. A missing `id` becomes
    `file:line`; an empty or non-string `text` is a reject. `progress`: told the bytes of
    the files read (iter_lines)."""
    for path in expand_inputs(inputs):
        for lineno, obj in iter_json_lines(path, rejects, ("text",), progress):
            try:
                yield document(obj, f"{path.name}:{lineno}")
            except LineRejected as e:
                rejects.add(path, lineno, e.reason, e.raw)


class AtomicWriter:
    """A JSONL file (plain, .gz or .zst by its suffix) that appears under its final name only
    after a clean close. Text is written as UTF-8 (strict: a lone surrogate raises)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temporary_beside(self.path)
        raw = open(self.tmp, "wb")
        if self.path.suffix == ".gz":
            self._f = io.BufferedWriter(gzip.GzipFile(fileobj=raw, mode="wb"), 1 << 16)
        elif self.path.suffix == ".zst":
            w = zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=True)
            self._f = io.BufferedWriter(w, 1 << 16)
        else:
            self._f = raw
        self._raw = raw

    def write(self, s: str) -> None:
        self._f.write(s.encode("utf-8"))

    def write_bytes(self, b: bytes) -> None:
        """Bytes that are already UTF-8 JSONL (for example a line from dumps_doc)."""
        self._f.write(b)

    def write_doc(self, doc: dict) -> None:
        self._f.write(dumps_doc(doc))

    def close(self) -> None:
        self._f.flush()
        self._f.close()
        if not self._raw.closed:
            self._raw.close()
        publish_file(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self._f.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
