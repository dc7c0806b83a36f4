"""
Turn the raw outputs of one bench/tls.sh run into tables, with ratios to
nginx and the targets of issue 3.

Reads, from the run directory that tls.sh fills:
  - C{meta.txt}: C{key=value} lines describing the run (printed as a header);
  - C{status.tsv}: C{proxy<TAB>ok|failed<TAB>reason}, one line per proxy;
  - C{r<round>-ka-<proxy>.wrk}: wrk's output, with the C{BENCH_RESULT} line
    of bench/wrk_report.lua;
  - C{r<round>-new-<proxy>.stime}, C{r<round>-reuse-<proxy>.stime}: the
    output of C{openssl s_time}: one character per connection (C{r} for a
    resumed session) and C{N connections in ...};
  - in each of these, the C{BENCH_RUN} line tls.sh appends: the wall-clock
    seconds of the run and the CPU seconds the proxy used during it.

Rates are connections (or requests) over the wall-clock time that tls.sh
measured, not s_time's own figures: "connections/user sec" divides by the
client's CPU time, and "in N real seconds" is rounded to whole seconds.

Usage: report.py RUN_DIR [--pick best|median]
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REFERENCE = "nginx"
_FILE = re.compile(r"^r(\d+)-(ka|new|reuse)-([\w.-]+)\.(wrk|stime)$")
_RESULT = re.compile(r"^BENCH_RESULT (.*)$", re.MULTILINE)
_RUN = re.compile(r"^BENCH_RUN (.*)$", re.MULTILINE)
_CONNECTIONS = re.compile(r"^(\d+) connections in [\d.]+s;", re.MULTILINE)
_MARKS = re.compile(r"^[rt3*]+$", re.MULTILINE)

TITLES = {
    "ka": "1 KiB GET over kept-alive TLS: wrk, {conns} connections, 1 thread",
    "new": "Full handshakes: openssl s_time -new (one connection at a time, never resumes), TLS {tls}",
    "reuse": "Resumed handshakes: openssl s_time -reuse (one connection at a time, the same session), TLS {tls}",
}


@dataclass(frozen=True)
class Sample:
    """One measured run of one test against one proxy."""

    round: int
    count: int          # requests (ka) or connections (new, reuse)
    seconds: float      # wall clock
    proxy_cpu: float    # proxy CPU seconds during the run
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0
    resumed: int = 0    # s_time: connections that resumed a session

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    @property
    def cpu_percent(self) -> float:
        return 100 * self.proxy_cpu / self.seconds if self.seconds else 0.0


def _fields(pattern: re.Pattern[str], text: str) -> dict[str, float] | None:
    match = pattern.search(text)
    if match is None:
        return None
    return {k: float(v) for k, v in (item.split("=", 1) for item in match.group(1).split())}


def _parse(roundNo: int, kind: str, text: str) -> Sample | None:
    run = _fields(_RUN, text)
    if run is None:
        return None
    if kind == "wrk":
        result = _fields(_RESULT, text)
        if result is None:
            return None
        return Sample(
            round=roundNo,
            count=int(result["requests"]),
            # wrk's own duration: the wall time around it includes its start and stop.
            seconds=result["duration_us"] / 1e6,
            proxy_cpu=run["proxy_cpu_s"] * (result["duration_us"] / 1e6) / run["wall_s"],
            p50_ms=result["p50_us"] / 1000,
            p99_ms=result["p99_us"] / 1000,
            errors=int(sum(v for k, v in result.items() if k.startswith("err_"))),
        )
    match = _CONNECTIONS.search(text)
    if match is None:
        return None
    marks = "".join(_MARKS.findall(text))
    return Sample(
        round=roundNo,
        count=int(match.group(1)),
        seconds=run["wall_s"],
        proxy_cpu=run["proxy_cpu_s"],
        errors=0 if run.get("rc", 0) == 0 else 1,
        resumed=marks.count("r"),
    )


def _readKeyValues(path: Path) -> dict[str, str]:
    result: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if "=" in line:
                key, value = line.split("=", 1)
                result[key.strip()] = value.strip()
    return result


def _readStatus(path: Path) -> dict[str, tuple[str, str]]:
    status: dict[str, tuple[str, str]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 2:
                status[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "")
    return status


def _pick(samples: list[Sample], how: str) -> Sample:
    ordered = sorted(samples, key=lambda s: s.rate)
    if how == "median":
        return ordered[(len(ordered) - 1) // 2]  # the lower middle: a real round, never an average
    return ordered[-1]


def _ratio(value: float, reference: float | None) -> str:
    return f"{value / reference:.2f}" if reference else "-"


def render(runDir: Path, pick: str) -> str:
    meta = _readKeyValues(runDir / "meta.txt")
    status = _readStatus(runDir / "status.tsv")
    proxies = meta.get("proxies", " ".join(status)).split()
    tests = meta.get("tests", "ka new reuse").split()

    samples: dict[tuple[str, str], list[Sample]] = {}
    for path in sorted(runDir.iterdir()):
        match = _FILE.match(path.name)
        if match is None:
            continue
        roundNo, test, proxy, kind = int(match.group(1)), match.group(2), match.group(3), match.group(4)
        sample = _parse(roundNo, kind, path.read_text(errors="replace"))
        if sample is not None:
            samples.setdefault((proxy, test), []).append(sample)
    chosen = {key: _pick(value, pick) for key, value in samples.items()}

    out: list[str] = [f"rproxy_tw TLS benchmark, {meta.get('date', '?')}"]
    for key in ("machine", "pinning", "runs", "stime", "load", "certificate", "versions"):
        if key in meta:
            out.append(f"  {key}: {meta[key]}")
    out.append(f"  each row: the {'best' if pick == 'best' else 'median'} round by rate (all figures from that round)")
    out.append("  proxy CPU: the proxy's CPU time over the run's wall time (100% = its whole core)")
    out.append("")

    for test in tests:
        out.append(TITLES[test].format(conns=meta.get("conns", "?"), tls=meta.get("stime_tls", "?")))
        if test == "ka":
            header = (f"{'proxy':<9} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'x nginx':>8}"
                      f" {'proxy CPU':>10} {'errors':>7}  rounds (req/s)")
        else:
            header = (f"{'proxy':<9} {'conn/s':>9} {'x nginx':>8} {'proxy CPU':>10} {'resumed':>8}"
                      f" {'errors':>7}  rounds (conn/s)")
        out.append(header)
        out.append("-" * len(header))
        reference = chosen.get((REFERENCE, test))
        for proxy in proxies:
            state, reason = status.get(proxy, ("ok", ""))
            if state != "ok" and (proxy, test) not in chosen:
                out.append(f"{proxy:<9} FAILED: {reason}")
                continue
            s = chosen.get((proxy, test))
            if s is None:
                out.append(f"{proxy:<9} (no result)")
                continue
            rounds = " ".join(f"{x.rate:.0f}" for x in sorted(samples[(proxy, test)], key=lambda x: x.round))
            ratio = _ratio(s.rate, reference.rate if reference else None)
            if test == "ka":
                out.append(f"{proxy:<9} {s.rate:>9.0f} {s.p50_ms:>8.2f} {s.p99_ms:>8.2f} {ratio:>8}"
                           f" {s.cpu_percent:>9.0f}% {s.errors:>7}  {rounds}")
            else:
                resumed = f"{100 * s.resumed / s.count:.0f}%" if s.count else "-"
                out.append(f"{proxy:<9} {s.rate:>9.0f} {ratio:>8} {s.cpu_percent:>9.0f}% {resumed:>8}"
                           f" {s.errors:>7}  {rounds}")
            if state != "ok":
                out.append(f"{'':<9} (then FAILED: {reason})")
        out.append("")

    out += _targets(chosen)
    return "\n".join(out).rstrip() + "\n"


def _targets(chosen: dict[tuple[str, str], Sample]) -> list[str]:
    """Issue 3's targets for rproxy, as far as this run measured them."""
    lines = ["Targets (issue 3), rproxy:"]

    def rate(proxy: str, test: str) -> float | None:
        s = chosen.get((proxy, test))
        return s.rate if s is not None else None

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    for test, floor, what in (("ka", 0.2, "kept-alive TLS req/s"), ("new", 0.8, "full handshakes/s")):
        mine, ref = rate("rproxy", test), rate(REFERENCE, test)
        if mine is None or not ref:
            lines.append(f"  {what} >= {floor}x nginx: not measured")
        else:
            lines.append(f"  {what} >= {floor}x nginx: {mine / ref:.2f}x ({mine:.0f} vs {ref:.0f}), "
                         f"{verdict(mine / ref >= floor)}")
    full, resumed = rate("rproxy", "new"), rate("rproxy", "reuse")
    if full is None or resumed is None:
        lines.append("  resumed handshakes faster than full ones: not measured")
    else:
        lines.append(f"  resumed handshakes faster than full ones: {resumed:.0f} vs {full:.0f} conn/s "
                     f"({resumed / full:.2f}x), {verdict(resumed > full)}")
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--pick", choices=("best", "median"), default="best")
    args = parser.parse_args(argv)
    sys.stdout.write(render(args.run_dir, args.pick))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
