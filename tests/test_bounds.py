"""What a hostile chat template or JSON schema may cost (issue 23, findings 8 and 9).

Templates (herd.chat.template): every value a render builds is bounded in size before it is built and its
memory counted (MAX_BYTES plus 16x the input); `herd serve` renders in worker processes, under an
address-space limit and killed at the deadline. Schemas (herd.engine.constrained): what decoding one can
cost is worked out when it compiles (past MAX_PARSES it is refused), each mask's work is counted, and the
engine computes masks a slice at a time so other requests keep moving.

Memory is measured as the peak RSS (VmHWM) of a child process that runs the hostile inputs under
`prlimit --as` (a regression meets the limit instead of the machine's memory); time only as deadlines.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from herd.chat.template import MAX_BYTES, RenderProcesses, TemplateFormat, render_in_processes
from herd.engine import Engine, Request
from herd.engine import constrained as C
from herd.engine import engine as engine_module
from herd.errors import TemplateError
from herd.sampling import SamplingParams
from tests.fixtures.serving import ServerThread, free_port, http

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
TEMPLATE_GROWTH = MAX_BYTES + 64 * MIB  # the most a render may add to a process's peak RSS (with allocator slack)
SCHEMA_GROWTH = 256 * MIB  # caches of steps (250k stacks) and masks (64 MiB) over all grammars, plus compiling


def run_child(command: str, request: dict, address_space: int, deadline: float) -> dict:
    """tests/fixtures/bounded.py in a child under `prlimit --as=address_space`; its JSON report."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(["prlimit", f"--as={address_space}", sys.executable, str(ROOT / "tests/fixtures/bounded.py"),
                          command], input=json.dumps(request), capture_output=True, text=True, timeout=deadline,
                         env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


# -- chat templates: finding 8 ----------------------------------------------------------------------------------

HOSTILE_TEMPLATES = [
    "{{ ('x'.encode()) * 10**9 }}",  # a byte string multiplied
    "{% set b = 'x'.encode() * 999999 %}{{ (b * 999999)|length }}",
    "{% set b = 'x'.encode() * 999999 %}{{ b.replace('x'.encode(), b)|length }}",  # bytes.replace
    "{% set b = 'x'.encode() * 999999 %}{{ b.join(['y'.encode()] * 999)|length }}",  # bytes.join
    "{% set s = 'x' * 999999 %}{{ s.translate({120: s})|length }}",  # str.translate with a large mapping
    "{% set s = '😀' * 999999 %}{{ s.translate({128512: '😀' * 999999})|length }}",
    "{% macro f(n) %}{% set s = ('😀' * 999990) ~ n %}{% if n %}{{ f(n - 1)|length }}{% endif %}{% endmacro %}{{ f(900) }}",
    "{% set ns = namespace(x=[]) %}{% for i in range(100000) %}{% set ns.x = [ns.x, ('y' * 1000) ~ i] %}{% endfor %}",
    "{{ range(1000)|map('center', 999999)|list|length }}",  # many values, each within the size limit
    "{{ ('é ' * 490000)|title|length }}",  # a million small strings while it runs
    "{{ ('ab' * 499999).split('b')|length }}",
    "{{ ('%*s' * 1000) % ((999999, 'x') * 1000) }}",
    "{{ ('é' * 300000).encode('ascii', 'namereplace')|length }}",  # 40 characters per character
    "{{ [1]|slice(999999)|list|length }}",
    "{{ ('x' * 999999)|list|length }}",
    "{{ ('\t' * 999999).expandtabs(999999) }}",
    "{{ ('\u0001' * 999990)|tojson(ensure_ascii=true)|length }}",
    "{{ (['😀' * 99999] * 10)|pprint|length }}",
    "{{ ('a' * 999999)|wordwrap(1, wrapstring='😀' * 999999)|length }}",
    "{{ ('a ' * 499999)|urlize(target='x' * 999999)|length }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",  # the deadline
]


def test_hostile_templates_are_refused_before_they_allocate():
    """Each is a TemplateError from the sandbox's own bounds (not a MemoryError from the address-space limit),
    and the child's peak RSS grows by less than TEMPLATE_GROWTH; before, the first took 1.9 GB and 15 s."""
    report = run_child("templates", {"timeout_s": 5.0, "cases": [{"source": s} for s in HOSTILE_TEMPLATES]},
                       address_space=1 << 30, deadline=600)
    for source, (kind, detail, _) in zip(HOSTILE_TEMPLATES, report["results"]):
        assert kind == "herd", (source, kind, detail)
        assert "forbids" in detail or "took longer than" in detail, (source, detail)
        assert "MemoryError" not in detail and "needs more memory" not in detail, (source, detail)
    growth = (report["peak_kib"] - report["baseline_kib"]) * 1024
    assert growth < TEMPLATE_GROWTH, f"{growth / MIB:.0f} MiB"


NUMBERS = ["0", "1", "3", "-1", "999", "99999", "999999", "10 ** 7", "10 ** 9", "2 ** 64"]
TEXTS = ["'x'", "'😀'", "'\\t'", "'%s%s'", "'{}{}'", "'{0:>{1}}'", "'<|eot_id|>'", "messages[0]['content']",
         "('ab' * 500)", "'x'.encode()"]
ATOMS = TEXTS + ["range(3)", "range(99999)", "[1, 'a']", "{'a': 'b'}", "messages", "ns.x", "n", "7", "2.5", "none"]
METHODS = ["join([{e}] * {n})", "replace({t}, {t} * {n})", "translate({{120: {t} * {n}}})", "center({n})", "ljust({n})",
           "zfill({n})", "expandtabs({n})", "encode('ascii', 'namereplace')", "encode()", "decode()", "split({t})",
           "splitlines()", "format({e}, {n})", "format_map({{'a': {e}}})", "upper()", "title()", "hex()",
           "count({t})", "partition({t})", "to_bytes({n}, 'big')", "items()", "keys()", "__class__", "mro()", "_x",
           "startswith({t})", "strip()", "index({t})"]
FILTERS = ["join({t})", "indent({n})", "replace({t}, {t} * {n})", "format({e})", "center({n})", "wordwrap({n})",
           "truncate({n})", "urlize", "e", "urlencode", "xmlattr", "string", "pprint", "title", "upper", "batch({n})",
           "slice({n})", "list", "sum", "sum(start=[])", "tojson", "tojson(indent={n})", "sort", "unique", "reverse",
           "map('string')", "map('center', {n})", "select", "dictsort", "items", "groupby('a')", "first", "length",
           "int", "float", "round", "default({e})", "trim", "striptags", "filesizeformat", "wordcount", "random", "min",
           "max", "abs", "attr('x')", "capitalize", "forceescape", "selectattr('a')", "reject", "last", "count",
           "tojson(separators=({t}, {t}))", "nosuchfilter"]


def _expr(r: random.Random, depth: int) -> str:
    if depth == 0 or r.random() < 0.25:
        return r.choice(ATOMS)
    e, e2, n, t = _expr(r, depth - 1), _expr(r, depth - 1), r.choice(NUMBERS), r.choice(TEXTS)
    fill = {"e": e2, "n": n, "t": t}
    return r.choice([f"({e}) * {n}", f"({e}) + ({e2})", f"({e}) ~ ({e2})", f"({e}) % ({e2})", f"({e}) ** {n}",
                     f"({e}).{r.choice(METHODS).format(**fill)}", f"({e}) | {r.choice(FILTERS).format(**fill)}",
                     f"({e})[{n}:]", f"[{e}, {e2}]", f"({e}, {e2})", f"{{'k': {e}}}", f"({e}) // {n}",
                     f"dict(a={e})", f"namespace(a={e})", f"({e}) in ({e2})"])


def fuzz_template(r: random.Random) -> str:
    e, n = _expr(r, r.randint(1, 4)), r.choice(["0", "3", "999", "99999"])
    body = r.choice([
        "{{ E }}",
        "{% for i in range(N) %}{{ E }}{% endfor %}",
        "{% for i in range(N) %}{% for j in range(N) %}{{ E }}{% endfor %}{% endfor %}",
        "{% set ns = namespace(x=E) %}{% for i in range(N) %}{% set ns.x = E %}{% endfor %}{{ ns.x | length }}",
        "{% macro f(n) %}{% if n > 0 %}{{ E }}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(N) }}",
        "{% set b %}{% for i in range(N) %}{{ E }}{% endfor %}{% endset %}{{ b | length }}",
        "{% filter upper %}{{ E }}{% endfilter %}",
        "{% for m in messages recursive %}{{ E }}{{ loop([m, m]) if loop.depth < N else '' }}{% endfor %}",
    ]).replace("N", n).replace("E", e)
    if "ns." in body and "namespace(" not in body:
        body = "{% set ns = namespace(x='x') %}" + body
    if r.random() < 0.2:  # malformed
        cut = r.randint(0, len(body))
        body = r.choice([body[:cut], body[:cut] + r.choice(["{%", "}}", "{% endif %}", "{{ }", "{% for %}"]) + body[cut:],
                         "{% include 'x' %}" + body, "{% extends '/etc/passwd' %}", "{{ x.__class__.__mro__ }}",
                         "{% if 1 %}" * r.choice([30, 300]) + "x" + "{% endif %}" * r.choice([30, 300]),
                         "{{ " + "(" * r.choice([100, 1000]) + "1" + ")" * r.choice([100, 1000]) + " }}",
                         "".join(f"{{% for a{i} in range(2) %}}" for i in range(25)) + "x"
                         + "{% endfor %}" * 25])
    return body


def test_template_fuzz_gives_template_errors_within_bounds():
    """300 generated hostile or malformed templates (seeded): each renders or raises TemplateError, never
    anything else, within a deadline, and the child's peak RSS stays under the bound."""
    r = random.Random(23)
    sources = [fuzz_template(r) for _ in range(300)]
    report = run_child("templates", {"timeout_s": 0.25, "cases": [{"source": s} for s in sources]},
                       address_space=1 << 30, deadline=900)
    kinds = [kind for kind, _, _ in report["results"]]
    others = [(s, detail) for s, (kind, detail, _) in zip(sources, report["results"]) if kind != "herd" and kind != "ok"]
    assert not others, others[:5]
    memory = [(s, d) for s, (kind, d, _) in zip(sources, report["results"]) if kind == "herd" and "needs more memory" in d]
    assert not memory, memory[:5]
    assert kinds.count("herd") > 100 and kinds.count("ok") > 10  # the generator reaches both
    growth = (report["peak_kib"] - report["baseline_kib"]) * 1024
    assert growth < TEMPLATE_GROWTH, f"{growth / MIB:.0f} MiB"


def test_ordinary_templates_still_render_within_the_bounds():
    """A long conversation through a template that copies it several times (+, trim, replace, tojson, split)
    is not mistaken for an attack: the bounds grow with the input."""
    content = "word \"quoted\"\n" * 150_000  # 2 MB
    source = ("{% for m in messages %}{{ '<|start|>' + m['role'] + '\\n' + m['content'] | trim + '<|end|>' }}"
              "{{ m['content'].split('\\n')[-2] }}{{ m['content'] | replace('word', 'w') | length }}"
              "{{ m['content'] | tojson | length }}{% endfor %}")
    text = TemplateFormat(source).render_text([{"role": "user", "content": content}] * 2)
    assert text.count("<|start|>") == 2 and text.count(content.strip()) == 2


# -- rendering in worker processes ------------------------------------------------------------------------------

def _smollm2_template(smollm2_path) -> str:
    from gguf import GGUFReader

    return GGUFReader(smollm2_path).fields["tokenizer.chat_template"].contents()


def test_worker_processes_render_as_transformers_does(smollm2_path):
    """Through render_in_processes, real templates give transformers' render_jinja_template text exactly."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from tests.test_chat import CONVERSATIONS, GET_WEATHER, LLAMA31_STYLE_TEMPLATE, _hf_messages

    cases = [(_smollm2_template(smollm2_path), None, {}, CONVERSATIONS[:2]),
             (LLAMA31_STYLE_TEMPLATE, [GET_WEATHER], {"date_string": "26 Jul 2024"}, CONVERSATIONS)]
    special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    for source, tools, kwargs, conversations in cases:
        fmt = TemplateFormat(source)
        with render_in_processes(fmt):
            assert fmt.processes is not None
            for messages in conversations:
                for agp in (True, False):
                    want = render_jinja_template([_hf_messages(messages)], tools=tools, chat_template=source,
                                                 add_generation_prompt=agp, **special, **kwargs)[0][0]
                    assert fmt.render_text(messages, tools, agp, **special, **kwargs) == want
        assert fmt.processes is None


def _worker_pid(processes: RenderProcesses) -> int:
    with processes._cond:
        return processes._idle[-1].proc.pid


def _render_in_thread(fmt: TemplateFormat) -> tuple[threading.Thread, dict]:
    """Render in a thread; the dict gets the TemplateError (or the text) when it ends."""
    result: dict = {}

    def run():
        try:
            result["text"] = fmt.render_text([{"role": "user", "content": "hi"}])
        except TemplateError as e:
            result["error"] = str(e)

    t = threading.Thread(target=run)
    t.start()
    return t, result


def test_render_processes_kill_a_worker_past_the_deadline_and_limit_its_memory():
    """A worker that stops answering is killed at the deadline, one that dies is reported, and the next render
    gets a new worker; while a worker renders, its address space is limited."""
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    quick, slow, echo = TemplateFormat(loop, timeout_s=0.5), TemplateFormat(loop, timeout_s=3), \
        TemplateFormat("{{ messages[0].content }}")
    processes = RenderProcesses(workers=1, grace_s=0.5)
    for fmt in (quick, slow, echo):
        fmt.processes = processes
    try:
        with pytest.raises(TemplateError, match="took longer than 0.5 s"):  # the worker's own deadline
            quick.render_text([{"role": "user", "content": "hi"}])
        pid = _worker_pid(processes)  # the same worker goes on
        t, result = _render_in_thread(slow)
        time.sleep(0.3)
        line = next(ln for ln in Path(f"/proc/{pid}/limits").read_text().splitlines()
                    if ln.startswith("Max address space"))
        assert line.split()[3] != "unlimited" and int(line.split()[3]) < 4 << 30, line
        os.kill(pid, signal.SIGSTOP)  # it can no longer answer, nor notice its own deadline
        t.join(30)
        assert "took longer than 3 s" in result["error"], result
        status = Path(f"/proc/{pid}/status")
        assert not status.exists() or "zombie" in status.read_text()  # killed by the caller, not finished
        assert echo.render_text([{"role": "user", "content": "hi"}]) == "hi"  # a new worker
        pid = _worker_pid(processes)
        t, result = _render_in_thread(slow)
        time.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
        t.join(30)
        assert "render process ended (killed by SIGKILL)" in result["error"], result
        assert echo.render_text([{"role": "user", "content": "hi"}]) == "hi"
    finally:
        processes.close()


# -- herd serve with a hostile template -------------------------------------------------------------------------

SERVE_TEMPLATE = """{%- set c = messages[-1]['content'] -%}
{%- if c == 'bytes' -%}{{ ('x'.encode()) * 10**9 }}
{%- elif c == 'translate' -%}{% set s = 'x' * 999999 %}{{ s.translate({120: s}) }}
{%- elif c == 'join' -%}{% set b = 'x'.encode() * 999 %}{{ b.join([b] * 999999) }}
{%- elif c == 'slow' -%}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}
{%- else -%}{% for m in messages %}{{ m['content'] }} {% endfor %}{%- endif -%}"""


def _hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


@pytest.fixture(scope="module")
def hostile_serve(tmp_path_factory):
    """`herd serve` on a tiny Llama 3 checkpoint whose chat template runs away on some contents."""
    from tests.fixtures import build

    model = tmp_path_factory.mktemp("hostile") / "model"
    shutil.copytree(build.reference("llama3").hf_dir, model)
    build.write_hf_tokenizer(model, build.SPECS["llama3"].vocab)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": SERVE_TEMPLATE}))
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = model.parent / "stderr.txt"
    with open(log, "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "herd", "serve", str(model), "--port", str(port), "--max-batch",
                              "2", "--context", "64", "--dtype", "float32", "--device", "cpu",
                              "--served-model-name", "tiny"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):  # bounded: 120 s to load
            if p.poll() is not None:
                break
            try:
                if http("GET", url + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert p.poll() is None, log.read_text()[-3000:]
        yield p, url
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(30)


def _chat(url: str, content: str, timeout: float = 120):
    return http("POST", url + "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": content}],
                                                       "max_tokens": 3, "temperature": 0}, timeout=timeout)


def test_serve_answers_health_while_a_hostile_template_renders(hostile_serve):
    """Each hostile content gets a 400 naming the chat template; meanwhile /health answers within a second
    and an ordinary request completes, and the server's own peak RSS barely moves (before: 423 MB to 2.8 GB,
    /health blocked over 10 s)."""
    p, url = hostile_serve
    assert _chat(url, "t2 t3")[0] == 200  # warm: the first request's allocations are not the attack's
    before = _hwm_kib(p.pid)
    for content in ("bytes", "translate", "join", "slow"):
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("r", _chat(url, content)))
        t.start()
        latencies = []
        ordinary = None
        while t.is_alive():
            start = time.monotonic()
            status, _ = http("GET", url + "/health", timeout=30)
            latencies.append(time.monotonic() - start)
            assert status == 200
            if ordinary is None:
                ordinary = _chat(url, "t4 t5")
            time.sleep(0.05)
        t.join()
        status, body = result["r"]
        assert status == 400 and "chat template" in body["error"]["message"], (content, body)
        assert ordinary is None or ordinary[0] == 200, ordinary
        assert max(latencies, default=0) < 1.0, (content, latencies)
    assert (_hwm_kib(p.pid) - before) * 1024 < 64 * MIB, (before, _hwm_kib(p.pid))


# -- JSON schemas: finding 9 ------------------------------------------------------------------------------------

def wide_schema(width: int = 40, levels: int = 3) -> dict:
    """The finding's shape: anyOf `width` wide, `levels` deep, through $ref (13.6 KB at 40 x 3)."""
    defs = {}
    for i in range(levels):
        inner = {"$ref": f"#/$defs/l{i + 1}"} if i + 1 < levels else {"type": "integer"}
        defs[f"l{i}"] = {"anyOf": [{"type": "object", "properties": {"v": inner, f"k{j}": {"type": "string"}},
                                    "required": ["v"]} for j in range(width)]}
    return {"$defs": defs, "$ref": "#/$defs/l0"}


OPTIONAL_9000 = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(9000)}}


def test_ambiguity_bound_refuses_the_wide_schema_and_takes_real_ones():
    assert len(json.dumps(wide_schema())) > 13_000
    with pytest.raises(C.UnsupportedSchema, match=f"more than {C.MAX_PARSES} ways"):
        C.grammar_for(wide_schema())
    assert C.grammar_for(wide_schema(40, 1)).parses <= C.MAX_PARSES  # one level: 40 branches, fine
    # what tool_choice "required" builds for 128 tools (OpenAI's limit): the const name decides the branch
    tools = [{"type": "object", "properties": {"name": {"const": f"tool_{i}"}, "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]},
                                         "days": {"type": "integer"}}, "required": ["city"]}},
              "required": ["name", "parameters"]} for i in range(128)]
    assert C.grammar_for({"type": "array", "minItems": 1, "items": {"anyOf": tools}}).parses <= 128
    tree = {"$defs": {"node": {"type": "object", "properties": {"name": {"type": "string"}, "children": {
        "type": "array", "items": {"$ref": "#/$defs/node"}}}, "required": ["name"]}}, "$ref": "#/$defs/node"}
    value = {"$defs": {"v": {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"},
                                       {"type": "array", "items": {"$ref": "#/$defs/v"}},
                                       {"type": "object", "additionalProperties": {"$ref": "#/$defs/v"}}]}},
             "$ref": "#/$defs/v"}
    assert C.grammar_for(tree).parses == 1 and C.grammar_for(value).parses < 10 and C.grammar_for(None).parses < 10
    # branches that never part (two alternatives recurring behind the same prefix): 2^depth parses
    forever = {"$defs": {"n": {"anyOf": [{"type": "object", "properties": {"a": {"$ref": "#/$defs/n"}}},
                                         {"type": "object", "properties": {"a": {"$ref": "#/$defs/n"}, "x": {}}}]}},
               "$ref": "#/$defs/n"}
    with pytest.raises(C.UnsupportedSchema, match="too ambiguous"):
        C.grammar_for(forever)


def test_masks_of_9000_optional_properties_cost_a_few_steps(smollm2):
    """Property names are found by bisection: each mask along `{"p5000": 1, "p6000": 2}` takes a bounded
    number of automaton steps (before: 9,000 stacks after the first quote, 12-13 s per mask)."""
    tok = smollm2.tokenizer
    constraint = C.json_constraint(OPTIONAL_9000, tok, [tok.eos_id], smollm2.config.vocab_size)()
    text = '{"p5000": 1, "p6000": 2}'
    while text:
        meter = C._Meter(C.MAX_MASK_STEPS)
        work = constraint.grammar.mask_work(constraint.state, constraint.vocab, meter)
        meter.pause = 1 << 62
        with pytest.raises(StopIteration):
            next(work)
        assert meter.steps < 5_000, (text, meter.steps)
        allowed = constraint.allowed(smollm2.config.vocab_size)
        token = max((t for t in allowed.nonzero().flatten().tolist() if text.startswith(constraint.vocab_text(t))
                     and constraint.vocab_text(t)), key=lambda t: len(constraint.vocab_text(t)))
        constraint.advance(token)
        text = text[len(constraint.vocab_text(token)):]
        assert len(constraint.state) == 1
    assert constraint.grammar.complete(constraint.state)


def costly_schema(width: int = 200) -> dict:
    """Accepted (each branch's const tag decides it) but with costly masks at first: `width` objects alive
    until their first property's string is read."""
    return {"anyOf": [{"type": "object", "properties": {"note": {"type": "string", "maxLength": 40 + i},
                                                        "tag": {"const": f"t{i}"}}, "required": ["note", "tag"]}
                      for i in range(width)]}


def test_engine_gives_masks_a_bounded_share_of_each_step(smollm2, monkeypatch):
    """A request whose masks are costly sits out of the batch until its mask is ready, computed at most
    MASK_STEPS (plus one trie edge of its stacks) per engine step; the plain request beside it draws a token
    every step. (Counted in automaton steps, not seconds: the forward's own time is the machine's.)"""
    grammar = C.grammar_for(costly_schema())
    assert grammar.parses <= C.MAX_PARSES
    steps_per_engine_step = []
    real_prepare = C.Constraint.prepare

    def counted(self, steps):
        meter, before = self._meter, self._meter.steps
        try:
            return real_prepare(self, steps)
        finally:
            steps_per_engine_step[-1] += self._meter.steps - (before if self._meter is meter else 0)

    monkeypatch.setattr(C.Constraint, "prepare", counted)
    tok = smollm2.tokenizer
    engine = Engine(smollm2.model, tok, max_batch=2, context=128, prefill_budget=64)
    factory = C.json_constraint(costly_schema(), tok, smollm2.stop_ids, smollm2.config.vocab_size)
    engine.add_request(Request("json", tok.encode("A note:"), 12, SamplingParams(temperature=0),
                               frozenset(smollm2.stop_ids), constraint=factory))
    engine.add_request(Request("plain", tok.encode("The capital of France is"), 6, SamplingParams(temperature=0)))
    tokens = {"json": 0, "plain": 0}
    held = 0
    for _ in range(1000):  # bounded
        if not engine.has_work():
            break
        steps_per_engine_step.append(0)
        outs = engine.step()
        drew = {o.request_id for o in outs if o.token_ids}
        if 0 < tokens["plain"] < 6:
            assert "plain" in drew  # once it draws, it draws every step, whatever the other one waits for
        for o in outs:
            assert o.error is None, o.error
            tokens[o.request_id] += len(o.token_ids)
        seq = engine._seqs.get("json")
        held += seq is not None and not seq.constraint.ready
    assert tokens["plain"] == 6 and tokens["json"] > 0
    assert held > 0  # the costly masks did span steps
    assert max(steps_per_engine_step) <= engine_module.MASK_STEPS + C.MAX_PARSES + 1, max(steps_per_engine_step)


def test_schema_fuzz_gives_herd_errors_within_bounds():
    """300 generated schemas (seeded): malformed, deep, wide, recursive, huge enums and random nestings. Each
    compiles or raises UnsupportedSchema, decoding a random walk of 40 tokens never raises anything else,
    the automaton never holds more stacks than the compile-time bound said, and the child's peak RSS stays
    under the bound, within a deadline."""
    report = run_child("schemas", {"seed": 9, "count": 300, "tokens": 40}, address_space=3 << 30, deadline=900)
    results = report["results"]
    others = [r for r in results if r[0] not in ("ok", "herd")]
    assert not others, others[:5]
    assert all(r[1].startswith("UnsupportedSchema") for r in results if r[0] == "herd"), \
        [r for r in results if r[0] == "herd" and not r[1].startswith("UnsupportedSchema")][:5]
    ok = [r[1] for r in results if r[0] == "ok"]
    assert len(ok) > 100 and sum(r[0] == "herd" for r in results) > 50
    assert all(r["most"] <= r["parses"] <= C.MAX_PARSES for r in ok), [r for r in ok if r["most"] > r["parses"]][:5]
    growth = (report["peak_kib"] - report["baseline_kib"]) * 1024
    assert growth < SCHEMA_GROWTH, f"{growth / MIB:.0f} MiB"


# -- the server with hostile schemas ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(smollm2):
    from herd.server import create_app

    with ServerThread(create_app(smollm2, max_batch=4, context=256, model_id="smol")) as srv:
        yield srv


def _schema_request(schema, max_tokens: int = 6) -> dict:
    return {"model": "smol", "messages": [{"role": "user", "content": "Answer in JSON."}], "max_tokens": max_tokens,
            "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


def test_server_refuses_the_wide_schema_and_keeps_moving_with_a_large_one(server):
    """The finding's 13.6 KB schema is a 400 naming the bound (before: every other request timed out at
    120 s); 9,000 optional properties decode while /health answers within a second and an ordinary request
    completes."""
    status, body = http("POST", server.url + "/v1/chat/completions", _schema_request(wide_schema()), timeout=60)
    assert status == 400 and body["error"]["param"] == "response_format", body
    assert f"more than {C.MAX_PARSES} ways" in body["error"]["message"], body
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", http(
        "POST", server.url + "/v1/chat/completions", _schema_request(OPTIONAL_9000, 12), timeout=300)))
    t.start()
    ordinary = http("POST", server.url + "/v1/chat/completions",
                    {"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}, timeout=120)
    latencies = []
    while t.is_alive():
        start = time.monotonic()
        assert http("GET", server.url + "/health", timeout=30)[0] == 200
        latencies.append(time.monotonic() - start)
        time.sleep(0.05)
    t.join()
    assert ordinary[0] == 200, ordinary
    status, body = result["r"]
    assert status == 200, body
    assert max(latencies, default=0) < 1.0, latencies


def test_server_schema_fuzz_is_never_a_500(server):
    """A sample of the generated schemas through the server: 200 or 400, never a 500."""
    sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
    try:
        import bounded
    finally:
        sys.path.pop(0)
    r = random.Random(5)
    for i in range(40):
        schema = bounded.hostile_schema(r) if i % 2 else bounded.random_schema(r, 3, [])
        if isinstance(schema, dict) and schema.get("const") != schema.get("const"):  # NaN: not JSON on the wire
            continue
        try:
            body = _schema_request(schema, 2)
            json.dumps(body, allow_nan=False)
        except ValueError:
            continue
        status, answer = http("POST", server.url + "/v1/chat/completions", body, timeout=120)
        assert status in (200, 400), (json.dumps(schema)[:300], status, answer)
