"""What `pip install reward_audit` gets: the core without Ray or matplotlib, one version
source, the license, and a pytest plugin that costs nothing to load."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture(scope="module")
def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_core_needs_neither_ray_nor_matplotlib(pyproject):
    project = pyproject["project"]
    core = " ".join(project["dependencies"])
    assert "matplotlib" not in core and "ray" not in core
    assert project["optional-dependencies"]["report"] == ["matplotlib"]
    assert project["optional-dependencies"]["rllib"] == ["ray[rllib]>=2.10"]
    assert "Framework :: Pytest" in project["classifiers"]


def test_one_version_source(pyproject):
    assert "version" not in pyproject["project"] and pyproject["project"]["dynamic"] == ["version"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "reward_audit.__version__"}


def test_license_is_apache_2(pyproject):
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert pyproject["project"]["license"] == {"text": "Apache-2.0"}


def test_loading_the_pytest_plugin_imports_nothing_heavy():
    """pytest loads the plugin (pytest11) in every project where reward_audit is installed."""
    code = (
        "import sys, pytest, reward_audit.pytest_plugin\n"
        "heavy = ('pandas', 'pyarrow', 'numpy', 'ray', 'matplotlib', 'reward_audit.audit', 'reward_audit.testing')\n"
        "print(','.join(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
