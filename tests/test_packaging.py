"""Packaging facts a user relies on: one version source, the kernels installed as
fastpref.kernels by pyproject.toml (not by a path hack), the licence text shipped."""

import importlib.metadata
import os
import subprocess
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


def _python_at_the_root(code, **env):
    """Run `python -c code` with the repository root as the working directory (sys.path[0])."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True
    )


def test_the_root_kernels_dir_hands_its_name_to_an_installed_kernels_package(tmp_path):
    """Run from the root, `import kernels` (transformers >= 5.25 does) gets the installed package."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("WHO = 'installed'\n")
    code = (
        "import kernels, fastpref.kernels as fk\n"
        "assert kernels.WHO == 'installed', kernels.__file__\n"
        "from kernels import WHO\n"
        "assert 'dpo' in fk.REGISTRY and fk.__name__ == 'fastpref.kernels'\n"
    )
    done = _python_at_the_root(code, PYTHONPATH=str(tmp_path))
    assert done.returncode == 0, done.stderr


def test_the_root_kernels_dir_is_an_empty_module_when_none_is_installed():
    # fastpref.kernels (and numpy, torch, triton, transformers' probe) first; then every sys.path
    # entry that holds an installed `kernels` is hidden, so the root's kernels/ is the only one.
    code = (
        "import os, sys\n"
        "import fastpref.kernels\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "assert 'kernels' not in sys.modules\n"
        f"root = {str(ROOT)!r}\n"
        "sys.path = [p for p in sys.path if os.path.realpath(p or '.') == root\n"
        "            or not os.path.isdir(os.path.join(p, 'kernels'))]\n"
        "assert not is_kernels_available()  # transformers' probe imports it and finds no package\n"
        "import kernels\n"
        "assert kernels.__path__ == [] and not hasattr(kernels, 'REGISTRY'), dir(kernels)\n"
        "try:\n"
        "    import kernels.reduce\n"
        "except ModuleNotFoundError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('kernels.reduce imported')\n"
        "assert 'dpo' in fastpref.kernels.REGISTRY\n"
    )
    done = _python_at_the_root(code)
    assert done.returncode == 0, done.stderr + done.stdout


def test_licence_file_matches_the_declared_licence():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    assert declared == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text().splitlines()[0]


def test_no_test_skips_for_a_missing_install():
    """A dependency `make test` installs must fail its tests when missing, never skip them."""
    offenders = [p.name for p in (ROOT / "tests").glob("*.py") if "importor" + "skip(" in p.read_text()]
    assert offenders == []
