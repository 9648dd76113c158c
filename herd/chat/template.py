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
import and extends cannot read files. Rendering is bounded in time (a deadline checked in every loop
iteration and every call) and in size: output, string and list building (`*`, `+`, `%`, `~`, set blocks, join, indent,
replace ...) may not exceed `max_chars` plus twice the size of the input, checked before the memory
is allocated; str.format checks each field after its nested specs are resolved and before it is
formatted (so `'{0:{1}}'.format('x', '1900000000')` is refused, not built and then measured). Any failure is a herd.errors.TemplateError.

The rendered text is encoded with special=True and bos=False (templates write their own BOS; a doubled
leading BOS is collapsed). Control-token text that came from messages, tools or documents is wrapped in
private-use markers before rendering and encoded with special=False, so user content cannot forge a
control token through a template either (the idea of transformers' `sanitize_control_tokens`).
"""

from __future__ import annotations

import json
import re
import threading
import time
import types
from datetime import datetime
from functools import wraps
from typing import Any, Callable, Sequence

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

MAX_CHARS = 1_000_000  # output and intermediate-string budget on top of twice the input size
TIMEOUT_S = 5.0
_START, _END = "\U000f0000", "\U000f0001"  # private-use markers around control-token text from user data
_CANDIDATE = re.compile(r"<\|[^<>|\s]{1,100}\|>|</?[A-Za-z_][A-Za-z0-9_.:-]{0,40}>|\[/?[A-Z_]{2,30}\]")
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-+ #0]*\d*(?:\.\d*)?")
_KNOWN_STOPS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|eot|>", "<|eom|>", "<|im_end|>",
                "<|endoftext|>", "<end_of_turn>", "<|end|>", "<|return|>", "<|call|>")


class _Timeout(BaseException):
    """The render ran out of time; a BaseException so nothing on the way out can swallow it."""


def _size(value: Any, budget: int) -> int:
    """Approximate text size of a value, stopping early once it exceeds `budget`."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
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


class _GuardedCodeGenerator(CodeGenerator):
    """Every for-loop iterates through environment.deadline_iter (a time check), and `a ~ b` goes
    through environment.guarded_concat (a size check). With the time check in every sandboxed call
    (macros, recursive loops), no template computation runs unchecked for long: Jinja has no other
    way to repeat work."""

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
    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _GuardedCodeGenerator

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag],
                         finalize=self._finalize)
        self._local = threading.local()  # the per-render size limit, per thread
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

    def start(self, limit: int, seconds: float) -> None:
        """Set this thread's size limit and deadline for the render about to run."""
        self._local.limit = limit
        self._local.deadline = time.monotonic() + seconds

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

    # -- size checks ---------------------------------------------------------------------------------------------

    def _check(self, n: int, what: str) -> None:
        if n > self.limit:
            raise SecurityError(f"{what} would be larger than the {self.limit:,}-character limit")

    def _check_value(self, value: Any, what: str) -> Any:
        self._check(_size(value, self.limit), what)
        return value

    def _check_ints(self, args: Sequence[Any], kwargs: dict, what: str) -> None:
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > self.limit:
                raise SecurityError(f"{what}: argument {a} is larger than the {self.limit:,} limit")

    def _check_format(self, fmt: str, args: Sequence[Any], what: str) -> None:
        """%-style formatting: widths and precisions in the specs, and the total size of the result.
        (`*` widths come from the arguments, which _check_ints has bounded.)"""
        for spec in _PERCENT_SPEC.findall(fmt):
            self._check_spec(spec, what)
        biggest = max((_size(a, self.limit) for a in args), default=0)
        self._check(len(fmt) + fmt.count("%") * biggest, what)

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

    def _finalize(self, value: Any) -> Any:
        return self._check_value(value, "an output value")

    def _concat(self, parts: Any) -> str:
        out, total = [], 0
        for p in parts:
            total += len(p)
            self._check(total, "a captured block")
            out.append(p)
        return "".join(out)

    def guarded_concat(self, values: Sequence[Any]) -> str:
        self._check(sum(_size(v, self.limit) for v in values), "a ~ concatenation")
        if any(hasattr(v, "__html__") for v in values):
            return markup_join(values)
        return str_join(values)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        """Jinja returns an Undefined that prints as ""; a hostile template gets an error instead."""
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is not allowed")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        self.tick()
        seqs = (str, list, tuple)
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            if right * abs(left).bit_length() > 100_000:
                raise SecurityError("** would build an integer too large for a chat template")
        elif operator == "*":
            if isinstance(left, int) and isinstance(right, seqs):
                left, right = right, left
                swapped = True
            else:
                swapped = False
            if isinstance(left, seqs) and isinstance(right, int):
                self._check(_size(left, self.limit) * max(right, 0), "a * repetition")
                return right * left if swapped else left * right
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > 100_000:
                raise SecurityError("* would build an integer too large for a chat template")
        elif operator == "+" and isinstance(left, seqs) and isinstance(right, seqs):
            self._check(_size(left, self.limit) + _size(right, self.limit), "a + concatenation")
        elif operator == "%" and isinstance(left, str):
            args = right if isinstance(right, tuple) else tuple(right.values()) if isinstance(right, dict) else (right,)
            self._check_ints(args, {}, "% formatting")
            self._check_format(left, args, "% formatting")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        __self.tick()
        __self._check_ints(args, kwargs, "a call")
        owner = getattr(__obj, "__self__", None)
        name = getattr(__obj, "__name__", "")
        if isinstance(owner, str):
            if name == "join" and args:
                items = list(args[0])
                __self._check(_size(items, __self.limit) + len(owner) * len(items), "str.join")
                args = (items,) + args[1:]
            elif name == "replace" and len(args) >= 2:
                __self._estimate_replace(owner, args[0], args[1], args[2] if len(args) > 2 else -1)
            elif name == "expandtabs":
                width = args[0] if args else kwargs.get("tabsize", 8)
                __self._check(len(owner) + owner.count("\t") * max(int(width), 0), "str.expandtabs")
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, (str, list, tuple)):
            __self._check_value(result, "a call result")
        return result

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

    def _estimate_replace(self, s: str, old: Any, new: Any, count: Any) -> None:
        if not (isinstance(s, str) and isinstance(old, str) and isinstance(new, str)):
            return
        hits = len(s) + 1 if old == "" else s.count(old)
        if isinstance(count, int) and count >= 0:
            hits = min(hits, count)
        self._check(len(s) + hits * max(len(new) - len(old), 0), "replace")

    def _guard_filter(self, name: str, fn: Callable) -> Callable:
        passes_arg = getattr(fn, "jinja_pass_arg", None) is not None
        env = self

        @wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            env.tick()
            user = list(args[1:] if passes_arg else args)
            env._check_ints(user[1:], kwargs, f"the {name} filter")
            if user:
                value = user[0]
                env._check_value(value, f"the input of the {name} filter")
                extra = user[1:]
                if name == "join" and not isinstance(value, (str, list, tuple)):
                    value = list(value)
                    args = (args[0], value, *args[2:]) if passes_arg else (value, *args[1:])
                if name == "join":
                    sep = extra[0] if extra else kwargs.get("d", "")
                    env._check(_size(value, env.limit) + len(str(sep)) * len(value), "the join filter")
                elif name == "indent" and isinstance(value, str):
                    width = extra[0] if extra else kwargs.get("width", 4)
                    width = len(width) if isinstance(width, str) else int(width)
                    env._check(len(value) + width * (value.count("\n") + 1), "the indent filter")
                elif name == "replace" and len(extra) >= 2:
                    count = extra[2] if len(extra) > 2 else kwargs.get("count", -1)
                    env._estimate_replace(value, extra[0], extra[1], count)
                elif name == "format" and isinstance(value, str):
                    env._check_format(value, extra + list(kwargs.values()), "the format filter")
            result = fn(*args, **kwargs)
            if isinstance(result, (str, list, tuple)):
                env._check_value(result, f"the output of the {name} filter")
            return result

        return guarded

    @staticmethod
    def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
                sort_keys: bool = False) -> str:
        if isinstance(indent, int) and indent > 64 or isinstance(indent, str) and len(indent) > 64:
            raise SecurityError("tojson indent is limited to 64")
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _BoundedFormatter(SandboxedFormatter):
    """Jinja's sandboxed str.format with a budget: each field's width, precision and input are checked
    before it is formatted, and the running size of the result as it grows (a per-call budget: the
    result then passes the environment's ordinary checks like any other value)."""

    def __init__(self, env: _Sandbox, **kwargs: Any):
        super().__init__(env, **kwargs)
        self._used = 0

    def format_field(self, value: Any, format_spec: str) -> Any:
        env: _Sandbox = self._env  # type: ignore[assignment]
        env.tick()
        bound = env._check_spec(format_spec, "str.format") + _size(value, env.limit)
        env._check(self._used + bound, "str.format")
        result = super().format_field(value, format_spec)
        self._used += len(result)
        return result


class _BoundedEscapeFormatter(_BoundedFormatter, EscapeFormatter):
    """The same for Markup format strings (escaping their arguments, as Jinja's own formatter does)."""


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
                 timeout_s: float = TIMEOUT_S):
        if not isinstance(template, str) or not template.strip():
            raise TemplateError("the chat template is empty")
        self.source = template
        self.generation = normalize_generation(generation)
        self.max_chars = max_chars
        self.timeout_s = timeout_s
        self._env = _Sandbox()
        try:
            self._template = self._env.from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"the chat template has a syntax error at line {e.lineno}: {e.message}") from None
        except (RecursionError, MemoryError) as e:
            raise TemplateError(f"the chat template could not be compiled: {type(e).__name__}") from None
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
        env = self._env
        env.start(self.max_chars + 2 * _size(data, 1 << 62), self.timeout_s)

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
        except (RecursionError, MemoryError) as e:
            raise TemplateError(f"the chat template failed to render: {type(e).__name__}") from None
        except TemplateError:
            raise
        except Exception as e:  # noqa: BLE001 - anything a template does wrong is a TemplateError
            raise TemplateError(f"the chat template failed to render: {type(e).__name__}: {e}") from None
