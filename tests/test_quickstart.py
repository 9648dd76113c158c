"""The README's quick start, exactly as written, in a fresh clone: the first command sets up and chats."""

import re
import subprocess
from pathlib import Path

import pexpect

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)]


def test_readme_has_two_commands_and_ci_runs_the_second():
    commands = quickstart_commands()
    assert len(commands) == 2
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_first_command_chats_in_a_fresh_clone(tmp_path):
    clone = tmp_path / "herd"
    subprocess.run(["git", "clone", "--quiet", "--depth", "1", f"file://{ROOT}", str(clone)], check=True)
    child = pexpect.spawn("bash", ["-c", quickstart_commands()[0]], cwd=str(clone), encoding="utf-8", timeout=900)
    try:
        child.expect_exact(">>> ")  # set-up finished and the default model is loaded
        child.sendline("Say hello.")
        child.expect_exact(">>> ", timeout=120)
        assert len(child.before.split("Say hello.", 1)[1].strip()) > 0
        child.sendline("/exit")
        child.expect(pexpect.EOF, timeout=60)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
