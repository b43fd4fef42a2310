"""Packaging facts a user relies on: one version source, the kernels installed as
fastpref.kernels by pyproject.toml (not by a path hack), the licence text shipped."""

import importlib.metadata
import sys
from pathlib import Path

import tomllib

import fastpref

ROOT = Path(__file__).resolve().parents[1]


def test_version_has_one_source():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert importlib.metadata.version("fastpref") == fastpref.__version__


def test_kernels_are_installed_as_a_subpackage_not_through_sys_path():
    import fastpref.kernels

    assert Path(fastpref.kernels.__file__).resolve().parent == ROOT / "kernels"
    assert not any(Path(p).resolve() == ROOT / "kernels" for p in sys.path if p)


def test_licence_file_matches_the_declared_licence():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    assert declared == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text().splitlines()[0]


def test_no_test_skips_for_a_missing_install():
    """A dependency `make test` installs must fail its tests when missing, never skip them."""
    offenders = [p.name for p in (ROOT / "tests").glob("*.py") if "importor" + "skip(" in p.read_text()]
    assert offenders == []
