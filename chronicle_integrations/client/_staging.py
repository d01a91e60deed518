"""Staging for background uploads: capture at call time, so an upload never loses or tears a
file (the pool and the orchestration that send the staged files are in ``_uploads``).

How the content is captured cheaply (SPEC "Uploads")
----------------------------------------------------
``upload_asset`` must return at once, yet the asset must be what the file held *at the call*,
even if training deletes or rewrites the file right after (Lightning evicts top-k checkpoints
and rewrites ``last.ckpt``; HF rotates ``checkpoint-N`` folders).

1. At call time each file is **hard-linked** into the staging directory: O(1), no bytes copied,
   whatever the size. The link keeps the inode alive when the source is deleted (top-k
   eviction, ``save_total_limit`` rotation) or atomically replaced (``os.replace``): the staged
   name still holds exactly the bytes of the call. When a link is impossible (another
   filesystem, a filesystem without links) the file is copied on the spot instead: slower but
   equally exact.
2. The one case a link cannot protect is an **in-place rewrite** of the same inode (``open(p,
   "wb")`` truncates and rewrites it). The worker records ``(size, mtime_ns)`` at call
   time and checks it again after reading the last byte and *before* asking the server to
   publish the asset. If it changed, the upload is dropped unpublished and a complete later
   version is captured instead: the worker waits until the file has been quiet for a moment,
   copies it privately, and checks the stat did not move during the copy. So an asset is
   either the call-time content or one complete later version - never a mix - and it only
   becomes visible after the server verified its SHA-256.

Staged files that could not be uploaded (server unreachable past the retry budget) are moved
to the spool with a manifest, and ``chronicle sync`` sends them later.

What is staged, and who owns it
-------------------------------
Only **regular files** are staged. A FIFO would block the upload worker's ``open()`` forever
(and with it ``succeed()``), a socket or a device cannot be read as a file, and a symbolic
link inside an uploaded directory may point anywhere (a secret outside it). Each entry of a
directory is ``lstat``-ed and skipped with one log line unless it is a regular file; the hard
link is made with ``follow_symlinks=False`` and the staged inode is checked again
(``lstat``), so a file swapped for a link or a FIFO between the walk and the link is never
uploaded. The copy fallback opens with ``O_NOFOLLOW | O_NONBLOCK`` and checks ``fstat``.

Every staged name starts with its owner, ``<pid>-<start time>-<host>-``: a client SIGKILLed
mid-upload leaves hard links behind, and the next client (on its first upload) or
``chronicle sync`` removes the entries whose owner is dead (:func:`reap_orphans`). Copies kept
after a refused upload are renamed ``kept-...`` and left alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .. import _validation as check
from .._errors import (
    UploadError,
)

log = logging.getLogger(__name__)

#: How long a rewritten file must stay unchanged before a later version is captured.
SETTLE_SECONDS = 0.5
#: How many times a rewritten file is re-captured before the upload gives up.
MAX_RECAPTURES = 20


@dataclass
class StagedFile:
    """A file captured for upload: a hard link (or private copy) in the staging directory."""

    path: Path
    name: str
    source: str
    size: int
    mtime_ns: int
    linked: bool

    def unchanged(self) -> bool:
        """True when the staged inode still holds the bytes captured at call time."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        # Not ctime: unlinking the source (top-k eviction) changes the inode's ctime.
        return (st.st_size, st.st_mtime_ns) == (self.size, self.mtime_ns)


class NotRegularFile(UploadError):
    """The path is not a regular file (a symbolic link, FIFO, socket, device or directory)."""


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words: ``regular file``, ``FIFO``, ``symbolic link``, ..."""
    for test, kind in (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return kind
    return "special file"


def open_regular(path: str | os.PathLike[str], follow_symlinks: bool = False) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file; else :class:`NotRegularFile`.

    ``O_NONBLOCK``: opening a FIFO never waits for a writer; ``O_NOFOLLOW`` (unless
    ``follow_symlinks``): a symbolic link swapped in is refused, not followed. The type is
    checked on the opened descriptor (``fstat``), so no later swap can change it.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if os.path.islink(path) and not follow_symlinks:
            raise NotRegularFile(f"{path} is a symbolic link") from exc
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(f"{path} is a {file_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _start_time(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (Linux ``/proc``), None when unknown, ``""``
    when the process is a zombie (it holds nothing any more)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return "" if fields[0] == b"Z" else fields[19].decode()


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


_OWNER: tuple[int, str] = (0, "")


def owner_tag() -> str:
    """``<pid>-<start time>-<host>``: names this process for as long as it lives (the start
    time tells a reused pid apart; the host keeps a shared home's other machines out).
    Recomputed after a fork."""
    global _OWNER
    pid = os.getpid()
    if _OWNER[0] != pid:
        _OWNER = (pid, f"{pid}-{_start_time(pid) or 0}-{_host_tag()}")
    return _OWNER[1]


def _owner_alive(tag: str) -> bool:
    """False only when the owner is certainly gone: same host, and no process with that pid
    and start time (a zombie counts as gone)."""
    pid, start, host = tag.split("-")
    if host != _host_tag():
        return True  # another machine sharing this home: not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    now = _start_time(int(pid))
    if now is None:
        return True  # no /proc: the pid exists, assume it is the owner
    return now != "" and (start == "0" or now == start)


_STAGED_NAME = re.compile(r"([0-9]+-[0-9]+-[0-9a-f]{8})-[0-9a-f]{32}(\.[a-z]+)?")


def reap_orphans(root: str | os.PathLike[str], keep: Collection[Path] = ()) -> int:
    """Remove staged entries under ``root`` whose owning process is dead (a client SIGKILLed
    mid-upload), except the paths in ``keep`` (what a spool entry still names). Entries of
    living owners, of other hosts, ``kept-...`` copies and foreign names are left alone.
    Returns how many were removed."""
    keep = {Path(p).resolve() for p in keep}
    verdicts: dict[str, bool] = {}
    removed = 0
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return 0
    for entry in names:
        match = _STAGED_NAME.fullmatch(entry)
        if match is None:
            continue
        owner = match.group(1)
        if owner not in verdicts:
            verdicts[owner] = _owner_alive(owner)
        path = Path(root, entry)
        if verdicts[owner] or path.resolve() in keep:
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    if removed:
        log.info("removed %d staged file(s) of dead clients from %s", removed, root)
    return removed


class Stager:
    """Captures files into ``root`` (a directory on the client's home filesystem)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._warned_copy = False

    def stage(
        self, path: str | os.PathLike[str], name: str | None, follow_symlinks: bool = True
    ) -> list[StagedFile]:
        """Capture a file, or every regular file under a directory (keeping its layout).

        A directory's symbolic links, FIFOs, sockets and devices are skipped (one log line
        each). A file named explicitly may be a symbolic link to a regular file unless
        ``follow_symlinks`` is False; anything else raises :class:`UploadError`.
        """
        src = Path(path)
        base = check.asset_name(name if name is not None else src.name)
        if src.is_symlink() and src.is_dir():
            raise UploadError(
                f"refusing to upload {src}: it is a symbolic link to a directory", name=base
            )
        if src.is_dir():
            staged = []
            for dirpath, dirnames, filenames in os.walk(src):
                dirnames.sort()
                for filename in sorted(filenames):
                    file = Path(dirpath, filename)
                    rel = file.relative_to(src).as_posix()
                    try:
                        staged.append(self.stage_file(file, check.asset_name(f"{base}/{rel}")))
                    except NotRegularFile as exc:
                        log.warning("%s; not uploading it (only regular files are)", exc)
            return staged
        try:
            mode = (os.stat if follow_symlinks else os.lstat)(src).st_mode
        except FileNotFoundError:
            raise UploadError(
                f"cannot upload {src}: no such file or directory", name=base
            ) from None
        if not stat.S_ISREG(mode):
            raise NotRegularFile(
                f"cannot upload {src}: it is a {file_kind(mode)}, not a regular file", name=base
            )
        return [self.stage_file(src, base, follow_symlinks=follow_symlinks)]

    def stage_file(self, src: Path, name: str, follow_symlinks: bool = False) -> StagedFile:
        """Hard-link ``src`` into staging (O(1)); copy it when a link is impossible. Raises
        :class:`NotRegularFile` unless what was captured is a regular file."""
        mode = os.lstat(src).st_mode
        if stat.S_ISLNK(mode) and follow_symlinks:
            mode = os.stat(src).st_mode
        if not stat.S_ISREG(mode):  # never link (nor open) a FIFO, socket or device
            raise NotRegularFile(f"{src} is a {file_kind(mode)}", name=name)
        dst = self.root / f"{owner_tag()}-{uuid.uuid4().hex}"
        try:
            os.link(src, dst, follow_symlinks=follow_symlinks)
        except OSError:
            if not self._warned_copy:
                log.info(
                    "cannot hard-link %s into %s (another filesystem?); staging by copy",
                    src,
                    self.root,
                )
                self._warned_copy = True
            return copy_stable(src, dst, name, follow_symlinks=follow_symlinks)
        # The entry may have been swapped for a link or a FIFO since the lstat above: what
        # counts is the inode now linked, checked without following anything.
        st = os.lstat(dst)
        if not stat.S_ISREG(st.st_mode):
            dst.unlink()
            raise NotRegularFile(f"{src} became a {file_kind(st.st_mode)}", name=name)
        return StagedFile(dst, name, str(src), st.st_size, st.st_mtime_ns, linked=True)

    def keep(self, staged: StagedFile) -> None:
        """Rename a staged file out of its owner's reach (``kept-...``): a refused upload's
        copy outlives the process for the user to inspect, unlike orphaned staging."""
        kept = self.root / f"kept-{staged.path.name}"
        with contextlib.suppress(FileNotFoundError):
            os.replace(staged.path, kept)
            staged.path = kept


def copy_stable(
    src: Path, dst: Path, name: str, settle: float = 0.0, follow_symlinks: bool = False
) -> StagedFile:
    """Copy ``src`` privately, retrying until its stat did not move during the copy. Only a
    regular file is read (:func:`open_regular`); ``dst`` must not exist."""
    for _ in range(MAX_RECAPTURES):
        if settle:
            _wait_quiet(src, settle)
        with open_regular(src, follow_symlinks) as fh, open(dst, "wb") as out:
            before = os.fstat(fh.fileno())
            _copy_file(fh, out)
            after = os.fstat(fh.fileno())
        if (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns):
            st = os.stat(dst)
            return StagedFile(dst, name, str(src), st.st_size, st.st_mtime_ns, linked=False)
        settle = max(settle, SETTLE_SECONDS)
    raise UploadError(f"{src} kept changing while it was being captured", name=name)


def _copy_file(src: BinaryIO, dst: BinaryIO) -> None:
    """Copy an open file into another in the kernel (``sendfile``) where possible."""
    offset = 0
    try:
        while sent := os.sendfile(dst.fileno(), src.fileno(), offset, 1 << 30):
            offset += sent
    except OSError:
        if offset:
            raise
        shutil.copyfileobj(src, dst, 1 << 20)  # no sendfile between these two files


def _wait_quiet(path: Path, quiet: float) -> None:
    last = None
    while True:
        st = os.stat(path)
        key = (st.st_size, st.st_mtime_ns)
        if key == last:
            return
        last = key
        time.sleep(quiet)
