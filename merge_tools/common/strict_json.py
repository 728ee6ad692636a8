"""JSON read the way the Rust libraries read it, and text shown safely."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import Any, NoReturn

from merge_tools.common.errors import CliError

SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}(\\u[dD][c-fC-F][0-9a-fA-F]{2})?|\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def parse_json(raw: bytes, where: object) -> Any:
    """JSON read the way the Rust libraries read it, strictly: UTF-8 without a byte-order
    mark, no key twice in one object, no lone surrogate, no NaN/Infinity."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raise CliError(f"{where}: starts with a UTF-8 byte-order mark, which the tokenizers library cannot read: save it without one")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(f"{where}: not UTF-8 text (invalid byte at offset {exc.start}; UTF-16?): save it as UTF-8") from exc
    if "\\u" in text:
        for match in SURROGATE_ESCAPE_RE.finditer(text):
            if match.group(1) is None:  # a pair has both halves; a lone half is not text
                line = text.count("\n", 0, match.start()) + 1
                raise CliError(f"{where}: line {line}: {match.group(0)} is half of a UTF-16 surrogate pair, not a character; fix the file")

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        data = dict(pairs)
        if len(data) < len(pairs):
            seen: set[str] = set()
            twice = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
            raise CliError(
                f"{where}: the key {escape_text(twice)!r} appears twice in one object; readers disagree on which one counts: fix the file"
            )
        return data

    def no_constants(name: str) -> NoReturn:
        raise CliError(f"{where}: {name} is not valid JSON; fix the file")

    try:
        return json.loads(text, object_pairs_hook=unique_keys, parse_constant=no_constants)
    except json.JSONDecodeError as exc:
        raise CliError(f"{where}: corrupt JSON ({exc}); re-download or fix the file") from exc
    except RecursionError as exc:
        raise CliError(f"{where}: nested too deeply to be a configuration file; the file is corrupt") from exc


def is_int(value: Any) -> bool:
    return type(value) is int  # JSON true/false are bools, and 1.0 is a float: neither is an id


def escape_text(text: str) -> str:
    """Show control, format and whitespace characters other than a space as escapes."""
    named = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\"}
    out = []
    for char in text:
        if char in named:
            out.append(named[char])
        elif "\udc80" <= char <= "\udcff":  # a byte that is not UTF-8, kept by surrogateescape
            out.append(f"\\x{ord(char) - 0xDC00:02x}")
        elif unicodedata.category(char)[0] in "CZ" and char != " ":
            out.append(f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return "".join(out)


def read_json(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CliError(f"{path}: cannot read ({exc.strerror})") from exc
    return parse_json(raw, path)


def read_optional_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise CliError(f"{path}: expected a JSON object")
    return data
