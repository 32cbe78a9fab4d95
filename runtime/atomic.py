"""Files and directories written so that an interrupted run cannot leave them looking complete.

atomic_file and atomic_directory are the one way this project writes a result: the runtime's
PNGs, training's checkpoints and metrics, downloaded data, export's bundles and vae-eval's
reports.

Every long write goes to a hidden sibling named `.{target}.{pid}.{random}{suffix}` and is
renamed over the target only once it is complete and flushed to disk. A SIGKILL (or a power
cut) can still leave that temporary behind, so the next run removes the ones whose process
is gone: the pid in the name tells a live concurrent writer from a dead one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


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


def resolve_directory(path: Path) -> Path:
    """The directory that path names, through symbolic links and "." (it need not exist yet);
    ValueError naming path where its links never end in one."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError):  # RuntimeError up to Python 3.12, OSError after
        raise ValueError(f"{path}: symbolic link loop; expected a directory or a link to "
                         "one") from None


@contextlib.contextmanager
def atomic_file(target: Path, suffix: str = ".tmp") -> Iterator[BinaryIO]:
    """A binary file to write target's new content into (its .name is the temporary path).

    When the block ends normally the file is flushed to disk and renamed over target; when it
    raises, the temporary is removed and target is left as it was.
    """
    target = Path(target)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {target.parent}")
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target), suffix=suffix, dir=target.parent)
    os.close(fd)
    try:
        with open(tmp, "wb") as handle:  # opened by name, so handle.name is the path
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(target.parent)


@contextlib.contextmanager
def atomic_directory(out_dir: Path) -> Iterator[Path]:
    """A temporary sibling directory to fill with out_dir's new content.

    When the block ends normally everything in it is flushed to disk and it replaces out_dir
    (replace_directory); when it raises, it is removed and out_dir is left as it was. A
    symbolic link (bundles/current -> v3) stays a link, to the new content.
    """
    out_dir = resolve_directory(out_dir)  # the directory itself: through a link, or "."
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out_dir), suffix=".partial",
                                dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; bundles and reports are meant to be shared
    try:
        yield tmp
        fsync_tree(tmp)
        replace_directory(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_directory(out_dir: Path, log=print) -> None:
    """Undo what a killed atomic_directory left beside out_dir: its half-written `.partial`
    directory, and, if it died between replace_directory's two renames, the previous
    directory parked as `.old` (moved back, since out_dir is then missing)."""
    out_dir = resolve_directory(out_dir)  # where atomic_directory works
    remove_stale_temporaries(out_dir, ".partial", log)
    parked = stale_temporaries(out_dir, ".old")
    if parked and not out_dir.exists():
        newest = max(parked, key=lambda p: p.stat().st_mtime)
        newest.rename(out_dir)
        log(f"restored the previous {out_dir} from {newest.name} (a run was interrupted "
            "while replacing it)")
    remove_stale_temporaries(out_dir, ".old", log)


@contextlib.contextmanager
def exclusive(target: Path, log=None) -> Iterator[None]:
    """Hold an exclusive lock on target (a lock file `.{name}.lock` beside it) for the block:
    two runs that replace one target (`vae-run add`, `remove`, `vae-export --force`) take
    turns instead of one silently dropping the other's change, or mixing its files with the
    other's. Advisory (flock): readers are not held up. log, when given, hears that the
    run waits for another."""
    import fcntl

    target = resolve_directory(target)  # every spelling of it (a link, ".") takes one lock
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log is not None:
                log(f"waiting for another run that changes {target} to finish")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
