"""Entry points: the console scripts in pyproject.toml and the checkout scripts call the same skinclip.cli functions."""

import subprocess
import sys

import pytest
import tomllib

from skinclip import cli
from tests.conftest import REPO_ROOT

SCRIPTS = {
    "train.py": "train",
    "predict.py": "predict",
    "evaluate_skinclip.py": "evaluate",
    "demo_app.py": "demo",
    "reproduce_tables.py": "tables",
}


def test_console_scripts_name_the_cli_functions_and_only_library_modules_are_top_level():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    scripts = project["project"]["scripts"]
    assert scripts == {f"skinclip-{name}": f"skinclip.cli:{name}" for name in SCRIPTS.values()}
    assert all(callable(getattr(cli, target.split(":")[1])) for target in scripts.values())
    # Nothing that could shadow another project's module (train, predict, ...) is installed at the top level.
    assert project["tool"]["setuptools"]["py-modules"] == [
        "configuration_skinclip",
        "modeling_skinclip",
        "processing_skinclip",
        "metadata_skinclip",
        "pipeline_skinclip",
        "trainer_cfa",
    ]


@pytest.mark.parametrize("script,function", SCRIPTS.items())
def test_checkout_scripts_are_thin_calls_of_the_cli(script, function):
    source = (REPO_ROOT / script).read_text()
    assert f"from skinclip.cli import {function}\n" in source and f"sys.exit({function}())" in source
    assert len(source.splitlines()) < 20


def test_a_user_error_is_one_line_and_exit_code_1(tmp_path, capsys):
    assert (
        cli.evaluate(
            ["--model", str(tmp_path / "absent"), "--dataset", str(tmp_path / "absent"), "--out", str(tmp_path / "out")]
        )
        == 1
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1


def test_train_script_runs_from_another_working_directory(tmp_path):
    """`python /path/to/train.py` finds the package from the script's folder (no install needed)."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "--train_fraction" in result.stdout
