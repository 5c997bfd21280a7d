"""The one validation layer for user values: config fields, dataset labels, output folders, checkpoints.

Every check raises :class:`skinclip.errors.UserError` with a message naming the field, file or split, and runs
before any model or data is built, so a bad value costs seconds instead of a crash (or a silently wrong run)
inside torch. ``train.py`` and ``evaluate_skinclip.py`` call these; they hold no checks of their own.
"""

from __future__ import annotations

import json
import math
import re
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from skinclip.errors import UserError

# --------------------------------------------------------------------------------------------------------
# Config fields: types
# --------------------------------------------------------------------------------------------------------

_SIMPLE_KINDS = (bool, int, float, str)


def _field_kind(hint) -> tuple[Any, bool]:
    """A field's annotation → (kind to check, None allowed). Kind is a simple type, ``list[str]`` or None
    (a union of several types or an enum: left to the dataclass's own ``__post_init__``)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        rest = [arg for arg in args if arg is not type(None)]
        kind = _field_kind(rest[0])[0] if len(rest) == 1 else None
        return kind, type(None) in args
    if hint in _SIMPLE_KINDS:
        return hint, False
    if origin is list and typing.get_args(hint) == (str,):
        return list[str], False
    return None, False


def _type_hints(cls) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation this Python cannot resolve: fall back to the declared objects
        return {f.name: f.type for f in fields(cls)}


def _has_kind(value: Any, kind: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        # Any scalar: YAML reads `resume_from_checkpoint: true` as a bool that the Trainer expects, and a
        # numeric revision as an int. Only a list or mapping cannot be meant.
        return isinstance(value, (str, bool, int, float))
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


_KIND_WORDS = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a single value",
    list[str]: "a list of strings",
}


def check_field_types(values: dict, dataclass_types: Iterable[type], source: str) -> None:
    """Each value given in a config has its field's type, and every number is finite.

    YAML hands over what it read: ``learning_rate: fast`` stays the string "fast" and ``lambda_cal: .nan`` a NaN
    float, and ``HfArgumentParser.parse_dict`` passes both on unchecked, to fail (or not) deep inside torch.
    """
    kinds: dict[str, tuple[Any, bool]] = {}
    for cls in dataclass_types:
        hints = _type_hints(cls)
        for dataclass_field in fields(cls):
            kinds[dataclass_field.name] = _field_kind(hints.get(dataclass_field.name))
    for name, value in values.items():
        kind, optional = kinds.get(name, (None, True))
        if kind is None or (value is None and optional):
            continue
        if not _has_kind(value, kind):
            raise UserError(f"{source}: {name} must be {_KIND_WORDS[kind]}, got {value!r}")
        if kind in (int, float) and not math.isfinite(value):
            raise UserError(f"{source}: {name} must be a finite number, got {value!r}")


# --------------------------------------------------------------------------------------------------------
# Config fields: ranges and combinations
# --------------------------------------------------------------------------------------------------------

# field -> (lowest allowed, whether the lowest itself is allowed)
_LOWER_BOUNDS: dict[str, tuple[float, bool]] = {
    # CFA loss: a negative weight turns a loss term into a reward (lambda_cal: -5 trains to chance).
    "lambda_align": (0, True),
    "lambda_cal": (0, True),
    "lambda_gen": (0, True),
    "focal_gamma": (0, True),
    "learning_rate": (0, False),
    "weight_decay": (0, True),
    "max_grad_norm": (0, True),
    "per_device_train_batch_size": (1, True),
    "per_device_eval_batch_size": (1, True),
    "gradient_accumulation_steps": (1, True),
    "max_consecutive_nonfinite": (1, True),
    "final_rationale_rows": (0, True),
    "logging_steps": (0, False),
    "dataloader_num_workers": (0, True),
    "save_total_limit": (1, True),
    "lora_r": (1, True),
    "lora_alpha": (0, False),
    "lora_dropout": (0, True),
    "focal_dim": (1, True),
    "alignment_dim": (1, True),
    "focal_fusion_layers": (0, True),
    "image_token_pooling": (1, True),
    "max_prompt_tokens": (1, True),
    "max_rationale_tokens": (1, True),
    "demo_num_per_class": (5, True),
    "demo_image_size": (8, True),
    "train_fraction": (0, False),
}
# field -> (highest allowed, whether the highest itself is allowed)
_UPPER_BOUNDS: dict[str, tuple[float, bool]] = {"lora_dropout": (1, False), "train_fraction": (1, True)}


def _number(name: str, value: Any) -> float:
    """The value as a finite number, or a UserError naming the field (also for values set from Python)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    return value


def _check_bounds(name: str, value: Any) -> None:
    if value is None:
        return
    value = _number(name, value)
    if name in _LOWER_BOUNDS:
        low, inclusive = _LOWER_BOUNDS[name]
        if value < low or (value == low and not inclusive):
            raise UserError(f"{name} must be {'>=' if inclusive else '>'} {low}, got {value!r}")
    if name in _UPPER_BOUNDS:
        high, inclusive = _UPPER_BOUNDS[name]
        if value > high or (value == high and not inclusive):
            raise UserError(f"{name} must be {'<=' if inclusive else '<'} {high}, got {value!r}")


def cli_number(
    kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
):
    """The ``type=`` of a numeric command-line option: the value parsed as ``kind``, finite and within
    [``low``, ``high``] (an open end excludes the bound), or argparse's one-line usage error naming the option.

    The one range check of every entry point's numbers (``--batch-size 0`` crashed predict; some values out of
    range were accepted and the command did nothing).
    """
    import argparse

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {text}")
        if high is not None and (value > high or (high_open and value == high)):
            raise argparse.ArgumentTypeError(f"must be {'<' if high_open else '<='} {high}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _check_training_length(training_args) -> None:
    """An explicit ``max_steps > 0`` wins; otherwise ``num_train_epochs`` must be > 0 (0 shipped an untrained
    checkpoint with a model card)."""
    max_steps = _number("max_steps", training_args.max_steps)
    if max_steps > 0:
        return
    if max_steps != -1:
        raise UserError(f"max_steps must be > 0, or -1 to train for num_train_epochs; got {max_steps!r}")
    epochs = _number("num_train_epochs", training_args.num_train_epochs)
    if epochs <= 0:
        raise UserError(f"num_train_epochs must be > 0 (or set max_steps > 0), got {epochs!r}")


def _check_choices(model_args) -> None:
    from configuration_skinclip import (
        DTYPES,
        PROJECTOR_TYPES,
        QUANTIZATION_MODES,
        RATIONALE_CONDITIONING,
        TEXT_ENCODERS,
        VISION_BACKENDS,
    )

    choices = {
        "vision_backend": VISION_BACKENDS,
        "quantization": QUANTIZATION_MODES,
        "compute_dtype": DTYPES,
        "text_encoder": TEXT_ENCODERS,
        "projector_type": PROJECTOR_TYPES,
        "rationale_conditioning": RATIONALE_CONDITIONING,
    }
    for name, allowed in choices.items():
        value = getattr(model_args, name, None)
        if value not in allowed:
            raise UserError(f"{name}={value!r} is not supported; choose one of {list(allowed)}")
    from configuration_skinclip import VISION_BACKENDS_WITH_TEXT

    if model_args.text_encoder == "clip" and model_args.vision_backend not in VISION_BACKENDS_WITH_TEXT:
        raise UserError(
            f"vision_backend={model_args.vision_backend!r} is an image-only backbone with no text tower to embed "
            "the reports: set text_encoder: decoder"
        )


def focal_alpha_weights(setting: Any) -> list[float] | None:
    """``focal_alpha`` → explicit per-class weights, or None for the named settings; a UserError otherwise."""
    if setting in ("inverse_frequency", "uniform"):
        return None
    try:
        weights = [float(part) for part in str(setting).split(",")]
    except ValueError:
        weights = []
    if not weights or any(not math.isfinite(w) or w < 0 for w in weights):
        raise UserError(
            f"focal_alpha must be 'inverse_frequency', 'uniform' or comma-separated non-negative "
            f"weights, got {setting!r}"
        )
    return weights


def check_training_arguments(model_args, data_args, training_args) -> None:
    """Ranges, choices and combinations of every train.py field that would otherwise fail late or silently."""
    for args in (model_args, data_args, training_args):
        names = {f.name for f in fields(args)} if is_dataclass(args) else set(vars(args))
        for name in sorted(names & (set(_LOWER_BOUNDS) | set(_UPPER_BOUNDS))):
            _check_bounds(name, getattr(args, name))
    _check_training_length(training_args)
    _check_choices(model_args)
    focal_alpha_weights(training_args.focal_alpha)
    if data_args.cache_vision_features and training_args.augment:
        raise UserError("cache_vision_features needs augment: false (augmented images need fresh CLIP features)")
    if not data_args.train_split:
        raise UserError("train_split must name a split of the dataset")
    if getattr(data_args, "overwrite_output_dir", False) and training_args.resume_from_checkpoint:
        raise UserError("overwrite_output_dir and resume_from_checkpoint contradict each other: choose one")
    _check_shareable_bases(model_args, training_args)


def _check_shareable_bases(model_args, training_args) -> None:
    """push_to_hub with bases that are local folders would share a checkpoint no one else can load: refused before
    training rather than after it (SkinClipVLModel.save_pretrained refuses the push itself too)."""
    if not getattr(training_args, "push_to_hub", False) or getattr(model_args, "include_bases", True):
        return
    local = [
        f"{name} {value!r}"
        for name, value in (("vision_model", model_args.vision_model), ("decoder_model", model_args.decoder_model))
        if Path(str(value).removeprefix("local-dir:")).expanduser().is_dir()
    ]
    if model_args.tiny_bases_dir:
        local.append(f"tiny_bases_dir {model_args.tiny_bases_dir!r}")
    if local:
        raise UserError(
            f"push_to_hub with local base folders ({'; '.join(local)}): a Hub user could not load the checkpoint. "
            "Name the bases by Hub id, or set include_bases: true to copy them into the checkpoint"
        )


# --------------------------------------------------------------------------------------------------------
# Dataset labels
# --------------------------------------------------------------------------------------------------------


def split_class_names(dataset, split: str, source: str) -> list[str]:
    """The ``label`` ClassLabel names of a split: the one source of class names and their order."""
    from datasets import ClassLabel

    if split not in dataset:
        raise UserError(f"{source} has no split {split!r} (it has {list(dataset)})")
    feature = dataset[split].features.get("label")
    if not isinstance(feature, ClassLabel):
        raise UserError(
            f"{source} split {split!r}: column 'label' must be a ClassLabel (names and order of the "
            f"classes), got {feature!r}"
        )
    return list(feature.names)


def check_not_empty(dataset, split: str, source: str) -> None:
    if len(dataset[split]) == 0:
        raise UserError(f"{source} split {split!r} is empty")


def check_same_classes(names: Sequence[str], expected: Sequence[str], where: str, reference: str) -> None:
    """Same class names in the same order; the message says whether the order or the set differs."""
    if list(names) == list(expected):
        return
    if sorted(names) == sorted(expected):
        raise UserError(
            f"{where} lists the classes {list(names)} in another order than {reference} "
            f"{list(expected)}: label indices would mean other classes"
        )
    raise UserError(f"{where} has the classes {list(names)}, {reference} has {list(expected)}")


def _label_values(split, where: str, num_classes: int) -> set[int]:
    present = set(int(label) for label in split["label"])
    invalid = sorted(label for label in present if not 0 <= label < num_classes)
    if invalid:
        raise UserError(f"{where} has label values {invalid[:5]} outside 0..{num_classes - 1} (missing labels?)")
    return present


def check_split_labels(dataset, train_split: str, other_splits: Iterable[str | None], source: str) -> list[str]:
    """Every split is non-empty, has the training split's classes in its order, and holds no class absent from
    training (such a class cannot be learned, and evaluation crashed on it after the first epoch).

    Returns the training class names.
    """
    class_names = split_class_names(dataset, train_split, source)
    check_not_empty(dataset, train_split, source)
    trained = _label_values(dataset[train_split], f"{source} split {train_split!r}", len(class_names))
    for split in filter(None, dict.fromkeys(other_splits)):
        if split == train_split:
            continue
        where = f"{source} split {split!r}"
        check_same_classes(
            split_class_names(dataset, split, source), class_names, where, f"the training split {train_split!r}"
        )
        check_not_empty(dataset, split, source)
        unseen = sorted(_label_values(dataset[split], where, len(class_names)) - trained)
        if unseen:
            raise UserError(
                f"{where} holds class(es) {[class_names[i] for i in unseen]} that the training split "
                f"{train_split!r} lacks"
            )
    return class_names


def check_focal_alpha_count(setting: Any, num_classes: int) -> None:
    weights = focal_alpha_weights(setting)
    if weights is not None and len(weights) != num_classes:
        raise UserError(f"focal_alpha gives {len(weights)} weights for {num_classes} classes")


# --------------------------------------------------------------------------------------------------------
# Output folder of a training run
# --------------------------------------------------------------------------------------------------------

_CHECKPOINT_DIR = re.compile(r"^checkpoint-\d+$")
# Folders train.py / Trainer write into by exact name; a file of someone else's in one would mix with the run's.
# (``runs/`` is not among them: TensorBoard writes a new ``runs/<time>_<host>/`` each run, beside others.)
_RUN_DIRS = {"lora", "tokenizer", "report_tokenizer", "image_processor"}
_RUN_FILES = {
    "model.safetensors",
    "configuration_skinclip.py",
    "modeling_skinclip.py",
    "processing_skinclip.py",
    "training_args.bin",  # runs from before training_args.json
    "training_args.json",
    "calibration.json",
    "trainer_state.json",
    "all_results.json",
    "train_results.json",
    "eval_results.json",
}


def _run_would_write(relative: str) -> bool:
    """Whether a run writes at ``relative`` (a path under output_dir): a foreign file there would be overwritten
    or mixed with the run's own."""
    parts = Path(relative).parts
    if len(parts) > 1:
        return parts[0] in _RUN_DIRS or bool(_CHECKPOINT_DIR.match(parts[0]))
    name = parts[0]
    return name in {"README.md", "config.json", *_RUN_FILES} or name.endswith(("_metrics.json", "_predictions.csv"))


def _describe_contents(names: set[str], listed: set[str]) -> str:
    """What a refused output folder holds, for the message: ``names`` are its top-level entries, ``listed`` those
    its manifest lists (a folder from before manifests is described by its names)."""
    known = listed or names
    if "model.safetensors" in known:
        what = "a finished run"
    elif any(_CHECKPOINT_DIR.match(name) for name in known):
        what = "checkpoints of an unfinished run (continue it with --resume_from_checkpoint=true)"
    elif listed:
        what = "outputs of an earlier run"
    else:
        return f"files not written by SkinCLIP-VL ({', '.join(sorted(names)[:3])}{', ...' if len(names) > 3 else ''})"
    others = sorted(names - listed) if listed else []
    if others:
        what += f" and other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})"
    return what


def check_output_dir(output_dir: str | Path, overwrite: bool, resume: Any) -> list[str]:
    """Refuse an output folder holding anything unless the user asked to overwrite it or to resume into it.

    A new run into a finished run's folder overwrote its model, metrics and card, rotated its checkpoints
    away and mixed the two runs' checkpoints. A symlink anywhere in the folder is refused (the run would write
    through it, outside the folder). Returns the files an overwrite removes: exactly those the folder's
    manifest lists as written by SkinCLIP-VL and unchanged since (`skinclip.output_folder`); nothing is
    removed by its name.
    """
    from skinclip import output_folder

    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output_dir {folder} is a file, not a folder")
    if not folder.is_dir():
        return []
    output_folder.refuse_symlinks(folder)
    names = {entry.name for entry in folder.iterdir() if entry.name not in output_folder.CONTROL_FILES}
    names = {name for name in names if not name.startswith(output_folder.LOCK_NAME + ".")}
    if not names or resume:
        return []
    owned, foreign = output_folder.owned_and_foreign(folder)
    if overwrite:
        clashing = [name for name in foreign if _run_would_write(name)]
        if clashing:
            raise UserError(
                f"output_dir {folder} holds {clashing[:5]}{' ...' if len(clashing) > 5 else ''}, not listed in its "
                f"manifest ({output_folder.MANIFEST_NAME}) as written by SkinCLIP-VL, which the run would overwrite "
                "or mix with its own; move them or choose another output_dir"
            )
        return owned
    listed = {Path(name).parts[0] for name in owned}
    raise UserError(
        f"output_dir {folder} already holds {_describe_contents(names, listed)}; "
        "choose another output_dir, or pass --overwrite_output_dir=true to replace the run's outputs (other files "
        "are kept)"
    )


# --------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------


def load_checkpoint(path: str | Path, **kwargs):
    """``SkinClipVLModel.from_pretrained`` whose failures on a bad checkpoint name the checkpoint.

    A corrupt ``model.safetensors`` raised safetensors' bare "Error while deserializing header".
    """
    from modeling_skinclip import TRAINED_WEIGHTS_NAME, SkinClipVLModel

    try:
        return SkinClipVLModel.from_pretrained(path, **kwargs)
    except (UserError, FileNotFoundError):
        raise
    except ValueError as error:  # mismatched or non-finite tensors, config disagreements: already named
        raise UserError(f"cannot load checkpoint {path}: {error}") from error
    except Exception as error:
        if type(error).__name__ == "SafetensorError":
            raise UserError(
                f"{Path(path) / TRAINED_WEIGHTS_NAME} is not a readable safetensors file "
                f"(corrupt or truncated?): {error}"
            ) from error
        if isinstance(error, OSError):
            raise UserError(f"cannot load checkpoint {path}: {error}") from error
        raise


def load_checkpoint_config(path: str | Path):
    """A checkpoint's config alone (class names and bases), to check data before the model is built."""
    from configuration_skinclip import SkinClipVLConfig

    if not Path(path).exists() and not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        return SkinClipVLConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the config of checkpoint {path}: {error}") from error


def is_checkpoint_dir(path: str | Path) -> bool:
    folder = Path(path)
    return (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()


# --------------------------------------------------------------------------------------------------------
# Files read back (validated like user input, the file named)
# --------------------------------------------------------------------------------------------------------


def read_json_file(path: str | Path, what: str) -> dict:
    """A JSON object from ``path``; unreadable, invalid (NaN included) or not an object is a UserError naming it."""
    path = Path(path)

    def reject_constant(name):
        raise ValueError(f"{name} is not a number in strict JSON")

    try:
        content = json.loads(path.read_text(encoding="utf-8"), parse_constant=reject_constant)
    except UnicodeDecodeError as error:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {error.start}); rewrite it or delete it") from error
    except ValueError as error:  # json.JSONDecodeError names line and column
        raise UserError(f"{what} {path} is not valid JSON: {error}; rewrite it or delete it") from error
    if not isinstance(content, dict):
        raise UserError(f"{what} {path} must hold a JSON object, got {type(content).__name__}")
    return content


def _finite(value: Any, where: str, low: float | None = None, high: float | None = None, open_ends=True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where} must be a finite number, got {value!r}")
    if low is not None and (value < low or (open_ends and value == low)):
        raise UserError(f"{where} must be {'>' if open_ends else '>='} {low}, got {value!r}")
    if high is not None and (value > high or (open_ends and value == high)):
        raise UserError(f"{where} must be {'<' if open_ends else '<='} {high}, got {value!r}")
    return value


def check_calibration(calibration: dict, path: str | Path) -> dict:
    """``calibration.json`` as evaluate_skinclip.py writes it: a temperature > 0 and, optionally, a conformal
    threshold (method aps/raps/lac, coverage in (0, 1), qhat finite). Returns it; a bad field names the file."""
    where = f"{path}:"
    if "temperature" in calibration:
        _finite(calibration["temperature"], f"{where} temperature", low=0)
    conformal = calibration.get("conformal")
    if conformal is None:
        return calibration
    if not isinstance(conformal, dict):
        raise UserError(f"{where} conformal must be an object, got {conformal!r}")
    if conformal.get("method") not in ("aps", "raps", "lac"):
        raise UserError(f"{where} conformal.method must be 'aps', 'raps' or 'lac', got {conformal.get('method')!r}")
    _finite(conformal.get("coverage"), f"{where} conformal.coverage", low=0, high=1)
    _finite(conformal.get("qhat"), f"{where} conformal.qhat")
    if "raps_lambda" in conformal:
        _finite(conformal["raps_lambda"], f"{where} conformal.raps_lambda", low=0, open_ends=False)
    if "raps_k_reg" in conformal:
        k_reg = conformal["raps_k_reg"]
        if isinstance(k_reg, bool) or not isinstance(k_reg, int) or k_reg < 0:
            raise UserError(f"{where} conformal.raps_k_reg must be an integer >= 0, got {k_reg!r}")
    return calibration


# --------------------------------------------------------------------------------------------------------
# evaluate_skinclip.py
# --------------------------------------------------------------------------------------------------------


def check_evaluation_arguments(args) -> None:
    """``--coverage``, ``--bootstrap``, ``--batch-size``, ``--rationales``, ``--max-new-tokens`` and ``--out`` (never
    a checkpoint folder)."""
    coverage = _number("--coverage", args.coverage)
    if not 0 < coverage < 1:
        raise UserError(f"--coverage must be in (0, 1), got {coverage}")
    if args.bootstrap < 0:
        raise UserError(f"--bootstrap must be >= 0 (0 = no confidence intervals), got {args.bootstrap}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if getattr(args, "calibration_split", None) and args.calibration_split == getattr(args, "split", None):
        raise UserError(
            f"--calibration-split {args.split!r} is the split being scored (--split): calibration fitted on the "
            "images it is scored on reports a calibration it does not have; choose another split, or "
            "--calibration-split '' to skip calibration"
        )
    if getattr(args, "rationales", 0) < 0:
        raise UserError(f"--rationales must be >= 0 (0 = no rationales), got {args.rationales}")
    if getattr(args, "max_new_tokens", None) is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if is_checkpoint_dir(out) or (
        out.exists() and Path(args.model).exists() and out.resolve() == Path(args.model).resolve()
    ):
        # Its calibration.json would silently calibrate the checkpoint; --save-calibration is the one way.
        raise UserError(
            f"--out {out} is a checkpoint folder; write the evaluation elsewhere (--save-calibration "
            "stores the calibration in the checkpoint)"
        )


def load_dataset_dict(path: str | Path, field: str):
    """``load_from_disk`` of a DatasetDict, with errors naming the option and folder."""
    from datasets import DatasetDict, load_from_disk

    if not Path(path).exists():
        raise UserError(f"{field} {path} does not exist")
    try:
        dataset = load_from_disk(str(path))
    except FileNotFoundError as error:
        raise UserError(f"{field} {path} is not a dataset saved with save_to_disk: {error}") from error
    except Exception as error:
        # datasets cannot read back a split saved with no rows (IndexError deep inside pyarrow concatenation).
        for split in _saved_empty_splits(Path(path)):
            raise UserError(f"{path} split {split!r} is empty") from error
        raise UserError(f"{field} {path} cannot be read as a DatasetDict: {error!r}") from error
    if not isinstance(dataset, DatasetDict):
        raise UserError(f"{field} {path} is a single Dataset; a DatasetDict of named splits is needed")
    return dataset


def _saved_empty_splits(folder: Path) -> list[str]:
    empty = []
    for state in sorted(folder.glob("*/state.json")):
        try:
            if not json.loads(state.read_text()).get("_data_files"):
                empty.append(state.parent.name)
        except (OSError, ValueError):
            continue
    return empty


def check_evaluation_splits(
    dataset, split: str, calibration_split: str | None, class_names: Sequence[str], source: str
) -> bool:
    """Checks the evaluated and calibration splits before anything is computed or written.

    Returns whether the split is scored in the model's classes (True) or out of distribution as a binary
    benign/malignant task (False).
    """
    data_classes = split_class_names(dataset, split, source)
    if "image" not in dataset[split].column_names:
        raise UserError(f"{source} split {split!r} lacks the required column 'image'")
    check_not_empty(dataset, split, source)
    where = f"{source} split {split!r}"
    in_model_classes = sorted(data_classes) == sorted(class_names)
    if in_model_classes:
        check_same_classes(data_classes, class_names, where, "the model's")
    elif len(data_classes) != 2:
        raise UserError(
            f"{where} has the classes {data_classes}, which match neither the model's "
            f"{list(class_names)} nor a binary benign/malignant task"
        )
    _label_values(dataset[split], where, len(data_classes))
    if in_model_classes and calibration_split and calibration_split in dataset:
        where = f"{source} calibration split {calibration_split!r}"
        check_same_classes(split_class_names(dataset, calibration_split, source), class_names, where, "the model's")
        check_not_empty(dataset, calibration_split, source)
        _label_values(dataset[calibration_split], where, len(class_names))
    return in_model_classes


_POSITIVE_NAMES = {"malignant", "positive", "1", "true", "yes"}
_NEGATIVE_NAMES = {"benign", "negative", "0", "false", "no"}


def binary_positive_class(names: Sequence[str], model_classes: Sequence[str], option: str | None) -> tuple[str, str]:
    """(the positive class of a binary split, where that came from): ``--positive-class``, or the split's own
    label names when exactly one says positive (malignant, positive, 1) and the other negative (benign, ...).

    Anything else is refused: "MEL" vs "NV", two of the model's classes, says nothing about which is positive
    (it was guessed, the first name matching a list, else index 1, without a word).
    """
    names = list(names)
    if option is not None:
        if option not in names:
            raise UserError(f"--positive-class {option!r} is not a class of the evaluated split (it has {names})")
        return option, "--positive-class"
    lowered = [name.lower() for name in names]
    positive = [name for name, low in zip(names, lowered) if low in _POSITIVE_NAMES]
    negative = [name for name, low in zip(names, lowered) if low in _NEGATIVE_NAMES]
    if len(positive) == 1 and len(negative) == 1:
        return positive[0], "the split's label names"
    overlap = sorted(set(names) & set(model_classes))
    why = f" ({overlap} are classes of the model: a subset, not a benign/malignant set)" if overlap else ""
    raise UserError(
        f"cannot tell which of the split's classes {names} is the positive (malignant) one{why}; "
        "pass --positive-class NAME"
    )


def malignant_class_set(
    positive: str, model_classes: Sequence[str], option: Sequence[str] | None
) -> tuple[list[str], str]:
    """(the model's classes whose probabilities add up to the malignant score, where that came from).

    ``--malignant-classes``; else, for a split whose positive class is one of the model's classes (a subset),
    that class; else the ISIC malignant diagnoses the model has (`skinclip.labels.MALIGNANT_CLASSES`).
    """
    from skinclip.labels import MALIGNANT_CLASSES

    model_classes = list(model_classes)
    if option:
        unknown = [name for name in option if name not in model_classes]
        if unknown:
            raise UserError(f"--malignant-classes {unknown} are not classes of the model ({model_classes})")
        return list(dict.fromkeys(option)), "--malignant-classes"
    if positive in model_classes:
        return [positive], "the split's positive class"
    chosen = [name for name in MALIGNANT_CLASSES if name in model_classes]
    if not chosen:
        raise UserError(
            f"none of the malignant diagnoses {list(MALIGNANT_CLASSES)} is a class of the model ({model_classes}); "
            "pass --malignant-classes NAME,NAME"
        )
    return chosen, f"the default malignant diagnoses {list(MALIGNANT_CLASSES)}"


__all__ = [
    "check_calibration",
    "read_json_file",
    "binary_positive_class",
    "cli_number",
    "malignant_class_set",
    "check_evaluation_arguments",
    "check_evaluation_splits",
    "check_field_types",
    "check_focal_alpha_count",
    "check_not_empty",
    "check_output_dir",
    "check_same_classes",
    "check_split_labels",
    "check_training_arguments",
    "focal_alpha_weights",
    "is_checkpoint_dir",
    "load_checkpoint",
    "load_checkpoint_config",
    "load_dataset_dict",
    "split_class_names",
]
