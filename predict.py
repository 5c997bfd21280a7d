"""Diagnose skin-lesion images with a SkinCLIP-VL checkpoint.

    python predict.py --model outputs/demo lesion.jpg --age 55 --sex male --site "posterior torso"

The entry point only: the code is skinclip/prediction.py; the console script `skinclip-predict` runs the same
(`--help` for the options).
"""

import sys

from skinclip.cli import predict

if __name__ == "__main__":
    sys.exit(predict())
