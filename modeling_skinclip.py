"""SkinCLIP-VL: frozen CLIP perception, LoRA-adapted causal-LM reasoning, Focal Pooling grounding.

Read top-down: outputs → Focal Pooling → projector → the frozen bases (CLIP tower, decoder) →
``SkinClipVLPreTrainedModel`` → ``SkinClipVLModel`` → ``SkinClipVLProcessor``.

Sequence fed to the decoder (one row per image)::

    [ V_proj (image tokens) ][ prompt (left-padded) ][ CLS ][ condition (left-padded) ][ rationale (right-padded) ]

The condition ("Diagnosis: <class>.") is there only with ``config.rationale_conditioning == "class"``: the true
class in training, the class head's argmax at generation. The CLS token sits after the prompt and before the
condition and the rationale, so under causal attention its hidden state (and the class logits read from it)
never sees either. Padding sits in the middle and at the end;
``attention_mask`` hides it and ``position_ids = cumsum(attention_mask) - 1`` keeps positions contiguous.

A checkpoint holds only what training changed (projector, Focal Pooling, CLS, heads, logit scale, LoRA) in
``model.safetensors`` and the LoRA config in ``lora/``; the bases are named in ``config.json`` and loaded
from their own repos or paths when the model is built.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput, logging

try:
    from .configuration_skinclip import (
        LOCAL_DIR_PREFIX,
        SkinClipVLConfig,
        checkpoint_folder,
        decoder_generation_ids,
        relative_base_paths,
        resolve_base_paths,
    )
    from .configuration_skinclip import hub_kwargs as _hub_kwargs
    from .processing_skinclip import SkinClipVLProcessor, _pad  # noqa: F401  (shipped and re-exported)
except ImportError:  # a checkout, rather than Hub remote code
    from configuration_skinclip import (
        LOCAL_DIR_PREFIX,
        SkinClipVLConfig,
        checkpoint_folder,
        decoder_generation_ids,
        relative_base_paths,
        resolve_base_paths,
    )
    from configuration_skinclip import hub_kwargs as _hub_kwargs
    from processing_skinclip import SkinClipVLProcessor, _pad  # noqa: F401

logger = logging.get_logger(__name__)

TRAINED_WEIGHTS_NAME = "model.safetensors"
LORA_SUBFOLDER = "lora"
LORA_CONFIG_NAME = "adapter_config.json"
CALIBRATION_NAME = "calibration.json"  # post-hoc temperature (and conformal threshold) from evaluate_skinclip.py
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# --------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------


@dataclass
class SkinClipVLOutput(ModelOutput):
    """Output of [`SkinClipVLModel.forward`].

    Args:
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`): class logits read from the CLS token.
        lm_loss (`torch.FloatTensor` of shape `()`, *optional*): causal-LM loss on rationale tokens only
            (mean over the rationale tokens of the batch); present when `rationale_ids` are given.
        lm_tokens (`torch.LongTensor` of shape `()`, *optional*): how many rationale tokens `lm_loss` averages
            over (for normalising across processes).
        v_global (`torch.FloatTensor` of shape `(batch_size, alignment_dim)`): the Focal-Pooling descriptor in
            the alignment space, L2-normalised.
        t_global (`torch.FloatTensor` of shape `(batch_size, alignment_dim)`, *optional*): the ground-truth report
            embedding in the alignment space, L2-normalised; present when `report_ids` are given.
        logit_scale (`torch.FloatTensor` of shape `()`): `exp(logit_scale)` clamped at `config.logit_scale_max`.
        focal_attention (`torch.FloatTensor` of shape `(batch_size, num_patches)`): Focal-Pooling attention over
            the image patches (sums to 1); reshape to `model.patch_grid` for a map.
        hidden_states (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
            the decoder's last hidden states, when `output_hidden_states=True`.
    """

    logits: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    lm_tokens: torch.LongTensor | None = None
    v_global: torch.FloatTensor | None = None
    t_global: torch.FloatTensor | None = None
    logit_scale: torch.FloatTensor | None = None
    focal_attention: torch.FloatTensor | None = None
    hidden_states: torch.FloatTensor | None = None


@dataclass
class SkinClipVLPrediction(ModelOutput):
    """Output of [`SkinClipVLModel.predict`].

    Args:
        probs (`torch.FloatTensor` of shape `(batch_size, num_labels)`): class probabilities (temperature-scaled
            when the checkpoint carries a fitted `calibration_temperature`).
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`): raw class logits.
        attention_map (`torch.FloatTensor` of shape `(batch_size, grid_height, grid_width)`): focal attention on
            the patch grid.
        rationale_ids (`torch.LongTensor` of shape `(batch_size, generated_length)`, *optional*): generated
            rationale tokens (eos and padding included), when generation was asked for.
    """

    probs: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    attention_map: torch.FloatTensor | None = None
    rationale_ids: torch.LongTensor | None = None


# --------------------------------------------------------------------------------------------------------
# Focal Pooling and projector
# --------------------------------------------------------------------------------------------------------


class FocalPooling(nn.Module):
    r"""Attention pooling of the patches with one learnable query (paper Eq. 1-2).

    ``alpha = softmax((q_focal W_q)(P W_k)^T / sqrt(d))`` and ``v_global = sum_i alpha_i (p_i W_v)``. The
    query is shared by all images, so ``alpha`` depends on the image content, not on fixed positions; it is
    the grounding map.

    Args:
        input_dim: width of the projected patches `p_i` (the decoder's hidden size).
        focal_dim: width of the query/key/value projections.
        fusion_layers: optional Transformer-encoder layers over `[v_global; P W_v]` (paper Fig. 2); 0 = off.
    """

    def __init__(self, input_dim: int, focal_dim: int, fusion_layers: int = 0):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, input_dim) * input_dim**-0.5)
        self.q_proj = nn.Linear(input_dim, focal_dim, bias=False)
        self.k_proj = nn.Linear(input_dim, focal_dim, bias=False)
        self.v_proj = nn.Linear(input_dim, focal_dim, bias=False)
        self.scale = focal_dim**-0.5
        self.fusion = None
        if fusion_layers > 0:
            layer = nn.TransformerEncoderLayer(
                focal_dim,
                nhead=max(1, focal_dim // 64),
                dim_feedforward=2 * focal_dim,
                batch_first=True,
                norm_first=True,
            )
            self.fusion = nn.TransformerEncoder(layer, num_layers=fusion_layers, enable_nested_tensor=False)

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """patches `(batch, num_patches, input_dim)` → (v_global `(batch, focal_dim)`, alpha `(batch, num_patches)`)."""
        query = self.q_proj(self.query)  # (1, focal_dim)
        keys = self.k_proj(patches)  # (batch, num_patches, focal_dim)
        values = self.v_proj(patches)
        attention = torch.softmax((keys @ query.transpose(0, 1)).squeeze(-1) * self.scale, dim=-1)
        v_global = torch.einsum("bn,bnd->bd", attention, values)
        if self.fusion is not None:
            v_global = self.fusion(torch.cat([v_global[:, None], values], dim=1))[:, 0]
        return v_global, attention

    def patch_values(self, patches: torch.Tensor) -> torch.Tensor:
        """`p_i W_v` for every patch, `(batch, num_patches, focal_dim)`: the per-region terms of v_global."""
        return self.v_proj(patches)


def build_projector(projector_type: str, vision_dim: int, decoder_dim: int) -> nn.Module:
    if projector_type == "linear":
        return nn.Linear(vision_dim, decoder_dim)
    return nn.Sequential(nn.Linear(vision_dim, decoder_dim), nn.GELU(), nn.Linear(decoder_dim, decoder_dim))


# --------------------------------------------------------------------------------------------------------
# Frozen bases
# --------------------------------------------------------------------------------------------------------


class VisionTower(nn.Module):
    """The frozen CLIP model behind one interface; `HFClipTower` and `OpenClipTower` implement it.

    ``patch_tokens`` gives the tokens of one transformer block (prefix tokens such as CLS first),
    ``text_embeds`` the projected text embedding of a report. Implementations set ``model`` (frozen),
    ``hidden_size`` (token width), ``grid`` (patch rows, columns) and ``text_dim``.
    """

    model: nn.Module
    hidden_size: int
    grid: tuple[int, int]
    text_dim: int
    # Tokens before the patches in `patch_tokens`: the class token, which CLIP ViTs have exactly once.
    num_prefix_tokens: int = 1

    def __init__(self, vision_config):
        super().__init__()
        self.feature_layer = vision_config.feature_layer

    def _freeze(self) -> None:
        self.model.requires_grad_(False)
        self.model.eval()

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def train(self, mode: bool = True):
        # Frozen tower: keep dropout and friends off even when the wrapper model trains.
        super().train(mode)
        self.model.eval()
        return self

    def patch_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(batch, 3, H, W)` → `(batch, num_prefix + num_patches, hidden_size)` (prefix tokens first)."""
        raise NotImplementedError

    def text_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Report tokens → projected text embedding `(batch, text_dim)` (not normalised)."""
        raise NotImplementedError


def _load_auto_model(vision_config, dtype: torch.dtype, device: torch.device, hub_kwargs: dict | None):
    """The transformers model a vision config names, via ``AutoModel``: shapes only on the meta device (its config
    file alone), else loaded straight onto its device (device_map), never built on the CPU and moved."""
    from transformers import AutoConfig, AutoModel

    name, revision, hub_kwargs = vision_config.model_name_or_path, vision_config.revision, hub_kwargs or {}
    if device.type == "meta":
        base_config = AutoConfig.from_pretrained(name, revision=revision, **hub_kwargs)
        with torch.device("meta"):
            return AutoModel.from_config(base_config, dtype=dtype)
    return AutoModel.from_pretrained(name, revision=revision, dtype=dtype, device_map={"": device}, **hub_kwargs)


class HFClipTower(VisionTower):
    """A transformers CLIP-style model with vision and text towers (e.g. ``openai/clip-vit-large-patch14``)."""

    def __init__(self, vision_config, dtype: torch.dtype, device: torch.device, hub_kwargs: dict | None = None):
        super().__init__(vision_config)
        name = vision_config.model_name_or_path
        self.model = _load_auto_model(vision_config, dtype, device, hub_kwargs)
        if not hasattr(self.model, "vision_model") or not hasattr(self.model, "get_text_features"):
            raise ValueError(
                f"vision_config.model_name_or_path={name!r} is a {type(self.model).__name__}, "
                "not a CLIP-style model with vision and text towers"
            )
        model_config = self.model.config
        self.hidden_size = model_config.vision_config.hidden_size
        image_size, patch_size = model_config.vision_config.image_size, model_config.vision_config.patch_size
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.text_dim = getattr(model_config, "projection_dim", None) or model_config.text_config.hidden_size
        self._freeze()

    def patch_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        outputs = self.model.vision_model(pixel_values=pixel_values.to(self.dtype), output_hidden_states=True)
        return outputs.hidden_states[self.feature_layer]

    def text_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        outputs = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return outputs if torch.is_tensor(outputs) else outputs.pooler_output


class OpenClipTower(VisionTower):
    """An open_clip ViT (``ViT-L-14`` + a pretrained tag, ``hf-hub:org/repo``, ``local-dir:/path``)."""

    def __init__(self, vision_config, dtype: torch.dtype, device: torch.device, hub_kwargs: dict | None = None):
        import open_clip

        super().__init__(vision_config)
        name, tag = vision_config.model_name_or_path, vision_config.open_clip_pretrained_tag()
        self.model = open_clip.create_model(
            name,
            pretrained=None if device.type == "meta" else tag,
            force_quick_gelu=needs_quick_gelu(name, tag),
            device=device,
        ).to(dtype)
        visual = self.model.visual
        if not hasattr(visual, "forward_intermediates"):
            raise ValueError(f"open_clip model {name!r} has no forward_intermediates(): not a ViT tower")
        self.hidden_size = visual.transformer.width
        self.grid = tuple(visual.grid_size)
        projection = self.model.text_projection
        self.text_dim = projection.shape[-1] if projection is not None else visual.output_dim
        self._freeze()

    def patch_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        outputs = self.model.visual.forward_intermediates(
            pixel_values.to(self.dtype),
            indices=[self.feature_layer],
            output_fmt="NLC",
            intermediates_only=True,
            output_extra_tokens=True,
        )
        prefix = outputs.get("image_intermediates_prefix")
        patches = outputs["image_intermediates"][0]
        return torch.cat([prefix[0], patches], dim=1) if prefix else patches

    def text_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.encode_text(input_ids)


class HFVisionTower(VisionTower):
    """An image-only transformers backbone with patch tokens (``Dinov2Model``, ``SiglipVisionModel``,
    ``CLIPVisionModel``, ``ViTModel``, ...), loaded with ``AutoModel``.

    It has no text side, so t_global must come from the decoder (``text_encoder="decoder"``; the config refuses
    anything else). The prefix tokens (a class token where the embeddings have one, plus register tokens) are read
    from the model, and the patch grid from the image size its image processor produces (DINOv2 is configured for
    518 px but preprocessed to 224 px, a 16×16 grid), falling back to the config's ``image_size``.
    ``feature_layer=-1`` takes the model's own output (``last_hidden_state``, after the final layer norm where the
    model has one, as DINOv2 features are used); any other index the raw output of that block.
    """

    def __init__(self, vision_config, dtype: torch.dtype, device: torch.device, hub_kwargs: dict | None = None):
        super().__init__(vision_config)
        name, hub_kwargs = vision_config.model_name_or_path, hub_kwargs or {}
        self.model = _load_auto_model(vision_config, dtype, device, hub_kwargs)
        if hasattr(self.model, "get_text_features") or not hasattr(self.model, "embeddings"):
            raise ValueError(
                f"vision_config.model_name_or_path={name!r} is a {type(self.model).__name__}, not an image-only "
                "backbone with patch embeddings; use vision_config.backend='hf' for a CLIP model with a text tower"
            )
        model_config = self.model.config
        embeddings = self.model.embeddings
        has_class_token = hasattr(embeddings, "cls_token") or hasattr(embeddings, "class_embedding")
        self.num_prefix_tokens = int(has_class_token) + int(getattr(model_config, "num_register_tokens", 0) or 0)
        self.hidden_size = model_config.hidden_size
        patch = _pair(model_config.patch_size)
        height, width = processed_image_size(name, vision_config.revision, hub_kwargs) or _pair(model_config.image_size)
        if height % patch[0] or width % patch[1]:
            raise ValueError(f"{name}: image size {height}x{width} is not a multiple of the patch size {patch}")
        self.grid = (height // patch[0], width // patch[1])
        self.text_dim = 0  # no text tower
        accepts = inspect.signature(self.model.forward).parameters
        # ViT/CLIP/SigLIP embeddings refuse another size than their config's unless asked to interpolate.
        self._forward_kwargs = (
            {"interpolate_pos_encoding": True}
            if "interpolate_pos_encoding" in accepts and (height, width) != _pair(model_config.image_size)
            else {}
        )
        self._freeze()

    def patch_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        outputs = self.model(
            pixel_values=pixel_values.to(self.dtype),
            output_hidden_states=self.feature_layer != -1,
            **self._forward_kwargs,
        )
        tokens = outputs.last_hidden_state if self.feature_layer == -1 else outputs.hidden_states[self.feature_layer]
        expected = self.num_prefix_tokens + self.num_patches
        if tokens.shape[1] != expected:
            raise ValueError(
                f"the vision backbone gave {tokens.shape[1]} tokens for images of {tuple(pixel_values.shape[-2:])}; "
                f"expected {expected} ({self.num_prefix_tokens} prefix + a {self.grid[0]}x{self.grid[1]} grid): "
                "preprocess images with the backbone's own image processor"
            )
        return tokens

    def text_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        raise ValueError("an image-only vision backbone has no text tower: use text_encoder='decoder'")


def processed_image_size(name: str, revision: str | None = None, hub_kwargs: dict | None = None):
    """`(height, width)` of the images a backbone's image processor produces, or None without a fixed size.

    Reads only ``preprocessor_config.json``: the centre crop where the processor crops, else a fixed
    ``height``/``width`` or a square ``shortest_edge`` resize.
    """
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(name, revision=revision, **(hub_kwargs or {}))
    except (OSError, ValueError):
        return None
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = crop or getattr(processor, "size", None) or {}
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    return None


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


VISION_TOWERS = {"hf": HFClipTower, "open_clip": OpenClipTower, "hf_vision": HFVisionTower}


def build_vision_tower(vision_config, dtype: torch.dtype, device: torch.device | str, hub_kwargs: dict | None = None):
    """The frozen vision tower named by ``vision_config.backend`` (the one place the backends branch)."""
    return VISION_TOWERS[vision_config.backend](vision_config, dtype, torch.device(device), hub_kwargs)


def _bnb_config(decoder_config):
    from transformers import BitsAndBytesConfig

    if decoder_config.quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_DTYPES[decoder_config.compute_dtype],
        )
    if decoder_config.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def read_decoder_config(decoder_config, hub_kwargs: dict | None = None):
    """The decoder's config, read before any weight."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        decoder_config.model_name_or_path, revision=decoder_config.revision, **(hub_kwargs or {})
    )


def check_lora_targets(base_config, decoder_config) -> None:
    """Refuse LoRA targets the decoder's language stack lacks, from its architecture on the meta device (no weights)."""
    from transformers import AutoModelForCausalLM

    model_class = _language_only_class(base_config)
    with torch.device("meta"):
        skeleton = (
            model_class._from_config(base_config)
            if model_class is not None
            else AutoModelForCausalLM.from_config(base_config)
        )
    found = {name.rsplit(".", 1)[-1] for name, _ in skeleton.get_decoder().named_modules()}
    missing = [target for target in decoder_config.lora_target_modules if target not in found]
    if missing:
        raise ValueError(
            f"decoder {decoder_config.model_name_or_path!r} ({type(skeleton.get_decoder()).__name__}) has no module "
            f"named {missing} for LoRA; set decoder_config.lora_target_modules to attention projections it has"
        )


def load_decoder(
    decoder_config, device: torch.device | str, hub_kwargs: dict | None = None, base_config=None
) -> nn.Module:
    """Load the causal LM; for a vision-language checkpoint build and read only its language stack and LM head.

    Qwen2-VL / Qwen2.5-VL are not ``AutoModelForCausalLM`` types. Their vision tower (0.68 B parameters for
    Qwen2.5-VL-7B) is never built, quantised or moved: `_language_only_class` builds the model without it, and
    only the checkpoint's language-stack tensors are read (SkinCLIP-VL sees images through the CLIP tower).
    With no image tokens, mRoPE reduces to ordinary 1-D RoPE, so 1-D ``position_ids`` suffice.

    Every tensor, embeddings and LM head included, stays in the compute dtype: peft's
    ``prepare_model_for_kbit_training`` would upcast them to fp32 (4.4 GB for Qwen2.5-7B's embeddings and head)
    and the residual stream would follow. The decoder is frozen and only LoRA trains, so nothing needs it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    hub_kwargs = dict(hub_kwargs or {})
    dtype = _DTYPES[decoder_config.compute_dtype]
    name = decoder_config.model_name_or_path
    if base_config is None:
        base_config = AutoConfig.from_pretrained(name, revision=decoder_config.revision, **hub_kwargs)
    load_kwargs: dict[str, Any] = {}
    if base_config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        model_class = AutoModelForCausalLM
    else:
        model_class = _language_only_class(base_config)
        if model_class is None:
            raise ValueError(
                f"decoder_config.model_name_or_path={name!r} is a {base_config.model_type!r} model, which is neither a "
                "causal LM nor a vision-language model whose language stack SkinCLIP-VL knows how to load alone "
                f"(supported: {sorted(_LANGUAGE_ONLY_TYPES)})"
            )
        load_kwargs["key_mapping"] = _LANGUAGE_ONLY_KEY_MAPPING
    quantization = _bnb_config(decoder_config)
    device = torch.device(device)
    if device.type == "meta":
        # Shapes only (train.py --dry_run, tests at the paper's size): no file beyond the config is read.
        with torch.device("meta"):
            language_model = (
                model_class.from_config(base_config, dtype=dtype)
                if model_class is AutoModelForCausalLM
                else model_class._from_config(base_config, dtype=dtype)
            )
    else:
        device_map = {"": device.index if device.type == "cuda" and device.index is not None else str(device)}
        language_model = model_class.from_pretrained(
            name,
            revision=decoder_config.revision,
            dtype=dtype,
            quantization_config=quantization,
            device_map=device_map,
            attn_implementation=decoder_config.attn_implementation,
            **hub_kwargs,
            **load_kwargs,
        )
        if quantization is not None and quantization.load_in_4bit:
            _quantize_unloaded_4bit_weights(language_model, quantization, device)
    language_model.requires_grad_(False)
    return language_model


# Vision-language decoders whose ForConditionalGeneration class nests ``model.visual`` and ``model.language_model``.
_LANGUAGE_ONLY_TYPES = {"qwen2_5_vl", "qwen2_vl"}
# Hub checkpoints of these models store the flat names (``model.layers.*``, ``visual.*``); transformers 5 nests
# the language stack under ``model.language_model``. The vision tensors map to names the model does not have,
# so they are never materialised (tests/test_real_bases.py checks which tensors are read).
_LANGUAGE_ONLY_KEY_MAPPING = {
    r"^visual\.": "model.visual.",
    r"^model\.(?!language_model\.|visual\.)": "model.language_model.",
}


def _language_only_class(base_config):
    """A subclass of the VL model's ``ForConditionalGeneration`` class that builds no vision tower, or None."""
    if base_config.model_type not in _LANGUAGE_ONLY_TYPES:
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    return _language_only_subclass(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(base_config)])


@functools.cache  # one class per VL class: every decoder built in a process is an instance of the same type
def _language_only_subclass(vl_class):
    from transformers import AutoModel

    pretrained_base = vl_class.__mro__[1]  # e.g. Qwen2_5_VLPreTrainedModel: weight init, no-split modules

    class LanguageStack(nn.Module):
        """Stands where ``Qwen2_5_VLModel`` stands, holding only ``language_model`` (``visual`` is None)."""

        def __init__(self, config):
            super().__init__()
            self.visual = None
            self.language_model = AutoModel.from_config(config.text_config)

        def get_decoder(self):
            return self.language_model

        def get_input_embeddings(self):
            return self.language_model.get_input_embeddings()

        def set_input_embeddings(self, value):
            self.language_model.set_input_embeddings(value)

    class LanguageOnlyForCausalLM(vl_class):
        # The checkpoint's vision tensors are deliberately left unread (not "unexpected" news for the user).
        _keys_to_ignore_on_load_unexpected = [r"^model\.visual\."]

        def __init__(self, config):
            pretrained_base.__init__(self, config)
            self.model = LanguageStack(config)
            self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
            self.post_init()

        def forward(
            self,
            input_ids=None,
            attention_mask=None,
            position_ids=None,
            cache=None,
            inputs_embeds=None,
            labels=None,
            use_cache=None,
            past_key_values=None,
            **kwargs,
        ):
            """A text-only causal LM: 1-D positions, no image inputs (SkinCLIP-VL feeds the stack directly)."""
            from transformers.modeling_outputs import CausalLMOutputWithPast

            if kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None:
                raise ValueError("this decoder was loaded without its vision tower: it takes no pixel inputs")
            stack = self.model.language_model
            outputs = stack(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **{cache_keyword(type(stack).forward): cache if cache is not None else past_key_values},
            )
            logits = self.lm_head(outputs.last_hidden_state)
            loss = None
            if labels is not None:
                loss = self.loss_function(logits, labels, vocab_size=self.config.text_config.vocab_size)
            return CausalLMOutputWithPast(
                loss=loss, logits=logits, **{cache_keyword(CausalLMOutputWithPast): returned_cache(outputs)}
            )

    LanguageOnlyForCausalLM.__name__ = LanguageOnlyForCausalLM.__qualname__ = f"{vl_class.__name__}LanguageOnly"
    return LanguageOnlyForCausalLM


def _quantize_unloaded_4bit_weights(language_model: nn.Module, quantization, device: torch.device) -> None:
    """Quantise 4-bit layers whose weights the checkpoint did not hold (a no-op for complete checkpoints).

    transformers initialises weights missing from a checkpoint as plain parameters in the compute dtype,
    left unquantised inside ``Linear4bit``; wrapping them in ``Params4bit`` and moving them quantises them
    in place. This lets the benchmark build random-weight bases at the paper's shapes from a config alone
    (benchmarks/bench_skinclip.py) without writing 15 GB of random weights.
    """
    import bitsandbytes as bnb

    for module in language_model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and not isinstance(module.weight, bnb.nn.Params4bit):
            module.weight = bnb.nn.Params4bit(
                module.weight.data,
                requires_grad=False,
                compress_statistics=quantization.bnb_4bit_use_double_quant,
                quant_type=quantization.bnb_4bit_quant_type,
                quant_storage=torch.uint8,
                module=module,
            ).to(device)


def attach_lora(language_model: nn.Module, decoder_config):
    """Inject LoRA adapters into the decoder's language stack (never the CLIP tower or the LM head)."""
    from peft import LoraConfig, inject_adapter_in_model

    text_stack = language_model.get_decoder()
    targets = list(decoder_config.lora_target_modules)  # checked against the architecture by check_lora_targets
    lora_config = LoraConfig(
        r=decoder_config.lora_r,
        lora_alpha=decoder_config.lora_alpha,
        lora_dropout=decoder_config.lora_dropout,
        target_modules=targets,
        bias="none",
        base_model_name_or_path=decoder_config.model_name_or_path,
        revision=decoder_config.revision,
    )
    inject_adapter_in_model(lora_config, text_stack)
    for name, param in text_stack.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_" in name and param.dtype != torch.float32:
            # peft gives adapters the dtype of a bf16/fp16 base layer; trained tensors keep fp32 master weights
            # (as get_peft_model's autocast_adapter_dtype does), else AdamW's small updates round away.
            param.data = param.data.float()
    return lora_config


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------------
# Pretrained model base
# --------------------------------------------------------------------------------------------------------


class SkinClipVLPreTrainedModel(PreTrainedModel):
    config_class = SkinClipVLConfig
    base_model_prefix = "skinclip"
    main_input_name = "prompt_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = []

    def _init_weights(self, module):
        # Only this model's own new modules: the bases arrive trained and must stay as loaded (their modules are
        # never touched here; tests/test_modeling.py checks they equal a fresh load after post_init).
        if isinstance(module, FocalPooling):
            nn.init.normal_(module.query, std=module.query.shape[-1] ** -0.5)
        elif isinstance(module, SkinClipVLModel):
            nn.init.normal_(module.cls_token, std=0.02)
            with torch.no_grad():
                module.logit_scale.fill_(self.config.logit_scale_init)
                module.calibration_temperature.fill_(1.0)


# --------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------


class SkinClipVLModel(SkinClipVLPreTrainedModel):
    r"""SkinCLIP-VL: diagnosis (CLS head), alignment embeddings (Focal Pooling), rationale (LoRA decoder).

    Building the model loads both frozen bases from `config.vision_config.model_name_or_path` and
    `config.decoder_config.model_name_or_path` onto `device` (default: this process's GPU, else CPU).
    """

    # Names of this model's own trained modules (saved next to the LoRA tensors).
    _own_modules = ("projector", "focal_pooling", "classifier", "image_alignment", "text_alignment")
    _own_parameters = ("cls_token", "logit_scale")
    # Benchmark reference switch: True runs the LM head over the whole sequence (the naive recipe), False
    # (the default) only on the rationale positions. Both give the same loss (tests/test_benchmarks.py).
    lm_head_on_all_positions: bool = False
    # Speed switches, on by default (so `predict` and evaluation take the fast path too) and set from
    # CFATrainingArguments (decoder_trailing_padding, fused_lm_loss) by CFATrainer; each gives the same loss and
    # gradients as the path it replaces (tests/test_benchmarks.py), which False restores.
    trailing_padding: bool = True
    fused_lm_loss: bool = True
    # `save_pretrained`'s default for include_bases (train.py sets it from its include_bases field).
    include_bases: bool = False

    def __init__(
        self, config: SkinClipVLConfig, device: torch.device | str | None = None, hub_kwargs: dict | None = None
    ):
        super().__init__(config)
        device = torch.device(device) if device is not None else default_device()
        dtype = _DTYPES[config.decoder_config.compute_dtype]
        # hub_kwargs (cache_dir, token, local_files_only, ...) reach both bases' downloads.
        # Every check that needs only the decoder's small files runs before any weight loads.
        self.eos_token_ids, self.pad_token_id = decoder_generation_ids(config.decoder_config, hub_kwargs)
        base_config = read_decoder_config(config.decoder_config, hub_kwargs)
        check_lora_targets(base_config, config.decoder_config)
        self.vision = build_vision_tower(config.vision_config, dtype, device, hub_kwargs)
        self.language_model = load_decoder(config.decoder_config, device, hub_kwargs, base_config=base_config)
        self.lora_config = attach_lora(self.language_model, config.decoder_config)
        # Shard/offload per decoder layer (FSDP auto-wrap, device_map), whichever decoder was loaded.
        self._no_split_modules = list(getattr(self.language_model, "_no_split_modules", None) or [])
        hidden_size = self.language_model.get_input_embeddings().embedding_dim

        # The new modules are created where the bases are (no copy); on the meta device they are shapes only.
        with torch.device(device):
            self.projector = build_projector(config.projector_type, self.vision.hidden_size, hidden_size)
            self.focal_pooling = FocalPooling(hidden_size, config.focal_dim, config.focal_fusion_layers)
            self.cls_token = nn.Parameter(torch.empty(1, 1, hidden_size))
            self.classifier = nn.Sequential(
                nn.Dropout(config.classifier_dropout), nn.Linear(hidden_size, config.num_labels)
            )
            self.image_alignment = nn.Linear(config.focal_dim, config.alignment_dim)
            text_dim = self.vision.text_dim if config.text_encoder == "clip" else hidden_size
            self.text_alignment = nn.Linear(text_dim, config.alignment_dim)
            self.logit_scale = nn.Parameter(torch.empty(()))
            # Post-hoc temperature for `predict` (fitted on validation data by evaluate_skinclip.py); 1 = off.
            self.register_buffer("calibration_temperature", torch.empty(()), persistent=False)
        self.post_init()

    # ---- structure -------------------------------------------------------------------------------------

    @property
    def text_stack(self) -> nn.Module:
        return self.language_model.get_decoder()

    @property
    def patch_grid(self) -> tuple[int, int]:
        return self.vision.grid

    def trained_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """What training changes: own modules, CLS, logit scale and LoRA tensors (never base weights).

        ``state_dict`` filters a given state dict instead of this model's (FSDP hands a gathered one to
        ``save_pretrained`` while the model's own tensors are sharded).
        """
        own_prefixes = tuple(f"{name}." for name in self._own_modules)
        return {
            name: tensor
            for name, tensor in (self.state_dict() if state_dict is None else state_dict).items()
            if name.startswith(own_prefixes) or name in self._own_parameters or ".lora_" in name
        }

    def parameter_counts(self) -> dict[str, int]:
        """Trainable and total parameter counts (4-bit weights count as stored elements × 2)."""

        def numel(param):
            # bitsandbytes packs two 4-bit values per uint8 element.
            return param.numel() * 2 if param.dtype == torch.uint8 else param.numel()

        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        lora = sum(p.numel() for n, p in self.named_parameters() if ".lora_" in n)
        return {
            "trainable": trainable,
            "lora": lora,
            "heads": trainable - lora,
            "total": sum(numel(p) for p in self.parameters()),
        }

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ):
        # Only the decoder recomputes: the CLIP tower runs without gradients anyway. Non-reentrant
        # checkpointing needs no input that requires grad (the decoder's inputs come from the projector).
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        if hasattr(self.language_model, "activation_checkpointing_enable"):
            self.language_model.activation_checkpointing_enable(
                activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers, offload=offload
            )
        else:  # transformers releases before the activation_checkpointing rename
            self.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def activation_checkpointing_disable(self):
        if hasattr(self.language_model, "activation_checkpointing_disable"):
            self.language_model.activation_checkpointing_disable()
        else:
            self.language_model.gradient_checkpointing_disable()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs):
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self):
        self.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        stack = self.text_stack
        return any(getattr(module, "gradient_checkpointing", False) for module in stack.modules())

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing

    # ---- encoders --------------------------------------------------------------------------------------

    def encode_image(
        self, pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image → (decoder image tokens `(batch, num_image_tokens, hidden)`, projected patches
        `(batch, num_patches, hidden)`).

        ``vision_features`` are precomputed frozen CLIP tokens `(batch, num_tokens, vision_hidden)` (a cache
        that skips the tower when augmentation is off); otherwise ``pixel_values`` `(batch, 3, H, W)`.
        """
        if vision_features is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values or precomputed vision_features")
            with torch.no_grad():
                vision_features = self.vision.patch_tokens(pixel_values)
        expected = (self.vision.num_prefix_tokens + self.vision.num_patches, self.vision.hidden_size)
        if tuple(vision_features.shape[-2:]) != expected:
            raise ValueError(
                f"vision_features have {vision_features.shape[-2]} tokens of width {vision_features.shape[-1]}; "
                f"the CLIP tower gives {expected[0]} tokens (a {self.patch_grid[0]}x{self.patch_grid[1]} patch grid "
                f"and {self.vision.num_prefix_tokens} prefix token(s)) of width {expected[1]}"
            )
        projected = self.projector(vision_features.to(self.projector_dtype))
        patches = projected[:, -self.vision.num_patches :]
        return self._pool_image_tokens(projected[:, : -self.vision.num_patches], patches), patches

    def _pool_image_tokens(self, prefix: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """`[prefix][k×k average-pooled patches]`: the image tokens the decoder reads (`config.image_token_pooling`).

        Averaging after the projector keeps its input width (a checkpoint's projector works at any k) and leaves
        the unpooled patches to Focal Pooling, so the grounding map keeps the tower's full grid.
        """
        k = self.config.image_token_pooling
        if k == 1:
            return torch.cat([prefix, patches], dim=1)
        rows, columns = self.patch_grid
        grid = patches.transpose(1, 2).unflatten(2, (rows, columns))  # (batch, hidden, rows, columns)
        # ceil_mode: a border window that overhangs the grid averages only the patches inside it.
        pooled = F.avg_pool2d(grid, kernel_size=k, stride=k, ceil_mode=True)
        return torch.cat([prefix, pooled.flatten(2).transpose(1, 2)], dim=1)

    @property
    def num_image_tokens(self) -> int:
        """How many image tokens the decoder reads per image (CLIP prefix tokens + pooled patches)."""
        rows, columns = self.patch_grid
        k = self.config.image_token_pooling
        return self.vision.num_prefix_tokens + math.ceil(rows / k) * math.ceil(columns / k)

    @property
    def projector_dtype(self) -> torch.dtype:
        return self.cls_token.dtype

    def encode_report(
        self, report_ids: torch.Tensor, report_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Report tokens → normalised t_global `(batch, alignment_dim)`.

        Identical rows are encoded once: templated reports (one text per class, as the converters write them)
        repeat across a batch, and with ``text_encoder="decoder"`` each encoding is a decoder pass. The result is
        exactly the per-row one (the same rows give the same embedding), gradients included.
        """
        mask = report_attention_mask if report_attention_mask is not None else torch.ones_like(report_ids)
        rows, inverse = torch.unique(torch.cat([report_ids, mask], dim=1), dim=0, return_inverse=True)
        if rows.shape[0] < report_ids.shape[0]:
            width = report_ids.shape[1]
            return self._encode_unique_reports(rows[:, :width], rows[:, width:])[inverse]
        return self._encode_unique_reports(report_ids, report_attention_mask)

    def _encode_unique_reports(
        self, report_ids: torch.Tensor, report_attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        if self.config.text_encoder == "clip":
            with torch.no_grad():
                text = self.vision.text_embeds(report_ids, report_attention_mask)
        else:
            mask = report_attention_mask if report_attention_mask is not None else torch.ones_like(report_ids)
            embeds = self.language_model.get_input_embeddings()(report_ids)
            hidden = self.text_stack(
                inputs_embeds=embeds, attention_mask=mask, position_ids=_positions(mask)
            ).last_hidden_state
            weights = mask.to(hidden.dtype)[..., None]
            text = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return F.normalize(self.text_alignment(text.to(self.projector_dtype)), dim=-1)

    def _alignment_image_embedding(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v_focal, attention = self.focal_pooling(patches)
        return F.normalize(self.image_alignment(v_focal), dim=-1), attention

    # ---- decoder ---------------------------------------------------------------------------------------

    def _decoder_inputs(
        self,
        image_tokens: torch.Tensor,
        prompt_ids: torch.Tensor,
        prompt_attention_mask: torch.Tensor,
        rationale_ids: torch.Tensor | None = None,
        rationale_attention_mask: torch.Tensor | None = None,
        condition_ids: torch.Tensor | None = None,
        condition_attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Build `[image][prompt][CLS][condition][rationale]` embeddings and mask; returns (embeds, mask, cls_index).

        The condition and the rationale are optional (the condition only comes with a rationale).
        """
        embed = self.language_model.get_input_embeddings()
        dtype = embed.weight.dtype if embed.weight.is_floating_point() else self.projector_dtype
        batch = image_tokens.shape[0]
        parts = [image_tokens.to(dtype), embed(prompt_ids).to(dtype), self.cls_token.expand(batch, -1, -1).to(dtype)]
        ones = torch.ones(batch, image_tokens.shape[1], dtype=prompt_attention_mask.dtype, device=prompt_ids.device)
        masks = [ones, prompt_attention_mask, ones[:, :1]]
        if condition_ids is not None:
            if condition_attention_mask is None:
                condition_attention_mask = torch.ones_like(condition_ids)
            parts.append(embed(condition_ids).to(dtype))
            masks.append(condition_attention_mask.to(prompt_attention_mask.dtype))
        if rationale_ids is not None:
            if rationale_attention_mask is None:
                rationale_attention_mask = torch.ones_like(rationale_ids)
            parts.append(embed(rationale_ids).to(dtype))
            masks.append(rationale_attention_mask.to(prompt_attention_mask.dtype))
        cls_index = image_tokens.shape[1] + prompt_ids.shape[1]
        return torch.cat(parts, dim=1), torch.cat(masks, dim=1), cls_index

    def forward(
        self,
        prompt_ids: torch.LongTensor,
        prompt_attention_mask: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        vision_features: torch.FloatTensor | None = None,
        rationale_ids: torch.LongTensor | None = None,
        rationale_attention_mask: torch.LongTensor | None = None,
        report_ids: torch.LongTensor | None = None,
        report_attention_mask: torch.LongTensor | None = None,
        condition_ids: torch.LongTensor | None = None,
        condition_attention_mask: torch.LongTensor | None = None,
        output_hidden_states: bool = False,
        **kwargs,
    ) -> SkinClipVLOutput:
        r"""
        Args:
            prompt_ids (`torch.LongTensor` of shape `(batch_size, prompt_length)`): the metadata prompt, LEFT-padded.
            prompt_attention_mask (`torch.LongTensor` of shape `(batch_size, prompt_length)`): 1 = token, 0 = pad.
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): CLIP-preprocessed images.
            vision_features (`torch.FloatTensor` of shape `(batch_size, num_tokens, vision_hidden)`): precomputed
                frozen CLIP tokens, instead of `pixel_values`.
            rationale_ids (`torch.LongTensor` of shape `(batch_size, rationale_length)`): rationale tokens ending in
                eos, RIGHT-padded; enables `lm_loss`.
            rationale_attention_mask (`torch.LongTensor` of shape `(batch_size, rationale_length)`).
            report_ids (`torch.LongTensor` of shape `(batch_size, report_length)`): ground-truth report tokens for
                t_global (CLIP tokenizer when `config.text_encoder == "clip"`).
            report_attention_mask (`torch.LongTensor` of shape `(batch_size, report_length)`).
            condition_ids (`torch.LongTensor` of shape `(batch_size, condition_length)`): with
                `config.rationale_conditioning == "class"` and `rationale_ids`, the true class's conditioning tokens
                (LEFT-padded; `processor(..., condition_labels=labels)`), placed between CLS and the rationale. No LM
                loss is taken on them, and CLS never sees them.
            condition_attention_mask (`torch.LongTensor` of shape `(batch_size, condition_length)`).
        """
        if kwargs:
            unknown = sorted(k for k in kwargs if k not in ("labels", "num_items_in_batch", "return_dict"))
            if unknown:
                raise TypeError(f"SkinClipVLModel.forward got unexpected inputs {unknown}")
        if prompt_attention_mask is None:
            prompt_attention_mask = torch.ones_like(prompt_ids)
        self._check_condition(condition_ids, rationale_ids)
        image_tokens, patches = self.encode_image(pixel_values, vision_features)
        v_global, focal_attention = self._alignment_image_embedding(patches)

        if rationale_ids is None:
            condition_ids = condition_attention_mask = None  # classification only: nothing after CLS is built
        embeds, mask, cls_index = self._decoder_inputs(
            image_tokens,
            prompt_ids,
            prompt_attention_mask,
            rationale_ids,
            rationale_attention_mask,
            condition_ids,
            condition_attention_mask,
        )
        # The position whose hidden state predicts rationale token 0: CLS, or the condition's last (real) token.
        rationale_start = cls_index + (condition_ids.shape[1] if condition_ids is not None else 0)
        if rationale_ids is None:
            # Classification only: the sequence ends at CLS, nothing after it is computed.
            embeds, mask = embeds[:, : cls_index + 1], mask[:, : cls_index + 1]
        hidden = self._decoder_hidden(embeds, mask)
        logits = self.classifier(hidden[:, cls_index].to(self.projector_dtype))

        lm_loss = lm_tokens = None
        if rationale_ids is not None:
            rationale_mask = (
                rationale_attention_mask if rationale_attention_mask is not None else torch.ones_like(rationale_ids)
            ).bool()
            lm_tokens = rationale_mask.sum()
            if self.lm_head_on_all_positions:
                lm_loss = self._lm_loss_all_positions(hidden, rationale_start, rationale_ids, rationale_mask)
            else:
                # Hidden state at CLS (or the condition's last token) predicts rationale token 0, at rationale token
                # t predicts token t+1. The LM head runs only on these positions: its vocabulary-wide logits are the
                # largest tensor.
                predicting = hidden[:, rationale_start : rationale_start + rationale_ids.shape[1]][rationale_mask]
                head = self.language_model.get_output_embeddings()
                if (
                    self.fused_lm_loss
                    and head.bias is None
                    and not head.weight.requires_grad
                    and head.weight.is_floating_point()
                ):
                    lm_loss = _linear_cross_entropy(predicting, head.weight, rationale_ids[rationale_mask])
                else:
                    lm_loss = F.cross_entropy(head(predicting).float(), rationale_ids[rationale_mask])

        t_global = self.encode_report(report_ids, report_attention_mask) if report_ids is not None else None
        logit_scale = self.logit_scale.exp().clamp(max=self.config.logit_scale_max)
        return SkinClipVLOutput(
            logits=logits,
            lm_loss=lm_loss,
            lm_tokens=lm_tokens,
            v_global=v_global,
            t_global=t_global,
            logit_scale=logit_scale,
            focal_attention=focal_attention,
            hidden_states=hidden if output_hidden_states else None,
        )

    def _decoder_hidden(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The text stack's last hidden states for `[image][prompt][CLS][rationale]`, padding wherever it sits."""
        if not self.trailing_padding or bool(mask.all()):
            return self.text_stack(
                inputs_embeds=embeds, attention_mask=mask, position_ids=_positions(mask), use_cache=False
            ).last_hidden_state
        # The prompt's left padding sits inside the sequence, so the decoder needs a 4-D padding mask, which
        # keeps SDPA off its causal path and repeats K/V per query head (GQA). Moving each row's real tokens to
        # the front, in order, leaves padding only at the end: no real token then attends to a pad under plain
        # causal attention, positions are 0..n-1 as before, and the hidden states go back to their places.
        # Pad positions get other (unused) values.
        order = torch.sort((mask == 0).to(torch.int8), dim=1, stable=True).indices
        packed = embeds.gather(1, order[..., None].expand_as(embeds))
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        hidden = self.text_stack(
            inputs_embeds=packed, attention_mask=None, position_ids=positions, use_cache=False
        ).last_hidden_state
        return hidden.gather(1, torch.argsort(order, dim=1)[..., None].expand_as(hidden))

    def _check_condition(self, condition_ids, rationale_ids) -> None:
        """Conditioning tokens come with a rationale exactly when the config asks for them (no silent mix-up)."""
        conditioned = self.config.rationale_conditioning == "class"
        if conditioned and rationale_ids is not None and condition_ids is None:
            raise ValueError(
                "config.rationale_conditioning='class': a forward pass with rationale_ids needs condition_ids "
                "(the true class's tokens: processor(..., condition_labels=labels))"
            )
        if not conditioned and condition_ids is not None:
            raise ValueError(
                f"condition_ids were given but config.rationale_conditioning={self.config.rationale_conditioning!r}"
            )

    def _lm_loss_all_positions(self, hidden, rationale_start, rationale_ids, rationale_mask) -> torch.Tensor:
        # The usual causal-LM recipe (LM head over every position, labels -100 outside the rationale), kept
        # only as the benchmark's reference: same loss, much larger logits (benchmarks/bench_skinclip.py).
        logits = self.language_model.get_output_embeddings()(hidden).float()
        labels = torch.full(hidden.shape[:2], -100, dtype=torch.long, device=hidden.device)
        labels[:, rationale_start + 1 :] = rationale_ids.masked_fill(~rationale_mask, -100)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)

    # ---- inference -------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(
        self,
        prompt_ids: torch.LongTensor,
        prompt_attention_mask: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        vision_features: torch.FloatTensor | None = None,
        max_new_tokens: int = 0,
        **generation_kwargs,
    ) -> SkinClipVLPrediction:
        """Class probabilities and the focal attention map; with `max_new_tokens > 0`, also a rationale.

        Generation reuses the classification pass: the prefix ending at CLS is run once with a KV cache.
        """
        if max_new_tokens > 0:
            return self.generate_rationale(
                prompt_ids, prompt_attention_mask, pixel_values, vision_features, max_new_tokens, **generation_kwargs
            )
        outputs = self.forward(prompt_ids, prompt_attention_mask, pixel_values, vision_features)
        return SkinClipVLPrediction(
            probs=torch.softmax(outputs.logits.float() / self.calibration_temperature, dim=-1),
            logits=outputs.logits,
            attention_map=outputs.focal_attention.reshape(-1, *self.patch_grid),
        )

    @torch.no_grad()
    def generate_rationale(
        self,
        prompt_ids: torch.LongTensor,
        prompt_attention_mask: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        vision_features: torch.FloatTensor | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
        class_condition_ids: torch.LongTensor | None = None,
        class_condition_attention_mask: torch.LongTensor | None = None,
    ) -> SkinClipVLPrediction:
        """Greedy (or sampled) rationale generation with a KV cache, batched; also returns the diagnosis.

        With `config.rationale_conditioning == "class"` the rationale follows the conditioning tokens of the
        class head's argmax: `class_condition_ids` / `class_condition_attention_mask` `(num_labels,
        condition_length)` hold each class's tokens (`processor.class_condition_inputs()`).

        Written here rather than through `generate()` because the prefix mixes image embeddings, padding in
        the middle and the CLS token, whose positions `generate()` would recompute differently.
        A row stops at any of the decoder's eos ids (`eos_token_id` overrides them; its default comes from the
        decoder's generation_config.json, e.g. `<|im_end|>` and `<|endoftext|>` for Qwen2.5-VL-Instruct).
        """
        if prompt_attention_mask is None:
            prompt_attention_mask = torch.ones_like(prompt_ids)
        eos_ids = torch.tensor(
            self.eos_token_ids if eos_token_id is None else [int(i) for i in torch.tensor(eos_token_id).flatten()],
            device=prompt_ids.device,
        )
        pad_token_id = self.pad_token_id if pad_token_id is None else pad_token_id
        image_tokens, patches = self.encode_image(pixel_values, vision_features)
        _, focal_attention = self._alignment_image_embedding(patches)
        embeds, mask, cls_index = self._decoder_inputs(image_tokens, prompt_ids, prompt_attention_mask)
        positions = _positions(mask)
        outputs = self.text_stack(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
        logits = self.classifier(outputs.last_hidden_state[:, cls_index].to(self.projector_dtype))
        cache, hidden = returned_cache(outputs), outputs.last_hidden_state[:, -1]
        cache_argument = cache_keyword(type(self.text_stack).forward)
        embed, lm_head = self.language_model.get_input_embeddings(), self.language_model.get_output_embeddings()
        batch = prompt_ids.shape[0]
        finished = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
        next_position = positions[:, -1:] + 1
        if self.config.rationale_conditioning == "class":
            if class_condition_ids is None:
                raise ValueError(
                    "config.rationale_conditioning='class': generation needs class_condition_ids "
                    "(processor.class_condition_inputs())"
                )
            # The predicted class's tokens follow CLS (one cached pass); the rationale starts after them.
            chosen = logits.argmax(-1).to(class_condition_ids.device)
            condition_ids = class_condition_ids[chosen].to(prompt_ids.device)
            condition_mask = (
                torch.ones_like(class_condition_ids)
                if class_condition_attention_mask is None
                else class_condition_attention_mask
            )[chosen].to(mask)
            mask = torch.cat([mask, condition_mask], dim=1)
            condition_positions = positions[:, -1:] + condition_mask.long().cumsum(-1)
            outputs = self.text_stack(
                inputs_embeds=embed(condition_ids).to(embeds.dtype),
                attention_mask=mask,
                position_ids=condition_positions,
                use_cache=True,
                **{cache_argument: cache},
            )
            cache, hidden = returned_cache(outputs), outputs.last_hidden_state[:, -1]
            next_position = condition_positions[:, -1:] + 1
        generated = []
        for _ in range(max_new_tokens):
            token_logits = lm_head(hidden).float()
            tokens = _sample(token_logits, do_sample, temperature, top_p, generator)
            tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
            generated.append(tokens)
            finished |= torch.isin(tokens, eos_ids)
            if bool(finished.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            outputs = self.text_stack(
                inputs_embeds=embed(tokens[:, None]).to(embeds.dtype),
                attention_mask=mask,
                position_ids=next_position,
                use_cache=True,
                **{cache_argument: cache},
            )
            cache, hidden = returned_cache(outputs), outputs.last_hidden_state[:, -1]
            next_position = next_position + 1
        rationale_ids = torch.stack(generated, dim=1) if generated else prompt_ids.new_zeros(batch, 0)
        return SkinClipVLPrediction(
            probs=torch.softmax(logits.float() / self.calibration_temperature, dim=-1),
            logits=logits,
            attention_map=focal_attention.reshape(-1, *self.patch_grid),
            rationale_ids=rationale_ids,
        )

    @torch.no_grad()
    def word_grounding(
        self,
        word_ids: torch.LongTensor,
        word_attention_mask: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        vision_features: torch.FloatTensor | None = None,
    ) -> torch.FloatTensor:
        """Word-region maps (paper Fig. 4): `(batch, num_words, grid_height, grid_width)`, each map sums to 1.

        Each patch's value `p_i W_v` is taken into the alignment space the way `v_global` is, and compared
        with each word's embedding from the report encoder: the per-patch terms of the alignment score, whose
        gradient (paper Eq. 7) is what trains the focal attention. Softmax over patches at the learned
        logit scale turns the similarities into a map.
        """
        _, patches = self.encode_image(pixel_values, vision_features)
        patch_embeds = F.normalize(self.image_alignment(self.focal_pooling.patch_values(patches)), dim=-1)
        word_embeds = self.encode_report(word_ids, word_attention_mask)  # (num_words, alignment_dim)
        similarity = torch.einsum("bnd,wd->bwn", patch_embeds, word_embeds)
        scale = self.logit_scale.exp().clamp(max=self.config.logit_scale_max)
        maps = torch.softmax(similarity * scale, dim=-1)
        return maps.reshape(maps.shape[0], maps.shape[1], *self.patch_grid)

    # ---- save / load -----------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        push_to_hub: bool = False,
        include_bases: bool | None = None,
        **kwargs,
    ):
        """Write config, the code files, the trained tensors (safetensors) and `lora/adapter_config.json`.

        The code files are the remote code a Hub user runs: configuration, modeling, processing, the metadata
        sentence (`metadata_skinclip.py`) and the pipeline (`pipeline_skinclip.py`); `config.json` names the model,
        the processor (`AutoProcessor`) and the pipeline (`custom_pipelines`, task ``skin-lesion-diagnosis``).

        Bases that are local folders outside the checkpoint make it load only where those folders are: saving
        warns, pushing refuses, each naming the fix. ``include_bases=True`` copies them into ``bases/`` inside the
        checkpoint (from_pretrained resolves them there), so the folder stands alone; None takes the model's
        ``include_bases`` attribute (off unless train.py's include_bases sets it).

        Extra keyword arguments of `PreTrainedModel.save_pretrained` (`safe_serialization`, `max_shard_size`, ...)
        are accepted for Trainer compatibility. A given `state_dict` (FSDP's gathered one) is filtered to the
        trained tensors; otherwise they come from the model. Always written as safetensors.
        """
        from safetensors.torch import save_file
        from transformers.dynamic_module_utils import custom_object_save

        try:  # a relative import, so that transformers ships pipeline_skinclip.py beside this file
            from .pipeline_skinclip import PIPELINE_TASK, pipeline_task_entry
        except ImportError:  # a checkout, rather than Hub remote code
            from pipeline_skinclip import PIPELINE_TASK, pipeline_task_entry

        save_directory = Path(save_directory)
        if save_directory.is_file():
            raise ValueError(f"save_directory {save_directory} is a file")
        save_directory.mkdir(parents=True, exist_ok=True)
        is_main_process = kwargs.pop("is_main_process", True)
        if not is_main_process:
            return
        self.config.architectures = [type(self).__name__]
        custom_object_save(self, save_directory, config=self.config)
        self.config.auto_map["AutoProcessor"] = f"{SkinClipVLProcessor.__module__.split('.')[-1]}.SkinClipVLProcessor"
        self.config.custom_pipelines = {PIPELINE_TASK: pipeline_task_entry()}
        # Local bases are recorded relative to the checkpoint, so it loads from any working directory.
        saved_config = relative_base_paths(self.config, save_directory)
        saved_config.save_pretrained(save_directory)
        trained = self.trained_state_dict(kwargs.pop("state_dict", None))
        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in trained.items()}
        save_file(tensors, str(save_directory / TRAINED_WEIGHTS_NAME), metadata={"format": "pt"})
        self.lora_config.save_pretrained(str(save_directory / LORA_SUBFOLDER))
        # peft records the decoder path the adapters were built on; keep the name config.json gives, not a path
        # of this machine.
        _rewrite_json(
            save_directory / LORA_SUBFOLDER / LORA_CONFIG_NAME,
            base_model_name_or_path=saved_config.decoder_config.model_name_or_path,
        )
        if self.include_bases if include_bases is None else include_bases:
            bundle_bases(save_directory)
        outside = bases_outside(save_directory)
        if outside and not push_to_hub and not getattr(self, "_warned_bases_outside", False):
            # Once per model: Trainer saves a checkpoint per epoch, and the reason and fix do not change.
            logger.warning(standalone_problem(save_directory, outside, pushing=False))
            self._warned_bases_outside = True
        if push_to_hub:
            if outside:
                raise ValueError(standalone_problem(save_directory, outside, pushing=True))
            from huggingface_hub import HfApi

            repo_id = kwargs.pop("repo_id", None) or save_directory.name
            api = HfApi(token=kwargs.pop("token", None))
            api.create_repo(repo_id, private=kwargs.pop("private", None), exist_ok=True)
            api.upload_folder(
                repo_id=repo_id, folder_path=str(save_directory), commit_message=kwargs.pop("commit_message", None)
            )

    def push_to_hub(self, repo_id: str, include_bases: bool | None = None, **kwargs):
        """Save into a temporary folder and upload it; refused (before any upload) while a base is a local folder
        outside the checkpoint (name it by Hub id, or pass ``include_bases=True``)."""
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(
                Path(folder) / repo_id.split("/")[-1],
                push_to_hub=True,
                repo_id=repo_id,
                include_bases=include_bases,
                **kwargs,
            )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        config: SkinClipVLConfig | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        device: torch.device | str | None = None,
        device_map: str | int | torch.device | dict | None = None,
        dtype: str | torch.dtype | None = None,
        torch_dtype: str | torch.dtype | None = None,
        attn_implementation: str | None = None,
        **kwargs,
    ) -> SkinClipVLModel:
        """Rebuild the whole model: bases from their own ids or paths, then the trained tensors of the checkpoint.

        Works for a local folder or a Hub repo. Hub arguments are honoured, for the checkpoint and for both bases:
        `revision` (pins the checkpoint; the bases are pinned by their own `revision` in the config), `cache_dir`,
        `token`, `local_files_only`, `force_download`. `dtype` (or `torch_dtype`) sets the compute dtype,
        `device_map` a single device (`"cuda:0"`, `0`, `"cpu"`); sharding maps (`"auto"`, a dict) are refused.
        Local base paths in the config resolve relative to the checkpoint folder first, then the working
        directory. A `config` passed explicitly must agree with the checkpoint's on labels, decoder and vision tower.
        """
        from safetensors.torch import load_file

        if model_args:
            raise TypeError(f"unexpected positional arguments {model_args}")
        device = _single_device(device, device_map)
        # Consumed by the Auto classes / remote-code machinery before we get here; nothing left to do with them.
        for handled_upstream in (
            "trust_remote_code",
            "_from_auto",
            "_from_pipeline",
            "adapter_kwargs",
            "_commit_hash",
            "code_revision",
        ):
            kwargs.pop(handled_upstream, None)
        _refuse_unsupported_loading_arguments(kwargs)
        hub_kwargs = _hub_kwargs(
            cache_dir=cache_dir, token=token, local_files_only=local_files_only, force_download=force_download
        )
        folder = checkpoint_folder(pretrained_model_name_or_path, revision=revision, **hub_kwargs)
        _require_files(folder, ["config.json", TRAINED_WEIGHTS_NAME, f"{LORA_SUBFOLDER}/{LORA_CONFIG_NAME}"])
        saved_config = resolve_base_paths(SkinClipVLConfig.from_json_file(str(folder / "config.json")), folder)
        if config is None:
            config = saved_config
        else:
            config = resolve_base_paths(config, folder)
            _check_same_bases(config, saved_config, pretrained_model_name_or_path)
        requested_dtype = torch_dtype if dtype is None else dtype
        if requested_dtype is not None and str(requested_dtype) != "auto":
            config.decoder_config.compute_dtype = _dtype_name(requested_dtype)
        if attn_implementation is not None:
            config.decoder_config.attn_implementation = attn_implementation
        lora_saved = json.loads((folder / LORA_SUBFOLDER / LORA_CONFIG_NAME).read_text())
        decoder = config.decoder_config
        if (lora_saved.get("r"), lora_saved.get("lora_alpha")) != (decoder.lora_r, decoder.lora_alpha) or sorted(
            lora_saved.get("target_modules") or []
        ) != sorted(decoder.lora_target_modules):
            raise ValueError(
                f"{pretrained_model_name_or_path}: lora/{LORA_CONFIG_NAME} (r={lora_saved.get('r')}, "
                f"alpha={lora_saved.get('lora_alpha')}, targets={lora_saved.get('target_modules')}) disagrees with "
                f"config.decoder_config (r={decoder.lora_r}, alpha={decoder.lora_alpha}, "
                f"targets={decoder.lora_target_modules})"
            )
        model = cls(config, device=device, hub_kwargs=hub_kwargs)
        weights = folder / TRAINED_WEIGHTS_NAME
        try:
            tensors = load_file(str(weights))
        except Exception as error:  # safetensors raises its own error types; name the file
            raise ValueError(f"{weights}: not a readable safetensors file ({error})") from error
        model.load_trained_tensors(tensors, source=str(weights))
        calibration = folder / CALIBRATION_NAME
        if calibration.is_file():
            try:
                stored = json.loads(calibration.read_text())
            except ValueError as error:  # invalid JSON or UTF-8: name the file
                raise ValueError(f"{calibration}: not valid JSON ({error})") from error
            temperature = stored.get("temperature", 1.0) if isinstance(stored, dict) else None
            if (
                isinstance(temperature, bool)
                or not isinstance(temperature, (int, float))
                or not math.isfinite(temperature)
                or temperature <= 0
            ):
                raise ValueError(f"{calibration}: temperature must be a positive number, got {temperature!r}")
            model.calibration_temperature.fill_(temperature)
        model.source_folder = folder  # where the processor, calibration.json and the bundled bases are
        model.eval()
        return model

    def load_trained_tensors(self, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load own-module and LoRA tensors; any missing, unexpected or mis-shaped tensor is an error."""
        expected = self.trained_state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{source}: trained tensors do not match this model "
                f"(missing {len(missing)}: {missing[:5]}; unexpected {len(unexpected)}: {unexpected[:5]}). "
                "Was it saved with another decoder, LoRA setting or transformers/peft naming?"
            )
        for name, tensor in tensors.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(
                    f"{source}: tensor {name} has shape {tuple(tensor.shape)}, the model expects "
                    f"{tuple(expected[name].shape)} (labels, decoder or vision tower differ from the config?)"
                )
            # A diverged or damaged run's NaN weights would otherwise load and predict garbage without a word.
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"{source} ({TRAINED_WEIGHTS_NAME}): trained tensor {name} holds NaN or inf values")
        result = self.load_state_dict(tensors, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{source}: unexpected keys {result.unexpected_keys[:5]}")


# --------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` (a frozen LM head) with the gradient computed in the forward.

    The vocabulary-wide logits (rationale tokens × 152k) are the step's largest tensors: F.cross_entropy keeps
    the logits and their log-softmax for backward, then fills and writes a gradient of the same size. Here the
    tokens go through in chunks of rows: one chunk-sized buffer is reused, turned into the softmax's exponentials
    in place and multiplied back by the head at once (``softmax @ W - W[target]``); only the `(tokens, hidden)`
    gradient is kept.

    Why chunks (measured, benchmarks/RESULTS.md "The demo on a 2-core AVX2 CPU"): at the demo's shapes (768 tokens,
    hidden 64, 152,064 words) one whole-logits buffer is 467 MB, which the kernel zero-fills afresh on every call
    (114k page faults, ~25% of the call's CPU time as system time) and which every elementwise pass streams from
    memory. A ~40 MB chunk is faulted in once per call and stays in cache between the passes.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):
        tokens = len(targets)
        logits_buffer = torch.empty(min(chunk_rows, tokens), weight.shape[0], dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for first in range(0, tokens, chunk_rows):
            rows = slice(first, min(first + chunk_rows, tokens))
            chunk_targets = targets[rows]
            logits = logits_buffer[: len(chunk_targets)]
            if hidden.dtype == weight.dtype == torch.float32:
                torch.mm(hidden[rows], weight.T, out=logits)
            else:
                logits.copy_(hidden[rows] @ weight.T)
            target_logits = logits.gather(1, chunk_targets[:, None]).squeeze(1)
            # Softmax in place (no temporary of the logits' size, as torch.logsumexp would allocate).
            peak = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(peak).exp_()
            total = probs.sum(dim=-1, keepdim=True)
            loss += (peak.squeeze(1) + total.squeeze(1).log() - target_logits).sum()
            if grad is not None:
                # softmax @ W - W[target]: the softmax's division is applied to the (rows, hidden) product instead
                # of the (rows, vocabulary) exponentials, one pass over the chunk fewer (~2% of the demo's time).
                unnormalised = (probs.to(weight.dtype) @ weight).float()
                grad[rows] = (unnormalised / total - weight[chunk_targets].float()).to(grad.dtype)
        ctx.save_for_backward(grad)
        ctx.count = tokens
        return loss / tokens

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * (grad_loss / ctx.count).to(grad.dtype), None, None, None


# Bytes of float32 logits per chunk of `_LinearCrossEntropy`: on the CPU small enough to stay in cache between
# the elementwise passes (40 MiB: 68 rows of a 152k vocabulary; 64 rows measured fastest of 16-128, 1.38× the
# whole-buffer version, see the class docstring); on an accelerator big enough that the chunk loop adds only a
# few kernel launches (1 GiB: 1,765 rows of 152k, the paper's whole batch of rationale tokens in ~2 chunks).
_LM_CHUNK_BYTES = {"cpu": 40 * 2**20}
_LM_CHUNK_BYTES_ACCELERATOR = 2**30


def _linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    chunk_bytes = _LM_CHUNK_BYTES.get(hidden.device.type, _LM_CHUNK_BYTES_ACCELERATOR)
    chunk_rows = max(1, chunk_bytes // (4 * weight.shape[0]))
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows)


@functools.cache  # asked per forward call: read each signature once (functions and classes, no instances)
def cache_keyword(function) -> str:
    """The KV-cache argument's name in ``function``'s signature (a module class's forward, an output class).

    transformers renamed ``past_key_values`` to ``cache`` (the old name warns from 5.2x and goes in 5.40; 5.17,
    which the project still supports and the GPU image runs, knows only the old one).
    """
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


def returned_cache(outputs: ModelOutput):
    """The KV cache of a decoder's output, under either name (see `cache_keyword`)."""
    return outputs["cache"] if "cache" in outputs else outputs.get("past_key_values")


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Contiguous positions that skip padding wherever it sits: `cumsum(mask) - 1`, clamped at 0."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _sample(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def needs_quick_gelu(name: str, tag: str | None) -> bool:
    """OpenAI's CLIP weights were trained with QuickGELU, but e.g. open_clip's plain ``ViT-L-14`` config builds
    GELU (open_clip only warns, and the features are then wrong). A ``local-dir:``/``hf-hub:`` config decides itself.
    """
    import open_clip

    if not tag or name.startswith((LOCAL_DIR_PREFIX, "hf-hub:")):
        return False
    return tag == "openai" or bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu"))


def _require_files(folder: Path, filenames: Sequence[str]) -> None:
    missing = [name for name in filenames if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a complete SkinCLIP-VL checkpoint: missing {missing} "
            f"(expected {list(filenames)}; was it written by SkinClipVLModel.save_pretrained?)"
        )


def _single_device(device, device_map) -> torch.device | None:
    if device_map is None:
        return torch.device(device) if device is not None else None
    if isinstance(device_map, dict) or str(device_map) in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise ValueError(
            f"device_map={device_map!r} is not supported: SkinCLIP-VL loads onto one device; pass device_map='cuda:0' "
            "(or an index, or 'cpu'). For several GPUs, run one process per GPU (accelerate launch)."
        )
    if device is not None and torch.device(device) != _as_device(device_map):
        raise ValueError(f"device={device!r} and device_map={device_map!r} disagree")
    return _as_device(device_map)


def _as_device(value) -> torch.device:
    return torch.device("cuda", value) if isinstance(value, int) else torch.device(value)


def _dtype_name(dtype: str | torch.dtype) -> str:
    names = {value: name for name, value in _DTYPES.items()}
    name = names.get(dtype, str(dtype).removeprefix("torch."))
    if name not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose from {sorted(_DTYPES)} or 'auto'")
    return name


def _refuse_unsupported_loading_arguments(kwargs: dict) -> None:
    """Refuse `from_pretrained` arguments this model cannot honour, each with the reason; never drop one silently."""
    reasons = {
        "subfolder": "load the subfolder's path (or repo) directly",
        "proxies": "set HTTPS_PROXY / HTTP_PROXY in the environment instead",
        "quantization_config": "set decoder_config.quantization (nf4, int8 or none) in the config",
        "low_cpu_mem_usage": "the bases always load with low memory; drop the argument",
        "output_loading_info": "loading is strict: a missing or unexpected trained tensor is an error",
        "key_mapping": "checkpoint tensors are matched by name strictly",
        "tp_plan": "tensor parallelism is not supported",
    }
    use_safetensors = kwargs.pop("use_safetensors", None)
    if use_safetensors is False:
        raise ValueError("use_safetensors=False: SkinCLIP-VL checkpoints are safetensors only")
    subfolder = kwargs.pop("subfolder", "")
    if subfolder:
        raise ValueError(f"subfolder={subfolder!r} is not supported: {reasons['subfolder']}")
    refused = {name: reasons[name] for name in kwargs if name in reasons and kwargs[name] is not None}
    unknown = sorted(set(kwargs) - set(reasons))
    if refused:
        raise ValueError(
            "SkinClipVLModel.from_pretrained cannot honour " + "; ".join(f"{k}: {v}" for k, v in refused.items())
        )
    if unknown:
        raise TypeError(f"SkinClipVLModel.from_pretrained got unexpected arguments {unknown}")


def _check_same_bases(config: SkinClipVLConfig, saved: SkinClipVLConfig, source) -> None:
    differences = []
    if config.id2label != saved.id2label:
        differences.append(f"labels {config.class_names} vs checkpoint {saved.class_names}")
    if config.decoder_config.model_name_or_path != saved.decoder_config.model_name_or_path:
        differences.append(
            f"decoder {config.decoder_config.model_name_or_path!r} "
            f"vs checkpoint {saved.decoder_config.model_name_or_path!r}"
        )
    if (config.vision_config.backend, config.vision_config.model_name_or_path) != (
        saved.vision_config.backend,
        saved.vision_config.model_name_or_path,
    ):
        differences.append(
            f"vision tower {config.vision_config.model_name_or_path!r} "
            f"vs checkpoint {saved.vision_config.model_name_or_path!r}"
        )
    if differences:
        raise ValueError(f"config does not match checkpoint {source}: " + "; ".join(differences))


# --------------------------------------------------------------------------------------------------------
# A checkpoint that stands alone: bases named by Hub id, or copied inside it
# --------------------------------------------------------------------------------------------------------

BASES_SUBFOLDER = "bases"


def _base_folder(name: str, checkpoint: Path) -> Path | None:
    """The local folder a base name points at (relative names: against the checkpoint, then the working
    directory, as `resolve_base_paths` loads them), or None for a Hub id / open_clip model name."""
    path = Path(name.removeprefix(LOCAL_DIR_PREFIX)).expanduser()
    for candidate in [path] if path.is_absolute() else [checkpoint / path, path]:
        if candidate.is_dir():
            return candidate.resolve()
    return None


def bases_outside(checkpoint: str | os.PathLike) -> dict[str, str]:
    """``{role: name in config.json}`` for each base that is a local folder outside the checkpoint folder.

    An open_clip ``pretrained`` weights file on this machine counts too (role ``vision pretrained``).
    """
    checkpoint = Path(checkpoint).resolve()
    config = json.loads((checkpoint / "config.json").read_text())
    outside = {}
    for role in ("vision", "decoder"):
        name = config[f"{role}_config"]["model_name_or_path"]
        folder = _base_folder(name, checkpoint)
        if folder is not None and not folder.is_relative_to(checkpoint):
            outside[role] = name
    pretrained = config["vision_config"].get("pretrained")
    if config["vision_config"].get("backend") == "open_clip" and pretrained and Path(pretrained).expanduser().is_file():
        outside["vision pretrained"] = pretrained
    return outside


def standalone_problem(checkpoint: Path, outside: dict[str, str], pushing: bool) -> str:
    """Why the checkpoint does not stand alone, and the two fixes."""
    listed = "; ".join(f"{role} base {name!r}" for role, name in outside.items())
    effect = (
        "refusing to push: a Hub user could not load it"
        if pushing
        else "it loads only on a machine where these folders are found"
    )
    return (
        f"checkpoint {checkpoint} names local folders outside it ({listed}): {effect}. Fix: name each base by its "
        "Hub id (vision_config/decoder_config.model_name_or_path, e.g. 'openai/clip-vit-large-patch14'), or save "
        f"with include_bases=True (train.py: include_bases: true) to copy them into the checkpoint as "
        f"{BASES_SUBFOLDER}/<vision|decoder>"
    )


def bundle_bases(checkpoint: str | os.PathLike) -> list[str]:
    """Copy every local base folder outside ``checkpoint`` into ``checkpoint/bases/<role>`` and point config.json
    there (relative, so the folder can be moved or pushed). Returns the roles copied.

    Files are hard-linked where the file system allows (same disk: no second copy of the weights), else copied;
    config.json is rewritten atomically, after the copies are complete.
    """
    import shutil

    checkpoint = Path(checkpoint).resolve()
    config_path = checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    copied = []
    for role in ("vision", "decoder"):
        section = config[f"{role}_config"]
        name = section["model_name_or_path"]
        folder = _base_folder(name, checkpoint)
        if folder is None or folder.is_relative_to(checkpoint):
            continue
        target = checkpoint / BASES_SUBFOLDER / role
        staging = target.with_name(f".{role}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(folder, staging, copy_function=_link_or_copy)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        prefix = LOCAL_DIR_PREFIX if name.startswith(LOCAL_DIR_PREFIX) else ""
        section["model_name_or_path"] = prefix + f"{BASES_SUBFOLDER}/{role}"
        copied.append(role)
    if copied:
        _write_json_atomically(config_path, config)
    lora_config = checkpoint / LORA_SUBFOLDER / LORA_CONFIG_NAME
    if "decoder" in copied and lora_config.is_file():
        _rewrite_json(lora_config, base_model_name_or_path=config["decoder_config"]["model_name_or_path"])
    return copied


def _link_or_copy(source: str, destination: str) -> str:
    import shutil

    try:
        os.link(source, destination)
        return destination
    except OSError:  # another file system, or links not allowed
        return shutil.copy2(source, destination)


def _write_json_atomically(path: Path, content: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    partial.replace(path)


def _rewrite_json(path: Path, **fields) -> None:
    content = json.loads(path.read_text())
    content.update(fields)
    _write_json_atomically(path, content)


SkinClipVLModel.register_for_auto_class("AutoModel")

__all__ = [
    "FocalPooling",
    "SkinClipVLModel",
    "SkinClipVLOutput",
    "SkinClipVLPrediction",
    "SkinClipVLPreTrainedModel",
    "SkinClipVLProcessor",
]
