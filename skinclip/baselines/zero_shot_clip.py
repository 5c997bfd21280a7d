"""Zero-shot CLIP / open_clip baseline: class prompts, no training; the same files as ``train.py``.

    python -m skinclip.baselines.zero_shot_clip configs/baselines/zero_shot_clip_isic2019.yaml

Each class gets one or more descriptions (``class_prompts``, keyed by class name; a class of the dataset
without an entry uses its name, entries for other classes are ignored), each description is put into every
template (``templates``, with ``{}``),
the text embeddings are averaged per class (CLIP's prompt ensembling), and the class probabilities are
``softmax(logit_scale · cos(image, class))`` with the model's own logit scale. Validation and test splits are
scored; with ``ood_dataset_path`` also the ISIC 2024 OOD set (skinclip.baselines.ood).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from modeling_skinclip import needs_quick_gelu  # one rule for the model's tower and this baseline
from skinclip.baselines.common import resolve_device, write_run_info, write_split_scores
from skinclip.run_io import DataArguments, image_ids_of, load_training_data, parse_config

logger = logging.getLogger("skinclip.baselines.zero_shot")

DEFAULT_TEMPLATES = ["a dermoscopic image of {}.", "a dermoscopy photo of {}, a skin lesion."]


@dataclass
class ZeroShotArguments:
    model_name: str = field(default="ViT-L-14", metadata={"help": "open_clip model name, 'hf-hub:…' or 'local-dir:…'."})
    pretrained: str | None = field(default="openai", metadata={"help": "open_clip pretrained tag."})
    tiny_bases_dir: str | None = field(
        default=None, metadata={"help": "Use the tiny RANDOM open_clip built here (CI)."}
    )
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    class_prompts: dict = field(default_factory=dict, metadata={"help": "class name → list of descriptions."})
    output_dir: str = field(default="outputs/baselines/zero_shot_clip")
    per_device_eval_batch_size: int = field(default=64)
    device: str = field(default="auto")
    seed: int = field(default=42)
    ood_dataset_path: str | None = field(default=None)
    ood_split: str = field(default="test")


def class_texts(class_names: list[str], class_prompts: dict, templates: list[str]) -> list[list[str]]:
    """Per class, every template filled with every description of the class."""
    # One prompt file serves every dataset (ISIC 2019 and Derm7pt name their classes differently): entries for
    # classes a dataset does not have are skipped.
    if not templates or any("{}" not in template for template in templates):
        raise ValueError(f"every template needs a '{{}}' placeholder, got {templates}")
    texts = []
    for name in class_names:
        descriptions = class_prompts.get(name) or [name]
        descriptions = [descriptions] if isinstance(descriptions, str) else descriptions
        texts.append([template.format(description) for description in descriptions for template in templates])
    return texts


def create_open_clip(model_name: str, pretrained: str | None, device="cpu", load_weights: bool = True):
    """``open_clip.create_model_and_transforms`` with the activation its pretrained weights were trained with.

    Returns ``(model, eval_preprocess)``. ``load_weights=False`` builds the same architecture without the weights.
    """
    import open_clip

    has_schema = model_name.startswith(("hf-hub:", "local-dir:"))
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name,
        pretrained=None if has_schema else pretrained,
        load_weights=load_weights,
        force_quick_gelu=needs_quick_gelu(model_name, pretrained),
        device=device,
    )
    return model, preprocess


class ZeroShotClassifier:
    def __init__(self, args: ZeroShotArguments, class_names: list[str], device):
        import open_clip

        name = args.model_name
        if args.tiny_bases_dir:
            from skinclip.tiny_bases import build_tiny_bases

            name = build_tiny_bases(args.tiny_bases_dir, ("open_clip",))["open_clip"]
        self.model, self.preprocess = create_open_clip(name, args.pretrained, device=device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.device, self.model_name = device, name
        with torch.no_grad():
            embeddings = []
            for texts in class_texts(class_names, args.class_prompts, args.templates):
                features = self.model.encode_text(self.tokenizer(texts).to(device), normalize=True)
                embeddings.append(torch.nn.functional.normalize(features.mean(0), dim=-1))
            self.class_embeddings = torch.stack(embeddings)

    @torch.no_grad()
    def probs(self, split_dataset, batch_size: int) -> np.ndarray:
        result = []
        for start in range(0, len(split_dataset), batch_size):
            images = split_dataset[start : start + batch_size]["image"]
            pixels = torch.stack([self.preprocess(image.convert("RGB")) for image in images]).to(self.device)
            image_embeddings = self.model.encode_image(pixels, normalize=True)
            logits = self.model.logit_scale.exp() * image_embeddings @ self.class_embeddings.T
            result.append(torch.softmax(logits.double(), dim=-1).cpu().numpy())
        return np.concatenate(result)


def main(argv: list[str] | None = None) -> dict:
    args, data_args = parse_config(sys.argv[1:] if argv is None else argv, (ZeroShotArguments, DataArguments))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    dataset = load_training_data(data_args, args.seed)
    class_names = dataset[data_args.train_split].features["label"].names
    classifier = ZeroShotClassifier(args, class_names, resolve_device(args.device))
    output_dir = Path(args.output_dir)
    metrics: dict[str, dict] = {}
    for split in filter(None, (data_args.eval_split, data_args.test_split)):
        probs = classifier.probs(dataset[split], args.per_device_eval_batch_size)
        metrics[split] = write_split_scores(output_dir, split, dataset[split], probs, class_names)
        logger.info("%s: %s", split, metrics[split])
    if args.ood_dataset_path:
        from skinclip.baselines.ood import is_malignant, load_ood_split, write_ood_outputs

        ood = load_ood_split(args.ood_dataset_path, args.ood_split)
        metrics["ood"] = write_ood_outputs(
            output_dir,
            image_ids_of(ood),
            is_malignant(ood),
            classifier.probs(ood, args.per_device_eval_batch_size),
            class_names,
            source=f"{args.ood_dataset_path}:{args.ood_split}",
        )
    parameters = sum(p.numel() for p in classifier.model.parameters())
    write_run_info(
        output_dir,
        runner="zero_shot",
        model_name=classifier.model_name,
        pretrained=args.pretrained,
        class_names=class_names,
        total_parameters=parameters,
        trainable_parameters=0,
        dataset_path=data_args.dataset_path,
        prompts=class_texts(class_names, args.class_prompts, args.templates),
    )
    return metrics


if __name__ == "__main__":
    main()
