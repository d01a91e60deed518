"""``chronicle`` commands that move assets: assets, download (SHA-256 verified), sync (the
spool)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from .connect import home_dir, open_client
from .errors import EXIT_ERROR, EXIT_OK
from .format import (
    PROGRESS_MIN_BYTES,
    ProgressBar,
    format_size,
    format_time,
    print_json,
    printable,
    public,
    table,
)


def cmd_assets(args: argparse.Namespace, out: TextIO) -> int:
    with open_client(args) as chronicle:
        assets = chronicle.run(*args.run).assets()
    if args.json:
        print_json([public(a) for a in assets], out)
    elif not assets:
        print("no assets", file=sys.stderr)
    else:
        out.write(
            table(
                ["NAME", "SIZE", "SHA256", "CREATED"],
                [
                    [a.name, format_size(a.size), a.sha256[:12], format_time(a.created_at)]
                    for a in assets
                ],
            )
            + "\n"
        )
    return EXIT_OK


def cmd_download(args: argparse.Namespace, out: TextIO) -> int:
    """One asset, or every asset under ``NAME/`` (a directory) when NAME is not an asset."""
    dest = Path(args.dest)
    if args.dest.endswith(("/", os.sep)) and not dest.exists():
        dest.mkdir(parents=True)
    bar: ProgressBar | None = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            if total <= PROGRESS_MIN_BYTES or not sys.stderr.isatty():
                return
            bar = ProgressBar(printable(args.name), sys.stderr)
        bar(done, total)

    with open_client(args) as chronicle:
        run = chronicle.run(*args.run)
        assets = {a.name: a for a in run.assets()}
        try:
            if args.name in assets:
                written = {args.name: run.download_asset(args.name, dest, progress=progress)}
            else:
                written = run.download_directory(args.name, dest, progress=progress)
        finally:
            if bar is not None:
                bar.close()
    _print_written(written, assets, args.json, out)
    return EXIT_OK


def _print_written(
    written: dict[str, Path], assets: dict[str, Any], as_json: bool, out: TextIO
) -> None:
    """What a download wrote: one path a line, or (``--json``) ``[{"name", "path", "size",
    "sha256"}, ...]`` (the SHA-256 each file was verified against)."""
    files = [
        {
            "name": name,
            "path": str(Path(path).resolve()),
            "size": assets[name].size,
            "sha256": assets[name].sha256,
        }
        for name, path in written.items()
    ]
    if as_json:
        print_json(files, out)
    else:
        out.write("".join(f"{printable(f['path'])}\n" for f in files))


def cmd_sync(args: argparse.Namespace, out: TextIO) -> int:
    if not args.url and not home_dir(args).is_dir():
        from ..client._spool import SyncReport

        report = SyncReport()  # no home, hence no spool: nothing to send
    else:
        with open_client(args) as chronicle:
            report = chronicle.sync()
    if args.json:
        print_json(report.to_dict(), out)
    else:
        out.write(
            f"sent {len(report.sent)}, waiting {len(report.waiting)}, "
            f"refused {len(report.refused)}\n"
        )
        for word, items in (
            ("sent", report.sent),
            ("waiting", report.waiting),
            ("refused", report.refused),
        ):
            for item in items:
                out.write(f"  {word}: {printable(item)}\n")
    return EXIT_ERROR if report.waiting or report.refused else EXIT_OK
