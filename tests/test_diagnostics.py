"""Tests for split R-hat and effective sample size in ``_src/diagnostics.py``."""

import math

import numpy as np
import pytest
from scipy import signal

from sgld_optax._src import diagnostics


def _ar1(phi, num_chains, num_draws, seed):
    """Stationary AR(1) chains x_t = phi x_{t-1} + e_t, e_t ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    eps = rng.normal(size=(num_chains, num_draws))
    x0 = rng.normal(size=(num_chains, 1)) / math.sqrt(1 - phi**2)
    zi = phi * x0
    x, _ = signal.lfilter([1.0], [1.0, -phi], eps, axis=1, zi=zi)
    return x


def _reference_rhat(x):
    """BDA3 split R-hat, written out with loops over half-chains."""
    halves = []
    n = x.shape[1] // 2
    for chain in x:
        halves.append(chain[:n])
        halves.append(chain[len(chain) - n:])
    k = len(halves)
    means = [sum(h) / n for h in halves]
    grand = sum(means) / k
    b = n / (k - 1) * sum((mu - grand) ** 2 for mu in means)
    w = sum(sum((v - mu) ** 2 for v in h) / (n - 1)
            for h, mu in zip(halves, means)) / k
    return math.sqrt(((n - 1) / n * w + b / n) / w)


def _reference_ess(x):
    """Geyer's initial monotone sequence with direct (non-FFT) autocovariances."""
    m, n = x.shape
    centred = x - x.mean(axis=1, keepdims=True)
    acov = np.array([[np.dot(c[:n - t], c[t:]) / n for t in range(n)]
                     for c in centred])
    w = np.mean(np.var(x, axis=1, ddof=1))
    var_plus = (n - 1) / n * w + (np.var(x.mean(axis=1), ddof=1) if m > 1 else 0)
    rho = [1.0] + [1 - (w - acov[:, t].mean()) / var_plus for t in range(1, n)]
    total, previous = 0.0, float("inf")
    for k in range(n // 2):
        pair = rho[2 * k] + rho[2 * k + 1]
        if pair < 0:
            break
        previous = min(previous, pair)
        total += previous
    return m * n / (2 * total - 1)


@pytest.mark.parametrize("shape", [(4, 100), (2, 101), (1, 60), (8, 7)])
def test_split_rhat_matches_reference_formula(shape):
    rng = np.random.default_rng(1)
    x = rng.normal(size=shape) + rng.normal(size=(shape[0], 1)) * 0.3
    np.testing.assert_allclose(diagnostics.split_rhat(x), _reference_rhat(x),
                               rtol=1e-12)


def test_split_rhat_flags_disagreement_and_trends():
    rng = np.random.default_rng(2)
    iid = rng.normal(size=(4, 2000))
    assert abs(diagnostics.split_rhat(iid) - 1) < 0.01
    shifted = iid + np.arange(4)[:, None]
    assert diagnostics.split_rhat(shifted) > 1.5
    # One chain drifting: only the split reveals it.
    trend = rng.normal(size=2000) + np.linspace(0, 6, 2000)
    assert diagnostics.split_rhat(trend) > 1.5


@pytest.mark.parametrize("shape", [(4, 200), (1, 333), (3, 64)])
def test_ess_matches_direct_computation(shape):
    x = _ar1(0.6, *shape, seed=3)
    np.testing.assert_allclose(diagnostics.effective_sample_size(x),
                               _reference_ess(x), rtol=1e-9)


@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9, -0.4])
def test_ess_of_ar1_matches_theory(phi):
    num_chains, num_draws = 4, 20_000
    x = _ar1(phi, num_chains, num_draws, seed=4)
    expected = num_chains * num_draws * (1 - phi) / (1 + phi)
    got = diagnostics.effective_sample_size(x)
    assert got == pytest.approx(expected, rel=0.1)


def test_degenerate_traces_give_nan():
    assert math.isnan(diagnostics.split_rhat(np.ones((2, 3))))
    assert math.isnan(diagnostics.split_rhat(np.ones((2, 10))))
    assert math.isnan(diagnostics.effective_sample_size(np.ones((2, 10))))
    x = np.random.default_rng(5).normal(size=(2, 50))
    x[1, 7] = np.inf
    assert math.isnan(diagnostics.split_rhat(x))
    assert math.isnan(diagnostics.effective_sample_size(x))
    with pytest.raises(ValueError, match="trace"):
        diagnostics.split_rhat(np.zeros((2, 3, 4)))
