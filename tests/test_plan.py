"""`herd plan`: memory plans from configuration files alone.

References: the published shapes of Llama 3.1 405B and Llama 4 Maverick (their HF config.json values, written
here; no hub), Meta's stated sizes (405B parameters; Maverick 400B total, 17B active), the well-known fact that
405B in bf16 needs two 8-GPU H100 nodes (or H200s) while one node of 8 x H100-80GB is not enough, and, for the
per-rank figures, the parameters herd's own tensor-parallel loader actually builds on a rank.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from herd.errors import HerdError
from herd.plan import Devices, kv_per_token, plan, read_config, weights_per_rank
from tests.fixtures import build as B

ROOT = Path(__file__).resolve().parents[1]

LLAMA_405B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16384, "num_hidden_layers": 126,
    "num_attention_heads": 128, "num_key_value_heads": 8, "intermediate_size": 53248, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
MAVERICK = {
    "architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
    "text_config": {
        "model_type": "llama4_text", "hidden_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 40,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 202048, "intermediate_size": 8192,
        "intermediate_size_mlp": 16384, "num_local_experts": 128, "num_experts_per_tok": 1,
        "interleave_moe_layer_step": 2, "max_position_embeddings": 1048576, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-05, "use_qk_norm": False, "attention_chunk_size": 8192, "tie_word_embeddings": False,
    },
}


def write(tmp_path: Path, name: str, config: dict) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


def by_name(plans):
    return {p.name: p for p in plans}


def test_llama_405b(tmp_path):
    args, source = read_config(write(tmp_path, "405b", LLAMA_405B))
    assert source == "config.json"
    from herd.config import parameter_counts

    total, _ = parameter_counts(args)
    assert abs(total - 405.85e9) / 405.85e9 < 1e-3
    assert kv_per_token(args, 1, 2) == 2 * 126 * 8 * 128 * 2  # K and V, every layer, 8 KV heads of 128, bf16
    one_node = by_name(plan(args, Devices.parse("8xH100-80GB")))
    assert one_node["tp 8"].kv_tokens == 0  # bf16 405B does not fit one node of 8 x 80 GB
    assert abs(one_node["tp 8"].weights - 2 * total / 8) / (2 * total / 8) < 0.01
    assert one_node["tp 8"].kv_per_token == 2 * 126 * 1 * 128 * 2
    two_nodes = by_name(plan(args, Devices.parse("16xH100-80GB")))["tp 16"]  # KV heads replicated: 1 per rank
    assert two_nodes.kv_tokens > 128 * 1024 and two_nodes.kv_per_token == 2 * 126 * 1 * 128 * 2 and not two_nodes.problem
    assert by_name(plan(args, Devices.parse("8xH200-141GB")))["tp 8"].kv_tokens > 0


def test_llama4_maverick(tmp_path):
    args, _ = read_config(write(tmp_path, "maverick", MAVERICK))
    from herd.config import parameter_counts

    total, active = parameter_counts(args)
    assert abs(total - 400e9) / 400e9 < 0.01 and abs(active - 17e9) / 17e9 < 0.03  # Meta: 400B total, 17B active
    plans = by_name(plan(args, Devices.parse("8xH100-80GB")))
    assert set(plans) == {"one device", "tp 8", "tp 8 + ep 8", "ep 8 (attention replicated)"}
    assert plans["tp 8 + ep 8"].kv_tokens == 0  # bf16 Maverick needs more than one H100 node (Meta ships FP8)
    fits = by_name(plan(args, Devices.parse("8xH200-141GB")))["tp 8 + ep 8"]
    assert fits.kv_tokens > 0 and abs(fits.weights - 2 * total / 8) / (2 * total / 8) < 0.02


@pytest.mark.parametrize("gen,tp,ep", [("llama3", 2, 1), ("llama1", 2, 1), ("llama4_maverick", 2, 1),
                                       ("llama4_maverick", 2, 2), ("llama4_scout", 1, 2)])
def test_per_rank_weights_are_what_a_rank_loads(gen, tp, ep):
    """The plan's bytes per rank == the parameters herd's tensor-parallel loader gives rank 0 (no process group
    is needed to load; only forwards use collectives)."""
    from herd.formats import open_checkpoint
    from herd.sharded_loader import load_parallel
    from herd.transforms.tensor_parallel import Layout

    ref = B.reference(gen)
    checkpoint = open_checkpoint(ref.hf_dir)
    model = load_parallel(checkpoint, Layout(tp, ep, 0, max(tp, ep)), torch.device("cpu"), torch.bfloat16)
    loaded = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied output is listed once
    args, _ = read_config(ref.hf_dir)
    assert weights_per_rank(args, tp, ep, 2) == loaded


def test_meta_params_gguf_and_cli(tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({"dim": 16384, "n_layers": 126, "n_heads": 128, "n_kv_heads": 8,
                                                  "vocab_size": 128256, "ffn_dim_multiplier": 1.2, "multiple_of": 4096,
                                                  "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}))
    meta_args, source = read_config(meta)
    hf_args, _ = read_config(write(tmp_path, "hf", LLAMA_405B))
    assert source == "params.json" and meta_args.hidden_dim == 53248
    assert weights_per_rank(meta_args, 8, 1, 2) == weights_per_rank(hf_args, 8, 1, 2)
    gguf_args, source = read_config(B.reference("llama3").gguf("Q8_0"))
    assert source == "GGUF header" and gguf_args.dim == B.SPECS["llama3"].dim
    r = subprocess.run([sys.executable, "-m", "herd", "plan", str(tmp_path / "hf"), "--devices", "2xCPU-64GB"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "tp 2" in r.stdout and "does not fit" in r.stdout and "405.85 B" in r.stdout
    r = subprocess.run([sys.executable, "-m", "herd", "plan", str(tmp_path / "hf"), "--devices", "8xH100"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "COUNTxNAME-SIZE" in r.stderr


def test_device_specs():
    assert Devices.parse("8xH100-80GB") == Devices(8, "H100", 80 * 2**30)
    assert Devices.parse("2xCPU-64GB") == Devices(2, "CPU", 64 * 2**30)
    assert Devices.parse("MI300X-192GB").count == 1
    for bad in ("8xH100", "0xH100-80GB", "H100-80", "x-1GB-"):
        with pytest.raises(HerdError, match="COUNTxNAME-SIZE"):
            Devices.parse(bad)
