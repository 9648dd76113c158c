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


def load(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"report {str(path)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a JSON report ({e})") from None
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        found = report.get("format") if isinstance(report, dict) else None
        raise DataError(f"{path}: not a herd eval report (format {found!r}, expected {FORMAT!r})")
    return report


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
