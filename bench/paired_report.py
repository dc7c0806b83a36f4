"""The table of a paired run (bench/paired.sh): per variant, the median over blocks of the ratio
variant/ids of the req/s of the same block, the cost (1 - ratio), and a 95% bootstrap confidence
interval of that median (blocks resampled with replacement, a fixed seed); ids2/ids, two identical
proxies, is the method's own noise (A/A).

    python3 bench/paired_report.py bench/results/paired-<date-time> [--resamples N] [--seed N]

Only the standard library: no numpy.
"""

import argparse
import csv
import math
import random
from pathlib import Path

REFERENCE = "ids"
GOALS = {"metrics": 5.0, "log": 10.0, "stdout": 10.0}  # issue 12: cost under this many %
LABELS = {
    "ids": "ids (plain rproxy: request ids on, access log off)",
    "ids2": "ids2 (the same again: A/A)",
    "metrics": "metrics (admin listener, every request counted)",
    "log": "log (access log to a file)",
    "stdout": "stdout (access log `-`, stdout to a file)",
    "ops": "ops (file log and metrics)",
}


def median(xs):
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return math.nan
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def bootstrap_ci(xs, resamples, rng, level=0.95):
    """Percentile interval of the median of xs over resamples with replacement."""
    n = len(xs)
    if n < 2:
        return math.nan, math.nan
    meds = sorted(median([xs[rng.randrange(n)] for _ in range(n)]) for _ in range(resamples))
    tail = (1 - level) / 2
    return meds[int(tail * resamples)], meds[math.ceil((1 - tail) * resamples) - 1]


def read_meta(run_dir):
    meta = {}
    path = run_dir / "meta.txt"
    if path.exists():
        for line in path.read_text().splitlines():
            key, _, value = line.partition("=")
            meta[key] = value
    return meta


def read_status(run_dir):
    status = {}
    path = run_dir / "status.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            name, state, *why = line.split("\t")
            status[name] = (state, why[0] if why else "")
    return status


def num(text):
    try:
        return float(text)
    except ValueError:
        return None


def table(out, title, values, order, groups, status, resamples, seed, unit, goals=True):
    """One table: per variant, the median of the per-block ratios value/ids' value, its cost and
    the bootstrap interval; returns the A/A line's (ratio, cost_lo, cost_hi) or None."""
    out.append(title)
    out.append("")
    header = (f"{'variant':<52} {'bursts':>6} {unit + ' (median)':>16} {'ratio':>7} {'cost':>7} "
              f"{'95% CI of cost':>17} {'slower':>7}" + ("  goal" if goals else ""))
    out.append(header)
    out.append("-" * len(header))
    aa = None
    for v in order:
        label = LABELS.get(v, v)
        mine = [values[g, v] for g in groups if (g, v) in values]
        state, why = status.get(v, ("ok", ""))
        if state != "ok" and not mine:
            out.append(f"{label:<52} FAILED: {why}")
            continue
        med = f"{median(mine):,.0f}" if mine else "-"
        if v == REFERENCE:
            out.append(f"{label:<52} {len(mine):>6} {med:>16} {'1':>7} {'':>7} {'(reference)':>17}")
            continue
        pairs = [g for g in groups if (g, v) in values and (g, REFERENCE) in values]
        ratios = [values[g, v] / values[g, REFERENCE] for g in pairs]
        if not ratios:
            out.append(f"{label:<52} {len(mine):>6} {med:>16}  no block with both it and {REFERENCE}")
            continue
        r = median(ratios)
        lo, hi = bootstrap_ci(ratios, resamples, random.Random(seed))
        cost, cost_lo, cost_hi = (1 - r) * 100, (1 - hi) * 100, (1 - lo) * 100
        slower = sum(x < 1 for x in ratios)
        goal = ""
        if goals and v in GOALS:
            g = GOALS[v]
            if cost_hi < g:
                verdict = "met (whole CI below)"
            elif cost_lo >= g:
                verdict = "not met (whole CI above)"
            else:
                verdict = "CI straddles it"
            goal = f"< {g:g}%: {verdict}"
        if v == "ids2":
            aa = (r, cost_lo, cost_hi)
        ci = f"[{cost_lo:+.1f}, {cost_hi:+.1f}]%"
        out.append(f"{label:<52} {len(ratios):>6} {med:>16} {r:>7.3f} {cost:>+6.1f}% {ci:>17} "
                   f"{f'{slower}/{len(ratios)}':>7}  {goal}".rstrip())
        if state != "ok":
            out.append(f"{'':<52} (stopped early: {why})")
    out.append("")
    return aa


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--resamples", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=None, help="default: the run's seed (meta.txt), else 1")
    args = ap.parse_args()
    meta = read_meta(args.run_dir)
    status = read_status(args.run_dir)
    seed = args.seed if args.seed is not None else int(meta.get("seed", 1))

    # A ratio compares a variant with ids in the same group: the block (sequential), or the pair.
    rps = {}        # (group, variant) -> req/s, for bursts without errors
    per_cpu = {}    # (group, variant) -> requests per CPU-second of the proxy
    wait = {}       # variant -> [share of the burst's CPU demand spent waiting for CPU]
    errors = {}     # variant -> bursts with errors (left out)
    order = []      # variants, in the order of meta's list (else of first appearance)
    with open(args.run_dir / "paired.csv", newline="") as f:
        for row in csv.DictReader(f):
            v = row["variant"]
            if v not in order:
                order.append(v)
            r, n, cpu_ms, wait_ms = (num(row[k]) for k in ("req_per_s", "requests", "cpu_ms", "wait_ms"))
            if r is None or int(row["errors"]) > 0:
                errors[v] = errors.get(v, 0) + 1
                continue
            g = row["group"]
            rps[g, v] = r
            if n and cpu_ms:
                per_cpu[g, v] = n / (cpu_ms / 1000)
                if wait_ms is not None:
                    wait.setdefault(v, []).append(wait_ms / (cpu_ms + wait_ms))
    listed = meta.get("variants", "").split()
    order = [v for v in listed if v in order] + [v for v in order if v not in listed]
    groups = sorted({g for g, _ in rps}, key=lambda g: [int(x) for x in g.split(".")])
    pairs_mode = meta.get("mode") == "pairs"

    out = []
    for key in ("date", "machine", "pinning", "load", "runs", "source", "versions"):
        if key in meta:
            out.append(f"{key}: {meta[key]}")
    out.append("")
    out.append("Per block, each variant's figure over ids' in the same block (in pairs mode: the same pair);")
    out.append("ratio: the median of those over the blocks; cost: 1 - ratio; 95% CI: bootstrap interval of the")
    out.append(f"median ({args.resamples} resamples of the blocks, seed {seed}). bursts: how many went into it;")
    out.append("slower: the blocks where the variant did worse than ids.")
    out.append("")
    if pairs_mode:
        out.append("Pairs: each variant ran at the same time as ids, both on the one core, so whatever slows the")
        out.append("core slows both; each got about half of it.")
        out.append("")
    aa = table(out, "Wall clock: req/s (wrk)", rps, order, groups, status, args.resamples, seed, "req/s")
    table(out, "CPU: requests per second of the proxy's own CPU time (/proc/PID/schedstat)", per_cpu, order,
          groups, status, args.resamples, seed, "req/CPU-s", goals=pairs_mode)
    if aa:
        r, cost_lo, cost_hi = aa
        out.append(f"Noise floor (A/A, two identical proxies, wall clock): ids2/ids median {r:.3f}, 95% CI of the "
                   f"cost [{cost_lo:+.1f}, {cost_hi:+.1f}]%;")
        out.append("a variant's interval about as wide as this is at the method's resolution. One run has one")
        out.append("process per variant, and a process's own offset (what the A/A shows beyond its interval) is")
        out.append("not in any interval: compare runs (SEED=2, 3, ...) before reading a point or two.")
    ref = [rps[g, REFERENCE] for g in groups if (g, REFERENCE) in rps]
    if ref and not pairs_mode:
        out.append(f"ids across blocks: {min(ref):,.0f} to {max(ref):,.0f} req/s (median {median(ref):,.0f}): "
                   "what one unpaired burst would have to resolve against.")
    shares = [x for v in order for x in wait.get(v, [])]
    if shares and not pairs_mode:
        out.append(f"Waiting for CPU {median(shares) * 100:.1f}% of the time the proxies wanted it (median burst; "
                   f"worst {max(shares) * 100:.1f}%): other load on the proxies' core.")
    for v, n in errors.items():
        out.append(f"{v}: {n} burst(s) with errors or no result, left out (see the b<block>-{v}.wrk files)")
    print("\n".join(out))


if __name__ == "__main__":
    main()
