"""The one tokenizer interface every format implements."""

from __future__ import annotations

from abc import ABC, abstractmethod


class Tokenizer(ABC):
    kind: str  # "sentencepiece" | "tiktoken" | "hf_json" | "gguf-llama" | "gguf-gpt2"
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    add_bos: bool  # whether plain-text prompts start with BOS by default
    stop_ids: frozenset[int]  # every id that ends a turn (EOS, <|eot_id|>, <|eom_id|>, <|eot|>, <|im_end|> ...)

    @abstractmethod
    def encode(self, text: str, bos: bool | None = None, eos: bool = False, special: bool = False) -> list[int]:
        """Text to ids. bos=None uses `add_bos`. special=True maps special-token text such as
        "<|eot_id|>" to its id (for rendered chat templates); special=False treats it as plain text."""

    @abstractmethod
    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """Ids to text; bytes that are not (yet) valid UTF-8 become U+FFFD."""

    @abstractmethod
    def special_id(self, text: str) -> int | None:
        """Id of a special/control token given its text ("<|eot_id|>"), or None if the vocab has none."""

    @abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry for an id, as stored (for display and debugging)."""

    def is_special(self, token_id: int) -> bool:
        return False


# Texts of the tokens that end a turn or a document in the vocabularies herd knows (Llama 3, Llama 4,
# ChatML, SentencePiece, GPT-2-style; llama.cpp also counts <|endoftext|> as end of generation).
END_OF_TURN_TEXTS = (
    "<|eot_id|>", "<|eom_id|>", "<|eot|>", "<|eom|>", "<|im_end|>", "<|end_of_text|>", "</s>", "<|endoftext|>",
)  # fmt: skip


def stop_ids_for(tokenizer: Tokenizer, *ids: int | None) -> frozenset[int]:
    """The given ids (EOS, EOT, EOM ...) plus every end-of-turn token the vocabulary holds."""
    found = (tokenizer.special_id(text) for text in END_OF_TURN_TEXTS)
    return frozenset(i for i in (*ids, *found) if i is not None)
