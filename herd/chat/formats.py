"""Built-in chat formats: Llama 2 [INST], the Llama 3 header format (3, 3.1, 3.2, 3.3) and Llama 4.

Each format turns OpenAI-shaped messages into a list of pieces: plain text, or `Special` control tokens.
Text is encoded with special=False, so message content can never forge a control token; control
tokens are looked up by id. Adjacent text pieces are encoded together, which gives exactly the ids of
tokenizing the whole documented prompt string (the tokenizer splits at special tokens first).

References: meta-llama/llama `generation.py` (Llama 2), llama-models `llama3/chat_format.py`,
`llama4/chat_format.py`, `llama3/prompt_templates/system_prompts.py` and the prompt_format.md files.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Sequence

from herd.errors import TemplateError
from herd.tokenizer.base import Tokenizer

ROLES = ("system", "user", "assistant", "tool", "ipython")


@dataclass(frozen=True)
class Special:
    """A control token, written as its text; `fallback` names the tokenizer attribute ("bos"/"eos")
    used when the vocabulary has no special token with that text."""

    text: str
    fallback: str | None = None



IMAGE_MARK = "\U000f0002"  # where an image part stood in a message's text (never kept from user text)
IMAGE_TOKEN = "<|image|>"  # what every format writes for an image; the model's own layout replaces it


def content_text(content: Any, where: str = "message") -> str:
    """The text of a message's content: a string, None (""), or a list of {"type": "text"} parts; an
    {"type": "image"} part (herd.chat.extract_images makes them) is IMAGE_MARK."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part.replace(IMAGE_MARK, ""))
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"].replace(IMAGE_MARK, ""))
            elif isinstance(part, dict) and part.get("type") == "image" and set(part) == {"type"}:
                parts.append(IMAGE_MARK)
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise TemplateError(f"{where}: content part of type {kind!r} is not supported: this model takes "
                                    "text only ({'type': 'text', 'text': ...} parts)")
        return "".join(parts)
    raise TemplateError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")


IMAGE_PART_TYPES = ("image_url", "image", "input_image")


def extract_images(messages: Sequence[dict]) -> tuple[list[dict], list[Any]]:
    """Messages with each image part replaced by a bare {"type": "image"} part, and the images' sources in
    order: the URL of an OpenAI {"type": "image_url", "image_url": {"url": ...}} part (a data URL, a file
    path or an http(s) URL), or the `image`/`path`/`url` of an HF-style {"type": "image", ...} part."""
    if not isinstance(messages, (list, tuple)):
        return messages, []
    out, sources = [], []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str) and IMAGE_MARK in content:  # text can never stand for an image
            m = {**m, "content": content.replace(IMAGE_MARK, "")}
        if not isinstance(content, (list, tuple)) or not any(
                isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES for p in content):
            out.append(m)
            continue
        parts = []
        for j, p in enumerate(content):
            if not (isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES):
                parts.append(p)
                continue
            ref = p.get("image_url", p.get("image", p.get("path", p.get("url"))))
            if isinstance(ref, dict):
                ref = ref.get("url")
            if ref is None or (isinstance(ref, str) and not ref):
                raise TemplateError(f"messages[{i}].content[{j}]: an image part needs its image "
                                    "({'type': 'image_url', 'image_url': {'url': 'data:image/png;base64,...'}})")
            sources.append(ref)
            parts.append({"type": "image"})
        out.append({**m, "content": parts})
    return out, sources


def llama4_image_tokens(arrangement: tuple[int, int], patches_per_tile: int) -> list[str]:
    """Llama 4's tokens for one image (llama-models llama4/chat_format.py _encode_image): with more than one
    tile, each tile's <|patch|> tokens row by row, <|tile_x_separator|> between columns and
    <|tile_y_separator|> after each row; then <|image|> and the global tile's patches."""
    rows, cols = arrangement
    out = ["<|image_start|>"]
    if rows * cols > 1:
        for _ in range(rows):
            for col in range(cols):
                out += ["<|patch|>"] * patches_per_tile
                if col < cols - 1:
                    out.append("<|tile_x_separator|>")
            out.append("<|tile_y_separator|>")
    return out + ["<|image|>"] + ["<|patch|>"] * patches_per_tile + ["<|image_end|>"]


def tool_result_text(content: Any, where: str) -> str:
    """A tool result's text: strings and text parts as is, other JSON values as JSON."""
    if isinstance(content, dict) or (isinstance(content, list) and not all(
            isinstance(p, str) or (isinstance(p, dict) and p.get("type") == "text") for p in content)):
        return json.dumps(content, ensure_ascii=False)
    return content_text(content, where)


def openai_messages(messages: Sequence[dict]) -> list[dict]:
    """OpenAI-shaped messages as every chat format takes them: roles checked, and content given as a
    list of text parts joined into one string (Jinja templates mostly expect a string; a part they cannot
    show, such as an image, is refused rather than dropped). "developer" is OpenAI's newer name for
    "system". The caller's dicts are not changed."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TemplateError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise TemplateError(f"{where} must be a dict, got {type(m).__name__}")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ROLES:
            raise TemplateError(f"{where}: role {m.get('role')!r} is not one of {', '.join(ROLES)} (or developer)")
        m = {**m, "role": role}
        content = m.get("content")
        if isinstance(content, (list, tuple)):
            texts = all(isinstance(p, str) or (isinstance(p, dict) and p.get("type", "text") in ("text", "image"))
                        for p in content)
            if role not in ("tool", "ipython") or texts:  # a tool result may be any JSON value: kept as it is
                m["content"] = content_text(content, where)
        out.append(m)
    return out


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass
class Message:
    role: str
    text: str
    tool_calls: list[ToolCall]


def normalize_messages(messages: Sequence[dict]) -> list[Message]:
    """Check OpenAI-shaped messages (openai_messages) and reduce them to role, text and parsed tool calls."""
    out = []
    for i, m in enumerate(openai_messages(messages)):
        where, role = f"messages[{i}]", m["role"]
        text = tool_result_text(m.get("content"), where) if role in ("tool", "ipython") else \
            content_text(m.get("content"), where)
        calls = []
        for j, call in enumerate(m.get("tool_calls") or ()):
            if role != "assistant":
                raise TemplateError(f"{where}: only assistant messages carry tool_calls")
            calls.append(_parse_call(call, f"{where}.tool_calls[{j}]"))
        out.append(Message(role, text, calls))
    return out


def _parse_call(call: Any, where: str) -> ToolCall:
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise TemplateError(f"{where} must look like {{'type': 'function', 'function': {{'name': ..., "
                            "'arguments': '<JSON object>'}}")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise TemplateError(f"{where}: arguments are not valid JSON ({e}): {args[:200]!r}") from None
    if not isinstance(args, dict):
        raise TemplateError(f"{where}: arguments must be a JSON object, got {type(args).__name__}")
    return ToolCall(fn["name"], args)


@dataclass(frozen=True)
class EndOfTurn:
    """What ends an assistant turn: token ids (never part of the text) and strings (cut from the text,
    for templates whose end marker is not one token)."""

    token_ids: frozenset[int]
    texts: tuple[str, ...]


class ChatFormat(ABC):
    """How one model family lays out a conversation, and what ends an assistant turn."""

    name: str
    generation: str | None = None
    stop_texts: tuple[str, ...] = ()

    @abstractmethod
    def render(self, messages: Sequence[dict], tokenizer: Tokenizer, tools: list[dict] | None = None,
               add_generation_prompt: bool = True) -> list[int]:
        """Messages (and tools) to prompt token ids."""

    @abstractmethod
    def render_text(self, messages: Sequence[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True) -> str:
        """The same prompt as text, control tokens written out (for display and tests)."""

    def stop_token_ids(self, tokenizer: Tokenizer, eos_ids: Iterable[int] = ()) -> frozenset[int]:
        """Ids that end an assistant turn: the format's stop texts the vocabulary has, the tokenizer's own
        EOS and stop ids, and the checkpoint's declared `eos_ids`."""
        ids = {i for i in (tokenizer.special_id(t) for t in self.stop_texts) if i is not None}
        ids |= set(getattr(tokenizer, "stop_ids", ()) or ())
        ids |= set(eos_ids)
        if tokenizer.eos_id is not None:
            ids.add(tokenizer.eos_id)
        return frozenset(ids)

    def end_of_turn(self, tokenizer: Tokenizer, eos_ids: Iterable[int] = ()) -> EndOfTurn:
        """The one place that decides where a reply in this format ends (herd.api and the server ask here)."""
        return EndOfTurn(self.stop_token_ids(tokenizer, eos_ids), tuple(self.stop_texts))


class PiecesFormat(ChatFormat):
    """A built-in format described as a list of text and Special pieces."""

    @abstractmethod
    def pieces(self, messages: Sequence[dict], tools: list[dict] | None,
               add_generation_prompt: bool) -> list[str | Special]:
        ...

    def render_text(self, messages, tools=None, add_generation_prompt=True) -> str:
        return "".join(p.text if isinstance(p, Special) else p for p in self.pieces(messages, tools,
                                                                                     add_generation_prompt))

    def render(self, messages, tokenizer, tools=None, add_generation_prompt=True) -> list[int]:
        return encode_pieces(self.pieces(messages, tools, add_generation_prompt), tokenizer, self.name)


def encode_pieces(pieces: Iterable[str | Special], tokenizer: Tokenizer, fmt_name: str) -> list[int]:
    ids: list[int] = []
    text: list[str] = []

    def flush():
        if text:
            for k, joined in enumerate("".join(text).split(IMAGE_MARK)):
                if k:
                    ids.append(special_id(tokenizer, Special(IMAGE_TOKEN), fmt_name))
                if joined:
                    ids.extend(tokenizer.encode(joined, bos=False, eos=False, special=False))
            text.clear()

    for p in pieces:
        if isinstance(p, Special):
            flush()
            ids.append(special_id(tokenizer, p, fmt_name))
        else:
            text.append(p)
    flush()
    return ids


def special_id(tokenizer: Tokenizer, token: Special, fmt_name: str) -> int:
    i = tokenizer.special_id(token.text)
    if i is None and token.fallback:
        i = getattr(tokenizer, f"{token.fallback}_id", None)
    if i is None:
        raise TemplateError(f"the {fmt_name} chat format needs the control token {token.text!r}, which this "
                            f"tokenizer ({getattr(tokenizer, 'kind', type(tokenizer).__name__)}) does not have; "
                            "is the tokenizer from a different Llama generation?")
    return i


# -- Llama 2 ------------------------------------------------------------------------------------------------


class Llama2Format(PiecesFormat):
    """Llama 2 chat (also used for Llama 1): `<s>[INST] {user} [/INST] {answer} </s>` per turn, the
    system prompt folded into the first user turn inside <<SYS>> markers, content stripped. Each turn
    is encoded on its own with BOS (and EOS after an answer), as Meta's generation.py does, so each
    gets SentencePiece's dummy-prefix space. `[INST]` and `<<SYS>>` are plain text, not control tokens.
    With add_generation_prompt=False the output is the same: `[/INST]` already asks for the answer."""

    name = "llama2"
    stop_texts = ("</s>",)
    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

    def __init__(self, generation: str = "2"):
        self.generation = generation

    def pieces(self, messages, tools, add_generation_prompt):
        if tools:
            raise TemplateError("the Llama 2 chat format has no tool calling; pass tools only to Llama 3.1+ "
                                "models or to a model whose chat template supports them")
        msgs = normalize_messages(messages)
        if msgs[0].role == "system":
            if len(msgs) < 2 or msgs[1].role != "user":
                raise TemplateError("Llama 2 chat: a system message must be followed by a user message")
            msgs = [Message("user", self.B_SYS + msgs[0].text + self.E_SYS + msgs[1].text, [])] + msgs[2:]
        for i, m in enumerate(msgs):
            want = "user" if i % 2 == 0 else "assistant"
            if m.role != want or m.tool_calls:
                raise TemplateError(f"Llama 2 chat: roles must alternate user/assistant/user/... (one optional "
                                    f"system message first); message {i} after folding the system prompt is "
                                    f"{m.role!r}, expected {want!r}")
        bos, eos = Special("<s>", "bos"), Special("</s>", "eos")
        out: list[str | Special] = []
        for user, answer in zip(msgs[::2], msgs[1::2]):
            out += [bos, f"{self.B_INST} {user.text.strip()} {self.E_INST} {answer.text.strip()} ", eos]
        if len(msgs) % 2 == 1:
            out += [bos, f"{self.B_INST} {msgs[-1].text.strip()} {self.E_INST}"]
        return out


# -- Llama 3 and 4: header formats ----------------------------------------------------------------------------


class HeaderFormat(PiecesFormat):
    """`BOS <header>role</header>\\n\\n{content}<end>` per message, `<header>assistant</header>\\n\\n` to
    prompt the answer. Subclasses give the token names and the tool-calling conventions."""

    BOS = "<|begin_of_text|>"
    HEADER_START = HEADER_END = EOT = EOM = ""
    strip_content = False

    def __init__(self, generation: str, today: str | None = None):
        self.generation = generation
        self.today = today  # "21 September 2024"; None = the current date (Meta's "%d %B %Y")

    def today_text(self) -> str:
        return self.today or datetime.now().strftime("%d %B %Y")

    def header(self, role: str) -> list[str | Special]:
        return [Special(self.HEADER_START), "ipython" if role == "tool" else role, Special(self.HEADER_END), "\n\n"]

    def pieces(self, messages, tools, add_generation_prompt):
        msgs = normalize_messages(messages)
        if tools:
            msgs = self.with_tools(msgs, list(tools))
        out: list[str | Special] = [Special(self.BOS, "bos")]
        for m in msgs:
            out += self.header(m.role)
            out += self.body(m)
        if add_generation_prompt:
            out += self.header("assistant")
        return out

    def body(self, m: Message) -> list[str | Special]:
        text = m.text.strip() if self.strip_content else m.text
        if m.role == "assistant" and m.tool_calls:
            return ([text] if text else []) + self.tool_call_pieces(m.tool_calls) + [Special(self.EOM)]
        return [text, Special(self.end_token(m.role))]

    def end_token(self, role: str) -> str:
        """The token that ends a message without tool calls."""
        return self.EOT

    @abstractmethod
    def with_tools(self, msgs: list[Message], tools: list[dict]) -> list[Message]:
        """The conversation with the tool definitions placed where the generation expects them."""

    @abstractmethod
    def tool_call_pieces(self, calls: list[ToolCall]) -> list[str | Special]:
        """An assistant's tool calls, written the way the model emits them."""


class Llama3Format(HeaderFormat):
    """Llama 3 / 3.1 / 3.2 / 3.3 (`<|start_header_id|>`...`<|eot_id|>`).

    3.0: content is stripped (meta-llama/llama3 ChatFormat); there is no tool calling.
    3.1+: content is kept as is (llama-models ChatFormat); tool results use the `ipython` role.
    With tools (Meta's recommended 3.1 system prompt, `recommended_system_message`):
      system = "Environment: ipython\\n" [+ "Tools: brave_search, wolfram_alpha\\n" for built-in tools]
               + "Cutting Knowledge Date: December 2023\\nToday Date: {today}" [+ "\\n\\n" + system prompt] + "\\n"
      then, for custom (function) tools, a user message with Meta's JSON tool list (JsonCustomToolGenerator),
      exactly as in llama3_1/prompt_format.md ("Instructions for tools added as a user message").
    Assistant tool calls are written as the model emits them: `<|python_tag|>{"type": "function", "name": ...,
    "parameters": {...}}<|eom_id|>` (several calls joined by "; "); built-in tools as
    `<|python_tag|>brave_search.call(query="...")<|eom_id|>`; code_interpreter as `<|python_tag|>{code}<|eom_id|>`.
    3.2 uses this same JSON form (Meta documents a pythonic `[f(x=1)]` alternative for 3.2; parse_reply reads
    both), so a 3.2 conversation renders exactly like 3.1.
    """

    name = "llama3"
    HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
    EOT, EOM, PYTHON_TAG = "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"
    stop_texts = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")

    def __init__(self, generation: str = "3.1", today: str | None = None):
        super().__init__(generation, today)
        self.strip_content = generation == "3"

    def pieces(self, messages, tools, add_generation_prompt):
        if self.generation == "3":
            msgs = normalize_messages(messages)
            if tools or any(m.tool_calls or m.role in ("tool", "ipython") for m in msgs):
                raise TemplateError("Llama 3.0 has no tool-calling format (tools and the ipython role arrived "
                                    "with Llama 3.1); use a 3.1+ model or a chat template that defines one")
        return super().pieces(messages, tools, add_generation_prompt)

    def with_tools(self, msgs, tools):
        from herd.chat.tools import BUILTIN_TOOLS, json_tools_prompt, llama31_system_prompt, split_tools

        builtin, custom = split_tools(tools)
        instruction = None
        if msgs and msgs[0].role == "system":
            instruction, msgs = msgs[0].text, msgs[1:]
        system = llama31_system_prompt([b for b in builtin if b in BUILTIN_TOOLS], bool(custom), self.today_text(),
                                       instruction)
        extra = [Message("user", json_tools_prompt(custom), [])] if custom else []
        return [Message("system", system, [])] + extra + msgs

    def tool_call_pieces(self, calls):
        from herd.chat.tools import encode_call_llama31

        return [Special(self.PYTHON_TAG), "; ".join(encode_call_llama31(c.name, c.arguments) for c in calls)]


class Llama4Format(HeaderFormat):
    """Llama 4 (`<|header_start|>`...`<|eot|>`); content is not stripped.

    Tools go in the system message as Meta's documented zero-shot prompt (llama4/prompt_format.md,
    "Zero shot function calling - system message"), followed by "\\n" and the caller's system prompt if any.
    Assistant tool calls are the pythonic list the model emits, `[get_weather(city="SF"), ...]`;
    code_interpreter calls are wrapped in `<|python_start|>...<|python_end|>`. As in the current
    llama-models ChatFormat, an assistant message with tool calls and a tool result (role ipython)
    end with `<|eom|>`; everything else ends with `<|eot|>`.
    """

    name = "llama4"
    HEADER_START, HEADER_END = "<|header_start|>", "<|header_end|>"
    EOT, EOM = "<|eot|>", "<|eom|>"
    PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"
    stop_texts = ("<|eot|>", "<|eom|>", "<|end_of_text|>")

    def __init__(self, generation: str = "4", today: str | None = None):
        super().__init__(generation, today)

    def end_token(self, role):
        return self.EOM if role in ("tool", "ipython") else self.EOT

    def with_tools(self, msgs, tools):
        from herd.chat.tools import functions, llama4_tools_prompt

        instruction = None
        if msgs and msgs[0].role == "system":
            instruction, msgs = msgs[0].text, msgs[1:]
        system = llama4_tools_prompt(functions(tools))
        if instruction:
            system += "\n" + instruction
        return [Message("system", system, [])] + msgs

    def tool_call_pieces(self, calls):
        from herd.chat.tools import encode_calls_pythonic

        out: list[str | Special] = []
        plain = [c for c in calls if c.name != "code_interpreter"]
        for c in calls:
            if c.name == "code_interpreter":
                out += [Special(self.PYTHON_START), str(c.arguments.get("code", "")), Special(self.PYTHON_END)]
        if plain:
            out.append(encode_calls_pythonic([(c.name, c.arguments) for c in plain]))
        return out


GENERATIONS = ("1", "2", "3", "3.1", "3.2", "3.3", "4")


def normalize_generation(generation: Any) -> str | None:
    if generation is None:
        return None
    g = str(generation).strip().lower()
    for prefix in ("llama-", "llama_", "llama"):
        if g.startswith(prefix):
            g = g[len(prefix):]
            break
    return g


def builtin_format(generation: Any, today: str | None = None) -> ChatFormat:
    """The built-in chat format of a Llama generation ("1", "2", "3", "3.1", "3.2", "3.3", "4")."""
    g = normalize_generation(generation)
    if g in ("1", "2"):
        return Llama2Format(g)
    if g in ("3", "3.1", "3.2", "3.3"):
        return Llama3Format(g, today=today)
    if g == "4":
        return Llama4Format(g, today=today)
    raise TemplateError(f"no chat template came with the model and herd has no built-in chat format for "
                        f"generation {generation!r}; built-in formats exist for generations {', '.join(GENERATIONS)} "
                        "(Llama 1/2 [INST], Llama 3.x header tokens, Llama 4). Supply a Jinja chat template "
                        "(tokenizer_config.json `chat_template` or GGUF `tokenizer.chat_template`).")
