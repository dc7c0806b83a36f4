"""
Tables from one bench/balance.sh run directory.

Reads C{meta.txt} (printed as a header), C{r<round>-<rule>-<proxy>.wrk} and
C{.dist} for the balancing rules, and C{failover-<proxy>.wrk}, C{.dist} and
C{.events} for the failover runs.  The C{BENCH_RESULT} lines come from
bench/balance/wrk.lua; the C{.dist} files hold each origin's request counter
(nginx stub_status) before and after the measured run.

Usage: report.py RUN_DIR [--pick best|median]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

_RESULT = re.compile(r"^BENCH_RESULT (.*)$", re.MULTILINE)
_RULE_FILE = re.compile(r"^r(\d+)-(.+)-(rproxy|haproxy)\.wrk$")
ORIGINS = ("o1", "o2", "o3")

HAPROXY_NAMES = {
    "round_robin": "roundrobin",
    "least_conn": "leastconn",
    "random2": "random(2)",
    "hash-client_ip": "source",
}


def haproxy_name(slug: str) -> str:
    if slug in HAPROXY_NAMES:
        return HAPROXY_NAMES[slug]
    if slug.startswith("hash-header-"):
        return f"hdr({slug[len('hash-header-'):]})"
    if slug.startswith("cookie-"):
        return "cookie insert"
    return slug


def rule_name(slug: str) -> str:
    if slug.startswith("hash-header-"):
        return "hash:header:" + slug[len("hash-header-"):]
    return slug.replace("-", ":", 1) if slug.startswith(("hash-", "cookie-")) else slug


def result(path: Path) -> dict[str, float] | None:
    try:
        m = _RESULT.search(path.read_text(errors="replace"))
    except OSError:
        return None
    if m is None:
        return None
    return {k: float(v) for k, v in (kv.split("=") for kv in m.group(1).split())}


def dist(path: Path) -> dict[str, dict[str, int]]:
    """C{{"before": {"o1": n, ...}, "after": {...}}} from a .dist file."""
    out: dict[str, dict[str, int]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        when, _, rest = line.partition(" ")
        out[when] = {k: int(v or 0) for k, v in (kv.split("=") for kv in rest.split())}
    return out


def shares(d: dict[str, dict[str, int]]) -> str:
    if "before" not in d or "after" not in d:
        return "-"
    served = [max(0, d["after"].get(o, 0) - d["before"].get(o, 0)) for o in ORIGINS]
    total = sum(served)
    if not total:
        return "-"
    return "/".join(f"{100 * s / total:.0f}" for s in served)


def errors(r: dict[str, float]) -> int:
    return int(r["err_connect"] + r["err_read"] + r["err_write"] + r["err_timeout"] + r["non2xx"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--pick", choices=("best", "median"), default="best")
    args = ap.parse_args()
    run = args.run_dir

    meta = run / "meta.txt"
    if meta.exists():
        for line in meta.read_text().splitlines():
            key, _, value = line.partition("=")
            print(f"# {key}: {value}")
        print()

    runs: dict[tuple[str, str], list[tuple[int, Path]]] = {}
    order: list[str] = []
    for path in sorted(run.glob("r*.wrk")):
        m = _RULE_FILE.match(path.name)
        if not m:
            continue
        rnd, slug, proxy = int(m.group(1)), m.group(2), m.group(3)
        runs.setdefault((slug, proxy), []).append((rnd, path))
        if slug not in order:
            order.append(slug)
    # Keep the order the script ran the rules in (round 1's file times).
    order.sort(key=lambda s: min(p.stat().st_mtime for (sl, _), ps in runs.items() if sl == s for _, p in ps))

    if runs:
        print(f"Balancing rules ({args.pick} round of each; share = % of the run's requests each origin served)")
        header = f"{'rule':<20} {'proxy':<24} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}  {'o1/o2/o3 %':<12} rounds (req/s)"
        print(header)
        print("-" * len(header))
        for slug in order:
            for proxy in ("rproxy", "haproxy"):
                got = runs.get((slug, proxy))
                if not got:
                    continue
                label = "rproxy" if proxy == "rproxy" else f"haproxy {haproxy_name(slug)}"
                samples = []
                for rnd, path in sorted(got):
                    r = result(path)
                    if r is not None:
                        samples.append((r["requests"] / (r["duration_us"] / 1e6), rnd, path, r))
                if not samples:
                    print(f"{rule_name(slug):<20} {label:<24} FAILED (see {got[0][1].with_suffix('.log').name})")
                    continue
                ranked = sorted(samples, key=lambda s: s[0])
                pick = ranked[-1] if args.pick == "best" else ranked[(len(ranked) - 1) // 2]
                rps, _, path, r = pick
                d = dist(path.with_suffix(".dist"))
                rounds = " ".join(f"{s[0]:.0f}" for s in samples)
                print(
                    f"{rule_name(slug):<20} {label:<24} {rps:>8.0f} {r['p50_us'] / 1000:>8.2f} "
                    f"{r['p99_us'] / 1000:>8.2f} {errors(r):>7}  {shares(d):<12} {rounds}"
                )
        print()

    failover = sorted(run.glob("failover-*.wrk"), key=lambda p: p.stat().st_mtime)
    if failover:
        print("Failover (round_robin / roundrobin): o2 killed and restarted during the run")
        header = (
            f"{'proxy':<17} {'requests':>9} {'req/s':>7} {'non-2xx':>8} {'socket errors c/r/w/t':>22} "
            f"{'p50 ms':>7} {'p99 ms':>8} {'max ms':>8} {'o2 after restart':>17}  events"
        )
        print(header)
        print("-" * len(header))
        for path in failover:
            proxy = path.stem.split("-", 1)[1]
            r = result(path)
            if r is None:
                print(f"{proxy:<17} FAILED (see {path.with_suffix('.log').name})")
                continue
            d = dist(path.with_suffix(".dist"))
            back = d.get("after", {}).get("o2", 0)
            events = path.with_suffix(".events")
            ev = "; ".join(events.read_text().splitlines()) if events.exists() else ""
            sock = f"{r['err_connect']:.0f}/{r['err_read']:.0f}/{r['err_write']:.0f}/{r['err_timeout']:.0f}"
            print(
                f"{proxy:<17} {r['requests']:>9.0f} {r['requests'] / (r['duration_us'] / 1e6):>7.0f} "
                f"{r['non2xx']:>8.0f} {sock:>22} {r['p50_us'] / 1000:>7.2f} {r['p99_us'] / 1000:>8.2f} "
                f"{r['max_us'] / 1000:>8.1f} {back:>17}  {ev}"
            )


if __name__ == "__main__":
    main()
