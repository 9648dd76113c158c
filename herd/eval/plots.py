"""PNG plots of a report's tables (matplotlib, headless): the retrieval heat-map and accuracy by depth (greedy,
and voted beside it with self-consistency)."""

from __future__ import annotations

import io


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap_png(table: dict, title: str) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.8, 1.6 + 0.9 * len(table["depths"])), 1.4 + 0.6 * len(table["lengths"])))
    im = ax.imshow(table["cells"], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(table["depths"])), [f"{d:g}" for d in table["depths"]])
    ax.set_yticks(range(len(table["lengths"])), [str(n) for n in table["lengths"]])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context length (tokens)")
    ax.set_title(title)
    for i, row in enumerate(table["cells"]):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy")
    return _save(plt, fig)


def line_png(table: dict, title: str) -> bytes:
    plt = _pyplot()
    rows = table["rows"]
    xs = list(rows)
    ys = [rows[x]["value"] for x in xs]
    errs = [rows[x]["stderr"] or 0 for x in xs]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.errorbar(range(len(xs)), ys, yerr=errs, marker="o", capsize=3, label="greedy")
    voted = table.get("voted_rows")
    if voted:  # self-consistency: the majority vote beside greedy
        ax.errorbar(range(len(xs)), [voted[x]["value"] for x in xs], yerr=[voted[x]["stderr"] or 0 for x in xs],
                    marker="s", capsize=3, label="voted")
        ax.legend()
    ax.set_xticks(range(len(xs)), xs)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel(table["facet"])
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    return _save(plt, fig)


def _save(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def task_plots(task: dict) -> dict[str, bytes]:
    """name -> PNG for every plottable table of one report task."""
    name = task["definition"]["task"]
    out = {}
    for title, table in task.get("tables", {}).items():
        if table.get("plot") == "heatmap":
            out[f"{name}-heatmap"] = heatmap_png(table, f"{name}: accuracy by length and depth")
        elif "facet" in table and table["facet"] in ("depth",) and name == "reasoning":
            out[f"{name}-by-depth"] = line_png(table, f"{name}: {title}")
    return out


def write_plots(report: dict, stem) -> list:
    """Write every plot as <stem>.<name>.png; the paths written."""
    from pathlib import Path

    stem = Path(stem)
    paths = []
    for task in report.get("tasks", []):
        for name, png in task_plots(task).items():
            path = stem.with_name(f"{stem.stem}.{name}.png")
            path.write_bytes(png)
            paths.append(path)
    return paths
