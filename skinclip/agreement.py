"""Does the written rationale name the class the classifier chose? Reading the class a rationale names, and the
agreement rate between rationales and the class head.

The class names come from where the reports are written: each converter's report text names its class after
"Diagnosis:" (ISIC 2019, HAM10000 and the demo set: ``isic2019.class_report``, "Diagnosis: Melanoma, a malignant
..."; Derm7pt: ``derm7pt.checklist_report``, "... Diagnosis: clark nevus."; ISIC 2024: ``isic2024.REPORTS``).
`report_vocabularies` builds those reports and takes the phrase after "Diagnosis:" up to the first comma, full
stop or bracket, so a change of report wording moves the matching with it. A model's classes pick the first
vocabulary that names all of them; a model whose classes no converter writes reports for has none (`None`).

A rationale names a class when one of the class's phrases occurs in it as whole words (case ignored); one that
names no class reads as ``NONE``, one that names several as ``AMBIGUOUS``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache

NONE = "none"  # the rationale names no class
AMBIGUOUS = "ambiguous"  # the rationale names several classes
_NAMED_PHRASE = re.compile(r"Diagnosis:\s*([^,.(;]+)")


def named_phrase(report: str) -> str:
    """The class phrase a report writes after "Diagnosis:" (lower case), e.g. "melanocytic nevus"."""
    match = _NAMED_PHRASE.search(report)
    if match is None:
        raise ValueError(f"report {report[:60]!r} has no 'Diagnosis: <class>' phrase")
    return match.group(1).strip().lower()


@cache
def report_vocabularies() -> tuple[tuple[str, dict[str, tuple[str, ...]]], ...]:
    """(source, {class name: phrases}) of every converter, from the report texts it writes."""
    from datasets_scripts import derm7pt, isic2019, isic2024
    from skinclip.labels import OOD_CLASSES

    isic = {name: (named_phrase(isic2019.class_report(name)),) for name in isic2019.CLASS_NAMES}
    derm = {name: [] for name in derm7pt.CLASS_NAMES}
    blank_checklist = dict.fromkeys(derm7pt.CHECKLIST, "")
    for diagnosis, name in derm7pt.DIAGNOSIS_TO_CLASS.items():
        phrase = named_phrase(derm7pt.checklist_report({**blank_checklist, "diagnosis": diagnosis}))
        if phrase not in derm[name]:
            derm[name].append(phrase)
    ood = {OOD_CLASSES[label]: (named_phrase(text),) for label, text in isic2024.REPORTS.items()}
    return (
        ("isic2019 (also HAM10000 and the demo set)", isic),
        ("derm7pt", {name: tuple(phrases) for name, phrases in derm.items()}),
        ("isic2024", ood),
    )


def class_phrases(class_names: Sequence[str]) -> dict[str, tuple[str, ...]] | None:
    """{class name: the phrases its reports name it by} for a model's classes, or None if no converter has them."""
    for _, vocabulary in report_vocabularies():
        if all(name in vocabulary for name in class_names):
            return {name: vocabulary[name] for name in class_names}
    return None


class RationaleReader:
    """Reads which of a model's classes a rationale names (`named_class`) and scores agreement with the head."""

    def __init__(self, phrases: dict[str, Sequence[str]]):
        self.class_names = list(phrases)
        self._class_of = {phrase.lower(): name for name, names in phrases.items() for phrase in names}
        # Longest phrase first: at one position the alternation takes "melanoma metastasis" over "melanoma".
        alternatives = sorted(self._class_of, key=len, reverse=True)
        self._pattern = re.compile(r"\b(" + "|".join(map(re.escape, alternatives)) + r")\b", re.IGNORECASE)

    @classmethod
    def for_classes(cls, class_names: Sequence[str]) -> RationaleReader | None:
        """The reader of a model's classes, or None when no converter writes reports naming all of them."""
        phrases = class_phrases(class_names)
        return None if phrases is None else cls(phrases)

    def named_class(self, rationale: str) -> str:
        """The class the rationale names, or `NONE` (no class) or `AMBIGUOUS` (several classes)."""
        named = {self._class_of[match.group(1).lower()] for match in self._pattern.finditer(rationale or "")}
        if not named:
            return NONE
        return named.pop() if len(named) == 1 else AMBIGUOUS

    def agreement(self, rationales: Sequence[str], predicted: Sequence[int]) -> dict:
        """Agreement of each rationale with the head's argmax class (indices into the model's classes).

        ``rate`` = rows whose rationale names exactly the predicted class / all rows (a rationale naming no class
        or several counts as disagreeing); ``named_classes`` lists what each row's rationale names.
        """
        if len(rationales) != len(predicted):
            raise ValueError(f"{len(rationales)} rationales but {len(predicted)} predicted classes")
        named = [self.named_class(text) for text in rationales]
        agree = sum(name == self.class_names[int(index)] for name, index in zip(named, predicted))
        none, ambiguous = named.count(NONE), named.count(AMBIGUOUS)
        rows = len(named)
        return {
            "rate": agree / rows if rows else float("nan"),
            "rows": rows,
            "agree": agree,
            "disagree": rows - agree - none - ambiguous,
            "none": none,
            "ambiguous": ambiguous,
            "named_classes": named,
        }

    def disagreement_note(self, rationale: str, top_class: str) -> str | None:
        """A one-line note when the rationale does not name the classifier's top class, else None."""
        named = self.named_class(rationale)
        if named == top_class:
            return None
        if named == NONE:
            return f"Note: the rationale names no class; the classifier's top class is {top_class}"
        if named == AMBIGUOUS:
            return f"Note: the rationale names several classes; the classifier's top class is {top_class}"
        return f"Note: the rationale names {named} but the classifier's top class is {top_class}"
