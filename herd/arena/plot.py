"""The intervals plot: each contestant's rating with its 95% bootstrap interval, raw and style-controlled."""

from __future__ import annotations

import io


def intervals_png(board: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("Bradley-Terry rating", board["rows"])]
    if "style_control" in board:
        panels.append(("style controlled", board["style_control"]["rows"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.45 * max(4, len(board["rows"])) + 1.2),
                             squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels):
        rows = rows[::-1]  # best on top
        y = range(len(rows))
        ratings = [r["rating"] for r in rows]
        ax.errorbar(ratings, list(y), xerr=[[r["rating"] - r["lower"] for r in rows],
                                            [r["upper"] - r["rating"] for r in rows]],
                    fmt="o", capsize=3, color="#1f5fa8")
        # names as written: a `$...$` in a name is text, not mathtext for matplotlib to parse (and fail on)
        ax.set_yticks(list(y), [r["key"] + (" *" if r["provisional"] else "") for r in rows], parse_math=False)
        ax.set_title(title)
        ax.set_xlabel("rating (95% interval)")
        ax.grid(axis="x", alpha=0.3)
    if not board["rows"]:
        axes[0][0].text(0.5, 0.5, "no votes yet", ha="center", va="center", transform=axes[0][0].transAxes)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out.getvalue()
