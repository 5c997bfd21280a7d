"""The class lists that code outside a dataset needs by name: one definition each, imported everywhere.

A trained model's classes and their order always come from its dataset's ``label`` ClassLabel (copied into
``config.id2label``). These constants are for the places that must name ISIC classes themselves: the
converters that build the ClassLabel, the ISIC 2019 submission format, and the malignant score that maps an
ISIC 2019 model onto the binary ISIC 2024 (SLICE-3D) task.
"""

from __future__ import annotations

# ISIC 2019 task 3, in the order of its ground-truth CSV. UNK (its ninth column) has no training image.
ISIC2019_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
ISIC2019_SUBMISSION_COLUMNS = (*ISIC2019_CLASSES, "UNK")

# The malignant diagnoses whose probabilities add up to P(malignant). AK is pre-malignant: SLICE-3D (ISIC 2024)
# labels actinic keratoses benign (target 0), so it is left out by default.
MALIGNANT_CLASSES = ("MEL", "BCC", "SCC")

# The binary out-of-distribution task (ISIC 2024), label 0 and 1.
OOD_CLASSES = ("benign", "malignant")
