"""User errors and the one-line error contract of every entry point.

A user error (a bad config value, a missing file, an unreadable CSV) is raised as :class:`UserError` with a
message that names the field, file or row. Entry points wrap their ``main`` in :func:`run_entry_point`, which
prints ``error: <message>`` on one line and exits with :data:`EXIT_FATAL`; ``--debug`` shows the traceback.
"""

from __future__ import annotations

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
    except (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FATAL
    # main may return its results (train/evaluate return their metrics): only an int is an exit code.
    return int(code) if isinstance(code, int) else EXIT_OK
