"""The examples run and produce what they print."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

LR = 1e-4                      # quickstart's learning rate
NUMEL = 4 * 32 + 32 + 32 + 1   # 4 inputs -> 32 hidden -> 1 output


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("sampler,noise_factor", [
    ("sgld", 1.0),       # noise sqrt(lr) * eta
    ("sghmc", 0.1),      # sqrt(momentum_decay * lr) * eta
    ("sgnht", 0.01),     # sqrt(diffusion_factor * lr) * eta
])
def test_quickstart_samples_and_records_metrics(capsys, sampler, noise_factor):
    losses, metrics, state = _load("quickstart").main(steps=50, seed=1,
                                                      sampler=sampler)
    out = capsys.readouterr().out
    assert f"sampled 50 {sampler} steps" in out
    assert type(state).__name__ == {"sgld": "SGLDState", "sghmc": "SGHMCState",
                                    "sgnht": "SGNHTState"}[sampler]
    assert losses.shape == (50,) and np.all(np.isfinite(losses))
    # Every parameter is sampled.
    assert int(metrics.numel[-1]) == NUMEL
    # The chain leaves the trained weights, and the noise has the sampler's
    # scale: E|sqrt(c lr) eta| ~ sqrt(c lr numel), averaged over 50 steps.
    assert float(metrics.distance[-1]) > 0
    np.testing.assert_allclose(np.mean(np.asarray(metrics.noise)),
                               np.sqrt(noise_factor * LR * NUMEL), rtol=0.03)
    assert jnp.all(metrics.localization[1:] > 0)


def test_quickstart_rmsprop_sgld_preconditions_the_noise(capsys):
    losses, metrics, state = _load("quickstart").main(
        steps=50, seed=1, sampler="rmsprop_sgld")
    assert "sampled 50 rmsprop_sgld steps" in capsys.readouterr().out
    assert np.all(np.isfinite(losses))
    # The last step's noise is sqrt(lr) sqrt(G) eta with G = 1 / (sqrt(V) + eps)
    # from the final running mean V: its norm is about sqrt(lr * sum(G)).
    g_sum = sum(float(jnp.sum(1.0 / (jnp.sqrt(v) + 0.1)))
                for v in jax.tree.leaves(state.square_avg))
    assert g_sum > 2 * NUMEL   # far from SGLD's G = 1
    np.testing.assert_allclose(float(metrics.noise[-1]), np.sqrt(LR * g_sum),
                               rtol=0.15)
    # The raw gradient is not preconditioned, the gradient term is.
    assert not np.allclose(np.asarray(metrics.scaled_grad[1:]),
                           np.asarray(metrics.unscaled_grad[1:]), rtol=0.1)
