r"""The momentum and thermostat samplers, and RMSprop-SGLD, against oracles.

- `sghmc` and `sgnht` take, step after step, the updates of a float64 NumPy
  transcription of Chen, Fox & Guestrin (2014, eq. 15) and Ding et al.
  (2014, Algorithm 2) in the library's units, with the noise reconstructed
  from the state's key by `sgld_testing`'s reference:

  $$
  v \leftarrow (1 - \alpha) v - \tfrac{\epsilon}{2} m \odot \nabla U(w)
  + \sqrt{\alpha \epsilon}\, \sigma\, m \odot \eta, \qquad w \leftarrow w + v,
  $$

  with $\alpha$ the fixed friction (SGHMC) or the thermostat $\zeta$
  (SGNHT, $\sqrt{a\epsilon}$ in the noise, $\zeta \leftarrow \zeta +
  \|v\|^2/d - \sigma^2\epsilon/2$, starting at $a$).
- `sghmc` at `momentum_decay=1` takes `sgld`'s steps exactly.
- On a Gaussian target $U(w) = \tfrac12 \sum_i w_i^2 / s_i^2$ with exact
  gradients, many independent chains (one sample each, at the end) have the
  moments of the discretised chain: exact closed forms for the linear chains
  of SGLD and SGHMC; for SGNHT the closed form of the chain with the
  thermostat at its fixed point. The criterion resolves a 5% error in the
  noise variance, and fails for one.
- With Gaussian gradient noise of known variance, SGNHT's thermostat rises to
  absorb it and keeps the variance at the target, while SGHMC with the same
  friction (SGNHT with the thermostat disabled) heats up as its closed form
  says.
- `rmsprop_sgld`'s preconditioner against a float64 transcription.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import brentq

import sgld_optax as so
from sgld_testing import quiet_sgld_warnings, reference_step_noise

F32_EPS = 2.0**-24

# --------------------------------------------------------------------------
# A small model with two leaves and a nonlinear loss.

C = {"a": np.array([0.3, -0.5, 0.8]), "b": np.array([[0.2, -0.1], [0.4, 0.6]])}
W0 = {"a": np.array([0.5, -1.0, 0.25], np.float32),
      "b": np.array([[1.0, -0.3], [0.2, -0.7]], np.float32)}
MASK = {"a": np.array([True, False, True]),
        "b": np.array([[True, True], [False, True]])}


def quartic_loss(params):
    """$L(w) = \\sum (w^4/4 + c w)$ over both leaves."""
    return sum(jnp.sum(0.25 * params[k] ** 4 + C[k] * params[k])
               for k in ("a", "b"))


quartic_grad = jax.jit(jax.grad(quartic_loss))


def quartic_grad64(leaves):
    """The gradient of `quartic_loss` in float64, per leaf (flatten order)."""
    return [w**3 + c for w, c in zip(leaves, (C["a"], C["b"]))]


def assert_close(actual, expected, tol, what):
    """Elementwise ``|actual - expected| <= tol`` (``tol`` may be an array)."""
    err = np.abs(np.asarray(actual, np.float64) - expected)
    excess = err - tol
    worst = np.unravel_index(np.argmax(excess), np.shape(excess))
    assert np.all(excess <= 0), (
        f"{what}: error {np.ravel(err)[np.argmax(excess)]:.3g} exceeds "
        f"{np.ravel(np.broadcast_to(tol, np.shape(err)))[np.argmax(excess)]:.3g}"
        f" at {worst}")


def leaves64(tree):
    return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]


def run_sampler(tx, steps):
    """`steps` jitted steps from `W0`; per step the noise and the new state."""
    params = jax.tree.map(jnp.asarray, W0)
    state = tx.init(params)
    update = jax.jit(tx.update)
    trace = []
    for _ in range(steps):
        eta = reference_step_noise(state.key,
                                   jax.tree_util.tree_leaves(params))
        updates, state = update(quartic_grad(params), state, params)
        params = optax.apply_updates(params, updates)
        trace.append(dict(eta=eta, params=leaves64(params),
                          updates=leaves64(updates), state=state))
    return trace


def momentum_oracle(kind, friction, hp, mask, etas):
    """Chen et al.'s (``kind="sghmc"``) or Ding et al.'s (``"sgnht"``) chain
    in float64 from `W0` with the given noise; per step params, momentum and
    thermostat."""
    w0 = leaves64(W0)
    m = ([np.ones_like(x) for x in w0] if mask is None
         else [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(mask)])
    d = sum(np.sum(x) for x in m)
    lr, sigma = hp["lr"], hp["noise_level"]
    w = [x.copy() for x in w0]
    v = [np.zeros_like(x) for x in w0]
    zeta = friction
    out = []
    for eta in etas:
        alpha = zeta if kind == "sgnht" else friction
        grads = quartic_grad64(w)
        new_w, new_v = [], []
        for wi, vi, gi, w0i, mi, ei in zip(w, v, grads, w0, m, eta):
            grad_u = (hp["nbeta"] * gi + hp["localization"] * (wi - w0i)
                      + hp["weight_decay"] * wi)
            u = ((1 - alpha) * vi - lr / 2 * mi * grad_u
                 + np.sqrt(friction * lr) * sigma * mi * ei)
            if hp["bounding_box_size"] is not None:
                b = hp["bounding_box_size"]
                u = np.clip(wi + u, w0i - b, w0i + b) - wi
            new_w.append(wi + u)
            new_v.append(u)
        w, v = new_w, new_v
        if kind == "sgnht":
            zeta = zeta + sum(np.sum(x**2) for x in v) / d - sigma**2 * lr / 2
        out.append(dict(params=w, momentum=v, thermostat=zeta))
    return out


VARIANTS = {
    "plain": dict(),
    "mask": dict(mask=True),
    "priors_and_noise_level": dict(localization=2.0, weight_decay=0.5,
                                   noise_level=0.7),
    "all": dict(mask=True, localization=2.0, weight_decay=0.5,
                noise_level=1.3, bounding_box_size=0.08),
}


def hyperparams(variant):
    hp = dict(lr=0.02, nbeta=3.0, noise_level=1.0, localization=0.0,
              weight_decay=0.0, bounding_box_size=None)
    hp.update({k: v for k, v in VARIANTS[variant].items() if k != "mask"})
    mask = MASK if VARIANTS[variant].get("mask") else None
    return hp, mask


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind, friction", [("sghmc", 0.3), ("sgnht", 0.2)])
def test_momentum_samplers_match_the_float64_published_updates(
        kind, friction, variant):
    hp, mask = hyperparams(variant)
    factory, arg = ((so.sghmc, "momentum_decay") if kind == "sghmc"
                    else (so.sgnht, "diffusion_factor"))
    with quiet_sgld_warnings():
        tx = factory(hp["lr"], nbeta=hp["nbeta"], noise_level=hp["noise_level"],
                     localization=hp["localization"],
                     weight_decay=hp["weight_decay"],
                     bounding_box_size=hp["bounding_box_size"], mask=mask,
                     key=7, **{arg: friction})
    steps = 6
    trace = run_sampler(tx, steps)
    oracle = momentum_oracle(kind, friction, hp, mask,
                             [t["eta"] for t in trace])
    clamped = 0
    for t, (ours, exp) in enumerate(zip(trace, oracle)):
        for i, (w, e) in enumerate(zip(ours["params"], exp["params"])):
            # float32 rounding of the params (they are near 1), a few ulps.
            assert_close(w, e, 8 * F32_EPS * (1 + np.abs(e)),
                         f"params, leaf {i}, step {t}")
        momentum = leaves64(ours["state"].momentum)
        for i, (v, e, u) in enumerate(zip(momentum, exp["momentum"],
                                          ours["updates"])):
            # The state's momentum is the step taken, in float32.
            np.testing.assert_array_equal(v, u)
            assert_close(v, e, 8 * F32_EPS * (1 + np.abs(exp["params"][i])),
                         f"momentum, leaf {i}, step {t}")
            if hp["bounding_box_size"] is not None:
                w0 = leaves64(W0)[i]
                clamped += np.sum(np.isclose(np.abs(exp["params"][i] - w0),
                                             hp["bounding_box_size"]))
        if kind == "sgnht":
            # zeta (near 0.2) sums |v|^2 / d - sigma^2 eps / 2 in float32.
            assert ours["state"].thermostat.dtype == jnp.float32
            assert_close(float(ours["state"].thermostat), exp["thermostat"],
                         8 * F32_EPS, f"thermostat, step {t}")
    if mask is not None:
        for w, w0, m in zip(trace[-1]["params"], leaves64(W0),
                            jax.tree_util.tree_leaves(mask)):
            np.testing.assert_array_equal(w[~m], w0[~m])
    if hp["bounding_box_size"] is not None:
        assert clamped > 0, "the box never clamped: the variant tests nothing"


# --------------------------------------------------------------------------
# SGHMC at full friction is SGLD.


@pytest.mark.parametrize("variant", ["plain", "all"])
def test_sghmc_at_full_friction_takes_sgld_steps_bitwise(variant):
    hp, mask = hyperparams(variant)
    kwargs = dict(nbeta=hp["nbeta"], noise_level=hp["noise_level"],
                  localization=hp["localization"],
                  weight_decay=hp["weight_decay"],
                  bounding_box_size=hp["bounding_box_size"], mask=mask, key=3)
    with quiet_sgld_warnings():
        sgld = so.sgld(hp["lr"], **kwargs)
        sghmc = so.sghmc(hp["lr"], momentum_decay=1.0, **kwargs)
    a, b = run_sampler(sgld, 8), run_sampler(sghmc, 8)
    for t, (x, y) in enumerate(zip(a, b)):
        for u, v in zip(x["updates"], y["updates"]):
            np.testing.assert_array_equal(u, v, err_msg=f"step {t}")
        np.testing.assert_array_equal(jax.random.key_data(x["state"].key),
                                      jax.random.key_data(y["state"].key))
    # The steps move: the equality is not between two zero updates.
    assert all(np.any(u != 0) for u in a[-1]["updates"])


# --------------------------------------------------------------------------
# Stationary distributions on a Gaussian target.

# Scales s_i of the target, each repeated: a chain samples 40 dimensions.
DISTINCT_SCALES = np.array([0.7, 0.85, 1.0, 1.2, 1.4])
SCALES = np.tile(DISTINCT_SCALES, 8)
N_CHAINS = 1600
NBETA = 2.0  # nbeta * L = U, and the sampler does not warn about nbeta = 1.


def gaussian_loss(w):
    return 0.5 / NBETA * jnp.sum(w * w / jnp.asarray(SCALES**2, jnp.float32))


def run_chains(tx, steps, seed, w_init, v_init=None, grad_noise=0.0):
    """`N_CHAINS` independent chains of `steps` jitted steps (vmap of scan).

    Chain $c$ starts at `w_init[c]` (and momentum `v_init[c]`) with its own
    sampler key. With `grad_noise` $\\tau$, each step's gradient is the
    exact one plus $N(0, \\tau^2)$ drawn independently of the sampler.

    Returns the final params (float64, `(N_CHAINS, dims)`) and the final
    state.
    """
    dims = SCALES.size
    state0 = tx.init(jnp.zeros(dims, jnp.float32))
    key, grad_key = jax.random.split(jax.random.key(seed))

    def chain(key, grad_key, w, v):
        state = state0._replace(key=key)
        if v is not None:
            state = state._replace(momentum=v)

        def body(carry, k):
            w, state = carry
            g = jax.grad(gaussian_loss)(w)
            if grad_noise:
                g = g + grad_noise * jax.random.normal(k, (dims,))
            updates, state = tx.update(g, state, w)
            return (w + updates, state), None

        (w, state), _ = jax.lax.scan(body, (w, state),
                                     jax.random.split(grad_key, steps))
        return w, state

    keys = jax.random.split(key, N_CHAINS)
    grad_keys = jax.random.split(grad_key, N_CHAINS)
    w, state = jax.jit(jax.vmap(chain))(
        keys, grad_keys, jnp.asarray(w_init, jnp.float32),
        None if v_init is None else jnp.asarray(v_init, jnp.float32))
    return np.asarray(w, np.float64), state


def linear_chain_moments(lr, friction, q, mean0, cov0, steps):
    r"""Exact mean and variance of $w$ after `steps` steps of the linear chain

    $$v' = (1 - \alpha) v - h w + \sqrt{q}\,\eta, \qquad w' = w + v',
    \qquad h = \frac{\epsilon}{2 s^2},$$

    per dimension (SGHMC on the Gaussian target; SGLD at $\alpha = 1$), from
    the mean `mean0` and covariance `cov0` of $(w, v)$, each `(2, dims)` /
    `(2, 2, dims)`.
    """
    h = lr / (2 * SCALES**2)
    one = np.ones_like(h)
    a = np.array([[1 - h, (1 - friction) * one], [-h, (1 - friction) * one]])
    mean, cov = np.array(mean0, np.float64), np.array(cov0, np.float64)
    for _ in range(steps):
        mean = np.einsum("ijd,jd->id", a, mean)
        cov = np.einsum("ijd,jkd,lkd->ild", a, cov, a) + q
    return mean[0], cov[0, 0]


def stationary_moments(lr, friction, q):
    r"""Stationary variances of $w$ and $v$ of the linear chain above:

    $$\operatorname{Var} w = \frac{q (2 - \alpha)}{\alpha h (4 - 2\alpha - h)},
    \qquad \operatorname{Var} v = \frac{2 q}{\alpha (4 - 2\alpha - h)};$$

    at $\alpha = 1$, $q = \epsilon$: SGLD's $s^2 / (1 - \epsilon / (4 s^2))$.
    """
    h = lr / (2 * SCALES**2)
    var_w = q * (2 - friction) / (friction * h * (4 - 2 * friction - h))
    var_v = 2 * q / (friction * (4 - 2 * friction - h))
    return var_w, var_v


def sgnht_fixed_point(lr, diffusion_factor, q_grad=0.0):
    r"""SGNHT's thermostat and variance of $w$ at its fixed point.

    With the thermostat held at $\bar\zeta$ the chain is the linear one with
    friction $\bar\zeta$ and noise $q = a\epsilon + q_{\text{grad}}$; the
    thermostat is stationary where the mean kinetic energy
    $\tfrac1d \sum_i \operatorname{Var} v_i$ is $\epsilon/2$. Returns
    $\bar\zeta$ and the variances of $w$ there (the thermostat's
    fluctuations around $\bar\zeta$ change them by a few tenths of a percent
    at these settings).
    """
    q = diffusion_factor * lr + q_grad

    def excess(zeta):
        return np.mean(stationary_moments(lr, zeta, q)[1]) - lr / 2

    zeta = brentq(excess, 1e-6, 1.0, xtol=1e-14)
    return zeta, stationary_moments(lr, zeta, q)[0]


def compare(w, mean, var):
    """Compares the chains' final samples with the oracle's moments.

    Statistics are per chain (averaged over its dimensions) and their
    standard errors are estimated across chains, so correlations between
    the dimensions of a chain (SGNHT's shared thermostat) are accounted for.

    Returns `(ok, ratio, se, message)`: `ok` when the mean of
    $(w - \\mu)^2 / \\sigma^2$ is within 4 standard errors of 1 and the
    standardised mean within 4 of 0, overall and per distinct scale (4.5
    there, for the five comparisons).
    """
    z = (w - mean) / np.sqrt(var)
    n = z.shape[0]
    checks = []

    def check(name, x, target, k):
        per_chain = x.mean(axis=1)
        value = per_chain.mean()
        se = per_chain.std(ddof=1) / np.sqrt(n)
        checks.append((name, abs(value - target) <= k * se, value, se))
        return value, se

    ratio, se = check("variance ratio", z**2, 1.0, 4.0)
    check("standardised mean", z, 0.0, 4.0)
    for s in DISTINCT_SCALES:
        cols = SCALES == s
        check(f"variance ratio at s={s}", z[:, cols] ** 2, 1.0, 4.5)
        check(f"standardised mean at s={s}", z[:, cols], 0.0, 4.5)
    message = "; ".join(f"{name}: {value:.4f} (se {se:.4f}){'' if ok else ' FAILS'}"
                        for name, ok, value, se in checks)
    return all(ok for _, ok, _, _ in checks), ratio, se, message


STEPS = 600
NOISE_LEVELS = [1.0, np.sqrt(0.95), np.sqrt(1.05)]


def build(factory, noise_level, **kwargs):
    if noise_level == 1.0:
        return factory(nbeta=NBETA, key=0, **kwargs)
    with pytest.warns(UserWarning, match="noise_level="):
        return factory(nbeta=NBETA, noise_level=noise_level, key=0, **kwargs)


def check_stationary(w, mean, var, noise_level):
    ok, ratio, se, message = compare(w, mean, var)
    # The criterion resolves a 5% error in the noise variance.
    assert 8 * se < 0.05, message
    # The variance follows the noise variance sigma^2.
    assert abs(ratio - noise_level**2) <= 4 * se, message
    if noise_level == 1.0:
        assert ok, message
    else:
        assert not ok, f"a {noise_level**2:.2f}x noise variance passed: {message}"


@pytest.mark.parametrize("noise_level", NOISE_LEVELS,
                         ids=["exact", "noise_var_0.95", "noise_var_1.05"])
def test_sgld_stationary_gaussian(noise_level):
    lr = 0.04
    tx = build(so.sgld, noise_level, learning_rate=lr)
    w_init = np.broadcast_to(2 * SCALES, (N_CHAINS, SCALES.size))
    w, _ = run_chains(tx, STEPS, 1, w_init)
    mean0 = np.stack([2 * SCALES, np.zeros_like(SCALES)])
    mean, var = linear_chain_moments(lr, 1.0, lr, mean0,
                                     np.zeros((2, 2, SCALES.size)), STEPS)
    # After the burn-in, the chain's law is the discretised stationary one.
    np.testing.assert_allclose(var, SCALES**2 / (1 - lr / (4 * SCALES**2)),
                               rtol=1e-3)
    np.testing.assert_allclose(var, stationary_moments(lr, 1.0, lr)[0],
                               rtol=1e-3)
    assert np.all(np.abs(mean) < 0.01 * SCALES)
    check_stationary(w, mean, var, noise_level)


@pytest.mark.parametrize("noise_level", NOISE_LEVELS,
                         ids=["exact", "noise_var_0.95", "noise_var_1.05"])
def test_sghmc_stationary_gaussian(noise_level):
    lr, alpha = 0.01, 0.1
    tx = build(so.sghmc, noise_level, learning_rate=lr, momentum_decay=alpha)
    w_init = np.broadcast_to(2 * SCALES, (N_CHAINS, SCALES.size))
    w, _ = run_chains(tx, STEPS, 2, w_init)
    mean0 = np.stack([2 * SCALES, np.zeros_like(SCALES)])
    mean, var = linear_chain_moments(lr, alpha, alpha * lr, mean0,
                                     np.zeros((2, 2, SCALES.size)), STEPS)
    np.testing.assert_allclose(var, stationary_moments(lr, alpha, alpha * lr)[0],
                               rtol=1e-3)
    # The discretisation bias of the variance is below 0.3% here.
    np.testing.assert_allclose(var, SCALES**2, rtol=3e-3)
    assert np.all(np.abs(mean) < 0.01 * SCALES)
    check_stationary(w, mean, var, noise_level)


def equilibrium_start(lr, seed):
    """Chains started from the target: $w \\sim N(0, s^2)$,
    $v \\sim N(0, \\epsilon/2)$."""
    rng = np.random.default_rng(seed)
    shape = (N_CHAINS, SCALES.size)
    return rng.normal(size=shape) * SCALES, rng.normal(size=shape) * np.sqrt(lr / 2)


@pytest.mark.parametrize("noise_level", NOISE_LEVELS,
                         ids=["exact", "noise_var_0.95", "noise_var_1.05"])
def test_sgnht_stationary_gaussian(noise_level):
    lr, a = 0.01, 0.02
    tx = build(so.sgnht, noise_level, learning_rate=lr, diffusion_factor=a)
    w_init, v_init = equilibrium_start(lr, 3)
    w, state = run_chains(tx, STEPS, 3, w_init, v_init)
    zeta, var = sgnht_fixed_point(lr, a)
    # Without gradient noise the thermostat settles near a, and the
    # variance is within zeta/2 (1%) of the target.
    assert abs(zeta - a) < 0.02 * a
    np.testing.assert_allclose(var, SCALES**2, rtol=0.6 * zeta)
    check_stationary(w, np.zeros_like(SCALES), var, noise_level)
    # The thermostats of the chains fluctuate around the fixed point, which
    # does not depend on sigma.
    thermostat = np.asarray(state.thermostat, np.float64)
    assert abs(thermostat.mean() - zeta) <= 4 * thermostat.std() / np.sqrt(
        thermostat.size) + 0.05 * zeta, (thermostat.mean(), zeta)


def test_thermostat_absorbs_gradient_noise_that_heats_sghmc():
    lr, a, steps = 0.01, 0.02, 400
    tau = np.sqrt(2.0)
    # The gradient noise adds (eps/2 * nbeta * tau)^2 to the momentum's
    # noise variance a * eps per step: as much again.
    q_grad = (lr / 2 * NBETA * tau) ** 2
    np.testing.assert_allclose(q_grad, a * lr)
    w_init, v_init = equilibrium_start(lr, 4)

    tx = so.sgnht(lr, nbeta=NBETA, diffusion_factor=a, key=0)
    w, state = run_chains(tx, steps, 4, w_init, v_init, grad_noise=tau)
    zeta, var = sgnht_fixed_point(lr, a, q_grad)
    ok, ratio, se, message = compare(w, 0.0, var)
    assert ok, message
    assert 8 * se < 0.05, message
    # The thermostat rose to absorb the extra heat (to about a + q_grad/eps).
    mean_zeta = float(np.mean(state.thermostat))
    assert abs(mean_zeta - zeta) < 0.1 * zeta, (mean_zeta, zeta)
    assert mean_zeta > 1.8 * a
    # So the variance stays at the target, up to the discretisation's
    # zeta/2 (2%), well within the 5% this file resolves.
    ok_target, ratio_target, se_target, message = compare(w, 0.0, SCALES**2)
    assert abs(ratio_target - 1) < 0.04, message

    # The thermostat disabled: SGHMC with the same friction heats up.
    tx = so.sghmc(lr, nbeta=NBETA, momentum_decay=a, key=0)
    w, _ = run_chains(tx, steps, 5, w_init, v_init, grad_noise=tau)
    dims = SCALES.size
    cov0 = np.zeros((2, 2, dims))
    cov0[0, 0], cov0[1, 1] = SCALES**2, lr / 2
    mean, var = linear_chain_moments(lr, a, a * lr + q_grad,
                                     np.zeros((2, dims)), cov0, steps)
    ok, ratio, se, message = compare(w, mean, var)
    assert ok, message
    ok_target, ratio_target, se_target, message = compare(w, 0.0, SCALES**2)
    assert not ok_target
    assert ratio_target > 1.6, message  # Twice the target at stationarity.


# --------------------------------------------------------------------------
# RMSprop-SGLD's preconditioner.


def test_rmsprop_sgld_matches_float64_preconditioner():
    lr, nbeta, alpha, eps, loc, wd = 0.02, 3.0, 0.9, 0.05, 2.0, 0.5
    with quiet_sgld_warnings():
        tx = so.rmsprop_sgld(lr, nbeta=nbeta, alpha=alpha, eps=eps,
                             localization=loc, weight_decay=wd, mask=MASK,
                             key=11)
    trace = run_sampler(tx, 3)
    w0 = leaves64(W0)
    m = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(MASK)]
    w = [x.copy() for x in w0]
    v = [np.zeros_like(x) for x in w0]  # V_0 = 0
    for t, step in enumerate(trace):
        grads = quartic_grad64(w)
        v = [alpha * vi + (1 - alpha) * g**2 for vi, g in zip(v, grads)]
        new = []
        for wi, vi, g, w0i, mi, ei in zip(w, v, grads, w0, m, step["eta"]):
            precond = 1 / (np.sqrt(vi) + eps)  # no bias correction
            grad_u = nbeta * g + loc * (wi - w0i) + wd * wi
            new.append(wi - lr / 2 * mi * precond * grad_u
                       + np.sqrt(lr) * mi * np.sqrt(precond) * ei)
        w = new
        for i, (ours, e) in enumerate(zip(step["params"], w)):
            assert_close(ours, e, 8 * F32_EPS * (1 + np.abs(e)),
                         f"params, leaf {i}, step {t}")
        for i, (ours, e) in enumerate(zip(leaves64(step["state"].square_avg),
                                          v)):
            np.testing.assert_allclose(ours, e, rtol=1e-5,
                                       err_msg=f"square_avg, leaf {i}, step {t}")
    # The preconditioner matters here: G is far from 1.
    assert max(np.max(np.abs(1 / (np.sqrt(x) + eps) - 1)) for x in v) > 0.5
