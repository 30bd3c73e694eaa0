"""Tests for LLC estimation (``_src/llc/``).

The accuracy tests compare against learning coefficients known in closed
form, under the conditions in which the estimator is consistent:

* regular linear regression, ``lambda = d / 2``: the weights are the
  least-squares fit (the empirical minimiser), so nothing drifts downhill;
* noiseless regular linear regression, full batch, for several samplers:
  the loss is exactly quadratic, so the discrete chain's stationary
  expectation (``d / 2`` inflated by the finite step) is known in closed
  form;
* deep linear networks, Aoyagi's ``lambda``: noiseless data, so the empirical
  minimisers are exactly the true parameters; ``w*`` is a deepest true
  parameter (the origin for rank 0, every layer of rank exactly ``r``
  otherwise); multiplicity-1 cases only, so the ``(m - 1) / log(nbeta)`` bias
  is absent; ``nbeta = 1e4`` with a step size small enough against the
  posterior's curvature, and a localization (10) weak against ``nbeta`` so
  that the singular directions are not cut off.
"""

import functools
import importlib.util
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import linalg
from scipy import stats

import sgld_optax as so
from sgld_optax._src import diagnostics
from sgld_optax._src.llc import data as llc_data

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


def _minibatch_regression(noise_variance):
    """Noiseless regression y = x W with 8 x 4 weights (lambda = d / 2 = 16)
    in minibatches of 200 of n = 2000, nbeta = n / log n; and the LLC the
    discrete chain has (stationary_llc, below)."""
    n, d_in, d_out = 2000, 8, 4
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d_in)).astype(np.float32)
    w_true = rng.normal(size=(d_in, d_out)).astype(np.float32)
    nbeta, lr = n / math.log(n), 4e-4
    precisions = nbeta * np.linalg.eigvalsh(
        x.astype(np.float64).T @ x.astype(np.float64) / n)
    truth = d_out * stationary_llc(precisions, lr)
    data = (jnp.asarray(x), jnp.asarray(x @ w_true))
    result = so.estimate_llc(
        linreg_loss, jnp.asarray(w_true), data, key=0, learning_rate=lr,
        nbeta=nbeta, num_chains=8, num_draws=10000,
        num_burnin_steps=300, batch_size=200, progress=False,
        noise_level=math.sqrt(noise_variance))
    return result, truth


# With noiseless data every minibatch's gradient vanishes at w*, so
# minibatches add no noise of their own there; the batch Hessians' spread
# around the full one adds about 0.1% (c d / 2b with c = eps nbeta p / 2 ~
# 0.05, d = 8, b = 200). The estimate's MCSE is 0.4%; a noise variance
# 5% off moves it by about 5%, beyond the 2% tolerance.
def test_regular_regression_in_minibatches_matches_the_discrete_chain():
    result, truth = _minibatch_regression(1.0)
    assert 1.0 < truth / 16 < 1.04  # d / 2, and the step's inflation
    assert result.init_loss < 1e-10
    assert result.llc_mean == pytest.approx(truth, rel=0.02)
    assert not result.diverged.any()
    assert result.rhat < 1.01


@pytest.mark.filterwarnings("ignore:noise_level")
@pytest.mark.parametrize("variance", [0.95, 1.05])
def test_minibatch_regression_fails_with_the_noise_variance_5_percent_off(
        variance):
    result, truth = _minibatch_regression(variance)
    assert result.llc_mean != pytest.approx(truth, rel=0.02)


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


def stationary_llc(precisions, step, friction=None):
    """E[nbeta (L(w) - L(w*))] of a discrete chain on a quadratic, in float64.

    Per mode of posterior precision p, the chain is linear with Gaussian
    noise: Langevin, w' = (1 - step p / 2) w + sqrt(step) eta; momentum with
    friction a, v' = (1 - a) v - (step p / 2) w + sqrt(a step) eta and
    w' = w + v'. Its stationary covariance solves a discrete Lyapunov
    equation, and the mode contributes p E[w^2] / 2.
    """
    total = 0.0
    for p in precisions:
        if friction is None:
            a_mat = np.array([[1 - step * p / 2]])
            b_vec = np.array([[math.sqrt(step)]])
        else:
            a = friction
            a_mat = np.array([[1 - step * p / 2, 1 - a],
                              [-step * p / 2, 1 - a]])
            b_vec = np.full((2, 1), math.sqrt(a * step))
        cov = linalg.solve_discrete_lyapunov(a_mat, b_vec @ b_vec.T)
        total += 0.5 * p * cov[0, 0]
    return total


# The runs with the noise variance scaled by 1.05 land more than 10% above
# d / 2 and are flagged as untrustworthy (tests/test_llc_trust.py tests that
# check).
@pytest.mark.filterwarnings("ignore:The LLC estimate:RuntimeWarning")
@pytest.mark.parametrize("sampler, options", [
    ("sgld", {}),
    ("rmsprop_sgld", {"eps": 0.1}),
    ("sghmc", {"momentum_decay": 0.3}),
])
def test_regular_regression_matches_the_discrete_chain(sampler, options):
    # Noiseless regression y = x W with 16 x 8 weights, full batch: the loss
    # is exactly quadratic, so lambda = d / 2 = 64 at any nbeta, and the
    # chain's stationary law is Gaussian with a covariance known in closed
    # form (stationary_llc), which adds the step size's inflation (5-8% here)
    # to d / 2. nbeta = 1e7 makes RMSprop's gradients O(1e-3) against
    # eps = 0.1, so that its preconditioner is 1 / eps to 0.3%. (Where it
    # follows the position, the missing correction term of preconditioned
    # SGLD biases the estimate upwards.) The estimate is linear in the noise
    # variance: scaled by 0.95 or 1.05, it leaves the 2% tolerance.
    n, d_in, d_out = 1000, 16, 8
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d_in)).astype(np.float32)
    w_true = rng.normal(size=(d_in, d_out)).astype(np.float32)
    data = (jnp.asarray(x), jnp.asarray(x @ w_true))
    x64 = x.astype(np.float64)
    nbeta = 1e7
    precisions = nbeta * np.linalg.eigvalsh(x64.T @ x64 / n)
    precond = 1 / options["eps"] if sampler == "rmsprop_sgld" else 1.0
    lr = 0.4 / (precond * precisions.max())  # step * p_max / 4 = 0.1
    truth = d_out * stationary_llc(precisions, lr * precond,
                                   options.get("momentum_decay"))
    assert 1.04 < truth / (d_in * d_out / 2) < 1.1  # the step's inflation

    def run(variance):
        return so.estimate_llc(
            linreg_loss, jnp.asarray(w_true), data, key=0, sampler=sampler,
            sampler_kwargs=options, learning_rate=lr, nbeta=nbeta,
            noise_level=math.sqrt(variance), num_chains=8, num_draws=1000,
            num_burnin_steps=100, batch_size=n, progress=False)

    result = run(1.0)
    assert result.init_loss < 1e-10
    assert result.llc_mean == pytest.approx(truth, rel=0.02)
    for variance in (0.95, 1.05):
        with pytest.warns(UserWarning, match="noise_level"):
            off = run(variance)
        assert off.llc_mean != pytest.approx(truth, rel=0.02)


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
    from sgld_optax._src.llc import api as llc
    assert jax.device_count() == 4, jax.devices()
    shardings = []
    original = llc._sample_in_memory
    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        shardings.append(len(out.losses.sharding.device_set))
        return out
    llc._sample_in_memory = spy
    def loss(w, batch):
        x, y = batch
        return 0.5 * jnp.mean(jnp.sum((x @ w - y) ** 2, axis=-1))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 3)).astype(np.float32)
    y = (x @ rng.normal(size=(3, 2)) + rng.normal(size=(300, 2))).astype(np.float32)
    w = jnp.asarray(np.linalg.lstsq(x, y, rcond=None)[0])
    traces = {}
    for sampler in ("sgld", "sgnht"):
        r = so.estimate_llc(loss, w, (x, y), key=5, sampler=sampler,
                            learning_rate=1e-3, nbeta=30.0, num_chains=8,
                            num_draws=400, batch_size=32, progress=False)
        traces[sampler] = r.loss_trace
    assert shardings == [4, 4], shardings
    np.savez(sys.argv[1], **traces)
""")


def test_four_devices_agree_with_one(tmp_path):
    # 8 chains over 4 (host) devices, 2 each, for SGLD and for SGNHT (whose
    # momentum and thermostat are sharded with the chains).
    script = tmp_path / "run.py"
    script.write_text(_DEVICE_SCRIPT)
    out = tmp_path / "traces.npz"
    env = {**os.environ,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(script), str(out)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    sharded = np.load(out)
    w, data = regression_problem(3, 2, 300, seed=1)
    for sampler in ("sgld", "sgnht"):
        local = so.estimate_llc(linreg_loss, w, data, key=5, sampler=sampler,
                                learning_rate=1e-3, nbeta=30.0, num_chains=8,
                                num_draws=400, batch_size=32,
                                progress=False).loss_trace
        # Same keys, same chains: the traces agree to rounding (exactly on
        # one CPU; to float32 rounding when the one device is a GPU).
        np.testing.assert_allclose(sharded[sampler], local, rtol=1e-5,
                                   atol=1e-6)


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


# ---------------------------------------------------------------------------
# Samplers.


SAMPLER_OPTIONS = {
    "sgld": {},
    "rmsprop_sgld": {"alpha": 0.9, "eps": 0.05},
    "sghmc": {"momentum_decay": 0.3},
    "sgnht": {"diffusion_factor": 0.05},
}


def hand_written_chains(name, options, hyper, params, mask, batch, key,
                        num_chains, num_steps):
    """Chain i of estimate_llc written out: the sampler `name` with key
    split(fold_in(key, i))[0], on the flat params, one full batch per step.

    Returns the loss before every step and the metrics after it, each
    (num_chains, num_steps).
    """
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    flat_mask = jax.flatten_util.ravel_pytree(mask)[0]
    factory = getattr(so, name)

    @jax.jit
    def chain(chain_key):
        tx = factory(hyper["learning_rate"], nbeta=hyper["nbeta"],
                     localization=hyper["localization"],
                     weight_decay=hyper["weight_decay"],
                     bounding_box_size=hyper["bounding_box_size"],
                     mask=flat_mask, save_metrics=True, key=chain_key,
                     **options)

        def step(carry, _):
            w, state = carry
            loss, grad = jax.value_and_grad(
                lambda w: affine_loss(unravel(w), batch))(w)
            updates, state = tx.update(grad, state, w)
            return ((optax.apply_updates(w, updates), state),
                    (loss, so.get_metrics(state)))

        _, out = jax.lax.scan(step, (flat, tx.init(flat)), length=num_steps)
        return out

    outs = [chain(jax.random.split(jax.random.fold_in(jax.random.key(key),
                                                      i))[0])
            for i in range(num_chains)]
    return jax.tree.map(lambda *xs: np.stack(xs), *outs)


@pytest.mark.parametrize("name", list(SAMPLER_OPTIONS))
def test_each_sampler_is_a_hand_written_loop_of_it(name):
    # Every term of the step (localization, weight decay, a bounding box and
    # a mask), on two leaves sampled as one flat vector; each chain carries
    # its own sampler state (square_avg, momentum, thermostat) across burn-in
    # and thinning. Full-batch steps, so that the minibatch order plays no
    # part: from memory with batch_size = n, and, for SGNHT (whose state has
    # the most fields), from a loader of one batch.
    params = {"w": SMALL_W, "b": jnp.asarray([0.1, -0.2], jnp.float32)}
    mask = {"w": jnp.arange(6).reshape(3, 2) % 3 != 0,
            "b": jnp.asarray([True, False])}
    hyper = dict(learning_rate=1e-3, nbeta=30.0, localization=2.0,
                 weight_decay=0.1, bounding_box_size=0.05)
    options = SAMPLER_OPTIONS[name]
    n = SMALL_DATA[0].shape[0]
    burnin, every, draws, chains = 4, 2, 15, 3
    losses, metrics = hand_written_chains(
        name, options, hyper, params, mask, SMALL_DATA, key=5,
        num_chains=chains, num_steps=burnin + every * draws)
    kwargs = dict(key=5, sampler_kwargs=options, mask=mask,
                  num_chains=chains, num_draws=draws,
                  num_burnin_steps=burnin, num_steps_bw_draws=every,
                  save_metrics=True, progress=False, **hyper)
    results = [so.estimate_llc(affine_loss, params, SMALL_DATA, sampler=name,
                               batch_size=n, **kwargs)]
    if name == "sgnht":
        results.append(so.estimate_llc(
            affine_loss, params, _Loader(SMALL_DATA, batch_size=n),
            sampler=name, **kwargs))
    for result in results:
        np.testing.assert_allclose(result.loss_trace,
                                   losses[:, burnin::every], rtol=1e-5)
        for field, got, want in zip(so.Metrics._fields, result.metrics,
                                    metrics):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7,
                                       err_msg=field)
        assert np.all(result.metrics.distance[:, -1] > 0)  # they moved


def test_sampler_options_are_traced_and_the_rest_is_static():
    traces = []

    def counting_loss(w, batch):
        traces.append(batch[0].shape[0])
        return linreg_loss(w, batch)

    def run(sampler, sampler_kwargs=None):
        return so.estimate_llc(counting_loss, SMALL_W, SMALL_DATA, key=0,
                               sampler=sampler, sampler_kwargs=sampler_kwargs,
                               learning_rate=1e-3, nbeta=30.0, num_chains=2,
                               num_draws=20, batch_size=16, progress=False)

    # Float options are arguments of the compiled program: changing them
    # changes the chains and compiles nothing, by name or with a factory.
    for sampler, first, second in [
            ("rmsprop_sgld", {"alpha": 0.9, "eps": 0.1},
             {"alpha": 0.5, "eps": 0.02}),
            (so.sghmc, {"momentum_decay": 0.1}, {"momentum_decay": 0.6}),
            ("sgnht", {"diffusion_factor": 0.01}, {"diffusion_factor": 0.2})]:
        a = run(sampler, first)
        count = len(traces)
        b = run(sampler, second)
        assert len(traces) == count, sampler
        assert not np.allclose(a.loss_trace, b.loss_trace), sampler
    # Other options are part of the cache key: they compile anew.
    a = run("rmsprop_sgld", {"alpha": 0.9, "eps": 0.1})
    count = len(traces)
    c = run("rmsprop_sgld", {"alpha": 0.9, "eps": 0.1,
                             "bias_correction": True})
    assert len(traces) > count
    assert not np.allclose(a.loss_trace, c.loss_trace)
    # So is the factory, options bound in it included: the same object
    # reuses the program, another compiles anew.
    factory = functools.partial(so.rmsprop_sgld, alpha=0.9, eps=0.1)
    d = run(factory)
    count = len(traces)
    run(factory)
    assert len(traces) == count
    np.testing.assert_allclose(d.loss_trace, a.loss_trace, rtol=1e-6)
    e = run(functools.partial(so.rmsprop_sgld, alpha=0.5, eps=0.1))
    assert len(traces) > count
    assert not np.allclose(d.loss_trace, e.loss_trace)


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match="sampler must be one of 'sgld', "
                       "'rmsprop_sgld', 'sghmc', 'sgnht'.*'sgdl'"):
        small_run(sampler="sgdl")
    with pytest.raises(TypeError, match="sampler must be a name"):
        small_run(sampler=3)
    with pytest.raises(TypeError, match="sampler_kwargs must be a dict"):
        small_run(sampler_kwargs=[("alpha", 0.9)])
    with pytest.raises(ValueError, match=r"sampler_kwargs\['nbeta'\].*pass "
                       "nbeta= to estimate_llc"):
        small_run(sampler_kwargs={"nbeta": 3.0})
    with pytest.raises(ValueError, match=r"sampler_kwargs\['key'\]"):
        small_run(sampler="sghmc", sampler_kwargs={"key": 1})
    with pytest.raises(TypeError, match="'sgld' cannot take.*alpha"):
        small_run(sampler_kwargs={"alpha": 0.9})
    # The sampler's own checks, on the values, before compiling.
    with pytest.raises(ValueError, match="alpha must be < 1"):
        small_run(sampler="rmsprop_sgld", sampler_kwargs={"alpha": 1.5})
    with pytest.raises(ValueError, match="momentum_decay"):
        small_run(sampler="sghmc", sampler_kwargs={"momentum_decay": 0.0})
    with pytest.raises(ValueError, match="diffusion_factor"):
        small_run(sampler="sgnht", sampler_kwargs={"diffusion_factor": -1.0})
    with pytest.raises(TypeError, match=r"sampler_kwargs\['priors'\].*"
                       "hashable"):
        small_run(sampler_kwargs={"priors": [so.GaussianPrior(1.0)]})
    with pytest.raises(TypeError, match="one of the samplers so.sgld"):
        small_run(sampler=lambda learning_rate, **kwargs: optax.sgd(
            learning_rate))


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
    # The diagnostics are those of the per-draw LLC nbeta (L_t - L_n(w*)).
    draws = result.nbeta * (result.loss_trace.astype(np.float64)
                            - result.init_loss)
    assert result.rhat == pytest.approx(float(so.split_rhat(draws)), rel=1e-6)
    for kind in ("bulk", "tail"):
        assert getattr(result, f"ess_{kind}") == pytest.approx(
            float(so.effective_sample_size(draws, kind=kind)), rel=1e-6)
    assert result.ess == result.ess_bulk
    assert result.mcse == pytest.approx(float(diagnostics.mcse_mean(draws)),
                                        rel=1e-6)
    assert result.metrics is None and result.mala_acceptance is None
    assert result.diverged.dtype == bool and not result.diverged.any()
    assert list(result.failures) == ["", "", ""]
    assert result.num_params == SMALL_W.size


def test_huge_step_size_is_flagged():
    with pytest.warns(RuntimeWarning, match=r"3 of 3 chains diverged.*\[0, 1, 2\]"):
        result = small_run(learning_rate=1e3)
    assert result.diverged.all() and all(result.failures)
    assert math.isnan(result.llc_mean) and np.isnan(result.llc_per_chain).all()
    text = result.summary()
    for c in range(3):
        assert f"{c}: {result.failures[c]}" in text


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
    draws = result.nbeta * (result.loss_trace[good].astype(np.float64)
                            - result.init_loss)
    assert result.rhat == pytest.approx(float(so.split_rhat(draws)), rel=1e-6)


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


@pytest.mark.filterwarnings("ignore:noise_level")
@pytest.mark.parametrize("noise_variance, matches",
                         [(1.0, True), (0.95, False), (1.05, False)])
def test_noise_power_is_lr_times_numel(noise_variance, matches):
    """The mean squared norm of the noise metric is lr * numel, within 2.5%:
    over 3 x 4000 draws of chi-squared with 6 degrees of freedom its
    standard error is 0.53%, so a right run passes and one whose noise
    variance is 5% off fails, each by over four standard errors."""
    result = small_run(key=0, num_draws=4000, save_metrics=True,
                       localization=5.0, weight_decay=0.5,
                       noise_level=math.sqrt(noise_variance))
    power = np.mean(np.square(result.metrics.noise))
    assert (abs(power / (1e-3 * SMALL_W.size) - 1) <= 0.025) == matches


def test_metrics_traces_follow_the_hyperparameters():
    result = small_run(key=0, num_draws=200, save_metrics=True,
                       localization=5.0, weight_decay=0.5)
    m = result.metrics
    assert isinstance(m, so.Metrics)
    assert m.scaled_grad.shape == (3, 200)
    numel = SMALL_W.size
    np.testing.assert_array_equal(m.numel, numel)
    # (The noise's norm: test_noise_power_is_lr_times_numel.)
    assert np.all(m.noise > 0)
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
    capsys.readouterr()
    result = small_run(key=0, num_draws=200, progress=True)
    err = capsys.readouterr().err
    assert "LLC draws" in err and "200/200" in err
    # The bar is fed from inside the compiled loop and changes nothing.
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
    order = np.asarray(llc_data.shuffled_index(jax.random.key(n),
                                              jnp.arange(n), n))
    np.testing.assert_array_equal(np.sort(order), np.arange(n))


def test_shuffled_index_is_uniform_and_changes_with_the_key():
    n = 10
    keys = jax.random.split(jax.random.key(0), 20000)
    orders = np.asarray(jax.vmap(
        lambda k: llc_data.shuffled_index(k, jnp.arange(n), n))(keys))
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
