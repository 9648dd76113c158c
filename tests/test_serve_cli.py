"""`herd serve` as a real process: start-up report, API key, and SIGTERM draining an in-flight stream; flags
refused and an address in use said in one line before the model loads (issue 23 items 13 and 21)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import torch

from tests.fixtures.serving import free_port, http

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def proc(smollm2_path, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "herd", "serve", str(smollm2_path), "--port", str(port),
                              "--api-key", "sekret", "--max-batch", "2", "--context", "256", "--dtype", "float32",
                              "--served-model-name", "smol"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=err)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):  # bounded: 120 s for the model to load
            if p.poll() is not None:
                break
            try:
                if http("GET", url + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError("herd serve did not come up")
        assert p.poll() is None, log.read_text()
        yield p, url, log
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(30)


def test_startup_report_and_api_key(proc):
    p, url, log = proc
    text = log.read_text()
    assert "KV cache: 2 sequences x 256 tokens" in text and "MiB" in text and "API key required" in text
    # what runs, in words (--dtype float32 on a Q4_1 file: the exact dequantized path), not a torch dtype
    assert "(gguf on cpu: Q4_1 weights dequantized to fp32, fp32 activations, fp32 KV cache)" in text, text
    assert "torch." not in text
    assert f"listening on {url}/v1 (API key required)" in text, text
    assert http("GET", url + "/v1/models")[0] == 401
    status, body = http("GET", url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    client = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["smol"]
    assert http("GET", url + "/health")[0] == 200  # health and metrics stay open for monitors
    assert http("GET", url + "/metrics")[0] == 200


def test_sigterm_drains_in_flight_stream(proc):
    p, url, _ = proc
    client = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0, timeout=300)
    first = threading.Event()
    result = {}

    def stream():
        chunks = []
        for chunk in client.completions.create(model="smol", prompt="Once upon a time", max_tokens=24,
                                               temperature=0, stream=True):
            chunks.append(chunk)
            first.set()
        result["chunks"] = chunks

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(120)
    p.send_signal(signal.SIGTERM)
    t.join(300)
    chunks = result["chunks"]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert sum(len(c.choices[0].text) > 0 for c in chunks) >= 1
    # uvicorn re-raises the signal once it has shut down gracefully, so the status is 0 or -SIGTERM
    assert p.wait(120) in (0, -signal.SIGTERM)
    json.dumps([c.model_dump() for c in chunks])  # the stream was whole, valid JSON events to the end


def serve(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "herd", "serve", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("flag, value", [("--port", "70000"), ("--port", "-1"), ("--max-body-mb", "-1"),
                                         ("--max-body-mb", "nan"), ("--header-timeout", "nan"),
                                         ("--body-timeout", "inf"), ("--image-url-timeout", "0"),
                                         ("--image-url-max-mb", "-3"), ("--max-images", "0"),
                                         ("--max-image-pixels", "many")])
def test_bad_flags_are_one_line_errors_before_the_model_loads(flag, value):
    """The source does not exist: an error about it would mean the flag was checked after loading began."""
    run = serve("/nonexistent/model.gguf", flag, value)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and "nonexistent" not in run.stderr, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"herd serve: argument {flag}:") and value in last, run.stderr
    assert last.endswith("(see herd serve --help)"), run.stderr


def test_an_address_in_use_is_said_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = serve("/nonexistent/model.gguf", "--port", str(port))
    assert run.returncode != 0
    assert run.stderr.strip() == f"herd serve: cannot listen on 127.0.0.1:{port}: the address is already in use " \
                                 "(is another server running there? pick another --port)", run.stderr


def test_the_banner_says_what_runs(smollm2, smollm2_q):
    """The weights as stored and as computed, whose kernels, and the dtypes of the activations and of the KV cache
    the engine actually allocated."""
    from herd.cli.serve import compute_path
    from herd.quant.linear import PackedLinear
    from herd.server import create_app

    def described(llm, kv_dtype=None):
        engine = create_app(llm, max_batch=1, context=64, kv_dtype=kv_dtype).state.served.engine.engine
        return compute_path(llm, engine.runner.cache.k[0].dtype), engine.runner.cache.k[0].dtype

    kernels = any(isinstance(m, PackedLinear) for m in smollm2_q.model.modules())
    text, kv = described(smollm2_q)
    assert kv == torch.float16
    assert text == ("Q4_1 weights, herd CPU kernels, fp32 activations, fp16 KV cache" if kernels else
                    "Q4_1 weights, PyTorch's quantized matmuls on bf16 inputs, fp32 activations, fp16 KV cache"), text
    text, kv = described(smollm2_q, torch.bfloat16)
    assert kv == torch.bfloat16 and text.endswith("fp32 activations, bf16 KV cache"), text
    text, kv = described(smollm2)
    assert kv == torch.float32 and text == "Q4_1 weights dequantized to fp32, fp32 activations, fp32 KV cache", text
