"""Diagnose skin-lesion images with a SkinCLIP-VL checkpoint.

    python predict.py --model outputs/demo lesion.jpg --age 55 --sex male --site "posterior torso"
    python predict.py --model outputs/demo images/ --json --out predictions/        # a folder: a batch
    python predict.py --model outputs/demo cases.csv --no-rationale                 # CSV: image[,age,sex,site]

For each image it prints the top classes with probabilities, the conformal prediction set when the
checkpoint was calibrated by evaluate_skinclip.py ("MEL or NV (90% coverage)"), the generated rationale
(unless --no-rationale), and writes a heatmap PNG of the focal attention blended over the image. With
``--grounding-words "veil,streaks"`` it also writes one word-region map per word (paper Fig. 4), and with
``--ground-rationale`` one per content word of the image's own generated rationale.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
MIN_IMAGE_SIDE = 8
MAX_IMAGE_PIXELS = 200_000_000  # larger files are refused by name rather than exhausting memory


class ImageInputError(ValueError):
    """An input image that cannot be used; the message names the file and the problem."""


@dataclass
class Case:
    path: Path
    age: float | None = None
    sex: str | None = None
    site: str | None = None
    extra: dict = field(default_factory=dict)


def load_image(path: Path) -> Image.Image:
    """Open any common image as RGB, applying its EXIF orientation; bad files raise `ImageInputError`."""
    if not path.is_file():
        raise ImageInputError(f"{path}: no such file")
    previous_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with Image.open(path) as probe:
            probe.verify()  # catches truncated and corrupt files before decoding
        image = Image.open(path)
        image.load()
    except Image.DecompressionBombError as error:
        raise ImageInputError(f"{path}: image too large ({error})") from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ImageInputError(f"{path}: not a readable image ({error})") from error
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit
    image = ImageOps.exif_transpose(image)
    if min(image.size) < MIN_IMAGE_SIDE:
        raise ImageInputError(f"{path}: image is {image.size[0]}x{image.size[1]} pixels, below {MIN_IMAGE_SIDE}")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    elif image.mode in ("I;16", "I;16B", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        span = pixels.max() - pixels.min()
        image = Image.fromarray(((pixels - pixels.min()) / (span or 1.0) * 255).astype(np.uint8))
    return image.convert("RGB")


def collect_cases(inputs: list[str], age=None, sex=None, site=None) -> list[Case]:
    """Image files, folders of images, or CSV files (`image` or `path` column, optional age/sex/site)."""
    cases: list[Case] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ImageInputError(f"{path}: folder holds no image files ({sorted(IMAGE_SUFFIXES)})")
            cases += [Case(p, age, sex, site) for p in files]
        elif path.suffix.lower() == ".csv":
            cases += _cases_from_csv(path)
        else:
            cases.append(Case(path, age, sex, site))
    return cases


def _cases_from_csv(path: Path) -> list[Case]:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ImageInputError(f"{path}: CSV has no rows")
    column = next((c for c in ("image", "path", "image_path", "file") if c in rows[0]), None)
    if column is None:
        raise ImageInputError(f"{path}: CSV needs an 'image' or 'path' column, has {list(rows[0])}")
    cases = []
    for row in rows:
        image_path = Path(row[column])
        if not image_path.is_absolute():
            image_path = path.parent / image_path
        age = row.get("age") or row.get("age_approx")
        cases.append(
            Case(
                image_path,
                float(age) if age not in (None, "") else None,
                row.get("sex") or None,
                row.get("site") or row.get("anatom_site_general") or None,
            )
        )
    return cases


def metadata_sentence(case: Case) -> str:
    from datasets_scripts.metadata_text import describe_metadata

    return describe_metadata(age=case.age, sex=case.sex, site=case.site)


def heatmap_overlay(image: Image.Image, attention: np.ndarray, opacity: float = 0.45) -> Image.Image:
    """Blend the attention map `(grid_h, grid_w)`, upsampled bilinearly to the image size, over the image."""
    from matplotlib import colormaps

    attention = np.asarray(attention, dtype=np.float64)
    span = attention.max() - attention.min()
    normalised = (attention - attention.min()) / (span if span > 0 else 1.0)
    grid = Image.fromarray((normalised * 255).astype(np.uint8)).resize(image.size, Image.Resampling.BILINEAR)
    coloured = colormaps["jet"](np.asarray(grid) / 255.0)[..., :3]
    heat = Image.fromarray((coloured * 255).astype(np.uint8))
    return Image.blend(image.convert("RGB"), heat, opacity)


def load_calibration(model_dir: str | Path) -> dict:
    """`calibration.json` written by evaluate_skinclip.py (temperature, conformal threshold), or {}."""
    path = Path(model_dir) / "calibration.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def prediction_set(probs: np.ndarray, calibration: dict, class_names: list[str]) -> str | None:
    conformal = calibration.get("conformal")
    if not conformal:
        return None
    from skinclip_metrics import SplitConformal, format_prediction_set

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
        if len(word) >= 4 and word.isascii() and word.replace("-", "").isalpha() and word not in _STOPWORDS \
                and word not in words:
            words.append(word)
    return words[:limit]


def predict_cases(model, processor, cases: list[Case], out_dir: Path | None, batch_size: int = 8,
                  max_new_tokens: int = 64, top_k: int = 3, grounding_words: list[str] | None = None,
                  calibration: dict | None = None, progress: bool = True, ground_rationale: bool = False) -> list[dict]:
    """Run the model over `cases` in batches; unreadable images are reported per case, not fatal.

    ``grounding_words`` draws one word-region map per given word for every image; ``ground_rationale`` draws
    them for the content words of each image's own generated rationale (paper Fig. 4).
    """
    from tqdm.auto import tqdm

    class_names = model.config.class_names
    calibration = calibration or {}
    device = model.cls_token.device
    results: list[dict] = []
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    batches = [cases[i : i + batch_size] for i in range(0, len(cases), batch_size)]
    for batch_cases in tqdm(batches, desc="predict", unit="batch", disable=not progress or len(batches) < 2):
        loaded, images = [], []
        for case in batch_cases:
            try:
                images.append(load_image(case.path))
                loaded.append(case)
            except ImageInputError as error:
                results.append({"image": str(case.path), "error": str(error)})
        if not loaded:
            continue
        sentences = [metadata_sentence(case) for case in loaded]
        inputs = processor(images, sentences)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        prediction = model.predict(**inputs, max_new_tokens=max_new_tokens)
        rationales = processor.decode(prediction.rationale_ids) if prediction.rationale_ids is not None else None
        probs = prediction.probs.float().cpu().numpy()
        for row, (case, image, sentence) in enumerate(zip(loaded, images, sentences)):
            order = np.argsort(-probs[row])
            result = {
                "image": str(case.path),
                "metadata_text": sentence,
                "probabilities": {name: float(p) for name, p in zip(class_names, probs[row])},
                "top": [[class_names[i], float(probs[row, i])] for i in order[:top_k]],
            }
            conformal_set = prediction_set(probs[row], calibration, class_names)
            if conformal_set:
                result["prediction_set"] = conformal_set
            if rationales is not None:
                result["rationale"] = rationales[row]
            if out_dir is not None:
                stem = case.path.stem
                heatmap_path = out_dir / f"{stem}_focal_attention.png"
                heatmap_overlay(image, prediction.attention_map[row].float().cpu().numpy()).save(heatmap_path)
                result["heatmap"] = str(heatmap_path)
                words = list(grounding_words or [])
                if ground_rationale and rationales is not None:
                    words += [w for w in rationale_words(rationales[row]) if w not in words]
                if words:
                    word_ids, word_mask = processor.tokenize_reports(words)
                    maps = model.word_grounding(word_ids.to(device), word_mask.to(device),
                                                pixel_values=inputs["pixel_values"][row : row + 1])[0]
                    result["grounding"] = {}
                    for index, word in enumerate(words):
                        word_path = out_dir / f"{stem}_word_{_safe(word)}.png"
                        heatmap_overlay(image, maps[index].float().cpu().numpy()).save(word_path)
                        result["grounding"][word] = str(word_path)
            results.append(result)
    return results


def _safe(word: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in word.strip())[:40] or "word"


def format_result(result: dict) -> str:
    if "error" in result:
        return f"{result['image']}: ERROR {result['error']}"
    lines = [result["image"]]
    lines += [f"  {name:<8} {prob:6.1%}" for name, prob in result["top"]]
    if "prediction_set" in result:
        lines.append(f"  set: {result['prediction_set']}")
    if "rationale" in result:
        lines.append(f"  rationale: {result['rationale']}")
    if "heatmap" in result:
        lines.append(f"  heatmap: {result['heatmap']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files, folders of images, or CSV files")
    parser.add_argument("--model", required=True, help="checkpoint directory or Hub id")
    parser.add_argument("--revision", default=None, help="Hub revision (commit) to pin the checkpoint to")
    parser.add_argument("--age", type=float, default=None)
    parser.add_argument("--sex", default=None)
    parser.add_argument("--site", default=None, help='anatomical site, e.g. "posterior torso"')
    parser.add_argument("--out", default="predictions", help="folder for heatmap PNGs")
    parser.add_argument("--no-rationale", action="store_true", help="classification only, no generation")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grounding-words", default=None, help='comma-separated words, e.g. "veil,streaks"')
    parser.add_argument("--ground-rationale", action="store_true",
                        help="also draw a word-region map for each content word of the generated rationale")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of text")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: GPU if available)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor

    cases = collect_cases(args.inputs, args.age, args.sex, args.site)
    model = SkinClipVLModel.from_pretrained(args.model, revision=args.revision, device=args.device)
    processor = SkinClipVLProcessor.from_pretrained(args.model, revision=args.revision)
    words = [w.strip() for w in args.grounding_words.split(",") if w.strip()] if args.grounding_words else None
    results = predict_cases(
        model,
        processor,
        cases,
        Path(args.out),
        batch_size=args.batch_size,
        max_new_tokens=0 if args.no_rationale else args.max_new_tokens,
        top_k=args.top_k,
        grounding_words=words,
        ground_rationale=args.ground_rationale and not args.no_rationale,
        calibration=load_calibration(args.model) if Path(args.model).is_dir() else {},
    )
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("\n".join(format_result(result) for result in results))
    return 1 if results and all("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
