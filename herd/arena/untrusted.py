"""JSON from outside the arena (request bodies, imported battle logs), read with bounds so that no input ends
in a traceback or an HTTP 500.

Refused, each with a message that says where: nesting deeper than MAX_DEPTH (Python's own parser raises
RecursionError a thousand levels down), NaN and Infinity (json.loads accepts them; no database or JSON
response takes them back), numbers too large to be a float (1e400 reads as inf) or too long to read, bytes
that are not UTF-8, and lone surrogates: a `\\ud800` escape makes a Python str that cannot be encoded, so it
could be neither stored, streamed nor hashed.
"""

from __future__ import annotations

import json
import math
import re

MAX_DEPTH = 32  # a battle record nests four levels; nothing the arena reads needs more


class UntrustedJSON(ValueError):
    """The text is not JSON the arena can use; the message says what is wrong and where."""


def _no_constant(name: str):
    raise UntrustedJSON(f"{name} is not a number (JSON has no NaN or Infinity)")


def _where(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else f"`{part}`")
    return out or "the value"


# A lone surrogate in parsed text comes from a \uD800-\uDFFF escape (or a surrogate already in a str):
# where the text has neither, its strings need no walk.
_MAYBE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")


def check(value, max_depth: int = MAX_DEPTH) -> None:
    """Raise UntrustedJSON if `value` (parsed JSON) nests deeper than `max_depth` or holds a non-finite
    number or a string with a lone surrogate. Iterative: no input can exhaust the stack here."""
    _check_depth(value, max_depth)
    _check_values(value, max_depth)


def _check_depth(value, max_depth: int) -> None:
    """The fast pass every input gets: containers only, no paths (they are found when something is wrong)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if type(item) is dict:
            item = item.values()
        elif type(item) is not list:
            continue
        if depth > max_depth:
            _check_values(value, max_depth)  # names where
        for child in item:
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))


def _check_values(value, max_depth: int) -> None:
    """Every value, with its path for the message: strings, numbers and depth."""
    stack = [(value, 1, ())]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > max_depth:
                raise UntrustedJSON(f"{_where(path)} is nested deeper than {max_depth} levels")
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                if isinstance(key, str):
                    _text(key, path + (key,))
                stack.append((child, depth + 1, path + (key,)))
        elif isinstance(item, str):
            _text(item, path)
        elif isinstance(item, float) and not math.isfinite(item):
            raise UntrustedJSON(f"{_where(path)} is {item}, not a finite number")


def _text(text: str, path: tuple) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UntrustedJSON(f"{_where(path)} holds a lone surrogate ({text[e.start]!r} at character {e.start}); "
                            "send text as UTF-8") from None


def loads(text: str | bytes, max_depth: int = MAX_DEPTH):
    """json.loads for text from outside: the parsed value, or UntrustedJSON naming what is wrong."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise UntrustedJSON(f"not UTF-8 (byte {e.start} is {text[e.start]:#04x})") from None
    out_of_range = []

    def number(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):  # 1e400
            out_of_range.append(literal)
        return value

    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=number)
    except UntrustedJSON:
        raise
    except json.JSONDecodeError as e:
        raise UntrustedJSON(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise UntrustedJSON(f"nested deeper than {max_depth} levels") from None
    except ValueError:  # an integer literal past Python's 4300-digit limit
        raise UntrustedJSON("holds a number too long to read") from None
    _check_depth(value, max_depth)
    if out_of_range or _MAYBE_SURROGATE.search(text):
        _check_values(value, max_depth)
    return value


__all__ = ["MAX_DEPTH", "UntrustedJSON", "check", "loads"]
