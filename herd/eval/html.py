"""A self-contained HTML page of a report: model and runtime facts, every score with its standard error,
the tables, and the plots inline (base64 PNG)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from herd.eval.plots import task_plots
from herd.eval.report import digest, format_score

STYLE = ("body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}"
         "code{font-size:.85em}pre{background:#f6f6f6;padding:.5em}")


def _kv(rows: dict) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td><code>{html.escape(str(v))}</code></td></tr>"
                               for k, v in rows.items()) + "</table>"


def render(report: dict) -> str:
    m, rt = report["model"], report["runtime"]
    parts = [f"<!doctype html><meta charset=utf-8><title>herd eval: {html.escape(str(m.get('name')))}</title>",
             f"<style>{STYLE}</style><h1>herd eval: {html.escape(str(m.get('name')))}</h1>"]
    facts = {"fingerprint": m.get("fingerprint") or "unknown (scored through a server)",
             "source": m.get("source"), "format": m.get("format"), "quantization": m.get("quantization"),
             "tokenizer sha256": m.get("tokenizer_sha256"), "chat template sha256": m.get("chat_template_sha256")}
    for f in m.get("files", []):
        facts[f"file {f['name']}"] = f"sha256 {f['sha256']} ({f['bytes']} bytes)"
    parts += ["<h2>Model</h2>", _kv(facts)]
    parts += ["<h2>Runtime</h2>", _kv({**{k: v for k, v in rt.items() if k != "versions"}, **rt.get("versions", {}),
                                       "seed": report.get("seed"), "report digest": digest(report),
                                       "signed by": (report.get("signature") or {}).get("key_id", "not signed")})]
    for task in report["tasks"]:
        name = task["definition"]["task"]
        parts.append(f"<h2>{html.escape(name)}</h2><table><tr><th>metric</th><th>value ± stderr</th><th>n</th></tr>")
        for metric, s in sorted(task["metrics"].items()):
            parts.append(f"<tr><td>{metric}</td><td>{format_score(s['value'], s['stderr'])}</td><td>{s['n']}</td></tr>")
        parts.append("</table>")
        for title, table in task.get("tables", {}).items():
            parts.append(f"<h3>{html.escape(title)}</h3><pre>{html.escape(table.get('text', ''))}</pre>")
        for title, png in task_plots(task).items():
            data = base64.b64encode(png).decode()
            parts.append(f"<img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>")
        facts = json.dumps({k: task[k] for k in ("definition", "data", "compute")}, indent=1)
        parts.append(f"<details><summary>definition, data, compute</summary><pre>{html.escape(facts)}</pre></details>")
    return "\n".join(parts)


def write_html(report: dict, path) -> Path:
    path = Path(path)
    path.write_text(render(report), encoding="utf-8")
    return path
