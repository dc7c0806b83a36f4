"""
Bytecodes the interpreter runs per request, by function, in one of
bench/inmem.py's modes: an exact count (C{sys.settrace} with opcode events),
the same from run to run and machine to machine, where cProfile's times
carry its own overhead and a sampling profiler's need a long run.  The
harness's own frames (the client, the origin) are left out; what is counted
is the proxy's Python and the library code it calls (Twisted, C{ssl.py}).

Reads where a connection's Python goes and how flat it is; compare two trees
by running each one's copy of this script.

    python bench/inmem_bytecodes.py close-tls [--requests 300] [--top 60]
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import inmem  # noqa: E402


def _where(code: CodeType) -> str:
    name = code.co_filename
    if "site-packages/" in name:
        return name.split("site-packages/", 1)[1]
    return name.replace(str(Path(__file__).resolve().parent.parent) + "/", "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=sorted(inmem.MODES))
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--top", type=int, default=60)
    args = ap.parse_args()
    scheme, prepare, run = inmem.MODES[args.mode]
    # Warm up (and check every answer) first: first-time imports and caches are not per-request work.
    run(inmem.Proxy(scheme), 20, 1, args.size, True, prepare(20, 1, args.size))
    prepared = prepare(args.requests, 1, args.size)
    proxy = inmem.Proxy(scheme)
    opcodes: collections.Counter[CodeType] = collections.Counter()
    calls: collections.Counter[CodeType] = collections.Counter()
    harness = (inmem.__file__, __file__)

    def count(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            opcodes[frame.f_code] += 1
        return count

    def enter(frame: FrameType, event: str, arg: Any) -> Any:
        code = frame.f_code
        if code.co_filename in harness:
            return None
        caller = frame.f_back
        if caller is not None and caller.f_code.co_filename in harness and code.co_filename.endswith("ssl.py"):
            return None  # the harness's TLS client
        calls[code] += 1
        frame.f_trace_opcodes = True
        return count

    sys.settrace(enter)
    try:
        n = run(proxy, args.requests, 1, args.size, False, prepared)
    finally:
        sys.settrace(None)
    total = sum(opcodes.values())
    print(f"{args.mode}: {n} requests, {total / n:.0f} bytecodes and {sum(calls.values()) / n:.0f} Python calls per request")
    by_file: collections.Counter[str] = collections.Counter()
    for code, c in opcodes.items():
        by_file[_where(code)] += c
    print("\nbytecodes per request, by file:")
    for where, c in by_file.most_common(20):
        print(f"{c / n:9.1f}  {where}")
    print("\nbytecodes and calls per request, by function:")
    for code, c in opcodes.most_common(args.top):
        print(f"{c / n:9.1f} {calls[code] / n:6.2f}  {_where(code)}:{code.co_firstlineno} {code.co_name}")


if __name__ == "__main__":
    main()
