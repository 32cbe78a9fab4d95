"""Temporary files and directories that an interrupted run cannot leave looking complete.

Every long write goes to a hidden sibling named `.{target}.{pid}.{random}{suffix}` and is
renamed over the target only once it is complete and flushed to disk. A SIGKILL (or a power
cut) can still leave that temporary behind, so the next run removes the ones whose process
is gone: the pid in the name tells a live concurrent writer from a dead one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def temp_prefix(target: Path) -> str:
    """The mkstemp/mkdtemp prefix for temporaries of target written by this process."""
    return f".{target.name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except (OverflowError, ValueError, OSError):
        return False
    return True


def stale_temporaries(target: Path, suffix: str) -> list[Path]:
    """Temporaries of target (`.{name}.*{suffix}` beside it) whose writer is no longer alive.

    Names without a pid (written before pids were recorded) count as stale.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return []
    prefix = f".{target.name}."
    stale = []
    for entry in target.parent.iterdir():
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        middle = name[len(prefix) : len(name) - len(suffix)]
        pid_text, dot, _ = middle.partition(".")
        if dot and pid_text.isdigit() and _pid_alive(int(pid_text)):
            continue
        stale.append(entry)
    return sorted(stale)


def remove_stale_temporaries(target: Path, suffix: str, log=None) -> list[Path]:
    """Delete what stale_temporaries finds, logging each; returns the removed paths."""
    removed = []
    for entry in stale_temporaries(target, suffix):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
        if log is not None:
            log(f"removed {entry.name}, left behind by an interrupted run")
    return removed


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's contents to disk (directories: their entries)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. directories cannot be opened on Windows: nothing to flush there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and platforms) do not support fsync on directories
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under root, then every directory, deepest first."""
    root = Path(root)
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(directory) / name)
        fsync_path(Path(directory))


def replace_directory(tmp: Path, out_dir: Path) -> None:
    """Move a finished temporary directory to out_dir, replacing what was there."""
    if not out_dir.exists():
        tmp.rename(out_dir)
        fsync_path(out_dir.parent)
        return
    # Two renames, not one: a directory cannot atomically replace another. A kill between
    # them leaves the previous bundle as .old, which the next export moves back.
    old = Path(tempfile.mkdtemp(prefix=temp_prefix(out_dir), suffix=".old", dir=out_dir.parent))
    old.rmdir()
    out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except BaseException:
        old.rename(out_dir)
        raise
    fsync_path(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)
