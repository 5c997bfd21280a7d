"""Metadata → the prompt sentence the model was trained on: deterministic, bias-free, missing values left out.

Shipped beside ``processing_skinclip.py`` in every checkpoint (remote code), so that a Hub user's processor builds
exactly the sentence training saw: ``SkinClipVLProcessor(images, metadata=[{"age": 55, "sex": "male", "site":
"posterior torso"}])``. The dataset converters (``datasets_scripts``), ``predict.py`` and the demo call the same
`describe_metadata`; this is the one place metadata values are checked and worded.

The template reads like "A lesion on the posterior torso of a male patient aged about 55." Only the fields a
clinician has before the diagnosis go in (age, sex, body site, and a few observations passed as ``extra``);
converters never pass label-derived columns here (see README.md, "Leak columns").

Standard library only: remote code must import on any machine that has transformers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

NEUTRAL_TEXT = "A skin lesion."
MIN_AGE, MAX_AGE = 0.0, 120.0  # years; anything else is a typo or a unit mix-up, never a patient
MAX_TEXT_CHARS = 100  # a metadata value (site, sex, an observation) longer than this is cut: it feeds a prompt

_UNKNOWN = {"", "unknown", "unk", "nan", "none", "null", "n/a", "na", "missing", "?"}

_SEX_WORDS = {"male": "male", "m": "male", "man": "male", "female": "female", "f": "female", "woman": "female"}

# Readable wording for the site names the datasets use (ISIC "head/neck", Derm7pt "head neck", ...).
_SITE_WORDS = {
    "head/neck": "head or neck",
    "head neck": "head or neck",
    "oral/genital": "oral or genital area",
    "palms/soles": "palms or soles",
    "acral": "acral skin",
    "genital areas": "genital area",
    "genital": "genital area",
}

# Phrasing of the optional extra observations; other keys are written as "<key with spaces>: <value>."
_EXTRA_TEMPLATES = {
    "elevation": "The lesion is {value}.",
    "diameter_mm": "Its longest diameter is about {value} mm.",
}


def is_missing(value) -> bool:
    """True for None, NaN, blank strings and 'unknown'-like placeholders."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return str(value).strip().lower() in _UNKNOWN


def to_float(value) -> float | None:
    """A finite number, or None for a missing, non-numeric, NaN or infinite value."""
    if is_missing(value):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


# ------------------------------------------------------------------ metadata validation (the one place)


@dataclass(frozen=True)
class MetadataIssue:
    """A metadata value that was left out or cut, and where it came from (``row``: file and line or image id)."""

    row: str
    field: str
    value: str
    problem: str

    def __str__(self) -> str:
        return f"{self.row}: {self.field} {self.value!r} {self.problem}"


def _shown(value, limit: int = 40) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def age_problem(value) -> str | None:
    """Why ``value`` is not a usable age (None when it is usable or simply missing)."""
    if is_missing(value):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return "is not a number"
    if not math.isfinite(number):
        return "is not a finite number"
    if not MIN_AGE <= number <= MAX_AGE:
        return f"is outside {MIN_AGE:g}-{MAX_AGE:g} years"
    return None


def clean_age(value, row: str = "", issues: list | None = None, field: str = "age") -> float | None:
    """A finite age in 0-120 years, or None; a present but unusable value is recorded in ``issues`` (left out)."""
    problem = age_problem(value)
    if problem is not None:
        if issues is not None:
            issues.append(MetadataIssue(row, field, _shown(value), problem + "; left out"))
        return None
    return None if is_missing(value) else float(value)


def clean_text(
    value, row: str = "", issues: list | None = None, field: str = "text", max_chars: int = MAX_TEXT_CHARS
) -> str | None:
    """One line of printable text, at most ``max_chars`` long, or None when missing; a cut is recorded."""
    if is_missing(value):
        return None
    text = re.sub(r"\s+", " ", "".join(c if c.isprintable() else " " for c in str(value))).strip()
    if len(text) > max_chars:
        if issues is not None:
            issues.append(MetadataIssue(row, field, _shown(text), f"is longer than {max_chars} characters; cut"))
        text = text[:max_chars].rstrip()
    return text or None


def clean_number(value, row: str = "", issues: list | None = None, field: str = "value") -> float | None:
    """A finite number or None; a present but non-numeric or infinite value is recorded in ``issues``."""
    number = to_float(value)
    if number is None and not is_missing(value) and issues is not None:
        issues.append(MetadataIssue(row, field, _shown(value), "is not a finite number; left out"))
    return number


def _format_age(age) -> str | None:
    if age_problem(age) is not None or is_missing(age):
        return None
    return str(round(float(age)))


def _format_number(value) -> str | None:
    number = to_float(value)
    if number is None or not 0 <= number <= 1e6:  # not a length: left out rather than printed as 300 digits
        return None
    return f"{number:.1f}".rstrip("0").rstrip(".")


def describe_metadata(age=None, sex=None, site=None, **extra) -> str:
    """Prompt sentence from the known metadata; unknown fields are omitted, never guessed.

    >>> describe_metadata(age=55, sex="male", site="posterior torso")
    'A lesion on the posterior torso of a male patient aged about 55.'
    >>> describe_metadata(age=None, sex="unknown", site="")
    'A skin lesion.'

    ``extra`` holds further allowed observations in the caller's order (e.g. ``elevation="palpable"``,
    ``diameter_mm=9.3``); each known one becomes its own short sentence.
    """
    # Never raises: an unusable value (age "abc" or inf, a 10 MB site) is left out or cut, as `clean_*` does.
    age_text = _format_age(age)
    sex_text = None if is_missing(sex) else _SEX_WORDS.get(str(sex).strip().lower())
    site_text = None
    site_key = clean_text(site)
    if site_key is not None:
        site_key = site_key.lower().replace("_", " ")
        site_text = _SITE_WORDS.get(site_key, site_key)

    sentences = []
    if age_text or sex_text or site_text:
        sentence = "A lesion"
        if site_text:
            sentence += f" on the {site_text}"
        if sex_text or age_text:
            sentence += f" of a {sex_text} patient" if sex_text else " of a patient"
            if age_text:
                sentence += f" aged about {age_text}"
        sentences.append(sentence + ".")
    for key, value in extra.items():
        shown = _format_number(value) if key.endswith("_mm") else clean_text(value)
        if shown is None:
            continue
        template = _EXTRA_TEMPLATES.get(key)
        if template is None:
            sentences.append(f"{key.replace('_', ' ').capitalize()}: {shown}.")
        else:
            sentences.append(template.format(value=shown if key.endswith("_mm") else shown.lower()))
    if not sentences:
        return NEUTRAL_TEXT
    if not (age_text or sex_text or site_text):
        sentences.insert(0, NEUTRAL_TEXT)
    return " ".join(sentences)
