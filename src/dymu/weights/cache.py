"""The weights cache of :mod:`dymu.weights`: where builds live, their markers, and the locks around a build.

``<root>/<name>/`` is one finished build, with :data:`MARKER` (written last) listing the size and SHA-256 of
every other file; ``.<name>.build-*`` is a build in progress (or left by a killed one) and ``.<name>.lock`` the
lock that serialises builds of one name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from dymu.weights.building import WeightSpec

MARKER = "dymu_build.json"
"""Name of the build marker, written last into a finished checkpoint directory."""

FORMAT_VERSION = 1
"""Bumped when the layout of a built directory changes: older builds are then rebuilt."""


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory that holds one sub-directory per built checkpoint.

    ``cache_dir`` wins when given; else ``$DYMU_HOME/weights``, ``$XDG_CACHE_HOME/dymu/weights``,
    ``~/.cache/dymu/weights``, first one set.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("DYMU_HOME"):
        return Path(os.environ["DYMU_HOME"]).expanduser() / "weights"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "dymu" / "weights"
    return Path.home() / ".cache" / "dymu" / "weights"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_table(directory: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under ``directory`` except the marker (all of them count: config too)."""
    table = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MARKER):
        table[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return table


def _read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _check(directory: Path, spec: WeightSpec, verify: bool) -> tuple[bool, str, dict[str, Any] | None]:
    """Whether ``directory`` holds a complete build of ``spec``: (ok, reason if not, marker).

    Sizes are always compared (catches truncation cheaply); ``verify`` also re-hashes every file.
    """
    if not directory.is_dir():
        return False, "not built", None
    marker = _read_marker(directory)
    if marker is None:
        return False, f"no valid {MARKER} (unfinished or foreign directory)", None
    if marker.get("format_version") != FORMAT_VERSION or marker.get("name") != spec.name:
        return False, f"{MARKER} is for another build format or name", marker
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return False, f"{MARKER} lists no files", marker
    for rel, meta in files.items():
        path = directory / rel
        if not path.is_file():
            return False, f"{rel} is missing", marker
        if path.stat().st_size != meta.get("size"):
            return False, f"{rel} has the wrong size", marker
        if verify and _sha256(path) != meta.get("sha256"):
            return False, f"{rel} does not match its checksum", marker
    return True, "", marker


@contextlib.contextmanager
def _build_lock(root: Path, name: str, *, blocking: bool = True) -> Iterator[bool]:
    """Serialise concurrent installs of one name (two test workers, two shells); yields whether the lock is held
    (always True when ``blocking``; without fcntl nothing is locked and True is yielded)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield True
        return
    try:
        fh = open(root / f".{name}.lock", "w")
    except OSError as err:
        if not blocking:
            yield False
            return
        raise ValueError(f"cannot create the lock file {root / f'.{name}.lock'}: {err.strerror or err}") from err
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process is building this name right now
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_cache_dir(root: Path, *, write: bool) -> None:
    """ValueError, naming the folder, when ``root`` cannot be the cache (a file) or, with ``write``, cannot be
    written (checked with ``os.access`` on it or its first existing parent, before any work)."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"weights cache {root} is not a directory (it is a file); give a folder with --cache-dir")
    if not write:
        return
    existing = root
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot create the weights cache {root}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"weights cache {existing} is not writable; give a writable folder with --cache-dir "
            "(or set DYMU_HOME / XDG_CACHE_HOME)"
        )


def _remove_stale_builds(root: Path, name: str) -> list[Path]:
    """Remove ``.NAME.build-*`` folders of interrupted builds. Call with the name's lock held: no build of
    ``name`` is running then, so every such folder is left over."""
    removed = []
    for path in root.glob(f".{name}.build-*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
