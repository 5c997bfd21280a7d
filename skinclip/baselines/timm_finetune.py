"""Fine-tune a timm image classifier (paper Table I: EfficientNet-B4, ResNet-34, ConvNeXt-Base) on a SkinCLIP-VL
DatasetDict and write the same evaluation files as ``train.py``.

    python -m skinclip.baselines.timm_finetune configs/baselines/efficientnet_b4_isic2019.yaml
    python -m skinclip.baselines.timm_finetune configs/baselines/resnet34_derm7pt.yaml \\
        --learning_rate=3e-4 --output_dir=x

The images only: these baselines see neither the metadata text nor the report (the paper groups them under
"Multimodal Models", but they are image-only CNNs; see REPRODUCING.md). Training is a plain loop: AdamW,
linear warm-up then cosine decay, class-weighted cross-entropy, flips and right-angle rotations (a lesion has
no canonical orientation), the epoch with the best validation B-ACC kept. At the end: ``validation_metrics.json``,
``test_metrics.json``, ``*_predictions.csv``, ``model.safetensors``, ``run_info.json`` and, with
``ood_dataset_path``, ``ood_metrics.json`` (skinclip.baselines.ood).
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from skinclip.baselines.common import resolve_device, write_run_info, write_split_scores
from skinclip.run_io import DataArguments, image_ids_of, load_training_data, parse_config

logger = logging.getLogger("skinclip.baselines.timm")


@dataclass
class TimmArguments:
    model_name: str = field(default="efficientnet_b4.ra2_in1k", metadata={"help": "timm model name (with tag)."})
    pretrained: bool = field(default=True, metadata={"help": "Load the ImageNet weights from the Hub."})
    image_size: int = field(default=380)
    output_dir: str = field(default="outputs/baselines/efficientnet_b4")
    num_train_epochs: float = field(default=20)
    max_steps: int = field(default=-1, metadata={"help": "> 0: stop after this many optimiser steps."})
    per_device_train_batch_size: int = field(default=32)
    per_device_eval_batch_size: int = field(default=64)
    learning_rate: float = field(default=1e-4)
    weight_decay: float = field(default=0.05)
    warmup_fraction: float = field(default=0.03)
    label_smoothing: float = field(default=0.0)
    class_weighting: str = field(default="inverse_frequency", metadata={"help": "'inverse_frequency' or 'none'."})
    drop_rate: float = field(default=0.2)
    augment: bool = field(default=True)
    select_best: bool = field(default=True, metadata={"help": "Keep the epoch with the best validation B-ACC."})
    bf16: bool = field(default=True, metadata={"help": "bfloat16 autocast on CUDA (ignored on CPU)."})
    device: str = field(default="auto")
    dataloader_num_workers: int = field(default=4)
    seed: int = field(default=42)
    ood_dataset_path: str | None = field(default=None, metadata={"help": "Binary DatasetDict for the OOD columns."})
    ood_split: str = field(default="test")


class ImageClassificationRows(torch.utils.data.Dataset):
    """(pixels, label) pairs from a DatasetDict split; ``transform`` is a timm/torchvision transform."""

    def __init__(self, split_dataset, transform):
        self.rows, self.transform = split_dataset, transform

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        row = self.rows[index]
        return self.transform(row["image"].convert("RGB")), int(row["label"])


def build_transforms(model: nn.Module, image_size: int, augment: bool):
    import timm.data
    from torchvision import transforms

    config = timm.data.resolve_data_config({"input_size": (3, image_size, image_size)}, model=model)
    evaluation = timm.data.create_transform(**{**config, "crop_pct": 1.0}, is_training=False)
    if not augment:
        return evaluation, evaluation
    training = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(0.6, 1.0), antialias=True),
            transforms.RandomHorizontalFlip(),
            transforms.RandomVerticalFlip(),
            transforms.RandomChoice([transforms.RandomRotation((angle, angle)) for angle in (0, 90, 180, 270)]),
            transforms.ColorJitter(0.1, 0.1, 0.1),
            transforms.ToTensor(),
            transforms.Normalize(config["mean"], config["std"]),
        ]
    )
    return training, evaluation


def class_weights(labels: np.ndarray, num_classes: int, setting: str) -> torch.Tensor | None:
    if setting == "none":
        return None
    if setting != "inverse_frequency":
        raise ValueError(f"class_weighting must be 'inverse_frequency' or 'none', got {setting!r}")
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    return torch.tensor(weights / weights[counts > 0].mean(), dtype=torch.float32)


@torch.no_grad()
def predict_probs(model: nn.Module, loader, device, autocast: bool) -> np.ndarray:
    model.eval()
    probs = []
    for pixels, _ in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(pixels.to(device))
        probs.append(torch.softmax(logits.double(), dim=-1).cpu().numpy())
    return np.concatenate(probs)


def main(argv: list[str] | None = None) -> dict:
    import timm
    from transformers import set_seed

    args, data_args = parse_config(sys.argv[1:] if argv is None else argv, (TimmArguments, DataArguments))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    dataset = load_training_data(data_args, args.seed)
    class_names = dataset[data_args.train_split].features["label"].names
    device = resolve_device(args.device)
    autocast = args.bf16 and device.type == "cuda"

    model = timm.create_model(
        args.model_name, pretrained=args.pretrained, num_classes=len(class_names), drop_rate=args.drop_rate
    ).to(device)
    parameters = sum(p.numel() for p in model.parameters())
    logger.info("%s: %d parameters, %d classes %s", args.model_name, parameters, len(class_names), class_names)
    train_transform, eval_transform = build_transforms(model, args.image_size, args.augment)

    def loader(split, transform, batch_size, shuffle):
        generator = torch.Generator().manual_seed(args.seed)
        return torch.utils.data.DataLoader(
            ImageClassificationRows(dataset[split], transform),
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=args.dataloader_num_workers,
            generator=generator,
            pin_memory=device.type == "cuda",
        )

    train_loader = loader(data_args.train_split, train_transform, args.per_device_train_batch_size, True)
    eval_loader = (
        loader(data_args.eval_split, eval_transform, args.per_device_eval_batch_size, False)
        if data_args.eval_split
        else None
    )
    train_labels = np.asarray(dataset[data_args.train_split]["label"])
    weights = class_weights(train_labels, len(class_names), args.class_weighting)
    criterion = nn.CrossEntropyLoss(
        weight=None if weights is None else weights.to(device), label_smoothing=args.label_smoothing
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    epochs = max(1, math.ceil(args.num_train_epochs))
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * len(train_loader))
    warmup = int(args.warmup_fraction * total_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            (step + 1) / max(1, warmup)
            if step < warmup
            else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
        ),
    )

    from skinclip.classification_metrics import headline_metrics

    best_score, best_state, step = -1.0, None, 0
    for epoch in range(epochs):
        model.train()
        running = 0.0
        for pixels, labels in train_loader:
            if step >= total_steps:
                break
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = criterion(model(pixels.to(device)).float(), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            running += loss.item()
        message = f"epoch {epoch + 1}/{epochs} step {step} train loss {running / max(1, len(train_loader)):.4f}"
        if eval_loader is not None and args.select_best:
            score = headline_metrics(
                np.asarray(dataset[data_args.eval_split]["label"]), predict_probs(model, eval_loader, device, autocast)
            )["balanced_accuracy"]
            message += f" validation B-ACC {score:.4f}"
            if score > best_score:
                best_score, best_state = score, {k: v.detach().clone() for k, v in model.state_dict().items()}
        logger.info(message)
        if step >= total_steps:
            break
    if best_state is not None:
        model.load_state_dict(best_state)

    output_dir = Path(args.output_dir)
    metrics: dict[str, dict] = {}
    for split in filter(None, (data_args.eval_split, data_args.test_split)):
        probs = predict_probs(
            model, loader(split, eval_transform, args.per_device_eval_batch_size, False), device, autocast
        )
        metrics[split] = write_split_scores(output_dir, split, dataset[split], probs, class_names)
        logger.info("%s: %s", split, metrics[split])
    if args.ood_dataset_path:
        from skinclip.baselines.ood import is_malignant, load_ood_split, write_ood_outputs

        ood = load_ood_split(args.ood_dataset_path, args.ood_split)
        probs = predict_probs(
            model,
            torch.utils.data.DataLoader(
                ImageClassificationRows(ood, eval_transform),
                batch_size=args.per_device_eval_batch_size,
                num_workers=args.dataloader_num_workers,
            ),
            device,
            autocast,
        )
        metrics["ood"] = write_ood_outputs(
            output_dir,
            image_ids_of(ood),
            is_malignant(ood),
            probs,
            class_names,
            source=f"{args.ood_dataset_path}:{args.ood_split}",
        )
        logger.info("ood: %s", metrics["ood"])

    from safetensors.torch import save_file

    save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, str(output_dir / "model.safetensors"))
    write_run_info(
        output_dir,
        runner="timm",
        model_name=args.model_name,
        pretrained=args.pretrained,
        image_size=args.image_size,
        class_names=class_names,
        total_parameters=parameters,
        trainable_parameters=parameters,
        dataset_path=data_args.dataset_path,
        train_fraction=data_args.train_fraction,
        train_size=len(dataset[data_args.train_split]),
        steps=step,
    )
    return metrics


if __name__ == "__main__":
    main()
