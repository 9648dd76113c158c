"""`herd eval verify`: does a report hold for these weights?

1. the signature (when there is one, or when a public key is demanded);
2. the model: fingerprint, and on a mismatch the tensors and files that differ;
3. each task: its data's SHA-256, its items (none missing or added against the task's own item list) and
   its metrics recomputed from its items;
4. a seeded sample of items (all with full=True) scored again and compared field by field: exactly for
   answers, scores and prompt hashes, within `tolerance` for log-likelihoods.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from herd.eval.data import DataError, sha256_file
from herd.eval.signing import check_signature
from herd.eval.tasks import task_from_definition


@dataclass
class Verdict:
    findings: list[str] = field(default_factory=list)  # what does not hold
    checked: list[str] = field(default_factory=list)  # what was checked and holds

    @property
    def ok(self) -> bool:
        return not self.findings


def _close(a, b, tolerance: float) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, tolerance) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=tolerance, abs_tol=tolerance)
    return a == b


def check_model(report: dict, model: dict, v: Verdict) -> None:
    reported = report.get("model", {})
    if not reported.get("weights_known"):
        v.checked.append("the report's weights are unknown (scored through a server): items re-scored only")
        return
    if reported.get("fingerprint") == model["fingerprint"]:
        v.checked.append(f"fingerprint {model['fingerprint'][:16]}… matches")
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
    for f in reported.get("files", []):
        if f["name"] in files and files[f["name"]] != f["sha256"]:
            v.findings.append(f"file {f['name']}: SHA-256 differs from the report's")
    for key in ("tokenizer_sha256", "chat_template_sha256"):
        if reported.get(key) != model.get(key):
            v.findings.append(f"{key.removesuffix('_sha256').replace('_', ' ')} differs from the report's")


def check_task(task_record: dict, backend, sample: int | None, seed: int, tolerance: float,
               data: dict[str, str], v: Verdict) -> None:
    d = task_record["definition"]
    name = d["task"]
    if d.get("kind") == "lm-eval":
        v.checked.append(f"{name}: scored by lm-eval; re-run it with herd eval --lm-eval to compare (not re-scored)")
        return
    overrides = {"data": data[name]} if name in data else {}
    task = task_from_definition(d, **overrides)
    for field_name, rec in (task_record.get("data") or {}).items():
        path = getattr(task, field_name)
        try:
            actual = sha256_file(path)
        except OSError:
            v.findings.append(f"{name}: data file {path} is not here (give --data {name}=PATH)")
            return
        if actual != rec["sha256"]:
            v.findings.append(f"{name}: data {field_name} {path} has SHA-256 {actual[:16]}…, the report's "
                              f"{rec['sha256'][:16]}…")
            return
    items = task_record.get("items", [])
    by_id = {r["id"]: r for r in items}
    if len(by_id) != len(items):
        v.findings.append(f"{name}: item ids repeat")
    if task.kind == "perplexity":  # its items are the text's windows, counted when it was scored
        expected_ids = None
        windows = task_record.get("compute", {}).get("windows_in_text")
        if d.get("limit") is None and windows is not None and len(items) != windows:
            v.findings.append(f"{name}: {len(items)} windows in the report, the text has {windows}")
    else:
        expected_ids = [i.id for i in task.items(backend)]
        missing = [i for i in expected_ids if i not in by_id]
        extra = [i for i in by_id if i not in set(expected_ids)]
        for i in missing[:20]:
            v.findings.append(f"{name}: item {i} is missing from the report")
        for i in extra[:20]:
            v.findings.append(f"{name}: item {i} is not one of the task's items")
    # the metrics must follow from the items
    recomputed = task.aggregate(items).metrics if items else {}
    for metric, s in task_record.get("metrics", {}).items():
        r = recomputed.get(metric)
        if r is None:
            continue
        if r["n"] != s.get("n") or not _close(r["value"], s["value"], 1e-9):
            v.findings.append(f"{name}: {metric} is {s['value']} (n={s.get('n')}) in the report, but its items give "
                              f"{r['value']} (n={r['n']})")
    # re-score a seeded sample
    ids = sorted(by_id)
    if sample is None:
        chosen = ids
    else:
        chosen = sorted(random.Random(f"verify:{seed}:{name}").sample(ids, min(sample, len(ids))))
    if not chosen:
        return
    fresh = {r["id"]: r for r in task.run(backend, only=set(chosen)).items}
    bad = 0
    for i in chosen:
        old, new = by_id[i], fresh.get(i)
        if new is None:
            v.findings.append(f"{name}: item {i} could not be scored again")
            bad += 1
            continue
        for f in task.exact_fields:
            if f in old and old.get(f) != new.get(f):
                v.findings.append(f"{name}: item {i}: {f} is {_short(old.get(f))} in the report, "
                                  f"{_short(new.get(f))} now")
                bad += 1
        for f in task.close_fields:
            if f in old and not _close(old.get(f), new.get(f), tolerance):
                v.findings.append(f"{name}: item {i}: {f} is {_short(old.get(f))} in the report, {_short(new.get(f))} "
                                  f"now (tolerance {tolerance})")
                bad += 1
    if not bad:
        v.checked.append(f"{name}: {len(chosen)} of {len(ids)} items scored again, all hold")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def verify(report: dict, backend, sample: int | None = 20, seed: int = 0, tolerance: float = 1e-5,
           public_key=None, data: dict[str, str] | None = None, source=None) -> Verdict:
    """`backend`: herd.eval.backends.EngineBackend on the weights to check (or a ServerBackend)."""
    v = Verdict()
    problems = check_signature(report, public_key)
    v.findings += problems
    if "signature" in report and not problems:
        v.checked.append(f"signature by key {report['signature']['key_id']} holds")
    if hasattr(backend, "llm"):
        check_model(report, backend.model_record(source), v)
    for task_record in report.get("tasks", []):
        try:
            check_task(task_record, backend, sample, seed, tolerance, data or {}, v)
        except DataError as e:
            v.findings.append(f"{task_record['definition'].get('task')}: {e}")
    return v
