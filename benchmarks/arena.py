"""herd arena's rating vs FastChat's (fschat 0.2.36) on the same battles: the point ratings and the
bootstrap intervals, seconds per call, medians of several runs, and the largest rating difference.

    .venv/bin/python benchmarks/arena.py [--battles 5000] [--models 10] [--rounds 100] [--runs 3]

fschat's module is loaded as tests/test_arena_rating.py loads it (its registry imports stubbed), with
its sklearn fit unchanged (C=1.0, default tolerance): what LMArena's published code does.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TQDM_DISABLE", "1")  # fschat's bootstrap progress bar


def main() -> int:
    import numpy as np
    import pandas as pd

    from herd.arena import rating
    from tests.test_arena_rating import fschat_elo_analysis, outcomes

    p = argparse.ArgumentParser()
    p.add_argument("--battles", type=int, default=5000)
    p.add_argument("--models", type=int, default=10)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()

    rng = np.random.default_rng(0)
    names = [f"m{i}" for i in range(args.models)]
    strength = rng.normal(size=args.models)
    battles = []
    for i in range(args.battles):
        a, b = rng.choice(args.models, 2, replace=False)
        u = rng.random()
        won = rng.random() < 1 / (1 + np.exp(strength[b] - strength[a]))
        battles.append(dict(model_a=names[a], model_b=names[b], tstamp=float(i),
                            winner="tie" if u < 0.15 else "model_a" if won else "model_b"))
    fschat = fschat_elo_analysis()
    df, ours = pd.DataFrame(battles), outcomes(battles)

    def timed(fn):
        times, out = [], None
        for _ in range(args.runs):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times), out

    t_fit_ref, ref = timed(lambda: fschat.compute_elo_mle_with_tie(df))
    t_fit, mine = timed(lambda: rating.fit_ratings(ours)[0])
    t_boot_ref, _ = timed(lambda: fschat.get_bootstrap_result(df, fschat.compute_elo_mle_with_tie, args.rounds))
    t_boot, _ = timed(lambda: rating.bootstrap(ours, args.rounds, 0))
    diff = max(abs(mine[m] - ref[m]) for m in mine)
    print(f"{args.battles} battles, {args.models} contestants, {args.rounds} bootstrap rounds, median of {args.runs}")
    print(f"fit:        herd {t_fit:.3f} s   fschat {t_fit_ref:.3f} s   herd/fschat time {t_fit / t_fit_ref:.2f}")
    print(f"bootstrap:  herd {t_boot:.3f} s   fschat {t_boot_ref:.3f} s   herd/fschat time {t_boot / t_boot_ref:.2f}")
    print(f"largest rating difference (fschat at its default sklearn tolerance): {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
