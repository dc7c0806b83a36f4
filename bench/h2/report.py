"""
Turn the raw outputs of one bench/h2.sh run into one table: req/s per test
and proxy, the ratios to nginx and (with a "base" rproxy in the run) to the
base commit, and the goals of issue 16 as ratios of this one run (with
rounds interleaved, also the median of the round-by-round ratios and a
bootstrap 95% interval for it: "met with margin" when the whole interval
clears the goal).

Reads, from the run directory: C{meta.txt}, C{status.tsv}, and
C{r<round>-<test>-<proxy>.(wrk|h2load|stime)}: wrk's output with the
C{BENCH_RESULT} line of bench/wrk_report.lua, h2load's own summary, or
C{openssl s_time}'s; each ends with the C{BENCH_RUN} line h2.sh appends.

Usage: report.py RUN_DIR [--pick best|median]
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
from pathlib import Path

TESTS = {
    "h1-1k": "HTTP/1.1 1 KiB, kept alive, plain (wrk -c50)",
    "h1-1m": "HTTP/1.1 1 MiB, kept alive, plain (wrk -c8)",
    "tls-1k": "HTTP/1.1 1 KiB, kept alive, TLS (wrk -c50)",
    "h2-1k-m10": "HTTP/2 1 KiB (h2load -c10 -m10)",
    "h2-1k-m1": "HTTP/2 1 KiB (h2load -c50 -m1)",
    "h2-100k-m10": "HTTP/2 100 KiB (h2load -c10 -m10)",
    "h2-100k-m1": "HTTP/2 100 KiB (h2load -c50 -m1)",
    "close": "new connection per request, plain (wrk -c50, Connection: close)",
    "close-tls": "new connection per request, TLS (wrk -c50, Connection: close)",
    "hs": "full TLS 1.2 handshakes/s (openssl s_time -new)",
}
_FILE = re.compile(r"^r(\d+)-([\w-]+?)-(nginx|haproxy|rproxy|base|floor)\.(wrk|h2load|stime)$")
_RESULT = re.compile(r"^BENCH_RESULT (.*)$", re.MULTILINE)
_RUN = re.compile(r"^BENCH_RUN (.*)$", re.MULTILINE)
_H2_RATE = re.compile(r"^finished in [\d.]+m?s, ([\d.]+) req/s, ([\d.]+)([KMG]?)B/s", re.MULTILINE)
_H2_REQS = re.compile(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                      r"(\d+) errored, (\d+) timeout", re.MULTILINE)
_CONNECTIONS = re.compile(r"^(\d+) connections in [\d.]+s;", re.MULTILINE)


def _fields(pattern: re.Pattern[str], text: str) -> dict[str, float]:
    match = pattern.search(text)
    if match is None:
        return {}
    return {k: float(v) for k, v in (item.split("=", 1) for item in match.group(1).split())}


def parse(kind: str, text: str) -> tuple[float, int] | None:
    """(rate, errors) of one run, or None if it left no figures."""
    if kind == "wrk":
        r = _fields(_RESULT, text)
        if not r or not r["duration_us"]:
            return None
        errors = sum(int(r[k]) for k in r if k.startswith("err_"))
        return r["requests"] / (r["duration_us"] / 1e6), errors
    if kind == "h2load":
        rate = _H2_RATE.search(text)
        reqs = _H2_REQS.search(text)
        if rate is None or reqs is None:
            return None
        total, _, done, ok, failed, errored, timeout = (int(x) for x in reqs.groups())
        return float(rate.group(1)), failed + errored + timeout
    if kind == "stime":
        run = _fields(_RUN, text)
        conns = _CONNECTIONS.search(text)
        if conns is None or not run.get("wall_s"):
            return None
        return int(conns.group(1)) / run["wall_s"], 0
    return None


def pick(samples: list[tuple[int, float, int]], how: str) -> tuple[int, float, int]:
    ordered = sorted(samples, key=lambda s: s[1])
    if how == "best":
        return ordered[-1]
    return ordered[(len(ordered) - 1) // 2]


def round_ratios(a: list[tuple[int, float, int]], b: list[tuple[int, float, int]]) -> list[float]:
    """
    The ratio of two proxies' figures in each round both ran: the rounds are
    interleaved, so a round's two runs met the same state of a noisy machine
    (their ratio moves less than either figure does across rounds).
    """
    of_b = {n: rate for n, rate, _ in b if rate}
    return [rate / of_b[n] for n, rate, _ in a if n in of_b]


MIN_ROUNDS_FOR_INTERVAL = 6
"""Fewer rounds than this give no interval worth the name (two rounds bound it by themselves)."""


def median_interval(ratios: list[float], level: float = 0.95, resamples: int = 4000) -> tuple[float, float]:
    """
    A bootstrap confidence interval for the median of the per-round ratios
    (percentile method, a fixed seed so a report reads the same twice): a
    goal is met with margin when the interval's low end clears it, not when
    one lucky or unlucky round does.
    """
    draw = random.Random(0)
    n = len(ratios)
    medians = sorted(statistics.median(draw.choices(ratios, k=n)) for _ in range(resamples))
    tail = (1 - level) / 2
    return medians[int(tail * resamples)], medians[int((1 - tail) * resamples) - 1]


def judge(ratios: list[float], target: float) -> tuple[float, str, str]:
    """
    The median of per-round ratios against a goal: the median, its interval
    as text (empty under L{MIN_ROUNDS_FOR_INTERVAL} rounds), and the verdict
    ("met with margin" only when the whole interval clears the goal).
    """
    median = statistics.median(ratios)
    verdict = "met" if median >= target else "NOT met"
    interval = ""
    if len(ratios) >= MIN_ROUNDS_FOR_INTERVAL:
        low, high = median_interval(ratios)
        interval = f"'s 95% interval {low:.2f}-{high:.2f}"
        if low >= target:
            verdict = "met with margin"
    return median, interval, verdict


def read_runs(run: Path) -> dict[tuple[str, str], list[tuple[int, float, int]]]:
    """Every round's figure in a run directory: C{(test, proxy)} to C{(round, rate, errors)}s."""
    runs: dict[tuple[str, str], list[tuple[int, float, int]]] = {}
    for f in sorted(run.iterdir()):
        m = _FILE.match(f.name)
        if not m:
            continue
        got = parse(m.group(4), f.read_text(errors="replace"))
        if got is not None:
            runs.setdefault((m.group(2), m.group(3)), []).append((int(m.group(1)), got[0], got[1]))
    return runs


GOALS = (
    # label, test, the test it is divided by (the same test: nginx's figure; another: the proxy's own), goal
    ("HTTP/2 1 KiB -c10 -m10 / nginx", "h2-1k-m10", "h2-1k-m10", 0.40),
    ("HTTP/2 1 KiB -c10 -m10 / own HTTP/1.1 over TLS", "h2-1k-m10", "tls-1k", 0.80),
    ("connection per request, plain / nginx", "close", "close", 0.50),
    ("connection per request, TLS / nginx", "close-tls", "close-tls", 0.70),
)
"""Issue 16's goals, as ratios of one run."""


def goal_pair(who: str, test: str, over: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """The figures a goal divides: C{who}'s on C{test}, by nginx's on it, or by C{who}'s own on C{over}."""
    return (test, who), (over, "nginx" if over == test else who)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--pick", choices=("best", "median"), default="best")
    args = ap.parse_args()
    run = args.run_dir
    meta = (run / "meta.txt").read_text() if (run / "meta.txt").exists() else ""
    proxies = next((l.split("=", 1)[1].split() for l in meta.splitlines() if l.startswith("proxies=")),
                   ["nginx", "haproxy", "rproxy"])
    status = {}
    if (run / "status.tsv").exists():
        for line in (run / "status.tsv").read_text().splitlines():
            name, state, *why = line.split("\t")
            status[name] = (state, why[0] if why else "")
    runs = read_runs(run)

    for line in meta.splitlines():
        key, _, value = line.partition("=")
        print(f"{key:9} {value}")
    for name, (state, why) in status.items():
        if state != "ok":
            print(f"{name}: FAILED: {why}")
    print(f"figures: req/s (hs: handshakes/s), the {args.pick} round of each; rounds: every round in order")
    print()
    cols = [p for p in proxies]
    head = f"{'test':12}" + "".join(f"{p:>10}" for p in cols)
    head += f"{'rp/nginx':>10}{'rp/haprx':>10}" + (f"{'rp/base':>9}{'base/ngx':>10}" if "base" in cols else "")
    head += f"{'floor/ngx':>10}{'rp/floor':>10}" if "floor" in cols else ""
    print(head + "  errors  rounds (rproxy)")
    best: dict[tuple[str, str], float] = {}
    tests = [t for t in TESTS if any((t, p) in runs for p in cols)]
    for test in tests:
        row = f"{test:12}"
        errors = 0
        for p in cols:
            samples = runs.get((test, p))
            if not samples:
                row += f"{'-':>10}"
                continue
            _, rate, err = pick(samples, args.pick)
            best[(test, p)] = rate
            errors += err
            row += f"{rate:>10,.0f}"

        def ratio(a: str, b: str) -> str:
            if (test, a) in best and best.get((test, b)):
                return f"{best[(test, a)] / best[(test, b)]:.2f}x"
            return "-"

        row += f"{ratio('rproxy', 'nginx'):>10}{ratio('rproxy', 'haproxy'):>10}"
        if "base" in cols:
            row += f"{ratio('rproxy', 'base'):>9}{ratio('base', 'nginx'):>10}"
        if "floor" in cols:
            row += f"{ratio('floor', 'nginx'):>10}{ratio('rproxy', 'floor'):>10}"
        rounds = " ".join(f"{r:,.0f}" for _, r, _ in sorted(runs.get((test, "rproxy"), [])))
        print(f"{row}  {errors:>6}  {rounds}")
    print()
    for t in tests:
        print(f"  {t:12} {TESTS[t]}")
    print()
    print(f"Goals of issue 16 (ratios of this run: the {args.pick} rounds; then, with rounds interleaved, "
          "the median and range of the ratios round by round, and the median's bootstrap 95% interval)")

    def goal(label: str, a: tuple[str, str], b: tuple[str, str], target: float) -> None:
        if a in best and best.get(b):
            r = best[a] / best[b]
            line = f"  {label:48} {r:5.2f}x  (goal >= {target:.2f}x: {'met' if r >= target else 'NOT met'})"
            per_round = round_ratios(runs.get(a, []), runs.get(b, []))
            if len(per_round) > 1:
                median, interval, verdict = judge(per_round, target)
                line += (f"  round by round {median:.2f}x ({min(per_round):.2f}-{max(per_round):.2f}, "
                         f"{len(per_round)} rounds{'; median' + interval if interval else ''}: {verdict})")
            print(line)

    for who in ("rproxy", "base"):
        if who not in cols:
            continue
        print(f" {who}:")
        for label, test, over, target in GOALS:
            goal(label, *goal_pair(who, test, over), target)


if __name__ == "__main__":
    main()
