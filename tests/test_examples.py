"""The examples run and produce what they print."""

import importlib.util
import pathlib

import jax
import numpy as np

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_samples_and_records_metrics(capsys):
    losses, metrics = _load("quickstart").main(steps=50, seed=1)
    out = capsys.readouterr().out
    assert "sampled 50 SGLD steps" in out
    assert losses.shape == (50,) and np.all(np.isfinite(losses))
    # 4 inputs -> 32 hidden -> 1 output: every parameter is sampled.
    assert int(metrics.numel[-1]) == 4 * 32 + 32 + 32 + 1
    # The chain leaves the trained weights and the noise has the SGLD scale:
    # sqrt(lr * numel) = sqrt(1e-4 * 193).
    assert float(metrics.distance[-1]) > 0
    np.testing.assert_allclose(np.mean(np.asarray(metrics.noise)),
                               np.sqrt(1e-4 * 193), rtol=0.1)
    assert jax.numpy.all(metrics.localization[1:] > 0)
