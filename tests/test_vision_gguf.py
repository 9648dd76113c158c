"""Llama 4 as llama.cpp ships it: a text GGUF plus its image projector file (mmproj), both written by llama.cpp's
own convert_hf_to_gguf.py from a tiny random HF Llama4ForConditionalGeneration (tests/fixtures/vision.py), against
HF transformers: the prompt ids of Llama4Processor, the logits and greedy tokens of the HF model (fp32). For F16
and Q8_0 files the HF model computes with the file's rounded weights, decoded by gguf-py (the reference reader),
so the comparison stays fp32 against fp32.

The quantized CPU path (bf16 compute over packed weights) is held to the tolerances tests/test_quant.py uses for
text against the dequantized fp32 reference, and to HF's greedy tokens."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.fixtures import vision as V
from tests.test_vision import data_url, hf_inputs, messages

TOL = 1e-4  # as tests/test_vision.py: fp32 against fp32


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny HF model and what llama.cpp's converter makes of it: {"hf": dir, "model": HF model,
    ("text", type) / ("mmproj", type): GGUF paths}."""
    from tests.fixtures.llamacpp import convert

    from transformers import Llama4ForConditionalGeneration

    V.torchvision_functional()
    root = tmp_path_factory.mktemp("llama4-gguf")
    hf = root / "hf"
    # the release's tile limit; transformers 4's file layout, the one llama.cpp's converter reads
    V.build(hf, vision_layers=3, byte_level=True, layout="flat", max_patches=16)
    # llama.cpp has no GGUF key for the attention chunk or the temperature floor and fixes both at 8192 (the
    # released models' values); the tiny model's 8 and 4 are set to those, so the converted file is the model
    config = json.loads((hf / "config.json").read_text())
    config["text_config"].update(attention_chunk_size=8192, floor_scale=8192)
    (hf / "config.json").write_text(json.dumps(config))
    model = Llama4ForConditionalGeneration.from_pretrained(hf, attn_implementation="eager", dtype=torch.float32).eval()
    out = {"hf": hf, "model": model}
    for kind in ("f32", "f16", "q8_0"):
        out["mmproj", kind] = convert(hf, root / f"mmproj-{kind}.gguf", kind, mmproj=True)
    for kind in ("f32", "q8_0"):
        out["text", kind] = convert(hf, root / f"text-{kind}.gguf", kind)
    return out


@pytest.fixture(scope="module")
def processor(files):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(files["hf"])


def stored_weights(hf_model, *paths):
    """A copy of the HF model whose parameters are the tensors the GGUF files store, decoded by gguf-py. Each
    file tensor is matched to the HF parameter it came from by its values (random weights: one fits), so no
    name table of herd's is involved."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    model = copy.deepcopy(hf_model)
    params = dict(model.named_parameters())
    for path in paths:
        for t in GGUFReader(path).tensors:
            if t.name == "rope_freqs.weight":
                continue
            values = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
            values = values.reshape(tuple(int(n) for n in reversed(t.shape)))
            best, err = None, float("inf")
            for name, p in params.items():
                for candidate in _layouts(p, values):
                    e = (candidate - values).abs().max().item()
                    if e < err:
                        best, err, chosen = name, e, candidate
            assert best is not None and err < 0.2, (path, t.name, best, err)  # 4-bit blocks: up to ~0.1 off
            with torch.no_grad():
                chosen.copy_(values)  # a view of the parameter
    return model


def _layouts(p: torch.Tensor, values: torch.Tensor):
    """The ways the converter lays out an HF parameter: as it is, or (Llama 4's stacked experts, fused gate_up)
    transposed and split."""
    p = p.detach()  # views of p: writing to one writes the parameter
    if p.shape == values.shape:
        yield p
    if p.dim() == 3 and values.dim() == 3:
        t = p.transpose(-1, -2)
        if t.shape == values.shape:
            yield t
        if values.dim() == 3 and t.shape[-2] == 2 * values.shape[-2]:
            yield from t.split(values.shape[-2], dim=-2)


CASES = {
    "one image, 2x2 tiles": ([(120, 110)], ["the cat"]),
    "three images": ([(200, 90), (40, 40), (13, 170)], ["a dog", "is", "here"]),
}


def herd_and_hf(llm, processor, reference, case):
    sizes, texts = CASES[case]
    images = [V.image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    ours, theirs = messages(images, texts)
    ids, placed = llm.chat_inputs(ours)
    want = hf_inputs(processor, theirs)
    assert ids == want["input_ids"][0].tolist()
    with torch.no_grad():
        ref = reference(input_ids=want["input_ids"], pixel_values=want["pixel_values"].float()).logits[0]
    return V.herd_image_logits(llm, ids, placed), ref


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_text_gguf_with_mmproj_gives_hf_logits(files, processor, kind, case):
    import herd

    llm = herd.load(files["text", "f32"], mmproj=files["mmproj", kind], dtype="float32")
    assert llm.sees_images and llm.config.vision.n_layers == 3 and llm.checkpoint.projector == files["mmproj", kind]
    reference = files["model"] if kind == "f32" else stored_weights(files["model"], files["mmproj", kind])
    got, ref = herd_and_hf(llm, processor, reference, case)
    assert (got - ref).abs().max() < TOL


def test_greedy_chat_equals_hf_generate(files, processor):
    import herd

    llm = herd.load(files["text", "f32"], mmproj=files["mmproj", "f32"], dtype="float32")
    images = [V.image(200, 90, seed=1), V.image(40, 40, seed=2)]
    ours, theirs = messages(images, ["the", "cat"])
    want = hf_inputs(processor, theirs)
    n = want["input_ids"].shape[1]
    ref = files["model"].generate(input_ids=want["input_ids"], pixel_values=want["pixel_values"].float(),
                                  max_new_tokens=8, do_sample=False, eos_token_id=None)[0, n:].tolist()
    got = llm.chat(ours, max_tokens=8, temperature=0, stop_token_ids=None)
    assert len(got.token_ids) >= 1 and got.token_ids == ref[: len(got.token_ids)]


def test_fingerprint_covers_the_projector(files):
    import herd

    text = herd.load(files["text", "f32"], dtype="float32")
    f32 = herd.load(files["text", "f32"], mmproj=files["mmproj", "f32"], dtype="float32")
    f16 = herd.load(files["text", "f32"], mmproj=files["mmproj", "f16"], dtype="float32")
    assert len({text.fingerprint, f32.fingerprint, f16.fingerprint}) == 3


def test_text_gguf_alone_is_text_only_and_refuses_images(files):
    """No mmproj given: none is looked for (llama-server needs --mmproj too); text runs, an image is refused."""
    import herd
    from herd.errors import ImageError

    text = herd.load(files["text", "f32"], dtype="float32")
    full = herd.load(files["text", "f32"], mmproj=files["mmproj", "f32"], dtype="float32")
    assert not text.sees_images and text.config.vision is None
    with pytest.raises(ImageError, match="cannot see images.*mmproj"):
        text.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(V.image(40, 40))}},
                                                {"type": "text", "text": "the"}]}])
    ids = [V.IDS["<|begin_of_text|>"], 300, 301, 302]
    assert torch.equal(text.logits(ids), full.logits(ids))


def _variant(src, dst, change):
    from tests.fixtures.build import read_gguf_header, write_gguf_variant

    h = read_gguf_header(src)
    change(h)
    return write_gguf_variant(h, dst)


def test_foreign_and_mismatched_projectors_are_clear_errors(files, tmp_path):
    import herd
    from herd.errors import HerdError, ShapeMismatch, UnsupportedArchitecture
    from tests.fixtures.build import GGUF_STRING

    text, mmproj = files["text", "f32"], files["mmproj", "f32"]

    def set_key(key, vtype, value):
        return lambda h: h.kv.__setitem__(key, (vtype, value))

    foreign = _variant(mmproj, tmp_path / "gemma3.gguf", set_key("clip.projector_type", GGUF_STRING, "gemma3"))
    with pytest.raises(UnsupportedArchitecture, match=r"gemma3\.gguf: image projector type 'gemma3'.*'llama4'"):
        herd.load(text, mmproj=foreign, dtype="float32")
    wide = _variant(mmproj, tmp_path / "wide.gguf", set_key("clip.vision.projection_dim", 4, 128))
    with pytest.raises(ShapeMismatch, match=r"wide\.gguf: .*width 128.*64 wide"):
        herd.load(text, mmproj=wide, dtype="float32")
    deep = _variant(mmproj, tmp_path / "deep.gguf", set_key("clip.vision.block_count", 4, 1 << 30))
    with pytest.raises(HerdError, match=r"deep\.gguf: clip\.vision\.block_count"):
        herd.load(text, mmproj=deep, dtype="float32")
    with pytest.raises(UnsupportedArchitecture, match="not an image projector file.*'llama4'"):
        herd.load(text, mmproj=text, dtype="float32")
    with pytest.raises(UnsupportedArchitecture, match="image projector file.*not a model"):
        herd.load(mmproj, dtype="float32")
    with pytest.raises(HerdError, match="no such image projector file"):
        herd.load(text, mmproj=tmp_path / "missing.gguf", dtype="float32")
    with pytest.raises(UnsupportedArchitecture, match="goes with a GGUF text model"):
        herd.load(files["hf"], mmproj=mmproj, dtype="float32")
    # the projector of another, wider text model: its projection matrix does not fit this one
    def widen(h):
        h.kv.pop("clip.vision.projection_dim")
        for t in h.tensors:
            if t[0] == "mm.model.fc.weight":
                t[1] = [t[1][0], 32]  # half the rows: a shape the data no longer fills exactly
    bad = _variant(mmproj, tmp_path / "narrow.gguf", widen)
    with pytest.raises(HerdError, match=r"narrow\.gguf"):
        herd.load(text, mmproj=bad, dtype="float32")


def test_cli_run_and_info_take_mmproj(files, tmp_path):
    import herd

    llm = herd.load(files["text", "f32"], mmproj=files["mmproj", "f32"], dtype="float32")
    picture = tmp_path / "picture.png"
    picture.write_bytes(V.image(120, 110, seed=21))
    question = "the cat"
    want = llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(picture)}},
                                                  {"type": "text", "text": question}]}],
                    max_tokens=6, temperature=0).text.strip()
    run = subprocess.run([sys.executable, "-m", "herd", "run", str(files["text", "f32"]), "--mmproj",
                          str(files["mmproj", "f32"]), "--dtype", "float32", "--image", str(picture), question,
                          "--temperature", "0", "--max-tokens", "6"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == want
    info = subprocess.run([sys.executable, "-m", "herd", "info", str(files["text", "f32"]), "--mmproj",
                           str(files["mmproj", "f32"])], capture_output=True, text=True, timeout=300)
    assert info.returncode == 0, info.stderr
    assert "mmproj" in info.stdout and llm.fingerprint in info.stdout


# -- the quantized CPU path -----------------------------------------------------------------------------------


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:  # as tests/test_quant.py
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.fixture(scope="module", params=["q8_0", "q4_0"])
def quantized(request, files, tmp_path_factory):
    """A Q8_0 text GGUF (llama.cpp's converter) or a Q4_0 one (llama.cpp's llama-quantize of the F32), with the
    Q8_0 mmproj, on herd's quantized CPU path; and HF computing with the same stored weights."""
    import herd
    from tests.fixtures.llamacpp import quantize

    text = files["text", "q8_0"]
    if request.param == "q4_0":
        text = quantize(files["text", "f32"], tmp_path_factory.mktemp("q4") / "text-q4_0.gguf", "Q4_0")
    llm = herd.load(text, mmproj=files["mmproj", "q8_0"])
    reference = stored_weights(files["model"], text, files["mmproj", "q8_0"])
    return llm, reference


def test_quantized_path_runs_the_encoder_on_the_same_kernels(quantized):
    from herd import kernels
    from herd.quant.linear import BF16Linear, BiasedLinear, FloatLinear, PackedLinear

    llm, _ = quantized
    packed = PackedLinear if kernels.load() else BF16Linear
    block = llm.model.vision_embeddings.vision_encoder.transformer.resblocks[0]
    assert isinstance(block.attn.wq, BiasedLinear) and isinstance(block.attn.wq.linear, packed)  # Q8_0 in the file
    assert isinstance(block.mlp.c_fc.linear, packed)
    assert isinstance(llm.model.vision_embeddings.vision_adapter.mlp.c_fc, packed)
    # F16 and F32 in the file (48 and 588 inputs: no whole Q8_0 blocks): fp32 over the stored weights
    projection = llm.model.vision_projection
    assert isinstance(projection, FloatLinear) and projection.weight.dtype == torch.float16
    assert isinstance(llm.model.vision_embeddings.vision_encoder.conv1._linear, FloatLinear)
    assert isinstance(llm.model.layers[0].attention.wqkv, packed)


@pytest.mark.parametrize("case", CASES)
def test_quantized_path_logits_with_images_stay_close_to_hf(files, processor, quantized, case):
    llm, reference = quantized
    got, ref = herd_and_hf(llm, processor, reference, case)
    print(f"{llm.checkpoint.path.name} + mmproj Q8_0, {case}: relative error {rel_err(got, ref):.4f}")
    assert rel_err(got, ref) < 0.02  # bf16 activations on the same stored weights, as tests/test_quant.py


def test_quantized_path_greedy_tokens_agree_with_hf(files, processor, quantized):
    """herd's greedy reply on the quantized path is HF's up to where they part, and they part only where HF's
    own top two logits are within 0.1 (a near tie that bf16 activations, ~0.6% off here, may decide the other
    way); the reply reaches past its first token."""
    llm, reference = quantized
    images = [V.image(120, 110, seed=3), V.image(40, 40, seed=4)]
    ours, theirs = messages(images, ["the", "cat"])
    want = hf_inputs(processor, theirs)
    out = reference.generate(input_ids=want["input_ids"], pixel_values=want["pixel_values"].float(),
                             max_new_tokens=8, do_sample=False, eos_token_id=None, output_scores=True,
                             return_dict_in_generate=True)
    ref = out.sequences[0, want["input_ids"].shape[1]:].tolist()
    margins = [float(top[0] - top[1]) for top in (s[0].topk(2).values for s in out.scores)]
    got = llm.chat(ours, max_tokens=8, temperature=0, stop_token_ids=None).token_ids
    parted = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    assert parted >= 2 and got[:parted] == ref[:parted]
    assert parted == len(ref) or margins[parted] < 0.1, (got, ref, margins)


def test_layout_cache_keys_on_the_projector(files, monkeypatch, tmp_path):
    """The repacked layout of text + mmproj is cached under a key that covers the mmproj: the same pair maps
    it back (the same logits with images), the text alone or another projector builds its own."""
    import herd
    from herd import layout_cache, loader

    monkeypatch.setattr(layout_cache, "MIN_BYTES", 0)  # the tiny files are below the size worth caching
    monkeypatch.setenv("HERD_LAYOUT_CACHE", str(tmp_path / "layouts"))
    builds = []
    real = loader._load_quantized
    monkeypatch.setattr(loader, "_load_quantized", lambda *a: (builds.append(1), real(*a))[1])
    text, mmproj = files["text", "q8_0"], files["mmproj", "q8_0"]
    other = shutil.copyfile(files["mmproj", "f16"], tmp_path / "mmproj-other.gguf")
    keys = {layout_cache.key(text), layout_cache.key(text, [mmproj]), layout_cache.key(text, [other])}
    assert len(keys) == 3 and None not in keys

    first = herd.load(text, mmproj=mmproj)
    again = herd.load(text, mmproj=mmproj)
    assert len(builds) == 1 and again.sees_images
    tiles = torch.randn(2, 3, V.TILE, V.TILE)
    with torch.inference_mode():
        assert torch.equal(first.model.encode_images(tiles), again.model.encode_images(tiles))
    assert not herd.load(text).sees_images and len(builds) == 2
    assert herd.load(text, mmproj=other).sees_images and len(builds) == 3
    before = layout_cache.key(text, [other])
    other.write_bytes(other.read_bytes())  # rewritten in place: a new mtime
    assert layout_cache.key(text, [other]) != before


def _renamed(src, dst, rename):
    """The GGUF at `src` rewritten by gguf-py with each tensor name passed through `rename`."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, field.contents())
        elif kind == gguf.GGUFValueType.STRING:
            writer.add_string(key, field.contents())
        else:
            writer.add_key_value(key, field.contents(), kind)
    for t in reader.tensors:
        writer.add_tensor(rename(t.name), np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_ln2_as_clip_cpp_names_it_reads_the_same(files, tmp_path):
    """llama.cpp's clip.cpp reads each block's pre-FFN norm as `v.blk.N.ln2` (and older converters write that);
    the cached converter writes `attn_post_norm` (herd/formats/mmproj.py). Both load as the same model; a file
    with both for one block is refused."""
    import herd
    from herd.errors import FormatError

    mmproj = files["mmproj", "f32"]
    ln2 = _renamed(mmproj, tmp_path / "ln2.gguf", lambda n: n.replace("attn_post_norm", "ln2"))
    a = herd.load(files["text", "f32"], mmproj=mmproj, dtype="float32")
    b = herd.load(files["text", "f32"], mmproj=ln2, dtype="float32")
    tiles = torch.randn(2, 3, V.TILE, V.TILE)
    with torch.inference_mode():
        assert torch.equal(a.model.encode_images(tiles), b.model.encode_images(tiles))
    assert a.fingerprint == b.fingerprint  # the same weights under herd's names
    both = _renamed(mmproj, tmp_path / "both.gguf", lambda n: n.replace("blk.1.ln1", "blk.1.ln2"))
    with pytest.raises(FormatError, match=r"both\.gguf: tensor v\.blk\.1\.(ln2|attn_post_norm)\.(weight|bias) is a second"):
        herd.load(files["text", "f32"], mmproj=both, dtype="float32")


def test_text_gguf_with_mmproj_exports_to_an_hf_model_transformers_runs_as_the_original(files, processor, tmp_path):
    """llama.cpp's split files back to one HF Llama4ForConditionalGeneration: transformers loads the export
    and gives the original HF model's logits with images (the F32 files hold the original weights)."""
    import herd
    from herd.finetune.export import export_model
    from transformers import Llama4ForConditionalGeneration

    llm = herd.load(files["text", "f32"], mmproj=files["mmproj", "f32"], dtype="float32")
    out, _ = export_model(llm, "hf", tmp_path / "hf")
    exported = Llama4ForConditionalGeneration.from_pretrained(out, attn_implementation="eager",
                                                              dtype=torch.float32).eval()
    sizes, texts = CASES["three images"]
    images = [V.image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    _, theirs = messages(images, texts)
    want = hf_inputs(processor, theirs)
    with torch.no_grad():
        inputs = {"input_ids": want["input_ids"], "pixel_values": want["pixel_values"].float()}
        assert (exported(**inputs).logits - files["model"](**inputs).logits).abs().max() < TOL


# ---- an mmproj's metadata of the wrong type: one clear error, no traceback -----------------------------------------


def write_mmproj_header(path, text_dim: int, **wrong) -> None:
    """A llama4 mmproj with gguf-py's writer: the metadata llama.cpp's converter writes for the tiny encoder,
    each key of `wrong` replaced by (value, GGUF type[, element type]), and only the tensors herd reads before
    the metadata is used (the rest is missing: a load gets as far as the tensor checks, no further)."""
    import gguf

    T = gguf.GGUFValueType
    metadata = {
        "clip.projector_type": ("llama4", T.STRING), "clip.has_vision_encoder": (True, T.BOOL),
        "clip.use_gelu": (True, T.BOOL), "clip.vision.embedding_length": (32, T.UINT32),
        "clip.vision.block_count": (1, T.UINT32), "clip.vision.attention.head_count": (2, T.UINT32),
        "clip.vision.feed_forward_length": (128, T.UINT32), "clip.vision.image_size": (V.TILE, T.UINT32),
        "clip.vision.patch_size": (V.PATCH, T.UINT32), "clip.vision.projection_dim": (text_dim, T.UINT32),
        "clip.vision.projector.scale_factor": (2, T.UINT32),
        "clip.vision.attention.layer_norm_epsilon": (1e-5, T.FLOAT32),
        "clip.vision.image_mean": ([0.5] * 3, T.ARRAY, T.FLOAT32),
        "clip.vision.image_std": ([0.5] * 3, T.ARRAY, T.FLOAT32),
    } | wrong
    w = gguf.GGUFWriter(str(path), "clip")
    for key, (value, *types) in metadata.items():
        w.add_key_value(key, value, *types)
    w.add_tensor("v.blk.0.ln1.weight", np.ones(32, dtype=np.float32))
    w.add_tensor("mm.model.mlp.2.weight", np.zeros((48, 128), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


WRONG = {  # key: (a value of the wrong type, its GGUF type names), words the error must hold
    "clip.vision.image_mean": ((["0.5", "0.5", "0.5"], "ARRAY", "STRING"), "should be 3 finite numbers"),
    "clip.vision.image_std": (([0.5, 0.0, 0.5], "ARRAY", "FLOAT32"), "none of them 0"),
    "clip.projector_type": ((7, "UINT32"), "should be a string, got 7"),
    "clip.has_vision_encoder": (("yes", "STRING"), "should be true or false, got 'yes'"),
    "clip.use_gelu": ((1, "UINT32"), "should be true or false, got 1"),
    "clip.vision.projection_dim": (("64", "STRING"), "should be an integer, got '64'"),
    "clip.vision.embedding_length": ((32.0, "FLOAT32"), "should be an integer, got 32.0"),
    "clip.vision.attention.layer_norm_epsilon": (("1e-5", "STRING"), "should be a number, got '1e-5'"),
}


@pytest.fixture(scope="module")
def llama4_text_gguf():
    from tests.fixtures import build as B

    return B.reference("llama4_scout").gguf("F32"), B.SPECS["llama4_scout"].dim


@pytest.mark.parametrize("key", WRONG)
def test_mmproj_metadata_of_the_wrong_type_is_a_clear_error(llama4_text_gguf, tmp_path, key):
    import gguf

    import herd
    from herd.errors import FormatError, MissingTensor

    text, dim = llama4_text_gguf
    write_mmproj_header(tmp_path / "sound.gguf", dim)
    with pytest.raises(MissingTensor):  # the sound file's metadata passes; its missing tensors are what fails
        herd.load(text, mmproj=tmp_path / "sound.gguf", dtype="float32")
    (value, *types), words = WRONG[key]
    bad = tmp_path / "bad.gguf"
    write_mmproj_header(bad, dim, **{key: (value, *(getattr(gguf.GGUFValueType, t) for t in types))})
    with pytest.raises(FormatError) as caught:
        herd.load(text, mmproj=bad, dtype="float32")
    message = str(caught.value)
    assert message.startswith(str(bad)) and key in message and words in message and "\n" not in message, message


def test_cli_names_the_mmproj_and_the_key_without_a_traceback(llama4_text_gguf, tmp_path):
    import gguf

    text, dim = llama4_text_gguf
    bad = tmp_path / "strings.gguf"
    write_mmproj_header(bad, dim, **{"clip.vision.image_mean": (["a", "b", "c"], gguf.GGUFValueType.ARRAY,
                                                                 gguf.GGUFValueType.STRING)})
    r = subprocess.run([sys.executable, "-m", "herd", "info", str(text), "--mmproj", str(bad)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert str(bad) in r.stderr and "clip.vision.image_mean" in r.stderr, r.stderr
