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

What one schema may cost is bounded when it compiles, and what one mask may cost when it is computed:
- size: MAX_SUBSCHEMAS compiled pieces, MAX_NESTING levels, MAX_LITERALS enum / const values;
- ambiguity: a state holds one stack per way of reading the output so far, and every character costs
  each of them a step. Alternatives that begin alike (anyOf branches, types, an object's optional
  properties) multiply; `max_parses` works out, from the compiled schema, the most stacks any output
  can keep alive at once (branches die where their property names or const / enum values differ), and
  a schema past MAX_PARSES is refused (a 400 in the server) instead of stalling decoding;
- per step: fixed texts (enum, const, true/false) are one sorted list walked by bisection, an object's
  property names too, so a step costs O(log values) however many there are; inside a string every
  token free of quotes, backslashes and control characters is allowed by its length alone, so only the
  trie's JSON-structural paths are walked. A mask's walk is counted in steps (a trie edge, or one stack
  stepping a character) and gives up past MAX_MASK_STEPS with ConstraintError.

The engine computes masks a slice of steps at a time (Constraint.prepare) between its forwards, so a
slow mask delays only its own request (herd.engine.engine). Step results and masks are cached across
requests within byte / stack budgets shared by every grammar.
"""

from __future__ import annotations

import itertools
import json
import threading
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from functools import lru_cache
from typing import Generator

import numpy as np
import torch

from herd.errors import HerdError
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
MAX_PARSES = 256  # most ways of reading one output a schema may keep alive at once (stacks in a state)
MAX_ANALYSIS = 300_000  # work the ambiguity analysis may do before it gives up on a schema
MAX_MASK_STEPS = 20_000_000  # work one token mask may take (trie edges walked + stack-steps)
STEP_CACHE_STACKS = 250_000  # stacks held by cached step results, over all grammars (a few hundred bytes each)
MASK_CACHE_BYTES = 64 << 20  # cached masks, over all grammars and vocabularies


class UnsupportedSchema(HerdError, ValueError):
    """The schema uses a keyword or construct constrained decoding cannot guarantee, or costs too much."""


class ConstraintError(HerdError, ValueError):
    """Decoding under the schema cannot go on (no token fits, or one step costs more than herd allows)."""


class Node:
    """A compiled schema piece. kind: lit(text) lits(sorted texts) str(min, max) num(integer) obj(props, keys)
    dict(value) arr(item, min, max) any(depth) alt(nodes) ref(target, pointer). Hashed by identity."""

    __slots__ = ("kind", "a", "b", "c")

    def __init__(self, kind, a=None, b=None, c=None):
        self.kind, self.a, self.b, self.c = kind, a, b, c


def _dump(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class _Keys:
    """An object's property names as sorted `"name":` texts, for bisection. Properties come in schema order,
    so after property idx the next name is one of props[idx..r], r the first required one from idx on: a
    `segment` is a run of properties ending at a required one (or the last), and within one the names still
    allowed are those whose index is >= idx, found with a sparse table of the largest index in a range."""

    def __init__(self, props: list):
        n = len(props)
        self.optional_from = [True] * (n + 1)  # optional_from[i]: props[i:] are all optional
        for i in range(n - 1, -1, -1):
            self.optional_from[i] = self.optional_from[i + 1] and not props[i][2]
        self.segment = [0] * n
        self.texts: list[list[str]] = []
        self.index: list[list[int]] = []
        self.largest: list[list[list[int]]] = []
        start = 0
        for i in range(n):
            self.segment[i] = len(self.texts)
            if props[i][2] or i == n - 1:
                pairs = sorted((_dump(props[j][0]) + ":", j) for j in range(start, i + 1))
                self.texts.append([t for t, _ in pairs])
                self.index.append([j for _, j in pairs])
                table = [self.index[-1]]
                while 2 << (len(table) - 1) <= len(pairs):
                    prev, half = table[-1], 1 << (len(table) - 1)
                    table.append(list(map(max, prev[:-half], prev[half:])))
                self.largest.append(table)
                start = i + 1

    def max_index(self, seg: int, lo: int, hi: int) -> int:
        """The largest property index among texts[seg][lo:hi] (hi > lo)."""
        level = (hi - lo).bit_length() - 1
        row = self.largest[seg][level]
        return max(row[lo], row[hi - (1 << level)])


def _any_parts(depth: int) -> list[Node]:
    return _ANY_PARTS[depth]


def _make_any() -> tuple[dict[int, Node], dict[int, list[Node]]]:
    """Free JSON (json_object, `{}` schemas) at each depth, shared by every grammar: the same nodes give the
    same states, so their steps and masks are cached once."""
    nodes = {d: Node("any", d) for d in range(1, MAX_DEPTH + 1)}
    parts = {}
    for d in range(1, MAX_DEPTH + 1):
        parts[d] = [Node("str", 0, None), Node("num", False), Node("lit", "true"), Node("lit", "false"),
                    Node("lit", "null")]
        if d < MAX_DEPTH:
            parts[d] += [Node("dict", nodes[d + 1]), Node("arr", nodes[d + 1], 0, None)]
    return nodes, parts


_ANY, _ANY_PARTS = _make_any()


class _Cache:
    """Entries dropped oldest first once their total cost passes `budget`; shared by threads (the server's
    engines), so insertions hold a lock."""

    def __init__(self, budget: int):
        self.budget = budget
        self._entries: OrderedDict = OrderedDict()
        self._cost = 0
        self._lock = threading.Lock()

    def get(self, key):
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def put(self, key, value, cost: int) -> None:
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (value, cost)
            self._cost += cost
            while self._cost > self.budget and self._entries:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._cost -= dropped


_STEPS = _Cache(STEP_CACHE_STACKS)
_MASKS = _Cache(MASK_CACHE_BYTES)


class _Meter:
    """Work done by one mask computation: `steps` so far, a pause point the engine sets, and a limit."""

    __slots__ = ("steps", "pause", "limit")

    def __init__(self, limit: int):
        self.steps, self.pause, self.limit = 0, 0, limit

    def due(self) -> bool:
        return self.steps >= self.pause


class Grammar:
    def __init__(self, schema: dict | None):
        """schema None: any JSON object (response_format json_object)."""
        self.schema = schema
        self._refs: dict[str, Node] = {}
        self._depth = self._count = self._literals = self._literal_chars = 0
        try:
            self.root = Node("dict", _ANY[1]) if schema is None else self.compile(schema, "schema")
        except RecursionError:
            raise UnsupportedSchema("the schema is nested too deeply") from None
        self._check_refs()
        self._check_satisfiable()
        self.parses = self._max_parses()

    # -- compiling ---------------------------------------------------------------------------------
    def compile(self, s, path: str) -> Node:
        if s is True or s == {}:
            return _ANY[1]
        if not isinstance(s, dict):
            raise UnsupportedSchema(f"{path} must be a JSON schema object, got {json.dumps(s)[:80]}")
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
            return _ANY[1]
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
                return Node("dict", _ANY[1] if extra is True else self.compile(extra, f"{path}.additionalProperties"))
            compiled = [(k, self.compile(v, f"{path}.properties.{k}"), k in required) for k, v in props.items()]
            return Node("obj", compiled, _Keys(compiled))
        if t == "array":
            lo, hi = _bounds(s, "minItems", "maxItems", path)
            item = self.compile(s.get("items", {}), f"{path}.items")
            return Node("arr", item, lo, hi)
        if t == "string":
            return Node("str", *_bounds(s, "minLength", "maxLength", path))
        if t in ("number", "integer"):
            return Node("num", t == "integer")
        if t == "boolean":
            return Node("lits", ["false", "true"])
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
        try:
            texts = sorted({_dump(v) for v in values})
        except ValueError:
            raise UnsupportedSchema(f"{path}: an enum or const value is NaN or infinite, which JSON cannot "
                                    "write") from None
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
        """Refuse a schema no finite JSON value satisfies: decoding it could only run into a dead end. A
        worklist: each node is decided once all the children it needs are (linear in the schema's size)."""
        nodes, seen, todo = [], set(), [self.root]
        while todo:
            n = todo.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            nodes.append(n)
            todo += _children(n)
        parents: dict[int, list[Node]] = {}
        waiting: dict[int, int] = {}  # children still needed (alt, ref: any one; obj, arr: all required ones)
        ready = []
        for n in nodes:
            needed = _needs(n)
            for child in needed:
                parents.setdefault(id(child), []).append(n)
            waiting[id(n)] = 1 if n.kind in ("alt", "ref") and needed else len(needed)
            if waiting[id(n)] == 0:
                ready.append(n)
        ok: set[int] = set()
        while ready:
            n = ready.pop()
            if id(n) in ok:
                continue
            ok.add(id(n))
            for parent in parents.get(id(n), ()):
                waiting[id(parent)] -= 1
                if waiting[id(parent)] == 0:
                    ready.append(parent)
        if id(self.root) not in ok:
            raise UnsupportedSchema("no finite JSON value satisfies the schema (a required property or minItems "
                                    "needs a value that cannot exist)")

    def _max_parses(self) -> int:
        """The most stacks (ways of reading the output so far) a state of this grammar can hold, worked out
        from the schema; refuses one past MAX_PARSES. Alternatives alive together are a multiset of nodes
        (a count per node: one per way of reaching it). At a value, all of them are expanded (each costs a
        step); then only those that begin with the same character go on together: strings with strings,
        objects with objects, arrays with arrays. Objects alive together go on, property by property, with
        the values of the property read (their parses), and only the objects that have that property; where
        those values are all fixed texts, only the objects whose text it is. Arrays go on with their items."""
        memo: dict[tuple, int] = {}  # ("p", multiset) -> parses, ("o", objects) -> objects_parses
        active: set[tuple] = set()
        first_chars: dict[int, set[str]] = {}
        work = [0]

        def spend(n: int) -> None:
            work[0] += n
            if work[0] > MAX_ANALYSIS:
                raise UnsupportedSchema("the schema is too intricate for herd to bound what decoding it costs (its "
                                        "alternatives nest and recur too much); simplify its anyOf / $ref structure")

        def flatten(items) -> dict[int, list]:
            out: dict[int, list] = {}
            todo = list(items)
            while todo:
                node, count = todo.pop()
                spend(1)
                if node.kind == "alt":
                    todo.extend((c, count) for c in node.a)
                elif node.kind == "ref":
                    todo.append((node.a, count))
                elif node.kind == "any":  # as at depth 1, which allows the most (fewer states to explore)
                    todo.extend((p, count) for p in _any_parts(1))
                elif id(node) in out:
                    out[id(node)][1] += count
                else:
                    out[id(node)] = [node, count]
            return out

        def parses(items, depth: int) -> int:
            if len(items) == 1 and items[0][0].kind in ("str", "num", "lit", "lits"):  # most property values
                node, count = items[0]
                return count * (2 if node.kind == "lits" else 1)
            flat = flatten(items)
            total = sum(count * (2 if node.kind == "lits" else 1) for node, count in flat.values())
            if total > MAX_PARSES or depth > MAX_STACK:
                return total if total > MAX_PARSES else 0  # past MAX_STACK the automaton drops the stacks
            key = ("p", frozenset((i, count) for i, (_, count) in flat.items()))
            if key in memo:
                return memo[key]
            if key in active:
                return 0  # the same alternatives again, one level down: no more stacks than at this level
            active.add(key)
            fixed = {ch: sum(count for node, count in flat.values()
                             if node.kind in ("lit", "lits") and ch in starts(node)) for ch in "{["}
            best = total
            objects = [(node, count) for node, count in flat.values() if node.kind in ("obj", "dict")]
            if objects:
                best = max(best, fixed["{"] + objects_parses(objects, depth, True))
            arrays = [(node.a, count) for node, count in flat.values() if node.kind == "arr"]
            if arrays:
                best = max(best, fixed["["] + max(sum(c for _, c in arrays), parses(arrays, depth + 1)))
            active.discard(key)
            memo[key] = best
            return best

        def starts(node: Node) -> set[str]:
            if id(node) not in first_chars:
                first_chars[id(node)] = {t[0] for t in (node.a if node.kind == "lits" else [node.a])}
                spend(len(first_chars[id(node)]))
            return first_chars[id(node)]

        def objects_parses(objects, depth: int, first: bool) -> int:
            """Objects read together from their opening brace (`first`: the next name is their first one, so
            only names that may come first count) or from a property on (any of their names may follow)."""
            key = ("o", first, frozenset((id(node), count) for node, count in objects))
            if key in memo:
                return memo[key]
            if key in active:
                return 0
            active.add(key)
            best = sum(count for _, count in objects)  # reading a property name: one stack each
            names: dict[str, list] = {}
            spare = [(node.a, count) for node, count in objects if node.kind == "dict"]
            for node, count in objects:
                if node.kind == "obj":
                    props = node.a
                    if first:  # up to and with the first required property
                        props = props[:next((i + 1 for i, p in enumerate(props) if p[2]), len(props))]
                    for name, value, _ in props:
                        names.setdefault(name, []).append((node, value, count))
            spend(len(names))
            if spare:  # a name no object declares: only the dicts' values
                best = max(best, parses(spare, depth + 1))
            for having in names.values():
                values = [(value, count) for _, value, count in having] + spare
                best = max(best, parses(values, depth + 1))
                if best > MAX_PARSES:
                    break
                if spare or any(v.kind not in ("lit", "lits") for _, v, _ in having):
                    if not first and len(having) + len(spare) == len(objects):
                        continue  # every object has the name and goes on: the same alternatives as now
                    survivors = [[(node, count) for node, _, count in having] + [(n, c) for n, c in objects
                                                                                   if n.kind == "dict"]]
                else:  # the value read decides: only the objects whose fixed text it is go on
                    by_text: dict[str, list] = {}
                    for node, value, count in having:
                        for t in (value.a if value.kind == "lits" else [value.a]):
                            by_text.setdefault(t, []).append((node, count))
                    survivors = list(by_text.values())
                for group in survivors:
                    best = max(best, objects_parses(group, depth, False))
            active.discard(key)
            memo[key] = best
            return best

        try:
            found = parses([(self.root, 1)], 0)
        except RecursionError:
            raise UnsupportedSchema("the schema nests too deeply for herd to bound what decoding it costs") from None
        if found > MAX_PARSES:
            raise UnsupportedSchema(f"the schema is too ambiguous: its alternatives (anyOf, oneOf, type lists, "
                                    f"optional properties) can leave more than {MAX_PARSES} ways of reading one "
                                    "output open at once, each of which every token would have to follow; make "
                                    "alternatives differ early (a first property or const value of their own)")
        return found

    # -- the automaton -----------------------------------------------------------------------------
    def initial(self) -> frozenset:
        return frozenset([(("V", self.root),)])

    def step(self, state: frozenset, ch: str, meter: _Meter | None = None) -> frozenset:
        key = (state, ch)
        out = _STEPS.get(key)
        if out is None:
            out = frozenset(s for stack in state for s in self._step(stack, ch))
            _STEPS.put(key, out, 1 + len(out))
            if meter is not None:
                meter.steps += len(state)
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
            return [s for n in _any_parts(node.a) for s in self._expand(rest, n)]
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
        if kind == "K":
            return self._key(top, rest, c)
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
    def _key(top, rest, c):
        """A property name of object `node` after property idx: its `"name":` texts[lo:hi] in the segment of
        idx share their first `i` characters; keep those whose next one is c and whose property may come."""
        _, node, idx, lo, hi, i = top
        keys: _Keys = node.b
        seg = keys.segment[idx]
        texts = keys.texts[seg]
        key = lambda t: t[i] if len(t) > i else ""  # noqa: E731 - the texts are sorted by this within lo:hi
        a, b = bisect_left(texts, c, lo, hi, key=key), bisect_right(texts, c, lo, hi, key=key)
        if a == b or keys.max_index(seg, a, b) < idx:
            return []
        if len(texts[a]) == i + 1:  # the whole name (the texts are prefix-free: each ends with '":')
            j = keys.index[seg][a]
            return [rest + (("O", node, j + 1, ","), ("V", node.a[j][1]), ("W",))]
        return [rest + (("K", node, idx, a, b, i + 1),)]

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
        if nxt in ("minus", "dot", "exp", "expsign") and length + 2 > MAX_NUMBER:
            nxt = None  # a digit must still fit after it, or the number could neither go on nor end
        return out + ([rest + (("N", nxt, integer, length + 1),)] if nxt else [])

    def _object(self, top, rest, c):
        _, node, idx, phase = top
        keys: _Keys = node.b
        if phase == "{":
            return [rest + (("O", node, 0, "k"),)] if c == "{" else []
        if phase == ",":
            if c == "}" and keys.optional_from[idx]:
                return [rest]
            return [rest + (("O", node, idx, "k!"), ("W",))] if c == "," and idx < len(node.a) else []
        out = [rest] if (c == "}" and phase == "k" and keys.optional_from[idx]) else []
        if idx < len(node.a):
            out += self._key(("K", node, idx, 0, len(keys.texts[keys.segment[idx]]), 0), rest, c)
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
    def cached_mask(self, state: frozenset, vocab: Vocabulary) -> torch.Tensor | None:
        return _MASKS.get((vocab.serial, state))

    def mask(self, state: frozenset, vocab: Vocabulary) -> torch.Tensor:
        """Bool [vocab.size]: tokens whose whole text the automaton accepts from `state`."""
        work = self.mask_work(state, vocab, _Meter(MAX_MASK_STEPS))
        while True:
            try:
                next(work)
            except StopIteration as done:
                return done.value

    def mask_work(self, state: frozenset, vocab: Vocabulary, meter: _Meter) -> Generator[None, None, torch.Tensor]:
        """The mask for `state`, computed by a generator that pauses whenever `meter` is due (the caller sets
        meter.pause) and raises ConstraintError once it passes meter.limit."""
        cached = self.cached_mask(state, vocab)
        if cached is not None:
            return cached
        allowed = np.zeros(vocab.size, dtype=bool)  # numpy: filling a mask needs no thread pool
        ids: list[int] = []
        # Stacks inside a string (no escape pending) accept any run of characters free of quotes,
        # backslashes and control characters, up to the string's room: such tokens are allowed by length.
        strings = frozenset(s for s in state if s and s[-1][0] == "S" and s[-1][3] == 0)
        if strings:
            rooms = [top[1].b - top[2] if top[1].b is not None else None for top in (s[-1] for s in strings)]
            room = None if None in rooms else max(rooms)
            allowed[vocab.plain_up_to(room)] = True
            yield from self._walk(vocab.special_trie, strings, ids, meter)
        others = state - strings
        if others:
            yield from self._walk(vocab.trie, others, ids, meter)
        if ids:
            allowed[np.array(ids, dtype=np.int64)] = True
        mask = torch.from_numpy(allowed)
        _MASKS.put((vocab.serial, state), mask, vocab.size)
        return mask

    def _walk(self, trie: tuple, state: frozenset, ids: list[int], meter: _Meter) -> Generator[None, None, None]:
        """Adds to `ids` the tokens of `trie` whose whole text `state` accepts, depth first, pruned at the
        first character no stack takes; pauses when the meter is due."""
        stack = [(iter(trie[1].items()), state)]
        while stack:
            children, st = stack[-1]
            for ch, child in children:
                meter.steps += 1
                nst = self.step(st, ch, meter)
                if nst:
                    ids.extend(child[0])
                    if child[1]:
                        stack.append((iter(child[1].items()), nst))
                        break
                if meter.due():
                    break
            else:
                stack.pop()
            if meter.steps > meter.limit:
                raise ConstraintError(f"constrained decoding: one token's mask took more than {meter.limit:,} "
                                      "steps of the schema's automaton (herd's limit)")
            if meter.due():
                yield


_KEY = Node("str", 0, None)


def _bounds(s: dict, low: str, high: str, path: str) -> tuple[int, int | None]:
    lo, hi = s.get(low, 0), s.get(high)
    for key, v in ((low, lo), (high, hi)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise UnsupportedSchema(f"{path}.{key} must be a non-negative integer, got {json.dumps(v)[:40]}")
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


def _needs(n: Node) -> list[Node]:
    """The children whose satisfiability n's depends on: any one of an alt's or a ref's, all of an object's
    required properties, an array's item when it needs at least one."""
    k = n.kind
    if k in ("alt", "ref"):
        return _children(n)
    if k == "obj":
        return [v for _, v, required in n.a if required]
    if k == "arr":
        return [n.a] if n.b > 0 else []
    return []  # lit, lits, str (bounds checked), num, dict ({} fits), any


class Vocabulary:
    """Each token's text as it appears in the output (None: never allowed), a trie over them, and the
    "plain" tokens (no quote, backslash or control character: any string takes them) sorted by length."""

    _serials = itertools.count()

    def __init__(self, tokenizer: Tokenizer, size: int):
        self.size = size
        self.serial = next(self._serials)
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
        self.special_trie: tuple = ([], {})
        plain: list[tuple[int, int]] = []
        for tid, text in enumerate(texts):
            if text is None:
                continue
            _insert(self.trie, text, tid)
            if '"' in text or "\\" in text or any(ord(ch) < 0x20 for ch in text):
                _insert(self.special_trie, text, tid)
            else:
                plain.append((len(text), tid))
        plain.sort()
        self.plain_ids = np.array([tid for _, tid in plain], dtype=np.int64)
        self._plain_lengths = [length for length, _ in plain]

    def plain_up_to(self, room: int | None) -> np.ndarray:
        """The plain tokens of at most `room` characters (None: all)."""
        if room is None:
            return self.plain_ids
        return self.plain_ids[:bisect_right(self._plain_lengths, room)]


def _insert(trie: tuple, text: str, tid: int) -> None:
    node = trie
    for ch in text:
        node = node[1].setdefault(ch, ([], {}))
    node[0].append(tid)


_VOCABS: dict[int, tuple[Tokenizer, Vocabulary]] = {}
_VOCABS_LOCK = threading.Lock()


def vocabulary(tokenizer: Tokenizer, size: int) -> Vocabulary:
    """The (cached) Vocabulary of a tokenizer; the first call per tokenizer takes about a second."""
    key = id(tokenizer)
    with _VOCABS_LOCK:
        if key not in _VOCABS or _VOCABS[key][0] is not tokenizer or _VOCABS[key][1].size != size:
            _VOCABS[key] = (tokenizer, Vocabulary(tokenizer, size))
        return _VOCABS[key][1]


@lru_cache(maxsize=16)
def _grammar(schema_json: str | None) -> Grammar:
    return Grammar(None if schema_json is None else json.loads(schema_json))


def grammar_for(schema: dict | None) -> Grammar:
    """A compiled Grammar (cached by schema text). Raises UnsupportedSchema."""
    try:
        text = None if schema is None else json.dumps(schema)
    except RecursionError:
        raise UnsupportedSchema("the schema is nested too deeply") from None
    return _grammar(text)


class Constraint:
    """One request's position in the grammar. The engine has its mask computed a slice at a time
    (`prepare`), samples with it (`allowed`) and then moves on by the token drawn (`advance`)."""

    def __init__(self, grammar: Grammar, vocab: Vocabulary, stop_ids, vocab_size: int):
        self.grammar = grammar
        self.vocab = vocab
        self.stop_ids = [i for i in stop_ids if i < vocab_size]
        self.state = grammar.initial()
        self._mask: torch.Tensor | None = None
        self._work: Generator | None = None
        self._meter = _Meter(MAX_MASK_STEPS)

    @property
    def finished(self) -> bool:
        """The value is complete and nothing can follow it."""
        return self.state == frozenset([()])

    @property
    def ready(self) -> bool:
        """The mask for the current state is computed (or cached from an earlier request)."""
        if self._mask is None:
            self._mask = self.grammar.cached_mask(self.state, self.vocab)
        return self._mask is not None

    def prepare(self, steps: int) -> bool:
        """Compute up to `steps` more of the current state's mask; whether it is ready. Raises ConstraintError."""
        if self.ready:
            return True
        if self._work is None:
            self._meter = _Meter(MAX_MASK_STEPS)
            self._work = self.grammar.mask_work(self.state, self.vocab, self._meter)
        self._meter.pause = self._meter.steps + steps
        try:
            next(self._work)
        except StopIteration as done:
            self._mask, self._work = done.value, None
        return self._mask is not None

    def allowed(self, vocab_size: int) -> torch.Tensor:
        while not self.prepare(1 << 62):
            pass
        mask = self._mask.numpy()
        if self.grammar.complete(self.state) or mask.shape[0] < vocab_size:
            padded = np.zeros(max(vocab_size, mask.shape[0]), dtype=bool)
            padded[:mask.shape[0]] = mask
            if self.grammar.complete(self.state):
                padded[self.stop_ids] = True
            mask = padded
        if not mask.any():
            raise ConstraintError("constrained decoding: no token of the vocabulary can continue the JSON here")
        return torch.from_numpy(mask)

    def advance(self, token_id: int) -> None:
        text = self.vocab_text(token_id)
        state = self.state
        for ch in text:
            state = self.grammar.step(state, ch)
        if not state:
            raise ConstraintError(f"constrained decoding: token {token_id} ({text!r}) does not fit the schema")
        self.state, self._mask, self._work = state, None, None

    def vocab_text(self, token_id: int) -> str:
        return self.vocab.texts[token_id] if token_id < len(self.vocab.texts) and self.vocab.texts[token_id] else ""


def json_constraint(schema: dict | None, tokenizer: Tokenizer, stop_ids, vocab_size: int):
    """A factory the engine calls once per request. Compiles the schema and builds the vocabulary now (in
    the caller's thread), so a bad schema fails before queueing and the engine never waits for either."""
    grammar = grammar_for(schema)
    vocab = vocabulary(tokenizer, vocab_size)
    return lambda: Constraint(grammar, vocab, stop_ids, vocab_size)
