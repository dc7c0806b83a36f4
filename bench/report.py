"""
Turn the raw wrk outputs of one bench/run.sh run into a side-by-side table.

Reads, from the run directory that run.sh fills:
  - C{meta.txt}: C{key=value} lines describing the run (printed as a header);
  - C{status.tsv}: C{proxy<TAB>ok|failed<TAB>reason}, one line per proxy;
  - C{r<round>-<test>-<proxy>.wrk}: wrk's output, whose C{BENCH_RESULT} line
    comes from bench/wrk_report.lua.

Per proxy and test, one round is chosen (the best by req/s, or the median by
req/s) and all its figures are reported together, so that a row is one real
measurement rather than a mix of rounds.

Usage: report.py RUN_DIR [--pick best|median]
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

MiB = 1024 * 1024
_RESULT = re.compile(r"^BENCH_RESULT (.*)$", re.MULTILINE)
_FILE = re.compile(r"^r(\d+)-(\w+)-([\w.-]+)\.wrk$")

TESTS = (
    ("1k", "1 KiB GET, keep-alive, {conns_1k} connections, 1 wrk thread"),
    ("1m", "1 MiB GET, keep-alive, {conns_1m} connections, 1 wrk thread"),
)
REFERENCE = "nginx"


@dataclass(frozen=True)
class Sample:
    """One wrk run, from its BENCH_RESULT line."""

    round: int
    requests: int
    seconds: float
    bytes: int
    p50_ms: float
    p99_ms: float
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def mibps(self) -> float:
        return self.bytes / MiB / self.seconds if self.seconds else 0.0


def _parseSample(roundNo: int, text: str) -> Sample | None:
    match = _RESULT.search(text)
    if match is None:
        return None
    fields = dict(item.split("=", 1) for item in match.group(1).split())
    values = {key: float(value) for key, value in fields.items()}
    return Sample(
        round=roundNo,
        requests=int(values["requests"]),
        seconds=values["duration_us"] / 1e6,
        bytes=int(values["bytes"]),
        p50_ms=values["p50_us"] / 1000,
        p99_ms=values["p99_us"] / 1000,
        errors=int(sum(v for k, v in values.items() if k.startswith("err_"))),
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
    ordered = sorted(samples, key=lambda s: s.rps)
    if how == "median":
        # The lower middle for an even count: a real round, never an average.
        return ordered[(len(ordered) - 1) // 2]
    return ordered[-1]


def _ratio(value: float, reference: float | None) -> str:
    if not reference:
        return "-"
    return f"{value / reference:.2f}"


def render(runDir: Path, pick: str) -> str:
    meta = _readKeyValues(runDir / "meta.txt")
    status = _readStatus(runDir / "status.tsv")
    proxies = meta.get("proxies", " ".join(status)).split()

    samples: dict[tuple[str, str], list[Sample]] = {}
    for path in sorted(runDir.glob("r*-*-*.wrk")):
        match = _FILE.match(path.name)
        if match is None:
            continue
        roundNo, test, proxy = int(match.group(1)), match.group(2), match.group(3)
        sample = _parseSample(roundNo, path.read_text(errors="replace"))
        if sample is not None:
            samples.setdefault((proxy, test), []).append(sample)

    out: list[str] = []
    out.append(f"rproxy_tw benchmark, {meta.get('date', '?')}")
    for key in ("machine", "pinning", "runs", "load", "versions"):
        if key in meta:
            out.append(f"  {key}: {meta[key]}")
    rule = "best round" if pick == "best" else "median round"
    out.append(f"  each row: the {rule} by req/s (all figures from that round)")
    out.append("  MiB/s counts what wrk reads: status line, headers and body")
    out.append("")

    header = (
        f"{'proxy':<9} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'MiB/s':>9}"
        f" {'req/s/nginx':>11} {'MiB/s/nginx':>11} {'errors':>7}  rounds (req/s)"
    )
    ran = {test for _, test in samples}
    for test, title in TESTS:
        if ran and test not in ran:
            continue  # a run of some tests only (bench/scrub.sh runs 1k)
        out.append(title.format(**{k: meta.get(k, "?") for k in ("conns_1k", "conns_1m")}))
        out.append(header)
        out.append("-" * len(header))
        chosen: dict[str, Sample] = {}
        for proxy in proxies:
            if samples.get((proxy, test)):
                chosen[proxy] = _pick(samples[(proxy, test)], pick)
        ref = chosen.get(REFERENCE)
        for proxy in proxies:
            state, reason = status.get(proxy, ("ok", ""))
            if proxy not in chosen:
                why = reason if state == "failed" else "no result"
                out.append(f"{proxy:<9} FAILED: {why}")
                continue
            s = chosen[proxy]
            rounds = " ".join(
                f"{x.rps:.0f}" for x in sorted(samples[(proxy, test)], key=lambda x: x.round)
            )
            line = (
                f"{proxy:<9} {s.rps:>10.0f} {s.p50_ms:>8.2f} {s.p99_ms:>8.2f}"
                f" {s.mibps:>9.1f} {_ratio(s.rps, ref.rps if ref else None):>11}"
                f" {_ratio(s.mibps, ref.mibps if ref else None):>11} {s.errors:>7}"
                f"  {rounds}"
            )
            if state == "failed":
                line += f"  (then failed: {reason})"
            out.append(line)
        out.append("")
    return "\n".join(out)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--pick", choices=("best", "median"), default="best")
    args = parser.parse_args(argv)
    sys.stdout.write(render(args.run_dir, args.pick) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
