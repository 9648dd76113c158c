"""Images sent to herd serve (issue 23, items 7 and 10), on the tiny Llama 4 vision model of
tests/fixtures/vision.py: an image_url is a data URL, or an http(s) URL on a server started with
--allow-image-urls, never a file on the server (a path, a relative path, file://), and its refusal says the same
whatever the file; errors never quote an image's bytes; a request's images are bounded in number and in
decoded pixels together, read from their headers. Files stay open to the local API (LLM.chat)."""

from __future__ import annotations

import base64
import os

import pytest

from herd.server import create_app
from tests.fixtures import vision as V
from tests.fixtures.serving import ServerThread, http


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def ask(urls: list[str], text: str = "t5") -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"model": "tiny", "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    import herd

    path = tmp_path_factory.mktemp("llama4v")
    V.build(path)
    return herd.load(path, dtype="float32")


@pytest.fixture(scope="module")
def server(llm):
    with ServerThread(create_app(llm, max_batch=2, context=512, model_id="tiny")) as srv:
        yield srv


@pytest.fixture(scope="module")
def fetching(llm):
    with ServerThread(create_app(llm, max_batch=2, context=512, model_id="tiny", allow_image_urls=True)) as srv:
        yield srv


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A real picture, a text file with a secret in it, and names of files that do not exist."""
    root = tmp_path_factory.mktemp("secrets")
    (root / "holiday.png").write_bytes(V.image(40, 40, seed=3))
    (root / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\nsecret-token-1234\n")
    return root


def file_urls(root) -> list[str]:
    picture, text = root / "holiday.png", root / "passwd"
    return [str(picture), f"file://{picture}", os.path.relpath(picture), str(text), f"file://{text}",
            os.path.relpath(text), str(root / "missing.png"), "file:///no/such/file.png", "/etc/passwd",
            "holiday.png", "../../etc/shadow", "C:\\\\Windows\\\\win.ini"]


def test_image_urls_naming_files_are_refused_alike(server, fetching, files):
    """Existing and missing files, pictures and text, absolute, relative and file://: one 400, the same words,
    nothing of the file (its name, size or bytes), and no image fed to the model."""
    for srv, also in ((server, ""), (fetching, " or an http(s) URL")):
        for path in ("/v1/chat/completions", "/tokenize"):
            messages = set()
            for url in file_urls(files):
                body = ask([url])
                if path == "/tokenize":
                    body = {"messages": body["messages"]}
                status, answer = http("POST", srv.url + path, body, timeout=120)
                assert status == 400, (path, url, answer)
                error = answer["error"]
                assert error["param"] == "messages" and error["type"] == "invalid_request_error", error
                messages.add(error["message"])
            assert len(messages) == 1, (path, messages)
            message = messages.pop()
            for leak in ("holiday", "passwd", "root:x", "secret-token", "missing", "bytes", str(files)):
                assert leak not in message, (leak, message)
            if path == "/v1/chat/completions":
                assert "data URL" in message and "reads no files" in message and also in message, message


def test_files_stay_open_to_the_local_api_and_errors_never_quote_bytes(llm, files):
    from herd.errors import ImageError

    _, placed = llm.chat_inputs(ask([str(files / "holiday.png")])["messages"])
    assert len(placed) == 1  # LLM.chat reads the caller's own files, as before
    with pytest.raises(ImageError, match="not an image Pillow can read") as e:
        llm.chat_inputs(ask([str(files / "passwd")])["messages"])
    assert "root:x" not in str(e.value) and "secret-token" not in str(e.value), e.value
    secret = base64.b64encode(b"root:x:0:0 secret-token-1234 " * 10).decode()
    with pytest.raises(ImageError, match="not an image Pillow can read") as e:
        llm.chat_inputs(ask(["data:image/png;base64," + secret])["messages"])
    assert "root:x" not in str(e.value) and "secret-token" not in str(e.value), e.value


def test_data_urls_and_allowed_http_urls_still_work(server, llm):
    picture = V.image(70, 50, seed=5)
    want = llm.chat(ask([data_url(picture)])["messages"], max_tokens=2, temperature=0).text
    status, answer = http("POST", server.url + "/v1/chat/completions", ask([data_url(picture)]), timeout=120)
    assert status == 200 and answer["choices"][0]["message"]["content"] == want, answer
    status, answer = http("POST", server.url + "/v1/chat/completions", ask(["https://example.com/cat.png"]))
    assert status == 400 and "--allow-image-urls" in answer["error"]["message"], answer


def test_a_requests_images_are_bounded_in_number_and_pixels(llm):
    """The limits hold for the images of one request together, and are read from headers: a request past the
    pixel budget is refused even when each image alone is small."""
    app = create_app(llm, max_batch=2, context=1024, model_id="tiny", max_images=3, max_image_pixels=100 * 100)
    with ServerThread(app) as srv:
        def post(urls):
            return http("POST", srv.url + "/v1/chat/completions", ask(urls), timeout=120)

        small = data_url(V.image(40, 40, seed=1))  # 1,600 pixels
        assert post([small] * 3)[0] == 200
        status, answer = post([small] * 4)
        assert status == 400 and "4 images" in answer["error"]["message"] and "limit is 3" in \
            answer["error"]["message"], answer
        wide = data_url(V.image(90, 90, seed=2))  # 8,100 pixels: alone within the budget, with another past it
        assert post([wide])[0] == 200
        status, answer = post([wide, small, small])
        message = answer["error"]["message"]
        assert status == 400 and "11,300 pixels" in message and "10,000" in message, answer
