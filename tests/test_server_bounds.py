"""What one request, or a batch of them, may cost `herd serve` (issue 23, item 10), measured as the server
process's own peak RSS (VmHWM, reset between phases) and a deadline, with /health answering within a second
meanwhile: a set of huge images is refused from their headers, before a pixel is decoded; concurrent large
/tokenize requests are prepared within one body's worth of input at a time (herd.server.budget)."""

from __future__ import annotations

import base64
import io
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.fixtures import vision as V
from tests.fixtures.serving import ServeProcess, health_latencies, http

MB = 1 << 20


def png(width: int, height: int) -> bytes:
    """A black PNG of width x height: a few kilobytes that decode to width * height * 3 bytes of RGB."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_vision(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama4v")
    V.build(path)
    return path


def test_huge_images_are_refused_from_their_headers(tiny_vision, tmp_path):
    """16 PNGs of 7000x7000 (the issue's 750 KB that took a server from 336 MB to 3.7 GB and 177 s): 784 million
    pixels against the default budget of 50 million per request. One of them decoded is 147 MB of RGB; the
    server may grow by less than that, and answers within the deadline."""
    picture = "data:image/png;base64," + base64.b64encode(png(7000, 7000)).decode()
    parts = [{"type": "image_url", "image_url": {"url": picture}} for _ in range(16)]
    body = {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": parts + [
        {"type": "text", "text": "t5"}]}]}
    small = {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
            V.image(60, 50)).decode()}}, {"type": "text", "text": "t5"}]}]}
    with ServeProcess([tiny_vision, "--max-batch", "2", "--context", "512", "--dtype", "float32",
                       "--served-model-name", "tiny"], tmp_path / "serve.log") as srv:
        assert http("POST", srv.url + "/v1/chat/completions", small, timeout=120)[0] == 200  # warm: imports, encoder
        before = srv.reset_peak()
        latencies, (status, answer) = health_latencies(
            srv, lambda: http("POST", srv.url + "/v1/chat/completions", body, timeout=30))
        grown = srv.peak_rss() - before
    assert status == 400, str(answer)[:300]
    message = answer["error"]["message"]
    assert "784,000,000 pixels" in message and "50,000,000" in message, message
    assert grown < 100 * MB, f"the server grew by {grown / MB:.0f} MB"
    assert max(latencies, default=0) < 1.0, latencies


def test_concurrent_large_tokenize_requests_are_prepared_within_one_body(smollm2_path, tmp_path):
    """Six concurrent 1.2 MB /tokenize requests on a server whose body limit is 1.5 MiB: each is tokenized alone
    (two would exceed one body's worth), so together they cost what one costs, not six times as much."""
    rng = random.Random(23)
    words = ["The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog.", "Zürich", "naïve", "42"]

    def text() -> str:
        return " ".join(rng.choice(words) for _ in range(240_000))[:1_200_000]

    prompts = [text() for _ in range(7)]
    with ServeProcess([smollm2_path, "--max-batch", "2", "--context", "256", "--max-body-mb", "1.5",
                       "--served-model-name", "smol"], tmp_path / "serve.log") as srv:
        assert http("POST", srv.url + "/tokenize", {"prompt": "warm up"})[0] == 200
        before = srv.reset_peak()
        status, one = http("POST", srv.url + "/tokenize", {"prompt": prompts[0]}, timeout=300)
        assert status == 200 and one["count"] > 200_000
        alone = srv.peak_rss() - before

        def batch():
            with ThreadPoolExecutor(6) as pool:
                return list(pool.map(lambda p: http("POST", srv.url + "/tokenize", {"prompt": p}, timeout=600),
                                     prompts[1:]))

        before = srv.reset_peak()
        latencies, answers = health_latencies(srv, batch)
        together = srv.peak_rss() - before
    assert all(status == 200 and body["count"] > 200_000 for status, body in answers)
    assert alone > 20 * MB, f"one request grew the server by only {alone / MB:.0f} MB: nothing to compare"
    assert together < 1.5 * alone, f"six together grew it by {together / MB:.0f} MB, one alone by {alone / MB:.0f} MB"
    assert max(latencies, default=0) < 1.0, latencies


def test_the_input_budget_is_first_come_first_served_and_survives_cancellation():
    """herd.server.budget.InputBudget: a share waits while the budget is short, and behind earlier waiters even
    when it would fit; small requests pass; a waiter cancelled leaves the line, and every share comes back."""
    import asyncio

    from herd.server.budget import InputBudget

    async def scenario():
        budget = InputBudget(10, small=1)
        running, gates = [], {name: asyncio.Event() for name in ("a", "b", "c", "d", "big")}

        async def job(name, size):
            async with budget.hold(size):
                running.append(name)
                await gates[name].wait()

        async def settle():
            for _ in range(5):
                await asyncio.sleep(0)

        tasks = {"a": asyncio.ensure_future(job("a", 6))}
        await settle()
        tasks["b"] = asyncio.ensure_future(job("b", 6))  # 6 + 6 > 10: waits
        await settle()
        tasks["c"] = asyncio.ensure_future(job("c", 3))  # would fit beside a, but b came first
        tasks["d"] = asyncio.ensure_future(job("d", 1))  # small: straight ahead
        await settle()
        assert running == ["a", "d"] and budget.used == 6
        tasks["b"].cancel()  # b leaves the line: c fits beside a
        await settle()
        assert running == ["a", "d", "c"] and budget.used == 9
        for name in "acd":
            gates[name].set()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        assert budget.used == 0 and not budget._waiting
        big = asyncio.ensure_future(job("big", 50))  # more than the budget: takes all of it
        await settle()
        assert budget.used == 10
        gates["big"].set()
        await big
        assert budget.used == 0

    asyncio.run(scenario())
