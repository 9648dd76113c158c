"""The README as a user reads it: the quick start exactly as written in a fresh copy of the tree under test,
and every line of the command-line section run with the default model, so the README cannot drift."""

import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
import torch

from tests.fixtures.serving import free_port, http

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    return README.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def quickstart_commands() -> list[str]:
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section("Quick start"), re.S)]


def copy_of_the_tree(dest: Path) -> Path:
    """The files under test as they are now (committed or not, ignored ones left out), as a fresh clone
    of this tree would hold them once committed."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():  # a deleted but still indexed file is not part of the tree under test
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def test_readme_has_two_commands_and_ci_runs_the_second():
    commands = quickstart_commands()
    assert len(commands) == 2
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_first_command_chats_in_a_fresh_copy(tmp_path, smollm2_q):
    tree = copy_of_the_tree(tmp_path / "herd")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    child = pexpect.spawn("bash", ["-c", quickstart_commands()[0]], cwd=str(tree), encoding="utf-8", timeout=900,
                          env=env, dimensions=(40, 400))
    question = "What is the capital of France?"
    answers = []
    try:
        child.expect_exact(">>> ")  # set-up finished and the default model is loaded
        for _ in range(2):  # a second, fresh sample: one unlucky draw is not a broken model
            child.sendline(question)
            child.expect_exact(">>> ", timeout=120)
            answers.append(child.before.replace("\r\n", "\n").split(question, 1)[1].strip())
            child.sendline("/reset")
            child.expect_exact(">>> ", timeout=60)
        child.sendline("/exit")
        child.expect(pexpect.EOF, timeout=60)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert (tree / ".venv" / "bin" / "herd").exists()  # the set-up made its own environment
    failures = []
    for answer in answers:
        try:
            assert_sampled_by_the_model(smollm2_q, question, answer)
            break
        except AssertionError as e:
            failures.append(e)
    else:
        raise AssertionError(f"neither reply reads as the model's own: {failures}")


def assert_sampled_by_the_model(llm, question: str, answer: str) -> None:
    """`herd chat` samples (SmolLM2's model card settings, temperature 0.2 and top-p 0.9), so its words cannot be
    predicted; but each token of a reply the model really wrote lies in the model's own nucleus at temperature
    0.7 and top-p 0.9 (a wider one than it sampled from), which text from a broken model, a wrong chat format or
    a leaked control token does not."""
    assert answer and "<|" not in answer
    prompt = llm.chat_prompt([{"role": "user", "content": question}])
    reply = llm.tokenizer.encode(answer, bos=False, eos=False)
    logits = llm.logits(prompt + reply)[len(prompt) - 1 : -1].float()
    probs = torch.softmax(logits / 0.7, dim=-1)
    chosen = probs.gather(1, torch.tensor(reply)[:, None])[:, 0]
    mass_above = (probs * (probs > chosen[:, None])).sum(-1)  # probability of the tokens ranked before it
    outside = int((mass_above > 0.97).sum())  # top-p 0.9 never samples these; 0.97 leaves room for re-tokenizing
    assert outside <= max(1, len(reply) // 20), (answer, outside, len(reply))
    assert math.exp(float(torch.log(chosen).mean())) > 0.05, answer


# -- the command-line section, line by line -------------------------------------------------------------------


def command_lines() -> list[list[str]]:
    block = re.findall(r"```sh\n(.*?)```", section("The command line"), re.S)[0]
    return [shlex.split(line, comments=True) for line in block.strip().splitlines() if line.strip()]


def as_test(words: list[str], model: Path, port: int) -> list[str]:
    """A README line made runnable here: model paths become the default model's file, answers are kept
    short, and the server listens on a free port."""
    out = []
    for i, word in enumerate(words[1:]):
        previous = words[i]
        if previous == "--port":
            word = str(port)
        elif not word.startswith("-") and not previous.startswith("--") and ("/" in word or word.endswith(".gguf")):
            word = str(model)
        out.append(word)
    if out[0] in ("run", "chat"):
        out += ["--max-tokens", "4"]
    return [sys.executable, "-m", "herd", *out]


def test_readme_lists_the_commands_it_documents():
    commands = [words[1] for words in command_lines()]
    assert commands == ["run", "run", "run", "chat", "info", "list", "serve"]
    assert all(words[0] == "herd" for words in command_lines())


@pytest.mark.parametrize("index", range(len(command_lines())))
def test_readme_command_line_works(index, smollm2_path, smollm2_q, tmp_path):
    words = command_lines()[index]
    port = free_port()
    argv = as_test(words, smollm2_path, port)
    env = {**os.environ, "HERD_MODELS": str(tmp_path)}
    if words[1] == "serve":
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            for _ in range(600):  # bounded: 60 s to load and listen
                try:
                    status, body = http("GET", f"http://127.0.0.1:{port}/v1/models", timeout=2)
                    break
                except OSError:
                    assert process.poll() is None, process.communicate()[1]
                    time.sleep(0.1)
            assert status == 200, body
            model_id = body["data"][0]["id"]
            status, body = http("POST", f"http://127.0.0.1:{port}/v1/completions",
                                {"model": model_id, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0})
            assert status == 200, body
            assert body["choices"][0]["text"] == smollm2_q.generate(
                "Once upon a time", max_tokens=4, temperature=0).text
        finally:
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=60)
        # uvicorn re-raises SIGTERM once it has shut down gracefully
        assert process.returncode in (0, -signal.SIGTERM), stderr
        assert "Traceback" not in stderr
        return
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env,
                            input="Bonjour\n" if words[1] == "chat" else None)
    assert result.returncode == 0, (argv, result.stderr)
    assert "Traceback" not in result.stderr
    if words[1] == "run" and "--temperature" in words and words[words.index("--temperature") + 1] == "0":
        prompt = next(w for w in words[2:] if not w.startswith("-") and "/" not in w and not w.isdigit())
        assert result.stdout.strip() == smollm2_q.chat([{"role": "user", "content": prompt}], temperature=0,
                                                       max_tokens=4).text.strip()
    elif words[1] == "run":
        assert result.stdout.strip()
    elif words[1] == "chat":
        assert "herd chat:" in result.stdout and ">>> " in result.stdout
    elif words[1] == "info":
        assert smollm2_q.fingerprint in result.stdout
    elif words[1] == "list":
        assert "smollm2-135m" in result.stdout
