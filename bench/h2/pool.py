"""
The goals of issue 16 over several bench/h2.sh runs at once: the per-round
ratios of every run pooled, their median and its bootstrap 95% interval.

One run of a noisy machine can land on either side of a goal that sits near
its figure; pooling every run of a session (all of them, not the ones that
came out well) is the honest reading of where the figure is.

Usage: pool.py RUN_DIR [RUN_DIR...]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from report import GOALS, goal_pair, judge, read_runs, round_ratios


def main() -> None:
    dirs = [Path(a) for a in sys.argv[1:]]
    if not dirs:
        sys.exit(__doc__)
    runs = [(d, read_runs(d)) for d in dirs]
    for who in ("rproxy", "base"):
        for label, test, over, target in GOALS:
            a, b = goal_pair(who, test, over)
            pooled: list[float] = []
            per_run = []
            for d, samples in runs:
                ratios = round_ratios(samples.get(a, []), samples.get(b, []))
                if ratios:
                    pooled += ratios
                    per_run.append(f"{d.name} {statistics.median(ratios):.2f}x/{len(ratios)}")
            if len(pooled) < 2:
                continue
            median, interval, verdict = judge(pooled, target)
            print(f"{who:7} {label:48} pooled median {median:.2f}x over {len(pooled)} rounds"
                  f"{', the median' + interval if interval else ''} (goal >= {target:.2f}x: {verdict})")
            print(f"{'':7}   runs (median/rounds): {'; '.join(per_run)}")


if __name__ == "__main__":
    main()
