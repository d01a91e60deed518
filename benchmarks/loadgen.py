"""A small closed-loop HTTP/1.1 load generator (asyncio, raw keep-alive sockets).

Each of N concurrent clients owns one connection and one target (e.g. its own run and
lease), sends a request, waits for the full response, and repeats. The requests are
pre-encoded bytes, so the generator spends its CPU on sockets, not on building requests:
its own CPU use is measured and reported, to show it is not the bottleneck.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable


def encode(host: str, port: int, path: str, body: dict) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        f"Connection: keep-alive\r\n\r\n"
    ).encode() + data


async def _client(
    host: str,
    port: int,
    make: Callable[[int], bytes],
    t_start: float,
    t_end: float,
    lat: list[float],
    errors: list[str],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    n = 0
    try:
        while True:
            now = time.perf_counter()
            if now >= t_end:
                break
            writer.write(make(n))
            n += 1
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            status = head[9:12]
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            done = time.perf_counter()
            if status != b"200":
                if len(errors) < 20:
                    errors.append(head.split(b"\r\n", 1)[0].decode())
                else:
                    errors.append("")
            elif now >= t_start:
                lat.append(done - now)
    finally:
        writer.close()


def run(
    host: str,
    port: int,
    makers: list[Callable[[int], bytes]],
    duration: float,
    warmup: float,
    server_pids: list[int],
) -> dict:
    """Drive len(makers) concurrent clients for warmup + duration seconds."""
    import psutil

    procs = [psutil.Process(p) for p in server_pids]

    def server_cpu() -> float:
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    lat: list[float] = []
    errors: list[str] = []

    async def main() -> tuple[float, float, float, float]:
        t0 = time.perf_counter()
        t_start, t_end = t0 + warmup, t0 + warmup + duration
        tasks = [_client(host, port, m, t_start, t_end, lat, errors) for m in makers]
        # measure CPU over the timed window only
        cpu = {}

        async def mark() -> None:
            await asyncio.sleep(max(0.0, t_start - time.perf_counter()))
            cpu["gen0"], cpu["srv0"], cpu["w0"] = _self_cpu(), server_cpu(), time.perf_counter()
            await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
            cpu["gen1"], cpu["srv1"], cpu["w1"] = _self_cpu(), server_cpu(), time.perf_counter()

        await asyncio.gather(mark(), *tasks)
        wall = cpu["w1"] - cpu["w0"]
        return wall, cpu["gen1"] - cpu["gen0"], cpu["srv1"] - cpu["srv0"], t_end

    wall, gen_cpu, srv_cpu, _ = asyncio.run(main())
    lat.sort()

    def pct(q: float) -> float | None:
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

    return {
        "clients": len(makers),
        "requests": len(lat),
        "wall_s": wall,
        "rps": len(lat) / duration,
        "p50_ms": _ms(pct(0.50)),
        "p99_ms": _ms(pct(0.99)),
        "max_ms": _ms(lat[-1] if lat else None),
        "errors": len(errors),
        "error_samples": [e for e in errors if e][:5],
        "loadgen_cpu_cores": gen_cpu / wall,
        "server_cpu_cores": srv_cpu / wall,
    }


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system
