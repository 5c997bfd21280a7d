"""Generated demo set (no real data): synthetic "lesions" on skin whose class is visible in the image alone.

Classes MEL, NV, BCC, BKL, in the ISIC 2019 schema (`image_id`, `image`, `label`, `metadata_text`, `report`,
`group_id`, `age_approx`, `anatom_site_general`, `sex`, `lesion_id`). Each class has its own look, so a tiny model
learns it on a CPU in minutes:

* MEL: dark, irregular, multi-coloured blob (black-brown with blue-grey spots);
* NV: round, uniform light-brown blob;
* BCC: pink, translucent blob crossed by thin red branching lines (arborizing vessels);
* BKL: tan-yellow blob with a dotted texture (milia-like cysts).

Position, size, skin tone, blur and noise vary at random; some lesions have two images (same group). Metadata is
random (seeded) and never depends on the class. Deterministic for a seed.

    python -m datasets_scripts.demo --output-dir outputs/demo-data
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from skinclip.errors import run_entry_point

from .isic2019 import class_report
from .metadata_text import describe_metadata
from .splits import make_splits

DEMO_CLASSES = ["MEL", "NV", "BCC", "BKL"]
SITES = ["anterior torso", "posterior torso", "head/neck", "upper extremity", "lower extremity", "palms/soles"]


def _lesion_image(class_index: int, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    skin = np.array([224, 180, 150], np.float32) + rng.normal(0, 12, 3)
    image = np.broadcast_to(skin, (size, size, 3)).copy()
    centre = rng.uniform(0.35 * size, 0.65 * size, 2)
    radius = rng.uniform(0.18 * size, 0.3 * size)
    angle = np.arctan2(yy - centre[0], xx - centre[1])
    distance = np.hypot(yy - centre[0], xx - centre[1])
    if class_index == 0:  # MEL: irregular border
        wobble = 1 + 0.25 * np.sin(3 * angle + rng.uniform(0, 6.3)) + 0.15 * np.sin(5 * angle + rng.uniform(0, 6.3))
    else:
        wobble = 1 + 0.04 * np.sin(2 * angle + rng.uniform(0, 6.3))
    mask = distance < radius * wobble
    colours = {0: [60, 35, 30], 1: [150, 100, 65], 2: [235, 150, 160], 3: [185, 150, 85]}
    colour = np.array(colours[class_index], np.float32) + rng.normal(0, 8, 3)
    image[mask] = colour
    if class_index == 0:  # blue-grey and black spots
        for _ in range(4):
            spot = (
                np.hypot(yy - centre[0] - rng.normal(0, radius / 2), xx - centre[1] - rng.normal(0, radius / 2))
                < radius * 0.25
            )
            image[spot & mask] = rng.choice([[90, 100, 130], [20, 15, 15]])
    elif class_index == 2:  # thin branching red vessels
        for _ in range(3):
            theta = rng.uniform(0, np.pi)
            line = np.abs((yy - centre[0]) * np.cos(theta) - (xx - centre[1]) * np.sin(theta)) < 0.8
            image[line & mask] = [200, 30, 40]
    elif class_index == 3:  # dotted texture
        dots = (rng.random((size, size)) < 0.08) & mask
        image[dots] = [245, 240, 215]
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def build_demo_dataset(num_per_class: int = 24, image_size: int = 64, seed: int = 0, output_dir: str | None = None):
    """Generate the demo `DatasetDict` (train/validation/test, grouped and stratified); save it if ``output_dir``."""
    from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, Image, Value
    from PIL import Image as PILImage

    from .common import atomic_save

    if num_per_class < 5:
        raise ValueError(f"num_per_class must be >= 5 for three stratified splits, got {num_per_class}")
    rng = np.random.default_rng(seed)
    rows = {
        name: []
        for name in (
            "image_id",
            "image",
            "label",
            "metadata_text",
            "report",
            "group_id",
            "age_approx",
            "anatom_site_general",
            "sex",
            "lesion_id",
        )
    }
    counter = 0
    for class_index, class_name in enumerate(DEMO_CLASSES):
        made = 0
        while made < num_per_class:
            lesion_id = f"DEMO_L{counter:05d}"
            # About one lesion in four has two images (as in ISIC 2019, where lesions repeat).
            n_images = 2 if rng.random() < 0.25 and made + 2 <= num_per_class else 1
            age = None if rng.random() < 0.1 else float(rng.integers(4, 18) * 5)
            sex = None if rng.random() < 0.1 else str(rng.choice(["male", "female"]))
            site = None if rng.random() < 0.1 else str(rng.choice(SITES))
            for _ in range(n_images):
                rows["image_id"].append(f"DEMO_{counter:05d}")
                rows["image"].append(PILImage.fromarray(_lesion_image(class_index, image_size, rng)))
                rows["label"].append(class_index)
                rows["metadata_text"].append(describe_metadata(age=age, sex=sex, site=site))
                rows["report"].append(class_report(class_name))
                rows["group_id"].append(lesion_id)
                rows["age_approx"].append(age)
                rows["anatom_site_general"].append(site)
                rows["sex"].append(sex)
                rows["lesion_id"].append(lesion_id)
                counter += 1
                made += 1
    features = Features(
        {
            "image_id": Value("string"),
            "image": Image(),
            "label": ClassLabel(names=DEMO_CLASSES),
            "metadata_text": Value("string"),
            "report": Value("string"),
            "group_id": Value("string"),
            "age_approx": Value("float32"),
            "anatom_site_general": Value("string"),
            "sex": Value("string"),
            "lesion_id": Value("string"),
        }
    )
    full = Dataset.from_dict(
        rows,
        features=features,
        info=DatasetInfo(description="SkinCLIP-VL generated demo set (synthetic images).", features=features),
    )
    splits = make_splits(rows["label"], rows["group_id"], val_fraction=0.2, test_fraction=0.2, seed=seed)
    dataset_dict = DatasetDict({name: full.select(indices) for name, indices in splits.items()})
    if output_dir is not None:
        atomic_save(dataset_dict, output_dir, overwrite=True)
    return dataset_dict


def main(argv=None) -> None:
    from skinclip.validation import cli_number

    parser = argparse.ArgumentParser(
        prog="python -m datasets_scripts.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--num-per-class", type=cli_number(int, 5), default=24)
    parser.add_argument("--image-size", type=cli_number(int, 8), default=64)
    parser.add_argument("--seed", type=cli_number(int, 0), default=0)
    args = parser.parse_args(argv)
    dataset_dict = build_demo_dataset(args.num_per_class, args.image_size, args.seed, args.output_dir)
    print({name: len(split) for name, split in dataset_dict.items()}, "saved to", args.output_dir)


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
