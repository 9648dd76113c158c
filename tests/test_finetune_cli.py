"""`herd finetune` as a person runs it, on the tiny Llama 3 fixture: a previous run's results are not overwritten
silently, a run that diverges stops at the first non-finite loss with nothing written, a missing matplotlib is
said before loading, and the progress bar estimates the time left however slow a step is."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_gguf():
    from tests.fixtures import build as B

    return B.reference("llama3").gguf("F32")


@pytest.fixture
def train(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"the cat {i}", "completion": " sat on the mat"}) + "\n"
                            for i in range(8)))
    return path


def finetune(*args, before: str = ""):
    """`herd finetune ARGS` in a process of its own; `before`: Python run first (to hide a package)."""
    code = f"{before}\nimport sys\nfrom herd.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "finetune", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_previous_run_is_kept_unless_overwrite_and_continued_with_resume(tmp_path, tiny_gguf, train):
    out = tmp_path / "run"
    common = [tiny_gguf, "--data", train, "--out", out, "--steps", "2", "--batch-size", "2", "--save-every", "1"]
    first = finetune(*common)
    assert first.returncode == 0, first.stderr
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    (out / "checkpoints" / "step-99").mkdir()  # a stale checkpoint a later --resume would pick
    (out / "checkpoints" / "step-99" / "trainer.pt").write_text("stale")

    again = finetune(*common, "--lr", "1e-2")
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.strip().count("\n") == 0 and "--overwrite" in again.stderr and str(out) in again.stderr
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter  # kept, byte for byte

    replaced = finetune(*common, "--lr", "1e-2", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() != adapter
    assert not (out / "checkpoints" / "step-99").exists()  # the previous run is gone, not mixed in

    resumed = finetune(tiny_gguf, "--data", train, "--out", out, "--steps", "3", "--batch-size", "2", "--lr", "1e-2",
                       "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "3 steps" in resumed.stdout


def test_a_diverging_run_stops_at_the_first_non_finite_loss(tmp_path, tiny_gguf, train):
    """A finite but absurd learning rate makes the second step's loss NaN: the run stops there, says so in one
    line, exits non-zero and writes no adapter (before, --lora-alpha inf trained to NaN and exited 0)."""
    out = tmp_path / "run"
    done = finetune(tiny_gguf, "--data", train, "--out", out, "--steps", "4", "--batch-size", "2", "--lr", "1e30",
                    "--max-grad-norm", "0")
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr and "diverged" in last and "step 2" in last, done.stderr
    assert not (out / "adapter").exists()


def test_without_matplotlib_the_run_says_so_before_loading_and_claims_no_curve(tmp_path, tiny_gguf, train):
    out = tmp_path / "run"
    done = finetune(tiny_gguf, "--data", train, "--out", out, "--steps", "1", "--batch-size", "2",
                    before="import sys; sys.modules['matplotlib'] = None")
    assert done.returncode == 0, done.stderr
    assert "llama-herd[finetune]" in done.stderr.splitlines()[0]  # the first thing said, before the model loads
    assert "loss.png" not in done.stdout and not (out / "loss.png").exists() and (out / "adapter").is_dir()


def test_the_progress_bar_estimates_the_time_left_with_slow_steps():
    """rich's own estimate uses the last 30 s only: with steps slower than that it stayed "-:--:--". herd's uses
    the run's mean step time: after 3 steps of 40 s each, 7 steps to go are 280 s."""
    from rich.console import Console

    from herd.finetune import _progress

    class Trainer:
        step, total_steps = 0, 10

    now = [0.0]
    screen = io.StringIO()
    with _progress(True, Trainer(), console=Console(file=screen, force_terminal=True, width=160),
                   clock=lambda: now[0]) as report:
        for step in (1, 2, 3):
            now[0] += 40.0
            report({"step": step, "loss": 1.0, "lr": 1e-4, "tokens_per_s": 100.0})
    shown = screen.getvalue()
    assert "time left 0:04:40" in shown and "-:--:--" not in shown, shown
