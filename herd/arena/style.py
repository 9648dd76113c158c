"""The style counts LMArena's style control uses: answer length in tokens and markdown elements.

The patterns are LMArena's (arena-hard-auto's add_markdown_info): headers `#`..`######` at a line start,
ordered (`1.`) and unordered (`-`, `*`, `+`) list items, bold `**...**` and `__...__` on one line.
"""

from __future__ import annotations

import re

HEADER = [re.compile(rf"^#{{{n}}}\s", re.MULTILINE) for n in range(1, 7)]
ORDERED = re.compile(r"^\s*\d+\.\s", re.MULTILINE)
UNORDERED = re.compile(r"^\s*[-*+]\s", re.MULTILINE)
BOLD_STARS = re.compile(r"\*\*[^*\n]+\*\*")
BOLD_UNDERSCORES = re.compile(r"__[^_\n]+__")
# Where no tokenizer counted an answer (an imported log without conv_metadata): words and punctuation.
WORDISH = re.compile(r"\w+|[^\w\s]")


def markdown_counts(text: str, suffix: str) -> dict:
    """conv_metadata's shape: header_count{suffix}: {h1..h6}, list_count{suffix}: {ordered, unordered},
    bold_count{suffix}: {"**", "__"}."""
    return {
        f"header_count{suffix}": {f"h{n}": len(p.findall(text)) for n, p in enumerate(HEADER, 1)},
        f"list_count{suffix}": {"ordered": len(ORDERED.findall(text)), "unordered": len(UNORDERED.findall(text))},
        f"bold_count{suffix}": {"**": len(BOLD_STARS.findall(text)), "__": len(BOLD_UNDERSCORES.findall(text))},
    }


def approximate_tokens(text: str) -> int:
    return len(WORDISH.findall(text))


def conv_metadata(conversation_a: list[dict], conversation_b: list[dict], tokens_a: int | None = None,
                  tokens_b: int | None = None) -> dict:
    """FastChat clean_battle's conv_metadata for two conversations; tokens_* are the answers' generated token
    counts where known (else approximate_tokens)."""
    def answers(conv):
        return "\n".join(m["content"] for m in conv if m.get("role") == "assistant")

    def user_text(conv):
        return "\n".join(m["content"] for m in conv if m.get("role") == "user")

    a, b = answers(conversation_a), answers(conversation_b)
    meta = {
        "sum_user_tokens": approximate_tokens(user_text(conversation_a)),
        "sum_assistant_a_tokens": tokens_a if tokens_a is not None else approximate_tokens(a),
        "sum_assistant_b_tokens": tokens_b if tokens_b is not None else approximate_tokens(b),
        "turns": sum(1 for m in conversation_a if m.get("role") == "user"),
    }
    meta.update(markdown_counts(a, "_a"))
    meta.update(markdown_counts(b, "_b"))
    return meta


def style_vector(meta: dict, side: str) -> tuple[float, ...]:
    """herd.arena.rating.STYLE_FEATURES of one side ("a"/"b") from conv_metadata (nested counts summed)."""
    def value(key):
        v = meta[key]
        return float(sum(v.values()) if isinstance(v, dict) else v)

    return (value(f"sum_assistant_{side}_tokens"), value(f"header_count_{side}"), value(f"list_count_{side}"),
            value(f"bold_count_{side}"))
