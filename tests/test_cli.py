"""The `herd` command as a person uses it: a real pseudo-terminal for `herd chat`, real processes for the rest."""

import subprocess
import sys

import pexpect
import pytest

HERD = [sys.executable, "-m", "herd"]


def run(*args, **kwargs):
    return subprocess.run(HERD + list(args), capture_output=True, text=True, timeout=300, **kwargs)


def _answer(child, typed: str) -> str:
    """The streamed answer printed after `typed` (the terminal echoes what was typed first)."""
    child.expect_exact(">>> ")
    return child.before.replace("\r\n", "\n").split(typed, 1)[1].strip("\n")


def test_chat_multi_turn_in_a_terminal(smollm2_path, smollm2_q):
    """Drive `herd chat` through a pseudo-terminal; the second answer must be the model's greedy answer
    to the whole conversation, not to the second message alone. The CLI uses herd's defaults (the
    quantized CPU path for this Q4_1 file), so the reference is the same file loaded with defaults."""
    smollm2 = smollm2_q
    first, second = "My name is Alice and I like green apples.", "What fruit do I like?"
    child = pexpect.spawn(sys.executable, ["-m", "herd", "chat", str(smollm2_path), "--temperature", "0",
                                            "--max-tokens", "40"], encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        child.expect_exact(">>> ")
        child.sendline(first)
        answer1 = _answer(child, first)
        child.sendline(second)
        answer2 = _answer(child, second)
        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.expect_exact(">>> ")
        child.sendline(second)
        answer_alone = _answer(child, second)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    greedy = dict(temperature=0, max_tokens=40)
    turn1 = [{"role": "user", "content": first}]
    assert answer1 == smollm2.chat(turn1, **greedy).text.strip()
    history = turn1 + [{"role": "assistant", "content": answer1}, {"role": "user", "content": second}]
    assert answer2 == smollm2.chat(history, **greedy).text.strip()
    assert answer_alone == smollm2.chat([{"role": "user", "content": second}], **greedy).text.strip()
    assert answer2 != answer_alone  # the first turn changed the second answer


def test_chat_ctrl_c_stops_an_answer_not_the_chat(smollm2_path):
    child = pexpect.spawn(sys.executable, ["-m", "herd", "chat", str(smollm2_path), "--max-tokens", "300"],
                          encoding="utf-8", timeout=120)
    try:
        child.expect_exact(">>> ")
        child.sendline("Write a very long story about a dragon.")
        child.expect(r"\w+ \w+ \w+")  # the answer has started streaming
        child.sendintr()
        child.expect_exact("[stopped]")
        child.expect_exact(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_run_streams_an_answer(smollm2_path):
    result = run("run", str(smollm2_path), "What is the capital of France?", "--temperature", "0", "--max-tokens", "24")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_run_uses_default_model():
    result = run("run", "--raw", "1, 2, 3, 4,", "--temperature", "0", "--max-tokens", "6")
    assert result.returncode == 0, result.stderr
    assert "5" in result.stdout


def test_info(smollm2_path):
    result = run("info", str(smollm2_path))
    assert result.returncode == 0, result.stderr
    for expected in ("llama", "Q4_1", "8,192", "49,152", "gguf"):
        assert expected in result.stdout
    import herd

    assert herd.load(smollm2_path).fingerprint in result.stdout


def test_info_memory(smollm2_path):
    result = run("info", str(smollm2_path), "--memory")
    assert result.returncode == 0, result.stderr
    from herd import kernels

    quantized = "Q4Linear.packed" if kernels.load() else "Int4Linear.weight"  # herd's kernels, else PyTorch's int4
    for expected in (quantized, "KV cache", "peak RSS", "MiB"):
        assert expected in result.stdout


def test_bench_table_shows_ratios():
    """The benchmark's table (no timing is asserted: only that every metric and ratio is printed)."""
    from herd.cli.benchmark import METRICS, table

    fake = {k: 2.0 for k, *_ in METRICS}
    report = dict(path="m.gguf", threads=2, runs=3, prompt_tokens=512, decode_tokens=128,
                  medians={"herd": fake, "llama.cpp": {k: 1.0 for k in fake}, "hf": {k: 4.0 for k in fake}},
                  details={"herd": "torch", "llama.cpp": "0.3.36", "hf": "transformers"})
    text = table(report)
    assert "herd/llama.cpp" in text and "herd/hf" in text and "2.00x" in text and "0.50x" in text
    assert all(label in text for _, label, *_ in METRICS)


def test_list_shows_default_model():
    result = run("list")
    assert result.returncode == 0 and "smollm2-135m" in result.stdout


@pytest.mark.parametrize("source,message", [
    ("/nonexistent/model.gguf", "neither a file"),
    ("meta-llama/Llama-3.1-8B-Instruct", "does not download"),
])
def test_bad_sources_explain(source, message):
    result = run("info", source)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
