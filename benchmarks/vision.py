"""herd vs HF transformers: the image encoders, in the same process on the same random weights (fp32, CPU).

    .venv/bin/python benchmarks/vision.py [--runs 5] [--layers 8] [--threads N]

Llama 4: Scout's vision widths (1408 wide, 16 heads, 5632 MLP, 336-pixel tiles of 14-pixel patches, 4096-wide
adapter, projected to 5120) with `--layers` encoder layers (Scout has 34), one image of 2x2 tiles plus the
global one. Llama 3.2 Vision: 11B's widths (1280 wide, 16 heads, 5120 MLP, 560-pixel tiles) with `--layers`
local and 2 global layers (11B has 32 and 8), one image of 4 tiles, projected to 4096 and turned into the
keys and values of one cross-attention layer. Prints the median seconds per image for each and herd/HF.
Text-model speed is benchmarks/decode.py's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import tests.fixtures  # noqa: E402,F401  (declares torchvision's op schemas: transformers' Llama 4 module imports it)


def median_seconds(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def llama4(layers: int, runs: int, root: Path) -> tuple[float, float]:
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    import herd

    text = dict(hidden_size=5120, num_hidden_layers=1, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
                intermediate_size=256, intermediate_size_mlp=256, num_local_experts=1, vocab_size=1024)
    vision = dict(hidden_size=1408, num_hidden_layers=layers, num_attention_heads=16, intermediate_size=5632,
                  image_size=336, patch_size=14, vision_output_dim=4096, projector_input_dim=4096,
                  projector_output_dim=4096, pixel_shuffle_ratio=0.5)
    torch.manual_seed(0)
    hf = Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=vision)).eval()
    hf.save_pretrained(root / "llama4")
    ours = herd.load(root / "llama4", dtype="float32")
    tiles = torch.randn(5, 3, 336, 336)
    with torch.inference_mode():
        t_hf = median_seconds(lambda: hf.multi_modal_projector(hf.vision_model(tiles).last_hidden_state), runs)
        t_herd = median_seconds(lambda: ours.model.encode_images(tiles), runs)
    return t_herd, t_hf


def mllama(layers: int, runs: int, root: Path) -> tuple[float, float]:
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    import herd

    text = dict(hidden_size=4096, num_hidden_layers=2, cross_attention_layers=[1], num_attention_heads=32,
                num_key_value_heads=8, intermediate_size=256, vocab_size=1024, pad_token_id=None)
    vision = dict(hidden_size=1280, num_hidden_layers=layers, num_global_layers=2, attention_heads=16,
                  intermediate_size=5120, image_size=560, patch_size=14, max_num_tiles=4,
                  intermediate_layers_indices=[0, layers - 1], vision_output_dim=1280 * 3)
    torch.manual_seed(0)
    hf = MllamaForConditionalGeneration(MllamaConfig(text_config=text, vision_config=vision)).eval()
    hf.save_pretrained(root / "mllama")
    ours = herd.load(root / "mllama", dtype="float32")
    pixels = torch.randn(1, 1, 4, 3, 560, 560)
    ids, mask = torch.tensor([[6]]), torch.ones(1, 1, 4, dtype=torch.long)
    cross = hf.model.language_model.layers[1].cross_attn

    def reference():
        states = hf.model.vision_model(pixel_values=pixels, aspect_ratio_ids=ids, aspect_ratio_mask=mask)
        states = hf.model.multi_modal_projector(states.last_hidden_state).reshape(1, -1, 4096)
        cross.k_norm(cross.k_proj(states).view(1, -1, 8, 128).transpose(1, 2))
        cross.v_proj(states)

    with torch.inference_mode():
        t_hf = median_seconds(reference, runs)
        t_herd = median_seconds(lambda: ours.model.cross_attention_states(pixels[0], ids[0], mask[0]), runs)
    return t_herd, t_hf


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [("Llama 4 encoder, 5 tiles", *llama4(args.layers, args.runs, Path(tmp))),
                ("Llama 3.2 Vision encoder, 4 tiles", *mllama(args.layers, args.runs, Path(tmp)))]
    print(f"image encoders, {args.layers} layers, fp32, {torch.get_num_threads()} threads, median of {args.runs}")
    print(f"{'':36} {'herd s':>8} {'HF s':>8} {'herd/HF':>8}")
    for name, ours, theirs in rows:
        print(f"{name:36} {ours:8.3f} {theirs:8.3f} {ours / theirs:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
