"""Evaluate a SkinCLIP-VL checkpoint: metrics, calibration, conformal sets, subgroups.

    python evaluate_skinclip.py --model outputs/isic2019 --dataset data/isic2019 --split test --out eval/

The entry point only: the code is skinclip/evaluation.py; the console script `skinclip-evaluate` runs the same
(`--help` for the options).
"""

import sys

from skinclip.cli import evaluate

if __name__ == "__main__":
    sys.exit(evaluate())
