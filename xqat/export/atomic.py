"""Atomic output files: a failed export never leaves a partial .tflite (or SavedModel) behind.

Everything is written to a temporary sibling of the target, flushed to disk and then renamed over
the target in one step, so readers see either the old file or the complete new one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import ExportError

__all__ = ["check_writable", "atomic_write_bytes", "atomic_directory"]


def check_writable(path: str | os.PathLike, *, what: str = "output file", directory: bool = False) -> Path:
    """Fail fast, before any slow work, if `path` cannot be written: returns the absolute path.

    Probes by creating (and removing) a temporary file in the target's folder, which is the only
    check that sees permissions, read-only mounts and full disks alike. `directory`: the target is a
    folder (an existing one will be replaced), not a file.
    """
    p = Path(path).expanduser().absolute()
    if directory and p.exists() and not p.is_dir():
        raise ExportError(f"{p}: exists and is not a folder; choose another path for the {what}")
    if not directory and p.is_dir():
        raise ExportError(f"{p}: is a directory; give a file name for the {what}, e.g. {p / 'model.tflite'}")
    parent = p.parent
    if not parent.is_dir():
        raise ExportError(f"{p}: folder {parent} does not exist; create it or choose another {what} path")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ExportError(f"{p}: cannot write the {what} into {parent} ({e.strerror or e}); "
                          "check the folder's permissions or choose another path") from e
    return p


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every OS or filesystem lets a folder be opened for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp file in the same folder, fsync, os.replace)."""
    p = check_writable(path)
    tmp = p.parent / f".{p.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # O_EXCL: never clobber; mode 0o666 so the umask gives the file the usual permissions
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(p.parent)
    return p


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to `path`; on success it replaces `path` (an existing
    folder there is swapped out and removed), on error it is deleted and `path` is left untouched."""
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise ExportError(f"{p}: exists and is not a folder; choose another SavedModel path")
    if not p.parent.is_dir():
        raise ExportError(f"{p}: folder {p.parent} does not exist; create it first")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent))
    except OSError as e:
        raise ExportError(f"{p}: cannot create a folder in {p.parent} ({e.strerror or e})") from e
    try:
        yield tmp
        old = None
        if p.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".old", dir=p.parent))
            os.replace(p, old / p.name)
        try:
            os.replace(tmp, p)
        except BaseException:
            if old is not None:  # put the previous folder back
                os.replace(old / p.name, p)
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(p.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
