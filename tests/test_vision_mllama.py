"""Llama 3.2 Vision against HF transformers: MllamaImageProcessor pixel for pixel, prompt ids (MllamaProcessor
and a chat template), logits with one and several images (cross-attention layers, tanh gates, the tokens
before the first image), greedy generation, text-only prompts, and batching with text requests; on a tiny
random MllamaForConditionalGeneration written by tests/fixtures/mllama.py."""

from __future__ import annotations

import base64
import io

import pytest
import torch

from tests.fixtures import mllama as M
from tests.fixtures import vision as V

TOL = 1e-4  # as tests/test_parity_hf.py

# A Llama 3 chat template that writes <|image|> where an image part stands, as the Llama 3.2 Vision
# templates do (test data: the tiny model ships none)
TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model, its processor saved by transformers' MllamaProcessor (transformers 5's layout) with
    MllamaImageProcessor's default normalisation (0.5), not the released models' CLIP values."""
    V.torchvision_functional()
    path = tmp_path_factory.mktemp("mllama")
    return path, M.build(path)


@pytest.fixture(scope="module")
def llm(tiny):
    import herd

    return herd.load(tiny[0], dtype="float32")


@pytest.fixture(scope="module")
def processor(tiny):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny[0])


def pil(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


SIZES = [(28, 28), (30, 20), (200, 90), (57, 113), (400, 401), (13, 170), (5, 5)]


def assert_hf_pixels(llm, processor, width: int, height: int) -> None:
    from herd.images import decode_image

    data = V.image(width, height, seed=width)
    want = processor.image_processor(images=[[pil(data)]], return_tensors="pt")
    got = llm.preprocess_image(decode_image(data))
    assert torch.equal(got.tiles, want["pixel_values"][0]), (width, height)
    assert got.ratio_id == want["aspect_ratio_ids"][0, 0] and got.n_tiles == want["num_tiles"][0][0]


@pytest.mark.parametrize("width,height", SIZES)
def test_preprocessing_equals_hf_pixel_for_pixel(processor, llm, width, height):
    assert llm.config.vision.image_mean == llm.config.vision.image_std == (0.5, 0.5, 0.5)  # the saved ones
    assert_hf_pixels(llm, processor, width, height)


SAVED = {  # processors transformers saved with other settings, in both layouts it writes
    "flat, the release's CLIP mean and std": ("flat", dict(image_mean=M.CLIP_MEAN, image_std=M.CLIP_STD)),
    "nested, another rescale, mean and std": ("nested", dict(rescale_factor=1 / 127.5, image_mean=[1.0, 0.9, 1.1],
                                                             image_std=[1.0, 0.75, 1.25])),
}


def with_processor(tiny, tmp_path, layout: str, **settings):
    import shutil

    out = tmp_path / "m"
    shutil.copytree(tiny[0], out)
    for name in ("processor_config.json", "preprocessor_config.json"):
        (out / name).unlink(missing_ok=True)
    M.write_processor(out, layout, **settings)
    assert (out / "preprocessor_config.json").is_file() == (layout == "flat")
    return out


@pytest.mark.parametrize("case", SAVED)
def test_saved_processor_settings_give_hfs_pixels_ids_and_logits(tiny, tmp_path, case):
    import herd
    from transformers import AutoProcessor

    path = with_processor(tiny, tmp_path, *SAVED[case][:1], **SAVED[case][1])
    llm = herd.load(path, dtype="float32")
    processor = AutoProcessor.from_pretrained(path)
    for width, height in SIZES:
        assert_hf_pixels(llm, processor, width, height)
    ids, placed, enc = processor_inputs(llm, processor, "text, image, text, two images together")
    assert (herd_logits(llm, ids, placed) - hf_logits(tiny[1], enc)).abs().max() < TOL


REFUSED = {
    "fewer tiles than the encoder's": (dict(max_image_tiles=2), "max_image_tiles is 2, but the image encoder takes 4"),
    "bicubic resize": (dict(resample=3), "resample is 3 .bicubic."),
}


@pytest.mark.parametrize("case", REFUSED)
def test_processor_settings_herd_does_not_implement_are_refused(tiny, tmp_path, case):
    import herd
    from herd.errors import ImageError

    settings, words = REFUSED[case]
    path = with_processor(tiny, tmp_path, "nested", **settings)
    with pytest.warns(UserWarning, match="processor_config.json: image_processor: " + words):
        llm = herd.load(path, dtype="float32")
    assert not llm.sees_images
    with pytest.raises(ImageError, match="cannot see images.*image_processor: " + words):
        llm.chat_inputs(conversation("one image first")[0])
    ids = [M.IDS["<|begin_of_text|>"], 5, 6, 7]  # the text model runs as before
    with torch.no_grad():
        assert (llm.logits(ids) - tiny[1](input_ids=torch.tensor([ids])).logits[0]).abs().max() < TOL


CASES = {
    "one image first": [("image", (60, 30)), ("text", "t5 t6 t7")],
    "text, image, text, two images together": [("text", "t9 t8"), ("image", (40, 100)), ("text", "t5 t6"),
                                                ("image", (28, 28)), ("image", (90, 20)), ("text", "t7 t3 t4")],
}


def conversation(case):
    ours, theirs, images = [], [], []
    for i, (kind, value) in enumerate(CASES[case]):
        if kind == "text":
            ours.append({"type": "text", "text": value})
            theirs.append({"type": "text", "text": value})
        else:
            data = V.image(*value, seed=i)
            images.append(pil(data))
            ours.append({"type": "image_url", "image_url": {"url": url(data)}})
            theirs.append({"type": "image", "image": images[-1]})
    return [{"role": "user", "content": ours}], [{"role": "user", "content": theirs}], images


def processor_inputs(llm, processor, case):
    """herd's (ids, placed images) for `case`, checked equal to the ids HF's processor makes of the same
    conversation rendered as text; returns them with the processor's encoding."""
    ours, _, images = conversation(case)
    ids, placed = llm.chat_inputs(ours)
    text = llm.chat_format.render_text(
        [{"role": "user", "content": "".join("<|image|>" if p["type"] != "text" else p["text"]
                                             for p in ours[0]["content"])}])
    enc = processor(images=[images], text=[text], return_tensors="pt", add_special_tokens=False)
    assert ids == enc["input_ids"][0].tolist()
    return ids, placed, enc


def hf_logits(model, enc):
    with torch.no_grad():
        return model(**{k: v for k, v in enc.items() if k != "num_tiles"}).logits[0]


def herd_logits(llm, ids, placed):
    from herd.model.mllama import cross_inputs

    vision = llm.config.vision
    with torch.no_grad():
        rows = [[(p.positions[0], p.n_tiles, llm.model.cross_attention_states(
            p.tiles, torch.tensor([p.ratio_id]), (torch.arange(vision.max_num_tiles) < p.n_tiles).long()[None]))
            for p in placed]]
        cross = cross_inputs(rows, torch.arange(len(ids))[None], vision.n_patches, vision.max_num_tiles)
        return llm.model(torch.tensor([ids]), cross=cross)[0]


@pytest.mark.parametrize("case", CASES)
def test_builtin_format_ids_and_logits_equal_hf(tiny, llm, processor, case):
    assert llm.chat_format.name == "llama3" and llm.checkpoint.generation == "3.2"
    ids, placed, enc = processor_inputs(llm, processor, case)
    assert (herd_logits(llm, ids, placed) - hf_logits(tiny[1], enc)).abs().max() < TOL


@pytest.mark.parametrize("case", CASES)
def test_jinja_template_ids_and_logits_equal_hf(tiny, processor, tmp_path, case):
    import shutil

    import herd

    shutil.copytree(tiny[0], tmp_path / "m")
    (tmp_path / "m" / "chat_template.jinja").write_text(TEMPLATE)
    model = herd.load(tmp_path / "m", dtype="float32")
    ours, theirs, _ = conversation(case)
    ids, placed = model.chat_inputs(ours)
    enc = processor.apply_chat_template(theirs, chat_template=TEMPLATE, add_generation_prompt=True, tokenize=True,
                                        return_dict=True, return_tensors="pt")
    assert ids == enc["input_ids"][0].tolist()
    assert (herd_logits(model, ids, placed) - hf_logits(tiny[1], enc)).abs().max() < TOL


def test_text_only_prompts_skip_cross_attention_as_hf_does(tiny, llm):
    ids = [M.IDS["<|begin_of_text|>"], 5, 6, 7, 8, 9, 10]
    with torch.no_grad():
        want = tiny[1](input_ids=torch.tensor([ids])).logits[0]
    assert (llm.logits(ids) - want).abs().max() < TOL


def test_greedy_chat_equals_hf_generate_and_batches_with_text(tiny, llm, processor):
    """LLM.chat's greedy tokens equal HF generate's; served together on one engine, an image request and a
    text request each give what they give alone."""
    from herd.engine import Engine, Request
    from herd.sampling import SamplingParams

    ours, _, images = conversation("text, image, text, two images together")
    ids, placed = llm.chat_inputs(ours)
    text = llm.chat_format.render_text([{"role": "user", "content": "t9 t8<|image|>t5 t6<|image|><|image|>t7 t3 t4"}])
    enc = processor(images=[images], text=[text], return_tensors="pt", add_special_tokens=False)
    assert enc["input_ids"][0].tolist() == ids
    ref = tiny[1].generate(**{k: v for k, v in enc.items() if k != "num_tiles"}, max_new_tokens=8, do_sample=False,
                           eos_token_id=None)[0, len(ids):].tolist()
    got = llm.chat(ours, max_tokens=8, temperature=0)
    assert got.token_ids == ref[: len(got.token_ids)] and got.token_ids

    text_ids = llm.chat_prompt([{"role": "user", "content": "t11 t12 t13"}])
    alone = llm.generate(text_ids, max_tokens=8, temperature=0).token_ids
    engine = Engine(llm.model, llm.tokenizer, max_batch=2)
    engine.add_request(Request("image", ids, 8, SamplingParams(temperature=0), images=tuple(placed)))
    engine.add_request(Request("text", text_ids, 8, SamplingParams(temperature=0)))
    tokens = {"image": [], "text": []}
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    assert tokens["image"] == ref[:8] and tokens["text"] == alone


def test_prefix_cache_keys_every_block_of_an_image_prompt_by_its_images(llm):
    """In Llama 3.2 Vision even the tokens before an image read it (uniformly), so a prompt with another
    picture shares no block, while the same picture again is served from the cache."""
    from herd.engine import Engine, Request
    from herd.sampling import SamplingParams

    def request(rid, seed):
        msgs = [{"role": "user", "content": [{"type": "text", "text": "t3 t4 t5 t6 t7 t8 t9 t10 t11 t12"},
                                             {"type": "image_url", "image_url": {"url": url(V.image(50, 30, seed))}},
                                             {"type": "text", "text": "t5"}]}]
        ids, images = llm.chat_inputs(msgs)
        return Request(rid, ids, 4, SamplingParams(temperature=0), images=tuple(images)), msgs

    engine = Engine(llm.model, llm.tokenizer, max_batch=2, block_size=4)

    def run(req):
        return V.run_engine(engine, req)

    first, _ = run(request("a", 1)[0])
    b, msgs_b = request("b", 2)
    tokens_b, cached_b = run(b)
    assert cached_b == 0
    assert tokens_b == llm.chat(msgs_b, max_tokens=4, temperature=0).token_ids[:len(tokens_b)]
    again, cached = run(request("a2", 1)[0])
    assert cached > 0 and again == first


# -- the quantized CPU path ----------------------------------------------------------------------------------


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:  # as tests/test_quant.py
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def test_herd_quantize_q8_runs_encoder_and_cross_attention_on_the_packed_kernels(tiny, processor, tmp_path):
    """`herd quantize --to q8` of the tiny Llama 3.2 Vision, loaded quantized: the encoder's, projector's and
    cross-attention layers' linears are herd's packed q8 modules (PyTorch's int8 without herd's kernels), as the
    text layers' are. Judged as tests/test_quant.py judges text: logits with images within 0.02 of the
    dequantized fp32 path on the same stored weights, that path within 0.05 of HF's on the original weights,
    and greedy replies equal to the dequantized path's up to a near tie."""
    import herd
    from herd import kernels
    from herd.formats import open_checkpoint
    from herd.formats.herdq import write_herdq
    from herd.quant.linear import BiasedLinear, Int8Linear, Q8Linear

    out = write_herdq(open_checkpoint(tiny[0]), tmp_path / "q8", "q8")
    llm = herd.load(out)
    exact = herd.load(out, dtype="float32")
    kind = Q8Linear if kernels.load() else Int8Linear
    model = llm.model
    block = model.vision_model.vision_encoder.transformer.resblocks[0]
    assert isinstance(block.attn.wq, kind) and isinstance(block.mlp.c_fc, BiasedLinear)
    assert isinstance(block.mlp.c_fc.linear, kind) and isinstance(model.vision_model.vision_projection.linear, kind)
    assert isinstance(model.cross_attention_layers[0].attention.wq, kind)
    assert isinstance(model.layers[0].attention.wqkv, kind)
    for case in CASES:
        ids, placed, enc = processor_inputs(llm, processor, case)
        dequantized = herd_logits(exact, ids, placed)
        print(f"q8 {case}: relative error {rel_err(herd_logits(llm, ids, placed), dequantized):.4f} to the "
              f"dequantized path, which is {rel_err(dequantized, hf_logits(tiny[1], enc)):.4f} from HF")
        assert rel_err(herd_logits(llm, ids, placed), dequantized) < 0.02, case
        assert rel_err(dequantized, hf_logits(tiny[1], enc)) < 0.05, case
    ours, _, _ = conversation("text, image, text, two images together")
    want = exact.chat(ours, max_tokens=8, temperature=0, stop_token_ids=None, logprobs=2)
    got = llm.chat(ours, max_tokens=8, temperature=0, stop_token_ids=None).token_ids
    parted = next((i for i, (a, b) in enumerate(zip(got, want.token_ids)) if a != b), len(got))
    assert parted >= 2 and got[:parted] == want.token_ids[:parted]
    if parted < len(want.token_ids):  # only where the reference's top two are within 0.1 (a near tie)
        top = want.logprobs[parted].top
        assert abs(top[0][2] - top[1][2]) < 0.1, (got, want.token_ids)  # logprob gaps are logit gaps
