"""Scratch folders of an export that never outlive it: removed on success, error, Ctrl-C and SIGTERM, and
swept on the next run when a process died without cleaning up (SIGKILL, power loss).

Each folder carries its owner's pid in its name (`xqat-onnx2tf-<pid>-<random>`); a folder whose process no
longer exists is stale. onnx2tf's scratch holds a full copy of the model, so leftovers add up quickly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["scratch_dir", "sweep_stale", "terminate_raises"]

PREFIX = "xqat-onnx2tf-"


def _pid_of(folder: Path, prefix: str) -> int | None:
    pid, sep, _ = folder.name[len(prefix):].partition("-")
    return int(pid) if sep and pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True  # cannot tell: keep the folder
    return True


def sweep_stale(base: str | os.PathLike | None = None, prefix: str = PREFIX) -> list[Path]:
    """Remove scratch folders under `base` (default: the temp folder) whose owning process is gone."""
    base = Path(base or tempfile.gettempdir())
    removed = []
    with contextlib.suppress(OSError):
        for d in base.glob(f"{prefix}*"):
            pid = _pid_of(d, prefix)
            if pid is None or pid == os.getpid() or _alive(pid) or not d.is_dir():
                continue
            shutil.rmtree(d, ignore_errors=True)
            if not d.exists():
                removed.append(d)
    return removed


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """While inside, SIGTERM raises SystemExit(143) so `finally` blocks (cleanup) run before the process ends.
    Only where Python allows it (main thread) and only if nobody installed a SIGTERM handler already."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    seen: list[int] = []

    def _terminate(signum, frame):
        seen.append(signum)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if seen:  # the SystemExit was swallowed on the way (a library catching BaseException, a C callback): end anyway
        raise SystemExit(128 + seen[0])


@contextlib.contextmanager
def scratch_dir(base: str | os.PathLike | None = None, prefix: str = PREFIX) -> Iterator[Path]:
    """A fresh scratch folder (in `base`, default the temp folder), removed when the block ends in any way
    short of SIGKILL; stale folders of dead processes are swept first."""
    sweep_stale(base, prefix)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=base))
    try:
        with terminate_raises():
            yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
