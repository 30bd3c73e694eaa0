"""Tests for LLC estimation (``_src/llc.py``).

The accuracy tests compare against learning coefficients known in closed
form, under the conditions in which the estimator is consistent:

* regular linear regression, ``lambda = d / 2``: the weights are the
  least-squares fit (the empirical minimiser), so nothing drifts downhill;
* deep linear networks, Aoyagi's ``lambda``: noiseless data, so the empirical
  minimisers are exactly the true parameters; ``w*`` is a deepest true
  parameter (the origin for rank 0, every layer of rank exactly ``r``
  otherwise); multiplicity-1 cases only, so the ``(m - 1) / log(nbeta)`` bias
  is absent; ``nbeta = 1e4`` with a step size small enough against the
  posterior's curvature, and a localization (10) weak against ``nbeta`` so
  that the singular directions are not cut off.
"""

import importlib.util
import math
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import sgld_optax as so
from sgld_optax._src import llc as llc_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load_example(name):
    spec = importlib.util.spec_from_file_location(
        name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The deep linear network problems and loss are the example's own.
llc_dln = _load_example("llc_dln")


# Module-level loss functions, so that tests sharing shapes and settings share
# compiled programs.
def linreg_loss(w, batch):
    x, y = batch
    return 0.5 * jnp.mean(jnp.sum((x @ w - y) ** 2, axis=-1))


def regression_problem(d_in, d_out, n, seed=0):
    """Well-specified regression y = x W + N(0, 1) and its least-squares fit."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in))
    y = x @ rng.normal(size=(d_in, d_out)) + rng.normal(size=(n, d_out))
    w_star = np.linalg.lstsq(x, y, rcond=None)[0]
    return (jnp.asarray(w_star, jnp.float32),
            (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))


SMALL_W, SMALL_DATA = regression_problem(3, 2, 300, seed=1)
SMALL = dict(learning_rate=1e-3, nbeta=30.0, num_chains=3, num_draws=60,
             batch_size=32, progress=False)


def small_run(**overrides):
    kwargs = {**SMALL, **overrides}
    return so.estimate_llc(linreg_loss, SMALL_W, SMALL_DATA, **kwargs)


# ---------------------------------------------------------------------------
# Accuracy against known learning coefficients.


def test_regular_regression_is_d_over_2():
    # d = 8 * 4 = 32 weights, lambda = 16. nbeta = n / log n, minibatches of
    # 200, step size 1e-4 (eps * nbeta * curvature / 4 ~ 0.007).
    n = 2000
    w_star, data = regression_problem(8, 4, n, seed=0)
    result = so.estimate_llc(
        linreg_loss, w_star, data, key=0, learning_rate=1e-4,
        nbeta=n / math.log(n), num_chains=4, num_draws=3000,
        num_burnin_steps=600, batch_size=200, progress=False)
    truth = so.regular_learning_coefficient(32).value
    assert result.llc_mean == pytest.approx(truth, rel=0.15)
    assert not result.diverged.any()
    assert result.rhat < 1.05


@pytest.mark.parametrize(
    "widths, rank",
    [([5, 4, 5], 0), ([4, 3, 8], 0), ([3, 3, 3], 1), ([5, 5, 5, 5], 2)],
)
def test_deep_linear_network_matches_aoyagi(widths, rank):
    truth = so.aoyagi_learning_coefficient(widths, rank)
    assert truth.multiplicity == 1
    weights, data = llc_dln.deepest_point(widths, rank)
    result = so.estimate_llc(
        llc_dln.dln_loss, weights, data, key=0, learning_rate=5e-5, nbeta=1e4,
        localization=10.0, num_chains=4, num_draws=4000,
        num_burnin_steps=1000, batch_size=256, progress=False)
    assert result.init_loss < 1e-10
    assert result.llc_mean == pytest.approx(truth.value, rel=0.25)


# ---------------------------------------------------------------------------
# Keys, chains and devices.


def test_same_key_reproduces_and_keys_differ():
    a = small_run(key=7)
    b = small_run(key=7)
    c = small_run(key=8)
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)
    assert a.llc_mean == b.llc_mean
    assert not np.array_equal(a.loss_trace, c.loss_trace)
    # Chains within a run differ from each other.
    assert len({tuple(row) for row in a.loss_trace}) == a.num_chains
    # An int seed, a typed key and a legacy key are the same key.
    d = small_run(key=jax.random.key(7))
    e = small_run(key=jax.random.PRNGKey(7))
    np.testing.assert_array_equal(a.loss_trace, d.loss_trace)
    np.testing.assert_array_equal(a.loss_trace, e.loss_trace)


def test_chain_draws_do_not_depend_on_num_chains():
    one = small_run(key=3, num_chains=1)
    three = small_run(key=3, num_chains=3)
    five = small_run(key=3, num_chains=5)
    np.testing.assert_array_equal(one.loss_trace[0], three.loss_trace[0])
    np.testing.assert_array_equal(three.loss_trace, five.loss_trace[:3])
    # The init loss uses no chain's randomness.
    assert one.init_loss == three.init_loss == five.init_loss


_DEVICE_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    import sgld_optax as so
    from sgld_optax._src import llc
    assert jax.device_count() == 4, jax.devices()
    shardings = []
    original = llc._sample_in_memory
    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        shardings.append(len(out[1].sharding.device_set))  # the losses
        return out
    llc._sample_in_memory = spy
    def loss(w, batch):
        x, y = batch
        return 0.5 * jnp.mean(jnp.sum((x @ w - y) ** 2, axis=-1))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 3)).astype(np.float32)
    y = (x @ rng.normal(size=(3, 2)) + rng.normal(size=(300, 2))).astype(np.float32)
    w = jnp.asarray(np.linalg.lstsq(x, y, rcond=None)[0])
    r = so.estimate_llc(loss, w, (x, y), key=5, learning_rate=1e-3, nbeta=30.0,
                        num_chains=8, num_draws=400, batch_size=32,
                        native_cpu=sys.argv[2] == "native", progress=False)
    assert shardings == [4], shardings
    np.save(sys.argv[1], r.loss_trace)
""")


@pytest.mark.parametrize("native", [False, True])
def test_four_devices_agree_with_one(tmp_path, native):
    script = tmp_path / "run.py"
    script.write_text(_DEVICE_SCRIPT)
    out = tmp_path / "trace.npy"
    dump = tmp_path / "hlo"
    env = {**os.environ,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"
                        f" --xla_dump_to={dump} --xla_dump_hlo_as_text",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(script), str(out),
                           "native" if native else "xla"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    if native:
        # Each device steps its own 2 of the 8 chains in one kernel call;
        # nothing is gathered across devices.
        programs = [f.read_text() for f in
                    dump.glob("*_sample_in_memory*after_optimizations.txt")]
        calls = [line for text in programs for line in text.splitlines()
                 if 'custom_call_target="sgld_optax_cpu_step"' in line]
        assert calls and all("f32[2,9]" in line for line in calls), calls
        assert not any("all-gather" in text for text in programs)
    sharded = np.load(out)
    w, data = regression_problem(3, 2, 300, seed=1)
    local = so.estimate_llc(linreg_loss, w, data, key=5, learning_rate=1e-3,
                            nbeta=30.0, num_chains=8, num_draws=400,
                            batch_size=32, progress=False).loss_trace
    # Same keys, same chains: the traces agree to rounding (exactly on one
    # CPU; to float32 rounding when the one device is a GPU or the chains
    # were stepped by the native kernel).
    np.testing.assert_allclose(sharded, local, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Compilation.


def test_second_call_reuses_the_compiled_loop():
    traces = []

    def counting_loss(w, batch):
        traces.append(batch[0].shape[0])
        return linreg_loss(w, batch)

    mask = jnp.ones_like(SMALL_W, bool)
    kwargs = dict(num_chains=2, num_draws=20, batch_size=16, progress=False)
    first = so.estimate_llc(counting_loss, SMALL_W, SMALL_DATA, key=0,
                            learning_rate=1e-3, nbeta=30.0,
                            bounding_box_size=1.0, mask=mask, **kwargs)
    after_first = len(traces)
    assert after_first > 0
    # The init loss over all n = 300 examples is evaluated in batches too.
    assert max(traces) <= 16
    second = so.estimate_llc(
        counting_loss, SMALL_W * 1.01, SMALL_DATA, key=1, learning_rate=2e-3,
        nbeta=50, localization=3.0, weight_decay=0.1, noise_level=1.0,
        bounding_box_size=0.5, mask=mask.at[0, 0].set(False), **kwargs)
    assert len(traces) == after_first
    assert not np.array_equal(first.loss_trace, second.loss_trace)
    # Streamed data: the step is compiled once for the whole run, and again
    # not for a second run.
    loader = _Loader(SMALL_DATA, batch_size=16)
    so.estimate_llc(counting_loss, SMALL_W, loader, key=0, learning_rate=1e-3,
                    nbeta=30.0, num_chains=2, num_draws=20, progress=False)
    after_stream = len(traces)
    so.estimate_llc(counting_loss, SMALL_W, loader, key=1, learning_rate=3e-3,
                    nbeta=20.0, num_chains=2, num_draws=20, progress=False)
    assert len(traces) == after_stream


@pytest.mark.parametrize("streamed", [False, True])
def test_compiled_with_the_compiler_options(monkeypatch, streamed):
    # estimate_llc compiles its programs with so.compiler_options(): an
    # option the compiler rejects makes it fail, and 512-bit vectors give the
    # same chains as none.
    data = _Loader(SMALL_DATA, batch_size=30) if streamed else SMALL_DATA
    kwargs = dict(key=2, learning_rate=1e-3, nbeta=30.0, num_chains=2,
                  num_draws=20, save_metrics=True, progress=False)
    if not streamed:
        kwargs["batch_size"] = 30

    def run(options):
        monkeypatch.setattr(llc_lib, "compiler_options",
                            lambda backend=None: dict(options))
        return so.estimate_llc(affine_loss, {"w": SMALL_W, "b": jnp.zeros(2)},
                               data, **kwargs)

    with pytest.raises(Exception, match="xla_cpu_no_such_option"):
        run({"xla_cpu_no_such_option": 1})
    plain = run({})
    wide = run({"xla_cpu_prefer_vector_width": 512})
    np.testing.assert_array_equal(wide.loss_trace, plain.loss_trace)
    assert wide.init_loss == plain.init_loss


# ---------------------------------------------------------------------------
# Results, divergence and diagnostics.


def test_result_fields_and_init_loss():
    # n = 300 is not a multiple of batch_size = 32: the init loss still
    # weighs every example once.
    result = small_run(key=0)
    x, y = (np.asarray(a, np.float64) for a in SMALL_DATA)
    w = np.asarray(SMALL_W, np.float64)
    expected = 0.5 * np.mean(np.sum((x @ w - y) ** 2, axis=-1))
    assert result.init_loss == pytest.approx(expected, rel=1e-5)
    assert result.loss_trace.shape == (3, 60)
    assert result.loss_trace.dtype == np.float32
    per_chain = result.nbeta * (result.loss_trace.astype(np.float64).mean(1)
                                - result.init_loss)
    np.testing.assert_allclose(result.llc_per_chain, per_chain, rtol=1e-12)
    assert result.llc_mean == pytest.approx(per_chain.mean(), rel=1e-12)
    assert result.llc_std == pytest.approx(per_chain.std(), rel=1e-12)
    np.testing.assert_allclose(result.llc_trace[:, -1], per_chain, rtol=1e-9)
    assert result.rhat == so.split_rhat(result.loss_trace)
    assert result.ess == so.effective_sample_size(result.loss_trace)
    assert result.metrics is None
    assert result.diverged.dtype == bool and not result.diverged.any()


def test_huge_step_size_is_flagged():
    with pytest.warns(RuntimeWarning, match=r"3 of 3 chains diverged.*\[0, 1, 2\]"):
        result = small_run(learning_rate=1e3)
    assert result.diverged.all()
    assert math.isnan(result.llc_mean) and np.isnan(result.llc_per_chain).all()
    assert "diverged chains: [0, 1, 2]" in result.summary()


def cliff_loss(w, batch):
    # A quadratic bowl whose loss is NaN beyond w > 0.3: a chain that wanders
    # there diverges, as with an overflow, and stays diverged.
    loss = 0.5 * jnp.mean((w - batch) ** 2)
    return jnp.where(w > 0.3, jnp.nan, loss)


def test_some_chains_diverge_and_the_others_count():
    data = jnp.zeros((64,))
    with pytest.warns(RuntimeWarning, match="chains diverged") as record:
        result = so.estimate_llc(cliff_loss, jnp.zeros(()), data, key=0,
                                 learning_rate=1e-2, nbeta=10.0,
                                 num_chains=8, num_draws=30, batch_size=8,
                                 progress=False)
    bad = np.flatnonzero(result.diverged).tolist()
    assert 0 < len(bad) < 8
    assert str(bad) in str(record[0].message)
    good = ~result.diverged
    assert np.all(np.isfinite(result.loss_trace[good]))
    assert np.all(np.isnan(result.llc_per_chain[result.diverged]))
    expected = result.nbeta * (result.loss_trace[good].astype(np.float64)
                               .mean(1) - result.init_loss)
    assert result.llc_mean == pytest.approx(expected.mean(), rel=1e-12)
    assert result.llc_std == pytest.approx(expected.std(), rel=1e-12)
    assert result.rhat == so.split_rhat(result.loss_trace[good])


def test_burnin_and_thinning_pick_the_right_steps():
    # The loss of draw d is the loss at step burnin + d * every, before that
    # step's update; the same chains run longer without burn-in or thinning.
    burnin, every, draws = 5, 3, 10
    thinned = small_run(key=2, num_burnin_steps=burnin,
                        num_steps_bw_draws=every, num_draws=draws,
                        save_metrics=True)
    flat = small_run(key=2, num_draws=burnin + every * draws,
                     save_metrics=True)
    np.testing.assert_array_equal(thinned.loss_trace,
                                  flat.loss_trace[:, burnin::every])
    # Metrics are per step, burn-in included.
    assert thinned.metrics.noise.shape == (3, burnin + every * draws)
    np.testing.assert_array_equal(thinned.metrics.noise, flat.metrics.noise)


def test_metrics_traces_follow_the_hyperparameters():
    result = small_run(key=0, num_draws=200, save_metrics=True,
                       localization=5.0, weight_decay=0.5)
    m = result.metrics
    assert isinstance(m, so.Metrics)
    assert m.scaled_grad.shape == (3, 200)
    numel = SMALL_W.size
    np.testing.assert_array_equal(m.numel, numel)
    # The noise norm is sqrt(lr * numel) on average.
    assert np.mean(m.noise) == pytest.approx(math.sqrt(1e-3 * numel), rel=0.1)
    assert np.all(m.localization[:, 1:] > 0) and np.all(m.weight_decay > 0)
    assert np.all(m.localization[:, 0] == 0)  # w = w* before the first step
    plain = small_run(key=0, num_draws=200, save_metrics=True)
    assert np.all(plain.metrics.localization == 0)
    assert np.all(plain.metrics.weight_decay == 0)


def test_mask_bounding_box_noise_level_and_schedule():
    # A mask that freezes everything: the chain stays at w*, so every draw's
    # full-batch loss is the init loss and the LLC is 0.
    n = SMALL_DATA[0].shape[0]
    frozen = so.estimate_llc(linreg_loss, SMALL_W, SMALL_DATA,
                             learning_rate=1e-3, nbeta=30.0, num_chains=2,
                             num_draws=10, batch_size=n, progress=False,
                             mask=jnp.zeros_like(SMALL_W, bool),
                             save_metrics=True)
    np.testing.assert_allclose(frozen.loss_trace, frozen.init_loss, rtol=1e-6)
    assert np.all(frozen.metrics.numel == 0)
    # Half the weights masked: the metrics count only the others.
    half = small_run(mask=jnp.arange(SMALL_W.size).reshape(SMALL_W.shape) % 2
                     == 0, save_metrics=True)
    assert np.all(half.metrics.numel == SMALL_W.size // 2)
    # The bounding box keeps every chain within b of w* coordinate-wise.
    boxed = small_run(bounding_box_size=1e-3, learning_rate=1e-2,
                      save_metrics=True)
    # (to float32 rounding of w* +/- b, with |w*| ~ 1)
    assert np.max(boxed.metrics.distance) <= 1e-3 * math.sqrt(SMALL_W.size) * (
        1 + 1e-3)
    free = small_run(learning_rate=1e-2, save_metrics=True)
    assert np.max(free.metrics.distance) > 1e-2
    # Without noise, full-batch SGLD from the exact minimiser stays there.
    with pytest.warns(UserWarning, match="noise_level"):
        quiet = so.estimate_llc(linreg_loss, SMALL_W, SMALL_DATA,
                                learning_rate=1e-3, nbeta=30.0, num_chains=2,
                                num_draws=10, batch_size=n, noise_level=0.0,
                                progress=False)
    assert abs(quiet.llc_mean) < 1e-3
    # A learning-rate schedule: a constant one gives the same chains.
    scheduled = small_run(key=4, learning_rate=optax.constant_schedule(1e-3))
    np.testing.assert_array_equal(scheduled.loss_trace,
                                  small_run(key=4).loss_trace)


def test_default_nbeta_is_from_the_batch_size():
    result = small_run(nbeta=None, batch_size=25)
    assert result.nbeta == so.default_nbeta(25)
    loader = _Loader(SMALL_DATA, batch_size=20)
    streamed = so.estimate_llc(linreg_loss, SMALL_W, loader,
                               learning_rate=1e-3, num_chains=2, num_draws=5,
                               progress=False)
    assert streamed.nbeta == so.default_nbeta(20)


def test_progress_bar(capsys):
    small_run(key=0, num_draws=200)  # compile without the bar
    start = time.perf_counter()
    small_run(key=0, num_draws=200)
    plain = time.perf_counter() - start
    small_run(key=0, num_draws=200, progress=True)  # compile with the bar
    capsys.readouterr()
    start = time.perf_counter()
    result = small_run(key=0, num_draws=200, progress=True)
    shown = time.perf_counter() - start
    err = capsys.readouterr().err
    assert "LLC draws" in err and "200/200" in err
    # The bar is fed about 20 times per run, from inside the compiled loop;
    # it costs next to nothing and changes nothing.
    assert shown < 2 * plain + 0.5
    np.testing.assert_array_equal(result.loss_trace,
                                  small_run(key=0, num_draws=200).loss_trace)


def test_summary_and_plot(tmp_path):
    result = small_run(key=0)
    text = result.summary()
    assert "LLC =" in text and "R-hat" in text and "ESS" in text
    assert "init loss" in text and "diverged chains: none" in text
    path = tmp_path / "trace.png"
    fig = result.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax_loss, ax_llc = fig.axes
    assert len(ax_loss.lines) == result.num_chains + 1  # + the init loss
    assert ax_loss.lines[-1].get_ydata()[0] == pytest.approx(result.init_loss)
    assert fig.axes[1].collections  # the per-chain LLC points
    assert result.plot() is not None


# ---------------------------------------------------------------------------
# Data from an iterable of batches.


class _Loader:
    """A minimal re-iterable loader with a ``batch_size``, like a DataLoader."""

    def __init__(self, data, batch_size):
        self.data, self.batch_size = data, batch_size

    def __iter__(self):
        n = self.data[0].shape[0]
        for i in range(0, n, self.batch_size):
            yield tuple(np.asarray(a[i:i + self.batch_size]) for a in self.data)


def test_torch_dataloader():
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    x, y = (torch.tensor(np.asarray(a)) for a in SMALL_DATA)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    result = so.estimate_llc(linreg_loss, SMALL_W, loader, learning_rate=1e-3,
                             nbeta=30.0, num_chains=3, num_draws=100,
                             num_burnin_steps=10, save_metrics=True,
                             progress=False)
    in_memory = small_run(num_draws=100)
    # The init loss is over the whole dataset (the short last batch counts).
    assert result.init_loss == pytest.approx(in_memory.init_loss, rel=1e-5)
    assert result.loss_trace.shape == (3, 100)
    assert result.metrics.noise.shape == (3, 110)
    assert np.all(np.isfinite(result.loss_trace))
    # Same sampler, different minibatch order: comparable estimates.
    assert abs(result.llc_mean - in_memory.llc_mean) < 4 * (
        result.llc_std + in_memory.llc_std + 0.1)


def test_streamed_chains_take_their_own_batches(capsys):
    loader = _Loader(SMALL_DATA, batch_size=30)
    result = so.estimate_llc(linreg_loss, SMALL_W, loader, key=0,
                             learning_rate=1e-3, nbeta=30.0, num_chains=2,
                             num_draws=10, progress=True)
    assert "10/10" in capsys.readouterr().err
    # With 10 batches per pass, step 0 gives chain 0 batch 0 and chain 1
    # batch 1, both at w*.
    batches = list(loader)
    for chain in range(2):
        expected = float(linreg_loss(SMALL_W, batches[chain]))
        assert result.loss_trace[chain, 0] == pytest.approx(expected, rel=1e-6)


def affine_loss(params, batch):
    x, y = batch
    pred = x @ params["w"] + params["b"]
    return 0.5 * jnp.mean(jnp.sum((pred - y) ** 2, axis=-1))


@pytest.mark.parametrize("streamed", [False, True])
def test_leaves_are_sampled_as_one_flat_vector(streamed):
    # Leaves of one dtype are sampled as their concatenation (ravel_pytree
    # order): the same run as a one-leaf problem over the flat vector, with
    # the mask flattened alike.
    params = {"w": SMALL_W, "b": jnp.asarray([0.1, -0.2], jnp.float32)}
    mask = {"w": jnp.arange(6).reshape(3, 2) % 2 == 0,
            "b": jnp.asarray([True, False])}
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    flat_mask = jnp.concatenate([mask["b"], mask["w"].ravel()])  # "b" < "w"
    data = _Loader(SMALL_DATA, batch_size=30) if streamed else SMALL_DATA
    kwargs = dict(key=3, learning_rate=1e-3, nbeta=30.0, num_chains=2,
                  num_draws=20, save_metrics=True, progress=False)
    if not streamed:
        kwargs["batch_size"] = 30
    tree = so.estimate_llc(affine_loss, params, data, mask=mask, **kwargs)
    one = so.estimate_llc(lambda w, batch: affine_loss(unravel(w), batch),
                          flat, data, mask=flat_mask, **kwargs)
    np.testing.assert_allclose(tree.loss_trace, one.loss_trace, rtol=1e-6)
    np.testing.assert_array_equal(tree.metrics.numel, one.metrics.numel)
    assert int(tree.metrics.numel[0, 0]) == 4


@pytest.mark.parametrize("streamed", [False, True])
def test_native_cpu_chains_are_the_default_chains_to_rounding(streamed):
    # The native kernel steps every chain in one call; the chains, their
    # metrics and the estimate agree with XLA's to float32 rounding, with a
    # mask, a bounding box and weight decay (every term of the update).
    params = {"w": SMALL_W, "b": jnp.asarray([0.1, -0.2], jnp.float32)}
    mask = {"w": jnp.arange(6).reshape(3, 2) % 3 != 0,
            "b": jnp.asarray([True, False])}
    data = _Loader(SMALL_DATA, batch_size=30) if streamed else SMALL_DATA
    kwargs = dict(key=4, learning_rate=1e-3, nbeta=30.0, localization=2.0,
                  weight_decay=0.1, bounding_box_size=0.5, mask=mask,
                  num_chains=3, num_draws=40, save_metrics=True,
                  progress=False)
    if not streamed:
        kwargs["batch_size"] = 30
    xla = so.estimate_llc(affine_loss, params, data, **kwargs)
    native = so.estimate_llc(affine_loss, params, data, native_cpu=True,
                             **kwargs)
    np.testing.assert_allclose(native.loss_trace, xla.loss_trace, rtol=1e-5)
    assert native.llc_mean == pytest.approx(xla.llc_mean, rel=1e-4)
    for a, b in zip(native.metrics, xla.metrics):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(native.metrics.numel, 5)
    # Not the same chains by accident: another key moves them.
    other = so.estimate_llc(affine_loss, params, data, native_cpu=True,
                            **dict(kwargs, key=5))
    assert not np.allclose(other.loss_trace, native.loss_trace)


def test_native_cpu_must_be_a_bool():
    with pytest.raises(TypeError, match="native_cpu"):
        small_run(key=0, native_cpu=1)


def test_mixed_dtype_leaves_are_sampled_leaf_by_leaf():
    params = {"w": SMALL_W, "b": jnp.asarray([0.1, -0.2], jnp.bfloat16)}

    def loss(p, batch):
        return affine_loss({"w": p["w"], "b": p["b"].astype(jnp.float32)},
                           batch)

    result = so.estimate_llc(loss, params, SMALL_DATA, key=0,
                             learning_rate=1e-3, nbeta=30.0, num_chains=2,
                             num_draws=20, batch_size=30, progress=False)
    assert np.all(np.isfinite(result.loss_trace))


# ---------------------------------------------------------------------------
# Bad input.


def test_bad_input_names_the_argument():
    x, y = SMALL_DATA
    with pytest.raises(ValueError, match="batch_size=301 .* n=300"):
        small_run(batch_size=301)
    with pytest.raises(ValueError, match=r"data leaves must share.*\[1\]: 299"):
        so.estimate_llc(linreg_loss, SMALL_W, (x, y[:299]), **SMALL)
    with pytest.raises(ValueError, match="loss_fn must return a floating-point "
                                         "scalar.*shape \\(32,\\)"):
        so.estimate_llc(lambda w, b: jnp.sum((b[0] @ w - b[1]) ** 2, -1),
                        SMALL_W, SMALL_DATA, **SMALL)
    with pytest.raises(ValueError, match="num_chains"):
        small_run(num_chains=0)
    with pytest.raises(ValueError, match="num_draws"):
        small_run(num_draws=0)
    with pytest.raises(ValueError, match="num_steps_bw_draws"):
        small_run(num_steps_bw_draws=0)
    with pytest.raises(ValueError, match="num_burnin_steps"):
        small_run(num_burnin_steps=-1)
    with pytest.raises(TypeError, match="batch_size"):
        small_run(batch_size=3.5)
    with pytest.raises(ValueError, match="learning_rate"):
        small_run(learning_rate=-1.0)
    with pytest.raises(ValueError, match="nbeta"):
        small_run(nbeta=0.0)
    with pytest.raises(TypeError, match="nbeta"):
        small_run(nbeta=optax.constant_schedule(1.0))
    with pytest.raises(ValueError, match="localization"):
        small_run(localization=-1.0)
    with pytest.raises(ValueError, match="mask"):
        small_run(mask=jnp.ones((2, 2), bool))
    with pytest.raises(TypeError, match="key"):
        small_run(key="seed")
    with pytest.raises(TypeError, match="progress"):
        small_run(progress=1)
    with pytest.raises(TypeError, match="data"):
        small_run_data = iter(_Loader(SMALL_DATA, 30))
        so.estimate_llc(linreg_loss, SMALL_W, small_run_data, **SMALL)
    with pytest.raises(TypeError, match="data"):
        so.estimate_llc(linreg_loss, SMALL_W, 3.0, **SMALL)
    with pytest.raises(ValueError, match="data"):
        so.estimate_llc(linreg_loss, SMALL_W, (x, jnp.zeros(())), **SMALL)


# ---------------------------------------------------------------------------
# Minibatch order.


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 100, 1000, 4097])
def test_shuffled_index_is_a_permutation(n):
    order = np.asarray(llc_lib.shuffled_index(jax.random.key(n),
                                              jnp.arange(n), n))
    np.testing.assert_array_equal(np.sort(order), np.arange(n))


def test_shuffled_index_is_uniform_and_changes_with_the_key():
    n = 10
    keys = jax.random.split(jax.random.key(0), 20000)
    orders = np.asarray(jax.vmap(
        lambda k: llc_lib.shuffled_index(k, jnp.arange(n), n))(keys))
    for position in (0, 4, 9):
        counts = np.bincount(orders[:, position], minlength=n)
        assert stats.chisquare(counts).pvalue > 1e-3
    assert len({tuple(o) for o in orders[:100]}) > 95


# ---------------------------------------------------------------------------
# Examples.


def test_llc_dln_example(tmp_path, capsys):
    rows = _load_example("llc_dln").main(
        out=str(tmp_path / "dln.png"), num_draws=400, cases=(((4, 3, 8), 0),))
    out = capsys.readouterr().out
    assert "Aoyagi" in out and (tmp_path / "dln.png").exists()
    (widths, rank, truth, estimate), = rows
    assert truth == 6.0 and np.isfinite(estimate)


def test_llc_mlp_example(capsys):
    results = _load_example("llc_mlp").main(train_steps=200, num_draws=100)
    out = capsys.readouterr().out
    assert "nnx" in out and "linen" in out
    assert set(results) == {"nnx", "linen"}
    for result in results.values():
        assert np.isfinite(result.llc_mean) and result.llc_mean > 0
