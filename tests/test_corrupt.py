"""Broken HF and Meta sources: each raises its own herd.errors exception, naming what is wrong.

(GGUF corruption is covered with the GGUF reader.) Every case starts from a valid tiny Llama 3 written by
tests/fixtures/build.py, copied to a temporary folder and damaged there.
"""

import json
import pickle
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `herd` and `tests.fixtures`

import pytest
import torch
from safetensors.torch import load_file, save_file

import herd
from herd import errors
from tests.fixtures import build as B

GEN = "llama3"


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def edit_safetensors(d: Path, change) -> None:
    path = d / "model.safetensors"
    sd = load_file(path)
    change(sd)
    save_file(sd, path, metadata={"format": "pt"})


def edit_pth(d: Path, change) -> None:
    path = d / "consolidated.00.pth"
    sd = torch.load(path, map_location="cpu", weights_only=True)
    change(sd)
    torch.save(sd, path)


def raises(exc, source, *words):
    """herd.load(source) raises exc; its message contains every word of `words` (case-insensitive)."""
    with pytest.raises(exc) as info:
        herd.load(str(source))
    msg = str(info.value).lower()
    missing = [w for w in words if w.lower() not in msg]
    assert not missing, f"message {str(info.value)!r} does not mention {missing}"
    return info.value


def test_reference_sources_load():
    """The undamaged fixtures load (so the failures below come from the damage)."""
    herd.load(str(B.reference(GEN).hf_dir))
    herd.load(str(B.reference(GEN).meta_dir(1)))


def test_nonexistent_path(tmp_path):
    raises(errors.ModelNotFound, tmp_path / "no-such-model")


# -- HF directory ----------------------------------------------------------------------------------------------------


def test_hf_truncated_data(hf_dir):
    path = hf_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    raises(errors.TruncatedFile, hf_dir)


def test_hf_truncated_header(hf_dir):
    path = hf_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:20])  # the 8-byte length, then part of the JSON header
    raises(errors.FormatError, hf_dir)


def test_hf_wrong_shape(hf_dir):
    name = "model.layers.0.self_attn.k_proj.weight"  # [32, 64] stored as [64, 32]
    edit_safetensors(hf_dir, lambda sd: sd.__setitem__(name, sd[name].t().contiguous()))
    err = raises(errors.ShapeMismatch, hf_dir)
    assert any(w in str(err) for w in ("k_proj", "wk")), str(err)


def test_hf_missing_tensor(hf_dir):
    edit_safetensors(hf_dir, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    err = raises(errors.MissingTensor, hf_dir)
    assert any(w in str(err) for w in ("up_proj", "w3")), str(err)


def test_hf_unexpected_tensor(hf_dir):
    edit_safetensors(hf_dir, lambda sd: sd.__setitem__("model.layers.0.mlp.mystery_proj.weight", torch.zeros(4, 4)))
    raises(errors.UnexpectedTensor, hf_dir, "mystery_proj")


def test_hf_index_names_a_missing_shard(tmp_path):
    d = tmp_path / "sharded"
    shutil.copytree(B.reference(GEN).sharded_dir(), d)
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    raises(errors.FormatError, d, shards[-1].name)


@pytest.mark.parametrize("arch", [
    {"architectures": ["MistralForCausalLM"], "model_type": "mistral"},
    {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"},
    {"architectures": None, "model_type": "falcon"},
])
def test_hf_unknown_architecture(hf_dir, arch):
    def change(cfg):
        for key, value in arch.items():
            if value is None:
                cfg.pop(key)
            else:
                cfg[key] = value
    edit_json(hf_dir / "config.json", change)
    raises(errors.UnsupportedArchitecture, hf_dir)


@pytest.mark.parametrize("field,value", [("attention_bias", True), ("mlp_bias", True), ("hidden_act", "gelu")])
def test_hf_unsupported_math(hf_dir, field, value):
    edit_json(hf_dir / "config.json", lambda cfg: cfg.__setitem__(field, value))
    raises(errors.UnsupportedArchitecture, hf_dir, field)


def test_hf_rope_yarn(hf_dir):
    yarn = {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    edit_json(hf_dir / "config.json", lambda cfg: cfg.__setitem__("rope_parameters", yarn))
    raises(errors.UnsupportedArchitecture, hf_dir, "rope", "yarn")


def test_hf_rope_yarn_transformers4_style(hf_dir):
    def change(cfg):
        cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
        cfg["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    edit_json(hf_dir / "config.json", change)
    raises(errors.UnsupportedArchitecture, hf_dir, "rope", "yarn")


# -- Meta checkpoint ---------------------------------------------------------------------------------------------------


class _Payload:
    """Pickles as a call to exec(): loading it with plain pickle would create the marker file."""

    def __init__(self, marker: Path):
        self.code = f"open({str(marker)!r}, 'w').write('the payload ran')"

    def __reduce__(self):
        return (exec, (self.code,))


def test_meta_pickle_payload_plain_pickle(meta_dir, tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    with open(meta_dir / "consolidated.00.pth", "wb") as f:
        pickle.dump({"tok_embeddings.weight": _Payload(marker)}, f, protocol=2)
    raises(errors.UnsafePickle, meta_dir)
    assert not marker.exists(), "loading the checkpoint executed its pickle payload"


def test_meta_pickle_payload_in_torch_zip(meta_dir, tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    sd = torch.load(meta_dir / "consolidated.00.pth", map_location="cpu", weights_only=True)
    sd["norm.weight"] = _Payload(marker)  # a real torch.save zip whose data.pkl holds the payload
    torch.save(sd, meta_dir / "consolidated.00.pth")
    raises(errors.UnsafePickle, meta_dir)
    assert not marker.exists(), "loading the checkpoint executed its pickle payload"


def test_meta_params_without_dim(meta_dir):
    edit_json(meta_dir / "params.json", lambda p: p.pop("dim"))
    raises(errors.ConfigError, meta_dir, "dim")


@pytest.mark.parametrize("field,value", [
    ("quantization_args", {"scheme": "int4_weight_int8_dynamic_activation", "group_size": 32}),
    ("lora_args", {"rank": 8, "scale": 2.0}),
])
def test_meta_unsupported_params(meta_dir, field, value):
    edit_json(meta_dir / "params.json", lambda p: p.update({field: value}))
    raises(errors.UnsupportedArchitecture, meta_dir, field)


def test_meta_vision_params_on_text_tensors(meta_dir):
    """Llama 3.2 Vision's params.json key over a text model's tensors: the layouts differ, and the message says so."""
    edit_json(meta_dir / "params.json", lambda p: p.update(vision_num_cross_attention_layers=8))
    raises(errors.FormatError, meta_dir, "vision_num_cross_attention_layers")


def test_meta_wrong_shape(meta_dir):
    name = "layers.0.attention.wk.weight"
    edit_pth(meta_dir, lambda sd: sd.__setitem__(name, sd[name].t().contiguous()))
    raises(errors.ShapeMismatch, meta_dir, "wk")


def test_meta_missing_tensor(meta_dir):
    edit_pth(meta_dir, lambda sd: sd.pop("layers.1.feed_forward.w3.weight"))
    raises(errors.MissingTensor, meta_dir, "w3")


def test_meta_unexpected_tensor(meta_dir):
    edit_pth(meta_dir, lambda sd: sd.__setitem__("layers.0.feed_forward.mystery.weight", torch.zeros(4, 4)))
    raises(errors.UnexpectedTensor, meta_dir, "mystery")


def test_meta_truncated(meta_dir):
    path = meta_dir / "consolidated.00.pth"
    path.write_bytes(path.read_bytes()[:-200])
    raises(errors.FormatError, meta_dir)


def test_meta_missing_shard(tmp_path):
    """consolidated.01.pth of a 2-shard checkpoint is gone: the merged tensors are half their size."""
    d = tmp_path / "meta2"
    shutil.copytree(B.reference(GEN).meta_dir(2), d)
    (d / "consolidated.01.pth").unlink()
    raises(errors.FormatError, d)
