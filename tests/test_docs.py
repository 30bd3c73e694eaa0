"""The docs build, and every public name is documented."""

import ast
import importlib.util
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
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


# Pages and examples that speak for the current library (the benchmarks page
# may record measurements of code that has since changed).
CURRENT = ("README.md", "docs/index.md", "docs/samplers.md", "docs/metrics.md",
           "docs/api.md")
SAMPLERS = ("sgld", "rmsprop_sgld", "sghmc", "sgnht")


def _current_files():
    return ([ROOT / f for f in CURRENT]
            + sorted((ROOT / "examples").glob("*.py")))


def _python_blocks(path):
    if path.suffix == ".py":
        return [path.read_text()]
    return re.findall(r"^```python\n(.*?)^```", path.read_text(),
                      flags=re.M | re.S)


def test_hook_catches_an_entry_of_a_removed_name(tmp_path):
    for page in (ROOT / "docs").glob("*.md"):
        (tmp_path / page.name).write_text(page.read_text())
    with open(tmp_path / "api.md", "a") as f:
        f.write("\n::: sgld_optax.compiler_options\n")
    problems = _hook().undocumented(tmp_path)
    assert problems == ["'::: sgld_optax.compiler_options' in docs/ is not a "
                        "public name of sgld_optax or sgld_optax.torch_interop"]


def test_names_the_docs_use_exist():
    """Every `so.X` / `sgld_optax.X` the current pages and examples name is in
    the library (removed names, such as a compiler-options helper, are not)."""
    import sgld_optax
    from sgld_optax import torch_interop

    seen, missing = set(), []
    for path in _current_files():
        for m in re.finditer(r"\b(?:so|sgld_optax)\.(\w+)(?:\.(\w+))?",
                             path.read_text()):
            name, attr = m.groups()
            seen.add(name)
            if name == "torch_interop":
                if attr and not hasattr(torch_interop, attr):
                    missing.append(f"{path.name}: {m.group(0)}")
            elif not hasattr(sgld_optax, name):
                missing.append(f"{path.name}: {m.group(0)}")
    assert missing == []
    assert set(SAMPLERS) <= seen


def test_every_sampler_call_in_docs_and_examples_passes_a_key():
    calls = []
    for path in _current_files():
        for block in _python_blocks(path):
            for node in ast.walk(ast.parse(block)):
                if (isinstance(node, ast.Call)
                        and isinstance(node.func, ast.Attribute)
                        and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == "so"
                        and node.func.attr in SAMPLERS):
                    has_key = any(k.arg == "key" for k in node.keywords)
                    calls.append((path.name, node.lineno, has_key))
    assert len(calls) >= 10
    assert [c for c in calls if not c[2]] == []


def test_samplers_page_examples_run_and_their_numbers_hold():
    """Runs the page's examples in order and checks what their comments
    print against closed forms (quadratic losses, Gaussian posteriors)."""
    ns = {}
    blocks = _python_blocks(ROOT / "docs" / "samplers.md")
    assert len(blocks) == 6
    for block in blocks:
        exec(compile(block, "docs/samplers.md", "exec"), ns)
    nbeta, spectrum = ns["nbeta"], np.asarray(ns["spectrum"])
    stiff, flat = slice(0, 128), slice(-64, None)

    # SGLD on a quadratic of curvature k has variance 1 / (k (1 - lr k / 4)).
    k = nbeta * spectrum[stiff]
    np.testing.assert_allclose(np.mean(ns["sgld_ratio"][stiff]),
                               np.mean(1 / (1 - 1e-3 * k / 4)), rtol=0.03)
    assert np.mean(ns["sgld_ratio"][flat]) < 0.9   # not mixed yet
    # SGHMC at the same step size samples the flat directions too.
    np.testing.assert_allclose(np.mean(ns["sghmc_ratio"][stiff]), 1, rtol=0.03)
    np.testing.assert_allclose(np.mean(ns["sghmc_ratio"][flat]), 1, rtol=0.05)

    # Two scales: the stiff half has SGLD's bias at lr k = 0.5; RMSprop-SGLD
    # samples the flat half, SGLD does not.
    np.testing.assert_allclose(np.mean(ns["sgld_two"][:128]), 1 / (1 - 0.5 / 4),
                               rtol=0.03)
    assert np.mean(ns["sgld_two"][128:]) < 0.2
    assert 0.9 < np.mean(ns["rmsprop_two"][128:]) < 1.2

    # Gradient noise of variance B per step heats SGHMC to 1 + B / (alpha lr);
    # SGNHT's thermostat settles where zeta (1 - zeta / 2) = a + B / lr and
    # samples at temperature 1 - zeta / 2.
    lr, alpha = 1e-3, 0.02
    b_over_lr = lr * (nbeta * 0.09) ** 2 / 4
    np.testing.assert_allclose(np.mean(ns["sghmc_noisy"][stiff]),
                               1 + b_over_lr / alpha, rtol=0.04)
    zeta = 1 - np.sqrt(1 - 2 * (alpha + b_over_lr))
    np.testing.assert_allclose(float(ns["state"].thermostat), zeta, rtol=0.05)
    np.testing.assert_allclose(np.mean(ns["sgnht_noisy"][stiff]), 1 - zeta / 2,
                               rtol=0.03)

    # With a prior N(1, 1/50) the posterior mean is 50 / (nbeta h + 50).
    error = np.abs(np.asarray(ns["prior_draws"]).mean(axis=0)
                   - 50 / (nbeta * spectrum + 50))
    assert error.mean() < 0.015 and error.max() < 0.06

    # Masked elements never leave w0 = 0; the box holds the rest within 0.05
    # and binds.
    masked = np.abs(np.asarray(ns["masked_draws"]))
    assert np.all(masked[:, 128:] == 0)
    np.testing.assert_allclose(masked.max(), 0.05, rtol=1e-6)
