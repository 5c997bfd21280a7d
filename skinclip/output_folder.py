"""The one contract of every folder a command writes (train.py's output_dir, evaluate's and predict's --out).

* **A lock** (`LOCK_NAME`) is held while a command writes: a second command into the same folder is refused with
  the holder named (pid, host, command, start time). A lock whose process is gone (same host, pid dead or reused
  by another program) is stale and taken over with a warning.
* **A manifest** (`MANIFEST_NAME`) lists every file the project wrote into the folder, with its size and
  modification time. Replacing an earlier run deletes exactly those files (and the folders they leave empty),
  never anything by its name alone: a user's file put beside them, or into one of their folders, survives.
  A listed file changed since it was written is kept and reported.
* **No write through a symlink**: a symlink in the folder at a name the command writes is refused before anything
  is written, so no write lands outside the folder.
* **Atomic writes** (`atomic_write_bytes`, `atomic_write_text`): written beside, flushed, renamed into place; a
  failure leaves the previous file as it was.
* **A replaced run comes back if its replacement fails** (`PreviousRun`): the files an overwrite replaces (those
  the manifest lists) are moved into `ASIDE_NAME` while the new run writes, deleted once it has finished, and
  moved back, with the failed run's files deleted, when it fails (a full disk half-way through a checkpoint).

Used as ``with OutputFolder(path, "train.py") as folder: ...``; ``folder.record()`` updates the manifest (also
called on exit, whatever the outcome, so the files of a failed run are known to the next one).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from skinclip.errors import UserError

logger = logging.getLogger(__name__)

LOCK_NAME = ".skinclip.lock"
MANIFEST_NAME = ".skinclip-manifest.json"
ASIDE_NAME = ".skinclip-previous-run"  # the replaced run's files while its replacement runs (`PreviousRun`)
CONTROL_FILES = frozenset({LOCK_NAME, MANIFEST_NAME})

# The output folder of the command now running in this process, named by `skinclip.errors` when an OS error
# (a full disk inside a library) does not name its own file.
current_folder: Path | None = None


@contextlib.contextmanager
def writing_into(path: str | Path):
    """Names ``path`` as the folder being written, for OS errors that do not name their file (a full disk found
    when a library closes its buffered file)."""
    global current_folder
    previous, current_folder = current_folder, Path(path)
    try:
        yield
    except BaseException as error:
        # Read when the error is reported, after this block has ended: the innermost folder wins.
        if getattr(error, "output_folder", None) is None:
            with contextlib.suppress(AttributeError, TypeError):
                error.output_folder = Path(path)
        raise
    finally:
        current_folder = previous


# --------------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it: the old content survives any failure.

    A symlink at ``path`` is replaced by the file, never written through.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; the file a user gets must have the mode an ordinary open() would give it.
        os.fchmod(handle, 0o666 & ~current_umask())
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back: the OS offers no plain getter)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# --------------------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of stat; the name in parentheses may hold spaces


def _is_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return start is None or _process_start(pid) in (None, start)


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('command')}, started {holder.get('started')})"


def acquire_lock(folder: Path, command: str) -> Path:
    """Create ``folder/LOCK_NAME`` holding who writes; a live holder is a UserError naming it."""
    lock = folder / LOCK_NAME
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "process_start": _process_start(os.getpid()),
        "command": command,
        "argv": sys.argv[:8],
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    for _ in range(3):
        # Written whole beside, then linked into place: link() fails if the lock exists, so two commands never
        # both hold it, and a reader never sees a half-written lock.
        handle, temporary = tempfile.mkstemp(prefix=".skinclip.lock.", dir=folder)
        try:
            with os.fdopen(handle, "w") as stream:
                json.dump(holder, stream)
            os.link(temporary, lock)
            return lock
        except FileExistsError:
            pass
        finally:
            os.unlink(temporary)
        other = _read_lock(lock)
        if other is None:
            continue  # released meanwhile
        if other.get("host") == holder["host"] and isinstance(other.get("pid"), int):
            if not _is_alive(other["pid"], other.get("process_start")):
                _take_over_stale(lock, other)
                continue
        raise UserError(
            f"output folder {folder} is in use by {_describe(other)}; wait for it to finish or choose another "
            f"folder (if that process is gone, delete {lock})"
        )
    raise UserError(f"could not take the lock {lock}: other commands keep taking it; try again")


def _read_lock(lock: Path) -> dict | None:
    try:
        content = json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        content = None
    return content if isinstance(content, dict) else {"pid": None, "host": "?", "command": f"unreadable {lock}"}


def _take_over_stale(lock: Path, holder: dict) -> None:
    # Renamed away first: of two commands finding the same stale lock, only one rename succeeds.
    stale = lock.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.replace(lock, stale)
        stale.unlink()
        logger.warning("taking over the lock of %s: that process is gone", _describe(holder))
        print(f"warning: {lock} was left by {_describe(holder)}, which is gone; taking it over", file=sys.stderr)


# --------------------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------------------


def _stamp(path: Path) -> list[int]:
    info = path.lstat()
    return [info.st_size, info.st_mtime_ns]


def _walk_files(folder: Path) -> dict[str, list[int]]:
    """Every regular file under ``folder`` (symlinks not followed) → [size, mtime_ns], by relative POSIX path."""
    files = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
        if root == os.fspath(folder):
            dirs[:] = [d for d in dirs if d != ASIDE_NAME]  # not this run's: the run it replaces
        for name in names:
            path = Path(root, name)
            if path.is_symlink() or not path.is_file():
                continue
            relative = path.relative_to(folder).as_posix()
            if relative in CONTROL_FILES or (name.startswith(".skinclip.lock.")):
                continue
            files[relative] = _stamp(path)
    return files


def read_manifest(folder: str | Path) -> dict[str, list[int]]:
    """The files the project wrote into ``folder`` (relative path → [size, mtime_ns]); {} without a manifest."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file() or path.is_symlink():
        return {}
    try:
        content = json.loads(path.read_text())
        files = content["files"]
        if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and len(v) == 2 and all(isinstance(n, int) for n in v)
            for k, v in files.items()
        ):
            raise ValueError("'files' must map relative paths to [size, mtime_ns]")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(
            f"{path} is not a valid SkinCLIP-VL manifest ({error}); delete the folder's contents yourself or "
            "choose another folder"
        ) from error
    return {name: stamp for name, stamp in files.items() if _inside(name)}


def _inside(relative: str) -> bool:
    parts = Path(relative).parts
    return bool(parts) and not Path(relative).is_absolute() and ".." not in parts


def _unchanged(folder: Path, relative: str, stamp: list[int]) -> bool:
    path = folder / relative
    try:
        return path.is_file() and not path.is_symlink() and _stamp(path) == stamp and _no_symlink_above(folder, path)
    except OSError:
        return False


def _no_symlink_above(folder: Path, path: Path) -> bool:
    current = path.parent
    while current != folder:
        if current.is_symlink():
            return False
        current = current.parent
    return True


def owned_and_foreign(folder: str | Path) -> tuple[list[str], list[str]]:
    """(files the manifest lists and that are unchanged, every other file or symlink) under ``folder``."""
    folder = Path(folder)
    listed = read_manifest(folder)
    owned = sorted(name for name, stamp in listed.items() if _unchanged(folder, name, stamp))
    foreign = []
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = Path(root, name)
            relative = path.relative_to(folder).as_posix()
            if relative in CONTROL_FILES or name.startswith(".skinclip.lock."):
                continue
            if path.is_symlink() or (path.is_file() and relative not in owned):
                foreign.append(relative)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
    return owned, sorted(foreign)


def _delete_files(folder: Path, files: list[str]) -> list[str]:
    """Delete these files (relative to ``folder``), then each folder they leave empty; returns what was deleted
    (folders with a trailing ``/``)."""
    for relative in files:
        (folder / relative).unlink()
    return files + [removed.relative_to(folder).as_posix() + "/" for removed in _prune_empty_folders(folder, files)]


def _write_manifest(folder: Path, files: dict[str, list[int]]) -> None:
    content = {"written_by": "SkinCLIP-VL", "files": dict(sorted(files.items()))}
    atomic_write_text(folder / MANIFEST_NAME, json.dumps(content, indent=1) + "\n")


class PreviousRun:
    """The files of the run an overwrite replaces, set aside (`ASIDE_NAME`) until the new run has finished.

    Deleting them first (so that the two runs' outputs cannot mix) lost the only good run whenever the new one
    failed, e.g. on a full disk (issue 22). ``with PreviousRun(folder, files):`` moves them aside (renames: no
    space needed), and on leaving deletes them if the block finished, or else deletes what the failed run wrote
    and moves them back. The manifest follows by itself (`OutputFolder.record` lists what is there when the
    command ends). A folder left by a run killed in between is named, never guessed at.
    """

    def __init__(self, folder: OutputFolder, files: Iterable[str]):
        self.folder = folder
        self.files = sorted(files)
        self.aside = folder.path / ASIDE_NAME

    def __enter__(self) -> PreviousRun:
        if self.aside.exists() or self.aside.is_symlink():
            raise UserError(
                f"{self.aside} holds the files of a run that an overwrite set aside and did not finish (it was "
                "killed): move them back into the folder, or delete it if the run there is not wanted"
            )
        if self.files:
            _move_files(self.folder.path, self.aside, self.files)
            self.folder.forget_removed(self.files)
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if not self.files:
            return
        if kind is None:
            shutil.rmtree(self.aside)
            return
        try:
            self._give_back()
        except OSError as failure:  # the new run's error is the one reported; this one is said beside it
            logger.error("could not move the previous run back from %s: %s", self.aside, failure)
        else:
            logger.warning("the run did not finish: %s holds the previous run's files again", self.folder.path)

    def _give_back(self) -> None:
        # No manifest write here: the disk may still be full; record() on exit lists what is there.
        self.folder.forget_removed(_delete_files(self.folder.path, self.folder.written_since_start()))
        _move_files(self.aside, self.folder.path, self.files)
        shutil.rmtree(self.aside)


def _prune_empty_folders(root: Path, files: Iterable[str]) -> list[Path]:
    """Remove the folders above these files (relative to ``root``) that are now empty, deepest first; the removed."""
    parents, removed = set(), []
    for relative in files:
        parent = (root / relative).parent
        while parent != root:
            parents.add(parent)
            parent = parent.parent
    for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty: it holds something the project did not write
            parent.rmdir()
            removed.append(parent)
    return removed


def _move_files(source: Path, target: Path, files: Iterable[str]) -> None:
    """Rename each relative path from ``source`` to ``target`` (same file system), then prune emptied folders."""
    for relative in files:
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source / relative, destination)
    _prune_empty_folders(source, files)


# --------------------------------------------------------------------------------------------------------
# Symlinks
# --------------------------------------------------------------------------------------------------------


def symlinks_in_the_way(folder: str | Path, writes_to: Iterable[str] | None = None) -> list[str]:
    """Symlinks under ``folder`` (not followed) that a write could go through: all of them, or only those whose
    top-level name is in ``writes_to``."""
    folder = Path(folder)
    names = None if writes_to is None else set(writes_to)
    found = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root, name)
            relative = path.relative_to(folder)
            if path.is_symlink() and (names is None or relative.parts[0] in names):
                found.append(f"{relative.as_posix()} -> {os.readlink(path)}")
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
    return sorted(found)


def refuse_symlinks(folder: str | Path, writes_to: Iterable[str] | None = None) -> None:
    found = symlinks_in_the_way(folder, writes_to)
    if found:
        raise UserError(
            f"{folder} holds symlinks that this command would write through, to files outside the folder: "
            f"{', '.join(found[:3])}{', ...' if len(found) > 3 else ''}; remove them or choose another folder"
        )


# --------------------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------------------


class OutputFolder:
    """Lock, manifest and symlink guard of one command's output folder (see the module docstring).

    ``holds_lock=False`` (the other processes of a multi-process launch) does nothing but name the folder.
    """

    def __init__(self, path: str | Path, command: str, holds_lock: bool = True):
        self.path = Path(path)
        self.command = command
        self.holds_lock = holds_lock
        self._created = False
        self._lock: Path | None = None
        self._before: dict[str, list[int]] = {}

    def __enter__(self) -> OutputFolder:
        self._naming = writing_into(self.path)
        self._naming.__enter__()
        if not self.holds_lock:
            return self
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"output folder {self.path} is a file, not a folder")
        if not self.path.exists():
            self.path.mkdir(parents=True)
            self._created = True
        try:
            self._lock = acquire_lock(self.path, self.command)
            self._before = _walk_files(self.path)
        except BaseException:
            self._remove_if_created_and_empty()
            self._naming.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._naming.__exit__(*exc_info)  # names this folder on an exception passing through
        if not self.holds_lock or self._lock is None:
            return
        try:
            self.record()
        except OSError as error:
            logger.warning("could not update %s: %s", self.path / MANIFEST_NAME, error)
        finally:
            with contextlib.suppress(OSError):
                self._lock.unlink()
            self._remove_if_created_and_empty()

    def _remove_if_created_and_empty(self) -> None:
        if self._created:
            with contextlib.suppress(OSError):
                if not [p for p in self.path.iterdir() if p.name != MANIFEST_NAME]:
                    with contextlib.suppress(FileNotFoundError):
                        (self.path / MANIFEST_NAME).unlink()
                    self.path.rmdir()

    def record(self) -> None:
        """Add to the manifest every file this command created or changed (compared with when it started)."""
        if not self.holds_lock or not self.path.is_dir():
            return
        listed = read_manifest(self.path)
        now = _walk_files(self.path)
        changed = {name: stamp for name, stamp in now.items() if self._before.get(name) != stamp}
        kept = {name: stamp for name, stamp in listed.items() if name in now and name not in changed}
        files = {**kept, **changed}
        if files or listed:
            _write_manifest(self.path, files)

    def written_since_start(self) -> list[str]:
        """The files this command created or changed in the folder (compared with when it started)."""
        return sorted(name for name, stamp in _walk_files(self.path).items() if self._before.get(name) != stamp)

    def forget_removed(self, deleted: Iterable[str]) -> None:
        for relative in deleted:
            self._before.pop(relative, None)
