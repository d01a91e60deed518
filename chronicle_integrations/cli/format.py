"""How the ``chronicle`` command shows things: tables, times, sizes, progress, JSON.

Every human output path escapes what it shows with :func:`printable`; ``--json`` output
does not (JSON escapes it itself) and never includes a lease token (:func:`public`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

#: Downloads larger than this get a progress bar (when stderr is a terminal).
PROGRESS_MIN_BYTES = 8 * 2**20


def format_time(ts: float | None) -> str:
    """Local wall-clock time for tables: ``2026-11-27 14:05:25``."""
    if ts is None:
        return "-"
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def format_iso(ts: float | None, now: float | None = None) -> str:
    """Local ISO time with offset and the relative age: ``2026-...T14:05:25+01:00 (3m ago)``."""
    if ts is None:
        return "-"
    iso = _dt.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")
    return f"{iso} ({format_ago(ts, now)})"


def format_ago(ts: float | None, now: float | None = None) -> str:
    """``12s ago``, ``5m ago``, ``3h ago``, ``2d ago`` (``in 4s`` for a clock ahead of ours)."""
    if ts is None:
        return "-"
    delta = (time.time() if now is None else now) - ts
    ahead = delta < 0
    delta = abs(delta)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            amount = f"{int(delta // size)}{unit}"
            break
    else:
        amount = f"{int(delta)}s"
    return f"in {amount}" if ahead else f"{amount} ago"


def format_size(size: int | float) -> str:
    """Binary units: ``512 B``, ``1.5 KiB``, ``12.0 MiB``."""
    value = float(size)
    if value < 1024:
        return f"{int(value)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def printable(text: object) -> str:
    """``text`` safe to show on a terminal: every character Python does not call printable
    (C0 and C1 controls, ESC, DEL, bidi overrides, zero-width and other format characters,
    line separators, unusual spaces) is shown as its escape (``\\x1b``, ``\\u202e``), so a
    failure message cannot drive the operator's terminal and invisible characters cannot make
    two different asset names look alike. Every human output path goes through here;
    ``--json`` does not (JSON escapes them itself)."""
    value = str(text)
    if value.isprintable():
        return value
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in value)


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def one_line(text: str | None, limit: int = 60) -> str:
    if not text:
        return ""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    widths: list[int] | None = None,
    header: bool = True,
) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded.

    A table printed in parts (a listing streamed page by page) passes the same ``widths``
    list to every part: columns are at least as wide as before and the list is widened in
    place; the parts after the first leave out the ``header``.
    """
    cells = [[printable(c) for c in headers]] + [[printable(c) for c in row] for row in rows]
    widths = widths if widths is not None else []
    widths[:] = [
        max([len(row[i]) for row in cells] + widths[i : i + 1]) for i in range(len(headers))
    ]
    lines = []
    for row in cells if header else cells[1:]:
        padded = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def public(record: Any) -> dict[str, Any]:
    """A model as JSON-ready dict, minus the lease token (a secret of the worker)."""
    data: dict[str, Any] = record.to_dict()
    data.pop("lease", None)
    return data


def print_json(obj: Any, out: TextIO) -> None:
    out.write(json.dumps(obj, indent=2) + "\n")


class ProgressBar:
    """A minimal progress bar on a terminal stream (no tqdm dependency).

    ``bar(done, total)`` redraws at most ~10 times a second; ``close()`` ends the line.
    """

    def __init__(self, label: str, stream: TextIO, width: int = 30) -> None:
        self.label = label
        self.stream = stream
        self.width = width
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        fraction = min(1.0, done / total) if total > 0 else 1.0
        filled = int(fraction * self.width)
        rate = done / max(now - self.started, 1e-6)
        self.stream.write(
            f"\r{self.label}  [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{fraction * 100:5.1f}%  {format_size(done)} / {format_size(total)}  "
            f"{format_size(rate)}/s "
        )
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def progress_text(progress: dict[str, Any] | None) -> str:
    """``step=120 epoch=3`` (or ``-``)."""
    if not progress:
        return "-"
    return " ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in progress.items()
    )


def answer(args: argparse.Namespace, record: Callable[[], Any], line: str, out: TextIO) -> None:
    """What a command made: with ``--json`` the JSON of ``record()`` (read only then), else
    ``line`` (an id or number, for shell scripts)."""
    if args.json:
        print_json(record(), out)
    else:
        out.write(f"{line}\n")


def stream_json_list(chunks: Iterator[list[Any]], out: TextIO) -> None:
    """One JSON array (as :func:`print_json` writes it), written a chunk at a time."""
    first = True
    for chunk in chunks:
        for item in chunk:
            text = textwrap.indent(json.dumps(item, indent=2), "  ")
            out.write(("[\n" if first else ",\n") + text)
            first = False
        out.flush()
    out.write("[]\n" if first else "\n]\n")
