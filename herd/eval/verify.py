"""`herd eval verify`: does a report hold for these weights?

Nothing in a report is taken on its own word. Each check either runs or makes the report "not verified":

1. the signature (when there is one, or when a public key is demanded);
2. the model: the report must name its weights' fingerprint, and it must be these weights' (on a mismatch,
   the tensors and files that differ are named); a report without one (scored through a server) cannot be
   tied to any weights and is not verified, whatever else holds;
3. each task: a task this herd has, at the same version, rebuilt from its definition (every setting
   checked; none unknown); every data file it names has a SHA-256 record, and the file has that SHA-256;
   its items are exactly the task's items;
4. every item's record is built again from the model outputs it records (log-likelihoods, completions)
   and the task's data: answers, targets, scores and prompt hashes must be the report's, so an answer or a
   score edited anywhere is caught, sampled or not;
5. the metrics, tables and compute figures are aggregated again from those rebuilt records and must be the
   report's exactly: every metric, its value, standard error and n, none added and none missing;
6. a sample of items (every item with full=True), drawn with a seed that is fresh on every run unless
   given, is scored again on the same forwards the run scored it in (herd.eval.backends: the backend plans
   every item's requests and computes only the forwards that hold the sample), so its model outputs must
   be the same numbers: the default tolerance is zero in-process. Generation cannot be replayed for a
   subset (a decode step batches whatever runs together): when a sampled completion differs, every item of
   the task is generated again, as in the run, and those are compared.

A report that cannot be checked fully (an lm-eval task, a task this herd scores otherwise, unknown weights,
no tasks) is "not verified", never "holds".
"""

from __future__ import annotations

import json
import math
import random
import secrets
from dataclasses import dataclass, field

from herd.errors import HerdError
from herd.eval.data import canonical_json, sha256_file
from herd.eval.report import validate
from herd.eval.signing import check_signature
from herd.eval.tasks import TASKS, task_from_definition
from herd.eval.tasks.base import OutputError


@dataclass
class Verdict:
    findings: list[str] = field(default_factory=list)  # what does not hold
    unverified: list[str] = field(default_factory=list)  # what could not be checked
    checked: list[str] = field(default_factory=list)  # what was checked and holds
    seed: int | None = None  # the sample's seed: `--seed` repeats the draw

    @property
    def ok(self) -> bool:
        """Every check ran and held."""
        return not self.findings and not self.unverified

    @property
    def status(self) -> str:
        if self.findings:
            return "does NOT hold"
        return "is NOT verified" if self.unverified else "holds"


def _same(a, b, tolerance: float) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y, tolerance) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], tolerance) for k in a)
    if _number(a) and _number(b):
        return a == b or bool(tolerance) and math.isclose(a, b, rel_tol=tolerance, abs_tol=tolerance)
    return type(a) is type(b) and a == b


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_model(report: dict, model: dict, v: Verdict) -> None:
    reported = report.get("model", {})
    if not reported.get("fingerprint"):
        v.unverified.append("the report names no fingerprint (scored through a server, or removed): its scores "
                            "cannot be tied to these or any weights")
    elif reported["fingerprint"] == model["fingerprint"]:
        v.checked.append(f"fingerprint {model['fingerprint'][:16]}… matches")
        if reported.get("weights_known") is not True:
            v.findings.append("the report says its weights are unknown, yet names a fingerprint")
    else:
        v.findings.append(f"fingerprint differs: the report's {str(reported.get('fingerprint'))[:16]}…, these "
                          f"weights' {model['fingerprint'][:16]}…")
        old, new = reported.get("tensor_sha256") or {}, model["tensor_sha256"]
        changed = sorted(n for n in old.keys() & new.keys() if old[n] != new[n])
        for name in changed[:20]:
            v.findings.append(f"tensor {name} differs")
        if len(changed) > 20:
            v.findings.append(f"... and {len(changed) - 20} more tensors differ")
        for name in sorted(old.keys() - new.keys())[:20]:
            v.findings.append(f"tensor {name} is missing from these weights")
        for name in sorted(new.keys() - old.keys())[:20]:
            v.findings.append(f"tensor {name} is not in the report's weights")
    files = {f["name"]: f["sha256"] for f in model["files"]}
    for f in reported.get("files") or []:
        if f["name"] in files and files[f["name"]] != f["sha256"]:
            v.findings.append(f"file {f['name']}: SHA-256 differs from the report's")
    for key in ("tokenizer_sha256", "chat_template_sha256"):
        if reported.get(key) != model.get(key):
            v.findings.append(f"{key.removesuffix('_sha256').replace('_', ' ')} differs from the report's")


RUNTIME_FIELDS = ("device", "dtype", "matmul_dtype", "weights_quantized", "scoring", "batch_size", "threads",
                  "processes")


def runtime_differences(report: dict, backend) -> list[str]:
    """Where the verifying runtime differs from the run's in what can change the arithmetic's last bits."""
    if not hasattr(backend, "runtime_record"):
        return []
    mine, theirs = backend.runtime_record(), report.get("runtime") or {}
    out = [f"{k} {theirs.get(k)!r} in the report, {mine.get(k)!r} here" for k in RUNTIME_FIELDS
           if k in mine and theirs.get(k) != mine.get(k)]
    for k in ("torch", "herd"):
        a, b = (theirs.get("versions") or {}).get(k), (mine.get("versions") or {}).get(k)
        if a != b:
            out.append(f"{k} {a!r} in the report, {b!r} here")
    return out


def check_task(task_record: dict, backend, sample: int | None, seed: int, tolerance: float,
               data: dict[str, str], v: Verdict) -> None:
    d = task_record["definition"]
    name = d["task"]
    if d.get("kind") == "lm-eval" or name not in TASKS:
        v.unverified.append(f"{name}: {'scored by lm-eval' if d.get('kind') == 'lm-eval' else 'not a task of this herd'}"
                            "; herd cannot score it again from the report (re-run it to compare)")
        return
    cls = TASKS[name]
    if d.get("kind") != cls.kind or d.get("version") != cls.version:
        v.unverified.append(f"{name}: the report's task is {d.get('kind')!r} version {d.get('version')!r}; this herd "
                            f"scores {name} as {cls.kind!r} version {cls.version}, differently")
        return
    overrides = {f: data[name] for f in cls.data_fields[:1] if name in data}
    task = task_from_definition(d, **overrides)
    rebuilt = task.definition()
    for key in sorted(set(d) | set(rebuilt)):
        if key not in overrides and not _same(d.get(key), rebuilt.get(key), 0.0):
            v.findings.append(f"{name}: definition {key} is {_short(d.get(key))}, the task rebuilds it as "
                              f"{_short(rebuilt.get(key))}")
            return

    # the data: every file the definition names is recorded, and has the recorded SHA-256
    records = task_record.get("data") or {}
    for field_name in cls.data_fields:
        path = getattr(task, field_name)
        if path is None:
            continue
        rec = records.get(field_name)
        if rec is None:
            v.findings.append(f"{name}: the report has no SHA-256 of its data {field_name} ({path}), so nothing binds "
                              "its items to the data scored")
            return
        try:
            actual = sha256_file(path, f"{name}: data {field_name}")
        except HerdError as e:
            v.findings.append(f"{e} (give --data {name}=PATH where it is now)")
            return
        if actual != rec["sha256"]:
            v.findings.append(f"{name}: data {field_name} {path} has SHA-256 {actual[:16]}…, the report's "
                              f"{rec['sha256'][:16]}…")
            return
    for field_name in records.keys() - set(cls.data_fields):
        v.findings.append(f"{name}: data record {field_name!r} is not a data file of this task")

    # the items: exactly the task's
    items = task_record["items"]
    by_id = {r["id"]: r for r in items}
    if len(by_id) != len(items):
        v.findings.append(f"{name}: item ids repeat")
        return
    if task.kind == "perplexity":
        expected = task.item_ids(backend)
        task_items = None
    else:
        task_items = task.items(backend)
        expected = [i.id for i in task_items]
    missing = [i for i in expected if i not in by_id]
    extra = [i for i in by_id if i not in set(expected)]
    for i in missing[:20]:
        v.findings.append(f"{name}: item {i} is missing from the report")
    for i in extra[:20]:
        v.findings.append(f"{name}: item {i} is not one of the task's items")
    if missing or extra:
        return
    if [r["id"] for r in items] != expected:
        v.findings.append(f"{name}: the items are not in the task's order")
        return

    # every record again from its recorded outputs, then everything that is aggregated from them
    try:
        derived = task.rebuild(backend, task_items, by_id)
    except OutputError as e:
        v.findings.append(f"{name}: {e}")
        return
    wrong = 0
    for old, new in zip(items, derived):
        for key in sorted(set(old) | set(new)):
            if key not in old or key not in new or not _same(old[key], new[key], 0.0):
                wrong += 1
                if wrong <= 20:
                    v.findings.append(f"{name}: item {old['id']}: {key} is {_short(old.get(key, '(absent)'))} in the "
                                      f"report, but its recorded outputs and the task's data give "
                                      f"{_short(new.get(key, '(absent)'))}")
    if wrong > 20:
        v.findings.append(f"{name}: ... and {wrong - 20} more item fields")
    result = task.aggregate(derived)
    expected_parts = {"metrics": result.metrics, "tables": result.tables, "compute": result.compute,
                      "plots": getattr(result, "plots", {})}
    for part, value in expected_parts.items():
        reported = task_record.get(part, {} if part == "plots" else None)
        if not _same(_plain(reported), _plain(value), 0.0):
            for line in _differences(part, reported, value):
                v.findings.append(f"{name}: {line}")
    if not wrong and all(_same(_plain(task_record.get(p, {} if p == "plots" else None)), _plain(x), 0.0)
                         for p, x in expected_parts.items()):
        v.checked.append(f"{name}: all {len(items)} items' answers and scores, and the metrics "
                         f"({', '.join(sorted(result.metrics))}), follow from the recorded outputs and the data")

    # a sample scored again on the forwards the run scored it in
    ids = [r["id"] for r in items]
    chosen = set(ids) if sample is None else set(random.Random(f"verify:{seed}:{name}").sample(ids, min(sample,
                                                                                                         len(ids))))
    if not chosen:
        return
    fresh = {r["id"]: r for r in task.run(backend, only=chosen).items}
    differs = [i for i in sorted(chosen) if not _same(_outputs(task, by_id[i]), _outputs(task, fresh.get(i, {})),
                                                      tolerance)]
    if differs and task.kind == "generative" and len(chosen) < len(ids):
        v.checked.append(f"{name}: {len(differs)} sampled completions differ; generating every item again as the "
                         "run did (a decode step batches whatever runs together)")
        fresh = {r["id"]: r for r in task.run(backend).items}
        chosen = set(ids)
        differs = [i for i in ids if not _same(_outputs(task, by_id[i]), _outputs(task, fresh.get(i, {})), tolerance)]
    for i in differs[:20]:
        for f in task.output_fields:
            if not _same(by_id[i].get(f), fresh.get(i, {}).get(f), tolerance):
                v.findings.append(f"{name}: item {i}: {f} is {_short(by_id[i].get(f))} in the report, "
                                  f"{_short(fresh.get(i, {}).get(f))} scored again"
                                  + (f" (tolerance {tolerance})" if tolerance else " (the same forwards: exactly)"))
    if len(differs) > 20:
        v.findings.append(f"{name}: ... and {len(differs) - 20} more items scored again differ")
    if not differs:
        v.checked.append(f"{name}: {len(chosen)} of {len(ids)} items scored again: the same outputs"
                         + (f" (tolerance {tolerance})" if tolerance else ", exactly"))


def _outputs(task, record: dict) -> dict:
    return {f: record.get(f) for f in task.output_fields}


def _plain(value):
    """JSON's view of a value (tuples as lists, keys as strings), as the report holds it once saved."""
    return json.loads(canonical_json(value)) if value is not None else None


def _differences(part: str, reported, expected) -> list[str]:
    """Each place where a reported figure and the one its items give part, by path (metrics.acc.stderr)."""
    reported, expected = _plain(reported), _plain(expected)
    if not isinstance(reported, dict) or not isinstance(expected, dict):
        if _same(reported, expected, 0.0):
            return []
        return [f"{part} is {_short(reported)} in the report, but its items give {_short(expected)}"]
    out = []
    for key in sorted(set(reported) | set(expected)):
        if key not in expected:
            out.append(f"{part}.{key} is in the report, but the task has no such figure")
        elif key not in reported:
            out.append(f"{part}.{key} is missing from the report")
        else:
            out += _differences(f"{part}.{key}", reported[key], expected[key])
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def verify(report: dict, backend, sample: int | None = 20, seed: int | None = None, tolerance: float | None = None,
           public_key=None, data: dict[str, str] | None = None, source=None) -> Verdict:
    """`backend`: herd.eval.backends.EngineBackend on the weights to check (or a ServerBackend). `seed`: draws
    the sample (None: a fresh one, recorded in the verdict). `tolerance`: for re-scored log-likelihoods
    (None: exact in-process, where the same forwards run again; 1e-5 through a server, whose batching is its
    own)."""
    validate(report)
    v = Verdict(seed=secrets.randbits(32) if seed is None else seed)
    in_process = hasattr(backend, "llm")
    if tolerance is None:
        tolerance = 0.0 if in_process else 1e-5
    if not report["tasks"]:
        v.unverified.append("the report holds no tasks: there is nothing to verify")
    problems = check_signature(report, public_key)
    v.findings += problems
    if "signature" in report and not problems:
        v.checked.append(f"signature by key {report['signature']['key_id']} holds")
    if in_process:
        check_model(report, backend.model_record(source), v)
    else:
        v.unverified.append("re-scored through a server: its weights cannot be identified")
    differences = runtime_differences(report, backend) if in_process else []
    if differences:
        v.checked.append("the runtime differs from the report's (" + "; ".join(differences) + "): re-scored "
                         "outputs may differ in the last bits; give --tolerance to allow that")
    names = [t["definition"]["task"] for t in report["tasks"]]
    for task_record in report["tasks"]:
        name = task_record["definition"]["task"]
        if names.count(name) > 1:
            v.findings.append(f"{name}: the report holds this task {names.count(name)} times")
            continue
        try:
            check_task(task_record, backend, sample, v.seed, tolerance, data or {}, v)
        except HerdError as e:
            v.findings.append(f"{name}: {e}")
    if sample is not None:
        v.checked.append(f"sample seed {v.seed} (--seed {v.seed} draws the same sample)")
    return v
