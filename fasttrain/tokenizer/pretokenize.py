"""Pre-splitting text into chunks, as a GPT-4 style regex would, at numba speed.

The split regex (`SPLIT_PATTERN`, or `CL100K_PATTERN`) is run by a hand-written numba state
machine over the UTF-8 bytes that gives the same chunks as `regex.findall(pattern, text)` (tests
check this); the Python regex module alone runs at ~1 MB/s on source code, far too slow to train
on. BPE training (bpe.py) counts these chunks; encoding leaves the split to tiktoken, which runs
the pattern itself.
"""
from __future__ import annotations

import numba
import numpy as np

# nanochat's variant of the GPT-4 (cl100k) pattern: numbers split into groups of at most 2 digits
# (cl100k: 3), which spends fewer tokens of a small vocabulary on numbers.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# tiktoken's cl100k_base pattern, exactly.
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
# pattern -> (max digits per number chunk, whether a whitespace run reaching the end of the text is
# one chunk before the newline rule applies). The numba splitter implements exactly these two.
_PATTERNS = {SPLIT_PATTERN: (2, False), CL100K_PATTERN: (3, True)}


# ---------------------------------------------------------------------------------------------
# Pre-splitting: character classes and the regex as a state machine
# ---------------------------------------------------------------------------------------------
# Class of each code point: 0 other, 1 letter \p{L}, 2 number \p{N}, 3 whitespace \s.
_OTHER, _LETTER, _NUMBER, _SPACE = 0, 1, 2, 3


def _ascii_classes() -> np.ndarray:
    cls = np.zeros(0x110000, dtype=np.uint8)
    for c in range(128):
        ch = chr(c)
        if ch.isalpha():
            cls[c] = _LETTER
        elif ch.isdigit():
            cls[c] = _NUMBER
        elif ch in " \t\n\v\f\r":  # \x1c-\x1f are str.isspace() but not \s
            cls[c] = _SPACE
    return cls


class _CharClasses:
    """Code point -> class table, filled lazily with the classes of the code points seen.

    Classes of non-ASCII code points come from the `regex` module (installed with tiktoken), so
    the splitter agrees with `regex.findall(pattern, text)` by construction.
    """

    def __init__(self):
        self.table = _ascii_classes()
        self.known = np.zeros(0x110000, dtype=np.bool_)
        self.known[:128] = True

    def learn(self, buf: np.ndarray) -> None:
        if buf.size == 0 or buf.max() < 128:
            return
        found = np.empty(buf.size, dtype=np.int32)
        found = np.unique(found[:_non_ascii_code_points(buf, found)])
        new = found[~self.known[found]]
        if new.size == 0:
            return
        import regex

        text = "".join(map(chr, new.tolist()))
        for cls, pat in ((_LETTER, r"\p{L}"), (_NUMBER, r"\p{N}"), (_SPACE, r"\s")):
            hits = regex.findall(pat, text)
            if hits:
                self.table[np.fromiter(map(ord, hits), dtype=np.int64, count=len(hits))] = cls
        self.known[new] = True


@numba.njit(cache=True)
def _decode_at(buf, i, end):
    """(code point, byte length) of the UTF-8 sequence at buf[i]; invalid bytes are 1-byte U+FFFD."""
    b0 = buf[i]
    if b0 < 0x80:
        return np.int32(b0), 1
    if b0 >= 0xF0 and i + 3 < end:
        cp = (((b0 & 7) << 18) | ((buf[i + 1] & 63) << 12) | ((buf[i + 2] & 63) << 6)
              | (buf[i + 3] & 63))
        return np.int32(cp if cp < 0x110000 else 0xFFFD), 4
    if b0 >= 0xE0 and i + 2 < end:
        return np.int32(((b0 & 15) << 12) | ((buf[i + 1] & 63) << 6) | (buf[i + 2] & 63)), 3
    if b0 >= 0xC0 and i + 1 < end:
        return np.int32(((b0 & 31) << 6) | (buf[i + 1] & 63)), 2
    return np.int32(0xFFFD), 1


@numba.njit(cache=True, nogil=True)
def _non_ascii_code_points(buf, out):
    """Writes the code points >= 128 of buf to out (repeats included); returns how many."""
    i = 0
    k = 0
    n = buf.size
    while i < n:
        cp, w = _decode_at(buf, i, n)
        if cp >= 128:
            out[k] = cp
            k += 1
        i += w
    return k


@numba.njit(cache=True, nogil=True)
def _split_doc(buf, start, end, cls, max_digits, ws_end_first, cps, offs, bounds):
    """Split buf[start:end] into chunks; writes chunk end offsets (absolute) to bounds, returns count.

    cps/offs are scratch of at least end - start + 1 entries (code points and their byte offsets).
    Follows the alternatives of the pattern in order (comments show each one).
    """
    n = 0
    i = start
    while i < end:
        cp, w = _decode_at(buf, i, end)
        cps[n] = cp
        offs[n] = i
        n += 1
        i += w
    offs[n] = end
    nb = 0
    i = 0
    while i < n:
        c = cps[i]
        k = cls[c]
        j = -1
        # '(?i:[sdmt]|ll|ve|re)
        if c == 39 and i + 1 < n:
            c1 = cps[i + 1] | 32 if cps[i + 1] < 128 else cps[i + 1]
            if c1 == 115 or c1 == 100 or c1 == 109 or c1 == 116 or c1 == 0x17F:
                j = i + 2
            elif i + 2 < n:
                c2 = cps[i + 2] | 32 if cps[i + 2] < 128 else cps[i + 2]
                if (c1 == 108 and c2 == 108) or (c1 == 118 and c2 == 101) or (c1 == 114 and c2 == 101):
                    j = i + 3
        # [^\r\n\p{L}\p{N}]?+\p{L}+
        if j < 0:
            if k == 1:
                j = i + 1
            elif k != 2 and c != 10 and c != 13 and i + 1 < n and cls[cps[i + 1]] == 1:
                j = i + 2
            if j > 0:
                while j < n and cls[cps[j]] == 1:
                    j += 1
        # \p{N}{1,max_digits}
        if j < 0 and k == 2:
            j = i + 1
            while j < n and j - i < max_digits and cls[cps[j]] == 2:
                j += 1
        # ' ?[^\s\p{L}\p{N}]++[\r\n]*'
        if j < 0:
            if c == 32 and i + 1 < n and cls[cps[i + 1]] == 0:
                j = i + 1
            elif k == 0:
                j = i
            if j >= 0:
                while j < n and cls[cps[j]] == 0:
                    j += 1
                while j < n and (cps[j] == 10 or cps[j] == 13):
                    j += 1
        if j < 0:  # whitespace run [i, r)
            r = i + 1
            last_nl = i if (c == 10 or c == 13) else -1
            while r < n and cls[cps[r]] == 3:
                if cps[r] == 10 or cps[r] == 13:
                    last_nl = r
                r += 1
            if ws_end_first and r == n:  # \s++$
                j = r
            elif last_nl >= 0:  # \s*[\r\n]
                j = last_nl + 1
            elif r == n or r - i >= 2:  # \s+(?!\S)
                j = r if r == n else r - 1
            else:  # \s+ (cl100k: \s)
                j = r
        bounds[nb] = offs[j]
        nb += 1
        i = j
    return nb



def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: replaced by U+FFFD, as tiktoken does
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


_split_classes = None  # code point classes for split_text, made on first use


def split_text(text: str, pattern: str = SPLIT_PATTERN) -> list[str]:
    """Pre-split one text like `regex.findall(pattern, text)` (pattern: one of the two constants)."""
    if pattern not in _PATTERNS:
        raise ValueError("split_text implements SPLIT_PATTERN and CL100K_PATTERN only")
    global _split_classes
    if _split_classes is None:
        _split_classes = _CharClasses()
    data = _utf8(text)
    buf = np.frombuffer(data, dtype=np.uint8)
    _split_classes.learn(buf)
    n = len(data)
    cps, offs, bounds = (np.empty(n + 1, np.int32), np.empty(n + 1, np.int64),
                         np.empty(n + 1, np.int64))
    nb = _split_doc(buf, 0, n, _split_classes.table, *_PATTERNS[pattern], cps, offs, bounds)
    ends = bounds[:nb].tolist()
    return [data[s:e].decode("utf-8") for s, e in zip([0] + ends[:-1], ends)]
