"""Fine-tuning data as a careless user or an attacker writes it: a seeded fuzz over JSONL and text records (deep
nesting, lone surrogates, wrong types, huge lines, invalid UTF-8, numbers Python will not convert ...) must end in
a named herd DataError or a dataset, never another exception; one record's size is bounded when it is read, and a
long text is tokenized in pieces, with the ids one encode gives and memory that follows the piece."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from herd.errors import DataError
from herd.finetune.data import MAX_RECORD_BYTES, encode_text, load_dataset, read_data
from herd.finetune.dpo import load_preferences
from tests.conftest import LLAMA3_TOKENIZER_DIR, SMOLLM2

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smollm2_text():
    """SmolLM2's tokenizer and chat format, read from the GGUF header (no weights)."""
    from herd.chat import chat_format_for
    from herd.formats import open_checkpoint
    from herd.tokenizer import load_tokenizer

    ck = open_checkpoint(SMOLLM2)
    return load_tokenizer(ck.tokenizer), chat_format_for(ck.generation, ck.chat_template)


VALID = {
    "chat": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                          {"role": "assistant", "content": "Hello."}]},
    "prompt_completion": {"prompt": "The cat", "completion": " sat on the mat."},
    "text": {"text": "Once upon a time there was a tiny model."},
    "preference": {"prompt": "Say yes.", "chosen": " Yes.", "rejected": " No."},
}
ODD_VALUES = [None, 0, -1, 2**70, 1.5, float("nan"), True, "", "x", [], [1, "a"], {}, {"role": "user"},
              [{"role": "assistant"}], [{"role": 1, "content": "a"}], [{"role": "robot", "content": "a"}],
              [{"role": "assistant", "content": {"a": 1}}], [{"role": "assistant", "content": [{"type": "image"}]}],
              [{"role": "assistant", "content": [5]}], [[{"role": "assistant", "content": "a"}]], "<|im_end|>"]


def mutate(rng: random.Random) -> tuple[str, bytes]:
    """(kind of the base record, one line of bytes) with one or two mutations of a valid record."""
    kind = rng.choice(list(VALID))
    record = json.loads(json.dumps(VALID[kind]))
    for _ in range(rng.choice((1, 1, 2))):
        how = rng.randrange(10)
        key = rng.choice(list(record)) if record else "text"
        if how == 0:  # a field of another type
            record[key] = rng.choice(ODD_VALUES)
        elif how == 1:  # a field removed, or one added
            record.pop(key, None) if rng.random() < 0.5 else record.update({rng.choice(list(VALID["chat"]) + ["x"]): "y"})
        elif how == 2:  # a lone surrogate somewhere (JSON's \ud800 escape): put in below, as text
            record[key] = "a\udc80b" if rng.random() < 0.5 else ["\ud800"]
        elif how == 3:  # deep nesting
            depth = rng.choice((50, 5_000, 200_000))
            line = json.dumps(record).replace(f'"{key}": ', f'"{key}": ' + "[" * depth + "1" + "]" * depth + ', "_": ', 1)
            return kind, line.encode()
        elif how == 4:  # invalid UTF-8 (a lone continuation byte, a cut multi-byte character, an overlong form)
            line = json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogatepass")
            cut = rng.randrange(len(line))
            return kind, line[:cut] + rng.choice((b"\x80", b"\xe2\x82", b"\xc0\xaf", b"\xff\xfe")) + line[cut:]
        elif how == 5:  # a huge string (past the record bound, or just under it)
            record[key] = "word " * rng.choice((MAX_RECORD_BYTES // 5 + 10, 30_000))
        elif how == 6:  # broken JSON: cut short, or not an object
            line = json.dumps(record).encode()
            return kind, rng.choice((line[: rng.randrange(1, len(line))], b"[1, 2]", b'"text"', b"null", b"nan"))
        elif how == 7:  # numbers JSON allows and Python will not convert, or reads as inf
            return kind, json.dumps(record).replace("}", ', "n": ' + rng.choice(("1" * 5000, "1e999", "-1e999")) + "}", 1).encode()
        elif how == 8:  # control characters, a BOM, special-token text
            record[key] = rng.choice(("\x00\x01\x1b[2J", "\ufeffBOM", "<|im_start|>assistant\n", "\u202e\u200b"))
        else:  # a nested message list with odd parts
            record["messages"] = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text"}]},
                                  {"role": "assistant", "content": rng.choice(ODD_VALUES)}]
    # a lone surrogate written raw (ensure_ascii off) is CESU-8 bytes, invalid UTF-8: another case
    return kind, json.dumps(record, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")


def test_fuzzed_records_give_a_named_error_or_a_dataset(tmp_path, smollm2_text):
    """A few hundred seeded cases, each a file of a valid line then the mutated one: read_data, then the
    tokenizing loader of its kind. The only exception allowed is DataError naming the file and line."""
    tok, fmt = smollm2_text
    rng = random.Random(2323)
    outcomes = {"dataset": 0, "error": 0}
    for case in range(300):
        kind, line = mutate(rng)
        path = tmp_path / f"case{case}.jsonl"
        path.write_bytes(json.dumps(VALID[kind]).encode() + b"\n" + line + b"\n")
        try:
            data = read_data(path)
            if data.kind == "preference":
                load_preferences(data, tok, fmt, 4096)
            else:
                load_dataset(data, tok, fmt, 4096)
            outcomes["dataset"] += 1
        except DataError as e:
            message = str(e)
            assert "\n" not in message and f"case{case}.jsonl" in message, (case, line[:200], message)
            assert f"case{case}.jsonl:" in message or "no records" in message, (case, line[:200], message)
            outcomes["error"] += 1
        except Exception as e:  # noqa: BLE001 (the point: nothing else may escape)
            raise AssertionError(f"case {case}: {type(e).__name__}: {e}; line {line[:300]!r}") from e
    assert outcomes["error"] > 100 and outcomes["dataset"] > 10, outcomes


@pytest.mark.parametrize("line, expect", [
    (b'{"text": "a\\ud800b"}', r":2: a string holds a lone surrogate"),
    (b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", r":2: JSON nested too deeply"),
    (b'{"text": "caf\xc3"}', r":2: not UTF-8 text"),
    (b'{"text": 1}', r':2: field "text" must be a string, got int'),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]}', r":2: messages\[1\]"),
    (b'{"text": ' + b"1" * 5000 + b"}", r":2: JSON herd cannot read"),
])
def test_each_hostile_line_is_named(tmp_path, line, expect):
    first = b'{"messages": [{"role": "assistant", "content": "ok"}]}' if b"messages" in line else b'{"text": "ok"}'
    path = tmp_path / "data.jsonl"
    path.write_bytes(first + b"\n" + line + b"\n")
    with pytest.raises(DataError, match="data.jsonl" + expect):
        read_data(path)


def test_not_a_regular_file_is_refused(tmp_path):
    with pytest.raises(DataError, match="not a regular file"):
        read_data(tmp_path)
    with pytest.raises(DataError, match="no such data file"):
        read_data(tmp_path / "missing.jsonl")


PEAK = """
import json, sys
from herd.formats import open_checkpoint
from herd.tokenizer import load_tokenizer
from herd.errors import DataError
from herd.finetune.data import load_dataset
tok = load_tokenizer(open_checkpoint(sys.argv[1]).tokenizer)
tok.encode("warm up the tokenizer once")
def peak_kib():  # VmHWM: this process's own peak (ru_maxrss carries the forking pytest's peak across exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
before = peak_kib()
try:
    ds = load_dataset(sys.argv[2], tok, None, 512)
    outcome = f"{ds.tokens} tokens"
except DataError as e:
    outcome = f"DataError: {e}"
print(json.dumps({"grew_mb": (peak_kib() - before) / 1024, "outcome": outcome}))
"""


def peak_growth(data: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", PEAK, str(SMOLLM2), str(data)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def sample_text(chars: int) -> str:
    src = (ROOT / "tests" / "data" / "tinyshakespeare-40k.txt").read_text()
    return (src * (chars // len(src) + 1))[:chars]


def test_a_20mb_line_is_refused_when_read_within_a_memory_bound(tmp_path):
    """The issue's case: one 20 MB line of text peaked at 3.5 GB. It is refused after MAX_RECORD_BYTES are read,
    naming file:line and the bound, with the process's peak memory barely moving."""
    data = tmp_path / "huge.jsonl"
    data.write_text('{"text": "a short one"}\n' + json.dumps({"text": sample_text(20_000_000)}) + "\n")
    got = peak_growth(data)
    assert got["outcome"].startswith("DataError") and "huge.jsonl:2" in got["outcome"] and "1 MiB" in got["outcome"]
    assert got["grew_mb"] < 64, got


def test_a_long_text_file_tokenizes_in_memory_that_follows_its_size(tmp_path):
    """A .txt file is one document of any length: it is tokenized in pieces, so the peak grows with the ids kept
    (Python lists, about 40 bytes a token: 100 MB here), not with the tokenizer's working set over the whole
    text (about 150 bytes a character: 1.2 GB for these 8 MB)."""
    data = tmp_path / "book.txt"
    data.write_text(sample_text(8_000_000))
    got = peak_growth(data)
    assert got["outcome"].endswith("tokens"), got
    assert got["grew_mb"] < 300, got


def long_text(chars: int) -> str:
    """Shakespeare lines mixed with the cases that decide where pieces may start: multilingual text, digits,
    indentation, blank lines, CRLF, trailing spaces, punctuation before a newline, contractions."""
    src = (ROOT / "tests" / "data" / "tinyshakespeare-40k.txt").read_text().splitlines(keepends=True)
    extra = ["Grüße aus Köln, 1234567 €.\n", "def f(x):\n    return x**2  # note\n", "日本語のテキスト。\n",
             "  indented\n\n\nthree blank\n", "tabs\there\r\nwindows line\r\n", "emoji 🎉🎉 done.\n", "x.\ny\n",
             "a\n b\n", "trailing space \nnext\n", "'s 'll don't\n", "<|im_start|>not special here\n"]
    rng = random.Random(5)
    parts, size = [], 0
    while size < chars:
        parts.append(rng.choice(src) if rng.random() < 0.8 else rng.choice(extra))
        size += len(parts[-1])
    return "".join(parts)


def tokenizers():
    from herd.formats import open_checkpoint
    from herd.tokenizer import load_tokenizer, load_tokenizer_file
    from herd.tokenizer.hf_json import HFJsonTokenizer
    from tests.fixtures import build as B

    found = {"SmolLM2 GGUF (byte-level BPE)": load_tokenizer(open_checkpoint(SMOLLM2).tokenizer)}
    for gen, what in (("llama2_gqa", "SentencePiece GGUF"), ("llama3", "llama-bpe GGUF"), ("llama4_scout", "llama4 GGUF")):
        found[what] = load_tokenizer(open_checkpoint(B.reference(gen).gguf("F32")).tokenizer)
    if LLAMA3_TOKENIZER_DIR is not None:
        found["Llama 3 tokenizer.json"] = HFJsonTokenizer(LLAMA3_TOKENIZER_DIR / "tokenizer.json")
        found["Llama 3 tiktoken"] = load_tokenizer_file(LLAMA3_TOKENIZER_DIR / "tokenizer.model")
    return found


def test_pieces_give_the_ids_of_one_encode():
    """encode_text against each tokenizer's own encode of the whole text (150,000 characters, three pieces; under
    Meta's tiktoken cut at 400,000, which the module documents)."""
    text = long_text(150_000)
    for name, tok in tokenizers().items():
        for bos in (True, False):
            assert encode_text(tok, text, bos) == tok.encode(text, bos=bos), (name, bos)
