"""Tables of a bench/tcp.sh run: python bench/tcp/report.py bench/results/tcp-<date-time>

Reads runs.tsv (one line per run), status.tsv, rss-idle.tsv, rss-peak.tsv and
meta.txt from the run's directory. Each row is the median round of a proxy and
case (all its figures from that one round); the ratio is to HAProxy's median
in the same case.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

CASES = {
    "up": "plain, upload: client -> proxy -> backend sink",
    "down": "plain, download: backend source -> proxy -> client",
    "tls-up": "TLS terminated, upload: TLS client -> proxy -> plain backend sink",
    "tls-down": "TLS terminated, download: plain backend source -> proxy -> TLS client",
}
ORDER = ["direct", "haproxy", "nginx", "portforward", "rproxy"]


def _tsv(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    with path.open() as f:
        return [row for row in csv.reader(f, delimiter="\t") if row]


def _median_run(runs: list[dict]) -> dict:
    """The median run by MiB/s (the lower middle one for an even count)."""
    ok = sorted((r for r in runs if r["mibps"] != "error"), key=lambda r: float(r["mibps"]))
    return ok[(len(ok) - 1) // 2] if ok else {}


def main(run_dir: str) -> int:
    d = Path(run_dir)
    meta = dict(line.split("=", 1) for line in (d / "meta.txt").read_text().splitlines() if "=" in line) \
        if (d / "meta.txt").exists() else {}
    rows = _tsv(d / "runs.tsv")
    header, rows = (rows[0], rows[1:]) if rows else ([], [])
    runs = [dict(zip(header, r)) for r in rows]
    status = {r[0]: (r[1], r[2] if len(r) > 2 else "") for r in _tsv(d / "status.tsv")}

    nbytes = int(meta.get("bytes", 1 << 30))
    size = f"{nbytes / 2**30:g} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:g} MiB"
    out = []
    out.append(f"Raw TCP through one proxy, {size} per run over one connection, "
               f"median of {meta.get('rounds', '?')} interleaved rounds")
    out.append(f"{meta.get('date', '?')}; {meta.get('machine', '?')}")
    out.append(f"load average at start {meta.get('load_start', '?')}, at end {meta.get('load_end', '?')}; "
               f"rproxy at {meta.get('commit', '?')}, HAProxy {meta.get('haproxy', '?')}, "
               f"nginx {meta.get('nginx', '?')}, Python {meta.get('python', '?')}, Twisted {meta.get('twisted', '?')}")
    out.append(f"proxy on CPU {meta.get('proxy_cpu', '?')}; load generator and backend on CPU {meta.get('load_cpu', '?')}")
    out.append("MiB/s = 2^20 bytes/s; proxy CPU = CPU time of the proxy process during the run, % of one core;")
    out.append("busy P/L = % busy of the proxy's core / of the load core during the run (/proc/stat: softirq")
    out.append("and other users' processes included)")

    medians: dict[tuple[str, str], float] = {}
    for case, title in CASES.items():
        in_case = [r for r in runs if r["case"] == case]
        if not in_case:
            continue
        names = sorted({r["proxy"] for r in in_case}, key=lambda p: (ORDER.index(p) if p in ORDER else 99, p))
        for p in names:
            m = _median_run([r for r in in_case if r["proxy"] == p])
            if m:
                medians[(case, p)] = float(m["mibps"])
        ref = medians.get((case, "haproxy"))
        out.append("")
        out.append(f"    {case}: {title}")
        tls = case.startswith("tls-")
        line = f"    {'proxy':<12} {'MiB/s':>7} {'/haproxy':>9} {'proxy CPU':>10} {'busy P/L':>9}  {'rounds (MiB/s)':<24}"
        if tls:
            line += " cipher"
        out.append(line)
        out.append("    " + "-" * (len(line) - 4 + (28 if tls else 0)))
        for p in names:
            mine = [r for r in in_case if r["proxy"] == p]
            m = _median_run(mine)
            rounds = " ".join(r["mibps"] for r in sorted(mine, key=lambda r: int(r["round"])))
            if not m:
                out.append(f"    {p:<12} {'-':>7} {'-':>9} {'-':>10} {'-':>9}  {rounds}")
                continue
            v = float(m["mibps"])
            ratio = f"{v / ref:.2f}" if ref else "-"
            cpu = "-" if m["cpu"] in ("nan", "-", "") else m["cpu"] + "%"
            busy = m.get("busy", "-") or "-"
            line = f"    {p:<12} {v:7.0f} {ratio:>9} {cpu:>10} {busy:>9}  {rounds:<24}"
            if tls:
                line += " " + m["cipher"]
            out.append(line.rstrip())
        for inst, (state, reason) in status.items():
            proxy = inst.removesuffix("-tls")
            if state != "ok" and inst.endswith("-tls") == tls:
                out.append(f"    {proxy:<12} FAILED: {reason}")

    idle = {r[0]: int(r[1]) for r in _tsv(d / "rss-idle.tsv") if len(r) > 1 and r[1].isdigit()}
    peak = {r[0]: (int(r[1]), int(r[2])) for r in _tsv(d / "rss-peak.tsv")
            if len(r) > 2 and r[1].isdigit() and r[2].isdigit()}
    if idle or peak:
        out.append("")
        out.append("    Memory of the plain instances (they served only the up and down runs), /proc/PID/status")
        out.append(f"    {'proxy':<12} {'RSS idle':>9} {'peak RSS':>9} {'growth':>8} {'RSS at end':>11}   (MiB)")
        out.append("    " + "-" * 58)
        for p in sorted(set(idle) | set(peak), key=lambda p: (ORDER.index(p) if p in ORDER else 99, p)):
            i = idle.get(p)
            hwm, end = peak.get(p, (None, None))
            f = lambda kib: "-" if kib is None else f"{kib / 1024:.1f}"  # noqa: E731
            growth = f(hwm - i) if hwm is not None and i is not None else "-"
            out.append(f"    {p:<12} {f(i):>9} {f(hwm):>9} {growth:>8} {f(end):>11}")
        out.append("    RSS idle: VmRSS after a 1 MiB check each way, before the runs; peak: VmHWM after all runs")

    # The target: rproxy at least the best of the others on plain TCP.
    verdicts = []
    for case in ("up", "down"):
        mine = medians.get((case, "rproxy"))
        others = {p: v for (c, p), v in medians.items() if c == case and p in ("haproxy", "nginx", "portforward")}
        if mine is None or not others:
            continue
        best = max(others, key=others.get)
        ok = "met" if mine >= others[best] else "not met"
        verdicts.append(f"{case}: rproxy {mine:.0f} vs best {best} {others[best]:.0f} MiB/s "
                        f"({mine / others[best]:.2f}x): {ok}")
    if verdicts:
        out.append("")
        out.append("    Target (issue 4), rproxy >= best of HAProxy/nginx/portforward on plain TCP:")
        out.extend("      " + v for v in verdicts)

    print("\n".join(out))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
