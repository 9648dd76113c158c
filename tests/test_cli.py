"""The `herd` command as a person uses it: a real pseudo-terminal for `herd chat`, real processes for the rest."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

HERD = [sys.executable, "-m", "herd"]
ROOT = Path(__file__).resolve().parents[1]


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


# ---- hostile input: one-line errors, before anything loads -------------------------------------------------------

# Runs herd's entry point (herd.cli.main, what the `herd` script calls) on many argument lists in one process, so
# the probe costs one interpreter start; herd.load is replaced by a refusal, so a case that reaches it fails:
# every check here must come before the model loads. sys.modules entries set to None stand for packages that are
# not installed.
PROBE = r"""
import contextlib, io, json, sys, traceback
import herd, herd.cli

def refuse(*args, **kwargs):
    raise AssertionError("herd.load was called: this check must come before loading")

herd.load = refuse
request = json.load(sys.stdin)
for name in request["missing"]:
    sys.modules[name] = None
results = []
for argv in request["cases"]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = herd.cli.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append({"argv": argv, "code": code, "stderr": err.getvalue()})
print(json.dumps(results))
"""


def probe(cases: list[list[str]], missing=()) -> list[dict]:
    request = json.dumps({"cases": [[str(a) for a in c] for c in cases], "missing": list(missing)})
    done = subprocess.run([sys.executable, "-c", PROBE], input=request, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def assert_one_line_error(result: dict, names: str) -> None:
    err = result["stderr"].strip()
    assert result["code"] not in (0, None), result
    assert "Traceback" not in err, err
    assert "\n" not in err, f"more than one line: {err!r}"
    assert names in err, f"{result['argv']}: {err!r} does not name {names!r}"


@pytest.fixture(scope="module")
def tiny_gguf():
    from tests.fixtures import build as B

    return B.reference("llama3").gguf("F32")


@pytest.fixture
def hostile_files(tmp_path):
    """Data and paths a careless user or an attacker hands herd."""
    f = tmp_path
    (f / "a-file").write_text("hi\n")
    (f / "a-dir").mkdir()
    (f / "bad.png").write_bytes(b"not a png at all")
    (f / "train.jsonl").write_text("".join(json.dumps({"prompt": f"the cat {i}", "completion": " sat"}) + "\n"
                                           for i in range(8)))
    (f / "deep.jsonl").write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    (f / "surrogate.jsonl").write_text('{"text": "a\\ud800b"}\n')
    (f / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (f / "huge.jsonl").write_text(json.dumps({"text": "word " * 500_000}) + "\n")
    (f / "types.jsonl").write_text(json.dumps({"messages": [{"role": 1, "content": "x"}]}) + "\n")
    (f / "previous").mkdir()
    (f / "previous" / "adapter").mkdir()
    (f / "full-dir").mkdir()
    (f / "full-dir" / "x").write_text("keep me")
    return f


def hostile_cases(f: Path, tiny: Path) -> list[tuple[list, str]]:
    """(argv, text the one-line error must contain): every subcommand with hostile flags and inputs."""
    ft = ["finetune", tiny, "--data", f / "train.jsonl", "--out", f / "run"]
    return [
        # run / chat: sampling flags checked before the model loads (herd.sampling's ranges)
        (["run", "--temperature", "nan", "hi"], "--temperature"),
        (["run", "--temperature", "-1", "hi"], "--temperature"),
        (["run", "--top-p", "5", "hi"], "--top-p"),
        (["run", "--top-p", "0", "hi"], "--top-p"),
        (["run", "--min-p", "2", "hi"], "--min-p"),
        (["run", "--repetition-penalty", "0", "hi"], "--repetition-penalty"),
        (["run", "--repetition-penalty", "inf", "hi"], "--repetition-penalty"),
        (["run", "--top-k", "x", "hi"], "--top-k"),
        (["run", "--seed", str(2**70), "hi"], "--seed"),
        (["run", "--device", "cuda:99", "hi"], "--device"),
        (["run", "--device", "bogus", "hi"], "--device"),
        (["run", "--threads", "100000", "hi"], "--threads"),
        (["run", "--threads", "0", "hi"], "--threads"),
        (["run", "--max-tokens", "0", "hi"], "--max-tokens"),
        (["run", "--raw", ""], "prompt is empty"),
        (["run", ""], "prompt is empty"),
        (["run", "--image", f / "bad.png", "hi"], "bad.png"),  # decoded before the model loads
        (["run", "--image", f / "missing.png", "hi"], "missing.png"),
        (["run", "--raw", "--image", f / "bad.png", "hi"], "--image"),
        (["run", "--adapter", "a=b", "--adapter", "c", "hi"], "--adapter"),
        (["chat", "--top-p", "5"], "--top-p"),
        (["chat", "--temperature", "inf"], "--temperature"),
        (["chat", "--device", "cuda:99"], "--device"),
        # info / list / plan: files that are not files
        (["info", "/proc/self/mem"], "/proc/self/mem"),
        (["info", "/dev/null"], "/dev/null"),
        (["info", f / "a-file"], "a-file"),
        (["info", "no-such-model-here"], "no-such-model-here"),
        (["list", "extra"], "extra"),
        (["plan", "/proc/self/mem", "--devices", "1xCPU-8GB"], "/proc/self/mem"),
        (["plan", tiny, "--devices", "bogus"], "bogus"),
        (["plan", tiny, "--devices", "1xCPU-8GB", "--memory-fraction", "nan"], "--memory-fraction"),
        # quantize / export: outputs checked before the weights load
        (["quantize", f / "a-dir", "--to", "q4", f / "q"], "a-dir"),
        (["quantize", f / "a-dir", "--to", "q3", f / "q"], "--to"),
        (["export", tiny, "--to", "hf", f / "a-file"], "a-file"),
        (["export", tiny, "--to", "meta", f / "a-file"], "a-file"),
        (["export", tiny, "--to", "hf", f / "full-dir"], "full-dir"),
        (["export", tiny, "--to", "hf", f / "a-file" / "below"], "a-file"),
        (["export", tiny, "--to", "gguf", f / "missing" / "x.gguf"], "missing"),
        (["export", tiny, "--to", "gguf", f / "a-file"], "a-file"),
        # finetune: settings, --out, --resume and the data, all before the model loads
        (ft + ["--lr", "nan"], "--lr"),
        (ft + ["--lr", "-1"], "--lr"),
        (ft + ["--lora-alpha", "inf"], "--lora-alpha"),
        (ft + ["--lora-targets", "bogus"], "bogus"),
        (ft + ["--lora-targets", ","], "--lora-targets"),
        (ft + ["--lora-dropout", "2"], "--lora-dropout"),
        (ft + ["--weight-decay", "-1"], "--weight-decay"),
        (ft + ["--max-grad-norm", "nan"], "--max-grad-norm"),
        (ft + ["--method", "dpo", "--dpo-beta", "nan"], "--dpo-beta"),
        (ft + ["--epochs", "0"], "--epochs"),
        (ft + ["--epochs", "nan"], "--epochs"),
        (ft + ["--seed", str(2**70)], "--seed"),
        (ft + ["--threads", "100000"], "--threads"),
        (ft + ["--device", "cuda:99"], "--device"),
        (ft + ["--resume", "/etc"], "/etc"),
        (ft + ["--resume"], "no checkpoint"),
        (ft + ["--resume", "--overwrite"], "--overwrite"),
        (ft + ["--method", "dpo"], "train.jsonl"),
        (["finetune", tiny, "--data", f / "train.jsonl", "--out", f / "a-file"], "a-file"),
        (["finetune", tiny, "--data", f / "train.jsonl", "--out", f / "previous"], "--overwrite"),
        (["finetune", tiny, "--data", f / "deep.jsonl", "--out", f / "run"], "deep.jsonl:1"),
        (["finetune", tiny, "--data", f / "surrogate.jsonl", "--out", f / "run"], "surrogate.jsonl:1"),
        (["finetune", tiny, "--data", f / "latin1.jsonl", "--out", f / "run"], "latin1.jsonl:1"),
        (["finetune", tiny, "--data", f / "huge.jsonl", "--out", f / "run"], "huge.jsonl:1"),
        (["finetune", tiny, "--data", f / "types.jsonl", "--out", f / "run"], "types.jsonl:1"),
        (["finetune", tiny, "--data", f / "a-dir", "--out", f / "run"], "a-dir"),
        (["finetune", tiny, "--data", f / "train.jsonl", "--eval-data", f / "deep.jsonl", "--out", f / "run"],
         "deep.jsonl:1"),
        # bench: checked before anything is installed or measured
        (["bench", "--runs", "0"], "--runs"),
        (["bench", "--engines", "bogus"], "--engines"),
        (["bench", "--threads", "100000"], "--threads"),
        (["bench", "--decode-tokens", "0"], "--decode-tokens"),
    ]


def test_hostile_input_gives_one_line_errors_before_loading(hostile_files, tiny_gguf):
    """Issue 23, finding 13: each case ends with a non-zero exit and one line naming the input, no traceback, and
    without loading a model (the probe refuses herd.load)."""
    cases = hostile_cases(hostile_files, tiny_gguf)
    results = probe([argv for argv, _ in cases])
    for (argv, names), result in zip(cases, results):
        assert_one_line_error(result, names)
    assert not (hostile_files / "run").exists()  # nothing was written by a refused run


def test_a_missing_optional_package_names_its_extra_before_loading(hostile_files, tiny_gguf):
    """Finding 19: `export --to gguf` in an environment without gguf-py (a dependency since the plain setup should
    export; older installs lack it) says what to install, in one line, before loading; so does any command whose
    optional import fails deeper inside (the arena's store without SQLAlchemy), naming its extra, through the
    entry point's own net."""
    f = hostile_files
    results = probe([["export", tiny_gguf, "--to", "gguf", f / "out.gguf"],
                     ["arena", "export", "--db", f / "arena.db"]], missing=["gguf", "sqlalchemy"])
    assert_one_line_error(results[0], "pip install 'gguf'")
    assert_one_line_error(results[1], "llama-herd[arena]")
    assert not (f / "out.gguf").exists()


@pytest.mark.parametrize("argv, names", [
    (["run", "--temperature", "nan", "hi"], "--temperature"),
    (["run", "--top-p", "5", "hi"], "--top-p"),
    (["run", "--seed", str(2**70), "hi"], "--seed"),
    (["run", "--threads", "100000", "hi"], "--threads"),
    (["run", "--raw", ""], "prompt is empty"),
    (["info", "/proc/self/mem"], "/proc/self/mem"),
])
def test_hostile_flags_in_a_real_process(argv, names):
    """The same errors from the installed entry point in a process of its own (`python -m herd`)."""
    result = run(*argv)
    assert_one_line_error({"argv": argv, "code": result.returncode, "stderr": result.stderr}, names)


def test_hostile_finetune_and_export_in_a_real_process(hostile_files, tiny_gguf):
    for argv, names in ((["finetune", tiny_gguf, "--data", hostile_files / "train.jsonl", "--out",
                          hostile_files / "run", "--lr", "nan"], "--lr"),
                        (["export", tiny_gguf, "--to", "hf", hostile_files / "a-file"], "a-file")):
        result = run(*map(str, argv))
        assert_one_line_error({"argv": argv, "code": result.returncode, "stderr": result.stderr}, names)


# ---- the model's own sampling settings (finding 20) ----------------------------------------------------------------

SAMPLING_KEYS = {"temperature": "SAMPLING_TEMP", "top_k": "SAMPLING_TOP_K", "top_p": "SAMPLING_TOP_P",
                 "min_p": "SAMPLING_MIN_P", "repetition_penalty": "SAMPLING_PENALTY_REPEAT"}


TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"  # the tiny fixture has no chat format


def gguf_with_sampling(src: Path, dst: Path, **values) -> Path:
    """A copy of `src` with general.sampling.* keys (and a chat template), written by gguf-py's own
    gguf_new_metadata."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst), arch=reader.get_field(gguf.Keys.General.ARCHITECTURE).contents(),
                             endianess=reader.endianess)
    kind = {"top_k": gguf.GGUFValueType.INT32}
    new = {getattr(gguf.Keys.General, SAMPLING_KEYS[k]): MetadataDetails(kind.get(k, gguf.GGUFValueType.FLOAT32), v)
           for k, v in values.items()}
    new[gguf.Keys.Tokenizer.CHAT_TEMPLATE] = MetadataDetails(gguf.GGUFValueType.STRING, TEMPLATE)
    copy_with_new_metadata(reader, writer, new, [])
    return dst


def test_sampling_defaults_come_from_the_gguf_and_flags_win(tmp_path, tiny_gguf):
    import herd

    shipped = dict(temperature=0.3, top_k=7, top_p=0.8, min_p=0.05, repetition_penalty=1.1)
    path = gguf_with_sampling(tiny_gguf, tmp_path / "tuned.gguf", **shipped)
    llm = herd.load(path)
    assert llm.sampling_defaults == (shipped, "tuned.gguf's general.sampling keys")
    assert herd.load(tiny_gguf).sampling_defaults == ({}, "")
    # the CLI says what it uses: the file's settings, and a flag over one of them
    said = run("run", str(path), "--raw", "the cat", "--max-tokens", "2", "--verbose")
    assert said.returncode == 0, said.stderr
    assert ("sampling: temperature 0.3, top-p 0.8, top-k 7, min-p 0.05, repetition-penalty 1.1 (from tuned.gguf's "
            "general.sampling keys)") in said.stderr
    said = run("run", str(path), "--raw", "the cat", "--max-tokens", "2", "--verbose", "--temperature", "0")
    assert said.returncode == 0, said.stderr
    assert "temperature 0, top-p 0.8, top-k 7" in said.stderr and "and your flags" in said.stderr
    # LLM.chat uses them for what the caller leaves out: a file that ships temperature 0 answers greedily at any
    # seed, while the same weights without the key sample (temperature 1); a keyword given wins over the file
    greedy_file = herd.load(gguf_with_sampling(tiny_gguf, tmp_path / "greedy.gguf", temperature=0.0))
    plain = herd.load(gguf_with_sampling(tiny_gguf, tmp_path / "plain.gguf"))
    messages = [{"role": "user", "content": "the cat sat on the"}]
    greedy = plain.chat(messages, max_tokens=12, temperature=0).token_ids
    assert all(greedy_file.chat(messages, max_tokens=12, seed=s).token_ids == greedy for s in range(4))
    assert any(plain.chat(messages, max_tokens=12, seed=s).token_ids != greedy for s in range(4))
    for s in range(3):
        assert greedy_file.chat(messages, max_tokens=12, temperature=1.0, seed=s).token_ids == \
            plain.chat(messages, max_tokens=12, temperature=1.0, seed=s).token_ids


def test_sampling_defaults_come_from_generation_config(hf_dir):
    """The reference is transformers' own GenerationConfig reading the same file."""
    import herd
    from transformers import GenerationConfig

    config = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05,
              "repetition_penalty": 1.05, "bos_token_id": 1, "eos_token_id": 2}
    (hf_dir / "generation_config.json").write_text(json.dumps(config))
    values, source = herd.load(hf_dir).sampling_defaults
    reference = GenerationConfig.from_pretrained(hf_dir)
    assert values == {k: getattr(reference, k) for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")}
    assert source == "generation_config.json"
    (hf_dir / "generation_config.json").write_text(json.dumps({**config, "do_sample": False}))
    assert herd.load(hf_dir).sampling_defaults[0] == {"temperature": 0}  # transformers: greedy, the rest unused
    (hf_dir / "generation_config.json").write_text(json.dumps({**config, "top_p": 5, "top_k": "x"}))
    values, _ = herd.load(hf_dir).sampling_defaults  # what herd.sampling refuses is left out, not fatal
    assert values == {"temperature": 0.6, "min_p": 0.05, "repetition_penalty": 1.05}


def test_chat_on_the_default_model_uses_the_model_cards_settings_and_says_so():
    """SmolLM2's GGUF ships no sampling keys: its model card's temperature 0.2 and top-p 0.9, and a reply of at most
    256 tokens, not 1,024 tokens at 0.7; the banner says so."""
    result = run("chat", input="/exit\n")
    assert result.returncode == 0, result.stderr
    banner = result.stdout.splitlines()[0]
    assert "sampling temperature 0.2, top-p 0.9 (from SmolLM2's model card)" in banner, banner
    assert "replies up to 256 tokens" in banner, banner


# ---- herd list, the load bar ---------------------------------------------------------------------------------------


def test_list_names_local_models_as_they_are_typed(tmp_path, tiny_gguf):
    """A GGUF file in $HERD_MODELS is listed and loaded by its name without .gguf; a name not found lists the local
    models too, not only the built-in alias."""
    import shutil

    shutil.copy(tiny_gguf, tmp_path / "mine.gguf")
    env = {**os.environ, "HERD_MODELS": str(tmp_path), "COLUMNS": "200"}
    listed = run("list", env=env)
    assert listed.returncode == 0 and any(line.startswith("│ mine ") for line in listed.stdout.splitlines()), \
        listed.stdout
    assert run("info", "mine", env=env).returncode == 0
    missing = run("info", "nothing-here", env=env)
    assert missing.returncode == 2 and "mine" in missing.stderr and "smollm2-135m" in missing.stderr


def test_load_bar_says_what_it_does_before_the_tensor_count_is_known(monkeypatch):
    """It showed "0/None tensors" until the loader's first report."""
    import io
    import time

    from rich.console import Console

    import herd
    import herd.cli

    screen = io.StringIO()
    monkeypatch.setattr(herd.cli, "_stderr_console", lambda: Console(file=screen, force_terminal=True, width=120))

    def slow_load(source, device=None, dtype=None, progress=None, **options):
        time.sleep(0.5)  # the bar refreshes before the first report
        for i in range(1, 4):
            progress(i, 3)
        return "loaded"

    monkeypatch.setattr(herd, "load", slow_load)
    assert herd.cli.load_with_progress("model.gguf") == "loaded"
    shown = screen.getvalue()
    assert "None" not in shown and "reading the header" in shown, shown
