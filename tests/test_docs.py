"""The docs build, and every public name is documented."""

import importlib.util
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _hook():
    spec = importlib.util.spec_from_file_location(
        "public_api", ROOT / "docs" / "hooks" / "public_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_public_name_is_documented():
    assert _hook().undocumented(ROOT / "docs") == []


def test_hook_catches_a_missing_entry(tmp_path):
    api = (ROOT / "docs" / "api.md").read_text()
    (tmp_path / "api.md").write_text(api.replace("::: sgld_optax.sgld\n", ""))
    problems = _hook().undocumented(tmp_path)
    assert any("sgld_optax.sgld has no" in p for p in problems)


@pytest.mark.skipif(shutil.which("mkdocs") is None and
                    importlib.util.find_spec("mkdocs") is None,
                    reason="mkdocs is part of the test extra")
def test_docs_build_strict(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
         str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "api" / "index.html").exists()
