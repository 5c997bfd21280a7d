"""Baselines for the paper's Table I, run through SkinCLIP-VL's own data pipeline and evaluation.

* `skinclip.baselines.timm_finetune`: EfficientNet-B4, ResNet-34, ConvNeXt-Base (any timm model) fine-tuned with a plain
  PyTorch loop;
* `skinclip.baselines.zero_shot_clip`: zero-shot CLIP / open_clip from class prompts (no training);
* `skinclip.baselines.ood`: the ISIC 2024 out-of-distribution evaluation of any run (binary, by the malignant score).

Each reads the same `DatasetDict` schema and splits as ``train.py`` (through
`skinclip.run_io.load_training_data`, so the 12% subsample is the same too) and writes the same files:
``<split>_metrics.json`` and ``<split>_predictions.csv`` for the validation and test splits, and
``ood_metrics.json`` / ``ood_predictions.csv`` when an OOD dataset is given.
"""
