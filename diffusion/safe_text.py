"""Names from the file system made safe wherever they are written: PNG text chunks, logs, JSON.

A folder or file name may hold a newline, a terminal escape, bytes that are not UTF-8 (Python keeps
them as lone surrogates, which no UTF-8 writer accepts, so a PNG or JSON write would crash), or be
thousands of characters long. `safe_name` is the one function every such name passes through
before it becomes a class name, a metadata value or a log line.
"""
from __future__ import annotations

import hashlib
import unicodedata

NAME_LIMIT = 120  # characters of a name kept in metadata and logs; a longer one is cut (see safe_name)
UNSAFE_CATEGORIES = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")  # controls, format, surrogates, unassigned, line breaks


def _escape(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape): show the byte
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def safe_name(name: str | bytes, limit: int | None = NAME_LIMIT, keep: str = "") -> str:
    """`name` as printable UTF-8 text: non-UTF-8 bytes become `\\xNN`, control and format characters
    (newline, ESC, DEL, right-to-left override, ...) and line separators become `\\xNN` / `\\uNNNN`,
    except those in `keep` (PNG text may keep "\\n"); printable text, any script, is unchanged. A result
    longer than `limit` is cut and ends in "..." and 8 hex digits of the original's SHA-1, so distinct
    long names stay distinct. Idempotent: a safe name comes back unchanged (a backslash is not escaped)."""
    if isinstance(name, bytes):
        name = name.decode("utf-8", "surrogateescape")
    text = "".join(_escape(c) if c not in keep and unicodedata.category(c) in UNSAFE_CATEGORIES else c for c in name)
    if limit is not None and len(text) > limit:
        digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        text = text[: max(0, limit - 11)] + "..." + digest
    return text
