"""Messages ↔ prompt tokens for every Llama generation.

    fmt = chat_format_for(checkpoint.generation, checkpoint.chat_template)
    ids = render(messages, tokenizer, fmt, tools=tools)
    ... generate until a token in fmt.stop_token_ids(tokenizer) ...
    content, tool_calls = parse_reply(text, fmt, tools)

Messages are OpenAI-shaped dicts: role (system/user/assistant/tool/ipython), content (a string or a list
of {"type": "text", "text": ...} parts), and for assistants optional tool_calls
([{"id", "type": "function", "function": {"name", "arguments": "<JSON>"}}]). A Jinja template shipped
with the model wins; otherwise the built-in format of the generation is used (see herd.chat.formats).
"""

from __future__ import annotations

from typing import Sequence

from herd.chat.formats import (
    IMAGE_TOKEN,
    extract_images,
    llama4_image_tokens,
    GENERATIONS,
    ChatFormat,
    Llama2Format,
    Llama3Format,
    Llama4Format,
    builtin_format,
    openai_messages,
)
from herd.chat.tools import parse_reply
from herd.tokenizer.base import Tokenizer


def chat_format_for(generation: str | None, template: str | None = None, *, today: str | None = None) -> ChatFormat:
    """The chat format for a model: its own Jinja template when it ships one (GGUF `tokenizer.chat_template`,
    HF `chat_template`), else the built-in format of its Llama generation ("1", "2", "3", "3.1", "3.2",
    "3.3", "4"). Raises herd.errors.TemplateError for an unknown generation without a template, or for a
    template that does not compile. `today` ("21 September 2024") fixes the date Llama 3.1+ tool prompts show."""
    if template is not None and template.strip():
        from herd.chat.template import TemplateFormat

        return TemplateFormat(template, generation=generation)
    return builtin_format(generation, today=today)


def render(messages: Sequence[dict], tokenizer: Tokenizer, fmt: ChatFormat, tools: list[dict] | None = None,
           add_generation_prompt: bool = True) -> list[int]:
    """Prompt token ids for `messages` (and OpenAI-shaped `tools`) in chat format `fmt`, ending with the
    assistant header when add_generation_prompt. Raises herd.errors.TemplateError on bad input (an
    unknown role, a content part that is not text)."""
    return fmt.render(openai_messages(messages), tokenizer, tools=tools, add_generation_prompt=add_generation_prompt)


def __getattr__(name: str):
    if name == "TemplateFormat":  # jinja2 is imported only when a template is used
        from herd.chat.template import TemplateFormat

        return TemplateFormat
    raise AttributeError(f"module 'herd.chat' has no attribute {name!r}")


__all__ = ["extract_images", "llama4_image_tokens", "IMAGE_TOKEN", "chat_format_for", "render", "openai_messages", "parse_reply", "ChatFormat", "Llama2Format", "Llama3Format",
           "Llama4Format", "TemplateFormat", "GENERATIONS"]
