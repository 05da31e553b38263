"""Reading the text files users hand arbor: corpora, ``metrics.jsonl``, config files.

Python's own ``UnicodeDecodeError`` says which byte could not be decoded but
not in which file, so a bad byte deep in a corpus reaches the user as
``'utf-8' codec can't decode byte 0xff in position 81234``. Every reader here
raises instead an error of the caller's class (a ``ValueError`` subclass, which
the CLI prints as one ``arbor: error: ...`` line) that names the file, the line
and the column.

Corpus documents (`read_document`) follow a rule of their own, since they are
the text a model learns from and one stray byte should not cost a whole file:

- a file holding a NUL byte is binary and refused: no text file holds one
  (a UTF-16 file does; it needs converting to UTF-8 first);
- a file that is not valid UTF-8 is read with each invalid byte replaced by
  U+FFFD when at most ``MAX_INVALID_SHARE`` (1 %) of its bytes are invalid,
  with an `UndecodableBytesWarning` saying how many; above that it is refused,
  as text in another encoding (Latin-1, cp1252) or not text at all.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path

#: Share of a corpus file's bytes that may be invalid UTF-8 before it is refused rather than
#: read with U+FFFD in their place: a few stray bytes in real text, not a file in another encoding
#: (accented Latin-1 prose runs at 2-5 % of its bytes) or binary data (about half its bytes).
MAX_INVALID_SHARE = 0.01

# ``surrogateescape`` decodes each invalid byte 0xNN to the lone surrogate U+DCNN, which no valid
# UTF-8 produces, so counting these counts the invalid bytes.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


class UndecodableBytesWarning(UserWarning):
    """A corpus file was read with a few invalid UTF-8 bytes replaced by U+FFFD."""


def _where(data: bytes, offset: int) -> tuple[int, int]:
    """(line, column), both from 1, of byte ``offset`` in ``data``."""
    line_start = data.rfind(b"\n", 0, offset) + 1
    return data.count(b"\n", 0, offset) + 1, offset - line_start + 1


def _not_utf8(path: Path, data: bytes, error: UnicodeDecodeError, first_line: int = 1) -> str:
    line, column = _where(data, error.start)
    byte = data[error.start : error.start + 1].hex()
    return (f"{path}:{first_line + line - 1}: not UTF-8 text (byte 0x{byte} at column {column}: {error.reason}); "
            "save the file as UTF-8")


def read_utf8(path: str | Path, *, error: type[Exception] = ValueError) -> str:
    """The whole file decoded as strict UTF-8; an invalid byte raises ``error`` naming the file, line and column."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(_not_utf8(path, data, exc)) from None


def utf8_lines(path: str | Path, *, error: type[Exception] = ValueError) -> Iterator[tuple[int, str]]:
    """(line number from 1, line without its newline) for every line of a UTF-8 file, read lazily.

    A line that is not valid UTF-8 raises ``error`` naming the file, that line and the column, when
    the iteration reaches it: the lines before it have been seen, so a JSON-lines reader reports the
    first bad line whatever is wrong with it.
    """
    path = Path(path)
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            yield number, decode_line(path, number, raw, error=error).rstrip("\r\n")


def log_lines(path: str | Path, *, error: type[Exception] = ValueError) -> Iterator[tuple[int, str, bool]]:
    """(line number from 1, text, whether it is the last line) for each line of a log that a crash may
    have cut short, such as ``metrics.jsonl``: a last line cut inside a character is dropped, a byte
    that is not UTF-8 on any other line raises ``error`` naming the file, line and column."""
    path = Path(path)
    lines = path.read_bytes().splitlines()
    for number, raw in enumerate(lines, start=1):
        last = number == len(lines)
        try:
            text = decode_line(path, number, raw, error=error)
        except error:
            if not last:
                raise
            return
        yield number, text, last


def decode_line(path: str | Path, number: int, raw: bytes, *, error: type[Exception] = ValueError) -> str:
    """Line ``number`` (from 1) of the file ``path``, read as the bytes ``raw``, decoded as strict UTF-8;
    an invalid byte raises ``error`` naming the file, the line and the column.

    For readers that split a file's bytes into lines themselves, such as `log_lines`.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(_not_utf8(Path(path), raw, exc, first_line=number)) from None


def read_document(path: str | Path, *, error: type[Exception] = ValueError, label: str = "corpus file") -> str:
    """A corpus file's text under the rules in this module's docstring; a refusal raises ``error``.

    ``label`` starts the message (``corpus file 'x.bin': ...``).
    """
    path = Path(path)
    data = path.read_bytes()
    where = f"{label} {str(path)!r}"
    nul = data.find(b"\0")
    if nul >= 0:
        line, column = _where(data, nul)
        raise error(f"{where}: a binary file, not text (NUL byte at line {line}, column {column}); arbor reads "
                    "UTF-8 text files (convert UTF-16 text with iconv -f UTF-16 -t UTF-8)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        first = exc
    escaped = data.decode("utf-8", errors="surrogateescape")
    invalid = len(_ESCAPED_BYTE.findall(escaped))
    line, column = _where(data, first.start)
    share = invalid / len(data)
    if share > MAX_INVALID_SHARE:
        raise error(f"{where}: not UTF-8 text ({invalid:,} of {len(data):,} bytes are invalid UTF-8, more than "
                    f"{MAX_INVALID_SHARE:.0%}; the first at line {line}, column {column}: {first.reason}); "
                    "save it as UTF-8 (iconv -f LATIN1 -t UTF-8 for Latin-1 text)")
    warnings.warn(f"{where}: {invalid:,} byte(s) that are not UTF-8 (the first at line {line}, column {column}) "
                  "read as U+FFFD", UndecodableBytesWarning, stacklevel=2)
    return _ESCAPED_BYTE.sub("\ufffd", escaped)
