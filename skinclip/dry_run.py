"""``python train.py CONFIG --dry_run``: what a run would build and how much GPU memory it needs, without one weight.

``train.py`` has already validated every config field, the output folder, the dataset's splits, columns and labels
(``skinclip.validation``) when it hands over here. The dry run then

1. decodes a sample of images of every split (an unreadable one is named: split, row, image id);
2. builds the processor from the bases' tokenizer/preprocessor files and the whole model on the meta device
   (``SkinClipVLModel(config, device="meta")``: shapes from the config files, no weight file is opened);
3. tokenises ``per_device_train_batch_size`` real training rows through ``SkinClipVLCollator`` and reports the
   decoder sequence ``[image][prompt][CLS][rationale]`` (``[condition]`` before the rationale with
   ``rationale_conditioning: class``) and what ``max_prompt_tokens`` / ``max_rationale_tokens``
   cut (in the batch and over the whole training split);
4. prints the parameter table (frozen / trained / LoRA, bytes by storage type) and a GPU memory plan (weights,
   gradients, optimizer states, activations with and without activation checkpointing, LM-head logits), with the
   total against 16/24/40/80 GB cards. ``--dry_run_json=PATH`` also writes all of it as JSON.

Every figure of the plan is an estimate from shapes, written out below as formulas; it has not been checked
against a measured GPU peak by this project yet.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from torch import nn

from skinclip.errors import UserError

GIB = 1024**3
CARDS_GB = (16, 24, 40, 80)
IMAGES_CHECKED_PER_SPLIT = 16
# Whole-split truncation counts tokenise text only; past this many rows an evenly spaced sample is counted.
MAX_ROWS_TOKENISED = 100_000

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

# --------------------------------------------------------------------------------------------------------
# Entry point (called by train.py after its validation)
# --------------------------------------------------------------------------------------------------------


def run(dataset, class_names: list[str], model_args, data_args, training_args, config=None) -> dict:
    """The dry run; ``config`` is the new model's config (None when continuing from ``model_name_or_path``)."""
    json_path = _json_path(data_args.dry_run_json)
    splits = [s for s in dict.fromkeys((data_args.train_split, data_args.eval_split, data_args.test_split)) if s]
    images_checked = check_image_sample(dataset, splits, data_args.dataset_path)
    check_reports_are_text(dataset[data_args.train_split], f"{data_args.dataset_path} split {data_args.train_split!r}")
    checkpoint = model_args.model_name_or_path
    config = checkpoint_config(checkpoint, class_names) if checkpoint else config
    processor, model = build_without_weights(config, checkpoint)
    train_split = dataset[data_args.train_split]
    batch = batch_layout(model, processor, train_split, training_args)
    truncation = split_truncation(processor, train_split)
    parameters = parameter_table(model, training_args.lambda_align)
    memory = memory_plan(model, parameters, batch, training_args)
    report = {
        "config": _settings(config, training_args),
        "dataset": {
            "path": data_args.dataset_path,
            "classes": class_names,
            "rows": {split: len(dataset[split]) for split in splits},
            "images_checked": images_checked,
        },
        "batch": batch,
        "train_split_truncation": truncation,
        "parameters": parameters,
        "memory": memory,
        "weights_loaded": False,
    }
    print(format_report(report))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"dry run: plan written to {json_path}")
    return report


def _json_path(value) -> Path | None:
    if value is None:
        return None
    if isinstance(value, bool) or str(value).strip() == "":
        raise UserError("dry_run_json needs a file path: --dry_run_json=plan.json")
    path = Path(str(value))
    if path.is_dir():
        raise UserError(f"dry_run_json {path} is a folder; give a file path such as {path / 'plan.json'}")
    return path


def _settings(config, training_args) -> dict:
    decoder = config.decoder_config
    return {
        "vision_model": config.vision_config.model_name_or_path,
        "decoder_model": decoder.model_name_or_path,
        "quantization": decoder.quantization,
        "compute_dtype": decoder.compute_dtype,
        "lora": {"r": decoder.lora_r, "alpha": decoder.lora_alpha, "targets": list(decoder.lora_target_modules)},
        "optim": _optim_name(training_args),
        "activation_checkpointing": bool(training_args.activation_checkpointing),
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
    }


# --------------------------------------------------------------------------------------------------------
# Data: images and the model without weights
# --------------------------------------------------------------------------------------------------------


def check_image_sample(dataset, splits: list[str], source: str | None) -> int:
    """Decode up to IMAGES_CHECKED_PER_SPLIT evenly spaced images of each split; returns how many were decoded."""
    checked = 0
    for split in splits:
        rows = dataset[split]
        for index in np.linspace(0, len(rows) - 1, min(len(rows), IMAGES_CHECKED_PER_SPLIT)).astype(int):
            _decode_image(rows, int(index), f"{source} split {split!r}")
            checked += 1
    return checked


def check_reports_are_text(split, where: str) -> None:
    """The collator would fail on a row without a report text in the middle of training: name such rows now."""
    not_text = [i for i, report in enumerate(split["report"]) if not isinstance(report, str)][:5]
    if not_text:
        raise UserError(f"{where} rows {not_text}: column 'report' must hold text (the reference report)")


def _decode_image(rows, index: int, where: str) -> None:
    try:
        row = rows[index]
        image = row["image"]
        image.load()  # PIL opens lazily: a truncated file fails only here
        if min(image.size) < 1:
            raise ValueError(f"image has size {image.size}")
    except Exception as error:  # PIL/datasets raise many types for a bad image; all mean the same to the user
        image_id = _image_id(rows, index)
        raise UserError(
            f"{where} row {index}{image_id}: image is not readable ({type(error).__name__}: {error})"
        ) from error


def _image_id(rows, index: int) -> str:
    if "image_id" not in rows.column_names:
        return ""
    return f" (image_id {rows.select_columns(['image_id'])[index]['image_id']})"


def checkpoint_config(path: str, class_names: list[str]):
    """A checkpoint's config with its base paths resolved; its classes must be the training split's."""
    from modeling_skinclip import checkpoint_folder, resolve_base_paths
    from skinclip import validation

    config = validation.load_checkpoint_config(path)
    validation.check_same_classes(config.class_names, class_names, f"checkpoint {path}", "the training split")
    return resolve_base_paths(config, checkpoint_folder(path))


def build_without_weights(config, checkpoint: str | None = None):
    """(processor, model on the meta device): reads config, tokenizer and preprocessor files, never a weight."""
    from modeling_skinclip import SkinClipVLModel, SkinClipVLProcessor

    processor = SkinClipVLProcessor.from_pretrained(checkpoint, config=None if checkpoint else config)
    try:
        model = SkinClipVLModel(config, device="meta")
    except ValueError as error:  # LoRA targets the decoder lacks, no eos id, not a CLIP model: named already
        raise UserError(str(error)) from error
    return processor, model


# --------------------------------------------------------------------------------------------------------
# Batch layout
# --------------------------------------------------------------------------------------------------------


def batch_layout(model, processor, train_split, training_args) -> dict:
    """Collate ``per_device_train_batch_size`` seeded-random training rows exactly as training does."""
    from trainer_cfa import SkinClipVLCollator

    size = min(training_args.per_device_train_batch_size, len(train_split))
    indices = np.random.default_rng(training_args.seed).choice(len(train_split), size=size, replace=False)
    rows = [train_split[int(i)] for i in sorted(indices)]
    with_report, with_rationale = training_args.lambda_align > 0, training_args.lambda_gen > 0
    collator = SkinClipVLCollator(
        processor,
        with_report=with_report,
        with_rationale=with_rationale,
        augment=training_args.augment,
        seed=training_args.seed,
    )
    try:
        batch = collator(rows)
    except Exception as error:  # e.g. a None report, a metadata_text that is not text
        raise UserError(
            f"training split rows {sorted(int(i) for i in indices)} cannot be collated into a batch "
            f"({type(error).__name__}: {error})"
        ) from error
    image_tokens = model.encode_image(batch["pixel_values"].to("meta"))[0].shape[1]  # shapes only
    full = untruncated_lengths(processor, [r.get("metadata_text") or "" for r in rows], [r["report"] for r in rows])
    config = processor.config
    layout = {
        "rows": size,
        "pixel_values": list(batch["pixel_values"].shape),
        "image_tokens": int(image_tokens),
        "image_token_pooling": model.config.image_token_pooling,
        "prompt": _part(batch, "prompt", full["prompt"], config.max_prompt_tokens),
        "cls": 1,
        "rationale": _part(batch, "rationale", full["rationale"], config.max_rationale_tokens)
        if with_rationale
        else None,
        "report": _part(batch, "report", full["report"], config.max_report_tokens)
        if with_report and full["report"] is not None
        else None,
    }
    # rationale_conditioning="class": "Diagnosis: <class>." between CLS and the rationale, every row padded to the
    # longest class's tokens (the table generation uses too), so that width is also the most it adds.
    layout["condition"] = (
        {
            "lengths": [int(n) for n in batch["condition_attention_mask"].sum(dim=1).tolist()],
            "padded": int(batch["condition_ids"].shape[1]),
        }
        if "condition_ids" in batch
        else None
    )
    padded_condition = layout["condition"]["padded"] if layout["condition"] else 0
    padded_rationale = layout["rationale"]["padded"] if with_rationale else 0
    maximum_rationale = config.max_rationale_tokens if with_rationale else 0
    layout["decoder_tokens"] = {
        "this_batch": image_tokens + layout["prompt"]["padded"] + 1 + padded_condition + padded_rationale,
        "maximum": image_tokens + config.max_prompt_tokens + 1 + padded_condition + maximum_rationale,
    }
    return layout


def _part(batch: dict, name: str, full_lengths: list[int], limit: int) -> dict:
    """Per-row token counts in the batch, its padded width, and how many rows the limit cut."""
    lengths = batch[f"{name}_attention_mask"].sum(dim=1).tolist()
    return {
        "lengths": [int(n) for n in lengths],
        "padded": int(batch[f"{name}_ids"].shape[1]),
        "limit": int(limit),
        "truncated": sum(n > limit for n in full_lengths),
    }


def untruncated_lengths(processor, metadata_texts: list[str], reports: list[str]) -> dict:
    """Token counts before any cut, tokenised as SkinClipVLProcessor does (prompt, rationale + eos, report)."""
    tokenizer = processor.tokenizer
    prompts = tokenizer(processor.prompt_texts(metadata_texts), add_special_tokens=False)["input_ids"]
    rationales = tokenizer([" " + text.strip() for text in reports], add_special_tokens=False)["input_ids"]
    report_tokenizer = processor.report_tokenizer
    if report_tokenizer is tokenizer:
        report = [len(ids) + 1 for ids in rationales]
    elif hasattr(report_tokenizer, "pad_token_id"):  # a transformers tokenizer (CLIP's): special tokens included
        report = [len(ids) for ids in report_tokenizer(list(reports))["input_ids"]]
    else:  # open_clip's tokenizer always pads/cuts to its context length: nothing to count
        report = None
    return {
        "prompt": [len(ids) for ids in prompts],
        "rationale": [len(ids) + 1 for ids in rationales],
        "report": report,
    }


def split_truncation(processor, split) -> dict:
    """How many rows of the (training) split each limit cuts; text columns only, no image is decoded."""
    rows = len(split)
    if rows > MAX_ROWS_TOKENISED:
        split = split.select(np.linspace(0, rows - 1, MAX_ROWS_TOKENISED).astype(int))
    texts = split.select_columns(["metadata_text", "report"])
    full = untruncated_lengths(processor, [t or "" for t in texts["metadata_text"]], texts["report"])
    config = processor.config
    limits = {
        "prompt": config.max_prompt_tokens,
        "rationale": config.max_rationale_tokens,
        "report": config.max_report_tokens,
    }
    counted = {"rows": len(split), "of_rows": rows}
    for name, lengths in full.items():
        if lengths is not None:
            counted[name] = {
                "limit": limits[name],
                "truncated": sum(n > limits[name] for n in lengths),
                "longest": max(lengths, default=0),
            }
    return counted


# --------------------------------------------------------------------------------------------------------
# Parameter table
# --------------------------------------------------------------------------------------------------------

# Storage of the decoder's quantised linear weights, per weight tensor of n elements (rows = out_features), as
# bitsandbytes keeps them with modeling_skinclip._bnb_config's settings:
#   nf4 (double quantisation on): n/2 (two 4-bit codes a byte) + n/64 (one 8-bit absmax per 64-value block)
#       + 4·n/(64·256) (one fp32 absmax per 256 blocks) + 4 (fp32 offset) + 64 (the 16-value fp32 NF4 code table)
#   int8 (LLM.int8): n (int8 codes) + 4·rows (one fp32 scale per row)
# Everything else (CLIP, embeddings, LM head, norms, biases) stays in the compute dtype; trained tensors are fp32.
NF4_RULE = (
    "n/2 + n/64 + 4n/16384 + 68 bytes per weight tensor (4-bit codes, 8-bit absmax per 64, fp32 absmax per 256 blocks)"
)
INT8_RULE = "n + 4*rows bytes per weight tensor (int8 codes + fp32 row scales)"


def quantised_weight_bytes(numel: int, rows: int, quantization: str) -> int:
    if quantization == "nf4":
        blocks = -(-numel // 64)
        return -(-numel // 2) + blocks + 4 * -(-blocks // 256) + 4 + 64
    if quantization == "int8":
        return numel + 4 * rows
    raise ValueError(f"no quantised storage for quantization={quantization!r}")


def _quantised_weights(language_model: nn.Module) -> dict[int, int]:
    """id(weight) → rows, of the weights bitsandbytes would quantise: every ``nn.Linear`` of the decoder except the
    LM head (transformers' ``get_keys_to_not_convert`` keeps the output embeddings) and LoRA's own layers."""
    head = language_model.get_output_embeddings()
    return {
        id(module.weight): module.out_features
        for name, module in language_model.named_modules()
        if isinstance(module, nn.Linear) and module is not head and "lora_" not in name
    }


def _groups(model) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every parameter (deduplicated, as named_parameters gives them) in one table row. "new modules" are what
    SkinCLIP-VL adds: projector, Focal Pooling, CLS token, classifier, alignment projections, logit scale."""
    lm = model.language_model
    embedding, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    quantised = _quantised_weights(lm) if model.config.decoder_config.quantization != "none" else {}
    groups: dict[str, list] = {
        name: []
        for name in (
            "CLIP vision",
            "CLIP text (reports)",
            "decoder linear",
            "decoder embeddings",
            "LM head",
            "decoder norms/biases",
            "LoRA",
            "new modules",
        )
    }
    for name, param in model.named_parameters():
        if name.startswith("vision."):
            tower = name.split(".")[2] if name.startswith("vision.model.") else ""
            key = "CLIP vision" if tower.startswith(("vision", "visual")) else "CLIP text (reports)"
        elif ".lora_" in name:
            key = "LoRA"
        elif not name.startswith("language_model."):
            key = "new modules"
        elif param is embedding:
            key = "decoder embeddings"
        elif param is head:
            key = "LM head"
        elif id(param) in quantised or (not quantised and param.dim() == 2):
            key = "decoder linear"
        else:
            key = "decoder norms/biases"
        groups[key].append((name, param))
    return groups


def _trained(name: str, param: nn.Parameter, lambda_align: float) -> bool:
    from trainer_cfa import ALIGNMENT_ONLY_MODULES

    # CFATrainer freezes what only the alignment term trains when lambda_align is 0.
    return param.requires_grad and not (not lambda_align and name.split(".")[0] in ALIGNMENT_ONLY_MODULES)


def _storage(param: nn.Parameter, quantised: dict[int, int], quantization: str) -> tuple[str, int]:
    if id(param) in quantised:
        return quantization, quantised_weight_bytes(param.numel(), quantised[id(param)], quantization)
    return str(param.dtype).removeprefix("torch."), param.numel() * param.element_size()


def parameter_table(model, lambda_align: float) -> dict:
    """Rows of the table, totals, bytes by storage type, and the shapes the plan needs."""
    quantization = model.config.decoder_config.quantization
    quantised = _quantised_weights(model.language_model) if quantization != "none" else {}
    rows, by_storage = [], {}
    trained_numel, trained_tensors = 0, []
    for group, params in _groups(model).items():
        if not params:
            continue
        row = {"group": group, "parameters": 0, "trained": 0, "bytes": 0, "storage": {}}
        for name, param in params:
            storage, size = _storage(param, quantised, quantization)
            row["parameters"] += param.numel()
            row["bytes"] += size
            row["storage"][storage] = row["storage"].get(storage, 0) + size
            by_storage[storage] = by_storage.get(storage, 0) + size
            if _trained(name, param, lambda_align):
                row["trained"] += param.numel()
                trained_tensors.append((param.numel(), param.element_size()))
        trained_numel += row["trained"]
        rows.append(row)
    head = model.language_model.get_output_embeddings().weight
    total = sum(row["parameters"] for row in rows)
    lora = next((row["trained"] for row in rows if row["group"] == "LoRA"), 0)
    return {
        "rows": rows,
        "total": total,
        "trained": trained_numel,
        "lora": lora,
        "frozen": total - trained_numel,
        "bytes_by_storage": by_storage,
        "lm_head_shape": list(head.shape),
        "counting": NF4_RULE
        if quantization == "nf4"
        else INT8_RULE
        if quantization == "int8"
        else "numel x dtype size",
        "_trained_tensors": trained_tensors,  # (numel, element size) for the plan; dropped before printing/JSON
    }


# --------------------------------------------------------------------------------------------------------
# Memory plan
# --------------------------------------------------------------------------------------------------------

# Optimizer state per trained element: (number of states, bytes per state). 8-bit states (bitsandbytes, torchao)
# add one fp32 absmax per 256-value block, and bitsandbytes keeps tensors under 4096 elements in 32-bit states.
OPTIMIZER_STATES: dict[str, tuple[int, float]] = {
    **dict.fromkeys(
        (
            "adamw_torch",
            "adamw_torch_fused",
            "adamw_torch_xla",
            "adamw_torch_npu_fused",
            "adamw_anyprecision",
            "paged_adamw_32bit",
            "grokadamw",
            "stable_adamw",
            "schedule_free_adamw",
            "schedule_free_radam",
            "galore_adamw",
            "apollo_adamw",
        ),
        (2, 4),
    ),
    **dict.fromkeys(
        ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "adamw_torch_8bit", "galore_adamw_8bit"), (2, 1)
    ),
    "adamw_torch_4bit": (2, 0.5),
    **dict.fromkeys(("ademamix", "paged_ademamix_32bit"), (3, 4)),
    **dict.fromkeys(("ademamix_8bit", "paged_ademamix_8bit"), (3, 1)),
    **dict.fromkeys(
        (
            "lion_32bit",
            "paged_lion_32bit",
            "adagrad",
            "rmsprop",
            "rmsprop_bnb",
            "rmsprop_bnb_32bit",
            "schedule_free_sgd",
        ),
        (1, 4),
    ),
    **dict.fromkeys(("lion_8bit", "paged_lion_8bit", "rmsprop_bnb_8bit"), (1, 1)),
    **dict.fromkeys(("sgd", "lomo", "adalomo"), (0, 4)),  # SGD without momentum (transformers' default)
    "adafactor": (0, 4),  # factored second moment: rows + columns per matrix, negligible here
}
BNB_MIN_8BIT_SIZE = 4096


def _optim_name(training_args) -> str:
    optim = training_args.optim
    return getattr(optim, "value", optim)


def optimizer_bytes(optim: str, trained_tensors: list[tuple[int, int]]) -> tuple[int, str]:
    """Bytes of optimizer state for the trained tensors, and the rule used (unknown optimizers: AdamW's)."""
    states, size = OPTIMIZER_STATES.get(optim, (2, 4))
    rule = f"{states} state(s) x {size:g} byte(s)" + ("" if optim in OPTIMIZER_STATES else ", assumed like AdamW")
    total = 0.0
    for numel, _ in trained_tensors:
        if size >= 4 or numel < BNB_MIN_8BIT_SIZE:
            per_state = 4 * numel
        else:
            per_state = size * numel + 4 * -(-numel // 256)
        total += states * per_state
    if size < 4:
        rule += " (+ fp32 absmax per 256; tensors under 4096 elements keep fp32 states)"
    return int(total), rule


def _decoder_shape(model) -> dict:
    text = model.language_model.config.get_text_config()
    hidden = text.hidden_size
    heads = text.num_attention_heads
    return {
        "hidden": hidden,
        "intermediate": getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden,
        "layers": text.num_hidden_layers,
        "heads": heads,
        "kv_heads": getattr(text, "num_key_value_heads", None) or heads,
        "vocab": model.language_model.get_output_embeddings().weight.shape[0],
    }


def _lora_inputs_per_layer(model) -> list[int]:
    """in_features of each LoRA-adapted module of one decoder layer (the first)."""
    layer = next(m for m in model.text_stack.modules() if isinstance(m, nn.ModuleList))[0]
    return [m.in_features for name, m in layer.named_modules() if hasattr(m, "lora_A") and hasattr(m, "in_features")]


def layer_activation_bytes_per_token(
    shape: dict,
    compute_bytes: int,
    lora_inputs: list[int],
    lora_r: int,
    lora_dropout: float,
    attn_implementation: str,
    sequence: int,
) -> int:
    """Bytes one decoder layer keeps for backward, per token (Qwen2/Llama-style layer, frozen base weights).

    With h = hidden, i = intermediate, c = compute-dtype bytes:
      2 RMSNorms       2 · (4h fp32 upcast of the input + c·h normalised + c·h output fed to the projections)
      attention        q, k, v (k and v repeated to all heads: transformers' SDPA path with a padding mask)
                       and the output: 4·c·h, plus the o_proj input (a contiguous copy): c·h
                       (eager attention adds the fp32 softmax and its c-byte copy: heads · seq · (4 + c))
      MLP              gate, up, act(gate), act(gate)·up: 4·c·i
      LoRA per module  fp32 copy of its input (4·in) + dropout mask (1·in, when dropout > 0) + A's output (4·r)
    For Qwen2.5-7B in bf16 with LoRA on q, v: 36·h + 8·i + 8·r ≈ 274 KiB per token per layer.
    """
    h, i, c = shape["hidden"], shape["intermediate"], compute_bytes
    norms = 2 * (4 * h + 2 * c * h)
    attention = 4 * c * h + c * h
    if attn_implementation == "eager":
        attention += shape["heads"] * sequence * (4 + c)
    mlp = 4 * c * i
    lora = sum(4 * n + (n if lora_dropout > 0 else 0) + 4 * lora_r for n in lora_inputs)
    return norms + attention + mlp + lora


def activation_bytes(model, shape: dict, batch_size: int, sequence: int) -> dict:
    """Activations of one training step at ``batch_size`` × ``sequence`` tokens, with and without checkpointing.

    per_layer = batch · seq · layer_activation_bytes_per_token (above); L = decoder layers.
      without checkpointing: L · per_layer
      with checkpointing (per decoder layer): L · batch · seq · c·h (each layer's saved input) + one per_layer
          (the layer being recomputed in backward)
    Both add: one more per_layer as the backward's working gradients, the final RMSNorm (batch · seq · (4 + 2c)·h),
    and the image path outside the decoder, batch · clip_tokens · (4·d_vision fp32 projector input + 4·h fp32
    projector output kept by Focal Pooling + 8·focal_dim keys/values); clip_tokens counts every CLIP token, which
    the projector and Focal Pooling see however many reach the decoder.
    """
    decoder = model.config.decoder_config
    c = DTYPE_BYTES[decoder.compute_dtype]
    per_token = layer_activation_bytes_per_token(
        shape,
        c,
        _lora_inputs_per_layer(model),
        decoder.lora_r,
        decoder.lora_dropout,
        decoder.attn_implementation,
        sequence,
    )
    tokens = batch_size * sequence
    per_layer = tokens * per_token
    clip_tokens = model.vision.num_prefix_tokens + model.vision.num_patches
    image_path = (
        batch_size * clip_tokens * (4 * model.vision.hidden_size + 4 * shape["hidden"] + 8 * model.config.focal_dim)
    )
    shared = per_layer + tokens * (4 + 2 * c) * shape["hidden"] + image_path
    return {
        "per_layer": per_layer,
        "bytes_per_token_per_layer": per_token,
        "with_checkpointing": shape["layers"] * tokens * c * shape["hidden"] + per_layer + shared,
        "without_checkpointing": shape["layers"] * per_layer + shared,
    }


def logits_bytes(positions: int, vocab: int, compute_bytes: int) -> int:
    """LM head on the rationale positions only (batch · max_rationale_tokens at most): the c-byte logits, their
    fp32 copy (``.float()``) and the fp32 log-softmax cross-entropy keeps for backward, whose fp32 gradient later
    takes the copy's place: positions · vocab · (c + 4 + 4)."""
    return positions * vocab * (compute_bytes + 4 + 4)


def card_verdicts(total: int) -> dict[str, str]:
    """'fits' leaves 1 GiB (CUDA context) + 10% (allocator fragmentation, temporaries) free; 'tight' fits only
    without that reserve; GB taken as GiB (a 16 GB card shows about 15-16 GiB to torch)."""
    verdicts = {}
    for card in CARDS_GB:
        capacity = card * GIB
        verdicts[f"{card}GB"] = (
            "fits" if total + GIB + 0.1 * total <= capacity else "tight" if total <= capacity else "does not fit"
        )
    return verdicts


def memory_plan(model, parameters: dict, batch: dict, training_args) -> dict:
    """Per-GPU bytes of one training step at the configured batch size and the longest decoder sequence."""
    decoder = model.config.decoder_config
    c = DTYPE_BYTES[decoder.compute_dtype]
    shape = _decoder_shape(model)
    trained_tensors = parameters.pop("_trained_tensors")
    optim = _optim_name(training_args)
    batch_size = training_args.per_device_train_batch_size
    sequence = batch["decoder_tokens"]["maximum"]
    rationale_positions = batch_size * (batch["rationale"]["limit"] if batch["rationale"] else 0)
    optimizer, optimizer_rule = optimizer_bytes(optim, trained_tensors)
    activations = activation_bytes(model, shape, batch_size, sequence)
    terms = {
        "weights": parameters["bytes_by_storage"],
        "gradients": sum(numel * size for numel, size in trained_tensors),
        "optimizer": optimizer,
        "activations": {k: activations[k] for k in ("with_checkpointing", "without_checkpointing")},
        "lm_head_logits": logits_bytes(rationale_positions, shape["vocab"], c),
    }
    fixed = sum(terms["weights"].values()) + terms["gradients"] + terms["optimizer"] + terms["lm_head_logits"]
    totals = {key: fixed + value for key, value in terms["activations"].items()}
    configured = "with_checkpointing" if training_args.activation_checkpointing else "without_checkpointing"
    return {
        "batch_size": batch_size,
        "sequence_tokens": sequence,
        "rationale_positions": rationale_positions,
        "decoder": shape,
        "optimizer_rule": optimizer_rule,
        "activation_bytes_per_token_per_layer": activations["bytes_per_token_per_layer"],
        "terms": terms,
        "total": totals,
        "configured": configured,
        "cards": {key: card_verdicts(value) for key, value in totals.items()},
    }


# --------------------------------------------------------------------------------------------------------
# Text output
# --------------------------------------------------------------------------------------------------------


def _gib(size: float) -> str:
    return f"{size / GIB:8.2f} GiB"


def format_report(report: dict) -> str:
    return "\n".join(
        ["dry run: config and dataset valid; no weights loaded (model built on the meta device)", ""]
        + _format_data(report)
        + [""]
        + _format_batch(report)
        + [""]
        + _format_parameters(report["parameters"])
        + [""]
        + _format_memory(report["memory"], report["parameters"], report["config"])
    )


def _format_data(report: dict) -> list[str]:
    data = report["dataset"]
    rows = ", ".join(f"{split} {n:,}" for split, n in data["rows"].items())
    return [
        f"dataset {data['path']}: {rows} rows; {len(data['classes'])} classes {data['classes']}; "
        f"{data['images_checked']} images decoded"
    ]


def _format_part(label: str, part: dict | None) -> str:
    if part is None:
        return f"  {label:<10} not tokenised (its loss weight is 0)"
    lengths = part["lengths"]
    return (
        f"  {label:<10} {min(lengths)}-{max(lengths)} tokens (padded to {part['padded']}), limit {part['limit']}, "
        f"{part['truncated']} of {len(lengths)} truncated"
    )


def _pooling_note(batch: dict) -> str:
    k = batch.get("image_token_pooling", 1)
    return f" average-pooled {k}×{k}" if k > 1 else ""


def _format_batch(report: dict) -> list[str]:
    batch, split = report["batch"], report["train_split_truncation"]
    condition = batch.get("condition")
    condition_lines = (
        [
            f'  {"condition":<10} {condition["padded"]} tokens ("Diagnosis: <class>.", the true class; '
            "left-padded to the longest class; no LM loss)"
        ]
        if condition
        else []
    )
    sequence = "[image][prompt][CLS][condition][rationale]" if condition else "[image][prompt][CLS][rationale]"
    lines = [
        f"batch layout ({batch['rows']} training rows through SkinClipVLCollator; pixel_values "
        f"{batch['pixel_values']}):",
        f"  {'image':<10} {batch['image_tokens']} tokens per image into the decoder (CLIP prefix + "
        f"patches{_pooling_note(batch)}, projected)",
        _format_part("prompt", batch["prompt"]),
        f"  {'CLS':<10} 1",
        *condition_lines,
        _format_part("rationale", batch["rationale"]),
        _format_part("report", batch["report"]) + "  (CLIP text tower, alignment)",
        f"  decoder sequence {sequence}: {batch['decoder_tokens']['this_batch']} tokens in "
        f"this batch, at most {batch['decoder_tokens']['maximum']}",
    ]
    cut = [
        f"{name} {split[name]['truncated']:,} (longest {split[name]['longest']})"
        for name in ("prompt", "rationale", "report")
        if name in split
    ]
    lines.append(
        f"  whole training split ({split['rows']:,} of {split['of_rows']:,} rows): truncated " + ", ".join(cut)
    )
    return lines


def _format_parameters(parameters: dict) -> list[str]:
    lines = [
        "parameters (bytes as stored on the GPU):",
        f"  {'group':<22} {'parameters':>15} {'trained':>12}  {'storage':<9} {'size':>12}",
    ]
    for row in parameters["rows"]:
        storage = "+".join(row["storage"])
        lines.append(
            f"  {row['group']:<22} {row['parameters']:>15,} {row['trained']:>12,}  {storage:<9} {_gib(row['bytes'])}"
        )
    lines.append(
        f"  total {parameters['total']:,}: frozen {parameters['frozen']:,}, trained {parameters['trained']:,} "
        f"(LoRA {parameters['lora']:,}); LM head {parameters['lm_head_shape'][0]:,} x "
        f"{parameters['lm_head_shape'][1]:,}"
    )
    lines.append(f"  quantised weights counted as {parameters['counting']}")
    return lines


def _memory_rows(memory: dict, parameters: dict, settings: dict) -> list[tuple[str, float, str]]:
    """(label, bytes, how it is counted) for each term of the plan."""
    terms, d = memory["terms"], memory["decoder"]
    holders = {
        storage: [row["group"] for row in parameters["rows"] if storage in row["storage"]]
        for storage in terms["weights"]
    }
    rows = [(f"weights, {storage}", size, ", ".join(holders[storage])) for storage, size in terms["weights"].items()]
    tokens = f"{memory['batch_size']} x {memory['sequence_tokens']} tokens"
    rows += [
        ("gradients", terms["gradients"], "trained tensors only, in their fp32 dtype"),
        ("optimizer states", terms["optimizer"], f"{settings['optim']}: {memory['optimizer_rule']} per trained value"),
        (
            "activations, checkpointing on",
            terms["activations"]["with_checkpointing"],
            f"{d['layers']} layer inputs + 1 layer recomputed + 1 layer of gradients, {tokens}",
        ),
        (
            "activations, checkpointing off",
            terms["activations"]["without_checkpointing"],
            f"({d['layers']} + 1) layers x {memory['activation_bytes_per_token_per_layer']:,} B per token, {tokens}",
        ),
        (
            "LM-head logits",
            terms["lm_head_logits"],
            f"{memory['rationale_positions']:,} rationale positions x {d['vocab']:,} x "
            f"({DTYPE_BYTES[settings['compute_dtype']]} + 4 + 4) B",
        ),
    ]
    return rows


def _format_memory(memory: dict, parameters: dict, settings: dict) -> list[str]:
    d = memory["decoder"]
    lines = [
        f"GPU memory plan, per device (batch {memory['batch_size']} x {memory['sequence_tokens']} decoder tokens "
        f"at most, {settings['compute_dtype']} compute, {d['layers']} layers, hidden {d['hidden']}):"
    ]
    lines += [
        f"  {label:<32} {_gib(size)}   {note}" for label, size, note in _memory_rows(memory, parameters, settings)
    ]
    for key, label in (("with_checkpointing", "on"), ("without_checkpointing", "off")):
        mark = "   <- configured" if memory["configured"] == key else ""
        cards = ", ".join(f"{card.removesuffix('GB')} GB {verdict}" for card, verdict in memory["cards"][key].items())
        lines.append(f"  {'TOTAL, checkpointing ' + label:<32} {_gib(memory['total'][key])}   {cards}{mark}")
    lines.append(
        "  ('fits' leaves 1 GiB + 10% free for the CUDA context and fragmentation; every term is an estimate "
        "from shapes: formulas in skinclip/dry_run.py)"
    )
    return lines
