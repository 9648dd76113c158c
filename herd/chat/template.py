"""Jinja chat templates shipped with a model (HF tokenizer_config.json `chat_template`, GGUF
`tokenizer.chat_template`), rendered the way HF transformers does and safely.

HF conventions (transformers `utils/chat_template_utils.py`): ImmutableSandboxedEnvironment with
trim_blocks and lstrip_blocks, the loopcontrols extension and a no-op `{% generation %}` tag; globals
`raise_exception`, `strftime_now`, `namespace`; a `tojson` filter that does not HTML-escape and takes
indent/separators/sort_keys; variables messages, tools, documents, add_generation_prompt, bos_token,
eos_token plus any extra keyword. Messages lose keys whose value is None, and tool-call arguments given
as JSON strings are handed to the template as objects (as vLLM does), since templates `tojson` them.

A template is untrusted input. The sandbox refuses attribute access to internals (`__class__`,
`__globals__`, `_private`) with an error instead of an empty string; there is no loader, so include,
import and extends cannot read files. Rendering is bounded in time, in the size of each value and in
the memory of all values together, and every bound is checked before the work it bounds:

- time: a deadline checked in every loop iteration, operator and call (`timeout_s`);
- size: no value the template builds (strings, bytes, lists, dicts; by `*`, `+`, `%`, `~`, str.format,
  join, replace, translate, expandtabs, encode, split, center, indent, wordwrap, tojson, pprint, batch,
  slice, set blocks, literals, slices ...) may exceed `max_chars` plus twice the size of the input. Where
  an operation can multiply its input (a repetition, a replacement, a translation table, a width, a
  separator, an escape), the size of its result is worked out from its arguments before it runs, so a
  single C-level call never builds a giant value that the deadline could not interrupt;
- memory: the values a render builds are counted as they are made (`max_bytes` plus 16 times the input's
  size in all), and operations that make many small objects (split, list, batch, title ...) are counted
  before they run. Since each C-level call works on values within these bounds, each takes milliseconds.

`render_in_processes` renders a template's prompts in worker processes instead (herd serve does), each under
an address-space limit and killed at the deadline, so nothing a template does can stall or grow the server.
Any failure is a herd.errors.TemplateError.

The rendered text is encoded with special=True and bos=False (templates write their own BOS; a doubled
leading BOS is collapsed). Control-token text that came from messages, tools or documents is wrapped in
private-use markers before rendering and encoded with special=False, so user content cannot forge a
control token through a template either (the idea of transformers' `sanitize_control_tokens`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import types
from collections.abc import ItemsView, KeysView, ValuesView
from datetime import datetime
from functools import wraps
from typing import Any, Callable, Iterator, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError
from jinja2.runtime import Undefined, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from jinja2.utils import Namespace
from markupsafe import EscapeFormatter, Markup

from herd.chat.formats import IMAGE_MARK, IMAGE_TOKEN, ChatFormat, Special, normalize_generation, special_id
from herd.errors import TemplateError
from herd.tokenizer.base import Tokenizer

MAX_CHARS = 1_000_000  # output and intermediate-value budget on top of twice the input size
MAX_BYTES = 64 << 20  # memory of all the values one render builds, on top of BYTES_PER_INPUT x the input's
BYTES_PER_INPUT = 16
TIMEOUT_S = 5.0
_START, _END = "\U000f0000", "\U000f0001"  # private-use markers around control-token text from user data
_CANDIDATE = re.compile(r"<\|[^<>|\s]{1,100}\|>|</?[A-Za-z_][A-Za-z0-9_.:-]{0,40}>|\[/?[A-Z_]{2,30}\]")
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?([-+ #0]*(?:\*|\d*)(?:\.(?:\*|\d*))?)[hlL]?([a-zA-Z%])?")
_KNOWN_STOPS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|eot|>", "<|eom|>", "<|im_end|>",
                "<|endoftext|>", "<end_of_turn>", "<|end|>", "<|return|>", "<|call|>")
_DELETE_CONTROLS = dict.fromkeys(range(32))
_CASE_MAPS = ("upper", "lower", "title", "capitalize", "swapcase", "casefold")
_PLAIN_CODECS = {"utf-8", "utf8", "utf_8", "ascii", "us-ascii", "latin-1", "latin1", "iso-8859-1", "utf-16", "utf16",
                 "utf_16", "utf-32", "utf32", "utf_32"}
# filters that walk their input once into many small objects: bytes of transient memory per input character
_TRANSIENT_PER_CHAR = {"title": 80, "wordwrap": 80, "urlize": 80, "striptags": 80, "wordcount": 40, "list": 96}


class _Timeout(BaseException):
    """The render ran out of time; a BaseException so nothing on the way out can swallow it."""


# -- measuring values ------------------------------------------------------------------------------------------
# Every walk stops once past its budget, so measuring a value costs at most O(budget) whatever it shares.

def _size(value: Any, budget: int) -> int:
    """Approximate text size of a value, stopping early once it exceeds `budget`. Shared parts count once
    per reference, so a value whose parts refer to each other many times is as large as written out."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, (str, bytes, bytearray)):
            total += len(v)
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 + len(v)
            if total <= budget:
                stack.extend(v)
        elif isinstance(v, dict):
            total += 2 + 2 * len(v)
            if total <= budget:
                stack.extend(v.keys())
                stack.extend(v.values())
        elif isinstance(v, Namespace):
            attrs = v._Namespace__attrs  # type: ignore[attr-defined]
            total += 2 + 2 * len(attrs)
            stack.extend(attrs.values())
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 1
        elif not isinstance(v, Undefined):
            total += 8
        if total > budget:
            break
    return total


def _repr_str(s: str) -> int:
    """Most characters repr(s) can take: printable ASCII escapes only quotes and backslashes, other ASCII
    becomes \\xNN at worst, and a non-ASCII character \\UNNNNNNNN."""
    if s.isascii():
        return len(s) + s.count("\\") + s.count("'") + 2 if s.isprintable() else 4 * len(s) + 2
    return 10 * len(s) + 2


def _text_size(value: Any, budget: int, as_repr: bool = False) -> int:
    """Most characters str(value) (or repr(value)) can take, stopping early past `budget`."""
    if isinstance(value, str) and not as_repr:
        return len(value)
    if isinstance(value, Undefined):
        return 0
    total, stack = 0, [value]
    while stack and total <= budget:
        v = stack.pop()
        if isinstance(v, str):
            total += _repr_str(v) + 8  # + "Markup()" around a Markup's repr
        elif isinstance(v, (bytes, bytearray)):
            total += 4 * len(v) + 14
        elif isinstance(v, bool) or v is None:
            total += 5
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 2
        elif isinstance(v, float):
            total += 24
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 12 + 2 * len(v)
            stack.extend(v)
        elif isinstance(v, dict):
            total += 2 + 4 * len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, Namespace):
            attrs = v._Namespace__attrs  # type: ignore[attr-defined]
            total += 14 + 4 * len(attrs)
            stack.extend(attrs.keys())
            stack.extend(attrs.values())
        elif isinstance(v, (KeysView, ValuesView, ItemsView)):
            total += 14 + 4 * len(v)
            stack.extend(v)
        else:  # functions, macros, loops, ranges, undefined: a repr of bounded length
            total += 200
    return total


def _mem(value: Any, budget: int, known: frozenset[int] | set[int] = frozenset()) -> int:
    """Approximate bytes of memory a value takes, not counting objects in `known` (the render's input)."""
    total, stack = 0, [value]
    while stack and total <= budget:
        v = stack.pop()
        if id(v) in known:
            continue
        if isinstance(v, str):
            total += 49 + len(v) * (1 if v.isascii() else 4)
        elif isinstance(v, (bytes, bytearray)):
            total += 33 + len(v)
        elif isinstance(v, (list, tuple)):
            total += 56 + 8 * len(v)
            stack.extend(v)
        elif isinstance(v, (set, frozenset)):
            total += 216 + 40 * len(v)
            stack.extend(v)
        elif isinstance(v, dict):
            total += 64 + 48 * len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, Namespace):
            attrs = v._Namespace__attrs  # type: ignore[attr-defined]
            total += 112 + 48 * len(attrs)
            stack.extend(attrs.values())
        elif isinstance(v, int):
            total += 28 + v.bit_length() // 8
        else:
            total += 32
    return total


def _shallow_mem(value: Any) -> int:
    """Bytes of a container made of references to values that already exist (a slice, a literal, a + of lists)."""
    if isinstance(value, (list, tuple)):
        return 56 + 8 * len(value)
    if isinstance(value, dict):
        return 64 + 48 * len(value)
    return _mem(value, 1 << 62)


def _json_str(s: str, ensure_ascii: bool) -> int:
    if ensure_ascii and not s.isascii():
        return 12 * len(s) + 2  # a non-BMP character is a surrogate pair of \\uXXXX
    n = len(s) + s.count('"') + s.count("\\") + 2
    if not s.isprintable():
        n += 5 * (len(s) - len(s.translate(_DELETE_CONTROLS)))  # \\u00XX
    return n


def _json_size(value: Any, budget: int, ensure_ascii: bool, indent: str | None, separators: tuple[str, str]) -> int:
    """Most characters json.dumps(value, ...) can take."""
    item_sep, key_sep = separators
    step = len(indent) if indent is not None else 0
    total, stack = 0, [(value, 0)]
    while stack and total <= budget:
        v, depth = stack.pop()
        if indent is not None:
            total += 1 + step * depth  # a newline and the indentation before this value (and closing brackets)
        if isinstance(v, str):
            total += _json_str(v, ensure_ascii)
        elif isinstance(v, bool) or v is None:
            total += 5
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 2
        elif isinstance(v, float):
            total += 24
        elif isinstance(v, (list, tuple)):
            total += 2 + len(v) * len(item_sep) + (1 + step * depth if indent is not None else 0)
            stack.extend((x, depth + 1) for x in v)
        elif isinstance(v, dict):
            total += 2 + len(v) * (len(item_sep) + len(key_sep)) + (1 + step * depth if indent is not None else 0)
            for k, x in v.items():
                total += _json_str(k, ensure_ascii) if isinstance(k, str) else 26
                stack.append((x, depth + 1))
        else:
            total += 200  # json.dumps refuses it
    return total


def _pprint_size(value: Any, budget: int) -> int:
    """Most characters pprint.pformat(value) can take: every item on a line of its own, indented by the
    brackets and dict keys around it, and a long string cut into one piece per character at worst."""
    total, stack = 0, [(value, 0)]
    while stack and total <= budget:
        v, indent = stack.pop()
        if isinstance(v, (list, tuple, set, frozenset)):
            total += indent + 4 + 2 * len(v)
            stack.extend((x, indent + 1) for x in v)
        elif isinstance(v, dict):
            total += indent + 4 + 4 * len(v)
            for k, x in v.items():
                key = _text_size(k, budget, as_repr=True)
                total += indent + key
                stack.append((x, indent + key + 3))
        elif isinstance(v, str):
            total += _repr_str(v) * (indent + 6)
        else:
            total += indent + _text_size(v, budget, as_repr=True)
    return total


def _translation_longest(table: Any) -> int:
    """The longest replacement a str.translate table can give one character."""
    if isinstance(table, str):
        return 1
    if isinstance(table, dict):
        values = table.values()
    elif isinstance(table, (list, tuple)):
        values = table
    else:
        raise SecurityError(f"str.translate takes a dict, list or str table in a chat template, not a "
                            f"{type(table).__name__}")
    return max((len(v) if isinstance(v, str) else 1 for v in values), default=1)


class _GuardedCodeGenerator(CodeGenerator):
    """Every for-loop iterates through environment.deadline_iter (a time check); `a ~ b` goes through
    environment.guarded_concat, slices through environment.guarded_slice and list, tuple and dict
    literals through environment.guarded_literal (size and memory checks). With the time check in every
    sandboxed call (macros, recursive loops), no template computation runs unchecked for long: Jinja has
    no other way to repeat work."""

    def visit_For(self, node: jinja2.nodes.For, frame: Any) -> None:
        if not getattr(node, "_herd_guarded", False):
            node.iter = jinja2.nodes.Call(jinja2.nodes.EnvironmentAttribute("deadline_iter"), [node.iter], [], None,
                                          None, lineno=node.lineno)
            node._herd_guarded = True  # type: ignore[attr-defined]
        super().visit_For(node, frame)

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Any) -> None:
        self.write("environment.guarded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def visit_Getitem(self, node: jinja2.nodes.Getitem, frame: Any) -> None:
        if not isinstance(node.arg, jinja2.nodes.Slice):
            return super().visit_Getitem(node, frame)
        self.write("environment.guarded_slice(")
        self.visit(node.node, frame)
        self.write(", slice(")
        for i, part in enumerate((node.arg.start, node.arg.stop, node.arg.step)):
            self.write(", " if i else "")
            if part is None:
                self.write("None")
            else:
                self.visit(part, frame)
        self.write("))")

    def _literal(self, visit: Callable, node: Any, frame: Any) -> None:
        self.write("environment.guarded_literal(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node: jinja2.nodes.List, frame: Any) -> None:
        self._literal(super().visit_List, node, frame)

    def visit_Dict(self, node: jinja2.nodes.Dict, frame: Any) -> None:
        self._literal(super().visit_Dict, node, frame)

    def visit_Tuple(self, node: jinja2.nodes.Tuple, frame: Any) -> None:
        if node.ctx != "load":  # an assignment or loop target
            return super().visit_Tuple(node, frame)
        self._literal(super().visit_Tuple, node, frame)


class _GenerationTag(jinja2.ext.Extension):
    """HF's `{% generation %}...{% endgeneration %}` marks assistant text; here it just renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message: Any) -> None:
    raise jinja2.exceptions.TemplateError(str(message))


def _strftime_now(fmt: str) -> str:
    if not isinstance(fmt, str) or len(fmt) > 100:
        raise SecurityError("strftime_now takes a format string of at most 100 characters")
    return datetime.now().strftime(fmt)


class _SafeNamespace(Namespace):
    """jinja2's namespace, refusing underscore-prefixed names (as HF does)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same signature trick as Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot set underscore-prefixed namespace attributes ({name!r})")


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` without handing the template the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})
    code_generator_class = _GuardedCodeGenerator

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag],
                         finalize=self._finalize)
        self._local = threading.local()  # the bounds of the render running on this thread
        self.concat = self._concat  # set blocks, macros and caller() join their output through this
        self.filters = {name: self._guard_filter(name, f) for name, f in self.filters.items()}
        self.filters["tojson"] = self._guard_filter("tojson", self._tojson)
        self.globals.pop("lipsum", None)
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_SafeNamespace,
                            dict=_TemplateDict())

    @property
    def limit(self) -> int:
        return getattr(self._local, "limit", MAX_CHARS)

    @limit.setter
    def limit(self, value: int) -> None:
        self._local.limit = value

    def start(self, limit: int, seconds: float, budget: int | None = None, inputs: Any = None) -> None:
        """Set this thread's bounds for the render about to run: the size limit of one value, the deadline,
        and the memory budget of all the values it builds (the objects of `inputs` are not counted)."""
        local = self._local
        local.limit = limit
        local.deadline = time.monotonic() + seconds
        local.budget = budget
        local.spent = 0
        local.known = _ids(inputs) if inputs is not None else frozenset()

    def tick(self) -> None:
        if time.monotonic() > getattr(self._local, "deadline", float("inf")):
            raise _Timeout

    def deadline_iter(self, iterable: Any) -> Any:
        """Wraps every for-loop's iterable: checks the deadline every 64 items."""
        deadline = getattr(self._local, "deadline", float("inf"))
        if isinstance(iterable, Undefined):
            iterable = ()  # as Jinja itself iterates an undefined value: no items
        for i, item in enumerate(iterable):
            if not i & 63 and time.monotonic() > deadline:
                raise _Timeout
            yield item

    # -- size and memory checks ----------------------------------------------------------------------------------

    def _check(self, n: int, what: str) -> None:
        if n > self.limit:
            raise SecurityError(f"{what} would be larger than the {self.limit:,}-character limit")

    def _check_value(self, value: Any, what: str) -> Any:
        self._check(_size(value, self.limit), what)
        return value

    def _would_fit(self, nbytes: int, what: str) -> None:
        """Refuse, before it runs, an operation that would take `nbytes` more than the render's memory budget."""
        local = self._local
        budget = getattr(local, "budget", None)
        if budget is not None and local.spent + nbytes > budget:
            raise SecurityError(f"{what} would take the values it builds past herd's memory limit of "
                                f"{budget / 2**20:,.0f} MiB for this render")

    def _charge(self, value: Any, what: str, shallow: bool = False) -> None:
        local = self._local
        budget = getattr(local, "budget", None)
        if budget is None:
            return
        local.spent += _shallow_mem(value) if shallow else _mem(value, budget - local.spent, local.known)
        if local.spent > budget:
            raise SecurityError(f"{what} takes the values it builds past herd's memory limit of "
                                f"{budget / 2**20:,.0f} MiB for this render")

    def _produced(self, value: Any, what: str, shallow: bool = False) -> Any:
        """A value an operation built: within the size limit, and counted against the memory budget."""
        if isinstance(value, (str, bytes, bytearray, list, tuple, dict, set, frozenset, Namespace)):
            self._check(_size(value, self.limit), what)
            self._charge(value, what, shallow)
        elif isinstance(value, int) and value.bit_length() > 64:
            self._charge(value, what)
        return value

    def _check_ints(self, args: Sequence[Any], kwargs: dict, what: str) -> None:
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > self.limit:
                raise SecurityError(f"{what}: argument {a} is larger than the {self.limit:,} limit")

    def _check_spec(self, spec: str, what: str) -> int:
        """Bounds a format spec's width and precision; returns their sum. Every run of digits is taken
        as a number: in both spec languages the width and the precision are such runs, and a digit
        used as a fill character only makes the bound larger."""
        total = 0
        for number in re.findall(r"\d+", spec):
            if len(number) > 7 or int(number) > self.limit:
                raise SecurityError(f"{what}: width or precision {number[:20]} is larger than the "
                                    f"{self.limit:,}-character limit")
            total += int(number)
        return total

    def _check_percent(self, fmt: str | bytes, right: Any, what: str) -> None:
        """printf-style formatting (`%` and the format filter): every spec's width and precision, and the
        size of the result from the arguments it can take, before it is formatted."""
        text = fmt.decode("latin-1") if isinstance(fmt, (bytes, bytearray)) else fmt
        specs = [(m.group(1), m.group(2)) for m in _PERCENT_SPEC.finditer(text)]
        as_repr = any(kind in ("r", "a") for _, kind in specs)
        width = max((self._check_spec(spec, what) for spec, _ in specs), default=0)
        if isinstance(right, dict) and "%(" in text:  # named: one value may be used many times
            values = list(right.values())
            biggest = max((_text_size(v, self.limit, as_repr) for v in values), default=0)
            args_size = len(specs) * biggest
        else:
            values = list(right) if isinstance(right, tuple) else [right]
            args_size = sum(_text_size(v, self.limit, as_repr) for v in values)
        if "*" in text:  # widths taken from the arguments
            width = max([width] + [abs(v) for v in values if isinstance(v, int) and not isinstance(v, bool)])
        bound = len(text) + args_size + len(specs) * width
        if isinstance(fmt, Markup):
            bound *= 5  # arguments are HTML-escaped
        self._check(bound, what)

    def _estimate_replace(self, s: Any, old: Any, new: Any, count: Any, what: str = "replace") -> None:
        if not (isinstance(s, (str, bytes)) and type(old) is type(new) and isinstance(old, (str, bytes))):
            return
        hits = len(s) + 1 if not old else s.count(old)
        if isinstance(count, int) and count >= 0:
            hits = min(hits, count)
        growth = max(len(new) - len(old), 0) * (5 if isinstance(s, Markup) else 1)
        self._check(len(s) + hits * growth, what)

    def _finalize(self, value: Any) -> Any:
        self._check(_text_size(value, self.limit), "an output value")
        return value

    def _concat(self, parts: Any) -> str:
        out, total = [], 0
        for p in parts:
            total += len(p)
            self._check(total, "a captured block")
            out.append(p)
        return self._produced("".join(out), "a captured block")

    def guarded_concat(self, values: Sequence[Any]) -> str:
        markup = any(hasattr(v, "__html__") for v in values)
        self._check(sum(_text_size(v, self.limit) * (5 if markup and not hasattr(v, "__html__") else 1)
                        for v in values), "a ~ concatenation")
        return self._produced(markup_join(values) if markup else str_join(values), "a ~ concatenation")

    def guarded_slice(self, obj: Any, part: slice) -> Any:
        return self._produced(obj[part], "a slice", shallow=isinstance(obj, (list, tuple)))

    def guarded_literal(self, value: Any) -> Any:
        """A list, tuple or dict written in the template: bounded like any other value, since its items may
        refer to large values many times over."""
        self._check(_size(value, self.limit), "a literal")
        self._charge(value, "a literal", shallow=True)
        return value

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        """Jinja returns an Undefined that prints as ""; a hostile template gets an error instead."""
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is not allowed")

    # -- operators and calls -------------------------------------------------------------------------------------

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        self.tick()
        seqs = (str, bytes, list, tuple)
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            if right * abs(left).bit_length() > 100_000:
                raise SecurityError("** would build an integer too large for a chat template")
        elif operator == "*":
            repeated, times = (right, left) if isinstance(left, int) and isinstance(right, seqs) else (left, right)
            if isinstance(repeated, seqs) and isinstance(times, int):
                self._check(_size(repeated, self.limit) * max(times, 0), "a * repetition")
                self._would_fit(_shallow_mem(repeated) * max(times, 0) if isinstance(repeated, (list, tuple))
                                else len(repeated) * (1 if isinstance(repeated, bytes) or repeated.isascii() else 4)
                                * max(times, 0), "a * repetition")
            elif isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > 100_000:
                raise SecurityError("* would build an integer too large for a chat template")
        elif operator == "+" and isinstance(left, seqs) and isinstance(right, seqs):
            escaped = 5 if isinstance(left, Markup) != isinstance(right, Markup) else 1  # Markup escapes the other
            self._check((_size(left, self.limit) + _size(right, self.limit)) * escaped, "a + concatenation")
        elif operator == "%" and isinstance(left, (str, bytes)):
            self._check_percent(left, right, "% formatting")
        result = super().call_binop(context, operator, left, right)
        return self._produced(result, f"the result of {operator}", shallow=isinstance(result, (list, tuple)))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        __self.tick()
        __self._check_ints(args, kwargs, "a call")
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, (str, bytes)):
            args = __self._check_text_method(owner, getattr(__obj, "__name__", ""), args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        return __self._produced(result, "a call result")

    def _check_text_method(self, s: str | bytes, name: str, args: tuple, kwargs: dict) -> tuple:
        """Bounds the result of a str or bytes method from its arguments, before it runs."""
        what = f"{type(s).__name__}.{name}"
        n = len(s)

        def arg(i: int, key: str, default: Any = None) -> Any:
            return args[i] if len(args) > i else kwargs.get(key, default)

        if name == "join" and args:
            items = list(args[0])  # a generator's items are built (and counted) here
            escaped = 5 if isinstance(s, Markup) else 1
            self._check(_size(items, self.limit) * escaped + n * len(items), what)
            args = (items,) + args[1:]
        elif name == "replace" and len(args) >= 2:
            self._estimate_replace(s, args[0], args[1], arg(2, "count", -1), what)
        elif name == "expandtabs":
            width = arg(0, "tabsize", 8)
            tab = "\t" if isinstance(s, str) else b"\t"
            self._check(n + s.count(tab) * max(int(width), 0), what)
        elif name == "translate" and isinstance(s, str) and args:
            self._check(n * _translation_longest(args[0]), what)
        elif name in ("split", "rsplit", "splitlines"):
            sep = arg(0, "sep") if name != "splitlines" else None
            pieces = s.count(sep) + 1 if isinstance(sep, (str, bytes)) and sep else n // 2 + 1
            if name == "splitlines":
                pieces = n + 1
            maxsplit = arg(1, "maxsplit", -1) if name != "splitlines" else -1
            if isinstance(maxsplit, int) and maxsplit >= 0:
                pieces = min(pieces, maxsplit + 1)
            self._check(n + 2 + pieces, what)
            self._would_fit(n + 64 * pieces, what)
        elif name == "encode" and isinstance(s, str):
            encoding, errors = arg(0, "encoding", "utf-8"), arg(1, "errors", "strict")
            plain = str(encoding).lower() in _PLAIN_CODECS and errors in ("strict", "ignore", "replace")
            self._check((4 if plain else 100) * n + 4, what)  # namereplace spells each character's name
        elif name == "decode" and isinstance(s, bytes):
            self._check(4 * n + 4, what)
        elif name == "hex":
            self._check(3 * n, what)
        elif name in _CASE_MAPS:
            self._check(n if s.isascii() else 3 * n, what)  # 'ß'.upper() == 'SS'
        return args

    def wrap_str_format(self, value: Any) -> Any:
        """str.format / str.format_map through _BoundedFormatter: each field is checked after its nested
        specs are resolved (`'{0:{1}}'.format('x', '1900000000')`) and before it is formatted."""
        if not (isinstance(value, (types.MethodType, types.BuiltinMethodType))
                and value.__name__ in ("format", "format_map") and isinstance(value.__self__, str)):
            return None
        fmt, is_map, env = value.__self__, value.__name__ == "format_map", self

        def bounded(*args: Any, **kwargs: Any) -> str:
            if is_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one mapping argument")
                args, kwargs = (), args[0]
            formatter = (_BoundedEscapeFormatter(env, escape=fmt.escape) if isinstance(fmt, Markup)
                         else _BoundedFormatter(env))
            return type(fmt)(formatter.vformat(fmt, args, kwargs))

        return bounded

    # -- filters -------------------------------------------------------------------------------------------------

    def _guard_filter(self, name: str, fn: Callable) -> Callable:
        passes_arg = getattr(fn, "jinja_pass_arg", None) is not None
        env = self

        @wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            env.tick()
            head, user = (args[:1], list(args[1:])) if passes_arg else ((), list(args))
            env._check_ints(user[1:], kwargs, f"the {name} filter")
            if user:
                env._check_value(user[0], f"the input of the {name} filter")
                user[0] = env._check_filter(name, user[0], user[1:], kwargs)
                args = (*head, *user)
            result = fn(*args, **kwargs)
            return env._produced(result, f"the output of the {name} filter")

        return guarded

    def _check_filter(self, name: str, value: Any, extra: list, kwargs: dict) -> Any:
        """Bounds a filter's result from its input and arguments, before it runs; returns the input (a
        generator is read into a list first where the bound needs its length)."""
        what = f"the {name} filter"

        def arg(i: int, key: str, default: Any = None) -> Any:
            return extra[i] if len(extra) > i else kwargs.get(key, default)

        if name in ("join", "batch", "slice") and not isinstance(value, (str, bytes, list, tuple, dict, Undefined)):
            value = self._produced(list(value), f"the input of {what}", shallow=True)
        text = value if isinstance(value, str) else None
        n = len(text) if text is not None else 0
        if text is not None and name in _TRANSIENT_PER_CHAR:
            self._would_fit(_TRANSIENT_PER_CHAR[name] * n, what)
        if name == "join":
            sep = arg(0, "d", "")
            self._check(sum(_text_size(v, self.limit) for v in value) + len(str(sep)) * len(value), what)
        elif name == "indent" and text is not None:
            width = arg(0, "width", 4)
            width = len(width) if isinstance(width, str) else int(width)
            self._check(n + width * (text.count("\n") + 1), what)
            self._would_fit(n + 64 * (text.count("\n") + 1), what)
        elif name == "replace" and len(extra) >= 2:
            self._estimate_replace(value, extra[0], extra[1], arg(2, "count", -1), what)
        elif name == "format" and isinstance(value, str):
            self._check_percent(value, dict(kwargs) if kwargs else tuple(extra), what)
        elif name == "center" and text is not None:
            self._check(max(n, int(arg(0, "width", 80))), what)
        elif name == "wordwrap" and text is not None:
            width = max(int(arg(0, "width", 79)), 1)
            wrap = arg(2, "wrapstring") or "\n"
            self._check(n + (2 * n // width + text.count("\n") + 2) * len(str(wrap)), what)
        elif name == "urlize" and text is not None:
            extras = sum(len(str(kwargs.get(k) or "")) for k in ("rel", "target", "extra_schemes"))
            self._check(5 * n + (n // 4 + 1) * (60 + extras), what)
        elif name in ("e", "escape", "forceescape"):
            self._check(5 * _text_size(value, self.limit), what)
        elif name == "urlencode":
            self._check(12 * _text_size(value, self.limit), what)
        elif name == "xmlattr":
            self._check(5 * _text_size(value, self.limit), what)
        elif name == "string":
            self._check(_text_size(value, self.limit), what)
        elif name == "pprint":
            self._check(_pprint_size(value, self.limit), what)
        elif name in _CASE_MAPS and text is not None:
            self._check(n if text.isascii() else 3 * n, what)
        elif name == "batch":
            count = max(int(arg(0, "linecount", 1)), 1)
            rows = len(value) // count + 1
            self._check(_size(value, self.limit) + 3 * rows + count, what)
            self._would_fit(rows * 64 + 8 * (len(value) + count), what)
        elif name == "slice":
            count = max(int(arg(0, "slices", 1)), 1)
            self._check(_size(value, self.limit) + 3 * count + count, what)
            self._would_fit(count * 64 + 16 * len(value), what)
        elif name == "list" and text is not None:
            self._check(2 * n + 2, what)
        elif name == "sum":
            start = arg(1, "start", 0)
            if not isinstance(start, (int, float)):
                raise SecurityError(f"{what} adds numbers in a chat template; start={type(start).__name__} is not one")
        elif name == "tojson":
            indent = arg(1, "indent")
            separators = arg(2, "separators")
            if isinstance(indent, int) and not isinstance(indent, bool):
                indent = " " * max(indent, 0)
            if separators is None:
                separators = (",", ": ") if indent is not None else (", ", ": ")
            if not (isinstance(separators, (list, tuple)) and len(separators) == 2
                    and all(isinstance(s, str) for s in separators)):
                raise SecurityError("tojson separators must be two strings")
            self._check(_json_size(value, self.limit, bool(arg(0, "ensure_ascii", False)),
                                   indent if isinstance(indent, str) else None, tuple(separators)), what)
        return value

    @staticmethod
    def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
                sort_keys: bool = False) -> str:
        if isinstance(indent, int) and indent > 64 or isinstance(indent, str) and len(indent) > 64:
            raise SecurityError("tojson indent is limited to 64")
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _ids(value: Any) -> frozenset[int]:
    """The ids of every container and string in `value` (a render's input, alive while it renders)."""
    found, stack = set(), [value]
    while stack:
        v = stack.pop()
        if isinstance(v, (str, bytes)):
            found.add(id(v))
        elif isinstance(v, (list, tuple)):
            found.add(id(v))
            stack.extend(v)
        elif isinstance(v, dict):
            found.add(id(v))
            stack.extend(v.keys())
            stack.extend(v.values())
    return frozenset(found)


class _BoundedFormatter(SandboxedFormatter):
    """Jinja's sandboxed str.format with a budget: each field's width, precision and input are checked
    before it is formatted (a !r or !a conversion before it is converted), and the running size of the
    result as it grows (a per-call budget: the result then passes the environment's ordinary checks like
    any other value)."""

    escaped = 1

    def __init__(self, env: _Sandbox, **kwargs: Any):
        super().__init__(env, **kwargs)
        self._used = 0

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        env: _Sandbox = self._env  # type: ignore[assignment]
        if conversion in ("r", "a"):
            env._check(self._used + _text_size(value, env.limit, as_repr=True), "str.format")
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> Any:
        env: _Sandbox = self._env  # type: ignore[assignment]
        env.tick()
        bound = env._check_spec(format_spec, "str.format") + _text_size(value, env.limit) * self.escaped
        env._check(self._used + bound, "str.format")
        result = super().format_field(value, format_spec)
        self._used += len(result)
        return result


class _BoundedEscapeFormatter(_BoundedFormatter, EscapeFormatter):
    """The same for Markup format strings (escaping their arguments, as Jinja's own formatter does)."""

    escaped = 5


def _plain(value: Any, mark: Callable[[str], str] | None, depth: int = 0) -> Any:
    """A copy made of plain JSON types only (so the template sees no objects with methods of their own),
    with control-token text in strings wrapped by `mark`."""
    if depth > 100:
        raise TemplateError("chat template input is nested more than 100 levels deep")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        s = str.__str__(value)
        return mark(s) if mark else s
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return {_plain(k, None, depth + 1): _plain(v, mark, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, mark, depth + 1) for v in value]
    return f"<{type(value).__name__}>"


def _template_messages(messages: Sequence[dict]) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TemplateError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TemplateError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        m = {k: v for k, v in m.items() if v is not None}
        if isinstance(m.get("tool_calls"), list):
            calls = []
            for call in m["tool_calls"]:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    try:
                        args = json.loads(fn["arguments"])
                    except ValueError:
                        args = None
                    if isinstance(args, dict):
                        call = {**call, "function": {**fn, "arguments": args}}
                calls.append(call)
            m["tool_calls"] = calls
        out.append(m)
    return out


class TemplateFormat(ChatFormat):
    """A Jinja chat template shipped with the model. `generation` (if known) only informs parse_reply."""

    name = "template"

    def __init__(self, template: str, generation: str | None = None, *, max_chars: int = MAX_CHARS,
                 max_bytes: int = MAX_BYTES, timeout_s: float = TIMEOUT_S):
        if not isinstance(template, str) or not template.strip():
            raise TemplateError("the chat template is empty")
        self.source = template
        self.generation = normalize_generation(generation)
        self.max_chars = max_chars
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.processes: RenderProcesses | None = None  # render in worker processes (render_in_processes)
        self._env = _Sandbox()
        try:
            self._template = self._env.from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"the chat template has a syntax error at line {e.lineno}: {e.message}") from None
        except (RecursionError, MemoryError) as e:
            raise TemplateError(f"the chat template could not be compiled: {type(e).__name__}") from None
        except Exception as e:  # noqa: BLE001 - e.g. Python's own compiler refusing what Jinja generated
            raise TemplateError(f"the chat template could not be compiled: {type(e).__name__}: {e}") from None
        self.stop_texts = tuple(s for s in _KNOWN_STOPS if s in template)

    def render_text(self, messages: Sequence[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True, *, documents: list[dict] | None = None,
                    bos_token: str = "", eos_token: str = "", **kwargs: Any) -> str:
        """The rendered prompt text, exactly as HF's apply_chat_template(tokenize=False) gives it."""
        return self._render(messages, tools, documents, add_generation_prompt, bos_token, eos_token, kwargs, None)

    def render(self, messages: Sequence[dict], tokenizer: Tokenizer, tools: list[dict] | None = None,
               add_generation_prompt: bool = True, *, documents: list[dict] | None = None,
               **kwargs: Any) -> list[int]:
        bos = kwargs.pop("bos_token", None)
        eos = kwargs.pop("eos_token", None)
        if bos is None:
            bos = tokenizer.id_to_piece(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
        if eos is None:
            eos = tokenizer.id_to_piece(tokenizer.eos_id) if tokenizer.eos_id is not None else ""
        cache: dict[str, bool] = {}

        def is_control(text: str) -> bool:
            if text not in cache:
                cache[text] = tokenizer.special_id(text) is not None
            return cache[text]

        def mark(s: str) -> str:
            s = s.replace(_START, "").replace(_END, "")
            return _CANDIDATE.sub(lambda m: f"{_START}{m.group(0)}{_END}" if is_control(m.group(0)) else m.group(0), s)

        text = self._render(messages, tools, documents, add_generation_prompt, bos, eos, kwargs, mark)
        ids: list[int] = []
        inside = False  # between markers: text from the caller's data, encoded as plain text
        image_id = None
        for piece in re.split(f"({_START}|{_END}|{IMAGE_MARK})", text):
            if piece in (_START, _END):
                inside = piece == _START
            elif piece == IMAGE_MARK:  # an image part, from herd.chat.extract_images
                if image_id is None:
                    image_id = special_id(tokenizer, Special(IMAGE_TOKEN), "template")
                ids.append(image_id)
            elif piece:
                ids += tokenizer.encode(piece, bos=False, eos=False, special=not inside)
        bos_id = tokenizer.bos_id
        if bos_id is not None and len(ids) >= 2 and ids[0] == ids[1] == bos_id:
            ids = ids[1:]
        return ids

    def _render(self, messages, tools, documents, add_generation_prompt, bos_token, eos_token, kwargs, mark) -> str:
        if documents is not None and not all(isinstance(d, dict) for d in documents):
            raise TemplateError("documents must be a list of dicts (e.g. {'title': ..., 'text': ...})")
        data = {
            "messages": _plain(_template_messages(messages), mark),
            "tools": _plain(list(tools), mark) if tools is not None else None,
            "documents": _plain(list(documents), mark) if documents is not None else None,
            **{k: _plain(v, mark) for k, v in kwargs.items()},
        }
        variables = {"bos_token": bos_token, "eos_token": eos_token, **data,
                     "add_generation_prompt": bool(add_generation_prompt)}
        limit = self.max_chars + 2 * _size(data, 1 << 62)
        budget = self.max_bytes + BYTES_PER_INPUT * _mem(data, 1 << 62)
        if self.processes is not None:
            return self.processes.render(self.source, variables, limit, budget, self.timeout_s)
        return self.render_variables(variables, limit, budget)

    def render_variables(self, variables: dict, limit: int, budget: int) -> str:
        """The text for the template's variables in this process, no value over `limit` characters and the
        values built taking at most `budget` bytes in all."""
        env = self._env
        env.start(limit, self.timeout_s, budget, variables)

        def run() -> str:
            out, total = [], 0
            for chunk in self._template.generate(**variables):
                total += len(chunk)
                if total > env.limit:
                    raise SecurityError(f"the rendered prompt is longer than the {env.limit:,}-character limit")
                out.append(chunk)
            return "".join(out)

        try:
            return run()
        except _Timeout:
            raise TemplateError(f"the chat template took longer than {self.timeout_s:g} s to render") from None
        except SecurityError as e:
            raise TemplateError(f"the chat template tried something the sandbox forbids: {e}") from None
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template raised an error: {e}") from None
        except MemoryError:
            raise TemplateError("the chat template needs more memory than a render may have") from None
        except RecursionError:
            raise TemplateError("the chat template failed to render: RecursionError (it nests too deeply)") from None
        except TemplateError:
            raise
        except Exception as e:  # noqa: BLE001 - anything a template does wrong is a TemplateError
            raise TemplateError(f"the chat template failed to render: {type(e).__name__}: {e}") from None
        finally:
            env.start(MAX_CHARS, float("inf"))  # drop this render's references to its input


# -- rendering in worker processes -----------------------------------------------------------------------------

WORKER_OVERHEAD = 64 << 20  # address space a render may add beyond 3x its memory budget (the allocator's slack)
STARTUP_S = 60.0  # most seconds a worker process may take to start


class RenderProcesses:
    """Renders chat templates in worker processes, at most `workers` at once: each render runs under an
    address-space limit (its memory budget, three times over, on top of what the worker already takes) and
    is killed once `grace_s` past its deadline, so a template that runs away costs its caller an error and
    nothing else: no memory, no held interpreter lock, no stalled thread. Workers are reused; one that
    failed is replaced. Requests and replies are length-prefixed: a pickle to the worker, and from it one
    status byte and UTF-8 text (nothing the worker sends back is unpickled)."""

    def __init__(self, workers: int = 2, grace_s: float = 2.0):
        self.max_workers = max(1, workers)
        self.grace_s = grace_s
        self._idle: list[_Worker] = []
        self._count = 0
        self._cond = threading.Condition()
        self._closed = False

    def start(self) -> None:
        """Start one worker now, so the first render does not wait for it."""
        self._release(self._acquire(), True)

    def render(self, source: str, variables: dict, limit: int, budget: int, timeout_s: float) -> str:
        worker = self._acquire()
        reusable = False
        try:
            ok, text = worker.render(source, variables, limit, budget, timeout_s, self.grace_s)
            reusable = True  # it answered: rendered, or refused the template with a TemplateError
        finally:
            self._release(worker, reusable)
        if not ok:
            raise TemplateError(text)
        return text

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._cond.notify_all()
        for worker in idle:
            worker.stop()

    def _acquire(self) -> _Worker:
        with self._cond:
            while True:
                if self._closed:
                    raise TemplateError("the chat template's render processes have been shut down")
                while self._idle:
                    worker = self._idle.pop()
                    if worker.alive():
                        return worker
                    self._count -= 1
                if self._count < self.max_workers:
                    self._count += 1
                    break
                self._cond.wait()
        try:
            return _Worker()
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    def _release(self, worker: _Worker, reusable: bool) -> None:
        with self._cond:
            if reusable and not self._closed and worker.alive():
                self._idle.append(worker)
                self._cond.notify()
                return
            self._count -= 1
            self._cond.notify()
        worker.stop()


class _Worker:
    """One `python -m herd.chat.render_worker` process."""

    def __init__(self):
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "herd.chat.render_worker"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, close_fds=True)
        except OSError as e:
            raise TemplateError(f"could not start a process to render the chat template: {e}") from None
        self.ready = False  # the worker writes one frame once its imports are done

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                pipe.close()

    def render(self, source: str, variables: dict, limit: int, budget: int, timeout_s: float,
               grace_s: float) -> tuple[bool, str]:
        """(True, the text) or (False, the TemplateError's message the worker sent). Raises TemplateError
        when the worker does not answer in time (it is killed) or ends."""
        request = pickle.dumps((source, variables, limit, budget, timeout_s), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            if not self.ready:  # its start-up (imports, on a busy machine) does not count against the render
                (n,) = struct.unpack("<Q", self._read(8, time.monotonic() + STARTUP_S))
                self._read(n, time.monotonic() + STARTUP_S)
                self.ready = True
            deadline = time.monotonic() + timeout_s + grace_s
            self.proc.stdin.write(struct.pack("<Q", len(request)) + request)
            self.proc.stdin.flush()
            (n,) = struct.unpack("<Q", self._read(8, deadline))
            reply = self._read(n, deadline)
        except TimeoutError:
            self.stop()
            raise TemplateError(f"the chat template took longer than {timeout_s:g} s to render") from None
        except (OSError, EOFError):
            self.stop()
            raise TemplateError(f"the chat template's render process ended ({_ended(self.proc.returncode)}); "
                                f"it may have needed more than its {budget / 2**20:,.0f} MiB") from None
        return reply[:1] == b"O", reply[1:].decode("utf-8", "surrogatepass")

    def _read(self, n: int, deadline: float) -> bytes:
        fd, data = self.proc.stdout.fileno(), bytearray()
        while len(data) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, min(n - len(data), 1 << 20))
            if not chunk:
                raise EOFError
            data += chunk
        return bytes(data)


def _ended(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


@contextlib.contextmanager
def render_in_processes(fmt: ChatFormat, workers: int = 2) -> Iterator[None]:
    """Within the block a TemplateFormat renders in worker processes (RenderProcesses); herd's built-in
    formats are herd's own code and render in this process as before."""
    if not isinstance(fmt, TemplateFormat):
        yield
        return
    processes = RenderProcesses(workers)
    previous, fmt.processes = fmt.processes, processes
    try:
        processes.start()
        yield
    finally:
        fmt.processes = previous
        processes.close()
