"""Tests for the calibration sweep (`_src/llc/calibrate.py`)."""

import functools
import types

import jax.numpy as jnp
import numpy as np
import pytest

import sgld_optax as so
from sgld_optax._src.llc import api as llc_api
from sgld_optax._src.llc import calibrate as cal_lib
from sgld_optax._src.llc.result import Check


def _regression(n=256, d=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ np.ones((d, 1)) + 0.1 * rng.normal(size=(n, 1))).astype(
        np.float32)
    w = jnp.asarray(np.linalg.lstsq(x, y, rcond=None)[0])
    return w, (x, y)


def _loss(w, batch):
    x, y = batch
    return jnp.mean((x @ w - y) ** 2)


def test_each_grid_point_is_the_single_run_with_the_same_key():
    """Grid point (lr, nbeta, loc) samples the chains estimate_llc samples
    with the same key and settings, for every kind of hyperparameter."""
    w, data = _regression()
    lrs, nbs, locs = [1e-4, 1e-3], [10.0, 40.0], [1.0, 50.0]
    cal = so.calibrate_llc(_loss, w, data, learning_rates=lrs, nbetas=nbs,
                           localizations=locs, num_chains=3, num_draws=40,
                           num_burnin_steps=5, batch_size=32, key=7)
    assert cal.llc_mean.shape == (2, 2, 2)
    for i, j, k in [(0, 0, 0), (1, 1, 0), (1, 0, 1), (0, 1, 1)]:
        single = so.estimate_llc(
            _loss, w, data, learning_rate=lrs[i], nbeta=nbs[j],
            localization=locs[k], num_chains=3, num_draws=40,
            num_burnin_steps=5, batch_size=32, key=7, mala=True,
            progress=False)
        point = cal.results[i][j][k]
        np.testing.assert_allclose(point.loss_trace, single.loss_trace,
                                   rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(point.mala_acceptance,
                                   single.mala_acceptance, rtol=1e-4,
                                   atol=1e-6)
        np.testing.assert_allclose(cal.llc_mean[i, j, k], single.llc_mean,
                                   rtol=1e-4)
        assert point.nbeta == pytest.approx(nbs[j])


def test_the_whole_grid_compiles_once():
    """One compiled program per grid shape: a second sweep over other
    values of the same shape reuses it, and no single-run program is
    compiled along the way."""
    w, data = _regression(seed=1)
    kwargs = dict(nbetas=[10.0, 20.0, 30.0], localizations=[5.0],
                  num_chains=2, num_draws=20)
    before_single = llc_api._sample_in_memory._cache_size()
    before = cal_lib._sweep._cache_size()
    so.calibrate_llc(_loss, w, data, learning_rates=[1e-5, 1e-4], **kwargs)
    assert cal_lib._sweep._cache_size() == before + 1
    so.calibrate_llc(_loss, w, data, learning_rates=[3e-5, 3e-4], **kwargs)
    assert cal_lib._sweep._cache_size() == before + 1
    assert llc_api._sample_in_memory._cache_size() == before_single


def test_default_grid_is_devinterp_v1s():
    """8 step sizes in [1e-6, 1e-2] and 8 nbetas from 1e-2 to 1e3 times the
    default, log-spaced."""
    w, data = _regression(n=128, seed=2)
    cal = so.calibrate_llc(_loss, w, data, localizations=[10.0],
                           num_chains=2, num_draws=8, batch_size=16)
    np.testing.assert_allclose(cal.learning_rates, np.logspace(-6, -2, 8))
    np.testing.assert_allclose(
        cal.nbetas, so.default_nbeta(16) * np.logspace(-2, 3, 8))
    assert cal.llc_mean.shape == (8, 8, 1)
    assert "recommended:" in cal.table()


def _fake(mean, mcse=0.01, failed=0, in_range=True, mala=None, rhat_ok=True,
          ess_ok=True):
    """A stand-in for an LLCResult with the verdict's checks."""
    checks = [Check("non-finite loss", failed, "", failed == 0, ""),
              Check("LLC range", mean, "", in_range, ""),
              Check("R-hat", 1.0 if rhat_ok else 1.2, "", rhat_ok, ""),
              Check("bulk ESS", 500 if ess_ok else 50, "", ess_ok, ""),
              Check("tail ESS", 500, "", True, "")]
    if mala is not None:
        checks.append(Check("MALA acceptance", mala, "", mala >= 0.5, ""))
    return types.SimpleNamespace(
        llc_mean=mean, llc_std=0.1, mcse=mcse, rhat=1.0, ess_bulk=100.0,
        ess_tail=100.0,
        diverged=np.asarray([True] * failed + [False] * (2 - failed)),
        mala_acceptance=None if mala is None else np.full((2, 5), mala),
        mala_acceptance_mean=mala, checks=tuple(checks))


def test_recommendation_rule():
    """At the nbeta closest to the default that has one, the largest step
    size whose estimate passes the verdict and agrees with the next smaller
    one."""
    lrs = np.asarray([1e-5, 1e-4, 1e-3, 1e-2])
    nbs = np.asarray([5.0, 50.0])
    locs = np.asarray([1.0])
    default_nb = 40.0
    rows = {  # (lr index, nbeta index) -> fake result
        (0, 0): _fake(1.0), (1, 0): _fake(1.01), (2, 0): _fake(1.02),
        (3, 0): _fake(2.0),                  # drifted: not stable
        (0, 1): _fake(0.5), (1, 1): _fake(0.9),  # not yet mixed
        (2, 1): _fake(0.91), (3, 1): _fake(0.9, failed=1),
    }

    def recommend():
        results = [rows[i, j] for i in range(4) for j in range(2)]
        return cal_lib._tabulate(results, (4, 2, 1), lrs, nbs, locs,
                                 default_nb)

    # lr 1e-3 qualifies for both nbetas; 50 is closer to 40 than 5 is.
    cal = recommend()
    assert cal.recommended == (1e-3, 50.0, 1.0)
    assert cal.qualifies[2, :, 0].all() and not cal.qualifies[3].any()
    # A neighbour's ESS does not matter (a smaller step mixes slower).
    rows[1, 1] = _fake(0.9, ess_ok=False)
    assert recommend().recommended == (1e-3, 50.0, 1.0)
    # The point's own ESS does; then the rule takes lr 1e-3 at nbeta 5
    # (1e-2 drifted by 0.98, far beyond 3 MCSEs and 5%).
    rows[2, 1] = _fake(0.91, ess_ok=False)
    assert recommend().recommended == (1e-3, 5.0, 1.0)
    # A neighbour out of range cannot vouch for it; one that has not
    # mixed yet can (a smaller step mixes more slowly).
    rows[1, 0] = _fake(1.01, in_range=False)
    cal = recommend()
    assert cal.recommended is None
    assert "3 passed, but the next smaller step size was missing" in cal.reason
    rows[1, 0] = _fake(1.01, rhat_ok=False)
    assert recommend().recommended == (1e-3, 5.0, 1.0)
    rows[1, 0] = _fake(1.01)
    # A failed MALA check disqualifies a point.
    rows[2, 0] = _fake(1.02, mala=0.3)
    assert recommend().recommended == (1e-4, 5.0, 1.0)
    # The nbeta nearest the default comes before the step size: lr 1e-4
    # at nbeta 50 over lr 1e-3 at nbeta 5.
    rows[2, 0] = _fake(1.02)
    rows[0, 1], rows[1, 1] = _fake(0.9), _fake(0.9)
    assert recommend().recommended == (1e-4, 50.0, 1.0)
    # An imprecise estimate (MCSE above 10% of it) agrees with anything
    # and does not qualify.
    rows[1, 1] = _fake(0.9, mcse=0.2)
    cal = recommend()
    assert cal.recommended == (1e-3, 5.0, 1.0) and not cal.qualifies[1, 1, 0]
    # Nothing sound: no recommendation; the reason counts each failure.
    results = [_fake(1.0, in_range=False, rhat_ok=i % 2 == 0)
               for i in range(8)]
    cal = cal_lib._tabulate(results, (4, 2, 1), lrs, nbs, locs, default_nb)
    assert cal.recommended is None and not cal.qualifies.any()
    assert cal.reason.startswith("none: no grid point qualifies. Of the 8 "
                                 "points, 8 failed the LLC range check; 4 "
                                 "failed the R-hat check.")
    # Points whose chains failed count as that, not as their diagnostics.
    results = [_fake(np.nan, failed=2, in_range=False, rhat_ok=False)] * 8
    cal = cal_lib._tabulate(results, (4, 2, 1), lrs, nbs, locs, default_nb)
    assert "Of the 8 points, 8 had failed chains" in cal.reason
    assert "R-hat" not in cal.reason.split(". Raise")[0]
    # One learning rate cannot give a recommendation, and says why.
    cal = cal_lib._tabulate([_fake(1.0)] * 2, (1, 2, 1), lrs[:1], nbs, locs,
                            default_nb)
    assert cal.recommended is None and "one learning rate" in cal.reason


def test_recommendation_passes_its_own_verdict():
    """On a regression (d = 3, LLC 3/2) over the default grid, the
    recommended point's own estimate passes every check of its verdict,
    and a long run there lands within 25% of d/2."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1000, 3)).astype(np.float32)
    y = (x @ np.asarray([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=1000)
         ).astype(np.float32)
    w = jnp.asarray(np.linalg.lstsq(x, y, rcond=None)[0])

    def loss(w, batch):
        xb, yb = batch
        return 0.5 * jnp.mean((xb @ w - yb) ** 2)

    cal = so.calibrate_llc(loss, w, (x, y), num_chains=4, num_draws=2000)
    assert cal.recommended is not None, cal.reason
    i, j, k = (int(np.flatnonzero(grid == value)[0]) for grid, value in zip(
        (cal.learning_rates, cal.nbetas, cal.localizations), cal.recommended))
    point = cal.results[i][j][k]
    assert all(c.passed for c in point.checks), point.summary()
    assert cal.qualifies[i, j, k]
    lr, nb, loc = cal.recommended
    long = so.estimate_llc(loss, w, (x, y), key=1, learning_rate=lr,
                           nbeta=nb, localization=loc, num_chains=4,
                           num_draws=2000, progress=False)
    assert abs(long.llc_mean - 1.5) < 0.25 * 1.5


def test_mala_is_recorded_for_a_wrapped_first_order_factory():
    w, data = _regression(seed=6)
    factory = functools.partial(so.rmsprop_sgld, alpha=0.9)
    cal = so.calibrate_llc(_loss, w, data, learning_rates=[1e-4, 1e-3],
                           nbetas=[10.0], sampler=factory, num_chains=2,
                           num_draws=20)
    assert np.isfinite(cal.mala_acceptance).all()
    cal = so.calibrate_llc(_loss, w, data, learning_rates=[1e-4, 1e-3],
                           nbetas=[10.0], sampler=so.sghmc, num_chains=2,
                           num_draws=20)
    assert np.isnan(cal.mala_acceptance).all()


def test_table_and_plot(tmp_path):
    w, data = _regression(seed=3)
    cal = so.calibrate_llc(_loss, w, data, learning_rates=[1e-4, 1e-3, 1.0],
                           nbetas=[10.0], localizations=[1.0, 10.0],
                           num_chains=2, num_draws=30)
    # The largest step size blows up: its chains failed and it is marked.
    assert (cal.num_failed[2] == 2).all()
    assert np.isnan(cal.llc_mean[2]).all()
    lines = cal.table().splitlines()
    assert len(lines) == 1 + 6 + 1
    fig = cal.plot(tmp_path / "cal.png")
    assert (tmp_path / "cal.png").stat().st_size > 0
    assert len(fig.axes) == 4


def test_bad_arguments():
    w, data = _regression(seed=4)
    with pytest.raises(ValueError, match=r"learning_rates\[1\]"):
        so.calibrate_llc(_loss, w, data, learning_rates=[1e-4, -1.0],
                         nbetas=[10.0], num_draws=5)
    with pytest.raises(ValueError, match="nbetas"):
        so.calibrate_llc(_loss, w, data, learning_rates=[1e-4],
                         nbetas=[[1.0, 2.0]], num_draws=5)
    class Loader:
        def __iter__(self):
            return iter([data, data])

    loader = Loader()
    with pytest.raises(TypeError, match="in-memory"):
        so.calibrate_llc(_loss, w, loader, learning_rates=[1e-4],
                         nbetas=[10.0], num_draws=5)
