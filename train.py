"""Train SkinCLIP-VL with the CFA loss.

    accelerate launch train.py configs/isic2019.yaml
    python train.py configs/demo.yaml --num_train_epochs=2 --output_dir=outputs/demo2

The entry point only: the code is skinclip/training.py; the console script `skinclip-train` runs the same
(`--help` for the options).
"""

import sys

from skinclip.cli import train

if __name__ == "__main__":
    sys.exit(train())
