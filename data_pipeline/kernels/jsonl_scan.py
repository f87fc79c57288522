"""Compiled parsing of the common JSONL document line, for dedup's signature workers.

Per document, orjson.loads, str.encode and orjson.dumps (with the Python around them) cost
the workers about as much as the MinHash itself (`python benchmarks/dedup_kernels.py` times
both on the same documents; docs/benchmarks.md has the numbers). `parse_block` does their work for a whole block of lines in one compiled pass:
for each line it gives the text's UTF-8 bytes (what gets hashed) and the output line,
byte for byte what `documents.dumps_doc(documents.document(obj, ...))` writes.

A line takes this path only where the result is certain to equal the Python path's:

* a JSON object (JSON whitespace around tokens), no nesting deeper than 64, valid UTF-8;
* keys without escapes; "text", "id" and "meta" at most once each;
* "text" and "id" strings without lone surrogates, the text not all whitespace;
* "meta" absent, not an object (document() then gives {}), or a flat object of unique keys
  whose values are strings, integers of up to 18 digits, true, false or null;
* other keys' values any valid JSON except NaN/Infinity (validated, then dropped, as
  document() drops them).

Every other line (blank lines aside) is reported SLOW and goes through documents.json_object
and documents.document, so rejects and their reasons stay exactly those of the Python path. Outputs are written
with 64-byte vector copies, so each output buffer needs 64 spare bytes.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.kernels.scratch import read_only, scratch
from data_pipeline.kernels.simd import HAVE_NUMBA

BLANK, FAST, SLOW = 0, 1, 2

if HAVE_NUMBA:
    import numba
    from numba.cpython.unsafe.numbers import trailing_zeros as _tz

    from data_pipeline.kernels.simd import (
        copy64,
        newline_count64,
        newline_mask64,
        special_mask64,
        ws_mask64,
    )

    @numba.njit(cache=True)
    def _line_ends(buf, n, ends):
        """The positions of b"\\n" in buf[:n] (buf holds 64 bytes more) into `ends`; their
        number."""
        base = buf.ctypes.data
        k = 0
        for i in range(0, n, 64):
            m = newline_mask64(base + i)
            if n - i < 64:
                m &= (_ONE << np.uint64(n - i)) - _ONE
            while m:
                ends[k] = i + np.int64(_tz(m))
                k += 1
                m &= m - _ONE
        return k

    @numba.njit(cache=True)
    def _count_newlines(buf, n):
        count = 0
        base = buf.ctypes.data
        i = 0
        while i + 64 <= n:
            count += np.int64(newline_count64(base + i))
            i += 64
        for q in range(i, n):
            count += buf[q] == 10
        return count

    _ONE = np.uint64(1)
    _HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8).copy()

    @numba.njit(cache=True, inline="always")
    def _at(buf, i, end):
        """buf[i], or 0 (never valid where a token is expected) at or past the line's end."""
        return buf[i] if i < end else 0

    @numba.njit(cache=True, inline="always")
    def _ws(buf, i, end):
        while i < end:
            c = buf[i]
            if c != 32 and c != 9 and c != 13 and c != 10:
                break
            i += 1
        return i

    @numba.njit(cache=True, inline="always")
    def _is_space(cp):
        """str.isspace() of a code point (see minhash's module docstring for the list)."""
        if cp < 128:
            return (9 <= cp <= 13) or (28 <= cp <= 32)
        return (
            cp == 0x85
            or cp == 0xA0
            or cp == 0x1680
            or (0x2000 <= cp <= 0x200A)
            or cp == 0x2028
            or cp == 0x2029
            or cp == 0x202F
            or cp == 0x205F
            or cp == 0x3000
        )

    @numba.njit(cache=True, inline="always")
    def _put_utf8(out, o, cp):
        if cp < 0x80:
            out[o] = cp
            return o + 1
        if cp < 0x800:
            out[o] = 0xC0 | (cp >> 6)
            out[o + 1] = 0x80 | (cp & 0x3F)
            return o + 2
        if cp < 0x10000:
            out[o] = 0xE0 | (cp >> 12)
            out[o + 1] = 0x80 | ((cp >> 6) & 0x3F)
            out[o + 2] = 0x80 | (cp & 0x3F)
            return o + 3
        out[o] = 0xF0 | (cp >> 18)
        out[o + 1] = 0x80 | ((cp >> 12) & 0x3F)
        out[o + 2] = 0x80 | ((cp >> 6) & 0x3F)
        out[o + 3] = 0x80 | (cp & 0x3F)
        return o + 4

    @numba.njit(cache=True, inline="always")
    def _put_json(out, o, cp):
        """cp as orjson writes it inside a string: \\" \\\\ \\b \\t \\n \\f \\r, other
        control characters as \\u00xx (lower-case hex), everything else as UTF-8."""
        if cp >= 32 and cp != 34 and cp != 92:
            return _put_utf8(out, o, cp)
        out[o] = 92
        if cp == 34 or cp == 92:
            out[o + 1] = cp
            return o + 2
        short = 0
        if cp == 8:
            short = 98
        elif cp == 9:
            short = 116
        elif cp == 10:
            short = 110
        elif cp == 12:
            short = 102
        elif cp == 13:
            short = 114
        if short:
            out[o + 1] = short
            return o + 2
        out[o + 1], out[o + 2], out[o + 3] = 117, 48, 48
        out[o + 4], out[o + 5] = _HEX[cp >> 4], _HEX[cp & 15]
        return o + 6

    @numba.njit(cache=True, inline="always")
    def _hex4(buf, i, end):
        """The value of 4 hex digits at buf[i:i+4], or -1."""
        if i + 4 > end:
            return -1
        v = 0
        for k in range(4):
            c = buf[i + k]
            if 48 <= c <= 57:
                d = c - 48
            elif 97 <= c <= 102:
                d = c - 87
            elif 65 <= c <= 70:
                d = c - 55
            else:
                return -1
            v = v * 16 + d
        return v

    @numba.njit(cache=True)
    def _string(buf, i, end, mode, text, t, out, o):
        """The JSON string whose opening quote is at buf[i]. mode 0: validate; 1: decode to
        `text` (UTF-8, from t) and write orjson's form to `out` (from o); 2: only the
        latter. Returns (index after the closing quote or -1 if invalid, t, o, flags);
        flags: 1 an escape was seen, 2 a character that is not whitespace, 4 a lone
        surrogate."""
        flags = 0
        i += 1
        base_t = text.ctypes.data
        base_o = out.ctypes.data
        base_b = buf.ctypes.data
        while True:
            if i >= end:
                return -1, t, o, flags
            m = special_mask64(base_b + i)
            if end - i < 64:  # the line's end stops a run like a quote would
                m |= ~((_ONE << np.uint64(end - i)) - _ONE)
            n = np.int64(_tz(m)) if m else 64
            if n:  # a run of plain ASCII: copy it whole (64 bytes; the rest is overwritten)
                if mode == 1:
                    if not flags & 2:  # any byte but a space (the only whitespace here)?
                        run = (_ONE << np.uint64(n)) - _ONE if n < 64 else ~np.uint64(0)
                        if ~ws_mask64(base_b + i) & run:
                            flags |= 2
                    copy64(base_t + t, base_b + i)
                    t += n
                if mode != 0:
                    copy64(base_o + o, base_b + i)
                    o += n
                i += n
                if n == 64:
                    continue
            if i >= end:
                return -1, t, o, flags
            c = buf[i]
            if c == 34:
                return i + 1, t, o, flags
            if c < 32:
                return -1, t, o, flags  # a raw control character: invalid JSON
            if c == 92:
                flags |= 1
                e = _at(buf, i + 1, end)
                i += 2
                if e == 117:
                    cp = _hex4(buf, i, end)
                    if cp < 0:
                        return -1, t, o, flags
                    i += 4
                    if 0xD800 <= cp < 0xDC00:
                        lo = -1
                        if _at(buf, i, end) == 92 and _at(buf, i + 1, end) == 117:
                            lo = _hex4(buf, i + 2, end)
                        if 0xDC00 <= lo < 0xE000:
                            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00)
                            i += 6
                        else:
                            flags |= 4
                    elif 0xDC00 <= cp < 0xE000:
                        flags |= 4
                elif e == 34 or e == 92 or e == 47:
                    cp = e
                elif e == 98:
                    cp = 8
                elif e == 102:
                    cp = 12
                elif e == 110:
                    cp = 10
                elif e == 114:
                    cp = 13
                elif e == 116:
                    cp = 9
                else:
                    return -1, t, o, flags
                if flags & 4:
                    if mode != 0:
                        return -1, t, o, flags  # UTF-8 cannot hold it: the Python path decides
                    continue
                if mode == 1:
                    t = _put_utf8(text, t, cp)
                    if not _is_space(cp):
                        flags |= 2
                if mode != 0:
                    o = _put_json(out, o, cp)
                continue
            # c >= 0x80: one UTF-8 character, validated as Python's strict decoder does
            k = 0
            lo, hi = 0x80, 0xBF
            if 0xC2 <= c <= 0xDF:
                k, cp = 1, c & 0x1F
            elif 0xE0 <= c <= 0xEF:
                k, cp = 2, c & 0x0F
                if c == 0xE0:
                    lo = 0xA0
                elif c == 0xED:
                    hi = 0x9F
            elif 0xF0 <= c <= 0xF4:
                k, cp = 3, c & 0x07
                if c == 0xF0:
                    lo = 0x90
                elif c == 0xF4:
                    hi = 0x8F
            else:
                return -1, t, o, flags
            if i + k >= end:
                return -1, t, o, flags
            for q in range(1, k + 1):
                d = buf[i + q]
                if q == 1 and not (lo <= d <= hi):
                    return -1, t, o, flags
                if q > 1 and not (0x80 <= d <= 0xBF):
                    return -1, t, o, flags
                cp = (cp << 6) | (d & 0x3F)
            for q in range(k + 1):
                if mode == 1:
                    text[t + q] = buf[i + q]
                if mode != 0:
                    out[o + q] = buf[i + q]
            if mode == 1:
                t += k + 1
                if not _is_space(cp):
                    flags |= 2
            if mode != 0:
                o += k + 1
            i += k + 1

    @numba.njit(cache=True, inline="always")
    def _number(buf, i, end):
        """The index after the JSON number at buf[i], or -1; and whether it is a plain
        integer (no fraction or exponent)."""
        if _at(buf, i, end) == 45:
            i += 1
        c = _at(buf, i, end)
        if c == 48:
            i += 1
        elif 49 <= c <= 57:
            while 48 <= _at(buf, i, end) <= 57:
                i += 1
        else:
            return -1, False
        plain = True
        if _at(buf, i, end) == 46:
            plain = False
            i += 1
            if not 48 <= _at(buf, i, end) <= 57:
                return -1, False
            while 48 <= _at(buf, i, end) <= 57:
                i += 1
        c = _at(buf, i, end)
        if c == 101 or c == 69:
            plain = False
            i += 1
            c = _at(buf, i, end)
            if c == 43 or c == 45:
                i += 1
            if not 48 <= _at(buf, i, end) <= 57:
                return -1, False
            while 48 <= _at(buf, i, end) <= 57:
                i += 1
        return i, plain

    @numba.njit(cache=True, inline="always")
    def _literal(buf, i, end):
        """The index after true, false or null at buf[i], or -1."""
        c = buf[i]
        if c == 116 and i + 4 <= end:
            ok = buf[i + 1] == 114 and buf[i + 2] == 117 and buf[i + 3] == 101
            return i + 4 if ok else -1
        if c == 102 and i + 5 <= end:
            ok = buf[i + 1] == 97 and buf[i + 2] == 108 and buf[i + 3] == 115
            return i + 5 if ok and buf[i + 4] == 101 else -1
        if c == 110 and i + 4 <= end:
            ok = buf[i + 1] == 117 and buf[i + 2] == 108 and buf[i + 3] == 108
            return i + 4 if ok else -1
        return -1

    @numba.njit(cache=True, inline="always")
    def _member_name(buf, i, end, scratch):
        """The index after an object member's name and its colon at buf[i], or -1."""
        if _at(buf, i, end) != 34:
            return -1
        i = _string(buf, i, end, 0, scratch, 0, scratch, 0)[0]
        if i < 0:
            return -1
        i = _ws(buf, i, end)
        if _at(buf, i, end) != 58:
            return -1
        return i + 1

    @numba.njit(cache=True)
    def _skip_value(buf, i, end, stack, scratch):
        """Validate the JSON value starting at buf[i] (after whitespace); the index after it,
        or -1. Nesting deeper than len(stack) counts as invalid (the Python path decides)."""
        sp = 0
        while True:
            i = _ws(buf, i, end)
            c = _at(buf, i, end)
            if c == 123 or c == 91:  # { or [
                close = 125 if c == 123 else 93
                i = _ws(buf, i + 1, end)
                if _at(buf, i, end) == close:
                    i += 1
                else:
                    if sp == len(stack):
                        return -1
                    stack[sp] = close
                    sp += 1
                    if c == 123:
                        i = _member_name(buf, i, end, scratch)
                        if i < 0:
                            return -1
                    continue  # the first member's or element's value
            elif c == 34:
                i = _string(buf, i, end, 0, scratch, 0, scratch, 0)[0]
            elif c == 45 or 48 <= c <= 57:
                i = _number(buf, i, end)[0]
            elif c:
                i = _literal(buf, i, end)
            else:
                return -1
            if i < 0:
                return -1
            while True:  # a value is complete: close containers or go to the next value
                if sp == 0:
                    return i
                i = _ws(buf, i, end)
                c = _at(buf, i, end)
                if c == stack[sp - 1]:
                    sp -= 1
                    i += 1
                    continue
                if c != 44:
                    return -1
                i = _ws(buf, i + 1, end)
                if stack[sp - 1] == 125:
                    i = _member_name(buf, i, end, scratch)
                    if i < 0:
                        return -1
                break

    @numba.njit(cache=True, inline="always")
    def _key_is(buf, ks, ke, word):
        if ke - ks != len(word):
            return False
        for q in range(len(word)):
            if buf[ks + q] != word[q]:
                return False
        return True

    @numba.njit(cache=True)
    def _meta(buf, i, end, out, o, stack, scratch, keys):
        """The flat "meta" object at buf[i] written as orjson writes the dict json.loads
        makes of it; (index after it or -1, o)."""
        out[o] = 123
        o += 1
        i = _ws(buf, i + 1, end)
        if _at(buf, i, end) == 125:
            out[o] = 125
            return i + 1, o + 1
        n = 0
        while True:
            if _at(buf, i, end) != 34 or n == len(keys) // 2:
                return -1, o
            ks = i + 1
            if n:
                out[o] = 44
                o += 1
            out[o] = 34
            j, _, o2, flags = _string(buf, i, end, 2, scratch, 0, out, o + 1)
            if j < 0 or flags & 1:
                return -1, o
            ke = j - 1
            for p in range(n):  # a repeated key: json keeps the last value
                if _key_is(buf, ks, ke, buf[keys[2 * p] : keys[2 * p + 1]]):
                    return -1, o
            keys[2 * n], keys[2 * n + 1] = ks, ke
            n += 1
            o = o2
            out[o], out[o + 1] = 34, 58
            o += 2
            i = _ws(buf, j, end)
            if _at(buf, i, end) != 58:
                return -1, o
            i = _ws(buf, i + 1, end)
            c = _at(buf, i, end)
            if c == 34:
                out[o] = 34
                j, _, o, flags = _string(buf, i, end, 2, scratch, 0, out, o + 1)
                if j < 0:
                    return -1, o
                out[o] = 34
                o += 1
            elif c == 45 or 48 <= c <= 57:
                j, plain = _number(buf, i, end)
                if j < 0 or not plain or j - i > 18:
                    return -1, o  # floats and huge integers: formatting is orjson's business
                if j - i == 2 and buf[i] == 45 and buf[i + 1] == 48:
                    i += 1  # -0 is the integer 0
                for q in range(i, j):
                    out[o] = buf[q]
                    o += 1
            elif c:
                j = _literal(buf, i, end)
                if j < 0:
                    return -1, o
                for q in range(i, j):
                    out[o] = buf[q]
                    o += 1
            else:
                return -1, o
            i = _ws(buf, j, end)
            c = _at(buf, i, end)
            if c == 125:
                out[o] = 125
                return i + 1, o + 1
            if c != 44:
                return -1, o
            i = _ws(buf, i + 1, end)

    _TEXT = np.frombuffer(b"text", dtype=np.uint8).copy()
    _ID = np.frombuffer(b"id", dtype=np.uint8).copy()
    _META = np.frombuffer(b"meta", dtype=np.uint8).copy()
    _HEAD = np.frombuffer(b'{"text":"', dtype=np.uint8).copy()
    _MID_ID = np.frombuffer(b'","id":"', dtype=np.uint8).copy()
    _MID_META = np.frombuffer(b'","meta":', dtype=np.uint8).copy()

    @numba.njit(cache=True, inline="always")
    def _put(out, o, word):
        for q in range(len(word)):
            out[o + q] = word[q]
        return o + len(word)

    @numba.njit(cache=True, inline="always")
    def _blank(buf, i, end):
        """Whether buf[i:end] is all whitespace as bytes.isspace() sees it (a blank line)."""
        for q in range(i, end):
            c = buf[q]
            if not (c == 32 or 9 <= c <= 13):
                return False
        return True

    @numba.njit(cache=True, inline="always")
    def _meta_value(buf, i, end, metabuf, stack, scratch, keys):
        """The "meta" member's value at buf[i] written to metabuf as document() keeps it:
        (index after it or -1, its length)."""
        if _at(buf, i, end) == 123:
            return _meta(buf, i, end, metabuf, 0, stack, scratch, keys)
        i = _skip_value(buf, i, end, stack, scratch)  # not an object: document() gives {}
        metabuf[0], metabuf[1] = 123, 125
        return i, 2

    @numba.njit(cache=True, inline="always")
    def _put_tail(out, o, idbuf, n_id, metabuf, n_meta):
        """The output line after its text: the id, the meta object and the closing brace and
        newline; the index after them."""
        o = _put(out, o, _MID_ID)
        for q in range(n_id):
            out[o + q] = idbuf[q]
        o += n_id
        o = _put(out, o, _MID_META)
        for q in range(n_meta):
            out[o + q] = metabuf[q]
        o += n_meta
        out[o], out[o + 1] = 125, 10
        return o + 2

    @numba.njit(cache=True)
    def _line(buf, i, end, text, t, out, o, idbuf, metabuf, stack, scratch, keys):
        """One line: (status, t, o) with the text appended to `text` and the output line to
        `out` when the status is FAST."""
        if _blank(buf, i, end):
            return BLANK, t, o
        i = _ws(buf, i, end)
        if _at(buf, i, end) != 123:
            return SLOW, t, o
        i = _ws(buf, i + 1, end)
        t0, o0 = t, o
        o = _put(out, o, _HEAD)
        have_text = have_id = have_meta = False
        nonws = False
        n_id = n_meta = 0
        if _at(buf, i, end) == 125:
            return SLOW, t0, o0  # {}: no text
        while True:
            if _at(buf, i, end) != 34:
                return SLOW, t0, o0
            ks = i + 1
            j, _, _, flags = _string(buf, i, end, 0, scratch, 0, scratch, 0)
            if j < 0 or flags & 1:
                return SLOW, t0, o0
            ke = j - 1
            i = _ws(buf, j, end)
            if _at(buf, i, end) != 58:
                return SLOW, t0, o0
            i = _ws(buf, i + 1, end)
            if _key_is(buf, ks, ke, _TEXT):
                if have_text or _at(buf, i, end) != 34:
                    return SLOW, t0, o0
                i, t, o, flags = _string(buf, i, end, 1, text, t, out, o)
                have_text = True
                nonws = (flags & 2) != 0
            elif _key_is(buf, ks, ke, _ID):
                if have_id or _at(buf, i, end) != 34:
                    return SLOW, t0, o0
                i, _, n_id, flags = _string(buf, i, end, 2, scratch, 0, idbuf, 0)
                have_id = True
            elif _key_is(buf, ks, ke, _META):
                if have_meta:
                    return SLOW, t0, o0
                have_meta = True
                i, n_meta = _meta_value(buf, i, end, metabuf, stack, scratch, keys)
            else:
                i = _skip_value(buf, i, end, stack, scratch)
            if i < 0:
                return SLOW, t0, o0
            i = _ws(buf, i, end)
            c = _at(buf, i, end)
            if c == 125:
                break
            if c != 44:
                return SLOW, t0, o0
            i = _ws(buf, i + 1, end)
        if _ws(buf, i + 1, end) != end or not (have_text and have_id and nonws):
            return SLOW, t0, o0
        if not have_meta:
            metabuf[0], metabuf[1] = 123, 125
            n_meta = 2
        return FAST, t, _put_tail(out, o, idbuf, n_id, metabuf, n_meta)

    @numba.njit(cache=True)
    def _parse(buf, starts, ends, text, out, text_off, out_off, status, longest):
        stack = np.empty(64, dtype=np.uint8)
        scratch = np.empty(64, dtype=np.uint8)  # never written (validation only)
        keys = np.empty(32, dtype=np.int64)
        idbuf = np.empty(longest + 128, dtype=np.uint8)
        metabuf = np.empty(longest + 128, dtype=np.uint8)
        t = o = 0
        for n in range(len(starts)):
            s, t, o = _line(
                buf, starts[n], ends[n], text, t, out, o, idbuf, metabuf, stack, scratch, keys
            )
            status[n] = s
            text_off[n + 1] = t
            out_off[n + 1] = o


def parse_block(block, n: int | None = None) -> tuple | None:
    """The lines of block[:n] (bytes-like; n defaults to its length; split at b"\\n", a last
    line without one counts): status per line (BLANK, FAST, SLOW), and for FAST lines the
    text's UTF-8 bytes (text[text_off[k]:text_off[k+1]]) and the output line
    (out[out_off[k]:out_off[k+1]]), both uint8 arrays with 64 spare bytes, valid until the
    next call; None without numba. A block with 64 bytes to spare after n is not copied."""
    if not HAVE_NUMBA:
        return None
    if n is None:
        n = len(block)
    if len(block) >= n + 64:
        buf = np.frombuffer(block, dtype=np.uint8)
    else:
        buf = scratch("jsonl.block", n + 64)
        buf[:n] = np.frombuffer(block, dtype=np.uint8)[:n]
    buf = read_only(buf)
    size = n
    ends = np.empty(size + 1, dtype=np.int64)
    n = _line_ends(buf, size, ends)
    if size == 0 or buf[size - 1] != 10:  # a last line without a newline (or an empty block)
        ends[n] = size
        n += 1
    ends = ends[:n]
    starts = np.empty(len(ends), dtype=np.int64)
    starts[:1] = 0
    starts[1:] = ends[:-1] + 1
    longest = int((ends - starts).max()) if len(ends) else 0
    text = scratch("jsonl.text", size + 128)
    out = scratch("jsonl.out", size + 32 * n + 128)
    text_off = np.zeros(n + 1, dtype=np.int64)
    out_off = np.zeros(n + 1, dtype=np.int64)
    status = np.empty(n, dtype=np.uint8)
    _parse(buf, starts, ends, text, out, text_off, out_off, status, longest)
    return status, starts, ends, text, text_off, out, out_off


def count_newlines(buf: bytearray | bytes, n: int) -> int:
    """buf.count(b"\\n", 0, n), 64 bytes at a time: numbering the lines of the dedup input
    with bytes.count cost the stage's parent noticeable CPU (`python benchmarks/dedup_kernels.py` times the two)."""
    if not HAVE_NUMBA:
        return buf.count(b"\n", 0, n)
    return int(_count_newlines(read_only(np.frombuffer(buf, dtype=np.uint8)), n))
