"""Llama 4 images against HF transformers: preprocessing pixel for pixel (Llama4ImageProcessor), chat prompt ids
(Llama4Processor + its chat template), logits and greedy generation (Llama4ForConditionalGeneration, fp32), on a
tiny random model written by tests/fixtures/vision.py; plus herd's own guarantees (errors, caches)."""

from __future__ import annotations

import base64
import io
import shutil

import pytest
import torch

from tests.fixtures import vision as V

TOL = 1e-4  # as tests/test_parity_hf.py: fp32 against fp32
PADDING = 33  # embedding rows past the tokenizer's tokens, as checkpoints pad their vocabulary


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model, its processor saved by transformers' Llama4Processor (transformers 5's layout:
    processor_config.json only) with max_patches 4 and 56-pixel tiles, and PADDING rows past its tokenizer."""
    V.torchvision_functional()  # HF's Llama 4 image processor needs it; skip without
    path = tmp_path_factory.mktemp("llama4v")
    model = V.build(path, padding_rows=PADDING)
    return path, model


@pytest.fixture(scope="module")
def llm(tiny):
    import herd

    return herd.load(tiny[0], dtype="float32")


@pytest.fixture(scope="module")
def processor(tiny):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny[0])


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def pil(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


SIZES = [(56, 56), (30, 20), (200, 90), (57, 113), (400, 401), (13, 170), (333, 77), (112, 56), (1, 1)]


def assert_hf_pixels(llm, processor, width: int, height: int) -> None:
    """herd's tiles for a width x height picture (with the settings it read from the checkpoint) are those of
    HF's processor loaded from the same directory, bit for bit."""
    from herd.images import decode_image

    data = V.image(width, height, seed=width + height)
    want = processor.image_processor(images=[pil(data)], return_tensors="pt")
    got = llm.preprocess_image(decode_image(data))
    assert got.tiles.dtype == want["pixel_values"].dtype == torch.bfloat16
    assert torch.equal(got.tiles, want["pixel_values"]), (width, height)
    assert list(got.arrangement) == want["aspect_ratios"][0].tolist(), (width, height)


@pytest.mark.parametrize("width,height", SIZES)
def test_preprocessing_equals_hf_pixel_for_pixel(llm, processor, width, height):
    assert llm.config.vision.max_tiles == 4  # processor_config.json's, not the default 16
    assert_hf_pixels(llm, processor, width, height)


def test_decoding_formats_exif_and_alpha_as_hf_loads_them(llm, processor):
    """JPEG with an EXIF rotation, WebP, a GIF's first frame and a transparent PNG: herd's decoding gives the
    pixels HF's processor makes of the image Pillow opens, EXIF-transposed as HF's load_image does (the
    processor's own RGB conversion composites transparency on white)."""
    from PIL import Image, ImageOps

    from herd.images import decode_image

    base = Image.open(io.BytesIO(V.image(90, 40, seed=3)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    jpeg = io.BytesIO()
    base.save(jpeg, "JPEG", exif=exif)
    gif = io.BytesIO()
    frames = [base.convert("P"), Image.open(io.BytesIO(V.image(90, 40, seed=4))).convert("P")]
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    png = io.BytesIO()
    rgba.save(png, "PNG")
    for name, data in [("jpeg", jpeg.getvalue()), ("webp", V.image(70, 50, fmt="WEBP")), ("gif", gif.getvalue()),
                       ("rgba", png.getvalue())]:
        ours = decode_image(data, name)
        opened = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        want = processor.image_processor(images=[opened], return_tensors="pt")
        assert torch.equal(llm.preprocess_image(ours).tiles, want["pixel_values"]), name
    assert decode_image(jpeg.getvalue()).size == (40, 90)  # upright


def messages(images: list[bytes], texts: list[str]) -> tuple[list[dict], list[dict]]:
    """The same user turn for herd (OpenAI image_url parts) and HF (image parts holding PIL images)."""
    ours, theirs = [], []
    for data, text in zip(images, texts):
        ours += [{"type": "image_url", "image_url": {"url": data_url(data)}}, {"type": "text", "text": text}]
        theirs += [{"type": "image", "image": pil(data)}, {"type": "text", "text": text}]
    return [{"role": "user", "content": ours}], [{"role": "user", "content": theirs}]


CASES = {
    "one image, one tile": ([(40, 40)], ["t5 t6 t7"]),
    "one image, 2x2 tiles": ([(120, 110)], ["t9"]),
    "three images": ([(200, 90), (40, 40), (13, 170)], ["t5 t6", "t7", "t8 t9 t10"]),
}


def hf_inputs(processor, hf_messages):
    return processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("template", ["built-in", "jinja"])
def test_chat_ids_and_logits_equal_hf(tiny, llm, processor, tmp_path, case, template):
    import herd

    sizes, texts = CASES[case]
    images = [V.image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    ours, theirs = messages(images, texts)
    if template == "jinja":  # the processor's own chat template, shipped beside the weights
        shutil.copytree(tiny[0], tmp_path / "m")
        (tmp_path / "m" / "chat_template.jinja").write_text(processor.chat_template)
        model = herd.load(tmp_path / "m", dtype="float32")
        assert model.chat_format.name == "template"
    else:
        model = llm
        assert model.chat_format.name == "llama4"
    ids, placed = model.chat_inputs(ours)
    want = hf_inputs(processor, theirs)
    assert ids == want["input_ids"][0].tolist()
    with torch.no_grad():
        ref = tiny[1](input_ids=want["input_ids"], pixel_values=want["pixel_values"].float()).logits[0]
    assert (V.herd_image_logits(model, ids, placed) - ref).abs().max() < TOL


# Processors saved with settings other than the tiny fixture's, by transformers itself, in both layouts it writes
SAVED = {
    "nested, 6 tiles, CLIP's mean and std": (
        "nested", dict(max_patches=6, image_mean=[0.48145466, 0.4578275, 0.40821073],
                       image_std=[0.26862954, 0.26130258, 0.27577711])),
    "flat, 2 tiles on the largest canvas, another rescale": (
        "flat", dict(max_patches=2, resize_to_max_canvas=True, rescale_factor=2 / 255, image_mean=[1.0, 0.9, 1.1],
                     image_std=[1.0, 0.8, 1.25])),
}


def with_processor(tiny, tmp_path, layout: str, **settings):
    """A copy of the tiny checkpoint whose processor files transformers wrote with these settings."""
    out = tmp_path / "m"
    shutil.copytree(tiny[0], out)
    for name in ("processor_config.json", "preprocessor_config.json"):
        (out / name).unlink(missing_ok=True)
    V.write_processor(out, layout, **settings)
    assert (out / "preprocessor_config.json").is_file() == (layout == "flat")
    return out


@pytest.mark.parametrize("case", SAVED)
def test_saved_processor_settings_give_hfs_pixels_ids_and_logits(tiny, tmp_path, case):
    """herd reads every preprocessing setting the checkpoint's processor saved, from processor_config.json's
    "image_processor" (transformers 5) or preprocessor_config.json (transformers 4), as AutoProcessor does:
    the same tiles, the same prompt ids (tile counts), HF's logits."""
    import herd
    from transformers import AutoProcessor

    layout, settings = SAVED[case]
    path = with_processor(tiny, tmp_path, layout, **settings)
    llm = herd.load(path, dtype="float32")
    processor = AutoProcessor.from_pretrained(path)
    assert llm.config.vision.max_tiles == settings["max_patches"]
    for width, height in SIZES:
        assert_hf_pixels(llm, processor, width, height)
    ours, theirs = messages([V.image(200, 90, seed=1), V.image(57, 113, seed=2), V.image(40, 40, seed=3)],
                            ["t5 t6", "t7", "t8"])
    ids, placed = llm.chat_inputs(ours)
    want = hf_inputs(processor, theirs)
    assert ids == want["input_ids"][0].tolist()
    with torch.no_grad():
        ref = tiny[1](input_ids=want["input_ids"], pixel_values=want["pixel_values"].float()).logits[0]
    assert (V.herd_image_logits(llm, ids, placed) - ref).abs().max() < TOL


REFUSED = {  # a setting herd does not implement, and the words its error must hold
    "bicubic resize": (dict(resample=3), "resample is 3 (bicubic)"),
    "no normalisation": (dict(do_normalize=False), "do_normalize is false"),
    "tiles of another size than the encoder's": (dict(size={"height": 112, "width": 112}), 'size is {"height": 112'),
}


@pytest.mark.parametrize("case", REFUSED)
def test_processor_settings_herd_does_not_implement_are_refused(tiny, tmp_path, case):
    """Saved by transformers with a setting herd's preprocessing does not implement: the model loads text-only
    with a warning naming the file and the setting, and an image is refused with the same words (never
    prepared some other way than the checkpoint says)."""
    import herd
    from herd.errors import ImageError

    settings, words = REFUSED[case]
    path = with_processor(tiny, tmp_path, "nested", **settings)
    with pytest.warns(UserWarning, match="processor_config.json: image_processor: " + words.split()[0]):
        llm = herd.load(path, dtype="float32")
    assert not llm.sees_images
    with pytest.raises(ImageError, match=f"cannot see images.*processor_config.json: image_processor: "
                                         f"{words.replace('(', '.').replace(')', '.')}"):
        llm.chat_inputs(messages([V.image(40, 40)], ["t5"])[0])


def test_a_malformed_processor_setting_names_the_file_and_key(tiny, tmp_path):
    import json

    import herd
    from herd.errors import ImageError

    path = with_processor(tiny, tmp_path, "nested")
    config = json.loads((path / "processor_config.json").read_text())
    config["image_processor"]["image_mean"] = ["0.5", "0.5", "0.5"]
    (path / "processor_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="image_processor: field 'image_mean' must be 3 finite numbers"):
        llm = herd.load(path, dtype="float32")
    with pytest.raises(ImageError, match="processor_config.json: image_processor: field 'image_mean'"):
        llm.chat_inputs(messages([V.image(40, 40)], ["t5"])[0])


def test_logits_are_transformers_own_at_every_row(tiny, llm):
    """The tiny checkpoint's embedding has PADDING rows past its tokenizer's tokens. LLM.logits returns the
    model's logits at every row, as transformers does (no -inf where transformers has a number); sampling is
    what never picks those ids (tests/test_hostile_files.py checks the ban)."""
    ids = [V.IDS["<|begin_of_text|>"], 5, 6, 7, 8, 9]
    with torch.no_grad():
        want = tiny[1](input_ids=torch.tensor([ids])).logits[0]
    got = llm.logits(ids)
    assert got.shape == want.shape == (len(ids), V.VOCAB + PADDING)
    assert torch.isfinite(got).all() and (got - want).abs().max() < TOL


def test_greedy_chat_equals_hf_generate(tiny, llm, processor):
    images = [V.image(200, 90, seed=1), V.image(40, 40, seed=2)]
    ours, theirs = messages(images, ["t5 t6", "t7"])
    want = hf_inputs(processor, theirs)
    n = want["input_ids"].shape[1]
    ref = tiny[1].generate(input_ids=want["input_ids"], pixel_values=want["pixel_values"].float(),
                           max_new_tokens=10, do_sample=False, eos_token_id=None)[0, n:].tolist()
    got = llm.chat(ours, max_tokens=10, temperature=0, stop_token_ids=None)
    assert got.token_ids == ref[: len(got.token_ids)] and len(got.token_ids) >= 1
    # an image part given as a file path is the same image
    path = tiny[0] / "picture.png"
    path.write_bytes(images[0])
    by_path = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(path)}},
                                            {"type": "text", "text": "t5 t6"},
                                            {"type": "image_url", "image_url": {"url": data_url(images[1])}},
                                            {"type": "text", "text": "t7"}]}]
    assert llm.chat(by_path, max_tokens=10, temperature=0).token_ids == got.token_ids


def test_encoder_runs_once_per_image_across_turns(llm):
    picture = data_url(V.image(120, 110, seed=9))
    turn = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": picture}},
                                         {"type": "text", "text": "t5"}]}]
    before = llm.image_features.encoded
    first = llm.chat(turn, max_tokens=3, temperature=0)
    conversation = turn + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "t6"}]
    llm.chat(conversation, max_tokens=3, temperature=0)
    assert llm.image_features.encoded == before + 1


def test_prefix_cache_never_shares_blocks_between_images(llm):
    """Two prompts with the same token ids and different pictures: the second must not reuse the first's
    image blocks (its answer equals a run without any cache), while the same picture again is a cache hit."""
    from herd.engine import Engine, Request
    from herd.sampling import SamplingParams

    def request(rid: str, seed: int):
        msgs = [{"role": "user", "content": [{"type": "text", "text": "t3 t4 t5 t6 t7 t8 t9 t10 t11 t12 t13 t14 t15"},
                                             {"type": "image_url", "image_url": {"url": data_url(V.image(40, 40, seed))}},
                                             {"type": "text", "text": "t5 t6"}]}]
        ids, images = llm.chat_inputs(msgs)
        return Request(rid, ids, 4, SamplingParams(temperature=0), images=tuple(images)), msgs

    engine = Engine(llm.model, llm.tokenizer, max_batch=2, block_size=4)

    def run(req):
        return V.run_engine(engine, req)

    a, msgs_a = request("a", 1)
    b, msgs_b = request("b", 2)
    first_image = b.images[0].positions[0]
    tokens_a, _ = run(a)
    tokens_b, cached_b = run(b)
    assert cached_b <= first_image  # only the text before the picture came from the cache
    assert tokens_b == llm.chat(msgs_b, max_tokens=4, temperature=0, stop_token_ids=None).token_ids[:len(tokens_b)]
    again, _ = request("a2", 1)
    tokens_again, cached_again = run(again)
    assert cached_again > first_image and tokens_again == tokens_a


def test_bad_images_are_clear_errors(llm):
    from herd.errors import ImageError

    def ask(url):
        return llm.chat_inputs([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])

    with pytest.raises(ImageError, match="not an image"):
        ask(data_url(b"this is not a picture at all"))
    with pytest.raises(ImageError, match="empty"):
        ask("data:image/png;base64,")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        ask(data_url(V.image(64, 64)[:200]))
    with pytest.raises(ImageError, match="invalid base64"):
        ask("data:image/png;base64,@@@@")
    with pytest.raises(ImageError, match="http"):
        ask("https://example.com/cat.png")
    with pytest.raises(ImageError, match="no such image file"):
        ask("/nonexistent/cat.png")
    llm.max_image_pixels = 100 * 100
    try:
        with pytest.raises(ImageError, match="exceeds the limit"):
            ask(data_url(V.image(101, 100)))
    finally:
        llm.max_image_pixels = None


def test_without_image_weights_text_only_with_a_note_and_image_parts_refused(tiny, tmp_path):
    """A Llama 4 vision checkpoint stripped of its vision tower loads as text only, says so, and refuses
    an image part instead of answering without it."""
    from safetensors.torch import load_file, save_file

    import herd
    from herd.errors import ImageError

    shutil.copytree(tiny[0], tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    state = {k: v for k, v in load_file(file).items() if "vision" not in k and "multi_modal" not in k}
    save_file(state, file, metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="text-only"):
        text_only = herd.load(tmp_path / "m", dtype="float32")
    assert text_only.config.vision is None and "text-only" in text_only.checkpoint.metadata["note"]
    assert not text_only.sees_images
    with pytest.raises(ImageError, match="cannot see images"):
        text_only.chat([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(V.image(40, 40))}}, {"type": "text", "text": "t5"}]}])
    # text runs as before: the same logits as the full model on a text-only prompt
    full = herd.load(tiny[0], dtype="float32")
    ids = [V.IDS["<|begin_of_text|>"], 5, 6, 7]
    assert torch.equal(text_only.logits(ids), full.logits(ids))


def test_fingerprint_covers_image_weights(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    import herd

    shutil.copytree(tiny[0], tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    state = load_file(file)
    name = next(k for k in state if "vision_model" in k and k.endswith("fc1.weight"))
    state[name] = state[name].clone()
    state[name][0, 0] += 1.0
    save_file(state, file, metadata={"format": "pt"})
    assert herd.load(tmp_path / "m", dtype="float32").fingerprint != herd.load(tiny[0], dtype="float32").fingerprint


def test_meta_checkpoint_of_the_same_weights_gives_the_same_logits(tiny, llm, processor, tmp_path):
    """The tiny weights written in Meta's layout (params.json vision_args, vision_embeddings.* and
    vision_projection.weight in consolidated.00.pth): herd's logits equal HF's on a prompt with two images."""
    import herd

    meta = herd.load(V.write_meta(tiny[1], tmp_path / "meta"), dtype="float32")
    import dataclasses

    # the same architecture (the image token id and the tile limit live in HF's config and processor files)
    assert meta.checkpoint.format == "meta" and meta.config.vision == dataclasses.replace(
        llm.config.vision, image_token_id=meta.config.vision.image_token_id, max_tiles=16)
    assert meta.fingerprint == llm.fingerprint
    ours, theirs = messages([V.image(120, 110, seed=5), V.image(40, 40, seed=6)], ["t5", "t6 t7"])
    ids, placed = llm.chat_inputs(ours)  # the Meta directory has no tokenizer: the same ids, placed the same
    want = hf_inputs(processor, theirs)
    with torch.no_grad():
        ref = tiny[1](input_ids=want["input_ids"], pixel_values=want["pixel_values"].float()).logits[0]
    assert (V.herd_image_logits(meta, ids, placed) - ref).abs().max() < TOL


# -- herd serve ---------------------------------------------------------------------------------------------


def _user(picture_url: str, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": picture_url}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def picture_site(tmp_path_factory):
    """A loopback HTTP server with one small and one oversized picture."""
    import functools
    import http.server
    import threading

    root = tmp_path_factory.mktemp("site")
    (root / "small.png").write_bytes(V.image(120, 110, seed=11))
    (root / "big.png").write_bytes(b"\x89PNG" + b"\0" * 300_000)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()


def test_server_answers_images_like_llm_chat_and_batches_them_with_text(llm, picture_site):
    """The official openai client sends image_url parts (data URLs, and http URLs on a server started with
    --allow-image-urls); greedy answers equal LLM.chat's, also while a text request runs in the same batch."""
    import concurrent.futures

    import openai

    from herd.server import create_app
    from tests.fixtures.serving import ServerThread

    picture = data_url(V.image(200, 90, seed=12))
    with_image, text_only = _user(picture, "t5 t6"), [{"role": "user", "content": "t7 t8 t9"}]
    remote = _user(picture_site + "/small.png", "t5")
    want = {name: llm.chat(m, max_tokens=6, temperature=0).text
            for name, m in [("image", with_image), ("text", text_only),
                            ("remote", _user(data_url(V.image(120, 110, seed=11)), "t5"))]}
    app = create_app(llm, max_batch=4, context=512, model_id="tiny", allow_image_urls=True,
                     image_url_max_bytes=100_000)
    with ServerThread(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(messages):
            r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
            return r.choices[0].message.content

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = dict(zip(["image", "text", "remote"], pool.map(ask, [with_image, text_only, remote])))
        assert got == want
        with pytest.raises(openai.BadRequestError, match="limit"):
            ask(_user(picture_site + "/big.png", "t5"))


def test_server_400s_for_bad_images_urls_and_blind_models(llm, tiny, tmp_path):
    import openai
    from safetensors.torch import load_file, save_file

    import herd
    from herd.server import create_app
    from tests.fixtures.serving import ServerThread

    llm.max_image_pixels = 300 * 300
    try:
        with ServerThread(create_app(llm, max_batch=2, context=256, model_id="tiny")) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)

            def ask(url):
                client.chat.completions.create(model="tiny", messages=_user(url, "t5"), max_tokens=2)

            with pytest.raises(openai.BadRequestError, match="not an image Pillow can read"):
                ask(data_url(b"GIF89a but not really"))
            with pytest.raises(openai.BadRequestError, match="exceeds the limit"):
                ask(data_url(V.image(301, 300)))
            with pytest.raises(openai.BadRequestError, match="--allow-image-urls"):
                ask("https://example.com/cat.png")
    finally:
        llm.max_image_pixels = None
    shutil.copytree(tiny[0], tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    save_file({k: v for k, v in load_file(file).items() if "vision" not in k and "multi_modal" not in k}, file,
              metadata={"format": "pt"})
    with pytest.warns(UserWarning):
        blind = herd.load(tmp_path / "m", dtype="float32")
    with ServerThread(create_app(blind, max_batch=2, context=256, model_id="blind")) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        with pytest.raises(openai.BadRequestError, match="cannot see images"):
            client.chat.completions.create(model="blind", messages=_user(data_url(V.image(40, 40)), "t5"),
                                           max_tokens=2)
        r = client.chat.completions.create(model="blind", messages=[{"role": "user", "content": "t5"}], max_tokens=2)
        assert r.choices[0].message.content is not None


# -- the command line ---------------------------------------------------------------------------------------


def test_herd_run_image_and_herd_chat_slash_image(tiny, llm, tmp_path):
    import subprocess
    import sys

    import pexpect

    picture = tmp_path / "picture.png"
    picture.write_bytes(V.image(120, 110, seed=21))
    question = "t5 t6"
    want = llm.chat(_user(str(picture), question), max_tokens=6, temperature=0).text.strip()
    run = subprocess.run([sys.executable, "-m", "herd", "run", str(tiny[0]), "--image", str(picture), question,
                          "--temperature", "0", "--max-tokens", "6"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == want

    child = pexpect.spawn(sys.executable, ["-m", "herd", "chat", str(tiny[0]), "--temperature", "0", "--max-tokens",
                                            "6"], encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        child.expect_exact(">>> ")
        child.sendline(f"/image {tmp_path / 'missing.png'}")
        child.expect_exact("no such image file")
        child.expect_exact(">>> ")
        child.sendline(f"/image {picture}")
        child.expect_exact("attached to your next message")
        child.expect_exact(">>> ")
        child.sendline(question)
        child.expect_exact(">>> ")
        answer = child.before.replace("\r\n", "\n").split(question, 1)[1].strip()
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert answer == want


def test_trainable_quantized_load_keeps_the_encoders_biases(tiny, llm):
    """QLoRA's loader (every linear block-dequantized, frozen) over an image model: the encoder's biased
    linears keep their biases, so image features equal the float path's (itself checked against HF above)."""
    import herd

    qlora = herd.load(tiny[0], quantized="trainable")
    block = qlora.model.vision_embeddings.vision_encoder.transformer.resblocks[0]
    assert block.attn.wq.bias is not None
    ours, _ = messages([V.image(120, 110, seed=4)], ["t5"])
    _, placed = llm.chat_inputs(ours)
    with torch.no_grad():
        got = qlora.model.encode_images(placed[0].tiles)
        want = llm.model.encode_images(placed[0].tiles)
    assert (got - want).abs().max() < 1e-5
