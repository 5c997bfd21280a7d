"""The local Gradio demo (`pip install -e ".[demo]"`).

    python demo_app.py --model outputs/demo

The entry point only: the code is skinclip/demo_app.py; the console script `skinclip-demo` runs the same
(`--help` for the options).
"""

import sys

from skinclip.cli import demo

if __name__ == "__main__":
    sys.exit(demo())
