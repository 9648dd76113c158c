"""`herd export --to hf|meta|gguf` of Llama 4 (Scout-like: 4 experts, QK norm, llama3 RoPE scaling; Maverick-like:
128 experts, dense and MoE layers interleaved), against independent references: transformers loads the HF export
(Llama4ForCausalLM) with the original model's logits; the Meta export holds exactly the tensors the fixtures'
llama-models converter (tests/fixtures/build.py meta_state_dict) writes, and herd loads it with HF's logits; the
GGUF export has the tensor names, shapes, types, data and metadata of the fixtures' convert_hf_to_gguf.py
imitation, read with gguf-py, and herd loads a Q8_0 export with HF's logits (up to Q8_0 rounding)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pytest
import torch

import herd
from herd.cli import main
from tests.fixtures import build as B

TOL = 1e-4  # float32 against float32, as tests/test_parity_hf.py


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("gen", B.LLAMA4)
def test_hf_export_loads_in_transformers_with_the_original_logits(tmp_path, gen):
    from transformers import Llama4ForCausalLM

    ref = B.reference(gen)
    out = tmp_path / "hf"
    assert main(["export", str(ref.hf_dir), "--to", "hf", str(out)]) in (0, None)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Llama4ForCausalLM"] and config["model_type"] == "llama4_text"
    model = Llama4ForCausalLM.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager").eval()
    original = ref.model.config
    for key in ("num_local_experts", "num_experts_per_tok", "intermediate_size", "intermediate_size_mlp",
                "moe_layers", "no_rope_layers", "attention_chunk_size", "use_qk_norm", "floor_scale", "attn_scale",
                "attn_temperature_tuning", "eos_token_id"):
        assert getattr(model.config, key) == getattr(original, key), key
    ids = B.tokens(gen)
    assert max_diff(B.hf_logits(model, ids), ref.logits(ids)) < TOL
    assert herd.load(out, dtype="float32").fingerprint == herd.load(ref.hf_dir, dtype="float32").fingerprint


@pytest.mark.parametrize("gen", B.LLAMA4)
def test_meta_export_is_llama_models_layout_and_loads_with_hf_logits(tmp_path, gen):
    ref = B.reference(gen, meta_compatible=True)
    out = tmp_path / "meta"
    assert main(["export", str(ref.hf_dir), "--to", "meta", str(out)]) in (0, None)
    got = torch.load(out / "consolidated.00.pth", weights_only=True)
    want = B.meta_state_dict(ref.model, gen)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].shape == want[name].shape and torch.equal(got[name], want[name]), name
    params = json.loads((out / "params.json").read_text())
    fixture_params = B.meta_params(gen, ref.model.config)
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta", "use_scaled_rope",
                "nope_layer_interval", "use_qk_norm", "attention_chunk_size", "attn_temperature_tuning",
                "floor_scale", "attn_scale"):
        assert params[key] == fixture_params[key], key
    for key in ("num_experts", "top_k", "interleave_moe_layer_step"):
        assert params["moe_args"][key] == fixture_params["moe_args"][key], key
    # the fixtures' own Meta -> HF converter: transformers on the exported weights gives the original logits
    ids = B.tokens(gen)
    hf = B.model_with_state_dict(gen, B.hf_state_dict_from_meta(out, gen), meta_compatible=True)
    assert max_diff(B.hf_logits(hf, ids), ref.logits(ids)) < TOL
    back = herd.load(out, dtype="float32")
    assert max_diff(back.logits(ids), ref.logits(ids)) < TOL
    assert back.config == herd.load(ref.hf_dir, dtype="float32").config


def _fields(reader):
    skip = ("general.name", "general.herd.lineage", "GGUF.", "general.alignment")
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith(skip)}


@pytest.mark.parametrize("gen", B.LLAMA4)
def test_gguf_export_is_what_the_converter_writes_and_loads_with_hf_logits(tmp_path, gen):
    import gguf

    ref = B.reference(gen)
    source = ref.gguf("F32")  # the fixtures' convert_hf_to_gguf.py imitation (and the tokenizer it carries)
    out = tmp_path / "f32.gguf"
    assert main(["export", str(source), "--to", "gguf", "--gguf-type", "F32", str(out)]) in (0, None)
    got, want = gguf.GGUFReader(str(out)), gguf.GGUFReader(str(source))
    assert _fields(got) == _fields(want)
    assert "general.herd.lineage" in got.fields
    got_t, want_t = {t.name: t for t in got.tensors}, {t.name: t for t in want.tensors}
    assert got_t.keys() == want_t.keys()
    for name, t in want_t.items():
        g = got_t[name]
        assert list(g.shape) == list(t.shape) and g.tensor_type == t.tensor_type, name
        assert np.array_equal(np.asarray(g.data), np.asarray(t.data)), name

    q8 = tmp_path / "q8.gguf"  # from the HF reference's weights as herd loaded them from the F32 export
    assert main(["export", str(out), "--to", "gguf", "--gguf-type", "Q8_0", str(q8)]) in (0, None)
    reader = gguf.GGUFReader(str(q8))
    types = {t.name: t.tensor_type for t in reader.tensors}
    Q = gguf.GGMLQuantizationType
    moe = B.SPECS[gen].moe_step - 1
    assert types[f"blk.{moe}.ffn_gate_inp.weight"] == Q.F32 and types[f"blk.{moe}.ffn_gate_exps.weight"] == Q.Q8_0
    ids = B.tokens(gen)
    fixture_q8 = herd.load(ref.gguf("Q8_0"), dtype="float32").logits(ids)  # the converter's own Q8_0 rounding
    llm = herd.load(q8, dtype="float32")
    assert max_diff(llm.logits(ids), fixture_q8) < TOL
    assert max_diff(herd.load(out, dtype="float32").logits(ids), ref.logits(ids)) < TOL
    assert json.loads(llm.checkpoint.metadata["general.herd.lineage"])["fingerprint"] == llm.fingerprint


def test_gguf_export_refuses_a_llama4_llama_cpp_cannot_run(tmp_path):
    from dataclasses import replace

    from herd.errors import UnsupportedArchitecture
    from herd.formats.gguf_writer import write_gguf

    ck = herd.load(B.reference("llama4_scout").gguf("F32"), dtype="float32").checkpoint
    args = replace(ck.args, nope_layers=(1,))
    with pytest.raises(UnsupportedArchitecture, match="NoPE on every 4th layer"):
        write_gguf(tmp_path / "x.gguf", args, ck.tensors, ck.tokenizer)
    assert not (tmp_path / "x.gguf").exists()


def test_full_fine_tune_of_llama4_exports_and_transformers_agrees(tmp_path):
    """A full fine-tune of the Maverick-like model (dense and MoE layers) from its GGUF (the tokenizer is there):
    herd finetune writes model/model.gguf; `herd export --to hf` of that file loads in transformers with the
    logits herd computes from the GGUF, and the weights did change."""
    from transformers import Llama4ForCausalLM

    gen = "llama4_maverick"
    ref = B.reference(gen)
    data = tmp_path / "text.txt"
    data.write_text("the cat sat on the mat and the dog ate the hat. " * 20)
    result = herd.finetune(str(ref.gguf("F32")), data, tmp_path / "run", method="full", steps=2, batch_size=2,
                           lr=1e-3, max_len=32, progress=False)
    tuned = herd.load(result.model / "model.gguf", dtype="float32")
    assert json.loads(tuned.checkpoint.metadata["general.herd.lineage"])["fingerprint"] == tuned.fingerprint
    ids = B.tokens(gen)
    got = tuned.logits(ids)
    assert max_diff(got, ref.logits(ids)) > 1e-3  # it trained
    out = tmp_path / "hf"
    assert main(["export", str(result.model / "model.gguf"), "--to", "hf", str(out)]) in (0, None)
    model = Llama4ForCausalLM.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager").eval()
    assert max_diff(B.hf_logits(model, ids), got) < TOL


@pytest.mark.parametrize("gen", ["llama4_scout", "llama3_1"])
def test_gguf_with_rope_freqs_exports_to_hf_with_the_original_logits(tmp_path, gen):
    """A GGUF source holds llama3 RoPE scaling only as rope_freqs divisors: the HF export states the llama3
    parameters that give them, and transformers reproduces the original model's logits."""
    from transformers import AutoModelForCausalLM

    ref = B.reference(gen)
    out = tmp_path / "hf"
    assert main(["export", str(ref.gguf("F32")), "--to", "hf", str(out)]) in (0, None)
    rope = json.loads((out / "config.json").read_text())["rope_scaling"]
    original = dict(ref.model.config.rope_parameters)
    for key in ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        assert rope[key] == original[key], key
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager").eval()
    ids = B.tokens(gen)
    assert max_diff(B.hf_logits(model, ids), ref.logits(ids)) < TOL
