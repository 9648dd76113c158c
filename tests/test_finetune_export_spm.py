"""`herd export --to gguf` of a model whose tokenizer is a SentencePiece tokenizer.model (Llama 1/2): the vocabulary
goes into GGUF as llama.cpp's convert_hf_to_gguf.py writes it, checked against independent references: gguf-py
reads the keys (each piece, score and type as sentencepiece itself reports them, padding rows UNUSED), herd's GGUF
tokenizer encodes and decodes exactly as sentencepiece does, transformers gives the logits herd computes from the
file, and llama.cpp's llama-server (where benchmarks/llamacpp.py has built it) tokenizes as sentencepiece does."""

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch

import herd
from herd.cli import main
from tests.fixtures import build as B
from tests.test_tokenizers import TEXTS

EXTRA = ["the quick brown fox", " lazy  dog ", "  two\tspaces\n", "llamas123", ""]
VOCAB_ROWS = 416  # the embedding has rows past the 400 pieces: the converter's [PADi] tokens


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    """A tiny SentencePiece BPE model trained with Llama 2's settings (byte fallback, digits split)."""
    import sentencepiece

    rng = random.Random(1)
    words = "the quick brown fox jumps over lazy dog llama model token piece and of to in is".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice(".!?, ") for _ in range(2000)]
    lines += ["Numbers 12345 and 3.14159", "Ünïcödé façade naïve", "日本語のテキスト", "Привет мир"] * 20
    prefix = tmp_path_factory.mktemp("spm") / "tokenizer"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def exported(spm_model, tmp_path_factory):
    """A tiny Llama 2 HF directory carrying the tokenizer.model, exported to GGUF F32 by `herd export`."""
    import shutil

    from transformers import LlamaForCausalLM

    cfg = B.hf_config("llama2_gqa")
    cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id = VOCAB_ROWS, 1, 2
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    root = tmp_path_factory.mktemp("export")
    src = root / "hf"
    model.save_pretrained(src)
    shutil.copyfile(spm_model, src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": False}))
    out = root / "model.gguf"
    assert main(["export", str(src), "--to", "gguf", "--gguf-type", "F32", str(out)]) in (0, None)
    return model, out


def test_gguf_keys_are_the_converters(spm_model, exported):
    import gguf
    import numpy as np
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    _, out = exported
    fields = {k: f.contents() for k, f in gguf.GGUFReader(str(out)).fields.items()}
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.pre"] == "default"
    tokens, scores, types = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    assert len(tokens) == len(scores) == len(types) == VOCAB_ROWS
    T = gguf.TokenType
    for i in range(sp.GetPieceSize()):
        assert tokens[i] == sp.IdToPiece(i) and scores[i] == np.float32(sp.GetScore(i)), i
        want = (T.UNKNOWN if sp.IsUnknown(i) else T.CONTROL if sp.IsControl(i) else T.BYTE if sp.IsByte(i)
                else T.NORMAL)
        assert types[i] == want, (i, tokens[i])
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)]
    assert all(types[i] == T.BYTE for i in range(3, 259))
    assert tokens[400:] == [f"[PAD{i}]" for i in range(400, VOCAB_ROWS)]
    assert set(types[400:]) == {T.UNUSED} and set(scores[400:]) == {-10000.0}
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False
    assert "tokenizer.ggml.add_space_prefix" not in fields  # llama.cpp's default (true) is the model's


def test_herd_reads_the_export_with_sentencepieces_tokens_and_transformers_logits(spm_model, exported):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    model, out = exported
    llm = herd.load(out, dtype="float32")
    tok = llm.tokenizer
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True)
    for text in TEXTS + EXTRA:
        want = sp.encode(text)
        assert tok.encode(text, bos=False) == want, text
        assert tok.encode(text)[0] == 1
        assert tok.decode(want) == sp.decode(want), text
    ids = torch.tensor([1] + sp.encode("the lazy llama jumps over the quick fox"))
    with torch.no_grad():
        want = model(input_ids=ids[None]).logits[0]
    assert (llm.logits(ids) - want).abs().max().item() < 1e-4


def test_llama_cpp_tokenizes_the_export_as_sentencepiece_does(spm_model, exported):
    import sentencepiece

    from tests.fixtures.llamacpp import llama_server

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    _, out = exported
    with llama_server(out, context=256, threads=1) as post:
        for text in TEXTS + EXTRA:
            if not text:
                continue
            want = sp.encode(text)
            assert post("/tokenize", {"content": text, "add_special": False})["tokens"] == want, text
        assert post("/tokenize", {"content": "hi", "add_special": True})["tokens"][0] == 1


# -- the other way: a SentencePiece vocabulary written as an HF tokenizer.json ------------------------------------


def _auto_tokenizer(path, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), **kwargs)


def _spm_texts():
    return [t for t in TEXTS + EXTRA if t]


def test_hf_export_writes_a_tokenizer_json_that_transformers_reads_as_sentencepiece(spm_model, exported, tmp_path):
    """HF (tokenizer.model) → HF: the export carries a tokenizer.json beside the copied tokenizer.model, and
    transformers' AutoTokenizer on it gives sentencepiece's ids, BOS first, and its text back."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    _, gguf_path = exported
    out = tmp_path / "hf"
    assert main(["export", str(gguf_path.parent / "hf"), "--to", "hf", str(out)]) in (0, None)
    assert (out / "tokenizer.model").read_bytes() == spm_model.read_bytes()
    tok = _auto_tokenizer(out)
    for text in _spm_texts():
        assert tok(text)["input_ids"] == [1, *sp.encode(text)], text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)


def test_gguf_llama_vocabulary_exports_to_hf_and_back(spm_model, exported, tmp_path):
    """GGUF "llama" vocabulary → HF → GGUF. transformers reads the HF export with sentencepiece's ids; the GGUF
    written back from it has the same tokens, types and special ids (gguf-py), and herd's tokenizer over it
    sentencepiece's ids. A tokenizer.json holds no scores: they come back as the order of the merges."""
    import gguf
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    _, gguf_path = exported
    hf, back = tmp_path / "hf", tmp_path / "back.gguf"
    assert main(["export", str(gguf_path), "--to", "hf", str(hf)]) in (0, None)
    assert not (hf / "tokenizer.model").exists()
    tok = _auto_tokenizer(hf)
    for text in _spm_texts():
        assert tok(text)["input_ids"] == [1, *sp.encode(text)], text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text
    assert main(["export", str(hf), "--to", "gguf", "--gguf-type", "F32", str(back)]) in (0, None)
    want, got = ({k: f.contents() for k, f in gguf.GGUFReader(str(p)).fields.items() if k.startswith("tokenizer.")}
                 for p in (gguf_path, back))
    assert got.keys() == want.keys()
    for key in want:
        if key != "tokenizer.ggml.scores":
            assert got[key] == want[key], key
    llm = herd.load(back, dtype="float32")
    assert llm.tokenizer.kind == "gguf-llama"
    for text in _spm_texts():
        assert llm.tokenizer.encode(text, bos=False) == sp.encode(text), text


def test_added_tokens_of_tokenizer_config_join_the_tokenizer_json_at_their_ids(spm_model):
    """tokenizer_config.json's added_tokens_decoder past the model's pieces (a chat model's <|pad|>, a tool
    marker) become added tokens at their ids: a special one cuts the text, each stretch tokenized as
    sentencepiece tokenizes it alone; ids that leave a gap cannot be stated, and no tokenizer.json is made."""
    import sentencepiece
    from tokenizers import Tokenizer as HFTokenizer

    from herd.tokenizer.hf_files import sentencepiece_tokenizer_files

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    data = spm_model.read_bytes()
    added = {"400": {"content": "<|pad|>", "special": True}, "401": {"content": "<tool>", "special": False},
             "1": {"content": "<s>", "special": True}}
    text, config = sentencepiece_tokenizer_files(data, spm_model, {"added_tokens_decoder": added})
    tok = HFTokenizer.from_str(text)
    assert (tok.token_to_id("<|pad|>"), tok.token_to_id("<tool>")) == (400, 401)
    assert tok.encode("the fox<|pad|>lazy dog").ids == [1, *sp.encode("the fox"), 400, *sp.encode("lazy dog")]
    assert 401 in tok.encode("a <tool> b").ids
    assert config["add_bos_token"] is True and config["bos_token"] == "<s>"
    gap = {"402": {"content": "<|pad|>", "special": True}}
    assert sentencepiece_tokenizer_files(data, spm_model, {"added_tokens_decoder": gap}) is None


@pytest.mark.parametrize("kind", ["unigram", "bpe-nfkc"])
def test_a_sentencepiece_model_beyond_llamas_gets_no_tokenizer_json(tmp_path, kind):
    """Only BPE merges over text as it is (Llama's normalizer "identity") can be written as this tokenizer.json:
    a unigram model, or one that rewrites text first (NFKC), is left to its tokenizer.model."""
    import sentencepiece

    from herd.formats.checkpoint import TokenizerSource
    from herd.tokenizer.hf_files import hf_tokenizer_files

    lines = ["the quick brown fox jumps over the lazy dog", "a llama and a model of tokens"] * 50
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "m"), vocab_size=30, minloglevel=2,
        model_type="unigram" if kind == "unigram" else "bpe",
        normalization_rule_name="identity" if kind == "unigram" else "nmt_nfkc")
    assert hf_tokenizer_files(TokenizerSource("sentencepiece", tmp_path / "m.model")) is None
