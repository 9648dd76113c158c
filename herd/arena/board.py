"""The leaderboard as data: what `herd arena rate --json` prints and the page shows, from battle records.

Each (name, fingerprint) is its own contestant in the fit: a name seen with several fingerprints is
several variants, rated separately and listed together under the name with a warning, so a best-of-N
variant cannot stand alone for the others: rows come in rating order, except that a name's variants follow
its best one (`grouped`). Retired contestants keep their lines.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from herd.arena import rating
from herd.arena.rating import Outcome
from herd.arena.style import style_vector


@dataclass(frozen=True)
class Options:
    rounds: int = 1000  # bootstrap resamples
    seed: int = 0
    anchor: tuple[str, float] | None = None  # (contestant name or variant key, rating)
    provisional_votes: int = 30  # fewer votes than this: marked provisional
    penalty_c: float | None = 1.0  # see herd.arena.rating


def variant_keys(records: list[dict]) -> dict[tuple[str, str | None], str]:
    """(name, fingerprint) -> the key the board uses: the name alone, or name@fingerprint when the name
    came with more than one fingerprint."""
    seen: dict[str, list[str | None]] = {}
    for r in records:
        for side in "ab":
            fps = seen.setdefault(r[f"model_{side}"], [])
            if r.get(f"fingerprint_{side}") not in fps:
                fps.append(r.get(f"fingerprint_{side}"))
    keys = {}
    for name, fps in seen.items():
        for fp in fps:
            keys[(name, fp)] = name if len(fps) == 1 else f"{name}@{(fp or 'unknown')[:12]}"
    return keys


def outcomes(records: list[dict], keys: dict, style: bool) -> list[Outcome]:
    out = []
    for r in records:
        meta = r.get("conv_metadata") if style else None
        if style and meta is None:
            raise ValueError(f"battle {r.get('question_id', '?')}: style control needs the answers or conv_metadata")
        out.append(Outcome(keys[(r["model_a"], r.get("fingerprint_a"))], keys[(r["model_b"], r.get("fingerprint_b"))],
                           r["winner"], style_vector(meta, "a") if style else None,
                           style_vector(meta, "b") if style else None))
    return out


def _anchor(options: Options, keys: dict) -> tuple[str, float] | None:
    if options.anchor is None:
        return None
    name, value = options.anchor
    matches = [k for (n, _), k in keys.items() if name in (n, k)]
    return (matches[0], value) if len(matches) == 1 else (name, value)


def leaderboard(records: list[dict], options: Options = Options(), *, style_control: bool = True,
                contestants: dict[tuple[str, str | None], dict] | None = None) -> dict:
    """The board of these records (one board's battles, voted). `contestants`: extra facts per
    (name, fingerprint) from the arena's database (verified, retired, kind)."""
    keys = variant_keys(records)
    contestants = contestants or {}
    verified = {}
    for r in records:
        for side in "ab":
            verified.setdefault((r[f"model_{side}"], r.get(f"fingerprint_{side}")), r.get(f"verified_{side}"))
    anchor = _anchor(options, keys)
    boards = {"raw": rating.board(outcomes(records, keys, False), rounds=options.rounds, seed=options.seed,
                                  anchor=anchor, penalty_c=options.penalty_c)}
    if style_control and records and all(r.get("conv_metadata") for r in records):
        boards["style_control"] = rating.board(outcomes(records, keys, True), rounds=options.rounds,
                                               seed=options.seed, anchor=anchor, style_control=True,
                                               penalty_c=options.penalty_c)
    by_key = {k: nf for nf, k in keys.items()}
    names: dict[str, list] = {}
    for nf in keys:
        names.setdefault(nf[0], []).append(nf[1])

    def rows(b: rating.Board) -> list[dict]:
        out = []
        for row in b.rows:
            name, fp = by_key[row.key]
            facts = contestants.get((name, fp), {})
            out.append(dict(asdict(row), name=name, fingerprint=fp,
                            verified=facts.get("verified", verified.get((name, fp))),
                            verification=facts.get("verification"),
                            retired=facts.get("retired", False), kind=facts.get("kind"),
                            provisional=row.battles < options.provisional_votes,
                            variants_of_name=len(names[name])))
        return grouped(out)

    result = {
        "battles": len(records),
        "bootstrap_rounds": options.rounds,
        "seed": options.seed,
        "anchor": list(anchor) if anchor else None,
        "provisional_votes": options.provisional_votes,
        "rows": rows(boards["raw"]),
        "win_fraction": boards["raw"].win_fraction,
        "battle_counts": boards["raw"].battle_counts,
        "variant_warnings": {n: f"{n} fought as {len(fps)} different sets of weights; every variant is listed"
                             for n, fps in names.items() if len(fps) > 1},
    }
    same: dict[str, list[str]] = {}
    for name, fp in keys:
        if fp and not fp.startswith(("unverified:", "unrecorded:")):
            same.setdefault(fp, []).append(name)
    result["same_weights_warnings"] = {fp: f"{', '.join(n)} are the same weights (fingerprint {fp[:16]})"
                                       for fp, n in same.items() if len(n) > 1}
    if "style_control" in boards:
        result["style_control"] = {"rows": rows(boards["style_control"]),
                                   "coefficients": boards["style_control"].style_coefficients}
    return result


def grouped(rows: list[dict]) -> list[dict]:
    """`rows` (in rating order) with every variant of a name moved up to follow the name's best variant."""
    first = {}
    for i, row in enumerate(rows):
        first.setdefault(row["name"], i)
    return sorted(rows, key=lambda row: first[row["name"]])  # stable: variants keep their rating order


def format_table(board: dict) -> str:
    """The board as text for a terminal."""
    lines = []

    def table(title, rows):
        lines.append(title)
        lines.append(f"{'rank':>7}  {'contestant':32} {'rating':>8}  {'95% interval':>17}  {'votes':>6}  {'share':>6}")
        for r in rows:
            key = r["key"] + (" (retired)" if r["retired"] else "") + (" *" if r["provisional"] else "")
            if r["verified"] is False:
                key += " [weights unverified]"
            rank = f"{r['rank_best']}-{r['rank_worst']}" if r["rank_best"] != r["rank_worst"] else str(r["rank_best"])
            lines.append(f"{rank:>7}  {key:32} {r['rating']:8.1f}  [{r['lower']:7.1f}, {r['upper']:7.1f}]  "
                         f"{r['battles']:6d}  {100 * r['share']:5.1f}%")

    table(f"Bradley-Terry ratings, {board['battles']} battles, {board['bootstrap_rounds']} bootstrap rounds",
          board["rows"])
    if "style_control" in board:
        lines.append("")
        table("style controlled (length and markdown regressed out)", board["style_control"]["rows"])
        coefs = ", ".join(f"{k} {v:+.3f}" for k, v in board["style_control"]["coefficients"].items())
        lines.append(f"style coefficients: {coefs}")
    if any(r["provisional"] for r in board["rows"]):
        lines.append(f"* provisional: fewer than {board['provisional_votes']} votes")
    for warning in [*board["variant_warnings"].values(), *board.get("same_weights_warnings", {}).values()]:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)
