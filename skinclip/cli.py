"""The console scripts (``[project.scripts]`` in pyproject.toml) and what the top-level scripts call.

    skinclip-train configs/demo.yaml           python train.py configs/demo.yaml       (skinclip.training)
    skinclip-predict --model DIR IMAGE...       python predict.py ...                  (skinclip.prediction)
    skinclip-evaluate --model DIR --dataset D   python evaluate_skinclip.py ...        (skinclip.evaluation)
    skinclip-demo --model DIR                   python demo_app.py ...                 (skinclip.demo_app)
    skinclip-tables table1 --out results/       python reproduce_tables.py ...         (skinclip.tables)

Each runs its command's ``main`` through `skinclip.errors.run_entry_point` (a user error is one ``error:`` line
and exit code 1; ``--debug`` shows the traceback) and returns the exit code.
"""

from __future__ import annotations

from collections.abc import Sequence

from skinclip.errors import run_entry_point


def train(argv: Sequence[str] | None = None) -> int:
    from skinclip import training

    return run_entry_point(training.main, argv)


def predict(argv: Sequence[str] | None = None) -> int:
    from skinclip import prediction

    return run_entry_point(prediction.main, argv)


def evaluate(argv: Sequence[str] | None = None) -> int:
    from skinclip import evaluation

    return run_entry_point(evaluation.main, argv)


def demo(argv: Sequence[str] | None = None) -> int:
    from skinclip import demo_app

    return run_entry_point(demo_app.main, argv)


def tables(argv: Sequence[str] | None = None) -> int:
    from skinclip import tables as reproduce

    return run_entry_point(reproduce.main, argv)
