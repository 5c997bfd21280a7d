"""Diagnose skin-lesion images with a SkinCLIP-VL checkpoint.

    python predict.py --model outputs/demo lesion.jpg --age 55 --sex male --site "posterior torso"
    python predict.py --model outputs/demo images/ --json --out predictions/        # a folder: a batch
    python predict.py --model outputs/demo cases.csv --no-rationale                 # CSV: image[,age,sex,site]

For each image it prints the top classes with probabilities, the conformal prediction set when the
checkpoint was calibrated by evaluate_skinclip.py ("MEL or NV (90% coverage)"), the generated rationale
(unless --no-rationale) with a note when it does not name the top class ("Note: the rationale names NV but
the classifier's top class is MEL"; JSON fields ``rationale_names``, ``rationale_agrees``, ``note``; see
skinclip/agreement.py), and writes a heatmap PNG of the focal attention blended over the image. With
``--grounding-words "veil,streaks"`` it also writes one word-region map per word (paper Fig. 4), and with
``--ground-rationale`` one per content word of the image's own generated rationale.

Results are printed as each batch finishes. A folder is walked recursively; its files that are not images are
reported as skipped. Output names keep each input's relative path (``sub/ISIC_1_focal_attention.png``); a
name already used in the run gets ``-2``. A bad input (unreadable, huge, a bad CSV row, NaN probabilities)
is that input's error and the batch goes on. Exit codes: 0 every input predicted, 3 (EXIT_PARTIAL) some
failed, 1 (EXIT_FATAL) none predicted or a fatal error (``error: ...`` on one line; ``--debug`` for the
traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from skinclip.csv_rows import UnreadableRow, rows_after, rows_with_lines
from skinclip.errors import (
    EXIT_FATAL,
    EXIT_OK,
    EXIT_PARTIAL,
    UserError,
)
from skinclip.images import (  # noqa: F401  (re-exported: the demo and older callers import them from here)
    IMAGE_SUFFIXES,
    MAX_IMAGE_PIXELS,
    MAX_WORKING_SIDE,
    MIN_IMAGE_SIDE,
    ImageInputError,
    load_image,
)
from skinclip.output_folder import OutputFolder, atomic_write_bytes, refuse_symlinks
from skinclip.validation import cli_number

CSV_IMAGE_COLUMNS = ("image", "path", "image_path", "file")


@dataclass
class Case:
    path: Path
    age: float | None = None
    sex: str | None = None
    site: str | None = None
    extra: dict = field(default_factory=dict)
    name: str | None = None  # output name relative to --out, without suffix (the input's relative path)
    source: str | None = None  # where the case was read ("cases.csv line 3"), named in its messages
    error: str | None = None  # a problem found before the image is opened (an unreadable CSV row)
    warnings: list[str] = field(default_factory=list)  # metadata left out or cut

    @property
    def label(self) -> str:
        return self.source or str(self.path)


# ------------------------------------------------------------------------------------------------ inputs


def collect_cases(inputs: list[str], age=None, sex=None, site=None, exclude: Path | None = None):
    """(cases, skipped) from image files, folders (walked recursively) and CSV files.

    ``skipped`` lists ``(path, reason)`` for files in a folder that are not images of a supported type; they are
    reported, not predicted. ``exclude`` (the output folder) is never walked, so earlier heatmaps are not inputs.
    """
    cases: list[Case] = []
    skipped: list[tuple[Path, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            if exclude is not None and path.resolve() == exclude.resolve():
                raise UserError(
                    f"the output folder is also an input folder: its heatmaps would become inputs (--out {exclude})"
                )
            images, not_images = _walk_folder(path, exclude)
            skipped += not_images
            if not images:
                raise ImageInputError(f"{path}: folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            cases += [Case(p, age, sex, site, name=p.relative_to(path).with_suffix("").as_posix()) for p in images]
        elif path.suffix.lower() == ".csv":
            if not path.is_file():
                raise ImageInputError(f"{path}: no such CSV file")
            cases += _cases_from_csv(path)
        else:
            cases.append(Case(path, age, sex, site, name=path.stem))
    return cases, skipped


def _walk_folder(folder: Path, exclude: Path | None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Image files under ``folder`` in sorted order, and the other files with the reason they are skipped."""
    excluded = exclude.resolve() if exclude is not None else None
    images, skipped = [], []
    for root, dirs, files in os.walk(folder):  # symlinked folders are not followed: no loops
        dirs[:] = sorted(d for d in dirs if (Path(root) / d).resolve() != excluded)
        for file_name in sorted(files):
            path = Path(root) / file_name
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images.append(path)
            else:
                skipped.append((path, f"not a supported image type ({path.suffix or 'no extension'})"))
    return sorted(images, key=lambda p: p.relative_to(folder).as_posix()), skipped


def _cases_from_csv(path: Path) -> list[Case]:
    """One case per row; a row that cannot be used becomes a case with an error naming the file and line."""
    # surrogateescape: a non-UTF-8 byte spoils only its own row (found below), not the whole file.
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        rows = rows_with_lines(handle)
        try:
            _, header = next(rows, (1, []))
        except UnreadableRow as error:
            raise ImageInputError(f"{path}: line 1 (the header) is not a readable CSV row ({error.reason})") from None
        if not header:
            raise ImageInputError(f"{path}: CSV is empty")
        if any(_undecodable(name) for name in header):
            raise ImageInputError(f"{path}: line 1 (the header) is not UTF-8 text")
        column = next((c for c in CSV_IMAGE_COLUMNS if c in header), None)
        if column is None:
            raise ImageInputError(f"{path}: CSV needs an 'image' or 'path' column, has {header}")
        cases = []
        try:
            for line, fields in rows:
                cases.append(_case_from_row(dict(zip(header, fields)), column, path, line))
        except UnreadableRow as error:  # e.g. a field over csv.field_size_limit(): the rest cannot be parsed
            handle.seek(0)  # the rows after the unreadable one, lost with it, counted from the start
            rest = rows_after(handle, error.line)
            source = f"{path} line {error.line}"
            message = f"{source}: unreadable CSV ({error.reason}); not read: this row and the {rest} after it"
            cases.append(Case(path, source=source, error=message))
    if not cases:
        raise ImageInputError(f"{path}: CSV has no rows")
    return cases


def _case_from_row(row: dict, column: str, csv_path: Path, line: int) -> Case:
    from metadata_skinclip import clean_age, clean_text

    source = f"{csv_path} line {line}"
    values = [v for v in row.values() if isinstance(v, str)]
    if any(_undecodable(value) for value in values):
        return Case(csv_path, source=source, error=f"{source}: not UTF-8 text")
    raw = (row.get(column) or "").strip()
    if not raw:
        return Case(csv_path, source=source, error=f"{source}: no image path in column {column!r}")
    image_path = Path(raw)
    relative = not image_path.is_absolute() and ".." not in image_path.parts
    if not image_path.is_absolute():
        image_path = csv_path.parent / image_path
    issues: list = []
    case = Case(
        image_path,
        clean_age(row.get("age") or row.get("age_approx"), source, issues),
        clean_text(row.get("sex"), source, issues, field="sex"),
        clean_text(row.get("site") or row.get("anatom_site_general"), source, issues, field="site"),
        name=Path(raw).with_suffix("").as_posix() if relative else image_path.stem,
        source=source,
    )
    case.warnings = [str(issue) for issue in issues]
    return case


def _undecodable(text: str) -> bool:
    """True when ``text`` holds bytes that were not UTF-8 (kept as lone surrogates by surrogateescape)."""
    return any("\udc80" <= character <= "\udcff" for character in text)


def metadata_sentence(case: Case) -> str:
    from metadata_skinclip import describe_metadata

    return describe_metadata(age=case.age, sex=case.sex, site=case.site)


# ----------------------------------------------------------------------------------------------- outputs


class OutputNames:
    """Unique output file names within one run: two inputs never write (or point their JSON at) one file.

    A name keeps the input's relative path (``sub/ISIC_1``); a name already taken gets ``-2``, ``-3``... Names
    are compared case-insensitively, as on macOS and Windows file systems.
    """

    def __init__(self) -> None:
        self._taken: set[str] = set()

    def _claim(self, candidates) -> str:
        for candidate in candidates:
            if candidate.casefold() not in self._taken:
                self._taken.add(candidate.casefold())
                return candidate
        raise AssertionError("unreachable: the candidates are endless")

    def heatmap(self, name: str) -> str:
        """``<base>_focal_attention.png`` for a case; returns the claimed file name."""
        base = _safe_path(name)
        return self._claim(f"{base}{_counter(k)}_focal_attention.png" for k in _counting())

    def word_map(self, heatmap_name: str, word: str) -> str:
        base = heatmap_name[: -len("_focal_attention.png")]
        return self._claim(f"{base}_word_{_safe(word)}{_counter(k)}.png" for k in _counting())


def _counting():
    k = 1
    while True:
        yield k
        k += 1


def _counter(k: int) -> str:
    return "" if k == 1 else f"-{k}"


def _safe(word: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in word.strip())[:40] or "word"


def _safe_path(name: str) -> str:
    """A relative path of safe parts: no '..', no leading dots, no characters a file system may refuse."""
    parts = []
    for part in Path(name).parts:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in part).lstrip(".")[:100]
        if safe and part != Path(name).anchor:
            parts.append(safe)
    return "/".join(parts) or "image"


def heatmap_overlay(
    image: Image.Image, attention: np.ndarray, opacity: float = 0.45, max_side: int = MAX_WORKING_SIDE
) -> Image.Image:
    """Blend the attention map ``(grid_h, grid_w)``, upsampled bilinearly, over the image.

    Drawn at the image's own size up to ``max_side`` on the long side (a larger image is drawn on a downscaled
    copy), in uint8 throughout, so memory stays bounded whatever the input.
    """
    image = image.convert("RGB")
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    attention = np.nan_to_num(np.asarray(attention, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    span = float(attention.max() - attention.min())
    normalised = (attention - attention.min()) / (span if span > 0 else 1.0)
    grid = Image.fromarray((normalised * 255).astype(np.uint8)).resize(image.size, Image.Resampling.BILINEAR)
    heat = Image.fromarray(_jet_table()[np.asarray(grid)])
    return Image.blend(image, heat, opacity)


def _jet_table() -> np.ndarray:
    """The jet colour map as a (256, 3) uint8 lookup table (index = 8-bit attention)."""
    from matplotlib import colormaps

    return (colormaps["jet"](np.arange(256) / 255.0)[:, :3] * 255).astype(np.uint8)


def load_calibration(model_dir: str | Path) -> dict:
    """`calibration.json` written by evaluate_skinclip.py (temperature, conformal threshold), or {}."""
    from skinclip.validation import check_calibration, read_json_file

    path = Path(model_dir) / "calibration.json"
    return check_calibration(read_json_file(path, "calibration file"), path) if path.is_file() else {}


def prediction_set(probs: np.ndarray, calibration: dict, class_names: list[str]) -> str | None:
    conformal = calibration.get("conformal")
    if not conformal:
        return None
    from skinclip.classification_metrics import SplitConformal, format_prediction_set

    predictor = SplitConformal(
        method=conformal["method"],
        coverage=conformal["coverage"],
        **{k: conformal[k] for k in ("raps_lambda", "raps_k_reg") if k in conformal},
    )
    predictor.qhat = conformal["qhat"]
    members = predictor.predict_sets(probs[None])[0]
    return format_prediction_set(members, class_names, conformal["coverage"])


# Words that carry no visual finding; left out when the rationale's own words are grounded.
_STOPWORDS = frozenset(
    "a an and are as at be by for from has have in is it its of on or the this that to was were with without "
    "lesion lesions diagnosis shows show typical typically patient skin image dermoscopy dermoscopic".split()
)


def rationale_words(rationale: str, limit: int = 6) -> list[str]:
    """The distinct content words of a rationale, in order: the words whose grounding maps are drawn."""
    words = []
    for token in rationale.lower().replace("/", " ").split():
        word = token.strip(".,;:()[]\"'!?")
        if (
            len(word) >= 4
            and word.isascii()
            and word.replace("-", "").isalpha()
            and word not in _STOPWORDS
            and word not in words
        ):
            words.append(word)
    return words[:limit]


def iter_predictions(
    model,
    processor,
    cases: list[Case],
    out_dir: Path | None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    top_k: int = 3,
    grounding_words: list[str] | None = None,
    calibration: dict | None = None,
    progress: bool = True,
    ground_rationale: bool = False,
):
    """Yield one result per case, in order, as soon as its batch is done.

    A problem with one input (unreadable or huge file, bad CSV row, NaN probabilities, even a MemoryError)
    becomes that input's ``{"image", "error"}`` result and the others go on. ``grounding_words`` draws one
    word-region map per given word for every image; ``ground_rationale`` draws them for the content words of
    each image's own generated rationale (paper Fig. 4).
    """
    from tqdm.auto import tqdm

    from skinclip.agreement import RationaleReader

    run = _Run(
        model,
        processor,
        out_dir,
        max_new_tokens,
        top_k,
        grounding_words or [],
        calibration or {},
        ground_rationale,
        RationaleReader.for_classes(model.config.class_names) if max_new_tokens > 0 else None,
    )
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    batches = [cases[i : i + batch_size] for i in range(0, len(cases), batch_size)]
    for batch_cases in tqdm(batches, desc="predict", unit="batch", disable=not progress or len(batches) < 2):
        yield from run.batch(batch_cases)


@dataclass
class _Run:
    """One prediction run: the model and its settings, and the output names already handed out."""

    model: object
    processor: object
    out_dir: Path | None
    max_new_tokens: int
    top_k: int
    grounding_words: list[str]
    calibration: dict
    ground_rationale: bool
    # Reads which class a rationale names (None: no converter writes reports for these classes, or no rationale).
    rationale_reader: object = None
    names: OutputNames = field(default_factory=OutputNames)

    def batch(self, cases: list[Case]):
        """Results of one batch in input order; loading problems are per case."""
        loaded: dict[int, Image.Image] = {}
        errors: dict[int, dict] = {}
        for index, case in enumerate(cases):
            try:
                if case.error:
                    raise ImageInputError(case.error)
                loaded[index] = load_image(case.path, name=case.label)
            except Exception as error:  # MemoryError included: one input's failure is that input's error
                errors[index] = _error_result(case, error)
        predicted = self._predict_all([cases[i] for i in loaded], list(loaded.values()))
        results = dict(errors)
        results.update(zip(loaded, predicted))
        return [results[index] for index in range(len(cases))]

    def _predict_all(self, cases: list[Case], images: list[Image.Image]) -> list[dict]:
        """The batch in one model call; if that fails, each case alone, so only the failing one is lost."""
        if not cases:
            return []
        try:
            return self._predict(cases, images)
        except Exception as error:  # MemoryError included
            if len(cases) == 1:
                return [_error_result(cases[0], error)]
        return [result for case, image in zip(cases, images) for result in self._predict_all([case], [image])]

    def _predict(self, cases: list[Case], images: list[Image.Image]) -> list[dict]:
        from skinclip.inference import predict_batch

        sentences = [metadata_sentence(case) for case in cases]
        prediction, inputs = predict_batch(self.model, self.processor, images, sentences, self.max_new_tokens)
        rationales = self.processor.decode(prediction.rationale_ids) if prediction.rationale_ids is not None else None
        probs = prediction.probs.float().cpu().numpy()
        results = []
        for row, (case, image, sentence) in enumerate(zip(cases, images, sentences)):
            try:
                results.append(
                    self._result(
                        case,
                        image,
                        sentence,
                        probs[row],
                        rationales[row] if rationales is not None else None,
                        prediction.attention_map[row],
                        inputs["pixel_values"][row : row + 1],
                    )
                )
            except Exception as error:  # e.g. NaN probabilities, a full disk: this case only
                results.append(_error_result(case, error))
        return results

    def _result(
        self, case: Case, image, sentence: str, probs: np.ndarray, rationale: str | None, attention, pixel_values
    ) -> dict:
        class_names = self.model.config.class_names
        if not np.all(np.isfinite(probs)):
            raise ImageInputError(
                f"{case.label}: the checkpoint gave non-finite class probabilities (NaN or inf); "
                f"its weights are likely broken"
            )
        order = np.argsort(-probs)
        result = {
            "image": str(case.path),
            "metadata_text": sentence,
            "probabilities": {name: float(p) for name, p in zip(class_names, probs)},
            "top": [[class_names[i], float(probs[i])] for i in order[: self.top_k]],
        }
        if case.source:
            result["source"] = case.source
        if case.warnings:
            result["warnings"] = list(case.warnings)
        conformal_set = prediction_set(probs, self.calibration, class_names)
        if conformal_set:
            result["prediction_set"] = conformal_set
        if rationale is not None:
            result["rationale"] = rationale
            if self.rationale_reader is not None:
                # The rationale is written by the decoder, the top class by the head: say when they disagree.
                top_class = class_names[order[0]]
                result["rationale_names"] = self.rationale_reader.named_class(rationale)
                result["rationale_agrees"] = result["rationale_names"] == top_class
                note = self.rationale_reader.disagreement_note(rationale, top_class)
                if note:
                    result["note"] = note
        if self.out_dir is not None:
            self._write_maps(result, case, image, attention, rationale, pixel_values)
        return result

    def _write_maps(self, result: dict, case: Case, image, attention, rationale: str | None, pixel_values) -> None:
        """The focal-attention heatmap and the word-region maps, under names unique to this case."""
        heatmap_name = self.names.heatmap(case.name or case.path.stem)
        heatmap_path = self._save(heatmap_overlay(image, attention.float().cpu().numpy()), heatmap_name)
        result["heatmap"] = str(heatmap_path)
        words = list(self.grounding_words)
        if self.ground_rationale and rationale is not None:
            words += [w for w in rationale_words(rationale) if w not in words]
        if not words:
            return
        device = self.model.cls_token.device
        word_ids, word_mask = self.processor.tokenize_reports(words)
        maps = self.model.word_grounding(word_ids.to(device), word_mask.to(device), pixel_values=pixel_values)[0]
        result["grounding"] = {}
        for index, word in enumerate(words):
            word_path = self._save(
                heatmap_overlay(image, maps[index].float().cpu().numpy()), self.names.word_map(heatmap_name, word)
            )
            result["grounding"][word] = str(word_path)

    def _save(self, picture: Image.Image, relative_name: str) -> Path:
        path = self.out_dir / relative_name
        path.parent.mkdir(parents=True, exist_ok=True)
        encoded = io.BytesIO()
        picture.save(encoded, format="PNG")
        atomic_write_bytes(path, encoded.getvalue())  # a failed write leaves no torn PNG under the result's name
        return path


def _error_result(case: Case, error: BaseException) -> dict:
    """``{"image", "error"}``: the message names the input; unexpected errors also name their type."""
    if isinstance(error, UserError):
        message = _one_line(error)
    elif isinstance(error, MemoryError):
        message = f"{case.label}: out of memory while predicting this input"
    else:
        message = f"{case.label}: unexpected {type(error).__name__}: {_one_line(error)}"
    result = {"image": str(case.path), "error": message}
    if case.source:
        result["source"] = case.source
    return result


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines)[:500] or type(error).__name__


def format_result(result: dict) -> str:
    if "error" in result:
        return f"{result['image']}: ERROR {result['error']}"
    lines = [result["image"]]
    lines += [f"  {name:<8} {prob:6.1%}" for name, prob in result["top"]]
    if "prediction_set" in result:
        lines.append(f"  set: {result['prediction_set']}")
    if "rationale" in result:
        lines.append(f"  rationale: {result['rationale']}")
    if "note" in result:
        lines.append(f"  {result['note']}")
    if "heatmap" in result:
        lines.append(f"  heatmap: {result['heatmap']}")
    lines += [f"  warning: {warning}" for warning in result.get("warnings", [])]
    return "\n".join(lines)


class ResultWriter:
    """Prints each result as soon as it exists: text blocks, or one JSON list written element by element.

    A run that dies half-way has still printed every finished result (the JSON list then lacks its ``]``).
    """

    def __init__(self, as_json: bool, stream=None) -> None:
        self.as_json, self.stream, self.count = as_json, stream or sys.stdout, 0

    def write(self, result: dict) -> None:
        if self.as_json:
            prefix = "[\n" if self.count == 0 else ",\n"
            self.stream.write(prefix + json.dumps(result, indent=2))
        else:
            self.stream.write(format_result(result) + "\n")
        self.stream.flush()
        self.count += 1

    def close(self) -> None:
        if self.as_json:
            self.stream.write("[]\n" if self.count == 0 else "\n]\n")
            self.stream.flush()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files, folders of images (walked recursively), or CSV files")
    parser.add_argument("--model", required=True, help="checkpoint directory or Hub id")
    parser.add_argument("--revision", default=None, help="Hub revision (commit) to pin the checkpoint to")
    parser.add_argument("--age", default=None, help="years, 0-120")
    parser.add_argument("--sex", default=None)
    parser.add_argument("--site", default=None, help='anatomical site, e.g. "posterior torso"')
    parser.add_argument("--out", default="predictions", help="folder for heatmap PNGs")
    parser.add_argument("--no-rationale", action="store_true", help="classification only, no generation")
    parser.add_argument("--max-new-tokens", type=cli_number(int, 0), default=64)
    parser.add_argument("--top-k", type=cli_number(int, 1), default=3)
    parser.add_argument("--batch-size", type=cli_number(int, 1), default=8)
    parser.add_argument("--grounding-words", default=None, help='comma-separated words, e.g. "veil,streaks"')
    parser.add_argument(
        "--ground-rationale",
        action="store_true",
        help="also draw a word-region map for each content word of the generated rationale",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of text")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: GPU if available)")
    return parser


def _cli_metadata(args) -> tuple[float | None, str | None, str | None]:
    """--age/--sex/--site checked like CSV values, but a bad one is fatal: it would apply to every input."""
    from metadata_skinclip import (
        MAX_TEXT_CHARS,
        age_problem,
        clean_age,
        clean_text,
    )

    problem = age_problem(args.age)
    if problem is not None:
        raise UserError(f"age {args.age!r} {problem} (--age)")
    for flag, value in (("--sex", args.sex), ("--site", args.site)):
        if value is not None and len(value) > MAX_TEXT_CHARS:
            raise UserError(f"longer than {MAX_TEXT_CHARS} characters ({flag})")
    return clean_age(args.age), clean_text(args.sex), clean_text(args.site)


def load_checkpoint(model_path: str, revision: str | None = None, device: str | None = None):
    """(model, processor); any failure to load is a `UserError` naming ``--model``."""
    from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor

    try:
        model = SkinClipVLModel.from_pretrained(model_path, revision=revision, device=device)
        processor = SkinClipVLProcessor.from_pretrained(model_path, revision=revision)
    except MemoryError:
        raise
    except Exception as error:  # a missing folder, a torn download, a foreign checkpoint: all the user's to fix
        raise UserError(f"cannot load the checkpoint: {_one_line(error)} (--model {model_path})") from error
    return model, processor


def _prepare_out_dir(out: str) -> Path:
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"exists and is not a folder (--out {out})")
    return out_dir


def _exit_code(n_ok: int, n_failed: int) -> int:
    if n_failed == 0:
        return EXIT_OK
    return EXIT_PARTIAL if n_ok else EXIT_FATAL


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    age, sex, site = _cli_metadata(args)
    out_dir = _prepare_out_dir(args.out)
    cases, skipped = collect_cases(args.inputs, age, sex, site, exclude=out_dir)
    for path, reason in skipped:
        print(f"skipped: {path} ({reason})", file=sys.stderr)
    for case in cases:
        for warning in case.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    model, processor = load_checkpoint(args.model, args.revision, args.device)
    words = [w.strip() for w in args.grounding_words.split(",") if w.strip()] if args.grounding_words else None
    writer = ResultWriter(args.json)
    n_ok = n_failed = 0
    # --out is locked while heatmaps are written (a second predict into it is refused), no write follows a symlink.
    with OutputFolder(out_dir, "predict.py"), contextlib.closing(writer):
        refuse_symlinks(out_dir)
        for result in iter_predictions(
            model,
            processor,
            cases,
            out_dir,
            batch_size=args.batch_size,
            max_new_tokens=0 if args.no_rationale else args.max_new_tokens,
            top_k=args.top_k,
            grounding_words=words,
            ground_rationale=args.ground_rationale and not args.no_rationale,
            calibration=load_calibration(args.model) if Path(args.model).is_dir() else {},
        ):
            writer.write(result)
            n_failed += "error" in result
            n_ok += "error" not in result
    print(
        f"summary: {n_ok} of {len(cases)} input(s) predicted, {n_failed} failed, "
        f"{len(skipped)} file(s) skipped (not images)",
        file=sys.stderr,
    )
    return _exit_code(n_ok, n_failed)
