"""CSV rows with the file line each starts on, and what to tell a user when a CSV cannot be read.

Lines are the file's own, from 1 (the header is line 1): a quoted field may span several lines, so the n-th row
is not on line n + 1, and `csv.reader.line_num` after a row is the line it *ends* on (after a failure, often the
line before the broken row). Blank lines are skipped, as pandas and `csv.DictReader` skip them. Used by the
converters' `read_csv` (after pandas has refused a file: pandas names a record number or a 0-based row, not the
file line) and by predict's CSV of cases, which both say which line failed and how many rows were not read.
"""

from __future__ import annotations

import contextlib
import csv
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


class UnreadableRow(Exception):
    """A row `csv` cannot parse; ``line`` is the file line it starts on."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


def rows_with_lines(lines: Iterable[str], **reader_options) -> Iterator[tuple[int, list[str]]]:
    """``(first line, fields)`` of each non-blank row of ``lines`` (an open text file or a list of lines)."""
    reader = csv.reader(lines, **reader_options)
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise UnreadableRow(start, str(error)) from error
        if fields:
            yield start, fields


def rows_after(lines: Iterable[str], line: int) -> int:
    """How many rows of a whole file (``lines``) start after the row starting on ``line``.

    Read again from the start without the field size limit, so that the rest of a row `csv` gave up on half-way
    (a field over the limit) is not taken for rows of its own.
    """
    with no_field_size_limit():
        reader = csv.reader(lines)
        rows = 0
        while True:
            start = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                return rows
            except csv.Error:  # past the row that failed: counted, and the reader goes on with the next line
                fields = ["unreadable"]
            rows += bool(fields) and start > line


@contextlib.contextmanager
def no_field_size_limit():
    """pandas reads fields of any size; `csv` refuses those over 128 KiB. Lifted while a file is diagnosed."""
    previous = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


@dataclass
class CsvProblem:
    """The first row that stops a CSV from being read, and how much of the file is lost with it."""

    line: int  # the file line the row starts on
    reason: str
    rows_not_read: int  # that row and every row after it
    last_line: int  # the file's last line

    def __str__(self) -> str:
        if self.rows_not_read == 1:
            span = f"lines {self.line}-{self.last_line}" if self.last_line > self.line else f"line {self.line}"
            lost = f"not read: that row ({span})"
        else:
            lost = f"not read: that row and the {self.rows_not_read - 1} after it (lines {self.line}-{self.last_line})"
        return f"line {self.line}: {self.reason}; {lost}"


def find_problem(text: str) -> CsvProblem | None:
    """The first row of ``text`` (a whole CSV file) that pandas' reader refuses, or None if every row reads.

    Found as pandas finds them: a row with more fields than the header (fewer are filled with blanks), a quoted
    field never closed (it swallows the rest of the file), a row `csv` cannot parse at all.
    """
    lines = text.splitlines(keepends=True)
    last_line = len(lines)
    rows: list[tuple[int, list[str]]] = []
    with no_field_size_limit():
        try:
            for line, fields in rows_with_lines(lines):
                rows.append((line, fields))
                if len(fields) > len(rows[0][1]):
                    header = len(rows[0][1])
                    reason = f"{len(fields)} fields where the header (line {rows[0][0]}) has {header}"
                    return CsvProblem(line, reason, 1 + rows_after(lines, line), last_line)
        except UnreadableRow as error:
            return CsvProblem(error.line, error.reason, 1 + rows_after(lines, error.line), last_line)
        if rows and _opens_a_quote_never_closed(lines[rows[-1][0] - 1 :]):
            reason = "a quoted field opened in this row is never closed, so it runs to the end of the file"
            return CsvProblem(rows[-1][0], reason, 1, last_line)
    return None


def _opens_a_quote_never_closed(lines: list[str]) -> bool:
    try:
        for _ in csv.reader(lines, strict=True):
            pass
    except csv.Error as error:
        return "unexpected end of data" in str(error)
    return False
