"""Tests for the diagnostics in `_src/diagnostics.py`, against ArviZ.

ArviZ (`az.rhat`, `az.ess`, `az.mcse`) is the oracle: every value must equal
its value to 1e-6 (relative) on fixed arrays, in 64-bit mode.
"""

import math

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import signal

from sgld_optax._src import diagnostics

ESS_KINDS = ("bulk", "tail", "mean")


def _ar1(phi, num_chains, num_draws, seed):
    """Stationary AR(1) chains x_t = phi x_{t-1} + e_t, e_t ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    eps = rng.normal(size=(num_chains, num_draws))
    x0 = rng.normal(size=(num_chains, 1)) / math.sqrt(1 - phi**2)
    x, _ = signal.lfilter([1.0], [1.0, -phi], eps, axis=1, zi=phi * x0)
    return x


def _cases():
    rng = np.random.default_rng(20210215)
    with_inf = rng.normal(size=(4, 200))
    with_inf[2, 17] = np.inf
    return {
        # Equal location, one chain four times wider: only the folded
        # (tail) R-hat sees it.
        "scales_1_1_1_4": rng.normal(size=(4, 1000))
                          * np.array([1.0, 1.0, 1.0, 4.0])[:, None],
        # Slowly trending chains (random walks).
        "trending": np.cumsum(rng.normal(size=(4, 1000)), axis=1),
        "different_means": rng.normal(size=(4, 200))
                           + 0.5 * np.arange(4)[:, None],
        "cauchy": rng.standard_cauchy(size=(4, 200)),
        "odd_draws": rng.normal(size=(3, 101)),
        "ties": np.round(rng.normal(size=(4, 200)) * 2) / 2,
        "poisson_ties": rng.poisson(0.3, size=(4, 200)).astype(float),
        "one_chain_1d": rng.normal(size=333),
        "ar1_positive": _ar1(0.9, 4, 200, seed=1),
        "ar1_negative": _ar1(-0.7, 4, 200, seed=2),
        "seven_draws": rng.normal(size=(2, 7)),
        "one_chain_four_draws": rng.normal(size=(1, 4)),
        "infinity": with_inf,
    }


CASES = _cases()


def _arviz(x):
    """(rhat, ess bulk, ess tail, ess mean, mcse mean) by ArviZ."""
    with np.errstate(all="ignore"):
        return np.array(
            [az.rhat(x)] + [az.ess(x, method=k) for k in ESS_KINDS]
            + [az.mcse(x, method="mean")], dtype=np.float64)


def _all_diagnostics(x):
    return jnp.stack(
        [diagnostics.split_rhat(x)]
        + [diagnostics.effective_sample_size(x, k) for k in ESS_KINDS]
        + [diagnostics.mcse_mean(x)])


def _ours(x):
    # The public functions share one compiled program per trace shape.
    return np.asarray(_all_diagnostics(x), dtype=np.float64)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("name", sorted(CASES))
def test_equals_arviz(name, x64):
    x = CASES[name]
    expected = _arviz(x)
    got = _ours(x)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
    # Not a NaN-equals-NaN pass: only these are NaN, as in ArviZ.
    expected_nan = np.zeros(5, bool)
    if np.ndim(x) == 1 or x.shape[0] == 1:
        expected_nan[0] = True  # R-hat asks for two chains
    if name == "infinity":
        expected_nan[3:] = True  # the mean and its MCSE, not the ranks
    np.testing.assert_array_equal(np.isnan(got), expected_nan)


def test_rank_rhat_sees_a_wider_chain_that_classic_rhat_misses(x64):
    x = CASES["scales_1_1_1_4"]
    rhat = _ours(x)[0]
    assert rhat == pytest.approx(float(az.rhat(x)), rel=1e-6)
    assert rhat > 1.15
    # The classic split R-hat (no ranks, no folding) is blind to it.
    assert float(az.rhat(x, method="split")) < 1.01


def test_bulk_ess_splits_trending_chains(x64):
    x = CASES["trending"]
    ess = _ours(x)[1]
    assert ess == pytest.approx(float(az.ess(x, method="bulk")), rel=1e-6)
    # ESS of the unsplit, unranked chains is a different number.
    unsplit = float(az.ess(x, method="identity"))
    assert abs(ess - unsplit) > 0.3 * unsplit
    assert ess < 20


def test_ess_defaults_to_bulk(x64):
    x = CASES["cauchy"]
    ess = float(diagnostics.effective_sample_size(x))
    assert ess == pytest.approx(float(az.ess(x, method="bulk")), rel=1e-6)
    # On Cauchy draws the rank-based ESS is not the mean one.
    assert abs(ess - float(az.ess(x, method="mean"))) > 1.0


def test_jit_and_vmap_over_a_grid_of_traces(x64):
    rng = np.random.default_rng(3)
    batch = np.stack([
        rng.normal(size=(4, 200)),
        rng.normal(size=(4, 200)) * np.array([1.0, 1.0, 1.0, 4.0])[:, None],
        np.cumsum(rng.normal(size=(4, 200)), axis=1),
        _ar1(0.8, 4, 200, seed=4),
        np.round(rng.normal(size=(4, 200))),
        rng.standard_cauchy(size=(4, 200)),
    ])
    # A (2, 3) grid of traces, as a sweep over two hyperparameters gives.
    grid = jnp.asarray(batch.reshape(2, 3, 4, 200))
    got = jax.jit(jax.vmap(jax.vmap(_all_diagnostics)))(grid)
    assert got.shape == (2, 3, 5)
    expected = np.stack([_arviz(x) for x in batch])
    np.testing.assert_allclose(np.asarray(got).reshape(6, 5), expected,
                               rtol=1e-6, atol=0)


def test_float32_traces_stay_close_to_arviz():
    x = CASES["different_means"].astype(np.float32)
    got = _all_diagnostics(x)
    assert got.dtype == jnp.float32 and got.shape == (5,)
    np.testing.assert_allclose(np.asarray(got, np.float64), _arviz(x),
                               rtol=1e-4)


def test_constant_trace(x64):
    x = np.full((3, 101), 2.5)
    # R-hat is NaN; every draw used (3 chains x 2 halves x 50) counts as
    # independent; the standard error is 0.
    expected = [np.nan, 300.0, 300.0, 300.0, 0.0]
    np.testing.assert_array_equal(_arviz(x), expected)
    np.testing.assert_array_equal(_ours(x), expected)


def test_too_short_or_nan_traces_give_nan(x64):
    short = np.random.default_rng(5).normal(size=(4, 3))
    with_nan = np.random.default_rng(6).normal(size=(4, 200))
    with_nan[1, 7] = np.nan
    for x in (short, with_nan):
        assert np.all(np.isnan(_arviz(x)))
        assert np.all(np.isnan(_ours(x)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="trace must have shape"):
        diagnostics.split_rhat(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="trace must have shape"):
        diagnostics.mcse_mean(np.zeros(()))
    with pytest.raises(ValueError, match="kind must be one of"):
        diagnostics.effective_sample_size(np.zeros((2, 8)), kind="median")


@pytest.mark.parametrize("phi", [0.5, -0.4])
def test_mean_ess_and_mcse_of_ar1_match_theory(phi, x64):
    """Closed forms: ESS = MN (1 - phi)/(1 + phi), sd = 1/sqrt(1 - phi^2)."""
    num_chains, num_draws = 4, 10_000
    x = _ar1(phi, num_chains, num_draws, seed=7)
    ess = num_chains * num_draws * (1 - phi) / (1 + phi)
    mcse = 1 / math.sqrt(1 - phi**2) / math.sqrt(ess)
    got_ess = float(diagnostics.effective_sample_size(x, "mean"))
    assert got_ess == pytest.approx(ess, rel=0.1)
    assert float(diagnostics.mcse_mean(x)) == pytest.approx(mcse, rel=0.06)
