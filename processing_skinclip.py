"""The SkinCLIP-VL processor: images, metadata prompts, reports and rationales → `SkinClipVLModel` inputs.

Shipped beside ``modeling_skinclip.py`` in every checkpoint (remote code); it resolves a checkpoint's files by the
same rule as the model (``configuration_skinclip.checkpoint_folder`` / ``resolve_base_paths``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

try:
    from .configuration_skinclip import (
        LOCAL_DIR_PREFIX,
        SkinClipVLConfig,
        checkpoint_folder,
        decoder_generation_ids,
        resolve_base_paths,
    )
    from .configuration_skinclip import hub_kwargs as _hub_kwargs_of
    from .metadata_skinclip import describe_metadata
except ImportError:  # a checkout, rather than Hub remote code
    from configuration_skinclip import (
        LOCAL_DIR_PREFIX,
        SkinClipVLConfig,
        checkpoint_folder,
        decoder_generation_ids,
        resolve_base_paths,
    )
    from configuration_skinclip import hub_kwargs as _hub_kwargs_of
    from metadata_skinclip import describe_metadata

# Processor files sit in subfolders so that the checkpoint's config.json (a custom-code config) is never read as
# a tokenizer or image-processor config.
TOKENIZER_SUBFOLDER = "tokenizer"
IMAGE_PROCESSOR_SUBFOLDER = "image_processor"
REPORT_TOKENIZER_SUBFOLDER = "report_tokenizer"


class SkinClipVLProcessor:
    """Turns images, metadata (structured, or as sentences), reports and rationales into `SkinClipVLModel` inputs.

    ``processor(images, metadata=[{"age": 55, "sex": "male", "site": "posterior torso"}])`` words each row's
    metadata with `metadata_skinclip.describe_metadata`, the function the dataset converters wrote the training
    sentences with (shipped in the checkpoint beside this file), so the prompt is the one the model was trained on.

    Holds the decoder tokenizer (prompt and rationale), the report tokenizer (the CLIP tokenizer, or the
    decoder's with `text_encoder="decoder"`) and the CLIP image preprocessing. `from_pretrained` prefers the
    copies saved in a checkpoint and falls back to the bases named in its config.
    """

    def __init__(
        self,
        config: SkinClipVLConfig,
        tokenizer,
        image_processor,
        report_tokenizer,
        stop_token_ids: Sequence[int] | None = None,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.report_tokenizer = report_tokenizer
        # Where decoded rationales end: the tokenizer's eos and every eos id of the decoder's generation config.
        self.stop_token_ids = {tokenizer.eos_token_id, *(stop_token_ids or ())} - {None}
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike | None = None,
        config: SkinClipVLConfig | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        **kwargs,
    ) -> SkinClipVLProcessor:
        """Processor of a checkpoint (local folder or Hub repo, resolved like the model) or of a config's bases.

        Also reached through ``AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)`` (the checkpoint's
        ``auto_map`` names this class), which adds arguments of its own that need nothing here.
        """
        from transformers import AutoImageProcessor, AutoTokenizer

        for handled_upstream in ("trust_remote_code", "_from_auto", "_commit_hash", "code_revision"):
            kwargs.pop(handled_upstream, None)
        if kwargs:
            raise TypeError(f"SkinClipVLProcessor.from_pretrained got unexpected arguments {sorted(kwargs)}")

        hub_kwargs = _hub_kwargs_of(
            cache_dir=cache_dir, token=token, local_files_only=local_files_only, force_download=force_download
        )
        local = checkpoint_folder(path_or_repo, revision=revision, **hub_kwargs) if path_or_repo is not None else None
        if config is None:
            if local is None:
                raise ValueError("pass a checkpoint path/repo or a SkinClipVLConfig")
            config = SkinClipVLConfig.from_json_file(str(local / "config.json"))
        if local is not None:
            config = resolve_base_paths(config, local)
        vision, decoder = config.vision_config, config.decoder_config

        def source(subfolder: str, marker: str, base: str, base_revision: str | None) -> dict:
            # Copies saved in the checkpoint win; they sit in subfolders so that the checkpoint's config.json
            # (a custom-code config) is never read as a tokenizer or image-processor config.
            if local is not None and (local / subfolder / marker).is_file():
                return {"pretrained_model_name_or_path": str(local / subfolder)}
            return {"pretrained_model_name_or_path": base, "revision": base_revision, **hub_kwargs}

        tokenizer = AutoTokenizer.from_pretrained(
            **source(TOKENIZER_SUBFOLDER, "tokenizer_config.json", decoder.model_name_or_path, decoder.revision)
        )
        if vision.backend in ("hf", "hf_vision"):
            image_processor = AutoImageProcessor.from_pretrained(
                **source(
                    IMAGE_PROCESSOR_SUBFOLDER, "preprocessor_config.json", vision.model_name_or_path, vision.revision
                )
            )
        else:
            image_processor = _open_clip_transform(vision, hub_kwargs)
        if config.text_encoder == "decoder":
            report_tokenizer = tokenizer
        elif vision.backend == "hf":
            report_tokenizer = AutoTokenizer.from_pretrained(
                **source(
                    REPORT_TOKENIZER_SUBFOLDER, "tokenizer_config.json", vision.model_name_or_path, vision.revision
                )
            )
        else:
            import open_clip

            report_tokenizer = open_clip.get_tokenizer(vision.model_name_or_path)
        return cls(config, tokenizer, image_processor, report_tokenizer, _stop_token_ids(decoder, hub_kwargs))

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        save_directory = Path(save_directory)
        self.tokenizer.save_pretrained(str(save_directory / TOKENIZER_SUBFOLDER))
        if hasattr(self.image_processor, "save_pretrained"):
            self.image_processor.save_pretrained(str(save_directory / IMAGE_PROCESSOR_SUBFOLDER))
        if self.report_tokenizer is not self.tokenizer and hasattr(self.report_tokenizer, "save_pretrained"):
            self.report_tokenizer.save_pretrained(str(save_directory / REPORT_TOKENIZER_SUBFOLDER))

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoProcessor") -> None:
        """Called by `AutoProcessor.from_pretrained` on remote-code classes; the checkpoint's ``auto_map`` (written by
        `SkinClipVLModel.save_pretrained`) already names this class, so there is nothing to record."""
        cls._auto_class = auto_class

    # ---- pieces ---------------------------------------------------------------------------------------

    def preprocess_images(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images (any mode) → `(batch, 3, H, W)` CLIP-normalised pixels."""
        rgb = [image.convert("RGB") for image in images]
        if callable(self.image_processor) and not hasattr(self.image_processor, "save_pretrained"):
            return torch.stack([self.image_processor(image) for image in rgb])
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    @staticmethod
    def metadata_text(metadata: Mapping[str, Any] | None) -> str:
        """The training sentence of one row's metadata: ``age``, ``sex``, ``site`` and the dataset's extra
        observations (e.g. ``elevation`` for Derm7pt, ``diameter_mm`` for ISIC 2024), in the caller's order.

        Missing or unusable values are left out, never guessed; an empty mapping gives "A skin lesion.".
        """
        metadata = dict(metadata or {})
        unknown = [key for key in metadata if not isinstance(key, str) or not key.isidentifier()]
        if unknown:
            raise ValueError(f"metadata keys must be field names such as 'age', 'sex', 'site'; got {unknown}")
        return describe_metadata(**metadata)

    def prompt_texts(self, metadata_texts: Sequence[str]) -> list[str]:
        # A checkpoint saved before `use_metadata` existed has no such attribute: it used the metadata.
        if not getattr(self.config, "use_metadata", True):
            metadata_texts = [""] * len(metadata_texts)
        return [self.config.prompt_template.format(metadata=(text or "").strip()) for text in metadata_texts]

    def tokenize_prompts(self, metadata_texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and mask `(batch, prompt_length)`; long metadata is cut from its start side."""
        encoded = [
            self.tokenizer(text, add_special_tokens=False)["input_ids"][-self.config.max_prompt_tokens :]
            for text in self.prompt_texts(metadata_texts)
        ]
        return _pad(encoded, self.tokenizer.pad_token_id, left=True)

    def tokenize_rationales(self, rationales: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded rationale ids ending in eos, and mask `(batch, rationale_length)`."""
        budget = self.config.max_rationale_tokens - 1
        encoded = [
            self.tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"][:budget]
            + [self.tokenizer.eos_token_id]
            for text in rationales
        ]
        return _pad(encoded, self.tokenizer.pad_token_id, left=False)

    def class_condition_inputs(self) -> dict[str, torch.Tensor]:
        """Each class's conditioning tokens ("Diagnosis: <class>."), LEFT-padded: `class_condition_ids` and
        `class_condition_attention_mask` `(num_labels, condition_length)`, row k for class k.

        Left padding puts every row's last token at the same place, the position that predicts the first
        rationale token. Training (`condition_labels`) and generation (the head's argmax) take rows of this one table,
        so a class is written the same way in both.
        """
        encoded = [
            self.tokenizer(" " + text, add_special_tokens=False)["input_ids"]
            for text in self.config.rationale_condition_texts()
        ]
        ids, mask = _pad(encoded, self.tokenizer.pad_token_id, left=True)
        return {"class_condition_ids": ids, "class_condition_attention_mask": mask}

    def tokenize_reports(self, reports: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Report tokens for t_global `(batch, report_length)`, tokenised for the report encoder."""
        if self.report_tokenizer is self.tokenizer:
            return self.tokenize_rationales(reports)
        if not hasattr(self.report_tokenizer, "pad_token_id"):  # open_clip's tokenizer pads to its context
            ids = self.report_tokenizer(list(reports))
            return ids, (ids != 0).long()
        encoded = self.report_tokenizer(
            list(reports), padding=True, truncation=True, max_length=self.config.max_report_tokens, return_tensors="pt"
        )
        return encoded["input_ids"], encoded["attention_mask"]

    def __call__(
        self,
        images: Sequence[Any] | None = None,
        metadata_texts: Sequence[str] | None = None,
        reports: Sequence[str] | None = None,
        rationales: Sequence[str] | None = None,
        condition_labels: Sequence[int] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Model inputs; each row's prompt comes from ``metadata_texts`` (sentences) or ``metadata`` (mappings
        worded by `metadata_text`), not both; with neither, every prompt holds the empty metadata sentence.
        ``condition_labels`` (class indices, the true classes in training) adds `condition_ids` and
        `condition_attention_mask`, the tokens that precede the rationale with `rationale_conditioning="class"`.
        """
        if metadata is not None:
            if metadata_texts is not None:
                raise ValueError("pass metadata (field mappings) or metadata_texts (sentences), not both")
            metadata_texts = [self.metadata_text(row) for row in metadata]
        if metadata_texts is None:
            metadata_texts = [""] * len(images)
        batch: dict[str, torch.Tensor] = {}
        if images is not None:
            if len(images) != len(metadata_texts):
                raise ValueError(f"{len(images)} images but {len(metadata_texts)} metadata texts")
            batch["pixel_values"] = self.preprocess_images(images)
        batch["prompt_ids"], batch["prompt_attention_mask"] = self.tokenize_prompts(metadata_texts)
        if reports is not None:
            batch["report_ids"], batch["report_attention_mask"] = self.tokenize_reports(reports)
        if rationales is not None:
            batch["rationale_ids"], batch["rationale_attention_mask"] = self.tokenize_rationales(rationales)
        if condition_labels is not None:
            table = self.class_condition_inputs()
            rows = torch.as_tensor(list(condition_labels), dtype=torch.long)
            batch["condition_ids"] = table["class_condition_ids"][rows]
            batch["condition_attention_mask"] = table["class_condition_attention_mask"][rows]
        return batch

    def decode(self, rationale_ids: torch.Tensor) -> list[str]:
        """Generated ids → text, cut at the first eos."""
        texts = []
        for row in rationale_ids.tolist():
            end = next((i for i, token in enumerate(row) if token in self.stop_token_ids), len(row))
            texts.append(self.tokenizer.decode(row[:end], skip_special_tokens=True).strip())
        return texts


def _stop_token_ids(decoder_config, hub_kwargs: dict) -> list[int]:
    # The model refuses a decoder without eos ids; a processor built alone falls back to the tokenizer's eos.
    try:
        return decoder_generation_ids(decoder_config, hub_kwargs)[0]
    except ValueError:
        return []


def _pad(sequences: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(1, max(len(s) for s in sequences))
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if not sequence:
            continue
        span = slice(length - len(sequence), length) if left else slice(0, len(sequence))
        ids[row, span] = torch.tensor(sequence, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def _open_clip_transform(vision_config, hub_kwargs: dict | None = None):
    """open_clip's evaluation transform, built from config files alone (no model, no weights fetched).

    ``create_model_and_transforms(..., load_weights=False)`` would build a second ViT, and may still fetch
    weights; the preprocessing needs only the image size and the pretrained tag's mean/std/resize settings,
    merged in open_clip's own order (defaults, model config, pretrained tag).
    """
    from dataclasses import asdict

    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    name = vision_config.model_name_or_path
    preprocess = asdict(PreprocessCfg())
    if name.startswith(LOCAL_DIR_PREFIX) or name.startswith("hf-hub:"):
        if name.startswith(LOCAL_DIR_PREFIX):
            config_file = Path(name[len(LOCAL_DIR_PREFIX) :]) / "open_clip_config.json"
        else:
            from huggingface_hub import hf_hub_download

            config_file = Path(
                hf_hub_download(
                    name.removeprefix("hf-hub:"),
                    "open_clip_config.json",
                    revision=vision_config.revision,
                    **(hub_kwargs or {}),
                )
            )
        file_config = json.loads(config_file.read_text())
        model_config = file_config["model_cfg"]
        preprocess = merge_preprocess_dict(preprocess, file_config.get("preprocess_cfg", {}))
    else:
        model_config = open_clip.get_model_config(name)
        if model_config is None:
            raise ValueError(f"open_clip has no model config named {name!r}")
        tag = vision_config.open_clip_pretrained_tag()
        if tag:
            preprocess = merge_preprocess_dict(preprocess, open_clip.get_pretrained_cfg(name, tag))
    image_size = model_config["vision_cfg"].get("image_size", preprocess["size"])
    preprocess["size"] = tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size, image_size)
    return image_transform_v2(PreprocessCfg(**preprocess), is_train=False)


__all__ = ["SkinClipVLProcessor"]
