"""The report: one JSON document that binds every score to what produced it.

    {"format": "herd-eval-report/1", "created": ..., "model": {fingerprint, tensor_sha256, files, tokenizer
     and chat-template hashes, quantization ...}, "runtime": {backend, device, dtype, threads, batch size,
     versions}, "seed": ..., "determinism": {...}, "tasks": [{"definition", "data", "metrics", "items",
     "tables", "compute", "plots"}], "signature": {...}}

`digest` is the SHA-256 of the canonical JSON of everything but the signature: what `herd eval sign`
signs and `herd eval verify` checks.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from herd.eval.data import DataError, canonical_json, sha256_text

FORMAT = "herd-eval-report/1"


def digest(report: dict) -> str:
    return sha256_text(canonical_json({k: v for k, v in report.items() if k != "signature"}))


def save(report: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n",
                    encoding="utf-8")
    return path


class ReportError(DataError):
    """A report that is not what herd writes: unreadable, malformed, or holding a field of the wrong kind. The
    message names the report and the field."""


def load(path: str | os.PathLike) -> dict:
    from herd.eval.data import regular_file

    path = regular_file(path, "report")
    try:
        report = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not a JSON report ({e})") from None
    except RecursionError:
        raise ReportError(f"{path}: not a herd eval report (JSON nested too deeply)") from None
    except ValueError as e:
        raise ReportError(f"{path}: not a herd eval report ({e})") from None
    validate(report, str(path))
    return report


def _no_constant(name: str):
    raise ValueError(f"it holds {name}, which is not a JSON number and never in a report herd writes")


def validate(report, where: str = "the report") -> None:
    """ReportError naming the first field of `report` that is not of the kind herd writes (and every reader
    of a report relies on): the report is refused whole rather than half-read."""
    _Check(where).report(report)


class _Check:
    def __init__(self, where: str):
        self.where = where

    def fail(self, at: str, what: str):
        raise ReportError(f"{self.where}: {at} {what}" if at else f"{self.where}: {what}")

    def kind(self, value, kinds, at: str, name: str):
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if isinstance(value, bool) and bool not in kinds:
            self.fail(at, f"must be {name}, got a boolean")
        if not isinstance(value, kinds):
            self.fail(at, f"must be {name}, got {_kind_name(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            self.fail(at, f"must be a finite number, got {value}")
        return value

    def fields(self, obj, at: str, spec: dict, required: tuple = ()):
        self.kind(obj, dict, at, "an object")
        for key in required:
            if key not in obj:
                self.fail(at, f"has no {key!r}")
        for key, (kinds, name) in spec.items():
            if key in obj and not (obj[key] is None and type(None) in (kinds if isinstance(kinds, tuple) else ())):
                self.kind(obj[key], kinds, f"{at}.{key}" if at else key, name)
        return obj

    def report(self, r):
        if not isinstance(r, dict) or r.get("format") != FORMAT:
            found = r.get("format") if isinstance(r, dict) else None
            self.fail("", f"not a herd eval report (format {found!r}, expected {FORMAT!r})")
        text, none = (str, "a string"), (str, type(None))
        self.fields(r, "", {"model": (dict, "an object"), "runtime": (dict, "an object"),
                            "seed": (int, "an integer"), "settings": (dict, "an object"), "tasks": (list, "a list"),
                            "signature": (dict, "an object"), "created": text},
                    required=("model", "tasks"))
        m = r["model"]
        self.fields(m, "model", {"name": (none, "a string"), "source": (none, "a string"),
                                 "fingerprint": (none, "a string"), "weights_known": (bool, "true or false"),
                                 "tensor_sha256": (dict, "an object"), "files": (list, "a list"),
                                 "tokenizer_sha256": (none, "a string"), "chat_template_sha256": (none, "a string")})
        for name, digest_ in (m.get("tensor_sha256") or {}).items():
            self.kind(digest_, str, f"model.tensor_sha256[{name!r}]", "a string")
        for i, f in enumerate(m.get("files") or []):
            self.fields(f, f"model.files[{i}]", {"name": text, "sha256": text}, required=("name", "sha256"))
        self.fields(r.get("runtime", {}), "runtime", {"batch_size": (int, "an integer"), "scoring": text,
                                                      "dtype": text, "threads": (int, "an integer"),
                                                      "weights_quantized": (bool, "true or false"),
                                                      "versions": (dict, "an object")})
        batch = r.get("runtime", {}).get("batch_size")
        if batch is not None and not 1 <= batch <= 1 << 16:
            self.fail("runtime.batch_size", f"is {batch}, not a batch size")
        for i, task in enumerate(r["tasks"]):
            self.task(task, f"tasks[{i}]")
        if "signature" in r:
            self.fields(r["signature"], "signature", {k: text for k in ("algorithm", "digest", "public_key", "key_id",
                                                                       "value")},
                        required=("algorithm", "digest", "public_key", "key_id", "value"))
        try:
            canonical_json(r)
        except (ValueError, RecursionError, TypeError) as e:
            self.fail("", f"cannot be hashed ({type(e).__name__}: {e})")

    def task(self, t, at: str):
        self.fields(t, at, {"definition": (dict, "an object"), "data": (dict, "an object"),
                            "metrics": (dict, "an object"), "items": (list, "a list"), "tables": (dict, "an object"),
                            "compute": (dict, "an object"), "plots": (dict, "an object")},
                    required=("definition", "metrics", "items"))
        self.fields(t["definition"], f"{at}.definition", {"task": (str, "a string"), "kind": (str, "a string")},
                    required=("task",))
        for name, rec in (t.get("data") or {}).items():
            self.fields(rec, f"{at}.data.{name}", {"path": (str, "a string"), "sha256": (str, "a string")},
                        required=("path", "sha256"))
        number = ((int, float, type(None)), "a number or null")
        for name, s in t["metrics"].items():
            self.fields(s, f"{at}.metrics.{name}", {"value": number, "stderr": number,
                                                    "n": ((int, type(None)), "an integer or null")},
                        required=("value",))
        for k, item in enumerate(t["items"]):
            self.fields(item, f"{at}.items[{k}]", {"id": (str, "a string")}, required=("id",))
        for title, table in (t.get("tables") or {}).items():
            self.kind(table, (dict, str), f"{at}.tables[{title!r}]", "an object or a string")
            if isinstance(table, dict) and "text" in table:
                self.kind(table["text"], str, f"{at}.tables[{title!r}].text", "a string")


def _kind_name(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def model_label(report: dict) -> str:
    m = report.get("model", {})
    return m.get("name") or m.get("source") or "?"


def summary_rows(report: dict) -> list[tuple[str, str, float, float | None, int]]:
    """(task, metric, value, stderr, n) for every score in the report."""
    rows = []
    for task in report.get("tasks", []):
        for metric, s in sorted(task.get("metrics", {}).items()):
            rows.append((task["definition"]["task"], metric, s["value"], s.get("stderr"), s.get("n")))
    return rows


def format_score(value: float, stderr: float | None) -> str:
    if value is None:
        return "-"
    text = f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return text + (f" ± {stderr:.4f}" if stderr is not None else "")
