"""A real headless browser (Debian's chromium through Selenium) on the arena with two real models:
SmolLM2-135M-Instruct and a copy with one quantized weight changed (another fingerprint, another
contestant). The page is opened at a phone's width, a two-turn battle is run, the names must not be in the page
before the vote, and after it the leaderboard page shows the vote.
"""

from __future__ import annotations

import shutil

import pytest

from tests.fixtures.serving import ServerThread

selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                       "chromium-driver; ./setup.sh --dev does it as root)")


def perturbed_copy(src, dst):
    """The same GGUF with the low bit of one 4-bit weight of blk.0.ffn_down flipped."""
    from gguf import GGUFReader

    shutil.copyfile(src, dst)
    tensor = next(t for t in GGUFReader(str(src)).tensors if t.name == "blk.0.ffn_down.weight")
    assert tensor.tensor_type.name == "Q4_1"
    offset = int(tensor.data_offset) + 4 + 5  # past the block's two fp16 scales: inside its nibbles
    with open(dst, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 1]))
    return dst


@pytest.fixture(scope="module")
def arena_server(smollm2_path, tmp_path_factory):
    import herd
    from herd.arena.config import ArenaConfig
    from herd.arena.contestants import LocalContestant
    from herd.arena.service import Arena
    from herd.arena.store import Store
    from herd.arena.web import create_arena_app

    root = tmp_path_factory.mktemp("arena")
    tweaked = perturbed_copy(smollm2_path, root / "tweaked.gguf")
    config = ArenaConfig(secret="browser-test", bootstrap_rounds=20, sampling={"temperature": 0.0})
    arena = Arena(Store(f"sqlite:///{root / 'arena.db'}"), sampling=config.sampling, max_tokens=12,
                  bootstrap_rounds=config.bootstrap_rounds)
    for name, path in [("smollm2-original", smollm2_path), ("smollm2-tweaked", tweaked)]:
        arena.enter(LocalContestant(name, herd.load(path, device="cpu"), source=str(path), context=256))
    fingerprints = [c.fingerprint for c in arena.playing.values()]
    assert len(set(fingerprints)) == 2
    with ServerThread(create_arena_app(arena, config)) as server:
        yield server, arena, fingerprints


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=390,844"):  # a phone's width
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout=240):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d))


def test_a_battle_in_a_real_browser(arena_server, browser):
    from selenium.webdriver.common.by import By

    server, arena, fingerprints = arena_server
    names = ("smollm2-original", "smollm2-tweaked")
    browser.get(server.url + "/leaderboard")
    wait_for(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "0")

    browser.get(server.url + "/")
    assert not any(n in browser.page_source for n in names)
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    browser.find_element(By.ID, "prompt").send_keys("What is the capital of France?")
    browser.find_element(By.ID, "send").click()
    wait_for(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "answered")
    answers = [browser.find_element(By.CSS_SELECTOR, f"#answer-{s} .text").text for s in "ab"]
    assert all(a.strip() for a in answers)  # both models answered, streamed into the page
    page = browser.page_source
    assert not any(n in page for n in names) and not any(fp[:16] in page for fp in fingerprints)
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")

    browser.find_element(By.ID, "prompt").send_keys("And of Italy?")  # a second turn, the same pair
    browser.find_element(By.ID, "send").click()
    wait_for(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "answered")
    for side in "ab":
        turns = browser.find_elements(By.CSS_SELECTOR, f"#answer-{side} .turn .text")
        assert len(turns) == 2 and all(t.text.strip() for t in turns)
    assert not any(n in browser.page_source for n in names)

    browser.find_element(By.ID, "vote-a").click()
    wait_for(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "voted")
    revealed = browser.find_element(By.ID, "reveal-a").text + browser.find_element(By.ID, "reveal-b").text
    assert all(n in revealed for n in names)
    winner = browser.find_element(By.ID, "reveal-a").text.split(": ")[1].split(" (")[0]

    browser.get(server.url + "/leaderboard")
    wait_for(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "1")
    rows = browser.find_element(By.ID, "raw").find_elements(By.CSS_SELECTOR, "tbody tr")
    assert len(rows) == 2 and winner in rows[0].text and "provisional" in rows[0].text
    record = arena.store.records()[0]
    assert record["winner"] == "model_a" and record["turn"] == 2
    assert {arena.store.records()[0]["fingerprint_a"], arena.store.records()[0]["fingerprint_b"]} == set(fingerprints)


# -- the leaderboard's layout (issue 23): inside the viewport at a laptop's and a phone's width ----------------

LAYOUT_SIZES = [(1280, 800), (390, 844)]
ERROR_COLOUR = "rgb(170, 0, 0)"  # #a00, the battle page's error colour

CELLS_OUTSIDE = """
const width = document.documentElement.clientWidth, out = [];
for (const cell of document.querySelectorAll("td, th")) {
  const r = cell.getBoundingClientRect();
  if (r.width === 0 && r.height === 0) continue;
  if (r.left >= -0.5 && r.right <= width + 0.5) continue;
  // a matrix may scroll sideways inside a container made for it; the boards themselves must fit
  const box = cell.closest(".scroll");
  if (box && !cell.closest("table.board") && ["auto", "scroll"].includes(getComputedStyle(box).overflowX)) {
    const b = box.getBoundingClientRect();
    if (b.left >= -0.5 && b.right <= width + 0.5) continue;
  }
  out.push((cell.closest("[id]") || {}).id + ": " + cell.textContent.slice(0, 30) + " at " +
           Math.round(r.left) + ".." + Math.round(r.right) + " of " + width);
}
return out;
"""


@pytest.fixture(scope="module")
def board_server(tmp_path_factory):
    """A scripted arena (instant answers) whose record has variants, a claimed endpoint fingerprint, a long
    name and answers with markdown, so both boards (raw and style controlled) are full."""
    import random

    from herd.arena.web import create_arena_app
    from tests.test_arena_web import Scripted, make_arena

    class Claimed(Scripted):
        kind, verified = "endpoint", False

    arena, config = make_arena(tmp_path_factory.mktemp("layout"))
    arena.enter(Scripted("alpha-model", "c" * 64, ["Another", " alpha"]))  # a second variant of alpha-model
    arena.enter(Scripted("a-contestant-with-a-rather-long-name-for-a-phone", "d" * 64, ["Long", " name"]))
    arena.enter(Claimed("claims-to-be-herd", "e" * 64, ["Claimed"]))
    ids = list(arena.playing)
    rng = random.Random(25)
    for i in range(90):
        a, b = rng.sample(ids, 2)
        uid = arena.store.create_battle("human", a, b, {"temperature": 0.7, "max_tokens": 32}, "c")
        answers = ["# Title\n- **one**\n- two " + "word " * rng.randrange(40), "plain " * rng.randrange(60)]
        rng.shuffle(answers)
        arena.store.save_answers(uid, [{"role": "user", "content": "q"}, {"role": "assistant", "content": answers[0]}],
                                 [{"role": "user", "content": "q"}, {"role": "assistant", "content": answers[1]}],
                                 rng.randrange(5, 80), rng.randrange(5, 80))
        winner = "model_a" if (a == ids[0]) != (rng.random() < 0.3) else rng.choice(["model_b", "tie"])
        assert arena.store.vote(uid, winner, f"voter{i}")
    with ServerThread(create_arena_app(arena, config)) as server:
        yield server, arena


def test_the_leaderboard_fits_a_laptop_and_a_phone(board_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    server, arena = board_server
    fingerprints = {c.fingerprint for c in arena.playing.values()}
    try:
        for width, height in LAYOUT_SIZES:
            browser.set_window_size(width, height)
            browser.get(server.url + "/leaderboard")
            wait_for(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"), timeout=60)
            assert int(browser.find_element(By.TAG_NAME, "body").get_attribute("data-loaded")) >= 90
            assert browser.execute_script("return window.innerWidth") == width
            assert browser.execute_script(CELLS_OUTSIDE) == [], width
            assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
            for board in ("raw", "style"):
                shown = browser.find_element(By.ID, board)
                text = shown.text  # visible text only: a tooltip does not count
                assert all(fp[:16] in text for fp in fingerprints), (width, board)
                notes = [n.text for n in shown.find_elements(By.CSS_SELECTOR, ".note")]
                assert notes.count("claimed by the endpoint, not verified") == 1 and notes.count("verified") == 4
                rows = shown.find_elements(By.CSS_SELECTOR, "tbody tr")
                names = [r.get_attribute("class") + ":" + r.find_elements(By.TAG_NAME, "td")[1 if r.get_attribute(
                    "class") != "group" else 0].text.split("\n")[0] for r in rows]
                heading = next(i for i, n in enumerate(names) if n.startswith("group:alpha-model"))
                assert [n.split(" ")[0] for n in names[heading + 1:heading + 3]] == ["variant:alpha-model"] * 2
                assert sum(n.startswith("variant:") for n in names) == 2  # the variants sit together, under the name
            browser.set_window_size(width, min(browser.execute_script("return document.body.scrollHeight") + 40, 6000))
            browser.save_screenshot(str(tmp_path / f"leaderboard-{width}.png"))
            browser.set_window_size(width, height)

            browser.get(server.url + "/")  # the battle page: the vote's thanks is not shown as an error
            browser.find_element(By.ID, "prompt").send_keys("Say hi")
            browser.find_element(By.ID, "send").click()
            wait_for(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "answered",
                     timeout=60)
            browser.find_element(By.ID, "vote-tie").click()
            wait_for(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "voted",
                     timeout=60)
            message = browser.find_element(By.ID, "message")
            assert "vote recorded" in message.text and message.value_of_css_property("color") != ERROR_COLOUR
            assert "verified" in browser.find_element(By.ID, "reveal-a").text
            assert browser.execute_script(CELLS_OUTSIDE) == []
            assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
            browser.save_screenshot(str(tmp_path / f"battle-{width}.png"))
    finally:
        browser.set_window_size(390, 844)
