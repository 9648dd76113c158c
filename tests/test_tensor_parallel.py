"""Tensor and expert parallelism on torch.distributed (gloo on the CPU), in real torchrun jobs of 2 processes.

References: Hugging Face transformers' logits for the tiny random model of every generation (tests/fixtures/
build.py), and herd's own single-process greedy tokens; the openai client against `herd serve` under torchrun,
with expected replies from the single-process LLM.chat. Few jobs, each checking many things: the processes and
their torch imports are the cost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch

import herd
from tests.fixtures import build as B
from tests.fixtures.serving import free_port, http

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "fixtures" / "tp_worker.py"
TOL = 1e-4  # float32 both sides: only the order of the sums differs (all-reduce of partial sums)
JOB_TIMEOUT = 600


def _env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def run_job(tmp_path: Path, items: list[dict], dtype: str = "float32", name: str = "job") -> dict:
    job, out = tmp_path / f"{name}.json", tmp_path / f"{name}.pt"
    job.write_text(json.dumps({"items": items, "dtype": dtype}))
    cmd = torchrun("--nproc-per-node", "2", "--master-port", str(free_port()), str(WORKER), str(job), str(out))
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert r.returncode == 0, r.stderr[-4000:]
    return torch.load(out)


def greedy_single(path, item) -> list[int]:
    from tests.fixtures.tp_worker import greedy

    return greedy(herd.load(str(path), device="cpu", dtype="float32"), item)


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


class CustomReference:
    """An HF model outside the fixtures' generations: one KV head (replicated onto both ranks) and an odd
    vocabulary (split 161 + 160 rows), saved as an HF directory."""

    gen = "llama3"  # its GGUF's tokenizer drives the greedy run (token ids only)
    vocab = 321

    def __init__(self, root: Path):
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=1, vocab_size=self.vocab, max_position_embeddings=256, rope_theta=500000.0)
        torch.manual_seed(0)
        self.model = LlamaForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
        with torch.no_grad():
            for p in self.model.parameters():
                p.normal_(0.0, B.WEIGHT_STD)
        self.hf_dir = root / "mqa-odd-vocab"
        self.model.save_pretrained(self.hf_dir)

    def logits(self, ids):
        return B.hf_logits(self.model, ids)


_CUSTOM: list = []


def custom_reference() -> CustomReference:
    if not _CUSTOM:
        import tempfile

        _CUSTOM.append(CustomReference(Path(tempfile.mkdtemp(prefix="herd-tp-"))))
    return _CUSTOM[0]


def parity_items() -> tuple[list[dict], dict]:
    """Every generation from HF, Meta (1 shard onto 2 ranks; 2 shards onto 2, Llama 1-3) and GGUF, --tp 2;
    Llama 4 MoE at --tp 2 --ep 2 and --ep 2 alone; a 2-shard Meta checkpoint onto --tp 1 (merged lazily);
    GGUF Q8_0 blocks sliced; one KV head replicated and an odd vocabulary. Returns (items, {key: (reference, single-process path)})."""
    items, refs = [], {}

    def add(key, path, ref, **layout):
        ids = B.tokens(ref.gen, batch=2, length=16) % getattr(ref, "vocab", 1 << 30)
        items.append({"key": key, "path": str(path), "ids": ids.tolist(), "greedy": ids[0, :6].tolist(),
                      "tokenizer": str(B.reference(ref.gen).gguf("F32")), "max_tokens": 6, **layout})
        refs[key] = (ref, path, ids)

    for gen in B.GENERATIONS:
        ref = B.reference(gen)
        add(f"{gen}/hf", ref.hf_dir, ref, tp=2)
        add(f"{gen}/gguf", ref.gguf("F32"), ref, tp=2)
        meta = B.reference(gen, meta_compatible=True)
        add(f"{gen}/meta1->2", meta.meta_dir(1), meta, tp=2)
        if gen not in B.LLAMA4:
            add(f"{gen}/meta2->2", meta.meta_dir(2), meta, tp=2)
    add("llama3/meta2->1", B.reference("llama3").meta_dir(2), B.reference("llama3"), tp=1)
    add("llama3/gguf-q8_0", B.reference("llama3").gguf("Q8_0"), B.reference("llama3"), tp=2)
    for gen in B.LLAMA4:
        add(f"{gen}/hf-ep2", B.reference(gen).hf_dir, B.reference(gen), tp=2, ep=2)
    add("llama4_scout/hf-ep2-only", B.reference("llama4_scout").hf_dir, B.reference("llama4_scout"), ep=2)
    add("mqa-odd-vocab/hf", custom_reference().hf_dir, custom_reference(), tp=2)
    return items, refs


def check_parity(out: dict, refs: dict) -> None:
    failures = []
    for key, (ref, path, ids) in refs.items():
        got = out[key]
        if "q8_0" in key:  # quantized: HF holding gguf-py's dequantization of the same file
            hf = B.model_with_state_dict(ref.gen, B.hf_state_dict_from_gguf(path, ref.gen))
            want = B.hf_logits(hf, ids)
        else:
            want = ref.logits(ids)
        diff = max_diff(got["logits"], want)
        print(f"{key}: max|Δ| vs HF = {diff:.2e}")
        if diff >= TOL:
            failures.append(f"{key}: logits differ by {diff:.3e}")
        item = {"greedy": ids[0, :6].tolist(), "tokenizer": str(B.reference(ref.gen).gguf("F32")), "max_tokens": 6}
        single = greedy_single(path, item)
        if got["greedy"] != single:
            failures.append(f"{key}: greedy {got['greedy']} != single-process {single}")
    assert not failures, failures


def test_parity_every_generation_and_format(tmp_path):
    items, refs = parity_items()
    out = run_job(tmp_path, items)
    check_parity(out, refs)
    # 2 shards onto 1 process: the ordinary loader merges them
    ref = B.reference("llama3")
    ids = B.tokens("llama3", batch=2, length=16)
    assert max_diff(herd.load(str(ref.meta_dir(2)), device="cpu", dtype="float32").logits(ids), ref.logits(ids)) < TOL


def test_two_nodes_through_c10d_rendezvous(tmp_path):
    """Two "nodes" (two torchrun agents, one process each) meeting at a c10d rendezvous on localhost."""
    keys = ("llama3/meta2->2", "llama4_maverick/hf-ep2")
    items, refs = parity_items()
    items = [i for i in items if i["key"] in keys]
    job, out = tmp_path / "nodes.json", tmp_path / "nodes.pt"
    job.write_text(json.dumps({"items": items}))
    port = free_port()
    nodes = [subprocess.Popen(torchrun("--nnodes", "2", "--node-rank", str(n), "--nproc-per-node", "1",
                                       "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                                       "--rdzv-id", "herd-test", str(WORKER), str(job), str(out)),
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in (0, 1)]
    logs = [p.communicate(timeout=JOB_TIMEOUT)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], logs
    check_parity(torch.load(out), {k: refs[k] for k in keys})


# ---- Llama 4 with its image encoder -------------------------------------------------------------------------


def test_llama4_with_its_image_encoder_splits_the_text_model_and_sees_images(tmp_path):
    """The README's Llama 4 example, on a checkpoint that ships the image encoder as Meta's Scout and Maverick
    do: at --tp 2 --ep 2 and at --tp 2 the text model is split, the encoder replicated (rank 0 encodes, the
    features travel with the forward). A text prompt's logits and a two-image chat's prompt ids and logits
    equal HF transformers' (its processor and Llama4ForConditionalGeneration); the greedy replies equal the
    single process's; `herd run --image` under torchrun prints what one process prints."""
    from transformers import AutoProcessor

    from tests.fixtures import vision as V
    from tests.fixtures.tp_worker import image_chat
    from tests.test_vision import hf_inputs, messages

    V.torchvision_functional()
    path = tmp_path / "llama4v"
    model = V.build(path, padding_rows=3)  # an odd vocabulary (515 rows), split 258 + 257
    pictures = [V.image(120, 110, seed=1), V.image(40, 40, seed=2)]
    ours, theirs = messages(pictures, ["t5 t6", "t7"])
    text_ids = torch.tensor([[V.IDS["<|begin_of_text|>"], 5, 6, 7, 8, 9, 10, 11]])
    items = [{"key": key, "path": str(path), "messages": ours, "max_tokens": 6, "ids": text_ids.tolist(), **layout}
             for key, layout in (("tp2-ep2", {"tp": 2, "ep": 2}), ("tp2", {"tp": 2}))]
    out = run_job(tmp_path, items)

    want = hf_inputs(AutoProcessor.from_pretrained(path), theirs)
    with torch.no_grad():
        image_logits = model(input_ids=want["input_ids"], pixel_values=want["pixel_values"].float()).logits[0]
        text_logits = model(input_ids=text_ids).logits
    single = image_chat(herd.load(str(path), device="cpu", dtype="float32"), items[0])
    assert single["chat_greedy"], "no reply to compare"
    for key in ("tp2-ep2", "tp2"):
        got = out[key]
        assert got["chat_ids"] == want["input_ids"][0].tolist() == single["chat_ids"], key
        print(f"{key}: max|Δ| vs HF: image chat {max_diff(got['chat_logits'], image_logits):.2e}, "
              f"text {max_diff(got['logits'], text_logits):.2e}")
        assert max_diff(got["chat_logits"], image_logits) < TOL, key
        assert max_diff(got["logits"], text_logits) < TOL, key
        assert got["chat_greedy"] == single["chat_greedy"], key

    picture = tmp_path / "picture.png"
    picture.write_bytes(pictures[0])
    args = ["-m", "herd", "run", str(path), "--image", str(picture), "t5 t6", "--device", "cpu", "--dtype", "float32",
            "--temperature", "0", "--max-tokens", "6"]
    one = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=JOB_TIMEOUT)
    launcher = torchrun("--nproc-per-node", "2", "--master-port", str(free_port()))
    two = subprocess.run([*launcher, *args, "--tp", "2", "--ep", "2"], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=JOB_TIMEOUT)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout and one.stdout.strip()


# ---- memory: each rank reads its share ----------------------------------------------------------------------


BIG = dict(dim=2048, n_layers=32, n_heads=16, n_kv_heads=4, vocab=32000, hidden=B.meta_ffn_dim(2048, 256, None))


def big_state(prefix_map) -> dict[str, torch.Tensor]:
    """Random bf16 weights of a Llama-3-shaped model of about 3.1 GB, under the names prefix_map gives."""
    dim, hidden, kv, vocab = BIG["dim"], BIG["hidden"], BIG["n_kv_heads"] * 128, BIG["vocab"]
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return torch.empty(*shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)

    shapes = {"wq": (dim, dim), "wk": (kv, dim), "wv": (kv, dim), "wo": (dim, dim), "w1": (hidden, dim),
              "w2": (dim, hidden), "w3": (hidden, dim)}
    state = {prefix_map("tok_embeddings"): w(vocab, dim), prefix_map("norm"): torch.ones(dim, dtype=torch.bfloat16),
             prefix_map("output"): w(vocab, dim)}
    for i in range(BIG["n_layers"]):
        for name, shape in shapes.items():
            state[prefix_map(name, i)] = w(*shape)
        for name in ("attention_norm", "ffn_norm"):
            state[prefix_map(name, i)] = torch.ones(dim, dtype=torch.bfloat16)
    return state


META_NAMES = {"wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
              "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3"}
HF_NAMES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
            "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj", "attention_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm"}


def write_big(path: Path, fmt: str) -> Path:
    """The big random checkpoint as a Meta directory (one consolidated.00.pth) or an HF one (one safetensors)."""
    path.mkdir()
    if fmt == "meta":
        state = big_state(lambda n, i=None: f"{n}.weight" if i is None else f"layers.{i}.{META_NAMES.get(n, n)}.weight")
        torch.save(state, path / "consolidated.00.pth")
        (path / "params.json").write_text(json.dumps({
            "dim": BIG["dim"], "n_layers": BIG["n_layers"], "n_heads": BIG["n_heads"], "n_kv_heads": BIG["n_kv_heads"],
            "vocab_size": BIG["vocab"], "multiple_of": 256, "norm_eps": 1e-5, "rope_theta": 500000.0}))
    else:
        from safetensors.torch import save_file

        top = {"tok_embeddings": "model.embed_tokens.weight", "norm": "model.norm.weight", "output": "lm_head.weight"}
        state = big_state(lambda n, i=None: top[n] if i is None else f"model.layers.{i}.{HF_NAMES[n]}.weight")
        save_file(state, path / "model.safetensors")
        (path / "config.json").write_text(json.dumps({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": BIG["dim"],
            "num_hidden_layers": BIG["n_layers"], "num_attention_heads": BIG["n_heads"],
            "num_key_value_heads": BIG["n_kv_heads"], "intermediate_size": BIG["hidden"], "vocab_size": BIG["vocab"],
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}))
    return path


SINGLE_RSS = """
import sys, torch, herd
from tests.fixtures.tp_worker import peak_rss
if sys.argv[1] != "-":
    llm = herd.load(sys.argv[1], device="cpu")
    llm.logits(torch.tensor(%s))
print(peak_rss())
"""


@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_peak_rss_per_rank(tmp_path, fmt):
    """Large enough (3 GB) that the ~220 MB each process spends on Python and torch does not hide what the
    weights cost: at --tp 2 each rank's peak is at most 0.6x the single process's."""
    path = write_big(tmp_path / "big", fmt)
    weights = sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".pth", ".safetensors"))
    ids = [[1, 2, 3, 4, 5, 6, 7, 8]]
    single = subprocess.run([sys.executable, "-c", SINGLE_RSS % ids, str(path)], env=_env(), capture_output=True,
                            text=True, timeout=JOB_TIMEOUT)
    assert single.returncode == 0, single.stderr[-3000:]
    single_rss = int(single.stdout.split()[-1])
    out = run_job(tmp_path, [{"key": "big", "path": str(path), "tp": 2, "ids": ids}], dtype="bfloat16")
    ranks = out["peak_rss_bytes"]
    baseline = subprocess.run([sys.executable, "-c", SINGLE_RSS % ids, "-"], env=_env(), capture_output=True,
                              text=True).stdout.split()[-1]
    print(f"{fmt}: weights {weights / 2**20:.0f} MiB; peak RSS single process {single_rss / 2**20:.0f} MiB, "
          f"ranks at --tp 2 {[round(r / 2**20) for r in ranks]} MiB (ratio {max(ranks) / single_rss:.2f}); "
          f"python + torch + herd imported: {int(baseline) / 2**20:.0f} MiB, so the weights' share is "
          f"{(max(ranks) - int(baseline)) / (single_rss - int(baseline)):.2f}")
    assert max(ranks) <= 0.6 * single_rss


# ---- serving across ranks ----------------------------------------------------------------------------------

PROMPTS = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.", "What is 2 + 2?",
           "Say hello in Spanish.", "Give me a fruit.", "What do cats eat?", "Tell me a joke."]
TEMPLATE = ("{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def chat_gguf(tmp_path_factory) -> Path:
    """The tiny Llama 3 GGUF with a chat template (the fixtures carry none)."""
    h = B.read_gguf_header(B.reference("llama3").gguf("F32"))
    h.kv["tokenizer.chat_template"] = (B.GGUF_STRING, TEMPLATE)
    return B.write_gguf_variant(h, tmp_path_factory.mktemp("chat") / "tiny-chat.gguf")


def start_serve(model: Path, log: Path, launcher: list[str], env: dict):
    port = free_port()
    cmd = [*launcher, "-m", "herd", "serve", str(model), "--tp", "2", "--device", "cpu", "--dtype", "float32",
           "--port", str(port), "--max-batch", "8", "--context", "256", "--served-model-name", "tiny"]
    err = open(log, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):  # bounded: 120 s
        if proc.poll() is not None:
            raise AssertionError(log.read_text()[-3000:])
        try:
            if http("GET", url + "/health", timeout=2)[0] == 200:
                return proc, url
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("herd serve --tp 2 did not start: " + log.read_text()[-3000:])


def test_serve_under_torchrun(chat_gguf, tmp_path):
    llm = herd.load(str(chat_gguf), device="cpu", dtype="float32")
    expected = {p: llm.chat([{"role": "user", "content": p}], max_tokens=8, temperature=0).text for p in PROMPTS}
    launcher = torchrun("--nproc-per-node", "2", "--master-port", str(free_port()))
    proc, url = start_serve(chat_gguf, tmp_path / "serve.log", launcher, _env())
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)

        def chat(prompt, **kw):
            return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=8, temperature=0, **kw)

        assert [m.id for m in client.models.list().data] == ["tiny"]
        assert chat(PROMPTS[0]).choices[0].message.content == expected[PROMPTS[0]]
        chunks = list(chat(PROMPTS[1], stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected[PROMPTS[1]]
        assert chunks[-1].usage.completion_tokens <= 8
        one_by_one = [chat(p).choices[0].message.content for p in PROMPTS]
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda p: chat(p).choices[0].message.content, PROMPTS))
        assert together == one_by_one == [expected[p] for p in PROMPTS]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


@pytest.mark.parametrize("fault", ["killed", "stopped"])
def test_a_rank_that_fails_ends_the_job_with_an_error_on_rank_0(chat_gguf, tmp_path, fault):
    """Two processes with torchrun's environment set by hand (no torchrun agent to end the job for us).
    killed: rank 1 dies; rank 0 notices at its next collective (an idle rank 0's heartbeat comes every
    HERD_DIST_TIMEOUT / 3 s). stopped: rank 1 hangs (SIGSTOP) and a request arrives; the forward's collective
    times out after HERD_DIST_TIMEOUT. Either way rank 0 says so and exits: no hang."""
    port = free_port()
    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", HERD_DIST_TIMEOUT="6")
    cmd1 = [sys.executable, "-m", "herd", "serve", str(chat_gguf), "--tp", "2", "--device", "cpu", "--dtype",
            "float32", "--context", "256"]
    with open(tmp_path / "rank1.log", "w") as err:
        follower = subprocess.Popen(cmd1, cwd=ROOT, env=dict(env, RANK="1", LOCAL_RANK="1"),
                                    stdout=subprocess.DEVNULL, stderr=err)
    leader, url = start_serve(chat_gguf, tmp_path / "rank0.log", [sys.executable], dict(env, RANK="0", LOCAL_RANK="0"))
    request = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    try:
        assert http("POST", url + "/v1/chat/completions", request)[0] == 200
        if fault == "killed":
            follower.kill()
            follower.wait(10)
        else:
            follower.send_signal(signal.SIGSTOP)
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(lambda: http("POST", url + "/v1/chat/completions", request, timeout=90))
                code = leader.wait(60)  # not a hang
                with pytest.raises(OSError):  # the connection ends with rank 0
                    pending.result()
        code = leader.wait(60)
    finally:
        for p in (leader, follower):
            if p.poll() is None:
                p.kill()
                p.wait(10)
    log = (tmp_path / "rank0.log").read_text()
    assert code == 3, log[-2000:]
    assert "herd (rank 0 of 2): " in log and "ending the job" in log, log[-2000:]
    if fault == "killed":
        assert "another rank stopped answering" in log, log[-2000:]
    else:
        assert "Timed out waiting 6000ms" in log, log[-2000:]  # gloo's own words, quoted in herd's line


def test_torchrun_ends_the_job_when_a_rank_dies(chat_gguf, tmp_path):
    """Under torchrun, the agent ends the job too: kill rank 1 of a `herd serve --tp 2`, torchrun exits non-zero
    and names the failed rank."""
    launcher = torchrun("--nproc-per-node", "2", "--master-port", str(free_port()))
    proc, url = start_serve(chat_gguf, tmp_path / "serve.log", launcher, _env())
    try:
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        rank1 = [pid for pid in children if "RANK=1\0" in Path(f"/proc/{pid}/environ").read_text(errors="replace")]
        assert len(rank1) == 1, children
        os.kill(int(rank1[0]), signal.SIGKILL)
        code = proc.wait(60)  # not a hang
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = (tmp_path / "serve.log").read_text()
    assert code != 0 and "rank      : 1" in log, log[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")
def test_nccl_tp1_on_one_gpu(tmp_path):
    """One GPU: --tp 1 through the distributed path (NCCL), logits of HF within bf16-free fp32 tolerance."""
    ref = B.reference("llama3")
    ids = B.tokens("llama3", batch=2, length=16)
    job, out = tmp_path / "gpu.json", tmp_path / "gpu.pt"
    job.write_text(json.dumps({"items": [{"key": "gpu", "path": str(ref.hf_dir), "tp": 1, "ids": ids.tolist()}],
                               "device": "cuda"}))
    r = subprocess.run(torchrun("--nproc-per-node", "1", "--master-port", str(free_port()), str(WORKER), str(job),
                                str(out)), env=_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert max_diff(torch.load(out)["gpu"]["logits"].cpu(), ref.logits(ids)) < 1e-3


def test_run_command_under_torchrun(chat_gguf):
    """`python -m herd` as torchrun's module: `herd run --tp 2` prints what the single process prints."""
    args = ["-m", "herd", "run", str(chat_gguf), "Tell me a joke.", "--device", "cpu", "--dtype", "float32",
            "--temperature", "0", "--max-tokens", "8"]
    single = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=JOB_TIMEOUT)
    parallel = subprocess.run(torchrun("--nproc-per-node", "2", "--master-port", str(free_port()), *args, "--tp", "2"),
                              cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert single.returncode == 0 and parallel.returncode == 0, parallel.stderr[-3000:]
    assert parallel.stdout == single.stdout and single.stdout.strip()


def test_smollm2_at_tp3_answers_as_one_process(smollm2_path):
    """A real checkpoint (SmolLM2-135M, Q4_1 GGUF: 9 heads and 3 KV heads, so 3 ranks): each rank dequantizes
    its rows and whole blocks of columns; `herd run --tp 3` prints the single process's greedy answer."""
    args = ["-m", "herd", "run", str(smollm2_path), "What is the capital of France?", "--device", "cpu",
            "--dtype", "float32", "--temperature", "0", "--max-tokens", "16"]
    single = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=JOB_TIMEOUT)
    parallel = subprocess.run(torchrun("--nproc-per-node", "3", "--master-port", str(free_port()), *args, "--tp", "3"),
                              cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert single.returncode == 0 and parallel.returncode == 0, parallel.stderr[-3000:]
    assert parallel.stdout == single.stdout and "Paris" in single.stdout


def test_eval_under_torchrun(chat_gguf, tmp_path):
    """`herd eval --tp 2` under torchrun: rank 0 writes the report, with the single process's fingerprint,
    and every item's log-likelihoods within the float32 tolerance (greedy answers identical)."""
    reports = {}
    for name, launcher in (("single", [sys.executable]),
                           ("tp2", torchrun("--nproc-per-node", "2", "--master-port", str(free_port())))):
        out = tmp_path / f"{name}.json"
        args = ["-m", "herd", "eval", str(chat_gguf), "--task", "mc-arithmetic", "--task", "reasoning",
                "--steps", "1,2", "--limit", "6", "--max-tokens", "6", "--device", "cpu", "--dtype", "float32",
                "--out", str(out)]
        if name == "tp2":
            args += ["--tp", "2"]
        r = subprocess.run([*launcher, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=JOB_TIMEOUT)
        assert r.returncode == 0, r.stderr[-3000:]
        reports[name] = json.loads(out.read_text())
    single, tp2 = reports["single"], reports["tp2"]
    assert tp2["model"]["fingerprint"] == single["model"]["fingerprint"]
    assert (single["runtime"]["processes"], tp2["runtime"]["processes"]) == (1, 2)
    assert any("tensor_parallel" in m for m in tp2["runtime"]["modules"])
    for a, b in zip(single["tasks"], tp2["tasks"]):
        assert a["definition"] == b["definition"] and len(a["items"]) == len(b["items"]) > 0
        for x, y in zip(a["items"], b["items"]):
            if isinstance(x["output"], list):  # multiple choice: each choice's log-likelihood
                assert x["output"] == pytest.approx(y["output"], abs=TOL) and x["answer"] == y["answer"]
            else:
                assert x["output"] == y["output"]
