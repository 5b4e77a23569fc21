"""One run per output file: an exclusive lock that the OS releases when its holder dies.

``dymu thresholds`` (and :func:`dymu.finding.find_thresholds`) hold it on the checkpoint they write, so a second
run on the same output, which would share its resume state and lose one result, is refused at once.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

_held_locks: set[Path] = set()  # lock files this process holds (a nested output_lock is a no-op)


def lock_path(output: str | Path) -> Path:
    """The lock file of a run writing ``output`` (it guards ``output`` and its resume state)."""
    output = Path(output)
    return output.with_name(output.name + ".lock")


@contextmanager
def output_lock(output: str | Path, what: str = "dymu thresholds"):
    """Hold an exclusive lock on ``output`` (and the files named after it) while a run writes it.

    An ``fcntl.flock`` on ``<output>.lock``: the OS releases it when the holder dies however it dies, so a lock
    file left by a killed run is never stale. A second run is refused at once (ValueError naming the lock file and
    the holder, whose pid and command line are in the file). Re-entrant within one process. Where ``fcntl`` is
    missing (Windows), runs are not locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield None
        return
    path = lock_path(output).absolute()
    if path in _held_locks:  # the command took it before the model load; find_thresholds asks again
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 1000).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ValueError(
                f"{output} is being written by another run ({holder}; lock {path}): wait for it to finish, or give "
                "another --output"
            ) from None
        try:  # the holder before us may have removed the file after we opened it: lock the file at the path
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{what}, pid {os.getpid()}: {' '.join(sys.argv)[:300]}\n".encode())
    _held_locks.add(path)
    try:
        yield path
    finally:
        _held_locks.discard(path)
        try:
            path.unlink()  # while still locked, so no other run locks this file after we let go
        except FileNotFoundError:
            pass
        os.close(fd)
