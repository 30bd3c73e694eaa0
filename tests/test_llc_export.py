"""LLC results in the ecosystem's forms (ArviZ, devinterp) and their plot.

Results are built by hand with the `LLCResult` constructor from fixed
traces; the oracles are ArviZ on the raw arrays, devinterp 2.0.1's own
`compute_llc`, devinterp 1.x's `LLCEstimator` / `OnlineLLCEstimator`
arithmetic replayed in torch, and NumPy float64 computations.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sgld_optax as so
from sgld_optax._src.llc import export
from sgld_optax._src.metrics import DOT_FIELDS, NORM_FIELDS, Metrics

az = pytest.importorskip("arviz")
xr = pytest.importorskip("xarray")

NBETA = 50.0
INIT_LOSS = 0.8


def _traces(num_chains=4, num_draws=300, seed=0):
    """AR(1) loss traces around chain-dependent levels, float32."""
    rng = np.random.default_rng(seed)
    x = np.zeros((num_chains, num_draws))
    eps = rng.normal(size=(num_chains, num_draws))
    for t in range(1, num_draws):
        x[:, t] = 0.8 * x[:, t - 1] + eps[:, t]
    levels = INIT_LOSS + 0.05 + 0.004 * np.arange(num_chains)
    return (levels[:, None] + 0.01 * x).astype(np.float32)


def _result(losses, *, failures=None, mala=None, metrics=None,
            num_params=None):
    """An `LLCResult` from loss traces, its fields computed in float64."""
    losses = np.asarray(losses, np.float32)
    num_chains = losses.shape[0]
    if failures is None:
        failures = [""] * num_chains
    failures = np.asarray(failures, dtype=str)
    diverged = failures != ""
    with np.errstate(invalid="ignore", over="ignore"):
        per_chain = NBETA * (losses.astype(np.float64).mean(axis=1)
                             - INIT_LOSS)
    per_chain = np.where(diverged, np.nan, per_chain)
    healthy = per_chain[~diverged]
    mean = float(healthy.mean()) if healthy.size else float("nan")
    std = float(healthy.std()) if healthy.size else float("nan")
    nan = float("nan")
    return so.LLCResult(
        llc_mean=mean, llc_std=std, llc_per_chain=per_chain,
        loss_trace=losses, init_loss=INIT_LOSS, nbeta=NBETA,
        diverged=diverged, rhat=nan, ess_bulk=nan, ess_tail=nan, mcse=nan,
        failures=failures, checks=(), mala_acceptance=mala, metrics=metrics,
        num_params=num_params)


def _metrics(num_chains, num_steps, seed=1):
    rng = np.random.default_rng(seed)
    fields = {name: rng.uniform(size=(num_chains, num_steps)).astype(
        np.float32) for name in NORM_FIELDS + DOT_FIELDS}
    return Metrics(**fields, numel=np.full((num_chains, num_steps), 7,
                                           np.int32))


def _blown_up(losses, chain=2, start=100):
    """`losses` with `chain` blown up to 1e34 from draw `start` on."""
    bad = losses.copy()
    bad[chain, start:] = 1e34
    failures = [""] * losses.shape[0]
    failures[chain] = f"blow-up: loss 1e+34 above the bound 9.0 at step {start}"
    return bad, failures


# ---------------------------------------------------------------------------
# to_arviz


def test_to_arviz_groups_dims_coords_and_values():
    losses = _traces(num_chains=3, num_draws=40)
    rng = np.random.default_rng(2)
    mala = rng.uniform(size=(3, 40))
    metrics = _metrics(3, 55)
    result = _result(losses, mala=mala, metrics=metrics, num_params=7)
    idata = result.to_arviz()

    assert set(idata.groups()) == {"posterior", "sample_stats",
                                   "sampler_metrics"}
    post = idata.posterior
    for name in ("llc", "loss"):
        assert post[name].dims == ("chain", "draw")
        assert post[name].shape == (3, 40)
    np.testing.assert_array_equal(post.chain.values, [0, 1, 2])
    np.testing.assert_array_equal(post.draw.values, np.arange(40))
    # The per-draw LLC, by hand in float64.
    expect = NBETA * (losses.astype(np.float64) - INIT_LOSS)
    np.testing.assert_allclose(post.llc.values, expect, rtol=1e-14)
    assert post.llc.dtype == np.float64
    np.testing.assert_array_equal(post.loss.values, losses)
    # Its mean per chain is llc_per_chain, over all the chains llc_mean.
    np.testing.assert_allclose(post.llc.mean("draw").values,
                               result.llc_per_chain, rtol=1e-12)

    stats = idata.sample_stats
    assert stats.mala_acceptance.dims == ("chain", "draw")
    np.testing.assert_array_equal(stats.mala_acceptance.values, mala)

    met = idata.sampler_metrics
    assert set(met.data_vars) == set(NORM_FIELDS + DOT_FIELDS)
    for name in NORM_FIELDS + DOT_FIELDS:
        assert met[name].dims == ("chain", "step")
        np.testing.assert_array_equal(met[name].values,
                                      getattr(metrics, name))
    np.testing.assert_array_equal(met.step.values, np.arange(55))

    for group in (post, stats, met):
        assert group.attrs["nbeta"] == NBETA
        assert group.attrs["init_loss"] == INIT_LOSS
        assert list(group.attrs["failures"]) == ["", "", ""]
        assert group.attrs["num_params"] == 7
        assert group.attrs["inference_library"] == "sgld_optax"


def test_to_arviz_leaves_out_what_was_not_recorded():
    idata = export.to_arviz(_result(_traces(num_chains=2, num_draws=20)))
    assert set(idata.groups()) == {"posterior"}


def test_to_arviz_diagnostics_equal_arviz_on_the_raw_arrays():
    losses = _traces()
    result = _result(losses)
    idata = result.to_arviz()
    raw = NBETA * (losses.astype(np.float64) - INIT_LOSS)

    rhat = float(az.rhat(idata, var_names=["llc"])["llc"])
    assert rhat == pytest.approx(float(az.rhat(raw)), rel=1e-12)
    for method in ("bulk", "tail"):
        ess = float(az.ess(idata, var_names=["llc"], method=method)["llc"])
        assert ess == pytest.approx(float(az.ess(raw, method=method)),
                                    rel=1e-12)
    mcse = float(az.mcse(idata, var_names=["llc"])["llc"])
    assert mcse == pytest.approx(float(az.mcse(raw)), rel=1e-12)

    summary = az.summary(idata, round_to="none")
    assert list(summary.index) == ["llc", "loss"]
    assert summary.loc["llc", "mean"] == pytest.approx(result.llc_mean,
                                                       rel=1e-12)
    assert summary.loc["llc", "r_hat"] == pytest.approx(rhat, rel=1e-12)
    assert summary.loc["loss", "mean"] == pytest.approx(
        losses.astype(np.float64).mean(), rel=1e-6)


def test_to_arviz_leaves_out_failed_chains_unless_asked():
    losses, failures = _blown_up(_traces())
    result = _result(losses, failures=failures,
                     mala=np.full(losses.shape, 0.9))
    idata = result.to_arviz()
    np.testing.assert_array_equal(idata.posterior.chain.values, [0, 1, 3])
    np.testing.assert_array_equal(idata.sample_stats.chain.values,
                                  [0, 1, 3])
    assert idata.posterior.attrs["failed_chains"] == [2]
    assert idata.posterior.attrs["failures"][2] == failures[2]
    raw = NBETA * (losses[[0, 1, 3]].astype(np.float64) - INIT_LOSS)
    assert float(az.rhat(idata, var_names=["llc"])["llc"]) == pytest.approx(
        float(az.rhat(raw)), rel=1e-12)
    summary = az.summary(idata, var_names=["llc"], round_to="none")
    assert summary.loc["llc", "mean"] == pytest.approx(result.llc_mean,
                                                       rel=1e-12)

    everything = export.to_arviz(result, include_failed=True)
    np.testing.assert_array_equal(everything.posterior.chain.values,
                                  [0, 1, 2, 3])
    np.testing.assert_array_equal(everything.posterior.loss.values, losses)


def test_to_arviz_with_every_chain_failed():
    losses = _traces(num_chains=2, num_draws=20)
    losses[:, 5:] = np.nan
    result = _result(losses, failures=["non-finite loss at step 5"] * 2)
    with pytest.raises(ValueError, match="include_failed=True"):
        result.to_arviz()
    idata = export.to_arviz(result, include_failed=True)
    assert idata.posterior.llc.shape == (2, 20)


def test_to_arviz_without_arviz_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "arviz", None)
    with pytest.raises(ImportError, match=r"pip install sgld_optax\[arviz\]"):
        _result(_traces(num_chains=2, num_draws=10)).to_arviz()


# ---------------------------------------------------------------------------
# to_devinterp


def _devinterp_1x(losses, init_loss, nbeta):
    """devinterp 1.3.2's `LLCEstimator.finalize` / `get_results` and
    `OnlineLLCEstimator.update` / `finalize` / `get_results`, replayed on
    the traces in torch (float32 as there)."""
    torch = pytest.importorskip("torch")
    t = torch.tensor(np.asarray(losses, np.float32))
    nbeta_t = torch.tensor(nbeta, dtype=torch.float32)
    llc_per_chain = nbeta_t * (t.mean(axis=1) - init_loss)
    llcs = nbeta_t * (t - init_loss)
    out = {
        "llc/mean": llc_per_chain.mean().numpy().item(),
        "llc/std": llc_per_chain.std().numpy().item(),
        **{f"llc-chain/{i}": llc_per_chain[i].numpy().item()
           for i in range(t.shape[0])},
        "loss/trace": t.numpy(),
        "init_loss": init_loss,
        "llc/means": llcs.mean(dim=0).numpy(),
        "llc/stds": llcs.std(dim=0).numpy(),
        "llc/trace": llcs.numpy(),
    }
    return out


def _devinterp_compute_llc():
    """devinterp 2.0.1's `devinterp.slt.llc.compute_llc`.

    Its module imports the sampling stack (`datasets`, `zarr`), which
    `compute_llc` itself does not use; where that stack is missing, the
    function is compiled alone from devinterp's installed source."""
    pytest.importorskip("devinterp")
    try:
        from devinterp.slt.llc import compute_llc
        return compute_llc
    except ImportError:
        pass
    spec = importlib.util.find_spec("devinterp.slt")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "llc.py"
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef)
                and n.name == "compute_llc")
    namespace = {"xr": xr}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path),
                 "exec"), namespace)
    return namespace["compute_llc"]


def _devinterp_samples(losses, init_loss, nbeta):
    """The sampling `DataTree` devinterp 2.0.1's `sample` writes, holding
    `losses` as its per-step losses (one example, one token per step)."""
    losses = np.asarray(losses, np.float32)
    num_chains = losses.shape[0]
    ds = xr.Dataset(
        {"sampling_loss_micro": (("chain", "step", "batch_sampling",
                                  "token_pos"), losses[:, :, None, None]),
         "init_loss": (("chain", "token_pos"),
                       np.full((num_chains, 1), init_loss))},
        attrs={"metadata": {"config": {"sampler": {"n_beta": nbeta}}}})
    return xr.DataTree(ds)


def _close(ours, theirs, scale):
    """float32 arithmetic on their side: agreement to 1e-6 of `scale`."""
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6 * scale)


def test_to_devinterp_matches_devinterp_1x_results():
    losses = _traces()
    result = _result(losses)
    ours = result.to_devinterp()
    theirs = _devinterp_1x(losses, INIT_LOSS, NBETA)
    scale = NBETA * float(np.abs(losses).max())
    for key, value in theirs.items():
        _close(ours[key], value, scale)
    np.testing.assert_array_equal(ours["loss/trace"], losses)
    assert ours["loss/trace"].dtype == np.float32
    # Every name is the result's own value, with 1.x's ddof=1 std.
    assert ours["llc/mean"] == result.llc_mean
    assert ours["init_loss"] == result.init_loss
    for i in range(result.num_chains):
        assert ours[f"llc-chain/{i}"] == result.llc_per_chain[i]
    assert ours["llc/std"] == pytest.approx(
        np.std(result.llc_per_chain, ddof=1), rel=1e-12)
    assert not [k for k in ours if k.startswith("mala_accept/")]


def test_to_devinterp_matches_devinterp_2_compute_llc():
    compute_llc = _devinterp_compute_llc()
    losses = _traces()
    result = _result(losses)
    ours = result.to_devinterp()
    theirs = compute_llc(_devinterp_samples(losses, INIT_LOSS, NBETA))
    scale = NBETA * float(np.abs(losses).max())
    for key in ("llc_mean", "llc_std", "llc_per_chain", "llc_scalar",
                "loss_trace", "init_loss"):
        assert np.shape(ours[key]) == theirs[key].shape, key
        _close(ours[key], theirs[key].values, scale)
    assert theirs["loss_trace"].dims == ("chain", "step")
    assert ours["llc_mean"] == result.llc_mean
    assert ours["llc_std"] == result.llc_std
    np.testing.assert_array_equal(ours["llc_per_chain"], result.llc_per_chain)
    np.testing.assert_array_equal(ours["loss_trace"], losses)


def test_to_devinterp_summaries_skip_failed_chains():
    losses, failures = _blown_up(_traces())
    mala = np.random.default_rng(3).uniform(size=losses.shape)
    result = _result(losses, failures=failures, mala=mala)
    ours = result.to_devinterp()
    keep = [0, 1, 3]
    scale = NBETA * float(np.abs(losses[keep]).max())
    # devinterp on the healthy chains alone gives the summaries.
    theirs_1x = _devinterp_1x(losses[keep], INIT_LOSS, NBETA)
    for key in ("llc/mean", "llc/std", "llc/means", "llc/stds"):
        _close(ours[key], theirs_1x[key], scale)
    theirs_2 = _devinterp_compute_llc()(
        _devinterp_samples(losses[keep], INIT_LOSS, NBETA))
    for key in ("llc_mean", "llc_std", "llc_scalar"):
        _close(ours[key], theirs_2[key].values, scale)
    # Per-chain entries keep every chain; the failed one is NaN.
    assert np.isnan(ours["llc-chain/2"]) and np.isnan(ours["llc_per_chain"][2])
    assert ours["llc_per_chain"].shape == (4,)
    np.testing.assert_array_equal(ours["loss/trace"], losses)
    # MALA acceptance as devinterp 1.x's MalaAcceptanceRate names it.
    np.testing.assert_array_equal(ours["mala_accept/trace"], mala)
    assert ours["mala_accept/mean"] == pytest.approx(mala[keep].mean(),
                                                     rel=1e-12)
    assert ours["mala_accept/std"] == pytest.approx(mala[keep].std(),
                                                    rel=1e-12)


def test_to_devinterp_with_one_healthy_chain_has_nan_sample_stds():
    losses, failures = _blown_up(_traces(num_chains=2), chain=1)
    ours = _result(losses, failures=failures).to_devinterp()
    assert np.isnan(ours["llc/std"]) and np.isnan(ours["llc/stds"]).all()
    assert ours["llc_std"] == 0.0
    assert ours["llc/mean"] == ours["llc-chain/0"]


# ---------------------------------------------------------------------------
# plot


def _axes_by_title(fig):
    return {ax.get_title().split(" (")[0]: ax for ax in fig.axes}


def _legend_texts(fig):
    return [t.get_text() for ax in fig.axes if ax.get_legend()
            for t in ax.get_legend().get_texts()]


def test_plot_scales_to_the_healthy_chains_and_names_the_failed(tmp_path):
    losses, failures = _blown_up(_traces())
    result = _result(losses, failures=failures)
    path = tmp_path / "llc.png"
    fig = result.plot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    axes = _axes_by_title(fig)
    assert set(axes) == {"loss traces", "running LLC per chain"}
    healthy = losses[[0, 1, 3]].astype(np.float64)
    lo, hi = axes["loss traces"].get_ylim()
    assert lo <= min(healthy.min(), INIT_LOSS) and hi >= healthy.max()
    assert hi - lo < 1.2 * (healthy.max() - min(healthy.min(), INIT_LOSS))
    # The running LLC, by hand; its axis spans the healthy chains only.
    running = NBETA * (np.cumsum(healthy, axis=1)
                       / np.arange(1, losses.shape[1] + 1) - INIT_LOSS)
    lo, hi = axes["running LLC per chain"].get_ylim()
    assert lo <= running.min() and hi >= running.max()
    assert hi - lo < 1.2 * (running.max() - running.min())
    lines = axes["running LLC per chain"].lines
    for c, row in zip([0, 1, 3], running):
        np.testing.assert_allclose(lines[c].get_ydata(), row, rtol=1e-10)
    # The failed chain is drawn, clipped near the axes, and named.
    failed_line = axes["loss traces"].lines[2]
    assert failed_line.get_linestyle() == "--"
    assert np.nanmax(failed_line.get_ydata()) < 10
    texts = _legend_texts(fig)
    assert "chain 2: failed" in texts and "chain 0" in texts
    title = fig._suptitle.get_text()
    assert "3 of 4 chains" in title
    assert "chain 2 (blow-up: loss 1e+34" in title


def test_plot_shows_mala_acceptance_only_when_recorded():
    losses = _traces(num_chains=2, num_draws=50)
    fig = _result(losses).plot()
    assert len(fig.axes) == 2
    assert not any("MALA" in ax.get_title() for ax in fig.axes)

    mala = np.random.default_rng(4).uniform(0.5, 1.0, size=(2, 50))
    fig = _result(losses, mala=mala).plot()
    assert len(fig.axes) == 3
    ax = _axes_by_title(fig)["MALA acceptance probability"]
    assert f"mean {mala.mean():.3f}" in ax.get_title()
    for c in range(2):
        np.testing.assert_array_equal(ax.lines[c].get_ydata(), mala[c])


def test_plot_with_every_chain_failed(tmp_path):
    losses = _traces(num_chains=2, num_draws=30)
    losses[:, 10:] = 1e34
    losses[1, 20:] = np.inf
    result = _result(losses, failures=["blow-up at step 10"] * 2)
    path = tmp_path / "failed.png"
    fig = result.plot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "every chain failed" in fig._suptitle.get_text()
    assert all(ax.get_yscale() == "symlog" for ax in fig.axes)
    lo, hi = _axes_by_title(fig)["loss traces"].get_ylim()
    assert lo <= losses.min() and hi >= 1e34


# ---------------------------------------------------------------------------
# A real run, end to end.


def test_estimate_llc_result_exports():
    x = jax.random.normal(jax.random.key(0), (256, 3))
    w_true = jnp.array([1.0, -2.0, 0.5])
    y = x @ w_true + 0.1 * jax.random.normal(jax.random.key(1), (256,))

    def loss_fn(w, batch):
        xb, yb = batch
        return 0.5 * jnp.mean((xb @ w - yb) ** 2)

    w_star = jnp.linalg.lstsq(x, y)[0]
    result = so.estimate_llc(loss_fn, w_star, (x, y), key=0,
                             learning_rate=1e-3, nbeta=20.0, num_chains=3,
                             num_draws=60, num_burnin_steps=10,
                             save_metrics=True, mala=True, progress=False)
    idata = result.to_arviz()
    assert set(idata.groups()) == {"posterior", "sample_stats",
                                   "sampler_metrics"}
    np.testing.assert_array_equal(idata.sample_stats.mala_acceptance.values,
                                  result.mala_acceptance)
    llc = result.nbeta * (result.loss_trace.astype(np.float64)
                          - result.init_loss)
    np.testing.assert_allclose(idata.posterior.llc.values, llc, rtol=1e-12)
    assert idata.sampler_metrics.noise.shape == (3, 70)
    summary = az.summary(idata, var_names=["llc"], round_to="none")
    assert summary.loc["llc", "mean"] == pytest.approx(result.llc_mean,
                                                       rel=1e-9)
    # The result's diagnostics are ArviZ's on the per-draw LLC.
    assert result.rhat == pytest.approx(summary.loc["llc", "r_hat"],
                                        rel=1e-6)
    assert result.ess_bulk == pytest.approx(summary.loc["llc", "ess_bulk"],
                                            rel=1e-6)
    assert result.ess_tail == pytest.approx(summary.loc["llc", "ess_tail"],
                                            rel=1e-6)
    assert result.mcse == pytest.approx(summary.loc["llc", "mcse_mean"],
                                        rel=1e-6)
    ours = result.to_devinterp()
    assert ours["llc/mean"] == result.llc_mean
    np.testing.assert_array_equal(ours["loss_trace"], result.loss_trace)
    np.testing.assert_array_equal(ours["mala_accept/trace"],
                                  result.mala_acceptance)
    fig = result.plot()
    assert len(fig.axes) == 3
