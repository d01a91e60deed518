"""The spool: what could not reach the server, kept on disk for ``chronicle sync``.

When the server stays unreachable past the retry budget at the end of a run, the terminal
transition and the unfinished uploads are written here (under the client's home) instead of
being lost. ``chronicle sync`` (or :meth:`Chronicle.sync`) replays them: uploads first, then
transitions, oldest first. Within the 48 h recovery window a silent run is ``lost``, which
still accepts ``succeed`` and ``fail``, so the late transition lands.

Layout: ``<home>/spool/<time>-<id>.json`` manifests; upload bytes in ``<id>.data`` beside them.
A manifest is written to a temporary name and renamed, so a crash never leaves half of one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import APIError, ChronicleError, TransportError
from .._models import RunKey

log = logging.getLogger(__name__)


@dataclass
class SyncReport:
    """What ``sync`` did: entries sent, entries still waiting, entries refused for good."""

    sent: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[str]]:
        return {"sent": self.sent, "waiting": self.waiting, "refused": self.refused}


class Spool:
    """Manifests of deferred work under ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _write(self, entry: dict[str, Any]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        entry_id = entry.setdefault("id", uuid.uuid4().hex)
        path = self.root / f"{time.time():020.6f}-{entry_id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entry, sort_keys=True))
        os.replace(tmp, path)
        return path

    def add_transition(
        self,
        target: str,
        key: RunKey,
        action: str,
        *,
        lease: str | None,
        reason: str | None = None,
        message: str | None = None,
        progress: dict[str, Any] | None = None,
        outcomes: tuple[dict[str, Any] | None, dict[str, Any] | None] = (None, None),
    ) -> Path:
        """Defer ``succeed`` or ``fail`` of a run (with its final progress and metrics)."""
        return self._write(
            {
                "kind": "transition",
                "target": target,
                "run": list(key),
                "action": action,
                "lease": lease,
                "reason": reason,
                "message": message,
                "progress": progress,
                "metrics": outcomes[0],
                "checkpoints": outcomes[1],
            }
        )

    def add_upload(
        self,
        target: str,
        key: RunKey,
        name: str,
        staged: Path,
        *,
        lease: str | None,
        upload_id: str,
        linked: bool,
    ) -> Path:
        """Defer an upload, taking ownership of the staged file (copied if it is a shared link:
        the source could be rewritten in place later)."""
        self.root.mkdir(parents=True, exist_ok=True)
        entry_id = uuid.uuid4().hex
        data = self.root / f"{entry_id}.data"
        if linked and os.stat(staged).st_nlink > 1:
            shutil.copyfile(staged, data)
            staged.unlink()
        else:
            os.replace(staged, data)
        return self._write(
            {
                "id": entry_id,
                "kind": "upload",
                "target": target,
                "run": list(key),
                "name": name,
                "data": data.name,
                "lease": lease,
                "upload_id": upload_id,
            }
        )

    def entries(self) -> list[tuple[Path, dict[str, Any]]]:
        """Every manifest, uploads first, then transitions, oldest first within each."""
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.glob("*.json")):
            try:
                found.append((path, json.loads(path.read_text())))
            except (OSError, ValueError):
                log.error("unreadable spool entry %s; leaving it in place", path)
        return sorted(found, key=lambda item: (item[1].get("kind") != "upload", item[0].name))

    def data_paths(self) -> set[Path]:
        """The files the spool's upload entries still need."""
        return {self.root / e["data"] for _, e in self.entries() if e.get("data")}

    def sync(self, transport: Any) -> SyncReport:
        """Replay every entry addressed to ``transport.target``."""
        report = SyncReport()
        for path, entry in self.entries():
            label = f"{entry.get('kind')} {'/'.join(map(str, entry.get('run', [])))}" + (
                f" {entry['name']}" if entry.get("name") else f" {entry.get('action')}"
            )
            if entry.get("target") != transport.target:
                report.waiting.append(f"{label} (for {entry.get('target')})")
                continue
            try:
                self._replay(transport, entry)
            except TransportError as exc:
                log.warning("sync: %s still cannot be sent: %s", label, exc)
                report.waiting.append(label)
                continue
            except (APIError, ChronicleError, OSError) as exc:
                log.error(
                    "sync: %s was refused: %s; moved to %s", label, exc, self.root / "refused"
                )
                self._retire(path, entry, refused=True)
                report.refused.append(f"{label}: {exc}")
                continue
            self._retire(path, entry)
            report.sent.append(label)
        return report

    def _replay(self, transport: Any, entry: dict[str, Any]) -> None:
        e, v, r = entry["run"]
        if entry["kind"] == "upload":
            transport.upload_file(
                e,
                v,
                r,
                entry["name"],
                str(self.root / entry["data"]),
                lease=entry.get("lease"),
                upload_id=entry["upload_id"],
            )
        elif entry["action"] == "succeed":
            outcomes = (entry.get("metrics"), entry.get("checkpoints"))
            transport.succeed(e, v, r, entry.get("lease"), entry.get("progress"), outcomes)
        else:
            transport.fail(
                e,
                v,
                r,
                entry.get("reason") or "crash",
                entry.get("message"),
                entry.get("lease"),
                entry.get("progress"),
                (entry.get("metrics"), entry.get("checkpoints")),
            )

    def _retire(self, path: Path, entry: dict[str, Any], refused: bool = False) -> None:
        data = self.root / entry["data"] if entry.get("data") else None
        if refused:
            dest = self.root / "refused"
            dest.mkdir(exist_ok=True)
            os.replace(path, dest / path.name)
            if data is not None and data.exists():
                os.replace(data, dest / data.name)
            return
        path.unlink(missing_ok=True)
        if data is not None:
            data.unlink(missing_ok=True)
