"""Constrained decoding for JSON: a JSON-schema subset → a character automaton → a token mask per step.

A schema compiles to a tree of Nodes. The automaton's state is a set of stacks of frames (a pushdown
automaton run breadth-first, so anyOf / optional properties need no backtracking). A token is allowed
when every character of its text can be consumed from the current state; masks are found by walking a
trie of the vocabulary's token texts, pruned at the first impossible character, and cached per state.
Output is compact JSON (one optional space after ':' and ','), properties in schema order.

Supported: type (incl. lists), properties, required, additionalProperties, items, minItems, maxItems,
enum, const, anyOf, oneOf, allOf of one schema, $ref into $defs/definitions, minLength, maxLength;
annotations (title, description, format, default, examples ...) are ignored. Anything else (pattern,
minimum, multipleOf, prefixItems, if/then ...) raises UnsupportedSchema naming it, so an output that
finishes is always valid against the schema. So does a schema no finite JSON value satisfies (an empty
anyOf, minItems above maxItems, a $ref that leads back to itself before any JSON is written), since
decoding it would only stop at a dead end.

Alternatives that are fixed texts (enum, const branches, true/false) become one sorted list walked by
bisection, so a step costs O(log values) however many there are; MAX_SUBSCHEMAS, MAX_NESTING and
MAX_LITERALS bound what one schema may cost to compile and to decode with.
"""

from __future__ import annotations

import json
from bisect import bisect_left, bisect_right
from functools import lru_cache

import torch

from herd.tokenizer import Tokenizer

ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "format", "deprecated",
               "readOnly", "writeOnly", "$defs", "definitions", "strict", "additionalProperties"}
KEYWORDS = {"type", "properties", "required", "items", "minItems", "maxItems", "enum", "const", "anyOf", "oneOf",
            "allOf", "$ref", "minLength", "maxLength"} | ANNOTATIONS
MAX_DEPTH = 8  # nesting of free-form JSON (json_object); schema nesting is bounded by MAX_STACK frames
MAX_STACK = 96
MAX_NUMBER = 20  # characters in a number, so a number cannot run on forever
DIGITS = "0123456789"
MAX_SUBSCHEMAS = 10_000  # compiled schema pieces (each may multiply the automaton's states)
MAX_NESTING = 64  # schema objects inside one another, $ref hops included
MAX_LITERALS = (100_000, 2_000_000)  # enum / const values, and their characters, in one schema


class UnsupportedSchema(ValueError):
    """The schema uses a keyword or construct constrained decoding cannot guarantee."""


class Node:
    """A compiled schema piece. kind: lit(text) lits(sorted texts) str(min, max) num(integer) obj(props)
    dict(value) arr(item, min, max) any(depth) alt(nodes) ref(target, pointer). Hashed by identity."""

    __slots__ = ("kind", "a", "b", "c")

    def __init__(self, kind, a=None, b=None, c=None):
        self.kind, self.a, self.b, self.c = kind, a, b, c


def _dump(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class Grammar:
    def __init__(self, schema: dict | None):
        """schema None: any JSON object (response_format json_object)."""
        self.schema = schema
        self._refs: dict[str, Node] = {}
        self._any: dict[int, Node] = {}
        self._depth = self._count = self._literals = self._literal_chars = 0
        try:
            self.root = Node("dict", self.any(1)) if schema is None else self.compile(schema, "schema")
        except RecursionError:
            raise UnsupportedSchema("the schema is nested too deeply") from None
        self._check_refs()
        self._check_satisfiable()
        self._step_memo: dict = {}
        self._masks: dict = {}

    # -- compiling ---------------------------------------------------------------------------------
    def any(self, depth: int) -> Node:
        if depth not in self._any:
            self._any[depth] = Node("any", depth)
        return self._any[depth]

    def compile(self, s, path: str) -> Node:
        if s is True or s == {}:
            return self.any(1)
        if not isinstance(s, dict):
            raise UnsupportedSchema(f"{path} must be a JSON schema object, got {_dump(s)[:80]}")
        self._count += 1
        if self._count > MAX_SUBSCHEMAS:
            raise UnsupportedSchema(f"the schema has more than {MAX_SUBSCHEMAS:,} subschemas, more than herd's "
                                    "constrained decoding takes")
        if self._depth >= MAX_NESTING:
            raise UnsupportedSchema(f"{path}: the schema nests more than {MAX_NESTING} levels deep ($ref hops "
                                    "included)")
        self._depth += 1
        try:
            return self._compile(s, path)
        finally:
            self._depth -= 1

    def _compile(self, s: dict, path: str) -> Node:
        unknown = sorted(set(s) - KEYWORDS)
        if unknown:
            raise UnsupportedSchema(f"{path} uses {unknown}, which herd's constrained decoding does not support")
        if "$ref" in s:
            return self._ref(s["$ref"], path)
        if "const" in s:
            return self._fixed([s["const"]], path)
        if "enum" in s:
            if not isinstance(s["enum"], list) or not s["enum"]:
                raise UnsupportedSchema(f"{path}.enum must be a non-empty list (an empty one matches nothing)")
            return self._fixed(s["enum"], path)
        for key in ("anyOf", "oneOf"):
            if key in s:
                if not isinstance(s[key], list) or not s[key]:
                    raise UnsupportedSchema(f"{path}.{key} must be a non-empty list (an empty one matches nothing)")
                rest = {k: v for k, v in s.items() if k != key}
                parts = [self.compile({**rest, **sub} if isinstance(sub, dict) else sub, f"{path}.{key}[{i}]")
                         for i, sub in enumerate(s[key])]
                return self._alt(parts)
        if "allOf" in s:
            if not isinstance(s["allOf"], list) or len(s["allOf"]) != 1 or not isinstance(s["allOf"][0], dict):
                raise UnsupportedSchema(f"{path}.allOf with more than one schema is not supported")
            return self.compile({**{k: v for k, v in s.items() if k != "allOf"}, **s["allOf"][0]}, path)
        t = s.get("type")
        if isinstance(t, list):
            if not t:
                raise UnsupportedSchema(f"{path}.type is an empty list (it matches nothing)")
            return self._alt([self.compile({**s, "type": ti}, path) for ti in t])
        if t is None:
            t = "object" if "properties" in s else "array" if "items" in s else None
        if t is None:
            return self.any(1)
        if t == "object":
            props = s.get("properties") or {}
            required = s.get("required") or []
            if not isinstance(props, dict):
                raise UnsupportedSchema(f"{path}.properties must be an object of schemas")
            if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
                raise UnsupportedSchema(f"{path}.required must be a list of property names")
            missing = [r for r in required if r not in props]
            if missing:
                raise UnsupportedSchema(f"{path}.required names {missing}, which have no entry in properties")
            if not props:
                extra = s.get("additionalProperties", True)
                if extra is False:
                    return Node("lit", "{}")
                return Node("dict", self.any(1) if extra is True else self.compile(extra, f"{path}.additionalProperties"))
            return Node("obj", [(k, self.compile(v, f"{path}.properties.{k}"), k in required) for k, v in props.items()])
        if t == "array":
            lo, hi = _bounds(s, "minItems", "maxItems", path)
            item = self.compile(s.get("items", {}), f"{path}.items")
            return Node("arr", item, lo, hi)
        if t == "string":
            return Node("str", *_bounds(s, "minLength", "maxLength", path))
        if t in ("number", "integer"):
            return Node("num", t == "integer")
        if t == "boolean":
            return Node("alt", [Node("lit", "true"), Node("lit", "false")])
        if t == "null":
            return Node("lit", "null")
        raise UnsupportedSchema(f"{path}.type {t!r} is not a JSON schema type")

    def _ref(self, ref, path: str) -> Node:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise UnsupportedSchema(f"{path}.$ref {ref!r}: only local references (#/$defs/...) are supported")
        if ref not in self._refs:
            target = self.schema
            for part in [p for p in ref[1:].split("/") if p]:
                part = part.replace("~1", "/").replace("~0", "~")
                if not isinstance(target, dict) or part not in target:
                    raise UnsupportedSchema(f"{path}.$ref {ref!r} points at nothing")
                target = target[part]
            node = self._refs[ref] = Node("ref", None, ref)  # target filled below, so recursive schemas terminate
            node.a = self.compile(target, ref)
        return self._refs[ref]

    def _fixed(self, values: list, path: str) -> Node:
        """The alternatives of an enum or const: their JSON texts."""
        texts = sorted({_dump(v) for v in values})
        self._literals += len(texts)
        self._literal_chars += sum(len(t) for t in texts)
        if self._literals > MAX_LITERALS[0] or self._literal_chars > MAX_LITERALS[1]:
            raise UnsupportedSchema(f"{path}: the schema's enum and const values come to more than herd's limit "
                                    f"of {MAX_LITERALS[0]:,} values or {MAX_LITERALS[1]:,} characters")
        return Node("lit", texts[0]) if len(texts) == 1 else Node("lits", texts)

    @staticmethod
    def _alt(parts: list[Node]) -> Node:
        """Fixed-text branches merge into one sorted list, so anyOf of many consts steps by bisection."""
        texts = sorted({t for p in parts if p.kind == "lit" for t in [p.a]} |
                       {t for p in parts if p.kind == "lits" for t in p.a})
        rest = [p for p in parts if p.kind not in ("lit", "lits")]
        if len(texts) > 1:
            rest.append(Node("lits", texts))
        elif texts:
            rest.append(Node("lit", texts[0]))
        return rest[0] if len(rest) == 1 else Node("alt", rest)

    def _check_refs(self) -> None:
        """A $ref that reaches itself again through anyOf / $ref alone (no JSON written in between) would
        expand forever; refuse it, naming the loop."""
        done: set[int] = set()

        def visit(node: Node, trail: list[Node]) -> None:
            if node.kind not in ("alt", "ref") or id(node) in done:
                return
            if any(n is node for n in trail):
                loop = [n.b for n in trail[[id(n) for n in trail].index(id(node)):] if n.kind == "ref"] + [node.b]
                raise UnsupportedSchema(f"$ref {node.b!r} refers to itself before any JSON is written "
                                        f"({' -> '.join(loop)}), so no value can match it")
            trail.append(node)
            for child in (node.a if node.kind == "alt" else [node.a]):
                visit(child, trail)
            trail.pop()
            done.add(id(node))

        for node in list(self._refs.values()):
            visit(node, [])

    def _check_satisfiable(self) -> None:
        """Refuse a schema no finite JSON value satisfies: decoding it could only run into a dead end."""
        nodes, seen, todo = [], set(), [self.root]
        while todo:
            n = todo.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            nodes.append(n)
            todo += _children(n)
        nodes.reverse()  # children mostly before parents: few passes
        ok: set[int] = set()
        changed = True
        while changed:
            changed = False
            for n in nodes:
                if id(n) not in ok and _satisfiable(n, ok):
                    ok.add(id(n))
                    changed = True
        if id(self.root) not in ok:
            raise UnsupportedSchema("no finite JSON value satisfies the schema (a required property or minItems "
                                    "needs a value that cannot exist)")

    # -- the automaton -----------------------------------------------------------------------------
    def initial(self) -> frozenset:
        return frozenset([(("V", self.root),)])

    def step(self, state: frozenset, ch: str) -> frozenset:
        key = (state, ch)
        out = self._step_memo.get(key)
        if out is None:
            out = frozenset(s for stack in state for s in self._step(stack, ch))
            if len(self._step_memo) > 200_000:
                self._step_memo.clear()
            self._step_memo[key] = out
        return out

    def _expand(self, rest: tuple, node: Node) -> list[tuple]:
        if len(rest) > MAX_STACK:
            return []
        k = node.kind
        if k == "lit":
            return [rest + (("L", node.a, 0),)]
        if k == "lits":
            return [rest + (("T", node, 0, len(node.a), 0),)]
        if k == "ref":
            return self._expand(rest, node.a)
        if k == "str":
            return [rest + (("Q", node),)]
        if k == "num":
            return [rest + (("N", "start", node.a, 0),)]
        if k == "obj":
            return [rest + (("O", node, 0, "{"),)]
        if k == "dict":
            return [rest + (("G", node.a, "{"),)]
        if k == "arr":
            return [rest + (("A", node, 0, "["),)]
        if k == "alt":
            return [s for n in node.a for s in self._expand(rest, n)]
        if k == "any":
            scalars = [Node("str", 0, None), Node("num", False), Node("lit", "true"), Node("lit", "false"),
                       Node("lit", "null")]
            if node.a < MAX_DEPTH:
                inner = self.any(node.a + 1)
                scalars += [Node("dict", inner), Node("arr", inner, 0, None)]
            return [s for n in scalars for s in self._expand(rest, n)]
        raise AssertionError(k)

    def _step(self, stack: tuple, c: str) -> list[tuple]:
        if not stack:
            return []
        top, rest = stack[-1], stack[:-1]
        kind = top[0]
        if kind == "V":
            return [s for st in self._expand(rest, top[1]) for s in self._step(st, c)]
        if kind == "W":  # one optional space
            return self._step(rest, c) + ([rest] if c == " " else [])
        if kind == "L":
            text, i = top[1], top[2]
            if text[i] != c:
                return []
            return [rest if i + 1 == len(text) else rest + (("L", text, i + 1),)]
        if kind == "T":
            return self._literal(top, rest, c)
        if kind == "Q":
            return [rest + (("S", top[1], 0, 0),)] if c == '"' else []
        if kind == "S":
            return self._string(top, rest, c)
        if kind == "N":
            return self._number(top, rest, c)
        if kind == "O":
            return self._object(top, rest, c)
        if kind == "G":
            return self._dict(top, rest, c)
        if kind == "A":
            return self._array(top, rest, c)
        raise AssertionError(kind)

    @staticmethod
    def _literal(top, rest, c):
        """texts[lo:hi] share their first `i` characters; keep those whose next one is c."""
        _, node, lo, hi, i = top
        texts = node.a
        key = lambda t: t[i] if len(t) > i else ""  # noqa: E731 - the texts are sorted by this within lo:hi
        a, b = bisect_left(texts, c, lo, hi, key=key), bisect_right(texts, c, lo, hi, key=key)
        if a == b:
            return []
        out = []
        if len(texts[a]) == i + 1:  # one text ends here (it sorts first among those sharing the prefix)
            out.append(rest)
            a += 1
        if a < b:
            out.append(rest + (("T", node, a, b, i + 1),))
        return out

    @staticmethod
    def _string(top, rest, c):
        _, node, n, esc = top
        lo, hi = node.a, node.b
        cap = max(lo, hi or 0)  # past both bounds the count no longer matters: keep states few
        if esc == 0:
            if c == '"':
                return [rest] if n >= lo else []
            if ord(c) < 0x20 or (hi is not None and n >= hi):
                return []
            return [rest + (("S", node, min(n + 1, cap), 1 if c == "\\" else 0),)]
        if esc == 1:  # the escape was counted when the backslash came
            if c in '"\\/bfnrt':
                return [rest + (("S", node, n, 0),)]
            return [rest + (("S", node, n, 2),)] if c == "u" else []
        if c in "0123456789abcdefABCDEF":
            return [rest + (("S", node, n, 0 if esc == 5 else esc + 1),)]
        return []

    def _number(self, top, rest, c):
        _, phase, integer, length = top
        out = self._step(rest, c) if phase in ("zero", "int", "frac", "expdig") else []
        if length >= MAX_NUMBER:
            return out
        nxt = None
        if phase == "start" and c == "-":
            nxt = "minus"
        elif phase in ("start", "minus") and c in DIGITS:
            nxt = "zero" if c == "0" else "int"
        elif phase in ("int", "frac", "expdig") and c in DIGITS:
            nxt = phase
        elif phase in ("zero", "int") and c == "." and not integer:
            nxt = "dot"
        elif phase in ("zero", "int", "frac") and c in "eE" and not integer:
            nxt = "exp"
        elif phase == "dot" and c in DIGITS:
            nxt = "frac"
        elif phase == "exp" and c in "+-":
            nxt = "expsign"
        elif phase in ("exp", "expsign") and c in DIGITS:
            nxt = "expdig"
        return out + ([rest + (("N", nxt, integer, length + 1),)] if nxt else [])

    def _object(self, top, rest, c):
        _, node, idx, phase = top
        props = node.a
        optional_rest = all(not req for _, _, req in props[idx:])
        if phase == "{":
            return [rest + (("O", node, 0, "k"),)] if c == "{" else []
        if phase == ",":
            if c == "}" and optional_rest:
                return [rest]
            return [rest + (("O", node, idx, "k!"), ("W",))] if c == "," and idx < len(props) else []
        out = [rest] if (c == "}" and phase == "k" and optional_rest) else []
        for j in range(idx, len(props)):
            key, value, required = props[j]
            frames = (("O", node, j + 1, ","), ("V", value), ("W",), ("L", _dump(key) + ":", 0))
            out += self._step(rest + frames, c)
            if required:
                break
        return out

    def _dict(self, top, rest, c):
        _, value, phase = top
        if phase == "{":
            return [rest + (("G", value, "k"),)] if c == "{" else []
        if phase == ",":
            if c == "}":
                return [rest]
            return [rest + (("G", value, "k!"), ("W",))] if c == "," else []
        if c == "}" and phase == "k":
            return [rest]
        if c != '"':
            return []
        return [rest + (("G", value, ","), ("V", value), ("W",), ("L", ":", 0), ("S", _KEY, 0, 0))]

    def _array(self, top, rest, c):
        _, node, count, phase = top
        item, lo, hi = node.a, node.b, node.c
        if phase == "[":
            return [rest + (("A", node, 0, "i"),)] if c == "[" else []
        if phase == ",":
            if c == "]" and count >= lo:
                return [rest]
            return [rest + (("A", node, count, "i!"), ("W",))] if c == "," and (hi is None or count < hi) else []
        out = [rest] if (c == "]" and phase == "i" and lo == 0) else []
        if hi is None or count < hi:
            out += self._step(rest + (("A", node, count + 1, ","), ("V", item)), c)
        return out

    @staticmethod
    def complete(state: frozenset) -> bool:
        """Some stack has a finished value (only optional frames left)."""
        return any(all(f[0] == "W" or (f[0] == "N" and f[1] in ("zero", "int", "frac", "expdig")) for f in s)
                   for s in state)

    # -- token masks -------------------------------------------------------------------------------
    def mask(self, state: frozenset, vocab: "Vocabulary") -> torch.Tensor:
        """Bool [vocab.size]: tokens whose whole text the automaton accepts from `state`."""
        cached = self._masks.get(state)
        if cached is not None:
            return cached
        allowed = torch.zeros(vocab.size, dtype=torch.bool)
        ids: list[int] = []
        free = _free_string(state)
        if free:  # inside an unbounded string: every quote- and backslash-free token fits
            allowed[vocab.plain_ids] = True
            for tid, text in vocab.special_texts:
                st = state
                for ch in text:
                    st = self.step(st, ch)
                    if not st:
                        break
                else:
                    ids.append(tid)
        else:
            todo = [(vocab.trie, state)]
            while todo:
                node, st = todo.pop()
                for ch, child in node[1].items():
                    nst = self.step(st, ch)
                    if nst:
                        ids.extend(child[0])
                        if child[1]:
                            todo.append((child, nst))
        if ids:
            allowed[torch.tensor(ids, dtype=torch.long)] = True
        if len(self._masks) > 512:
            self._masks.clear()
        self._masks[state] = allowed
        return allowed


_KEY = Node("str", 0, None)


def _bounds(s: dict, low: str, high: str, path: str) -> tuple[int, int | None]:
    lo, hi = s.get(low, 0), s.get(high)
    for key, v in ((low, lo), (high, hi)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise UnsupportedSchema(f"{path}.{key} must be a non-negative integer, got {_dump(v)[:40]}")
    if hi is not None and lo > hi:
        raise UnsupportedSchema(f"{path}: {low} {lo} is greater than {high} {hi}, so no value can match it")
    return lo, hi


def _children(n: Node) -> list[Node]:
    k = n.kind
    if k == "alt":
        return list(n.a)
    if k in ("ref", "dict", "arr"):
        return [n.a]
    if k == "obj":
        return [v for _, v, _ in n.a]
    return []


def _satisfiable(n: Node, ok: set[int]) -> bool:
    """Some finite value matches n, given the nodes already known to have one (`ok`)."""
    k = n.kind
    if k == "obj":
        return all(id(v) in ok for _, v, required in n.a if required)
    if k == "arr":
        return n.b == 0 or id(n.a) in ok
    if k == "alt":
        return any(id(c) in ok for c in n.a)
    if k == "ref":
        return id(n.a) in ok
    return True  # lit, lits, str (bounds checked), num, dict ({} fits), any


def _free_string(state: frozenset) -> bool:
    if len(state) != 1:
        return False
    top = next(iter(state))[-1]
    return top[0] == "S" and top[3] == 0 and top[1].a == 0 and top[1].b is None


class Vocabulary:
    """Each token's text as it appears in the output (None: never allowed), and a trie over them."""

    def __init__(self, tokenizer: Tokenizer, size: int):
        self.size = size
        anchor = tokenizer.encode("a", bos=False)[:1]
        base = tokenizer.decode(anchor)
        texts: list[str | None] = []
        n = getattr(tokenizer, "vocab_size", size)
        for tid in range(min(size, n)):
            text = None
            if not tokenizer.is_special(tid):
                full = tokenizer.decode(anchor + [tid])
                if full.startswith(base):
                    text = full[len(base):]
            texts.append(text if text and "\ufffd" not in text else None)
        self.texts = texts
        self.trie: tuple = ([], {})  # (ids ending here, children by character)
        plain, special = [], []
        for tid, text in enumerate(texts):
            if text is None:
                continue
            node = self.trie
            for ch in text:
                node = node[1].setdefault(ch, ([], {}))
            node[0].append(tid)
            if '"' in text or "\\" in text or any(ord(ch) < 0x20 for ch in text):
                special.append((tid, text))
            else:
                plain.append(tid)
        self.plain_ids = torch.tensor(plain, dtype=torch.long)
        self.special_texts = special


_VOCABS: dict[int, tuple[Tokenizer, Vocabulary]] = {}


def vocabulary(tokenizer: Tokenizer, size: int) -> Vocabulary:
    """The (cached) Vocabulary of a tokenizer; the first call per tokenizer takes about a second."""
    key = id(tokenizer)
    if key not in _VOCABS or _VOCABS[key][0] is not tokenizer or _VOCABS[key][1].size != size:
        _VOCABS[key] = (tokenizer, Vocabulary(tokenizer, size))
    return _VOCABS[key][1]


@lru_cache(maxsize=64)
def _grammar(schema_json: str | None) -> Grammar:
    return Grammar(None if schema_json is None else json.loads(schema_json))


def grammar_for(schema: dict | None) -> Grammar:
    """A compiled Grammar (cached by schema text, masks included). Raises UnsupportedSchema."""
    return _grammar(None if schema is None else json.dumps(schema))


class Constraint:
    """One request's position in the grammar; the engine asks for a mask and advances by tokens."""

    def __init__(self, grammar: Grammar, tokenizer: Tokenizer, stop_ids, vocab_size: int):
        self.grammar = grammar
        self.vocab = vocabulary(tokenizer, vocab_size)
        self.stop_ids = [i for i in stop_ids if i < vocab_size]
        self.state = grammar.initial()

    @property
    def finished(self) -> bool:
        """The value is complete and nothing can follow it."""
        return self.state == frozenset([()])

    def allowed(self, vocab_size: int) -> torch.Tensor:
        mask = self.grammar.mask(self.state, self.vocab)
        if self.grammar.complete(self.state):
            mask = mask.clone()
            mask[self.stop_ids] = True
        if not bool(mask.any()):
            raise ValueError("constrained decoding: no token of the vocabulary can continue the JSON here")
        if mask.shape[0] < vocab_size:
            mask = torch.cat([mask, torch.zeros(vocab_size - mask.shape[0], dtype=torch.bool)])
        return mask

    def advance(self, token_id: int) -> None:
        text = self.vocab_text(token_id)
        state = self.state
        for ch in text:
            state = self.grammar.step(state, ch)
        if not state:
            raise ValueError(f"constrained decoding: token {token_id} ({text!r}) does not fit the schema")
        self.state = state

    def vocab_text(self, token_id: int) -> str:
        return self.vocab.texts[token_id] if token_id < len(self.vocab.texts) and self.vocab.texts[token_id] else ""


def json_constraint(schema: dict | None, tokenizer: Tokenizer, stop_ids, vocab_size: int):
    """A factory the engine calls once per request (compiles now, so a bad schema fails before queueing)."""
    grammar = grammar_for(schema)
    return lambda: Constraint(grammar, tokenizer, stop_ids, vocab_size)
