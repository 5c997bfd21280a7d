"""The data path at the ISIC 2019 scale: converter time, disk and memory; collator samples/s per core; cache size.

    python -m benchmarks.data_scale --rows 2000 --work /tmp/isic-scale --json out.json
    python -m benchmarks.data_scale --rows 25331 --work /tmp/isic-scale          # the whole real CSV (~6 GB disk)

1. Takes ``--rows`` rows of the real ``ISIC_2019_Training_GroundTruth.csv`` / ``_Metadata.csv`` (every k-th row,
   so the class and source mix is the real one) and writes a generated JPEG for each, with the real size mix:
   the HAM10000 rows (``lesion_id`` HAM_*) 600x450 as in that archive, the others 1024x768. The content is
   smooth (a skin-toned gradient, a dark ellipse, mild noise) at quality 90, so the files are about the size of
   real dermoscopy JPEGs rather than of incompressible noise.
2. Runs the converter (``python -m datasets_scripts.isic2019``, full image check on) in a child process:
   wall time, the child's peak RSS, and the output's size on disk.
3. Loads the converted training split and times rows -> ``SkinClipVLCollator`` batches on one thread (JPEG
   decoding by ``datasets``, augmentation, CLIP ViT-L/14 preprocessing to 224 px, tokenisation with the real
   Qwen and CLIP tokenizers), with and without augmentation: samples/s per core.
4. The feature cache's size at the paper's tower: (257 tokens x 1024) fp16 a row, from the Array2D layout
   ``skinclip/feature_cache.py`` writes, measured per row on a small cache built here with the tiny tower.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_ISIC = Path(os.environ.get("SKINCLIP_SHARED_DATA", REPO_ROOT.parent / "shared/data")) / "isic2019"
GROUND_TRUTH, METADATA = "ISIC_2019_Training_GroundTruth.csv", "ISIC_2019_Training_Metadata.csv"
ALL_ROWS = 25_331
HAM_SIZE, OTHER_SIZE = (600, 450), (1024, 768)


def subset_csvs(source: Path, rows: int, out: Path) -> list[tuple[str, bool]]:
    """Every k-th row of both CSVs into ``out``; returns (image name, is HAM10000) per kept row."""
    import pandas as pd

    truth = pd.read_csv(source / GROUND_TRUTH)
    metadata = pd.read_csv(source / METADATA)
    keep = np.linspace(0, len(truth) - 1, min(rows, len(truth))).astype(int)
    truth = truth.iloc[keep]
    metadata = metadata[metadata["image"].isin(set(truth["image"]))]
    out.mkdir(parents=True, exist_ok=True)
    truth.to_csv(out / GROUND_TRUTH, index=False)
    metadata.to_csv(out / METADATA, index=False)
    ham = set(metadata.loc[metadata["lesion_id"].astype(str).str.startswith("HAM_"), "image"])
    return [(name, name in ham) for name in truth["image"]]


def write_images(rows: list[tuple[str, bool]], image_dir: Path, seed: int = 0) -> dict:
    from PIL import Image

    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    templates = {}
    for size in (HAM_SIZE, OTHER_SIZE):
        width, height = size
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        base = np.stack([200 - 40 * y / height, 150 - 30 * x / width, 130 - 20 * (x + y) / (width + height)], -1)
        templates[size] = (base, x, y)
    start = time.perf_counter()
    for name, is_ham in rows:
        size = HAM_SIZE if is_ham else OTHER_SIZE
        base, x, y = templates[size]
        width, height = size
        cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
        rx, ry = rng.uniform(0.1, 0.3) * width, rng.uniform(0.1, 0.3) * height
        lesion = (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2) < 1
        image = base.copy()
        image[lesion] *= rng.uniform(0.3, 0.6)
        noise = rng.normal(0, 4, (-(-height // 8), width // 8, 3)).repeat(8, 0).repeat(8, 1)
        image += noise[:height, :width]
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(image_dir / f"{name}.jpg", quality=90)
    files = list(image_dir.glob("*.jpg"))
    return {
        "images": len(files),
        "ham_600x450": sum(is_ham for _, is_ham in rows),
        "other_1024x768": sum(not is_ham for _, is_ham in rows),
        "bytes": sum(f.stat().st_size for f in files),
        "generate_s": time.perf_counter() - start,
    }


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def convert(data_dir: Path, output_dir: Path) -> dict:
    """The converter CLI in a child process: wall time and the child's peak RSS (getrusage of children)."""
    command = [sys.executable, "-m", "datasets_scripts.isic2019", "--data-dir", str(data_dir)]
    command += ["--output-dir", str(output_dir), "--overwrite"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != 0:
        raise RuntimeError(completed.stderr[-2000:])
    return {
        "convert_s": seconds,
        "convert_cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "convert_peak_rss_gib": after.ru_maxrss / 2**20,  # the largest child so far: the converter
        "output_bytes": folder_bytes(output_dir),
    }


def paper_processor(root: Path):
    """The processor of the paper's bases (CLIP ViT-L/14 preprocessing at 224 px, Qwen and CLIP tokenizers)."""
    from benchmarks.gpu_check import write_bases
    from configuration_skinclip import SkinClipVLConfig
    from modeling_skinclip import SkinClipVLProcessor
    from skinclip.labels import ISIC2019_CLASSES

    bases = write_bases("paper", root)
    config = SkinClipVLConfig(
        vision_config=dict(backend="hf", model_name_or_path=bases["clip"]),
        decoder_config=dict(model_name_or_path=bases["decoder"]),
        id2label=dict(enumerate(ISIC2019_CLASSES)),
    )
    return SkinClipVLProcessor.from_pretrained(None, config=config)


def collator_rate(dataset_dir: Path, processor, samples: int, batch: int = 8) -> dict:
    """Samples/s on one thread: rows (JPEG decoded by datasets) -> SkinClipVLCollator batches."""
    import torch
    from datasets import load_from_disk

    from trainer_cfa import SkinClipVLCollator

    torch.set_num_threads(1)
    split = load_from_disk(str(dataset_dir))["train"]
    samples = min(samples, len(split))
    # Evenly spaced rows: the converted split keeps the CSV's order, whose first thousands are all 1024x768.
    indices = np.linspace(0, len(split) - 1, samples).astype(int).tolist()
    rates = {}
    for augment in (True, False):
        collator = SkinClipVLCollator(processor, augment=augment, seed=0)
        start, cpu_start = time.perf_counter(), time.process_time()
        for first in range(0, samples, batch):
            rows = [split[i] for i in indices[first : first + batch]]
            collator(rows)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        rates["augment" if augment else "no_augment"] = {
            "samples": samples,
            "wall_s": wall,
            "cpu_s": cpu,
            "samples_per_s": samples / wall,
            "samples_per_cpu_s": samples / cpu,
        }
    return rates


def feature_cache_bytes_per_row(work: Path, rows: int = 16, tokens: int = 257, hidden: int = 1024) -> dict:
    """Bytes a row of the saved feature cache takes: the column `add_vision_features` writes (Array2D fp16 of
    CLIP ViT-L/14's 257 x 1024 tokens, plus the key string) saved with save_to_disk, per row."""
    from datasets import Array2D, Dataset, Features, Value

    from skinclip.feature_cache import FEATURES_COLUMN, KEY_COLUMN

    features = Features(
        {FEATURES_COLUMN: Array2D(shape=(tokens, hidden), dtype="float16"), KEY_COLUMN: Value("string")}
    )
    values = np.random.default_rng(0).standard_normal((rows, tokens, hidden)).astype(np.float16)
    key = "hf|openai/clip-vit-large-patch14|||layer-2"
    cache = Dataset.from_dict({FEATURES_COLUMN: list(values), KEY_COLUMN: [key] * rows}, features=features)
    cache.save_to_disk(str(work / "feature-cache"))
    per_row = folder_bytes(work / "feature-cache") / rows
    return {
        "bytes_per_row": per_row,
        "formula_bytes_per_row": tokens * hidden * 2,
        "all_rows_gib": per_row * ALL_ROWS / 2**30,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--source", type=Path, default=SHARED_ISIC, help="folder with the two real ISIC 2019 CSVs")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--collator-samples", type=int, default=256)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="isic-scale-"))
    raw, output = work / "raw", work / "converted"
    report = {"rows_asked": args.rows, "load_average_start": list(os.getloadavg()), "date": time.strftime("%F")}
    rows = subset_csvs(args.source, args.rows, raw)
    report["images"] = write_images(rows, raw / "ISIC_2019_Training_Input")
    report["conversion"] = convert(raw, output)
    report["collator"] = collator_rate(output, paper_processor(work / "bases"), args.collator_samples)
    report["feature_cache"] = feature_cache_bytes_per_row(work)
    report["load_average_end"] = list(os.getloadavg())
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
