"""Text <-> token ids behind one interface, whatever the model shipped.

Implementations: SentencePiece `tokenizer.model` (Llama 1/2), tiktoken-format `tokenizer.model`
(Llama 3/4), HF `tokenizer.json`, and the vocabulary embedded in a GGUF file.
"""
