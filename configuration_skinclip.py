"""Configuration of SkinCLIP-VL.

``SkinClipVLConfig`` names the two frozen bases by id or path (they are loaded from their own Hub repos
when the model is built, never copied into a SkinCLIP-VL checkpoint) and holds the sizes of the parts
that training creates: projector, Focal Pooling, alignment space, classification head and LoRA.

Nested configs (``vision_config``, ``decoder_config``) accept plain dicts so that ``config.json`` and
YAML training configs round-trip.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

VISION_BACKENDS = ("hf", "open_clip", "hf_vision")
# Backends with a text tower of their own (t_global from it: text_encoder="clip"); "hf_vision" is image-only.
VISION_BACKENDS_WITH_TEXT = ("hf", "open_clip")
QUANTIZATION_MODES = ("nf4", "int8", "none")
DTYPES = ("bfloat16", "float16", "float32")
TEXT_ENCODERS = ("clip", "decoder")
PROJECTOR_TYPES = ("linear", "mlp2x_gelu")
RATIONALE_CONDITIONING = ("none", "class")

# Plain template: the decoder is adapted with LoRA, so no chat template is needed, and a plain one works
# for any causal LM. ``{metadata}`` is the metadata sentence built by datasets_scripts.metadata_text.
DEFAULT_PROMPT_TEMPLATE = "Dermoscopic image of a skin lesion. {metadata}\nDiagnosis and rationale:"
# With rationale_conditioning="class": the text between the CLS token and the rationale, `{label}` the class name
# (config.id2label): the true class in training, the class head's argmax at inference.
RATIONALE_CONDITION_TEMPLATE = "Diagnosis: {label}."


def _check_choice(field: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not supported; choose one of {list(choices)}")


def _check_positive(field: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{field} must be a positive integer, got {value!r}")


class SkinClipVisionConfig(PretrainedConfig):
    r"""The frozen CLIP tower (image patches, and the text tower that embeds reports).

    Args:
        backend (`str`, *optional*, defaults to `"hf"`):
            `"hf"` loads a transformers `CLIPModel` (e.g. `openai/clip-vit-large-patch14`); `"open_clip"` loads
            any open_clip model (`"ViT-L-14"` with `pretrained="openai"`, `"hf-hub:org/repo"`,
            `"local-dir:/path"`), e.g. a dermatology CLIP; `"hf_vision"` an image-only transformers backbone
            with patch tokens (`Dinov2Model`, `SiglipVisionModel`, `CLIPVisionModel`, `ViTModel`), which has no
            text tower (use `text_encoder="decoder"`).
        model_name_or_path (`str`): Hub id or local path of the CLIP model (open_clip: model name or schema).
        pretrained (`str`, *optional*): open_clip pretrained tag or checkpoint file; ignored by `"hf"`.
        revision (`str`, *optional*): Hub revision (commit, tag or branch) to pin the base to.
        feature_layer (`int`, *optional*, defaults to -2):
            Which transformer block's output gives the patch tokens. -2 (the penultimate block) follows
            LLaVA: the last block is shaped by the contrastive objective and keeps less local detail. With
            `"hf_vision"`, -1 is the backbone's own output (after its final layer norm, as DINOv2 features are used).
    """

    model_type = "skinclip_vl_vision"

    def __init__(
        self,
        backend: str = "hf",
        model_name_or_path: str = "openai/clip-vit-large-patch14",
        pretrained: str | None = None,
        revision: str | None = None,
        feature_layer: int = -2,
        **kwargs,
    ):
        _check_choice("vision_config.backend", backend, VISION_BACKENDS)
        if not model_name_or_path:
            raise ValueError("vision_config.model_name_or_path must name a CLIP model id or path")
        if not isinstance(feature_layer, int) or feature_layer == 0:
            raise ValueError(f"vision_config.feature_layer must be a non-zero block index, got {feature_layer!r}")
        self.backend = backend
        self.model_name_or_path = model_name_or_path
        self.pretrained = pretrained
        self.revision = revision
        self.feature_layer = feature_layer
        super().__init__(**kwargs)

    def open_clip_pretrained_tag(self) -> str | None:
        """open_clip's ``pretrained`` argument: with an ``hf-hub:``/``local-dir:`` name the weights come with the
        name, and a tag would be an error."""
        has_schema = self.model_name_or_path.startswith(("hf-hub:", LOCAL_DIR_PREFIX))
        return None if has_schema else self.pretrained


class SkinClipDecoderConfig(PretrainedConfig):
    r"""The frozen causal-LM decoder, its quantisation and its LoRA adapters.

    Args:
        model_name_or_path (`str`): Hub id or local path. `Qwen/Qwen2.5-VL-7B-Instruct` (its language stack is used,
            its own vision tower is dropped) or any causal LM such as `Qwen/Qwen2.5-0.5B-Instruct`.
        revision (`str`, *optional*): Hub revision to pin the base to.
        quantization (`str`, *optional*, defaults to `"nf4"`): `"nf4"` (4-bit NF4, double quantisation),
            `"int8"` or `"none"`. bitsandbytes.
        compute_dtype (`str`, *optional*, defaults to `"bfloat16"`): dtype of the frozen bases' compute (and of
            the 4-bit matmuls); `"float32"` for CPU tests.
        lora_r, lora_alpha, lora_dropout: LoRA rank, scaling numerator and dropout (paper: r=64, alpha=16).
        lora_target_modules (`list[str]`): module names inside the decoder that get adapters (paper: q, v).
        attn_implementation (`str`, *optional*, defaults to `"sdpa"`).
    """

    model_type = "skinclip_vl_decoder"

    def __init__(
        self,
        model_name_or_path: str = "Qwen/Qwen2.5-VL-7B-Instruct",
        revision: str | None = None,
        quantization: str = "nf4",
        compute_dtype: str = "bfloat16",
        lora_r: int = 64,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | tuple[str, ...] = ("q_proj", "v_proj"),
        attn_implementation: str = "sdpa",
        **kwargs,
    ):
        if not model_name_or_path:
            raise ValueError("decoder_config.model_name_or_path must name a causal LM id or path")
        _check_choice("decoder_config.quantization", quantization, QUANTIZATION_MODES)
        _check_choice("decoder_config.compute_dtype", compute_dtype, DTYPES)
        _check_positive("decoder_config.lora_r", lora_r)
        if not lora_alpha or lora_alpha <= 0:
            raise ValueError(f"decoder_config.lora_alpha must be positive, got {lora_alpha!r}")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"decoder_config.lora_dropout must be in [0, 1), got {lora_dropout!r}")
        targets = list(lora_target_modules or [])
        if not targets:
            raise ValueError("decoder_config.lora_target_modules must name at least one module (e.g. q_proj)")
        self.model_name_or_path = model_name_or_path
        self.revision = revision
        self.quantization = quantization
        self.compute_dtype = compute_dtype
        self.lora_r = lora_r
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.lora_target_modules = targets
        self.attn_implementation = attn_implementation
        super().__init__(**kwargs)


class SkinClipVLConfig(PretrainedConfig):
    r"""Configuration of [`SkinClipVLModel`].

    Args:
        vision_config (`dict` or `SkinClipVisionConfig`): the frozen CLIP tower.
        decoder_config (`dict` or `SkinClipDecoderConfig`): the frozen decoder, quantisation and LoRA.
        projector_type (`str`, defaults to `"linear"`): the paper's linear projector, or LLaVA-1.5's 2-layer MLP.
        focal_dim (`int`, defaults to 1024): width of Focal Pooling's query/key/value projections.
        alignment_dim (`int`, defaults to 512): width of the shared image-text space of the InfoNCE term.
        text_encoder (`str`, defaults to `"clip"`): what embeds the ground-truth report into t_global: the frozen
            CLIP text tower (`"clip"`, so image and text start in one space) or the decoder's mean-pooled hidden
            state (`"decoder"`). Both get a learnable projection into the alignment space.
        focal_fusion_layers (`int`, defaults to 0): Transformer-encoder layers fusing the focal vector with the
            patches (the paper's Fig. 2 mentions one; off by default because the text gives no size).
        image_token_pooling (`int`, defaults to 1): average-pool the projected patch tokens k×k before the decoder
            (CLIP's prefix tokens pass as they are; a grid not divisible by k keeps its border in smaller windows).
            1 is the paper (every patch reaches the decoder); 2 gives a quarter of the patch tokens (256 → 64 for
            ViT-L/14 at 224 px), as Qwen2.5-VL merges its own patches 2×2: a shorter sequence for training and
            inference. Focal Pooling, the alignment term and the grounding map always see every patch.
        logit_scale_init (`float`, defaults to ln(1/0.07)): initial log temperature of the alignment logits.
        logit_scale_max (`float`, defaults to 100): clamp of `logit_scale.exp()`, as in CLIP.
        prompt_template (`str`): text before the [CLS] token; `{metadata}` is replaced by the metadata sentence.
        use_metadata (`bool`, defaults to `True`): put the row's metadata sentence into the prompt. `False` leaves
            `{metadata}` empty for every image (training, evaluation and prediction alike): the image-only
            ablation of the metadata prompt.
        max_prompt_tokens, max_rationale_tokens, max_report_tokens (`int`): truncation lengths.
        rationale_conditioning (`str`, defaults to `"none"`): `"none"` is the paper (the rationale follows the CLS
            token and never reads the class head's output); `"class"` puts "Diagnosis: <class name>."
            (`RATIONALE_CONDITION_TEMPLATE`) between CLS and the rationale: the TRUE class in training (teacher
            forcing, no LM loss on it), the class head's argmax at inference, so the rationale follows the
            diagnosis. CLS comes before these tokens, so the class logits never see them. A checkpoint saved
            without the field loads as `"none"`.
        num_labels / id2label / label2id: the diagnostic classes (one source of truth: the dataset's ClassLabel).
    """

    model_type = "skinclip_vl"
    sub_configs = {"vision_config": SkinClipVisionConfig, "decoder_config": SkinClipDecoderConfig}

    def __init__(
        self,
        vision_config: dict | SkinClipVisionConfig | None = None,
        decoder_config: dict | SkinClipDecoderConfig | None = None,
        projector_type: str = "linear",
        focal_dim: int = 1024,
        alignment_dim: int = 512,
        text_encoder: str = "clip",
        focal_fusion_layers: int = 0,
        image_token_pooling: int = 1,
        logit_scale_init: float = math.log(1 / 0.07),
        logit_scale_max: float = 100.0,
        classifier_dropout: float = 0.0,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        use_metadata: bool = True,
        max_prompt_tokens: int = 64,
        max_rationale_tokens: int = 128,
        max_report_tokens: int = 77,
        rationale_conditioning: str = "none",
        **kwargs,
    ):
        self.vision_config = self._as_sub_config(vision_config, SkinClipVisionConfig)
        self.decoder_config = self._as_sub_config(decoder_config, SkinClipDecoderConfig)
        _check_choice("projector_type", projector_type, PROJECTOR_TYPES)
        _check_choice("text_encoder", text_encoder, TEXT_ENCODERS)
        if text_encoder == "clip" and self.vision_config.backend not in VISION_BACKENDS_WITH_TEXT:
            raise ValueError(
                f"text_encoder='clip' needs a vision tower with a text side, and vision_config.backend="
                f"{self.vision_config.backend!r} is image-only: set text_encoder='decoder'"
            )
        _check_choice("rationale_conditioning", rationale_conditioning, RATIONALE_CONDITIONING)
        for field, value in (
            ("focal_dim", focal_dim),
            ("alignment_dim", alignment_dim),
            ("max_prompt_tokens", max_prompt_tokens),
            ("max_rationale_tokens", max_rationale_tokens),
            ("max_report_tokens", max_report_tokens),
            ("image_token_pooling", image_token_pooling),
        ):
            _check_positive(field, value)
        if not isinstance(focal_fusion_layers, int) or focal_fusion_layers < 0:
            raise ValueError(f"focal_fusion_layers must be a non-negative integer, got {focal_fusion_layers!r}")
        if "{metadata}" not in prompt_template:
            raise ValueError("prompt_template must contain the '{metadata}' placeholder")
        if not isinstance(use_metadata, bool):
            raise ValueError(f"use_metadata must be true or false, got {use_metadata!r}")
        if logit_scale_max <= 0 or math.exp(logit_scale_init) > logit_scale_max:
            raise ValueError(
                f"logit_scale_init={logit_scale_init!r} exceeds logit_scale_max={logit_scale_max!r} after exp()"
            )
        self._check_labels(kwargs)
        self.projector_type = projector_type
        self.focal_dim = focal_dim
        self.alignment_dim = alignment_dim
        self.text_encoder = text_encoder
        self.focal_fusion_layers = focal_fusion_layers
        self.image_token_pooling = image_token_pooling
        self.logit_scale_init = float(logit_scale_init)
        self.logit_scale_max = float(logit_scale_max)
        self.classifier_dropout = float(classifier_dropout)
        self.prompt_template = prompt_template
        self.use_metadata = use_metadata
        self.max_prompt_tokens = max_prompt_tokens
        self.max_rationale_tokens = max_rationale_tokens
        self.max_report_tokens = max_report_tokens
        self.rationale_conditioning = rationale_conditioning
        super().__init__(**kwargs)

    @staticmethod
    def _as_sub_config(value, config_class):
        if value is None:
            return config_class()
        if isinstance(value, config_class):
            return value
        if isinstance(value, dict):
            return config_class(**value)
        raise TypeError(f"expected a dict or {config_class.__name__}, got {type(value).__name__}")

    @staticmethod
    def _check_labels(kwargs: dict) -> None:
        """``num_labels``, ``id2label`` and ``label2id`` must describe the same classes."""
        id2label = kwargs.get("id2label")
        label2id = kwargs.get("label2id")
        num_labels = kwargs.get("num_labels")
        if id2label is not None:
            id2label = {int(k): v for k, v in id2label.items()}
            if sorted(id2label) != list(range(len(id2label))):
                raise ValueError(f"id2label keys must be 0..{len(id2label) - 1}, got {sorted(id2label)}")
            if len(set(id2label.values())) != len(id2label):
                raise ValueError(f"id2label has duplicate class names: {list(id2label.values())}")
            if num_labels is not None and num_labels != len(id2label):
                raise ValueError(
                    f"num_labels={num_labels} disagrees with id2label, which names {len(id2label)} classes"
                )
            if label2id is not None and {v: k for k, v in id2label.items()} != {k: int(v) for k, v in label2id.items()}:
                raise ValueError(f"label2id {label2id} is not the inverse of id2label {id2label}")
            kwargs["id2label"] = id2label
            kwargs["label2id"] = {name: idx for idx, name in id2label.items()}
        elif label2id is not None and num_labels is not None and num_labels != len(label2id):
            raise ValueError(f"num_labels={num_labels} disagrees with label2id, which names {len(label2id)} classes")

    @property
    def class_names(self) -> list[str]:
        return [self.id2label[i] for i in range(self.num_labels)]

    def rationale_condition_texts(self) -> list[str]:
        """The conditioning text of each class, in class order (used when `rationale_conditioning == "class"`)."""
        return [RATIONALE_CONDITION_TEMPLATE.format(label=name) for name in self.class_names]

    def label_ids(self, names) -> list[int]:
        """Class names to ids; an unknown name raises an error that lists the known classes."""
        lookup = {name: idx for idx, name in self.id2label.items()}
        unknown = [name for name in names if name not in lookup]
        if unknown:
            raise ValueError(f"unknown class name(s) {unknown}; this model knows {self.class_names}")
        return [lookup[name] for name in names]


SkinClipVLConfig.register_for_auto_class()

# --------------------------------------------------------------------------------------------------------
# Where a checkpoint and its bases are (shared by the model and the processor, both remote code)
# --------------------------------------------------------------------------------------------------------

LOCAL_DIR_PREFIX = "local-dir:"  # open_clip's schema for a model folder


def hub_kwargs(cache_dir=None, token=None, local_files_only: bool = False, force_download: bool = False) -> dict:
    """The Hub arguments that were set (None/False ones are left out, so library defaults apply)."""
    given = dict(cache_dir=cache_dir, token=token, local_files_only=local_files_only, force_download=force_download)
    return {name: value for name, value in given.items() if value not in (None, False)}


def checkpoint_folder(path_or_repo: str | os.PathLike, revision: str | None = None, **hub_kwargs) -> Path:
    """A local checkpoint folder, or the snapshot folder of a Hub repo (downloaded or from the cache).

    The model, the processor and ``calibration.json`` all resolve their files through this one rule.
    """
    local = Path(path_or_repo).expanduser()
    if local.is_dir():
        return local.resolve()
    if local.exists():
        raise NotADirectoryError(f"{local} is a file; a SkinCLIP-VL checkpoint is a folder (or a Hub repo id)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(str(path_or_repo))
    except HFValidationError:
        raise FileNotFoundError(f"{path_or_repo}: no such checkpoint folder (and not a Hub repo id)") from None
    try:
        return Path(snapshot_download(str(path_or_repo), revision=revision, **hub_kwargs))
    except Exception as error:  # the hub raises several types; the message is what matters
        raise FileNotFoundError(
            f"could not get checkpoint {path_or_repo!r} (revision {revision}) from the Hub or its cache: {error}"
        ) from error


def resolve_base_paths(config: SkinClipVLConfig, folder: Path) -> SkinClipVLConfig:
    """Local base paths that are relative resolve against the checkpoint folder first, then the working directory.

    `save_pretrained` writes local bases relative to the checkpoint, so a checkpoint loads from any working
    directory; a name that is neither an existing folder nor a valid Hub id is an error naming both places looked.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    for section in (config.vision_config, config.decoder_config):
        name = section.model_name_or_path
        prefix = LOCAL_DIR_PREFIX if name.startswith(LOCAL_DIR_PREFIX) else ""
        path = Path(name[len(prefix) :]).expanduser()
        if path.is_absolute():
            continue
        if (folder / path).is_dir():
            section.model_name_or_path = prefix + str((folder / path).resolve())
        elif path.is_dir():
            section.model_name_or_path = prefix + str(path.resolve())
        elif prefix:
            raise FileNotFoundError(f"base {name!r}: no folder {folder / path} nor {path.resolve()}")
        else:
            try:
                validate_repo_id(name)
            except HFValidationError:
                raise FileNotFoundError(
                    f"base {name!r} (config of {folder}): no folder {folder / path} nor {path.resolve()}, "
                    "and not a Hub repo id"
                ) from None
    return config


def relative_base_paths(config: SkinClipVLConfig, folder: Path) -> SkinClipVLConfig:
    """A copy of ``config`` whose local base folders are written relative to ``folder`` (the checkpoint)."""
    import copy

    config = copy.deepcopy(config)
    for section in (config.vision_config, config.decoder_config):
        name = section.model_name_or_path
        prefix = LOCAL_DIR_PREFIX if name.startswith(LOCAL_DIR_PREFIX) else ""
        path = Path(name[len(prefix) :]).expanduser()
        if path.is_dir():
            section.model_name_or_path = prefix + os.path.relpath(path.resolve(), folder.resolve())
    return config


def decoder_generation_ids(decoder_config, hub_kwargs: dict | None = None) -> tuple[list[int], int]:
    """(every eos id, pad id) of the decoder: its ``generation_config.json`` first, then its raw ``config.json``.

    The raw file, not the config object: config classes fill in default token ids the checkpoint never set. The
    real Qwen2.5-VL config has no top-level eos/pad (transformers 5 keeps them in ``text_config`` and the
    generation config); Instruct models end a turn with ``<|im_end|>`` (151645) and text with ``<|endoftext|>``
    (151643), so generation stops on either. The model and the processor both take their stop ids from here.
    """
    from transformers import GenerationConfig, PretrainedConfig

    name, revision, hub_kwargs = decoder_config.model_name_or_path, decoder_config.revision, hub_kwargs or {}
    raw_config, _ = PretrainedConfig.get_config_dict(name, revision=revision, **hub_kwargs)
    try:
        generation_config = GenerationConfig.from_pretrained(name, revision=revision, **hub_kwargs)
    except OSError:  # no generation_config.json: the ids come from config.json
        generation_config = None
    candidates = [
        {
            "eos_token_id": getattr(generation_config, "eos_token_id", None),
            "pad_token_id": getattr(generation_config, "pad_token_id", None),
        },
        raw_config,
        raw_config.get("text_config") or {},
    ]
    eos = next((c["eos_token_id"] for c in candidates if c.get("eos_token_id") is not None), None)
    if eos is None:
        raise ValueError(
            f"decoder {name!r} gives no eos token id: neither its generation_config.json nor its config.json "
            "(or text_config) has eos_token_id; add one there"
        )
    eos_ids = [int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos])]
    pad = next((c["pad_token_id"] for c in candidates if c.get("pad_token_id") is not None), None)
    if isinstance(pad, (list, tuple)):
        pad = pad[0]
    return eos_ids, int(pad) if pad is not None else eos_ids[0]


__all__ = ["SkinClipVLConfig", "SkinClipVisionConfig", "SkinClipDecoderConfig"]
