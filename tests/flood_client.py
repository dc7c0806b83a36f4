"""
The attacking side of test_scrub_flood, in its own process (asyncio), so
that the proxy's reactor does only the proxy's work: slowloris and
slow-POST connections from many loopback addresses, a burst of requests
from one address, and one legitimate client whose latency is measured.
The legitimate client runs in a process of its own (C{legit} mode), so
that its latency is the proxy's, not this attacking event loop's.
Prints one JSON object.

    python flood_client.py attack PORT SECONDS SLOWLORIS SLOWPOST BURST
    python flood_client.py legit PORT SECONDS
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections import Counter

HOST = "127.0.0.1"


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    if length:
        await reader.readexactly(length)
    return status


async def slow_client(port: int, source: str, post: bool, until: float, outcomes: Counter) -> None:
    """Hold a connection with a head (or body) that trickles; connect again when the proxy closes it."""
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
        except OSError:
            outcomes["connect_failed"] += 1
            await asyncio.sleep(0.2)
            continue
        try:
            if post:
                writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: 1000000\r\n\r\n")
            else:
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
            got = b""
            while time.monotonic() < until:
                writer.write(b"x" if post else b"X-Slow: 1\r\n")
                try:
                    got = await asyncio.wait_for(reader.read(1024), 0.5)
                except asyncio.TimeoutError:
                    continue
                break
            if not got and time.monotonic() >= until:
                outcomes["still_open"] += 1
            elif got.startswith(b"HTTP/1.1 408"):
                outcomes["408"] += 1
            elif not got:
                outcomes["closed_without_answer"] += 1
            else:
                outcomes["other:" + got[:12].decode("latin-1")] += 1
        except (ConnectionError, OSError):
            outcomes["reset"] += 1
        finally:
            writer.close()
        await asyncio.sleep(0.05)


async def burst(port: int, source: str, count: int, connections: int, outcomes: Counter) -> None:
    async def one(n: int) -> None:
        try:
            reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
        except OSError:
            outcomes["connect_failed"] += n
            return
        try:
            for _ in range(n):
                writer.write(b"GET /burst HTTP/1.1\r\nHost: x\r\n\r\n")
                outcomes[str(await read_response(reader))] += 1
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            outcomes["cut"] += 1
        finally:
            writer.close()

    await asyncio.gather(*(one(count // connections) for _ in range(connections)))


async def legit(port: int, start: float, until: float, latencies: list[float], statuses: Counter) -> None:
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=("127.0.0.1", 0))
    while time.monotonic() < until:
        sent = time.monotonic()
        writer.write(b"GET /page HTTP/1.1\r\nHost: x\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n\r\n")
        statuses[str(await read_response(reader))] += 1
        latencies.append(time.monotonic() - sent)
        await asyncio.sleep(0.03)
    writer.close()


async def attack(port: int, seconds: float, slowloris: int, slowpost: int, burst_count: int) -> None:
    t0 = time.monotonic()
    until = t0 + seconds
    outcomes: dict[str, Counter] = {"slowloris": Counter(), "slowpost": Counter(), "burst": Counter()}
    tasks = []
    # 120 connections per source address (the proxy allows 100 each): slowloris from 127.0.1.x,
    # slow POSTs from 127.0.2.x, the burst from 127.0.3.1.
    for i in range(slowloris):
        tasks.append(slow_client(port, f"127.0.1.{1 + i // 120}", False, until, outcomes["slowloris"]))
    for i in range(slowpost):
        tasks.append(slow_client(port, f"127.0.2.{1 + i // 120}", True, until, outcomes["slowpost"]))
    tasks.append(burst(port, "127.0.3.1", burst_count, 20, outcomes["burst"]))
    await asyncio.gather(*tasks)
    print(json.dumps({"seconds": round(time.monotonic() - t0, 2), "outcomes": {k: dict(v) for k, v in outcomes.items()}}))


async def legit_main(port: int, seconds: float) -> None:
    t0 = time.monotonic()
    latencies: list[float] = []
    statuses: Counter = Counter()
    await legit(port, t0 + 1.5, t0 + seconds - 0.5, latencies, statuses)
    latencies.sort()
    print(json.dumps({
        "statuses": dict(statuses),
        "requests": len(latencies),
        "p50_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
        "p99_ms": round(latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000, 1) if latencies else None,
        "max_ms": round(latencies[-1] * 1000, 1) if latencies else None,
    }))


if __name__ == "__main__":
    if sys.argv[1] == "attack":
        port, seconds, slowloris, slowpost, burst_count = sys.argv[2:7]
        asyncio.run(attack(int(port), float(seconds), int(slowloris), int(slowpost), int(burst_count)))
    else:
        asyncio.run(legit_main(int(sys.argv[2]), float(sys.argv[3])))
