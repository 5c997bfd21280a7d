"""Metadata → prompt text for the converters, and offline-written descriptions.

The sentence itself (`describe_metadata`) and the metadata checks (`clean_age`, `clean_text`, ...) live in the
top-level ``metadata_skinclip.py``, which every checkpoint ships as remote code: a Hub user's processor then builds
exactly the sentence the converters wrote for training. They are re-exported here for the converters.

Offline descriptions: a file written once, offline (e.g. by an LLM rewriting the template text), can replace the
template per image so training never calls a model for it. Two formats are read by
`load_offline_descriptions`:

* JSON Lines (``.jsonl``): one object per line, ``{"image_id": "ISIC_0000000", "text": "..."}``;
* CSV (``.csv``): a header with the columns ``image_id`` and ``text``.

Ids must be unique and texts non-blank; an error names the file and the line.
"""

from __future__ import annotations

import json
from pathlib import Path

from metadata_skinclip import (  # noqa: F401  (re-exported: the converters import them from here)
    MAX_AGE,
    MAX_TEXT_CHARS,
    MIN_AGE,
    NEUTRAL_TEXT,
    MetadataIssue,
    age_problem,
    clean_age,
    clean_number,
    clean_text,
    describe_metadata,
    is_missing,
    to_float,
)
from skinclip.csv_rows import UnreadableRow, rows_after, rows_with_lines


def load_offline_descriptions(path) -> dict[str, str]:
    """Read offline-written descriptions (JSONL or CSV with ``image_id`` and ``text``) into ``{image_id: text}``."""
    path = Path(path)
    rows: list[tuple[int, dict]] = []
    if path.suffix.lower() in {".jsonl", ".json"}:
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}: line {line_number} is not valid JSON ({error})") from error
                if not isinstance(record, dict):
                    raise ValueError(f"{path}: line {line_number} is not a JSON object")
                rows.append((line_number, record))
    elif path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            # Each row with the line it starts on: a quoted text may span lines (enumerate counted rows).
            lines = rows_with_lines(handle)
            try:
                _, header = next(lines, (1, []))
                for column in ("image_id", "text"):
                    if column not in header:
                        raise ValueError(f"{path}: missing required column {column!r}")
                rows.extend((line_number, dict(zip(header, fields))) for line_number, fields in lines)
            except UnreadableRow as error:
                handle.seek(0)
                rest = rows_after(handle, error.line)
                raise ValueError(
                    f"{path}: line {error.line} is not a readable CSV row ({error.reason}); "
                    f"not read: that row and the {rest} after it"
                ) from error
    else:
        raise ValueError(f"{path}: offline descriptions must be .jsonl or .csv, got {path.suffix!r}")

    descriptions: dict[str, str] = {}
    for line_number, record in rows:
        image_id, text = record.get("image_id"), record.get("text")
        if is_missing(image_id) or text is None or not str(text).strip():
            raise ValueError(f"{path}: line {line_number} needs a non-empty 'image_id' and 'text'")
        image_id = str(image_id).strip()
        if image_id in descriptions:
            raise ValueError(f"{path}: line {line_number} repeats image_id {image_id!r}")
        descriptions[image_id] = str(text).strip()
    return descriptions
