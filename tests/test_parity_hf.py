"""herd logits vs Hugging Face transformers on tiny random models of every generation, through the real loader.

The reference is transformers' own LlamaForCausalLM / Llama4ForCausalLM in float32 (eager attention), built and
saved by tests/fixtures/build.py. Run with `pytest -s` to see the max |Δ| per generation.
"""

import json
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `herd` and `tests.fixtures`

import pytest
import torch
from safetensors.torch import load_file, save_file

import herd
from tests.fixtures import build as B

TOL = 1e-4  # float32 vs float32: only summation order differs

CPU_F32 = {"device": "cpu", "dtype": torch.float32}  # the reference runs there; herd's defaults are not under test
_LOADED: dict[str, object] = {}


def load(path):
    """herd.load, once per path and process."""
    key = str(path)
    if key not in _LOADED:
        _LOADED[key] = herd.load(key, **CPU_F32)
    return _LOADED[key]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("gen", B.GENERATIONS)
def test_logits_match_hf(gen):
    ref = B.reference(gen)
    llm = load(ref.hf_dir)
    ids = B.tokens(gen)  # B.SEQ_LEN = 40 > 3 chunks of 8; temperature floor 4 reached
    want = ref.logits(ids)
    got = llm.logits(ids.tolist())
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    assert tuple(got.shape) == (B.SEQ_LEN, B.SPECS[gen].vocab)
    diff = max_diff(got, want)
    print(f"{gen}: max|Δ| = {diff:.2e}")
    assert diff < TOL, f"{gen}: herd vs HF max|Δ| = {diff:.3e}"
    prefix = llm.logits(ids[:12])  # a LongTensor [T] works too, and a causal model's prefix keeps its logits
    assert tuple(prefix.shape) == (12, B.SPECS[gen].vocab) and max_diff(prefix, want[:12]) < TOL


@pytest.mark.parametrize("gen", B.GENERATIONS)
def test_batch_matches_hf(gen):
    ref = B.reference(gen)
    llm = load(ref.hf_dir)
    ids = B.tokens(gen, batch=2)
    want = ref.logits(ids)
    got = llm.logits(ids)
    assert got.dtype == torch.float32 and tuple(got.shape) == (2, B.SEQ_LEN, B.SPECS[gen].vocab)
    diff = max_diff(got, want)
    print(f"{gen} [2, {B.SEQ_LEN}]: max|Δ| = {diff:.2e}")
    assert diff < TOL, f"{gen}: batched herd vs HF max|Δ| = {diff:.3e}"


@pytest.mark.parametrize("gen", B.GENERATIONS)
def test_sharded_safetensors_equal(gen):
    ref = B.reference(gen)
    assert (ref.sharded_dir() / "model.safetensors.index.json").exists()
    plain, sharded = load(ref.hf_dir), load(ref.sharded_dir())
    assert sharded.fingerprint == plain.fingerprint  # the very same tensors...
    ids = B.tokens(gen)
    assert max_diff(sharded.logits(ids), ref.logits(ids)) < TOL  # ...and the loader used them all


@pytest.mark.parametrize("gen", B.GENERATIONS)
def test_fingerprint(gen, tmp_path):
    ref = B.reference(gen)
    fp = load(ref.hf_dir).fingerprint
    assert isinstance(fp, str) and re.fullmatch(r"[0-9a-f]{64}", fp), fp
    assert load(ref.sharded_dir()).fingerprint == fp
    # the same directory again, one weight element changed by 1e-3
    changed = tmp_path / "changed"
    shutil.copytree(ref.hf_dir, changed)
    weights = changed / "model.safetensors"
    sd = load_file(weights)
    name = "model.layers.1.self_attn.v_proj.weight"
    sd[name][3, 5] += 1e-3
    save_file(sd, weights, metadata={"format": "pt"})
    assert herd.load(str(changed), **CPU_F32).fingerprint != fp


# transformers 4.x wrote `rope_theta` + `rope_scaling` (null or a dict) at the top level and, before 4.45, no
# head_dim; that is what most hub checkpoints still carry. transformers 5 reads both forms.
LEGACY = ["llama2_gqa", "llama3_1", "llama4_scout"]


@pytest.mark.parametrize("gen", LEGACY)
def test_transformers4_style_config(gen, tmp_path):
    ref = B.reference(gen)
    legacy = tmp_path / "legacy"
    shutil.copytree(ref.hf_dir, legacy)
    cfg = json.loads((legacy / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    if gen not in B.LLAMA4:
        cfg.pop("head_dim")
    cfg["transformers_version"] = "4.44.2"
    (legacy / "config.json").write_text(json.dumps(cfg, indent=2))
    ids = B.tokens(gen)
    diff = max_diff(herd.load(str(legacy), **CPU_F32).logits(ids), ref.logits(ids))
    print(f"{gen} (transformers 4 config): max|Δ| = {diff:.2e}")
    assert diff < TOL


def test_llama4_conditional_generation_text_part(tmp_path):
    """Real Scout/Maverick repos are Llama4ForConditionalGeneration: text_config, language_model.* keys and
    vision weights. herd loads the text model and matches HF's logits for text-only input."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    text = B.hf_config("llama4_scout").to_dict()
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
                  patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
    torch.manual_seed(0)
    model = Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    ids = B.tokens("llama4_scout")
    with torch.no_grad():
        want = model(input_ids=ids[None]).logits[0]
    got = herd.load(tmp_path, **CPU_F32).logits(ids)
    diff = max_diff(got, want)
    print(f"llama4 conditional-generation text part: max|Δ| = {diff:.2e}")
    assert diff < TOL
