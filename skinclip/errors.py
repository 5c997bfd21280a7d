"""User errors and the one-line error contract of every entry point.

A user error (a bad config value, a missing file, an unreadable CSV) is raised as :class:`UserError` with a
message that names the field, file or row. Entry points wrap their ``main`` in :func:`run_entry_point`, which
prints ``error: <message>`` on one line and exits with :data:`EXIT_FATAL`; ``--debug`` shows the traceback.
An OS error (a full disk, a read-only folder, a name too long), also one wrapped by a library, is one such line
too, naming the path and the fix (`describe_os_error`).
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Callable, Sequence

EXIT_OK = 0
EXIT_FATAL = 1  # nothing (or nothing trustworthy) was produced
EXIT_PARTIAL = 3  # a batch ran, but some inputs failed (each reported, counted in the summary)


class UserError(ValueError):
    """Bad input from the user: its message names what is wrong and where (field, file or row)."""


def run_entry_point(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; user errors become one line on stderr and a non-zero exit code.

    ``--debug`` anywhere in ``argv`` is removed before ``main`` sees it and lets the traceback through.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv = [arg for arg in argv if arg != "--debug"]
    try:
        code = main(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as error:
        if debug:
            raise
        print(f"error: {_one_line(str(error))}", file=sys.stderr)
        return EXIT_FATAL
    except Exception as error:
        # A full disk, a read-only or unwritable folder, an over-long name: one line naming the path and the fix,
        # wherever it happened (also inside a library that wraps the OS error in its own exception).
        message = describe_os_error(error)
        if message is None or debug:
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_FATAL
    # main may return its results (train/evaluate return their metrics): only an int is an exit code.
    return int(code) if isinstance(code, int) else EXIT_OK


# errno → (what happened, what to do); the path is put between them.
_OS_ERRORS = {
    errno.ENOSPC: ("no space left on the device while writing {path}", "free some space or write to another disk"),
    errno.EDQUOT: ("disk quota exceeded while writing {path}", "free some space or write to another disk"),
    errno.EROFS: ("{path} is on a read-only file system", "choose a writable folder"),
    errno.EACCES: ("permission denied: {path}", "make it accessible to this user or choose another path"),
    errno.EPERM: ("operation not permitted: {path}", "make it accessible to this user or choose another path"),
    errno.ENAMETOOLONG: (
        "file name too long: {path}",
        "choose shorter names (most file systems allow 255 bytes per name)",
    ),
}
_DESTINATION_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})  # only ever about the path written
# Libraries that wrap an OS error in their own exception keep only its text (safetensors: "os error 28").
_OS_ERROR_TEXTS = (
    (re.compile(r"No space left on device|os error 28\b|StorageFull"), errno.ENOSPC),
    (re.compile(r"Disk quota exceeded|os error 122\b"), errno.EDQUOT),
    (re.compile(r"Read-only file system|os error 30\b"), errno.EROFS),
)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _os_error_in(error: BaseException) -> tuple[int, str | None] | None:
    """(errno, path) of the OS error behind ``error`` (itself, its cause or context, or named in its text)."""
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current.errno, _path_of(current)
        current = current.__cause__ or current.__context__
    for pattern, number in _OS_ERROR_TEXTS:
        if pattern.search(str(error)):
            return number, None
    return None


def _path_of(error: OSError) -> str | None:
    """The path an OS error is about. A copy (`shutil.copyfile`) names its source first and its destination
    second: a full or read-only disk is the destination's, which is then the one named."""
    first, second = error.filename, error.filename2
    if error.errno in _DESTINATION_ERRORS and second not in (None, ""):
        first, second = second, first
    path = first if first not in (None, "") else second
    return None if path in (None, "") else os.fsdecode(path)


def describe_os_error(error: BaseException) -> str | None:
    """One line for an OS error (``error:`` is put before it): what happened, to which path, and the fix.

    None when ``error`` has no OS error behind it. A path the OS did not report is taken to be the output
    folder being written when it was raised (`skinclip.output_folder.writing_into`).
    """
    found = _os_error_in(error)
    if found is None:
        return None
    number, path = found
    if path is None:
        from skinclip import output_folder

        folder = getattr(error, "output_folder", None) or output_folder.current_folder
        path = f"a file in {folder}" if folder is not None else "a file (the OS did not say which)"
    if number not in _OS_ERRORS:
        return _one_line(f"{os.strerror(number)}: {path}")
    what, fix = _OS_ERRORS[number]
    if number == errno.ENAMETOOLONG and path and not path.startswith("a file"):
        longest = max(path.split(os.sep), key=lambda part: len(os.fsencode(part)))
        what += f" (a name of {len(os.fsencode(longest))} bytes)"
    return _one_line(what.format(path=path) + f"; {fix}")
