"""Directories that appear whole or not at all: write a temporary sibling, fsync it, rename it in.

POSIX cannot swap two non-empty directories in one step, so replacing one takes two renames: the
old version moves aside to `.NAME.old-*`, then the new one moves in. A crash between the two
leaves no NAME; `recover_directory` (called by every load and save of NAME) moves the old version
back, so a reader always finds a complete old or new directory. Whatever a crash left behind
(`.NAME.tmp-*`, `.NAME.old-*`) is removed by the next save of NAME. One writer per directory at a
time: concurrent writers of the same NAME need a lock (see assets.py).
"""

from __future__ import annotations

import glob
import os
import shutil
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import CheckpointError


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (renames, new files) durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _leftovers(path: Path, kind: str) -> list[Path]:
    """`.NAME.{kind}-*` siblings of `path`, oldest first (the names carry a nanosecond timestamp)."""
    found = path.parent.glob(f".{glob.escape(path.name)}.{kind}-*")
    return sorted(found, key=lambda p: p.name.rsplit("-", 2)[-2:])


def _aside(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}")


def recover_directory(path: str | Path) -> bool:
    """If a replacement of `path` was interrupted between its two renames, move the old version back.

    Returns True when it restored one (and warns); False when there was nothing to do.
    """
    path = Path(path)
    if path.exists() or not path.parent.is_dir():
        return False
    olds = [p for p in _leftovers(path, "old") if p.is_dir()]
    if not olds:
        return False
    try:
        os.rename(olds[-1], path)
    except OSError as e:
        raise CheckpointError(f"{path}: missing; an interrupted save left its previous version in "
                              f"{olds[-1]}, which could not be moved back ({e.strerror})") from None
    fsync_dir(path.parent)
    warnings.warn(f"{path}: an earlier save was interrupted; restored the previous version", stacklevel=2)
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _finish_tree(root: Path) -> None:
    """Give every file the user's umask (safetensors writes its files 0600) and make it durable."""
    mode = 0o666 & ~_umask()
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            os.chmod(path, mode)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


@contextmanager
def atomic_directory(path: str | Path, marker: str = "config.json") -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `path` only if the block succeeds.

    An existing `path` is replaced only when it is empty or holds `marker` (is itself one of ours):
    a typo must never wipe an unrelated directory. The directory and its files get the user's
    umask (not mkdtemp's 0700 or safetensors' 0600), and the parent is fsynced after the renames.
    """
    path = Path(path)
    recover_directory(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / marker).exists():
        raise CheckpointError(f"{path}: exists, is not empty and holds no {marker}; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in _leftovers(path, "tmp") + _leftovers(path, "old"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = _aside(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _finish_tree(tmp)
        if path.exists():
            old = _aside(path, "old")
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)  # put the previous version back before reporting the failure
                raise
            fsync_dir(path.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
