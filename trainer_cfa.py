"""The Consistency-aware Focal Alignment (CFA) loss and the Trainer that optimises it.

``L = L_focal + lambda_align * L_align + lambda_cal * L_cal + lambda_gen * L_gen``

- ``L_focal``: alpha-balanced multi-class focal loss ``-alpha_y (1 - p_y)^gamma log p_y`` (Lin et al.).
- ``L_align``: symmetric InfoNCE between v_global and t_global: open_clip's ``ClipLoss``, which also
  gathers negatives from every process with gradient (``gather_with_grad``).
- ``L_cal``: multi-class Brier score ``mean_i sum_k (p_ik - y_ik)^2``.
- ``L_gen``: causal-LM loss on the rationale tokens only (computed inside the model).

Each term is a small function or module, tested against its reference in tests/test_trainer_cfa.py;
``CFALoss`` composes them with named weights; ``CFATrainer`` logs every term separately.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, gather_features
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import rotate_checkpoints

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------
# Loss terms
# --------------------------------------------------------------------------------------------------------


def focal_loss(
    logits: torch.Tensor, labels: torch.Tensor, gamma: float = 2.0, alpha: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over the batch of ``-alpha_y (1 - p_y)^gamma log p_y``; `logits` `(batch, C)`, `labels` `(batch,)`.

    With ``gamma=0`` and ``alpha=None`` (all ones) this is exactly cross-entropy.
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)
    log_p_true = log_probs.gather(1, labels[:, None]).squeeze(1)
    loss = -((1.0 - log_p_true.exp()).clamp(min=0) ** gamma) * log_p_true
    if alpha is not None:
        loss = alpha.to(loss.device, loss.dtype)[labels] * loss
    return loss.mean()


def brier_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-class Brier score ``mean_i sum_k (p_ik - y_ik)^2`` (paper Eq. 8)."""
    probs = torch.softmax(logits.float(), dim=-1)
    one_hot = F.one_hot(labels, num_classes=probs.shape[-1]).to(probs.dtype)
    return ((probs - one_hot) ** 2).sum(-1).mean()


def class_balanced_alpha(class_counts: Sequence[int]) -> torch.Tensor:
    """Inverse-frequency alpha normalised to mean 1 (so the loss scale matches unweighted focal loss).

    Classes absent from the training data get the largest weight seen rather than infinity.
    """
    counts = torch.as_tensor(class_counts, dtype=torch.float)
    inverse = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
    inverse = torch.where(counts > 0, inverse, inverse.max())
    return inverse * len(counts) / inverse.sum()


# Two hashes modulo primes below 2**31: every product fits in int64, so the hash runs on the device (no host sync).
_HASH_MODULI = (2_147_483_647, 2_147_483_629)
_HASH_BASES = (1_000_003, 998_244_353)


def report_keys(report_ids: torch.Tensor, report_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One int64 key per row of right-padded report tokens: identical reports ↔ identical keys.

    A 62-bit polynomial hash of the unpadded tokens (padding adds zeros at the end, which the hash ignores, so
    the same report padded to other lengths, in another batch or process, gets the same key). Different reports
    collide with probability about 2**-62 per pair.
    """
    values = report_ids.long() + 1  # 0 is reserved for padding
    if report_attention_mask is not None:
        values = values * (report_attention_mask != 0).long()
    keys = torch.zeros(values.shape[0], dtype=torch.long, device=values.device)
    for modulus, base in zip(_HASH_MODULI, _HASH_BASES):
        powers = torch.tensor([pow(base, t, modulus) for t in range(values.shape[1])], device=values.device)
        digest = ((values % modulus) * powers % modulus).sum(-1) % modulus
        keys = keys * (1 << 31) + digest
    return keys


def _all_gather_no_grad(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)


def _pooled_positive_nll(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """``-log sum_{j in positives} softmax(logits)_j`` per row; `logits`, `positives` `(rows, columns)`."""
    positive_logits = logits.masked_fill(~positives, float("-inf"))
    return torch.logsumexp(logits, dim=-1) - torch.logsumexp(positive_logits, dim=-1)


class AlignmentLoss(nn.Module):
    """Symmetric InfoNCE over the global batch (open_clip ``ClipLoss``).

    ``report_keys`` (one per sample, see `report_keys`) turns on multi-positive targets: samples whose report
    tokens are identical, anywhere in the gathered global batch, are positives of each other, and each row's
    loss is ``-log sum_{j in P(i)} softmax(s_i)_j`` (the probability of all its positives pooled). In ISIC 2019
    every image of a class has the same report; with one-hot targets a group of k duplicates shares its
    probability mass between k identical columns, so each row's loss cannot fall below log k and the text
    side is pushed to tell identical reports' images apart. Pooling the positives lets the loss reach 0.
    Without duplicates P(i) = {i} and the loss is ``ClipLoss``'s. (A uniform soft target over P(i) would not
    help: with identical text embeddings it gives the same loss and gradients as one-hot targets.)

    ``focal_modulation=True`` implements the paper's Eq. (4) reading: each sample's alignment term is weighted
    by its detached focal factor ``(1 - p_y)^gamma``, so easy samples stop dominating the alignment. This
    needs per-sample terms, which ``ClipLoss`` does not expose, so that path computes them here with the
    same gathered negatives (local samples against all gathered features).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, focal_modulation: bool = False, gamma: float = 2.0):
        super().__init__()
        self.rank, self.world_size = rank, world_size
        self.focal_modulation, self.gamma = focal_modulation, gamma
        self.clip_loss = ClipLoss(
            local_loss=False, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size
        )

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        class_logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        report_keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        image_embeds, text_embeds = image_embeds.float(), text_embeds.float()
        if not self.focal_modulation and report_keys is None:
            return self.clip_loss(image_embeds, text_embeds, logit_scale)
        all_image, all_text, all_keys = image_embeds, text_embeds, report_keys
        if self.world_size > 1:
            all_image, all_text = gather_features(
                image_embeds,
                text_embeds,
                local_loss=True,
                gather_with_grad=True,
                rank=self.rank,
                world_size=self.world_size,
            )
            if report_keys is not None:
                all_keys = _all_gather_no_grad(report_keys, self.world_size)
        if self.focal_modulation:
            # Local rows against every gathered column; DDP's gradient average makes it the global mean.
            rows_image, rows_text, rows_keys = image_embeds, text_embeds, report_keys
            rows = torch.arange(image_embeds.shape[0], device=image_embeds.device) + self.rank * image_embeds.shape[0]
        else:
            # Every global row on every process, as ClipLoss(local_loss=False, gather_with_grad=True) does.
            rows_image, rows_text, rows_keys = all_image, all_text, all_keys
            rows = torch.arange(all_image.shape[0], device=image_embeds.device)
        image_logits, text_logits = logit_scale * rows_image @ all_text.T, logit_scale * rows_text @ all_image.T
        if report_keys is None:
            per_sample = 0.5 * (
                F.cross_entropy(image_logits, rows, reduction="none")
                + F.cross_entropy(text_logits, rows, reduction="none")
            )
        else:
            positives = rows_keys[:, None] == all_keys[None, :]  # the row's own sample is always one
            per_sample = 0.5 * (
                _pooled_positive_nll(image_logits, positives) + _pooled_positive_nll(text_logits, positives)
            )
        if not self.focal_modulation:
            return per_sample.mean()
        p_true = torch.softmax(class_logits.detach().float(), -1).gather(1, labels[:, None]).squeeze(1)
        weights = (1.0 - p_true).clamp(min=0) ** self.gamma
        return (weights * per_sample).mean()


class CFALoss(nn.Module):
    """``L_focal + lambda_align L_align + lambda_cal L_cal + lambda_gen L_gen`` with every term returned."""

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: torch.Tensor | None = None,
        lambda_align: float = 0.5,
        lambda_cal: float = 1.0,
        lambda_gen: float = 0.5,
        focal_modulation: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("alpha", alpha.float() if alpha is not None else None, persistent=False)
        self.lambda_align, self.lambda_cal, self.lambda_gen = lambda_align, lambda_cal, lambda_gen
        self.alignment = AlignmentLoss(rank, world_size, focal_modulation, gamma)

    def forward(
        self,
        outputs,
        labels: torch.Tensor,
        report_keys: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        accumulation_steps: int = 1,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted total and each unweighted term.

        Args:
            report_keys: one key per sample (`report_keys`); given, identical reports are alignment positives.
            num_items_in_batch: rationale tokens in the whole optimizer step: every process and every
                accumulated micro-batch. Given, the LM term becomes this micro-batch's share of that step's token
                mean (see `_globally_normalised`); ``accumulation_steps`` is then the number of micro-batches.
        """
        logits = outputs.logits
        terms = {"focal": focal_loss(logits, labels, self.gamma, self.alpha)}
        total = terms["focal"]
        if self.lambda_align:
            if outputs.t_global is None:
                raise ValueError("lambda_align > 0 needs report_ids in the batch (the ground-truth report text)")
            terms["align"] = self.alignment(
                outputs.v_global, outputs.t_global, outputs.logit_scale, logits, labels, report_keys=report_keys
            )
            total = total + self.lambda_align * terms["align"]
        if self.lambda_cal:
            terms["cal"] = brier_loss(logits, labels)
            total = total + self.lambda_cal * terms["cal"]
        if self.lambda_gen:
            if outputs.lm_loss is None:
                raise ValueError("lambda_gen > 0 needs rationale_ids in the batch")
            terms["gen"] = outputs.lm_loss
            total = total + self.lambda_gen * self._globally_normalised(
                outputs.lm_loss, outputs.lm_tokens, num_items_in_batch, accumulation_steps
            )
        return total, terms

    def _globally_normalised(
        self,
        lm_loss: torch.Tensor,
        lm_tokens: torch.Tensor | None,
        num_items_in_batch: torch.Tensor | int | None = None,
        accumulation_steps: int = 1,
    ) -> torch.Tensor:
        """Per-micro-batch token mean → its share of the token mean over the whole step.

        DDP averages gradients over processes and the Trainer averages them over accumulated micro-batches;
        micro-batches hold different numbers of rationale tokens, so the average of their means is not the mean
        over all tokens. Scaling by local / total tokens times (processes × micro-batches) makes the averaged
        gradient that of the mean over every token of the step (as on one concatenated batch). Without
        ``num_items_in_batch`` the total is this micro-batch's tokens summed over processes.
        """
        if lm_tokens is None:
            return lm_loss
        local = lm_tokens.detach().float().reshape(())
        if num_items_in_batch is not None:
            total = torch.as_tensor(num_items_in_batch, dtype=torch.float, device=local.device).reshape(())
            return lm_loss * local * (self.alignment.world_size * accumulation_steps) / total.clamp(min=1)
        if self.alignment.world_size == 1:
            return lm_loss
        total = local.clone()
        torch.distributed.all_reduce(total)
        return lm_loss * local * self.alignment.world_size / total.clamp(min=1)


# --------------------------------------------------------------------------------------------------------
# Data collator
# --------------------------------------------------------------------------------------------------------


class SkinClipVLCollator:
    """Dataset rows (``image``, ``metadata_text``, ``report``, ``label``) → a model batch with ``labels``.

    The ground-truth ``report`` is both the alignment text (t_global) and the rationale target of the LM;
    each is tokenised only when its loss weight is non-zero. ``augment`` applies dermoscopy-safe flips and
    right-angle rotations (lesions have no canonical orientation) before CLIP preprocessing.

    ``cached_features_key``: the rows carry the frozen CLIP tokens instead of images (``vision_features``, from
    `skinclip.feature_cache.add_vision_features`) and the batch feeds them to ``forward(vision_features=...)``;
    give the model's `skinclip.feature_cache.vision_features_key`, and rows cached by another tower or layer are
    refused. Cached features need ``augment=False``.
    """

    def __init__(
        self,
        processor,
        with_report: bool = True,
        with_rationale: bool = True,
        augment: bool = False,
        seed: int = 0,
        cached_features_key: str | None = None,
    ):
        if cached_features_key is not None and augment:
            raise ValueError("cached CLIP features are for augment=False: an augmented image needs fresh features")
        self.processor = processor
        self.with_report, self.with_rationale, self.augment = with_report, with_rationale, augment
        self.seed = seed
        self.cached_features_key = cached_features_key
        self.epoch = 0  # set by the trainer at each epoch (AugmentationEpochCallback)

    def _generator(self, row: dict[str, Any]) -> torch.Generator | None:
        # Augmentation drawn from (seed, epoch, image id) rather than a running random stream: the data
        # loader fetches one batch ahead of the optimizer step, so a stream's state saved in a checkpoint
        # would be one batch off on resume. Keyed draws make a resumed run augment exactly as an
        # uninterrupted one, and still differ from epoch to epoch.
        if "image_id" not in row:
            return None
        key = zlib.crc32(f"{self.seed}:{self.epoch}:{row['image_id']}".encode())
        return torch.Generator().manual_seed(key)

    @staticmethod
    def _augment(image, generator: torch.Generator | None = None):
        from PIL import Image

        image = image.convert("RGB")
        flips = torch.rand(2, generator=generator)
        if flips[0] < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if flips[1] < 0.5:
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        turns = int(torch.randint(4, (), generator=generator))
        return image.rotate(90 * turns, expand=True) if turns else image

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = None
        if self.cached_features_key is None:
            images = [row["image"] for row in features]
            if self.augment:
                images = [self._augment(image, self._generator(row)) for image, row in zip(images, features)]
        reports = [row["report"] for row in features]
        # rationale_conditioning="class": the TRUE class's tokens precede the rationale (teacher forcing).
        conditioned = self.with_rationale and self.processor.config.rationale_conditioning == "class"
        batch = self.processor(
            images,
            [row.get("metadata_text") or "" for row in features],
            reports=reports if self.with_report else None,
            rationales=reports if self.with_rationale else None,
            condition_labels=[int(row["label"]) for row in features] if conditioned else None,
        )
        if self.cached_features_key is not None:
            batch.update(self._cached_features(features))
        batch["labels"] = torch.tensor([int(row["label"]) for row in features], dtype=torch.long)
        return batch

    def _cached_features(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from skinclip.feature_cache import FEATURES_COLUMN, KEY_COLUMN

        keys = {row.get(KEY_COLUMN) for row in features}
        if keys != {self.cached_features_key}:
            raise ValueError(
                f"cached vision features were computed by {sorted(map(str, keys))}, this model uses "
                f"{self.cached_features_key!r}: recompute them with skinclip.feature_cache.add_vision_features"
            )
        return {
            FEATURES_COLUMN: torch.stack(
                [torch.as_tensor(np.asarray(row[FEATURES_COLUMN], dtype=np.float16)) for row in features]
            )
        }


# --------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------


def compute_classification_metrics(eval_prediction) -> dict[str, float]:
    """Trainer ``compute_metrics``: B-ACC, macro one-vs-rest AUROC and ECE (15 bins) from class logits."""
    from skinclip.classification_metrics import headline_metrics

    logits = eval_prediction.predictions
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    labels = np.asarray(eval_prediction.label_ids).astype(int)
    probs = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=-1).numpy()
    return headline_metrics(labels, probs)


# --------------------------------------------------------------------------------------------------------
# Fault tolerance
# --------------------------------------------------------------------------------------------------------

CHECKPOINT_COMPLETE_MARKER = "checkpoint_complete.json"


class SavedProcessorFiles:
    """A processor's saved files, serialised on its first save and written again from memory on the next ones.

    Trainer saves its processing class into every checkpoint, and Qwen's tokenizer serialises an 11 MB
    tokenizer.json each time: 41 saves took 4 s of the demo's 64 s (AVX2-capped, benchmarks/RESULTS.md). Nothing
    changes the processor during a run, so the bytes of its first save (~12 MB, held in memory) serve every later
    checkpoint. A different processor object is serialised afresh.
    """

    def __init__(self):
        self._processor = None
        self._files: dict[str, bytes] = {}

    def write(self, processor, output_dir: str | os.PathLike) -> None:
        import tempfile
        from pathlib import Path

        if processor is not self._processor:
            with tempfile.TemporaryDirectory(prefix="skinclip-processor-") as staging:
                processor.save_pretrained(staging)
                self._files = {
                    path.relative_to(staging).as_posix(): path.read_bytes()
                    for path in sorted(Path(staging).rglob("*"))
                    if path.is_file()
                }
            self._processor = processor
        for relative, data in self._files.items():
            target = Path(output_dir, relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)


TRAINING_ARGS_JSON = "training_args.json"  # the run's arguments, in place of Trainer's pickled training_args.bin


def shareable_arguments_json(args: TrainingArguments) -> str:
    """The run's arguments as JSON for the folder that is shared: tokens redacted (``to_json_string``), and every
    absolute path (``output_dir``, ``logging_dir``, a resumed checkpoint, an FSDP config file...) cut to its last
    part, so a pushed checkpoint does not tell which machine, user or folder tree it was trained in."""
    arguments = json.loads(args.to_json_string())
    for key, value in arguments.items():
        if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
            arguments[key] = os.path.basename(value.rstrip("/\\")) or value
    return json.dumps(arguments, indent=2, sort_keys=True) + "\n"


class NonFiniteGuard(TrainerCallback, ExportableState):
    """Skips every optimizer step with a non-finite loss or gradient, and stops a run that keeps producing them.

    Runs after gradient clipping and before ``optimizer.step()``: the gradients are dropped (set to ``None``),
    so the optimizer leaves those weights and their moments untouched, and the weights never see a NaN. The
    learning-rate schedule and ``global_step`` still advance, so a run ends at its planned step.
    ``CFATrainer.compute_loss`` reports every micro-batch loss through ``observe_loss`` (a NaN constant in the
    loss need not reach the gradients). Under DDP/FSDP the decision is all-reduced so every process skips
    together (FSDP holds gradient shards; a loss can be NaN on one process only). The counters are saved in
    ``trainer_state.json`` and restored on resume.
    """

    def __init__(self, max_consecutive: int = 5):
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self._loss_finite: torch.Tensor | None = None  # on device: no host sync per micro-batch

    def state(self) -> dict:
        return {
            "args": {"max_consecutive": self.max_consecutive},
            "attributes": {"skipped": self.skipped, "consecutive": self.consecutive},
        }

    def observe_loss(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_train_begin(self, args, state, control, **kwargs):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if state.global_step and isinstance(saved, dict):  # resumed: carry the counts on
            self.skipped = int(saved["attributes"]["skipped"])
            self.consecutive = int(saved["attributes"]["consecutive"])
        return control

    def _step_is_finite(self, args, model) -> bool:
        device = args.device
        flags = [
            torch.isfinite(p.grad).all().to(device)
            for p in model.parameters()
            if p.requires_grad and p.grad is not None
        ]
        if self._loss_finite is not None:
            flags.append(self._loss_finite.to(device))
        self._loss_finite = None
        finite = torch.stack(flags).all() if flags else torch.tensor(True, device=device)
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            finite = finite.to(torch.int32)
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return bool(finite)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self._step_is_finite(args, model):
            self.consecutive = 0
            return control
        for param in model.parameters():
            if param.requires_grad:
                param.grad = None
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"stopping: {self.consecutive} optimizer steps in a row had a non-finite loss or gradient "
                f"(last at step {state.global_step + 1}; {self.skipped} skipped in all). The weights were not "
                "updated with them. Lower the learning rate, check the data, or raise max_consecutive_nonfinite."
            )
        return control


class AugmentationEpochCallback(TrainerCallback):
    """Tells the collator which epoch it is serving, for epoch-keyed augmentation."""

    def __init__(self, collator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = int(state.epoch + 1e-6) if state.epoch else 0
        return control


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, CHECKPOINT_COMPLETE_MARKER))


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` holding the completion marker; half-written ones are passed over."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        prefix, _, step = name.partition("-")
        if (
            prefix == PREFIX_CHECKPOINT_DIR
            and step.isdigit()
            and is_complete_checkpoint(os.path.join(output_dir, name))
        ):
            steps.append((int(step), name))
    return os.path.join(output_dir, max(steps)[1]) if steps else None


class TermAverages:
    """Running, weighted sums of the CFA terms, merged over every process when read.

    Each micro-batch adds ``value`` with a ``weight``: its samples for the sample means (focal, align, cal), its
    rationale tokens for the LM token mean. The read-out is then the mean over every sample / token since the
    last read, on all processes and accumulated micro-batches together: what one concatenated batch gives for
    focal, cal and gen (for align, the sample-weighted mean of its per-micro-batch values). Non-finite values
    (skipped steps) are left out, so they cannot turn the mean into NaN; a term with only non-finite values
    reads NaN. `compute` is a collective under torch.distributed: every process calls it with the same names.
    """

    def __init__(self):
        self._values: dict[str, list[torch.Tensor]] = defaultdict(list)

    def add(self, name: str, value: torch.Tensor, weight: torch.Tensor | int | float) -> None:
        # Kept on the device as tensors: reading them would sync the host at every micro-batch.
        value = value.detach().float().reshape(())
        self._values[name].append(torch.stack([value, torch.as_tensor(weight, dtype=torch.float, device=value.device)]))

    def clear(self) -> None:
        self._values.clear()

    def compute(self, names: Sequence[str], device: torch.device | str) -> dict[str, float]:
        """``{name: mean}`` over everything added since the last call (then cleared), on every process."""
        sums = torch.zeros(len(names), 3, device=device)  # weighted sum, weight, number of values
        for row, name in enumerate(names):
            if self._values.get(name):
                value, weight = torch.stack(self._values[name]).to(device).unbind(-1)
                finite = torch.isfinite(value)
                sums[row, 0] = torch.where(finite, value * weight, 0.0).sum()
                sums[row, 1] = torch.where(finite, weight, 0.0).sum()
                sums[row, 2] = len(value)
        self.clear()
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            torch.distributed.all_reduce(sums)
        return {
            name: (total / weight if weight > 0 else float("nan"))
            for name, (total, weight, count) in zip(names, sums.tolist())
            if count > 0
        }


# --------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------

# What only the alignment term trains: Focal Pooling feeds nothing but v_global. With lambda_align = 0 these get
# no gradient, which DDP with find_unused_parameters=False rejects at the second step; frozen, they are still
# saved and loaded with the checkpoint (trained_state_dict goes by name).
ALIGNMENT_ONLY_MODULES = ("focal_pooling", "image_alignment", "text_alignment", "logit_scale")


@dataclass
class CFATrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the CFA loss settings, with defaults this model needs."""

    focal_gamma: float = field(default=2.0, metadata={"help": "Focal exponent gamma (0 = no focusing)."})
    focal_alpha: str = field(
        default="inverse_frequency",
        metadata={"help": "'inverse_frequency' (from the training labels), 'uniform', or comma-separated weights."},
    )
    lambda_align: float = field(default=0.5, metadata={"help": "Weight of the InfoNCE alignment term (lambda_1)."})
    lambda_cal: float = field(default=1.0, metadata={"help": "Weight of the Brier calibration term (lambda_2)."})
    lambda_gen: float = field(default=0.5, metadata={"help": "Weight of the rationale LM term (lambda_3; paper 0.5)."})
    focal_modulated_alignment: bool = field(
        default=False, metadata={"help": "Weight each alignment term by (1-p_y)^gamma (paper Eq. 4 reading)."}
    )
    multi_positive_alignment: bool = field(
        default=True,
        metadata={
            "help": "Samples with identical report tokens (across the global batch) are alignment positives "
            "of each other (soft targets), not negatives."
        },
    )
    augment: bool = field(default=True, metadata={"help": "Random flips / right-angle rotations of training images."})
    final_rationale_rows: int = field(
        default=0,
        metadata={
            "help": "After training, generate the rationales of the first N test rows and report how many name the "
            "class head's top class (test_metrics.json: rationale_agreement; rationales.csv). 0 = off."
        },
    )
    max_consecutive_nonfinite: int = field(
        default=5,
        metadata={"help": "Stop after this many optimizer steps in a row skipped for a non-finite loss or gradient."},
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep image/report columns for the collator."})
    label_names: list[str] | None = field(default_factory=lambda: ["labels"], metadata={"help": "Batch key of labels."})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={"help": "No unused trained parameters."})
    decoder_trailing_padding: bool = field(
        default=True,
        metadata={
            "help": "Run the decoder with each row's real tokens first and padding after them: plain causal "
            "attention, no padding mask (same loss and gradients; SkinClipVLModel.trailing_padding)."
        },
    )
    fused_lm_loss: bool = field(
        default=True,
        metadata={
            "help": "Rationale LM loss with its gradient computed in the forward, keeping no vocabulary-wide "
            "logits for backward (same loss and gradients; SkinClipVLModel.fused_lm_loss)."
        },
    )


def _rationale_tokens(batch: dict[str, Any]) -> torch.Tensor:
    """Rationale tokens the LM loss averages over in one batch (as the model counts them: the attention mask)."""
    mask = batch.get("rationale_attention_mask")
    if mask is None:
        return torch.tensor(batch["rationale_ids"].numel())
    return (mask != 0).sum()


def resolve_focal_alpha(setting: str, class_counts: Sequence[int] | None, num_labels: int) -> torch.Tensor | None:
    """``focal_alpha`` setting → per-class weights (None means all ones)."""
    if setting == "uniform":
        return None
    if setting == "inverse_frequency":
        if class_counts is None:
            raise ValueError("focal_alpha='inverse_frequency' needs the training class counts")
        return class_balanced_alpha(class_counts)
    weights = [float(x) for x in setting.split(",")]
    if len(weights) != num_labels or any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"focal_alpha={setting!r}: expected {num_labels} non-negative weights")
    return torch.tensor(weights)


class CFATrainer(Trainer):
    """`Trainer` whose `compute_loss` is the CFA loss; each term is logged as `loss_focal`, `loss_align`, ...

    Gradient accumulation: ``k`` micro-batches of ``b`` give the loss and gradients of one batch of ``k·b`` for
    the focal, calibration and LM terms (the LM term is normalised by the rationale tokens of the whole step,
    over micro-batches and processes). The alignment term is the mean of the micro-batches' InfoNCE: each
    micro-batch's samples see only the negatives of that micro-batch (gathered over processes), so the number
    of negatives is ``per_device_train_batch_size × processes``, whatever the accumulation.

    Args:
        class_counts: training-set count per class, for `focal_alpha="inverse_frequency"`.
        eval_data_collator: the collator of evaluation and prediction (`evaluate`, `predict`); default the
            training one. Evaluation must not augment, so train.py gives one without augmentation.
    """

    # compute_loss returns a per-micro-batch mean: Trainer divides it by the accumulation steps. (A model whose
    # forward takes **kwargs would otherwise be assumed to scale the loss itself, summing accumulated gradients.)
    loss_is_scaled_for_ga = False

    def __init__(self, *args, class_counts: Sequence[int] | None = None, eval_data_collator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator
        self._processor_files = SavedProcessorFiles()
        args = self.args
        # forward(**kwargs) only rejects unknown names; it takes no loss kwargs (the LM count is ours, below).
        self.model_accepts_loss_kwargs = False
        if not args.lambda_align:
            frozen = [
                name
                for name, param in self.model.named_parameters()
                if param.requires_grad and name.split(".")[0] in ALIGNMENT_ONLY_MODULES
            ]
            for name, param in self.model.named_parameters():
                if name in frozen:
                    param.requires_grad_(False)
            if frozen:
                logger.info(
                    "lambda_align = 0: froze %d tensors only the alignment term trains (%s)",
                    len(frozen),
                    ", ".join(ALIGNMENT_ONLY_MODULES),
                )
        if args.gradient_accumulation_steps > 1 and args.lambda_align:
            logger.warning(
                "gradient_accumulation_steps=%d with lambda_align > 0: each micro-batch's InfoNCE has only its own "
                "%d × %d samples as negatives; accumulation does not enlarge the contrastive batch.",
                args.gradient_accumulation_steps,
                args.per_device_train_batch_size,
                args.world_size,
            )
        for switch, value in (
            ("trailing_padding", args.decoder_trailing_padding),
            ("fused_lm_loss", args.fused_lm_loss),
        ):
            if hasattr(self.model, switch):  # SkinClipVLModel's speed switches (exact: same loss and gradients)
                setattr(self.model, switch, value)
        num_labels = self.model.config.num_labels
        self.cfa_loss = CFALoss(
            gamma=args.focal_gamma,
            alpha=resolve_focal_alpha(args.focal_alpha, class_counts, num_labels),
            lambda_align=args.lambda_align,
            lambda_cal=args.lambda_cal,
            lambda_gen=args.lambda_gen,
            focal_modulation=args.focal_modulated_alignment,
            rank=args.process_index,
            world_size=args.world_size,
        )
        self._term_names = [
            name
            for name, weight in (
                ("focal", 1.0),
                ("align", args.lambda_align),
                ("cal", args.lambda_cal),
                ("gen", args.lambda_gen),
            )
            if weight
        ]
        self._term_averages = {"train": TermAverages(), "eval": TermAverages()}
        self.add_callback(NonFiniteGuard(args.max_consecutive_nonfinite))
        if hasattr(self.data_collator, "epoch"):
            self.add_callback(AugmentationEpochCallback(self.data_collator))

    def get_eval_dataloader(self, eval_dataset=None):
        with self._collating_with(self.eval_data_collator):
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with self._collating_with(self.eval_data_collator):
            return super().get_test_dataloader(test_dataset)

    @contextlib.contextmanager
    def _collating_with(self, collator):
        # Trainer builds every data loader from self.data_collator; evaluation's is swapped in while one is built.
        original = self.data_collator
        if collator is not None:
            self.data_collator = collator
        try:
            yield
        finally:
            self.data_collator = original

    @property
    def nonfinite_guard(self) -> NonFiniteGuard:
        # Looked up, not stored: restore_callback_states_from_checkpoint replaces callbacks with new instances.
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, NonFiniteGuard))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """As `Trainer.train`; `resume_from_checkpoint=True` (or "last") takes the newest COMPLETE checkpoint."""
        from skinclip.errors import UserError

        if resume_from_checkpoint is True or str(resume_from_checkpoint).lower() in ("true", "last"):
            resume_from_checkpoint = latest_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise UserError(
                    f"--resume_from_checkpoint: no complete checkpoint-N in {self.args.output_dir} to resume from; "
                    "start the run without it"
                )
        elif resume_from_checkpoint and not os.path.isdir(resume_from_checkpoint):
            raise UserError(f"--resume_from_checkpoint: {resume_from_checkpoint} does not exist or is not a folder")
        elif resume_from_checkpoint and not is_complete_checkpoint(resume_from_checkpoint):
            raise UserError(
                f"{resume_from_checkpoint} is not a complete checkpoint (no {CHECKPOINT_COMPLETE_MARKER}: the run "
                f"was probably killed while saving it); the newest complete one is "
                f"{latest_complete_checkpoint(os.path.dirname(str(resume_from_checkpoint).rstrip('/')))}"
            )
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # Trainer also pickles its arguments (training_args.bin) beside the model, in the folder that is shared on
        # the Hub; nothing loads them back. They are written as JSON instead: readable, no pickle to unpickle, and
        # tokens redacted (TrainingArguments.to_json_string), where the pickle held a hub_token in clear.
        from transformers.trainer import TRAINING_ARGS_NAME

        processing_class, self.processing_class = self.processing_class, None
        try:
            super()._save(output_dir, state_dict)
        finally:
            self.processing_class = processing_class
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            if processing_class is not None:
                self._processor_files.write(processing_class, output_dir)
            pickled = os.path.join(output_dir, TRAINING_ARGS_NAME)
            if os.path.isfile(pickled):
                os.remove(pickled)
            with open(os.path.join(output_dir, TRAINING_ARGS_JSON), "w") as handle:
                handle.write(shareable_arguments_json(self.args))

    def _save_checkpoint(self, model, trial) -> None:
        # Trainer writes checkpoint-N in place; a kill mid-save leaves a partial folder that its own
        # get_last_checkpoint would pick. A marker, written last and atomically once every process has
        # written its part, tells complete checkpoints apart. Two orderings matter:
        # - a stale marker (re-saving into a folder of an earlier run) is removed before anything is written;
        # - old checkpoints are rotated out only after the marker, so a kill never leaves none complete
        #   (Trainer rotates at the end of its own save, before our marker).
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if os.path.islink(folder):
            from skinclip.errors import UserError

            # Trainer would write the checkpoint through it, into whatever folder it points at.
            raise UserError(
                f"{folder} is a symlink (to {os.readlink(folder)}); remove it, no checkpoint is written through one"
            )
        if self.args.should_save and os.path.isfile(os.path.join(folder, CHECKPOINT_COMPLETE_MARKER)):
            os.remove(os.path.join(folder, CHECKPOINT_COMPLETE_MARKER))
        self.accelerator.wait_for_everyone()
        save_total_limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = save_total_limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            staging = os.path.join(folder, CHECKPOINT_COMPLETE_MARKER + ".tmp")
            with open(staging, "w") as handle:
                json.dump({"global_step": self.state.global_step}, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(staging, os.path.join(folder, CHECKPOINT_COMPLETE_MARKER))
            rotate_checkpoints(
                output_dir=self._get_output_dir(trial=trial),
                save_total_limit=save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,  # as Trainer does
            )

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        # Trainer would count `labels` (here one class per sample). The LM term needs the rationale tokens of the
        # whole optimizer step, every micro-batch on every process, to be one token mean (see CFALoss).
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not self.args.lambda_gen or not batch_samples or "rationale_ids" not in batch_samples[0]:
            return batch_samples, None
        tokens = sum(_rationale_tokens(batch) for batch in batch_samples).to(device)
        if self.args.world_size > 1:
            tokens = self.accelerator.gather(tokens).sum()
        return batch_samples, tokens

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        keys = None
        if self.args.lambda_align and self.args.multi_positive_alignment and inputs.get("report_ids") is not None:
            keys = report_keys(inputs["report_ids"], inputs.get("report_attention_mask"))
        loss, terms = self.cfa_loss(
            outputs,
            labels,
            report_keys=keys,
            num_items_in_batch=num_items_in_batch,
            accumulation_steps=getattr(self, "current_gradient_accumulation_steps", 1),
        )
        mode = "train" if model.training else "eval"
        if model.training:
            self.nonfinite_guard.observe_loss(loss)
        for name, value in terms.items():
            weight = outputs.lm_tokens if name == "gen" and outputs.lm_tokens is not None else labels.shape[0]
            self._term_averages[mode].add(name, value, weight)
        if return_outputs:
            # Only the class logits go to evaluation: the Trainer concatenates whatever is returned here.
            return loss, {"logits": outputs.logits}
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Evaluation logs carry "<prefix>_runtime" (prefix "eval" unless evaluate() was given another one);
        # training logs carry "loss" and, at the end, "train_runtime".
        prefix = next(
            (key[: -len("runtime")] for key in logs if key.endswith("_runtime") and key != "train_runtime"), None
        )
        mode = "train" if prefix is None else "eval"
        # Every process reaches log() (Trainer gathers the loss just before), so the terms are merged here.
        for name, value in self._term_averages[mode].compute(self._term_names, self.args.device).items():
            logs[f"{prefix or ''}loss_{name}"] = round(value, 6)
        if mode == "train":
            logs["nonfinite_steps_skipped"] = self.nonfinite_guard.skipped
        super().log(logs, start_time)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # The checkpoint holds only trained tensors: load them strictly instead of Trainer's generic
        # load_state_dict(strict=False), which would warn about every frozen base weight.
        from pathlib import Path

        from safetensors.torch import load_file

        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            # Their checkpoints are the engines' own formats (sharded/gathered state), loaded into the wrapped model.
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = model or self.model
        weights = Path(resume_from_checkpoint) / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{resume_from_checkpoint} has no model.safetensors to resume from")
        try:
            model.load_trained_tensors(load_file(str(weights)), source=str(resume_from_checkpoint))
        except ValueError as error:  # a checkpoint of another shape, labels or bases
            from skinclip.errors import UserError

            raise UserError(f"cannot resume from {resume_from_checkpoint}: {error}") from error

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def create_model_card(self, *args, **kwargs) -> None:
        # train.py writes a SkinCLIP-VL model card (bases, labels, metrics, limitations); Trainer.push_to_hub
        # would overwrite it with a generic one.
        from pathlib import Path

        card = Path(self.args.output_dir) / "README.md"
        if card.is_file() and "SkinCLIP-VL checkpoint" in card.read_text():
            return
        super().create_model_card(*args, **kwargs)


__all__ = [
    "AlignmentLoss",
    "CFALoss",
    "CFATrainer",
    "NonFiniteGuard",
    "CFATrainingArguments",
    "SkinClipVLCollator",
    "TermAverages",
    "brier_loss",
    "class_balanced_alpha",
    "compute_classification_metrics",
    "focal_loss",
    "latest_complete_checkpoint",
    "report_keys",
    "resolve_focal_alpha",
]
