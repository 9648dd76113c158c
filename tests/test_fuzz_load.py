"""Seeded fuzzing of the loaders (issue 11): every mutated file either loads (and generates two tokens) or raises
a herd error, within a time and memory bound: never a bare Python exception, a crash or a hang.

Two sources are mutated: the SmolLM2 GGUF (its header only, rewritten in front of the original tensor data:
metadata values and types, the vocabulary arrays, tensor infos, byte flips, truncations; the file is first cut
to its first two blocks, so that a good load is cheap) and a tiny HF directory (config.json, the index,
tokenizer files, generation_config.json and the safetensors header).

The loads run in a worker process (this file, run as a script) under an address-space limit; the worker prints
one JSON line as each case starts and one as it ends, so a crash or hang is pinned on the case that caused it.
Case i of a seed is generated from its own random.Random(f"{seed}:{i}"): any failure is reproduced alone with

    python tests/test_fuzz_load.py gguf|hf --seed SEED --case I
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import random
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `herd` and `tests.fixtures`

SEED = 11
# Cases run in order until the budget is spent (the machine may be shared: the number run varies, each case
# stays reproducible by its index); at least MIN_CASES must run.
GGUF_BUDGET, HF_BUDGET, MIN_CASES = 35.0, 12.0, 12
MAX_CASES = 400
# A case may take CASE_FACTOR times what the unmutated load took (at least CASE_SECONDS): a header that makes
# herd build 20000 layers takes minutes, a refused one a fraction of a second, a good one about a second.
CASE_SECONDS, CASE_FACTOR = 15.0, 5.0
ADDRESS_SPACE = 8 << 30  # RLIMIT_AS of the worker: a load that tries to allocate more fails with MemoryError
PEAK_RSS_MB = 3000

# ---- the test (parent side) --------------------------------------------------------------------------------


def run_worker(kind: str, budget: float, timeout: float) -> tuple[list[dict], list[dict]]:
    """Run the worker; return its failures (each names the case, its mutation and what went wrong) and the
    records of the cases it finished."""
    cmd = [sys.executable, str(Path(__file__).resolve()), kind, "--seed", str(SEED), "--budget", str(budget)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        stdout, code, hung = done.stdout, done.returncode, False
    except subprocess.TimeoutExpired as e:
        stdout = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        code, hung, done = None, True, None
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    started = {r["case"]: r for r in records if r["event"] == "start"}
    ended = {r["case"]: r for r in records if r["event"] == "end"}
    failures = [r for r in ended.values() if r["verdict"] != "ok"]
    for case in sorted(set(started) - set(ended)):  # killed, crashed or hung in the middle of it
        why = "the worker hung" if hung else f"the worker died (exit {code}): {done.stderr[-1500:] if done else ''}"
        failures.append({**started[case], "verdict": "crash", "detail": why})
    if not failures and (hung or code != 0):
        failures.append({"case": None, "mutation": None, "verdict": "worker",
                         "detail": f"exit {code} after {len(ended)} cases: {done.stderr[-1500:] if done else 'hung'}"})
    return failures, [ended[i] for i in sorted(ended)]


def report(kind: str, failures: list[dict]) -> str:
    lines = [f"{len(failures)} {kind} fuzz case(s) failed:"]
    for f in failures:
        lines.append(f"- case {f['case']} ({f['mutation']}): {f['verdict']}: {f.get('detail', '')[:1500]}")
        lines.append(f"  reproduce: python tests/test_fuzz_load.py {kind} --seed {SEED} --case {f['case']}")
    return "\n".join(lines)


def _check(kind: str, budget: float):
    t = time.perf_counter()
    # the timeout only catches a worker that stops reporting; each case is bounded inside the worker
    failures, ended = run_worker(kind, budget, timeout=budget * 3 + 120)
    assert not failures, report(kind, failures)
    verdicts = [r["outcome"] for r in ended]
    assert ended and ended[0]["outcome"] == "ok", "the unmutated source must load"
    assert len(ended) >= MIN_CASES, f"only {len(ended)} cases ran within {budget} s"
    assert sum(v != "ok" for v in verdicts) >= len(ended) // 4, "too few mutations were refused: the fuzzer is not biting"
    print(f"{kind}: {len(ended)} cases in {time.perf_counter() - t:.1f} s; "
          f"{verdicts.count('ok')} loaded, {len(ended) - verdicts.count('ok')} refused with herd errors")


def test_fuzz_gguf(smollm2_path):
    _check("gguf", GGUF_BUDGET)


def test_fuzz_hf():
    _check("hf", HF_BUDGET)


# ---- mutations ---------------------------------------------------------------------------------------------

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
NAN, INF = math.nan, math.inf

GGUF_VALUES = [
    (U32, 0), (U32, 1), (U32, 3), (U32, 2**32 - 1), (I32, -1), (I32, -(2**31)), (U64, 2**63), (U64, 2**64 - 1),
    (I64, -1), (U8, 255), (F32, 0.0), (F32, -1.0), (F32, NAN), (F32, INF), (F32, -INF), (F32, 1e38), (F32, 1e-30),
    (F64, NAN), (F64, 0.5), (BOOL, True), (BOOL, False), (STR, ""), (STR, "abc"), (STR, "1"), (STR, "\u2581\0"),
    (ARR, (U32, [])), (ARR, (U32, [1, 2])), (ARR, (I32, [-1] * 30)), (ARR, (STR, ["a", "b"])),
    (ARR, (F32, [NAN])), (ARR, (ARR, [(U8, [1])])), (ARR, (BOOL, [True])),
]
GGUF_EXTRA_KEYS = [
    "llama.rope.scaling.factor", "llama.rope.scaling.type", "llama.rope.scale_linear", "llama.attention.key_length",
    "llama.attention.value_length", "llama.expert_count", "llama.logit_scale", "general.alignment",
    "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id", "tokenizer.ggml.scores", "tokenizer.ggml.model",
    "general.file_type", "llama.vocab_size", "tokenizer.chat_template",
]
VOCAB_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


def _nudged(rng: random.Random, vtype: int, value):
    """A near-miss of a number: what a careless edit produces, more often than a wild value."""
    if vtype in (F32, F64):
        return vtype, rng.choice([value * 2, value / 2, -value, value + 1, 0.0])
    return (I64 if vtype in (I32, I64) else U64), max(0, rng.choice([value * 2, value + 1, value - 1, value // 2, 0]))


def mutate_gguf(rng: random.Random, h) -> tuple[str, dict]:
    """One mutation of a GGUFHeader: (description, how to write it)."""
    from tests.fixtures import build as B

    h = h.copy()
    kind = rng.choices(["value", "nudge", "drop", "vocab", "tensor", "flip", "truncate"], [5, 3, 1, 3, 3, 3, 1])[0]
    plain = [k for k in h.kv if k not in VOCAB_KEYS]
    if rng.random() < 0.8:  # general.* keys are names and licences: mutating them mostly tests a good load
        plain = [k for k in plain if not k.startswith("general.")]
    if kind == "value":
        key = rng.choice(plain + GGUF_EXTRA_KEYS)
        h.kv[key] = rng.choice(GGUF_VALUES)
        return f"{key} = {h.kv[key]!r:.80}", {"header": h}
    if kind == "nudge":
        numeric = [k for k in plain if h.kv[k][0] in (U8, U16, U32, I32, U64, I64, F32, F64)]
        key = rng.choice(numeric)
        h.kv[key] = _nudged(rng, *h.kv[key])
        return f"{key} = {h.kv[key]!r}", {"header": h}
    if kind == "drop":
        key = rng.choice(plain + list(VOCAB_KEYS))
        del h.kv[key]
        return f"{key} removed", {"header": h}
    if kind == "vocab":
        key = rng.choice(VOCAB_KEYS)
        etype, values = h.kv[key][1]
        how = rng.choice(["shorter", "longer", "strings", "ints", "bad entry", "empty"])
        if how == "shorter":
            values = values[: rng.randrange(len(values))]
        elif how == "longer":
            values = values + values[: rng.randrange(1, 100)]
        elif how == "strings":
            etype, values = STR, [str(v) for v in values[:500]]
        elif how == "ints":
            etype, values = I32, list(range(min(len(values), 500)))
        elif how == "bad entry":
            i = rng.randrange(len(values))
            values = list(values)
            values[i] = {STR: "", I32: rng.choice([99, -1, 2**31 - 1])}.get(etype, 0)
            if key == "tokenizer.ggml.merges":
                values[i] = rng.choice(["", "x", "zz9 qq8", " "])
        else:
            values = []
        h.kv[key] = (ARR, (etype, values))
        return f"{key}: {how} ({len(values)} entries)", {"header": h}
    if kind == "tensor":
        i = rng.randrange(len(h.tensors))
        name, ne, ggml_type, offset = h.tensors[i]
        how = rng.choice(["dim", "extra dim", "type", "offset", "rename", "drop", "duplicate"])
        if how == "dim":
            d = rng.randrange(len(ne))
            ne[d] = rng.choice([0, 1, ne[d] * 2, ne[d] + 1, ne[d] // 2, 2**40, 2**63])
        elif how == "extra dim":
            ne.append(rng.choice([1, 2]))
        elif how == "type":
            h.tensors[i][2] = rng.randrange(0, 45)
        elif how == "offset":
            h.tensors[i][3] = rng.choice([0, offset + 32, max(0, offset - 32), 2**60, offset + 1])
        elif how == "rename":
            h.tensors[i][0] = rng.choice(["", "blk.999.attn_q.weight", "blk.07.attn_q.weight", "output.weight",
                                          "blk.0.attn_q.bias", "token_embd.weight", h.tensors[-1][0]])
        elif how == "drop":
            del h.tensors[i]
        else:
            h.tensors.append(list(h.tensors[i]))
        return f"tensor #{i} {name}: {how} -> {h.tensors[min(i, len(h.tensors) - 1)]!r:.100}", {"header": h}
    raw = bytearray(B.gguf_header_bytes(h))
    if kind == "flip":
        # where the structure is: the fixed fields and model keys (start), the tensor infos (end)
        info_start = len(raw) - sum(8 + len(t[0].encode()) + 4 + 8 * len(t[1]) + 12 for t in h.tensors)
        region = rng.choice([(0, 1200), (info_start, len(raw)), (0, len(raw))])
        spots = sorted(rng.randrange(*region) for _ in range(rng.randint(1, 4)))
        for at in spots:
            raw[at] ^= rng.randrange(1, 256)
        return f"header bytes flipped at {spots}", {"header": h, "raw": bytes(raw)}
    if rng.random() < 0.5:
        cut = rng.randrange(len(raw))
        return f"file cut at header byte {cut}", {"header": h, "raw": bytes(raw[:cut]), "data_bytes": 0}
    size = h.source.stat().st_size - h.data_offset
    cut = rng.randrange(size)
    return f"tensor data cut at byte {cut} of {size}", {"header": h, "data_bytes": cut}


JSON_VALUES = [0, -1, 1, 2, 3, 7, 10**9, 2**31 - 1, 2**64, 0.5, -0.0, NAN, INF, -INF, "", "x", "64", True, False,
               None, [], [1, 2], {}, {"a": 1}, [[1]], {"content": 5}]
HF_EXTRA_KEYS = ["head_dim", "rope_scaling", "num_key_value_heads", "text_config", "model_type", "architectures",
                 "tie_word_embeddings", "eos_token_id", "attention_bias", "hidden_act", "moe_layers", "no_rope_layers"]
ROPE_KEYS = ["rope_type", "type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
             "rope_theta"]
JSON_FILES = ["config.json", "tokenizer_config.json", "generation_config.json", "tokenizer.json"]
WHOLE_FILES = ["[]", "null", "42", '"s"', "{", "", "{\"a\": NaN", "\xff\xfe"]
ST_DTYPES = ["F16", "BF16", "I8", "U8", "F64", "BOOL", "XX", "F4", 5, None]
TENSOR_NAMES = ["model.layers.7.self_attn.q_proj.weight", "model.layers.0", "model.layers.x.mlp.up_proj.weight",
                "", "lm_head.weight", "model.layers.0.self_attn.q_proj.bias", "vision_model.a", "model.layers.01.x"]


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value))


def mutate_hf(rng: random.Random, d: Path) -> str:
    """Damage the HF directory `d` in place; return what was done."""
    from tests.fixtures import build as B

    kind = rng.choices(["config", "nudge", "rope", "whole", "tokconfig", "generation", "index", "st header",
                        "st bytes", "tokenizer"], [6, 3, 3, 2, 2, 1, 2, 4, 2, 1])[0]
    cfg_path = d / "config.json"
    cfg = _json(cfg_path)
    if kind == "config":
        key = rng.choice(list(cfg) + HF_EXTRA_KEYS)
        if rng.random() < 0.15:
            cfg.pop(key, None)
            _write_json(cfg_path, cfg)
            return f"config.json: {key} removed"
        cfg[key] = rng.choice(JSON_VALUES)
        _write_json(cfg_path, cfg)
        return f"config.json: {key} = {cfg[key]!r}"
    if kind == "nudge":
        key = rng.choice([k for k, v in cfg.items() if isinstance(v, (int, float)) and not isinstance(v, bool)])
        cfg[key] = rng.choice([cfg[key] * 2, cfg[key] + 1, cfg[key] - 1, cfg[key] // 2, 0, -cfg[key]])
        _write_json(cfg_path, cfg)
        return f"config.json: {key} = {cfg[key]!r}"
    if kind == "rope":
        rope = dict(cfg.get("rope_parameters") or {})
        key = rng.choice(ROPE_KEYS)
        rope[key] = rng.choice(JSON_VALUES + ["llama3", "linear", "yarn", "default", 8.0, 4.0, 1.0])
        cfg[rng.choice(["rope_parameters", "rope_scaling"])] = rope
        _write_json(cfg_path, cfg)
        return f"config.json: rope {key} = {rope[key]!r}"
    if kind == "whole":
        name = rng.choice(JSON_FILES + ["model.safetensors.index.json"])
        text = rng.choice(WHOLE_FILES)
        if rng.random() < 0.4 and (d / name).is_file():
            raw = (d / name).read_bytes()
            (d / name).write_bytes(raw[: rng.randrange(len(raw))])
            return f"{name} truncated"
        (d / name).write_bytes(text.encode("utf-8", "surrogateescape") if text != "\xff\xfe" else b"\xff\xfe{")
        return f"{name} replaced by {text!r}"
    if kind == "tokconfig":
        path = d / "tokenizer_config.json"
        data = _json(path)
        key = rng.choice(["bos_token", "eos_token", "add_bos_token", "chat_template"])
        data[key] = rng.choice(JSON_VALUES + ["<s>", "nope", [{"name": "default", "template": "x"}], [{"name": 1}]])
        _write_json(path, data)
        return f"tokenizer_config.json: {key} = {data[key]!r}"
    if kind == "generation":
        path = d / "generation_config.json"
        data = _json(path)
        data["eos_token_id"] = rng.choice(JSON_VALUES)
        _write_json(path, data)
        return f"generation_config.json: eos_token_id = {data['eos_token_id']!r}"
    if kind == "index":
        path = d / "model.safetensors.index.json"
        if not path.is_file():  # an unsharded directory: give it the index it could have had
            from safetensors import safe_open

            with safe_open(str(d / "model.safetensors"), "pt") as f:
                _write_json(path, {"weight_map": {n: "model.safetensors" for n in f.keys()}})
        index = _json(path)
        wm = index["weight_map"]
        how = rng.choice(["list", "int value", "missing file", "escape", "drop", "add"])
        name = rng.choice(list(wm))
        if how == "list":
            index["weight_map"] = list(wm)
        elif how == "int value":
            wm[name] = 3
        elif how == "missing file":
            wm[name] = "model-00009-of-00009.safetensors"
        elif how == "escape":
            wm[name] = "../config.json"
        elif how == "drop":
            del wm[name]
        else:
            wm["model.layers.0.mlp.extra.weight"] = wm[name]
        _write_json(path, index)
        return f"index: {how} ({name})"
    shards = sorted(d.glob("*.safetensors"))
    shard = rng.choice(shards)
    if kind == "st header":
        how = rng.choice(["dtype", "shape", "offsets", "rename", "drop", "metadata"])
        desc = {}

        def change(header):
            names = [n for n in header if n != "__metadata__"]
            name = rng.choice(names)
            desc["name"] = name
            entry = header[name]
            if how == "dtype":
                entry["dtype"] = rng.choice(ST_DTYPES)
            elif how == "shape":
                shape = list(entry["shape"])
                entry["shape"] = rng.choice([shape + [1], shape[:-1], [2 * s for s in shape], [], [-1], "x",
                                             [shape[0] + 1] + shape[1:]])
            elif how == "offsets":
                a, b = entry["data_offsets"]
                entry["data_offsets"] = rng.choice([[a + 4, b + 4], [b, a], [0, 0], [a], "x", [a, b + 2**40],
                                                    [max(0, a - 4), b - 4]])
            elif how == "rename":
                header[rng.choice(TENSOR_NAMES)] = header.pop(name)
            elif how == "drop":
                del header[name]
            else:
                header["__metadata__"] = rng.choice([{"format": 5}, [], "x", None])
        B.rewrite_safetensors_header(shard, change)
        return f"{shard.name} header: {how} of {desc.get('name')}"
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack_from("<Q", raw)
    if rng.random() < 0.5:
        spots = sorted(rng.randrange(0, 8 + n) for _ in range(rng.randint(1, 3)))
        for at in spots:
            raw[at] ^= rng.randrange(1, 256)
        shard.write_bytes(bytes(raw))
        return f"{shard.name}: header bytes flipped at {spots}"
    cut = rng.randrange(len(raw))
    shard.write_bytes(bytes(raw[:cut]))
    return f"{shard.name}: cut at byte {cut} of {len(raw)}"


# ---- the worker --------------------------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM; ru_maxrss would start from the forking parent's RSS)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _emit(record: dict) -> None:
    print(json.dumps(record, default=str), flush=True)


def _attempt(path: Path, prompt: str) -> tuple[str, str]:
    """(outcome, detail): "ok", a herd error's class name, or "BUG" with the traceback."""
    import herd

    try:
        llm = herd.load(str(path), device="cpu", compile=False)
        llm.generate(prompt, max_tokens=2, temperature=0)
        return "ok", ""
    except herd.errors.HerdError as e:
        return type(e).__name__, str(e)[:300]
    except BaseException as e:  # a bare Python error, MemoryError, a Rust panic from a library: all bugs
        if isinstance(e, KeyboardInterrupt):
            raise
        return "BUG", "".join(traceback.format_exception(e))[-3000:]


def _cases(kind: str, seed: int, n: int, only: int | None, work: Path):
    """(index, description, build() -> path, prompt) for cases 0..n-1 (0 is the unmutated source)."""
    from tests.fixtures import build as B

    if kind == "gguf":
        from tests.conftest import SMOLLM2

        # SmolLM2's own header and vocabulary over its first 2 blocks: a good load costs 1/15 of the full file's
        header = B.gguf_first_layers(B.read_gguf_header(SMOLLM2), 2, work / "smollm2-2-layers.gguf")
        for i in range(n) if only is None else [only]:
            rng = random.Random(f"{seed}:{i}")
            desc, plan = ("unmutated", {"header": header}) if i == 0 else mutate_gguf(rng, header)
            path = work / f"case{i}.gguf"

            def build(plan=plan, path=path):
                B.write_gguf_variant(plan["header"], path, plan.get("raw"), plan.get("data_bytes"))
                return path
            yield i, desc, build, "Hello"
        return
    base = work / "base"
    shutil.copytree(B.reference("llama3").hf_dir, base / "hf")
    B.write_hf_tokenizer(base / "hf", B.SPECS["llama3"].vocab)
    shutil.copytree(B.reference("llama3").sharded_dir(), base / "sharded")
    B.write_hf_tokenizer(base / "sharded", B.SPECS["llama3"].vocab)
    for i in range(n) if only is None else [only]:
        rng = random.Random(f"{seed}:{i}")
        src = base / ("sharded" if rng.random() < 0.3 else "hf")
        path = work / f"case{i}"

        def build(rng=rng, src=src, path=path, i=i):
            shutil.rmtree(path, ignore_errors=True)
            shutil.copytree(src, path)
            return path
        if i == 0:
            yield i, f"unmutated {src.name}", build, "t5 t6"
            continue
        # the mutation needs the copy to exist to be described: build it now, hand back the same path
        build()
        desc = f"{src.name}: {mutate_hf(rng, path)}"
        yield i, desc, (lambda path=path: path), "t5 t6"


def worker(kind: str, seed: int, budget: float, only: int | None) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    import warnings

    warnings.simplefilter("ignore")  # unknown tokenizer.ggml.pre and the like: warnings, not failures
    start, bound = time.perf_counter(), CASE_SECONDS
    with tempfile.TemporaryDirectory(prefix=f"herd-fuzz-{kind}-") as tmp:
        work = Path(tmp)
        for i, desc, build, prompt in _cases(kind, seed, MAX_CASES, only, work):
            _emit({"event": "start", "case": i, "mutation": desc})
            faulthandler.dump_traceback_later(bound * 2, exit=True)  # a hang ends the worker, named by "start"
            t = time.perf_counter()
            path = build()
            outcome, detail = _attempt(path, prompt)
            seconds = time.perf_counter() - t
            faulthandler.cancel_dump_traceback_later()
            if i == 0:  # the budget counts from here: setting up the sources is not fuzzing
                bound, start = max(CASE_SECONDS, CASE_FACTOR * seconds), time.perf_counter()
            rss = _peak_rss_mb()
            verdict = "ok"
            if outcome == "BUG":
                verdict = "bare exception"
            elif seconds > bound:
                verdict, detail = "slow", f"{outcome} after {seconds:.1f} s (bound {bound:.1f} s) {detail}"
            elif rss > PEAK_RSS_MB:
                verdict, detail = "memory", f"peak RSS {rss:.0f} MB (bound {PEAK_RSS_MB} MB) {detail}"
            _emit({"event": "end", "case": i, "mutation": desc, "outcome": outcome, "verdict": verdict,
                   "detail": detail, "seconds": round(seconds, 3), "rss_mb": round(rss)})
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            if time.perf_counter() - start > budget:
                break


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="fuzz herd's loaders (see the module docstring)")
    parser.add_argument("kind", choices=["gguf", "hf"])
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--budget", type=float, default=None, help="seconds; cases run until it is spent")
    parser.add_argument("--case", type=int, default=None, help="run only this case (to reproduce a failure)")
    a = parser.parse_args()
    worker(a.kind, a.seed, a.budget or (GGUF_BUDGET if a.kind == "gguf" else HF_BUDGET), a.case)
