"""What every training run reads and writes: its config, its data and its prediction files.

One set of rules for train.py and the baselines (`skinclip.baselines.timm_finetune`,
`skinclip.baselines.zero_shot_clip`), and the config reader of reproduce_tables.py, so that a field means the same
everywhere:

* a config is a YAML file read as YAML 1.2 (``save_strategy: no`` is the string "no", ``3e-3`` a float);
  ``extends: other.yaml`` (relative to the file) is read first and overridden;
* ``--field=value`` after the file overrides a field, its value read by the same YAML rules; a bare ``--flag``
  is true; without a YAML file the arguments go to ``HfArgumentParser`` as a command line;
* every value is type-checked against its dataclass field (`skinclip.validation.check_field_types`) and a bad
  one is a `UserError` naming the field.

Data: `load_training_data` gives the ``DatasetDict`` exactly as train.py sees it (demo generation, split and
column checks, the stratified ``train_fraction``). Files: ``<split>_predictions.csv`` (``image_id, label``, one
probability column per class) and ``<split>_metrics.json`` (strict JSON), written atomically by
`write_split_outputs`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from skinclip import validation
from skinclip.errors import UserError
from skinclip.output_folder import atomic_write_text

REQUIRED_COLUMNS = ("image", "label", "metadata_text", "report")


# --------------------------------------------------------------------------------------------------------
# Config files and overrides
# --------------------------------------------------------------------------------------------------------


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 would read `save_strategy: no` as False."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# YAML 1.1 needs a dot in a float, so `3e-3` would stay a string and reach the optimizer as one.
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def read_yaml(text: str):
    """A YAML document or a single ``--field=value`` value, by this project's rules (YAML 1.2 scalars)."""
    return yaml.load(text, Loader=_YamlLoader)


def load_yaml_config(path: Path, _seen: tuple = ()) -> dict:
    """Read a training YAML; ``extends: other.yaml`` (relative to this file) is read first and overridden."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training config {path} does not exist")
    if path.resolve() in _seen:
        raise UserError(f"training config {path} extends itself through {[str(p) for p in _seen]}")
    try:
        values = read_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise UserError(f"training config {path} is not UTF-8 text (byte {error.start})") from error
    except yaml.YAMLError as error:
        raise UserError(f"training config {path} is not valid YAML: {' '.join(str(error).split())}") from error
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise UserError(f"training config {path} must be a mapping of field: value, got {type(values).__name__}")
    odd_keys = [key for key in values if not isinstance(key, str)]
    if odd_keys:
        raise UserError(f"training config {path}: field names must be text, got {odd_keys[:3]}")
    parent = values.pop("extends", None)
    if parent is not None and not (isinstance(parent, str) and parent.strip()):
        raise UserError(f"training config {path}: extends must name one YAML file, got {parent!r}")
    if parent:
        parent_path = path.parent / parent
        if not parent_path.is_file():
            raise UserError(f"training config {path} extends {parent_path}, which does not exist")
        values = {**load_yaml_config(parent_path, _seen + (path.resolve(),)), **values}
    return values


def parse_config(argv: Sequence[str], dataclass_types: tuple, adjust: Callable[[dict], None] | None = None) -> tuple:
    """``[config.yaml, --field=value, ...]`` (or a plain command line) → one instance of each dataclass.

    ``adjust`` may change the values read from the file and overrides before they are checked (train.py's
    ``--dry_run`` sets ``use_cpu`` there). Ranges are the caller's to check.
    """
    from transformers import HfArgumentParser

    argv = [str(arg) for arg in argv]
    parser = HfArgumentParser(dataclass_types)
    if not argv or not argv[0].endswith((".yaml", ".yml")):
        return _user_errors(parser.parse_args_into_dataclasses, "arguments", args=argv)
    values = load_yaml_config(Path(argv[0]))
    for override in argv[1:]:
        if not override.startswith("--"):
            raise UserError(f"override {override!r} must look like --field=value")
        key, _, value = override[2:].partition("=")
        values[key] = read_yaml(value) if "=" in override else True
    if adjust is not None:
        adjust(values)
    validation.check_field_types(values, dataclass_types, argv[0])
    return _user_errors(parser.parse_dict, argv[0], values, allow_extra_keys=False)


def _user_errors(parse, source: str, *args, **kwargs) -> tuple:
    # TrainingArguments.__post_init__ rejects some values itself (with a ValueError naming the field).
    try:
        return tuple(parse(*args, **kwargs))
    except (ValueError, TypeError) as error:
        raise UserError(f"{source}: {error}") from error


# --------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------


@dataclass
class DataArguments:
    """Which dataset a run reads and which of its splits; shared by train.py and the baselines."""

    dataset_path: str | None = field(
        default=None, metadata={"help": "A DatasetDict saved by datasets_scripts (save_to_disk directory)."}
    )
    demo_dataset: bool = field(default=False, metadata={"help": "Generate the demo dataset into dataset_path."})
    ham10000_dir: str | None = field(
        default=None,
        metadata={
            "help": "A folder in the official HAM10000 layout (metadata CSV + images, e.g. ../shared/data/"
            "ham10000-mini): converted into dataset_path on first use (datasets_scripts.ham10000, seed 0)."
        },
    )
    demo_num_per_class: int = field(default=24)
    demo_image_size: int = field(default=64)
    train_split: str = field(default="train")
    eval_split: str = field(default="validation")
    test_split: str | None = field(default="test")
    train_fraction: float = field(
        default=1.0, metadata={"help": "Stratified subsample of train (0.12: the paper's 12 per cent)."}
    )
    cache_vision_features: bool = field(
        default=False,
        metadata={"help": "Run the frozen CLIP tower once and train on its cached fp16 tokens (needs augment: false)."},
    )
    # Here because transformers 5's TrainingArguments no longer has it.
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace an earlier run in output_dir (its checkpoints and outputs; other files are kept)."},
    )
    dry_run: bool = field(
        default=False,
        metadata={
            "help": "Check config and data, tokenise one batch, print the parameter table and GPU memory plan; "
            "load no weights, train nothing (skinclip/dry_run.py)."
        },
    )
    dry_run_json: str | None = field(
        default=None, metadata={"help": "Also write the dry run's plan to this JSON file."}
    )


def load_training_data(data_args: DataArguments, seed: int):
    """The DatasetDict of a run: demo data generated if asked, splits and columns checked, train subsampled."""
    from datasets import load_from_disk

    if data_args.demo_dataset:
        from datasets_scripts.demo import build_demo_dataset

        target = Path(data_args.dataset_path or "outputs/demo-data")
        if not (target / "dataset_dict.json").is_file():
            build_demo_dataset(
                num_per_class=data_args.demo_num_per_class,
                image_size=data_args.demo_image_size,
                seed=seed,
                output_dir=str(target),
            )
        data_args.dataset_path = str(target)
    if data_args.ham10000_dir:
        if not data_args.dataset_path:
            raise UserError("ham10000_dir needs dataset_path: the folder to write the converted dataset to")
        if not (Path(data_args.dataset_path) / "dataset_dict.json").is_file():
            from datasets_scripts.ham10000 import convert

            if not Path(data_args.ham10000_dir).is_dir():
                raise UserError(f"ham10000_dir {data_args.ham10000_dir} is not a folder")
            convert(data_args.ham10000_dir, data_args.dataset_path)  # the converter's own default split and seed
    if not data_args.dataset_path:
        raise ValueError("set dataset_path (a DatasetDict from datasets_scripts) or demo_dataset: true")
    dataset = load_from_disk(data_args.dataset_path)
    for split in filter(None, (data_args.train_split, data_args.eval_split, data_args.test_split)):
        if split not in dataset:
            raise UserError(f"{data_args.dataset_path} has no split {split!r} (it has {list(dataset)})")
        missing = [column for column in REQUIRED_COLUMNS if column not in dataset[split].column_names]
        if missing:
            raise UserError(f"{data_args.dataset_path} split {split!r} lacks required column(s) {missing}")
    if data_args.train_fraction < 1.0:
        from datasets_scripts.splits import subsample_train

        dataset[data_args.train_split] = subsample_train(
            dataset[data_args.train_split], data_args.train_fraction, seed=seed
        )
    return dataset


def image_ids_of(split_dataset) -> list:
    """The split's ``image_id`` column, or row numbers where it has none."""
    if "image_id" in split_dataset.column_names:
        return list(split_dataset["image_id"])
    return list(range(len(split_dataset)))


# --------------------------------------------------------------------------------------------------------
# Prediction files
# --------------------------------------------------------------------------------------------------------


def write_predictions(path: Path, image_ids, labels: np.ndarray, probs: np.ndarray, class_names: list[str]) -> None:
    """``image_id, label, <class>...``: one row per image, the true class by name, one probability per class."""
    import pandas as pd

    frame = pd.DataFrame(probs, columns=list(class_names))
    frame.insert(0, "label", [class_names[i] for i in labels])
    frame.insert(0, "image_id", list(image_ids))
    atomic_write_text(path, frame.to_csv(index=False))


def write_split_outputs(
    output_dir: str | Path, split: str, image_ids, labels, probs: np.ndarray, class_names: list[str], metrics: dict
) -> dict:
    """``<split>_predictions.csv`` and ``<split>_metrics.json`` (strict JSON: an undefined metric is null)."""
    from skinclip.classification_metrics import to_strict_json

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_predictions(
        output_dir / f"{split}_predictions.csv", image_ids, np.asarray(labels).astype(int), probs, class_names
    )
    atomic_write_text(output_dir / f"{split}_metrics.json", to_strict_json(metrics))
    return metrics
