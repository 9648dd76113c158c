"""`herd serve` as a real process: start-up report, API key, and SIGTERM draining an in-flight stream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

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
