"""Text files and streams read as UTF-8, with the file and line of any byte that is not.

Decoding bytes here, line by line, rather than through a text stream is what puts the line
number in the error: a text stream raises a bare UnicodeDecodeError from its buffer (and a
stdin opened with surrogateescape passes the bad bytes on, to fail later in the tokenizer).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator
from pathlib import Path

from rlkit.errors import InputError


def decode_lines(raw_lines: Iterable[bytes], where: str) -> Iterator[str]:
    """Lines of bytes as UTF-8 text (a leading BOM dropped); other bytes are one error naming the line."""
    for number, raw in enumerate(raw_lines, 1):
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(
                f"{where}:{number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at byte {err.start + 1} of the line); "
                "save it as UTF-8"
            )


def read_utf8(path: Path) -> str:
    """A whole file as UTF-8 text (BOM accepted), or one error naming the line of the first bad byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); save it as UTF-8")
