"""Tool definitions in the prompt, tool calls in and out, per Llama generation.

Prompt text follows Meta's documented formats (llama-models `llama3_1/prompt_format.md`,
`llama4/prompt_format.md`, `llama3/prompt_templates/system_prompts.py`). `parse_reply` reads every
tool-call form a Llama model is documented to emit and returns OpenAI-shaped tool calls:

- 3.1 JSON: `<|python_tag|>{"type": "function", "name": ..., "parameters": {...}}` (or bare JSON, several
  joined by ";"), also {"name", "arguments"} and {"type": "function", "function": {...}};
- 3.1 built-in tools: `<|python_tag|>brave_search.call(query="...")`; code interpreter: `<|python_tag|>{code}`;
- user-defined function tags: `<function=NAME>{json}</function>`;
- 3.2 / 4 pythonic: `[f(a=1, b="x"), g()]`, read with `ast` (literals only, nothing is evaluated);
- Llama 4 `<|python_start|>...<|python_end|>`; Hermes-style `<tool_call>{json}</tool_call>` (template models).
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from typing import Any

from herd.errors import TemplateError

BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")
_QUERY_TOOLS = ("brave_search", "wolfram_alpha", "photogen")


# -- tool definitions -----------------------------------------------------------------------------------------


def _function(tool: Any, i: int) -> dict:
    if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
        fn = tool["function"]
    elif isinstance(tool, dict) and "name" in tool:
        fn = tool
    elif isinstance(tool, dict) and tool.get("type") in BUILTIN_TOOLS:
        fn = {"name": tool["type"]}
    else:
        fn = None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise TemplateError(f"tools[{i}] must look like {{'type': 'function', 'function': {{'name': ..., "
                            f"'description': ..., 'parameters': {{JSON schema}}}}}}, got {str(tool)[:200]}")
    return fn


def functions(tools: list[dict] | None) -> list[dict]:
    """The function definitions of OpenAI-shaped tools."""
    return [_function(t, i) for i, t in enumerate(tools or ())]


def tool_names(tools: list[dict] | None) -> set[str]:
    return {f["name"] for f in functions(tools)}


def split_tools(tools: list[dict]) -> tuple[list[str], list[dict]]:
    """(built-in tool names, custom function definitions). Built-ins are Llama 3.1's brave_search,
    wolfram_alpha, photogen and code_interpreter, named as functions or as {"type": "brave_search"}."""
    builtin, custom = [], []
    for fn in functions(tools):
        (builtin if fn["name"] in BUILTIN_TOOLS else custom).append(fn)
    return [b["name"] for b in builtin], custom


def _params(fn: dict) -> tuple[dict, list]:
    schema = fn.get("parameters") or {}
    props = schema.get("properties") or {}
    if not isinstance(props, dict):
        raise TemplateError(f"tool {fn['name']!r}: parameters.properties must be an object")
    return props, list(schema.get("required") or [])


def _dumps_inline_required(obj: Any, required: list) -> str:
    """json.dumps(indent=4), but the "required" list stays on one line, as Meta's templates print it."""
    marker = "\x00REQUIRED\x00"
    text = json.dumps(obj, indent=4, ensure_ascii=False)
    return text.replace(json.dumps(marker), json.dumps(required, ensure_ascii=False))


def llama31_system_prompt(builtin: list[str], has_custom: bool, today: str, instruction: str | None) -> str:
    """Meta's recommended Llama 3.1 system message (`recommended_system_message`)."""
    text = ""
    if builtin or has_custom:
        shown = [b for b in builtin if b != "code_interpreter"]
        text += "Environment: ipython\n" + ("Tools: " + ", ".join(shown) if shown else "") + "\n"
    text += f"Cutting Knowledge Date: December 2023\nToday Date: {today}"
    if instruction:
        text += "\n\n" + instruction
    return text + "\n"


def json_tools_prompt(custom: list[dict]) -> str:
    """Meta's Llama 3.1 JSON tool list (JsonCustomToolGenerator), sent as a user message."""
    blocks = []
    for fn in custom:
        props, required = _params(fn)
        block = {"type": "function", "function": {
            "name": fn["name"], "description": fn.get("description", ""),
            "parameters": {
                "type": "object",
                # Meta's template lists each parameter as its own object and types them all "object".
                "properties": [{name: {"type": "object", "description": (p or {}).get("description", "")}}
                               for name, p in props.items()],
                "required": "\x00REQUIRED\x00",
            },
        }}
        blocks.append(_dumps_inline_required(block, required) + "\n")
    return ("Answer the user's question by making use of the following functions if needed.\n"
            "If none of the function can be used, please say so.\n"
            "Here is a list of functions in JSON format:\n" + "".join(blocks)
            + "\nReturn function calls in JSON format.")


LLAMA4_TOOLS_HEAD = """\
You are a helpful assistant and an expert in function composition. You can answer general questions using \
your internal knowledge OR invoke functions when necessary. Follow these strict guidelines:

1. FUNCTION CALLS:
- ONLY use functions that are EXPLICITLY listed in the function list below
- If NO functions are listed (empty function list []), respond ONLY with internal knowledge or "I don't have \
access to [Unavailable service] information"
- If a function is not in the list, respond ONLY with internal knowledge or "I don't have access to \
[Unavailable service] information"
- If ALL required parameters are present AND the query EXACTLY matches a listed function's purpose: output \
ONLY the function call(s)
- Use exact format: [func_name1(param1=value1, param2=value2), func_name2(...)]
Examples:
CORRECT: [get_weather(location="Vancouver"), calculate_route(start="Boston", end="New York")] <- Only if \
get_weather and calculate_route are in function list
INCORRECT: get_weather(location="New York")
INCORRECT: Let me check the weather: [get_weather(location="New York")]
INCORRECT: [get_events(location="Singapore")] <- If function not in list

2. RESPONSE RULES:
- For pure function requests matching a listed function: ONLY output the function call(s)
- For knowledge questions: ONLY output text
- For missing parameters: ONLY request the specific missing parameters
- For unavailable services (not in function list): output ONLY with internal knowledge or "I don't have \
access to [Unavailable service] information". Do NOT execute a function call.
- If the query asks for information beyond what a listed function provides: output ONLY with internal \
knowledge about your limitations
- NEVER combine text and function calls in the same response
- NEVER suggest alternative functions when the requested service is unavailable
- NEVER create or invent new functions not listed below

3. STRICT BOUNDARIES:
- ONLY use functions from the list below - no exceptions
- NEVER use a function as an alternative to unavailable information
- NEVER call functions not present in the function list
- NEVER add explanatory text to function calls
- NEVER respond with empty brackets
- Use proper Python/JSON syntax for function calls
- Check the function list carefully before responding

4. TOOL RESPONSE HANDLING:
- When receiving tool responses: provide concise, natural language responses
- Don't repeat tool response verbatim
- Don't add supplementary information"""

LLAMA4_TOOLS_TAIL = ("You can answer general questions or invoke tools when necessary.\n"
                     "In addition to tool calls, you should also augment your responses by using the tool outputs.")


def llama4_tools_prompt(tools: list[dict]) -> str:
    """Meta's documented Llama 4 zero-shot function-calling system prompt."""
    entries, required_lists = [], []
    for fn in tools:
        props, required = _params(fn)
        properties = {}
        for name, p in props.items():
            p = p or {}
            entry = {"type": p.get("type", "string"), "description": p.get("description", "")}
            for key in ("enum", "default"):
                if key in p:
                    entry[key] = p[key]
            properties[name] = entry
        entries.append({"name": fn["name"], "description": fn.get("description", ""),
                        "parameters": {"type": "dict", "required": f"\x00REQUIRED{len(required_lists)}\x00",
                                       "properties": properties}})
        required_lists.append(required)
    listing = json.dumps(entries, indent=4, ensure_ascii=False)
    for i, req in enumerate(required_lists):
        listing = listing.replace(json.dumps(f"\x00REQUIRED{i}\x00"), json.dumps(req, ensure_ascii=False))
    return (LLAMA4_TOOLS_HEAD + "\n\n\nHere is a list of functions in JSON format that you can invoke.\n\n"
            + listing + "\n\n" + LLAMA4_TOOLS_TAIL)


# -- writing tool calls ---------------------------------------------------------------------------------------


def py_literal(value: Any) -> str:
    """A JSON value written as a Python literal (strings in double quotes, as Meta's examples)."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(py_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{py_literal(str(k))}: {py_literal(v)}" for k, v in value.items()) + "}"
    raise TemplateError(f"tool-call argument of type {type(value).__name__} cannot be written")


def _kwargs(args: dict) -> str:
    for k in args:
        if not (isinstance(k, str) and k.isidentifier()):
            raise TemplateError(f"tool-call argument name {k!r} is not a Python identifier; the pythonic call "
                                "format cannot express it")
    return ", ".join(f"{k}={py_literal(v)}" for k, v in args.items())


def encode_calls_pythonic(calls: list[tuple[str, dict]]) -> str:
    """`[f(a=1, b="x"), g()]` (Llama 3.2 zero-shot and Llama 4)."""
    return "[" + ", ".join(f"{name}({_kwargs(args)})" for name, args in calls) + "]"


def encode_call_llama31(name: str, args: dict) -> str:
    """One call as Llama 3.1 writes it after <|python_tag|> (llama-models ToolUtils.encode_tool_call, json)."""
    if name in _QUERY_TOOLS:
        return f"{name}.call({_kwargs(args)})"
    if name == "code_interpreter":
        return str(args.get("code", ""))
    return json.dumps({"type": "function", "name": name, "parameters": args}, ensure_ascii=False)


# -- reading tool calls ---------------------------------------------------------------------------------------

_END_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|eot|>", "<|eom|>", "<|end_of_text|>", "</s>", "<|im_end|>",
              "<|endoftext|>")
_FUNCTION_TAG = re.compile(r"<function=([^>\s]+)>(.*?)(?:</function>|$)", re.DOTALL)
_HERMES_TAG = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_MAX_PARSE = 1_000_000


def parse_reply(text: str, fmt: Any = None, tools: list[dict] | None = None) -> tuple[str | None, list[dict]]:
    """A model's reply → (content, tool_calls). Tool calls are parsed only when `tools` were offered, and
    only accepted if every called name is one of them; they come back OpenAI-shaped with JSON-string
    arguments and fresh ids. Content is None when the reply was only tool calls."""
    stops = tuple(getattr(fmt, "stop_texts", ()) or ()) + _END_TEXTS
    body = text
    changed = True
    while changed:
        changed = False
        stripped = body.rstrip()
        for s in stops:
            if s and stripped.endswith(s):
                body, changed = stripped[: -len(s)], True
                break
    if not tools or len(body) > _MAX_PARSE:
        return body, []
    names = tool_names(tools)
    found = _find_calls(body, names)
    if found is None:
        return body, []
    rest, calls = found
    return (rest if rest.strip() else None), [_openai_call(n, a) for n, a in calls]


def _openai_call(name: str, args: dict) -> dict:
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def _accept(calls: list[tuple[str, dict]] | None, names: set[str]) -> list[tuple[str, dict]] | None:
    if calls and all(n in names for n, _ in calls):
        return calls
    return None


def _find_calls(body: str, names: set[str]) -> tuple[str, list[tuple[str, dict]]] | None:
    s = body.strip()
    for tag in ("<|python_tag|>", "<|python_start|>"):
        if s.startswith(tag):
            inner = s[len(tag):].replace("<|python_end|>", "").strip()
            calls = _accept(_calls_in(inner), names)
            if calls:
                return "", calls
            if "code_interpreter" in names:
                return "", [("code_interpreter", {"code": inner})]
            return None
    for pattern, reader in ((_FUNCTION_TAG, _function_tag_call), (_HERMES_TAG, _hermes_call)):
        matches = list(pattern.finditer(body))
        if matches:
            calls = _accept([c for c in (reader(m) for m in matches) if c is not None], names)
            if calls and len(calls) == len(matches):
                return pattern.sub("", body).strip(), calls
            return None
    calls = _accept(_calls_in(s), names)
    return ("", calls) if calls else None


def _calls_in(s: str) -> list[tuple[str, dict]] | None:
    return _json_calls(s) or _pythonic_calls(s) or _builtin_call(s)


def _function_tag_call(m: re.Match) -> tuple[str, dict] | None:
    args = _loads(m.group(2).strip() or "{}")
    return (m.group(1), args) if isinstance(args, dict) else None


def _hermes_call(m: re.Match) -> tuple[str, dict] | None:
    calls = _json_calls(m.group(1).strip())
    return calls[0] if calls and len(calls) == 1 else None


def _loads(s: str) -> Any:
    try:
        return json.loads(s)
    except (ValueError, RecursionError):
        return None


def _json_call(obj: Any) -> tuple[str, dict] | None:
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):
        obj = obj["function"]
    name = obj.get("name")
    args = obj.get("parameters", obj.get("arguments", {}))
    if isinstance(args, str):
        args = _loads(args) if args.strip() else {}
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    if set(obj) - {"type", "name", "parameters", "arguments", "id"}:
        return None
    return name, args


def _json_calls(s: str) -> list[tuple[str, dict]] | None:
    """One or more JSON call objects (separated by ';', ',' or whitespace), or a JSON list of them."""
    if not s.startswith(("{", "[")):
        return None
    decoder, pos, objs = json.JSONDecoder(), 0, []
    try:
        while pos < len(s):
            while pos < len(s) and s[pos] in " \t\r\n;,":
                pos += 1
            if pos >= len(s):
                break
            obj, pos = decoder.raw_decode(s, pos)
            objs.extend(obj if isinstance(obj, list) else [obj])
    except (ValueError, RecursionError):
        return None
    calls = [_json_call(o) for o in objs]
    return calls if calls and all(c is not None for c in calls) else None


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


_NAMED_CONSTANTS = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("** in a dict literal")
        return {str(_literal(k)): _literal(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) \
            and isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float)):
        return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
    if isinstance(node, ast.Name) and node.id in _NAMED_CONSTANTS:
        return _NAMED_CONSTANTS[node.id]
    raise ValueError(f"not a literal: {type(node).__name__}")


def _call(node: ast.AST) -> tuple[str, dict]:
    if not isinstance(node, ast.Call) or node.args:
        raise ValueError("not a call with keyword arguments only")
    name = _dotted(node.func)
    if name is None:
        raise ValueError("call target is not a name")
    if name.endswith(".call"):  # built-in tool form: brave_search.call(query="...")
        name = name[: -len(".call")]
    args = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise ValueError("**kwargs")
        args[kw.arg] = _literal(kw.value)
    return name, args


def _parse_expr(s: str) -> ast.AST | None:
    try:
        return ast.parse(s, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _pythonic_calls(s: str) -> list[tuple[str, dict]] | None:
    """`[f(a=1), g(b="x")]`: parsed, never evaluated."""
    if not (s.startswith("[") and s.endswith("]")):
        return None
    node = _parse_expr(s)
    if not isinstance(node, ast.List) or not node.elts:
        return None
    try:
        return [_call(e) for e in node.elts]
    except (ValueError, RecursionError):
        return None


def _builtin_call(s: str) -> list[tuple[str, dict]] | None:
    """`brave_search.call(query="...")` (Llama 3.1 built-in tools)."""
    if not re.match(r"^\w+\.call\(", s):
        return None
    node = _parse_expr(s)
    try:
        return [_call(node)] if node is not None else None
    except (ValueError, RecursionError):
        return None
