"""Regenerate the paper's tables, one command per table.

    python reproduce_tables.py table1 --out results/
    python reproduce_tables.py all --out results/ --tiny

The entry point only: the code is skinclip/tables.py; the console script `skinclip-tables` runs the same
(`--help` for the options).
"""

import sys

from skinclip.cli import tables

if __name__ == "__main__":
    sys.exit(tables())
