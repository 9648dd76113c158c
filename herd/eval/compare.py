"""`herd eval compare`: reports side by side, with the checks that catch a bait-and-switch.

A model name is whatever the reports call the model. One name with more than one fingerprint means
different weights were scored under it (a tuned variant on the leaderboard, another for download):
comparing is refused unless allowed, and the name is flagged either way. The number of distinct variants
per name is reported, since the best of many variants scored on one benchmark is biased upward.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from herd.errors import HerdError
from herd.eval.report import format_score, model_label, summary_rows


class MixedModels(HerdError):
    """Scores from different weights would be shown under one model name."""


@dataclass
class Comparison:
    columns: list[str]
    rows: list[tuple[str, str, list[str]]]  # task, metric, one cell per report
    flagged: dict[str, list[str]] = field(default_factory=dict)  # name -> its fingerprints (more than one)
    variants: dict[str, int] = field(default_factory=dict)  # name -> distinct weights evaluated under it

    def text(self) -> str:
        head = ["task", "metric"] + self.columns
        body = [[t, m] + cells for t, m, cells in self.rows]
        widths = [max(len(str(r[i])) for r in [head] + body) for i in range(len(head))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [head] + body]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for name, fps in self.flagged.items():
            lines.append(f"FLAG: {name!r} appears with {len(fps)} different fingerprints: "
                         + ", ".join(f[:16] if f else "unknown (server)" for f in fps))
        for name, n in self.variants.items():
            if n > 1:
                lines.append(f"note: {n} variants of {name!r} were evaluated; the best of several variants "
                             "is biased upward on the benchmark it was picked on")
        return "\n".join(lines)


def fingerprint_of(report: dict) -> str | None:
    return report.get("model", {}).get("fingerprint")


def compare(reports: list[dict], allow_different_models: bool = False) -> Comparison:
    by_name: dict[str, list[str | None]] = defaultdict(list)
    for r in reports:
        fp = fingerprint_of(r)
        if fp not in by_name[model_label(r)]:
            by_name[model_label(r)].append(fp)
    flagged = {n: fps for n, fps in by_name.items() if len(fps) > 1}
    if flagged and not allow_different_models:
        detail = "; ".join(f"{n!r}: " + ", ".join(f[:16] if f else "unknown (server)" for f in fps)
                           for n, fps in flagged.items())
        raise MixedModels(f"different weights under one model name ({detail}); these scores are not of one "
                          "model. Pass --allow-different-models to show them side by side, labelled by fingerprint")
    columns = []
    for r in reports:
        fp = fingerprint_of(r)
        columns.append(f"{model_label(r)} [{fp[:8] if fp else 'unknown'}]")
    cells: dict[tuple[str, str], list[str]] = {}
    for i, r in enumerate(reports):
        for task, metric, value, stderr, n in summary_rows(r):
            cells.setdefault((task, metric), ["-"] * len(reports))[i] = f"{format_score(value, stderr)} (n={n})"
    rows = [(t, m, c) for (t, m), c in sorted(cells.items())]
    return Comparison(columns, rows, flagged, {n: len(fps) for n, fps in by_name.items()})
