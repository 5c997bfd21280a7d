"""Moved to `skinclip.classification_metrics`. This name stays importable only for the `evaluate` metric script
(metrics/skin_lesion_classification), which imports it; new code imports the package module."""

from skinclip.classification_metrics import *  # noqa: F401,F403
