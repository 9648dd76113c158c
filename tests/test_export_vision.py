"""`herd export --to hf` of image models, against HF transformers: Llama 3.2 Vision (from its HF directory and from
Meta's layout) becomes an MllamaForConditionalGeneration, and Llama 4 with its vision tower a
Llama4ForConditionalGeneration, whose config and tensors equal the original HF directory's and which, loaded by
transformers with the export's own processor files, gives the original model's logits with one and several images.
Plus what cannot be exported: an image model to GGUF, and Llama 3.2 Vision loaded without its encoder to HF."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import herd
from herd import errors
from herd.cli import main
from herd.finetune.export import export_model
from tests.fixtures import mllama as M
from tests.fixtures import vision as V
from tests.test_vision import pil
from tests.test_vision_mllama import TOL

# keys transformers adds on saving (its version, defaults herd's model does not depend on)
SAVED_ONLY = {"transformers_version", "dtype", "torch_dtype", "initializer_range", "use_cache", "dropout",
              "attention_dropout", "projector_dropout", "output_router_logits", "layer_types",
              "no_rope_layer_interval", "rope_scaling", "rope_theta", "architectures"}


def export_hf(source, out):
    assert main(["export", str(source), "--to", "hf", str(out)]) in (0, None)
    return out


def tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def assert_same_tensors(got, want):
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].shape == want[name].shape and torch.equal(got[name], want[name]), name


def config_of(model_or_path) -> dict:
    """A config as transformers reads it (its defaults filled in), without the keys only saving adds."""
    from transformers import AutoConfig

    config = (AutoConfig.from_pretrained(str(model_or_path)) if not hasattr(model_or_path, "config")
              else model_or_path.config).to_dict()

    def clean(d):
        return {k: clean(v) if isinstance(v, dict) and k.endswith("_config") else v
                for k, v in d.items() if k not in SAVED_ONLY and not k.startswith("_")}
    return clean(config)


# ---- Llama 3.2 Vision -------------------------------------------------------------------------------------------

PROMPTS = {  # (text with <|image|> where each image stands, image sizes)
    "one image": ("<|begin_of_text|><|image|>t5 t6 t7", [(60, 30)]),
    "three images": ("<|begin_of_text|>t9 t8 <|image|>t5 t6 <|image|><|image|>t7 t3 t4",
                     [(40, 100), (28, 28), (90, 20)]),
}


def mllama_inputs(processor, case):
    text, sizes = PROMPTS[case]
    images = [pil(V.image(w, h, seed=i)) for i, (w, h) in enumerate(sizes)]
    enc = processor(images=[images], text=[text], return_tensors="pt", add_special_tokens=False)
    return {k: v for k, v in enc.items() if k != "num_tiles"}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits[0]


def built_and_exported(tmp_path_factory, name: str, build):
    """(original HF model, its directory, herd's HF export of that directory)."""
    V.torchvision_functional()
    root = tmp_path_factory.mktemp(name)
    model = build(root / "hf")
    return model, root / "hf", export_hf(root / "hf", root / "export")


def assert_same_model(source, out, architecture: str) -> dict:
    """The export holds the original's tensors and config (as transformers reads them), and herd reads the
    same weights from both; returns the written config."""
    assert_same_tensors(tensors(out), tensors(source))
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == [architecture]
    assert config_of(out) == config_of(source)
    assert herd.load(out, dtype="float32").fingerprint == herd.load(source, dtype="float32").fingerprint
    return written


@pytest.fixture(scope="module")
def mllama(tmp_path_factory):
    return built_and_exported(tmp_path_factory, "mllama-export", M.build)


def test_mllama_export_has_the_original_config_and_tensors(mllama):
    _, source, out = mllama
    written = assert_same_model(source, out, "MllamaForConditionalGeneration")
    assert written["text_config"]["cross_attention_layers"] == [1, 3]
    assert written["vision_config"]["intermediate_layers_indices"] == [0, 2]


@pytest.mark.parametrize("case", PROMPTS)
def test_mllama_export_gives_the_original_logits_with_images(mllama, case):
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    model, source, out = mllama
    exported = MllamaForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    theirs, ours = mllama_inputs(AutoProcessor.from_pretrained(source), case), \
        mllama_inputs(AutoProcessor.from_pretrained(out), case)  # the export's own processor files
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert (logits(exported, ours) - logits(model, theirs)).abs().max() < TOL


def test_meta_llama_vision_exports_to_the_hf_model_it_came_from(tmp_path):
    """The fixture writes a Meta-compatible MllamaForConditionalGeneration in Meta's layout (transformers'
    converter run backwards); herd's HF export of that Meta directory is the HF model again: its tensors,
    Meta's fusion schedule at HF's layer indices, Meta's intermediate layers at transformers' indices."""
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    V.torchvision_functional()
    model = M.make_model(meta_compatible=True)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    M.write_tokenizer(tmp_path / "hf")
    M.write_processor(tmp_path / "hf")
    out = export_hf(M.write_meta(model, tmp_path / "meta"), tmp_path / "export")
    assert_same_tensors(tensors(out), tensors(tmp_path / "hf"))
    written = json.loads((out / "config.json").read_text())
    assert written["text_config"]["cross_attention_layers"] == M.META_HF_CROSS
    assert written["vision_config"]["intermediate_layers_indices"] == M.META_HF_INTERMEDIATE
    want = config_of(tmp_path / "hf")
    got = config_of(out)
    for key in ("bos_token_id", "eos_token_id"):  # the Meta directory has no tokenizer to name them
        want["text_config"].pop(key), got["text_config"].pop(key)
    assert got == want
    exported = MllamaForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    inputs = mllama_inputs(AutoProcessor.from_pretrained(tmp_path / "hf"), "three images")
    assert (logits(exported, inputs) - logits(model, inputs)).abs().max() < TOL


def load_text_part(source, tmp_path):
    """herd's model of `source`'s text weights alone (the vision ones left out), as a text-only load."""
    from safetensors.torch import save_file

    (tmp_path / "text").mkdir()
    save_file({k: v for k, v in tensors(source).items() if k.startswith("language_model.")},
              str(tmp_path / "text" / "model.safetensors"))
    (tmp_path / "text" / "config.json").write_text((source / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return herd.load(tmp_path / "text", dtype="float32")


def test_mllama_without_its_encoder_is_refused_for_hf(mllama, tmp_path):
    llm = load_text_part(mllama[1], tmp_path)
    with pytest.raises(errors.UnsupportedArchitecture, match="without its image encoder"):
        export_model(llm, "hf", tmp_path / "out")


# ---- Llama 4 with its vision tower --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    return built_and_exported(tmp_path_factory, "llama4v-export", V.build)


def test_llama4_vision_export_has_the_original_config_and_tensors(llama4):
    _, source, out = llama4
    assert_same_model(source, out, "Llama4ForConditionalGeneration")


def test_llama4_vision_export_gives_the_original_logits_with_images(llama4):
    from transformers import AutoProcessor, Llama4ForConditionalGeneration

    from tests.test_vision import hf_inputs, messages

    model, source, out = llama4
    exported = Llama4ForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    images = [V.image(w, h, seed=i) for i, (w, h) in enumerate([(120, 110), (40, 40)])]
    _, theirs = messages(images, ["t5 t6", "t7"])
    processor = AutoProcessor.from_pretrained(source)
    want = hf_inputs(processor, theirs)
    exported_processor = AutoProcessor.from_pretrained(out, chat_template=processor.chat_template)
    got = hf_inputs(exported_processor, theirs)  # the export's preprocessor and tokenizer files
    assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["pixel_values"], want["pixel_values"])
    with torch.no_grad():
        ref = model(input_ids=want["input_ids"], pixel_values=want["pixel_values"].float()).logits[0]
        new = exported(input_ids=got["input_ids"], pixel_values=got["pixel_values"].float()).logits[0]
    assert (new - ref).abs().max() < TOL


def test_llama4_loaded_text_only_exports_the_text_model(llama4, tmp_path):
    from transformers import Llama4ForCausalLM

    model, source, _ = llama4
    llm = load_text_part(source, tmp_path)
    out, _ = export_model(llm, "hf", tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Llama4ForCausalLM"]
    text = Llama4ForCausalLM.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([[V.IDS["<|begin_of_text|>"], 5, 6, 7, 8]])
    with torch.no_grad():
        assert (text(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() < TOL


def test_llama4_vision_meta_export_has_the_fixtures_meta_layout_and_loads_back_with_images(llama4, tmp_path):
    """The fixture's Meta writer (llama-models' names and params.json vision_args) is the reference."""
    model, source, _ = llama4
    assert main(["export", str(source), "--to", "meta", str(tmp_path / "meta")]) in (0, None)
    want = V.write_meta(model, tmp_path / "fixture")
    assert_same_tensors(torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True),
                        torch.load(want / "consolidated.00.pth", weights_only=True))
    got_params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert got_params["vision_args"] == json.loads((want / "params.json").read_text())["vision_args"]
    back = herd.load(tmp_path / "meta", dtype="float32")
    assert back.config.vision is not None and back.fingerprint == herd.load(source, dtype="float32").fingerprint


# ---- GGUF ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["mllama", "llama4"])
def test_image_models_to_gguf_are_refused_naming_hf_and_meta(which, request, tmp_path):
    _, source, _ = request.getfixturevalue(which)
    llm = herd.load(source, dtype="float32")
    with pytest.raises(errors.UnsupportedArchitecture, match=r"cannot go into a GGUF.*--to hf. or .--to meta"):
        export_model(llm, "gguf", tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()
