"""`herd eval compare`: reports side by side, with the checks that catch a bait-and-switch.

A model name is whatever the reports call the model. One name with more than one fingerprint means
different weights were scored under it (a tuned variant on the leaderboard, another for download):
comparing is refused unless allowed, and the name is flagged either way. Names are compared as a reader
sees them (herd.eval.compare.skeleton: "smol", "smol " and a Cyrillic "ѕmol" are one name), and look-alike
spellings are flagged. One task name with different definitions (settings, or data by SHA-256) is refused
unless allowed, then shown in separate rows. The number of distinct variants per name is reported, since
the best of many variants scored on one benchmark is biased upward.
"""

from __future__ import annotations

import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field

from herd.errors import HerdError
from herd.eval.data import sha256_json
from herd.eval.report import format_score, model_label, validate


class MixedModels(HerdError):
    """Scores from different weights would be shown under one model name (or names that look alike)."""


class MixedTasks(HerdError):
    """One task name stands for different definitions (settings or data) across the reports."""


# Letters of other scripts that render like Latin ones (Unicode's confusables.txt, the common part): a name
# spelled with them reads as the Latin name on a leaderboard.
LOOKALIKES = str.maketrans({
    "а": "a", "в": "b", "с": "c", "ԁ": "d", "е": "e", "һ": "h", "і": "i", "ј": "j", "к": "k", "ӏ": "l", "м": "m",
    "о": "o", "р": "p", "ԛ": "q", "г": "r", "ѕ": "s", "т": "t", "ц": "u", "ѵ": "v", "ԝ": "w", "х": "x",
    "у": "y", "ү": "y", "з": "3", "ɑ": "a", "α": "a", "β": "b", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o",
    "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "γ": "y", "ı": "i", "ȷ": "j", "ℓ": "l", "ⅰ": "i", "ⅼ": "l", "ⅽ": "c",
    "ⅾ": "d", "ⅿ": "m", "ꓲ": "l", "ǀ": "l", "߀": "0", "٠": "0", "۰": "0", "০": "0",
})


def skeleton(name: str) -> str:
    """What a name looks like: compatibility forms folded (NFKC: full-width, ligatures), case folded,
    invisible characters dropped, runs of whitespace one space, ends stripped, and look-alike letters of
    other scripts read as the Latin ones. Two names with one skeleton are one name to a reader."""
    text = unicodedata.normalize("NFKC", name).casefold()
    text = "".join(c for c in text if unicodedata.category(c) not in ("Cf", "Cc", "Mn", "Me"))
    text = " ".join(text.split())
    return unicodedata.normalize("NFKC", text.translate(LOOKALIKES))


@dataclass
class Comparison:
    columns: list[str]
    rows: list[tuple[str, str, list[str]]]  # task, metric, one cell per report
    flagged: dict[str, list[str]] = field(default_factory=dict)  # name -> its fingerprints (more than one)
    variants: dict[str, int] = field(default_factory=dict)  # name -> distinct weights evaluated under it
    lookalikes: dict[str, list[str]] = field(default_factory=dict)  # skeleton -> the spellings seen (more than one)
    changed_tasks: dict[str, list[str]] = field(default_factory=dict)  # task -> its definitions' labels

    def text(self) -> str:
        head = ["task", "metric"] + self.columns
        body = [[t, m] + cells for t, m, cells in self.rows]
        widths = [max(len(str(r[i])) for r in [head] + body) for i in range(len(head))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [head] + body]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for name, fps in self.flagged.items():
            lines.append(f"FLAG: {name!r} appears with {len(fps)} different fingerprints: "
                         + ", ".join(f[:16] if f else "unknown (server)" for f in fps))
        for _, spellings in self.lookalikes.items():
            lines.append("FLAG: look-alike model names " + " and ".join(_shown(n) for n in spellings)
                         + " read as one name; they are different strings")
        for task, labels in self.changed_tasks.items():
            lines.append(f"FLAG: task {task!r} has {len(labels)} different definitions ({', '.join(labels)}): its "
                         "scores are not of one task, and are shown in separate rows")
        for name, n in self.variants.items():
            if n > 1:
                lines.append(f"note: {n} variants of {name!r} were evaluated; the best of several variants "
                             "is biased upward on the benchmark it was picked on")
        return "\n".join(lines)


def _shown(name: str) -> str:
    """A name with every character outside printable ASCII spelled out, so look-alikes are told apart."""
    return repr(name) if name.isascii() and name.isprintable() else ascii(name)


def fingerprint_of(report: dict) -> str | None:
    return report.get("model", {}).get("fingerprint")


def task_identity(task: dict) -> str:
    """A task's definition with each data file's path replaced by its SHA-256 (the same data elsewhere is the
    same task): two reports ran the same task when these are equal."""
    definition = dict(task["definition"])
    for name, rec in (task.get("data") or {}).items():
        definition[name] = {"sha256": rec.get("sha256")}
    return sha256_json(definition)


def _definition_label(task: dict, others: list[dict]) -> str:
    """The settings in which this definition differs from the others (e.g. "digits=1")."""
    mine = task["definition"]
    keys = sorted({k for o in others for k in set(o["definition"]) | set(mine)
                   if o["definition"].get(k) != mine.get(k)} - {"task"})
    data = task.get("data") or {}
    parts = [f"{k}={(data[k]['sha256'][:8] + '…') if k in data else mine.get(k)!r}"
             if k in data else f"{k}={mine.get(k)!r}" for k in keys]
    return ", ".join(parts) or "data differs"


def compare(reports: list[dict], allow_different_models: bool = False, allow_different_tasks: bool = False) -> Comparison:
    for i, r in enumerate(reports):
        validate(r, f"report {i + 1}")
    by_name: dict[str, list[str | None]] = defaultdict(list)
    spellings: dict[str, list[str]] = defaultdict(list)
    for r in reports:
        label = model_label(r)
        key = skeleton(label)
        if label not in spellings[key]:
            spellings[key].append(label)
        fp = fingerprint_of(r)
        if fp not in by_name[key]:
            by_name[key].append(fp)
    names = {key: spellings[key][0] for key in by_name}
    flagged = {" / ".join(spellings[k]): fps for k, fps in by_name.items() if len(fps) > 1}
    lookalikes = {k: v for k, v in spellings.items() if len(v) > 1}
    if flagged and not allow_different_models:
        detail = "; ".join(" / ".join(map(_shown, spellings[k])) + ": "
                           + ", ".join(f[:16] if f else "unknown (server)" for f in fps)
                           for k, fps in by_name.items() if len(fps) > 1)
        raise MixedModels(f"different weights under one model name ({detail}); these scores are not of one "
                          "model. Pass --allow-different-models to show them side by side, labelled by fingerprint")

    # one task name, one definition: else the rows are split by definition, and refused unless allowed
    definitions: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in reports:
        for task in r["tasks"]:
            definitions[task["definition"]["task"]].setdefault(task_identity(task), task)
    changed = {}
    for name, seen in definitions.items():
        if len(seen) > 1:
            tasks = list(seen.values())
            changed[name] = [_definition_label(t, [o for o in tasks if o is not t]) for t in tasks]
    if changed and not allow_different_tasks:
        detail = "; ".join(f"{n!r}: " + " against ".join(labels) for n, labels in changed.items())
        raise MixedTasks(f"one task name with different definitions ({detail}); their scores are not of one task. "
                         "Pass --allow-different-tasks to show them in separate rows")
    columns = []
    for r in reports:
        fp = fingerprint_of(r)
        columns.append(f"{_shown(model_label(r))} [{fp[:8] if fp else 'unknown'}]")
    cells: dict[tuple[str, str], list[str]] = {}
    for i, r in enumerate(reports):
        for task in r["tasks"]:
            name = task["definition"]["task"]
            if name in changed:
                tasks = list(definitions[name].values())
                mine = next(t for t in tasks if task_identity(t) == task_identity(task))
                name = f"{name} [{_definition_label(mine, [o for o in tasks if o is not mine])}]"
            for metric, s in sorted(task["metrics"].items()):
                cells.setdefault((name, metric), ["-"] * len(reports))[i] = (
                    f"{format_score(s['value'], s.get('stderr'))} (n={s.get('n')})")
    rows = [(t, m, c) for (t, m), c in sorted(cells.items())]
    return Comparison(columns, rows, flagged, {names[k]: len(fps) for k, fps in by_name.items()}, lookalikes, changed)
