"""The sampler family composed with JAX transformations and optax wrappers.

Every member of the family (``SAMPLERS`` of ``sgld_testing``: ``sgld``,
``rmsprop_sgld``, ``sghmc`` and ``sgnht``) runs through each composition and
is checked against the same sampler used directly: a jitted step against the
eager step, a vmapped chain against a single chain with its key, a wrapped
step against the step on what the wrapper hands the sampler, a
low-precision step against the float32 step rounded. For ``sgld`` every
update is also checked against the rule of devinterp's ``SGLD``, computed in
float64 with NumPy, with the noise of leaf ``i`` reconstructed by the float64
reference of ``sgld_testing`` from the key ``jax.random.fold_in(step_key,
i)`` where ``_, step_key = jax.random.split(state.key)``.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sgld_optax as so
from sgld_testing import (FAMILY, SAMPLERS, carried_over,
                          count_sketch_reference, inject_sampler,
                          make_sampler, quiet_sgld_warnings,
                          reference_step_noise, unkey)

EPS = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}
STATE_TYPES = (so.SGLDState, so.RMSpropSGLDState, so.SGHMCState,
               so.SGNHTState)

family = pytest.mark.parametrize("name", list(SAMPLERS))


def make_params(dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(3, 4)), dtype),
        "b": jnp.asarray(rng.normal(size=(4,)), dtype),
        "s": jnp.asarray(rng.normal(), dtype),
    }


def make_grads(params, seed=1, scale=1.0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: jnp.asarray(scale * rng.normal(size=p.shape), p.dtype),
        params)


def oracle_noise(state_key, params):
    """The next step's standard normal draws per leaf, as float64 arrays."""
    leaves = jax.tree_util.tree_leaves(params)
    return reference_step_noise(
        state_key, leaves, [jnp.float64 if p.dtype == jnp.float64
                            else jnp.float32 for p in leaves])


def rule(params, grads, key, *, lr, nbeta, noise_level=1.0, wd=0.0, loc=0.0,
         bbox=None, initial=None, mask=None):
    """The new params of one step, a list of float64 arrays in leaf order."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    g_leaves = treedef.flatten_up_to(grads)
    w0_leaves = treedef.flatten_up_to(initial if initial is not None
                                      else params)
    m_leaves = (treedef.flatten_up_to(mask) if mask is not None
                else [1.0] * len(leaves))
    out = []
    for p, g, w0, m, eta in zip(leaves, g_leaves, w0_leaves, m_leaves,
                                oracle_noise(key, params)):
        w, w0 = np.asarray(p, np.float64), np.asarray(w0, np.float64)
        g = np.zeros_like(w) if g is None else np.asarray(g, np.float64)
        m = np.asarray(m, np.float64)
        new = (w - lr / 2 * m * (nbeta * g + wd * w + loc * (w - w0))
               + math.sqrt(lr) * noise_level * m * eta)
        if bbox is not None:
            new = np.clip(new, w0 - bbox, w0 + bbox)
        out.append(new)
    return out


def assert_params_follow(new_params, expected, rtol=None):
    for x, e in zip(jax.tree_util.tree_leaves(new_params), expected):
        name = jnp.dtype(x.dtype).name
        tol = rtol if rtol is not None else 8 * EPS[name]
        np.testing.assert_allclose(np.asarray(x, np.float64), e, rtol=tol,
                                   atol=tol)


def assert_close(got, want, rtol=1e-5, atol=1e-6):
    """Equal structure, shapes and dtypes, and values within tolerance
    (typed keys compared by their data)."""
    got, want = unkey(got), unkey(want)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    chex.assert_trees_all_close(got, want, rtol=rtol, atol=atol)


def key_data(key):
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(key))
    return np.asarray(key)


def find_sampler_states(opt_state):
    is_state = lambda x: isinstance(x, STATE_TYPES)
    return [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=is_state)
            if is_state(x)]


def as_f32(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def mean_of(trees):
    """The elementwise mean of pytrees, in float64."""
    return jax.tree.map(
        lambda *g: np.mean([np.asarray(x, np.float64) for x in g], 0), *trees)


# --------------------------------------------------------------------------
# The family and its states.


@family
def test_missing_key_is_a_type_error_naming_key(name):
    with pytest.raises(TypeError, match="key"):
        make_sampler(name, 1e-2, nbeta=4.0)
    with pytest.raises(TypeError, match="key"):
        make_sampler(name, 1e-2, nbeta=4.0, key=None)


@family
def test_state_fields(name):
    params = make_params(jnp.bfloat16)
    state = SAMPLERS[name](1e-2, nbeta=4.0, key=0).init(params)
    assert type(state) is dict(zip(SAMPLERS, STATE_TYPES))[name]
    own = {"sgld": (), "rmsprop_sgld": ("square_avg",),
           "sghmc": ("momentum",), "sgnht": ("momentum", "thermostat")}[name]
    assert state._fields == ("count", "key", "initial_params", *own,
                             "metrics", "sketch")
    assert state.count.dtype == jnp.int32 and int(state.count) == 0
    np.testing.assert_array_equal(key_data(state.key),
                                  key_data(jax.random.key(0)))
    for field in ("square_avg", "momentum"):
        if field in own:
            # Zeros shaped like the params, in the float32 compute dtype.
            chex.assert_trees_all_equal(
                getattr(state, field),
                jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32),
                             params))
    if name == "sgnht":
        assert state.thermostat.dtype == jnp.float32
        assert state.thermostat.shape == ()
        assert float(state.thermostat) == pytest.approx(0.1)


@family
@pytest.mark.parametrize("kwargs, kept", [
    ({}, False),
    ({"weight_decay": 0.1}, False),
    ({"localization": 0.0}, False),
    ({"localization": 1.0}, True),
    ({"bounding_box_size": 1.0}, True),
    ({"save_metrics": True}, True),
    ({"sketch_dim": 4}, True),
])
def test_initial_params_only_when_needed(name, kwargs, kept):
    params = make_params(jnp.bfloat16)
    state = SAMPLERS[name](1e-2, nbeta=4.0, key=0, **kwargs).init(params)
    if kept:
        chex.assert_trees_all_equal(state.initial_params, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(state.initial_params,
                                                      params)
    else:
        assert state.initial_params is None
    assert (state.metrics is not None) == kwargs.get("save_metrics", False)
    assert (state.sketch is not None) == ("sketch_dim" in kwargs)


# --------------------------------------------------------------------------
# jit, schedules and lax.scan.


@family
def test_jit_does_not_retrace_and_schedules_follow_the_count(name):
    lr_schedule = lambda count: 1e-2 / (1.0 + count)
    nbeta_schedule = lambda count: 2.0 + 3.0 * count
    kwargs = dict(localization=0.5, save_metrics=True, sketch_dim=4, key=3)
    tx = SAMPLERS[name](lr_schedule, nbeta=nbeta_schedule, **kwargs)
    params = make_params()
    initial = params
    state = tx.init(params)
    traces = []

    @jax.jit
    def step(params, state, grads):
        traces.append(None)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for count in range(5):
        grads = make_grads(params, seed=count)
        # The same sampler with the schedules' values at this count, eager.
        fixed = SAMPLERS[name](lr_schedule(count),
                               nbeta=nbeta_schedule(count), **kwargs)
        want_updates, want_state = fixed.update(grads, state, params)
        new_params, new_state = step(params, state, grads)
        assert_close(new_params, optax.apply_updates(params, want_updates))
        assert_close(new_state, want_state)
        if name == "sgld":
            expected = rule(params, grads, state.key, lr=lr_schedule(count),
                            nbeta=nbeta_schedule(count), loc=0.5,
                            initial=initial)
            assert_params_follow(new_params, expected, rtol=1e-5)
        chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
        assert int(new_state.count) == count + 1
        params, state = new_params, new_state
    assert len(traces) == 1


@family
def test_lax_scan_carries_the_state(name):
    tx = SAMPLERS[name](1e-2, nbeta=4.0, localization=1.0, save_metrics=True,
                        sketch_dim=8, key=1)
    params = make_params()
    grads = make_grads(params)

    def body(carry, _):
        params, state = carry
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    (scanned, s_state), _ = jax.jit(
        lambda p, s: jax.lax.scan(body, (p, s), None, length=6))(
            params, tx.init(params))
    looped, l_state = params, tx.init(params)
    for _ in range(6):
        (looped, l_state), _ = body((looped, l_state), None)
    chex.assert_trees_all_close(scanned, looped, rtol=1e-6, atol=1e-7)
    assert_close(s_state, l_state)
    assert int(s_state.count) == 6
    np.testing.assert_array_equal(key_data(s_state.key), key_data(l_state.key))
    assert float(s_state.metrics.noise) > 0


# --------------------------------------------------------------------------
# vmap over chains.


def make_key(kind, seed):
    if kind == "typed":
        return jax.random.key(seed)
    if kind == "legacy":
        return jax.random.PRNGKey(seed)
    return jax.random.key(seed, impl="rbg")


def batched_rule(params, grads, keys, *, lr, nbeta):
    """``rule`` for each of a batch of keys.

    ``rbg`` keys do not promise equal draws with and without vmap, so for
    them the oracle draws the noise under vmap like the vmapped sampler does;
    Threefry noise comes from the float64 reference, key by key.
    """
    leaves = jax.tree_util.tree_leaves(params)

    def draws(key):
        _, step_key = jax.random.split(key)
        return [jax.random.normal(jax.random.fold_in(step_key, i), p.shape)
                for i, p in enumerate(leaves)]

    if (jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
            and str(jax.random.key_impl(keys)) != "threefry2x32"):
        noise = jax.vmap(draws)(keys)
    else:
        per_key = [reference_step_noise(k, leaves) for k in keys]
        noise = [np.stack([d[i] for d in per_key]) for i in range(len(leaves))]
    out = []
    for c in range(len(keys)):
        out.append([np.asarray(p, np.float64)
                    - lr / 2 * nbeta * np.asarray(g, np.float64)
                    + math.sqrt(lr) * np.asarray(n[c], np.float64)
                    for p, g, n in zip(leaves, jax.tree_util.tree_leaves(grads),
                                       noise)])
    return out


@pytest.mark.parametrize("kind", ["typed", "legacy", "rbg"])
def test_vmapped_sgld_chains_follow_the_rule(kind):
    params = make_params()
    grads = make_grads(params)
    tx = so.sgld(1e-2, nbeta=4.0, key=make_key(kind, 0))
    state = tx.init(params)
    np.testing.assert_array_equal(key_data(state.key),
                                  key_data(make_key(kind, 0)))
    keys = jax.random.split(make_key(kind, 1), 4)
    states = jax.vmap(lambda k: state._replace(key=k))(keys)
    step = jax.jit(jax.vmap(tx.update, in_axes=(None, 0, None)))
    updates, new_states = step(grads, states, params)
    again, _ = step(grads, states, params)
    # The same keys reproduce the chains bit for bit.
    chex.assert_trees_all_equal(updates, again)
    flat = np.concatenate([np.asarray(u).reshape(4, -1)
                           for u in jax.tree_util.tree_leaves(updates)], 1)
    expected = batched_rule(params, grads, keys, lr=1e-2, nbeta=4.0)
    for i in range(4):
        for j in range(i):
            assert not np.allclose(flat[i], flat[j]), (i, j)
        chain_params = optax.apply_updates(
            params, jax.tree.map(lambda u: u[i], updates))
        assert_params_follow(chain_params, expected[i], rtol=1e-5)
        if kind != "rbg":  # Threefry draws do not depend on vmap.
            assert_params_follow(
                chain_params,
                rule(params, grads, keys[i], lr=1e-2, nbeta=4.0), rtol=1e-5)
        np.testing.assert_array_equal(
            key_data(jax.tree.map(lambda k: k[i], new_states.key)),
            key_data(jax.random.split(keys[i])[0]))


@family
def test_vmapped_chain_equals_the_single_chain_with_its_key(name):
    params = make_params()
    tx = SAMPLERS[name](1e-2, nbeta=4.0, localization=1.0, save_metrics=True,
                        key=0)
    state = tx.init(params)
    n = 3
    keys = jax.random.split(jax.random.key(1), n)
    states = jax.vmap(lambda k: state._replace(key=k))(keys)
    chains = jax.tree.map(lambda x: jnp.stack([x] * n), params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    vstep = jax.jit(jax.vmap(step, in_axes=(0, 0, None)))
    grads = [make_grads(params, seed=seed) for seed in range(2)]
    for g in grads:
        chains, states = vstep(chains, states, g)
    assert states.metrics.noise.shape == (n,)
    for i in range(n):
        pick = lambda t: jax.tree.map(lambda x: x[i], t)
        single, s_state = params, state._replace(key=keys[i])
        for g in grads:
            single, s_state = step(single, s_state, g)
        assert_close(pick(chains), single)
        assert_close(pick(states), s_state)
        for j in range(i):
            assert not np.allclose(chains["w"][i], chains["w"][j]), (i, j)


@family
def test_equal_seeds_give_equal_chains_and_different_seeds_differ(name):
    params = make_params()
    grads = make_grads(params)

    def run(key):
        tx = SAMPLERS[name](1e-2, nbeta=4.0, key=key)
        return tx.update(grads, tx.init(params), params)[0]

    chex.assert_trees_all_equal(run(7), run(7))
    chex.assert_trees_all_equal(run(7), run(jax.random.key(7)))
    chex.assert_trees_all_equal(run(7), run(jax.random.PRNGKey(7)))
    assert not np.allclose(run(7)["w"], run(8)["w"])


# --------------------------------------------------------------------------
# optax.inject_hyperparams.


@pytest.mark.parametrize("name, static_args", [
    *[(name, ("key",)) for name in SAMPLERS],
    ("sgld", ("key", "sketch_seed")),
])
def test_inject_hyperparams_learning_rate_in_state(name, static_args):
    kwargs = dict(nbeta=4.0, localization=1.0, key=5)
    tx = inject_sampler(name, 1e-2, static_args=static_args, **kwargs)
    plain = lambda lr: SAMPLERS[name](lr, **kwargs)
    params = make_params()
    initial = params
    state = tx.init(params)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(1e-2)
    assert_close(state.inner_state, plain(1e-2).init(params), rtol=0, atol=0)
    step = jax.jit(tx.update)
    for lr in (1e-2, 4e-2):
        state.hyperparams["learning_rate"] = jnp.asarray(lr)
        grads = make_grads(params, seed=int(lr * 100))
        inner = state.inner_state
        updates, state = step(grads, state, params)
        want_updates, want_inner = plain(lr).update(grads, inner, params)
        assert_close(updates, want_updates)
        assert_close(state.inner_state, want_inner)
        if name == "sgld":
            assert_params_follow(
                optax.apply_updates(params, updates),
                rule(params, grads, inner.key, lr=lr, nbeta=4.0, loc=1.0,
                     initial=initial), rtol=1e-5)
        params = optax.apply_updates(params, updates)


def test_inject_hyperparams_with_sketches_needs_static_sketch_args():
    params = make_params()
    grads = make_grads(params)
    good = optax.inject_hyperparams(
        so.sgld, static_args=("key", "sketch_dim", "sketch_seed"))(
            1e-2, nbeta=4.0, sketch_dim=8, sketch_seed=3, key=2)
    state = good.init(params)
    _, state = jax.jit(good.update)(grads, state, params)
    plain = so.sgld(1e-2, nbeta=4.0, sketch_dim=8, sketch_seed=3, key=2)
    _, p_state = plain.update(grads, plain.init(params), params)
    chex.assert_trees_all_close(so.get_sketches(state),
                                so.get_sketches(p_state), rtol=1e-6,
                                atol=1e-7)
    assert float(jnp.linalg.norm(so.get_sketches(state).noise)) > 0

    bad = optax.inject_hyperparams(so.sgld, static_args=("key",))(
        1e-2, nbeta=4.0, sketch_dim=8, key=2)
    state = bad.init(params)
    with pytest.raises(TypeError, match="static_args"):
        jax.jit(bad.update)(grads, state, params)


# --------------------------------------------------------------------------
# optax wrappers.


@family
def test_after_clip_by_global_norm_uses_clipped_grads(name):
    params = make_params()
    initial = params
    grads = make_grads(params, scale=10.0)
    gnorm = float(optax.tree.norm(grads))
    assert gnorm > 1.0
    clipped = jax.tree.map(lambda g: np.asarray(g, np.float64) / gnorm, grads)
    sampler = SAMPLERS[name](1e-2, nbeta=4.0, localization=1.0, key=4)
    tx = optax.chain(optax.clip_by_global_norm(1.0), sampler)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for _ in range(2):
        updates, new_state = step(grads, state, params)
        want_updates, want_state = sampler.update(as_f32(clipped), state[1],
                                                  params)
        assert_close(updates, want_updates)
        assert_close(new_state[1], want_state)
        if name == "sgld":
            assert_params_follow(
                optax.apply_updates(params, updates),
                rule(params, clipped, state[1].key, lr=1e-2, nbeta=4.0,
                     loc=1.0, initial=initial), rtol=1e-5)
        params = optax.apply_updates(params, updates)
        state = new_state


@family
def test_apply_if_finite_skips_a_nan_step_entirely(name):
    params = make_params()
    sampler = SAMPLERS[name](1e-2, nbeta=4.0, localization=1.0,
                             save_metrics=True, key=1)
    tx = optax.apply_if_finite(sampler, max_consecutive_errors=5)
    step = jax.jit(tx.update)
    state = tx.init(params)
    updates, state = step(make_grads(params, seed=1), state, params)
    params = optax.apply_updates(params, updates)
    before = state.inner_state

    bad = make_grads(params, seed=2)
    bad["w"] = bad["w"].at[1, 2].set(jnp.nan)
    updates, state = step(bad, state, params)
    for u in jax.tree_util.tree_leaves(updates):
        np.testing.assert_array_equal(u, 0.0)
    chex.assert_trees_all_equal(optax.apply_updates(params, updates), params)
    assert int(state.notfinite_count) == 1
    # The whole sampler state (count, key, momentum, preconditioner,
    # thermostat, metrics) is left as it was.
    chex.assert_trees_all_equal(unkey(state.inner_state), unkey(before))
    assert int(state.inner_state.count) == 1
    np.testing.assert_array_equal(key_data(state.inner_state.key),
                                  key_data(before.key))
    chex.assert_trees_all_equal(so.get_metrics(state), before.metrics)

    good = make_grads(params, seed=3)
    updates, state = step(good, state, params)
    want_updates, want_state = sampler.update(good, before, params)
    assert_close(updates, want_updates)
    assert_close(state.inner_state, want_state)
    if name == "sgld":
        assert_params_follow(
            optax.apply_updates(params, updates),
            rule(params, good, before.key, lr=1e-2, nbeta=4.0, loc=1.0,
                 initial=before.initial_params), rtol=1e-5)
    assert int(state.inner_state.count) == 2


@family
def test_multi_steps_adds_noise_once_per_k_with_the_mean_grad(name):
    k = 3
    params = make_params()
    sampler = SAMPLERS[name](1e-2, nbeta=4.0, key=6)
    tx = optax.MultiSteps(sampler, every_k_schedule=k)
    step = jax.jit(tx.update)
    state = tx.init(params)
    moved = 0
    for cycle in range(2):
        inner = state.inner_opt_state
        grads = [make_grads(params, seed=10 * cycle + i) for i in range(k)]
        for i in range(k):
            updates, state = step(grads[i], state, params)
            new_params = optax.apply_updates(params, updates)
            if i < k - 1:
                chex.assert_trees_all_equal(new_params, params)
                chex.assert_trees_all_equal(unkey(state.inner_opt_state),
                                            unkey(inner))
                assert int(state.inner_opt_state.count) == cycle
            else:
                mean = mean_of(grads)
                want_updates, want_state = sampler.update(as_f32(mean), inner,
                                                          params)
                assert_close(new_params,
                             optax.apply_updates(params, want_updates))
                assert_close(state.inner_opt_state, want_state)
                if name == "sgld":
                    assert_params_follow(
                        new_params, rule(params, mean, inner.key, lr=1e-2,
                                         nbeta=4.0), rtol=1e-5)
                assert int(state.inner_opt_state.count) == cycle + 1
                moved += 1
            params = new_params
    assert moved == 2


@family
def test_multi_transform_freezes_set_to_zero_leaves(name):
    params = make_params()
    labels = {"w": "sample", "b": "sample", "s": "freeze"}
    sampler = SAMPLERS[name](1e-2, nbeta=4.0, localization=1.0,
                             save_metrics=True, key=2)
    tx = optax.multi_transform(
        {"sample": sampler, "freeze": optax.set_to_zero()}, labels)
    state = tx.init(params)
    inner = state.inner_states["sample"].inner_state
    assert isinstance(inner.initial_params["s"], optax.MaskedNode)
    sub = lambda t: {"b": t["b"], "w": t["w"]}
    chex.assert_trees_all_equal(sub(inner.initial_params), sub(params))
    # The sampler sees the sampled leaves only: leaf indices 0 ("b"), 1 ("w"),
    # as a sampler of those leaves alone does.
    s_state = sampler.init(sub(params))
    step = jax.jit(tx.update)
    initial = params
    for seed in range(2):
        grads = make_grads(params, seed=seed)
        updates, state = step(grads, state, params)
        new_params = optax.apply_updates(params, updates)
        np.testing.assert_array_equal(updates["s"], 0.0)
        np.testing.assert_array_equal(new_params["s"], initial["s"])
        key = s_state.key
        want_updates, s_state = sampler.update(sub(grads), s_state,
                                               sub(params))
        assert_close(sub(new_params),
                     optax.apply_updates(sub(params), want_updates))
        if name == "sgld":
            assert_params_follow(
                sub(new_params),
                rule(sub(params), sub(grads), key, lr=1e-2, nbeta=4.0,
                     loc=1.0, initial=sub(initial)), rtol=1e-5)
        params = new_params
    assert_close(so.get_metrics(state), s_state.metrics)
    assert int(so.get_metrics(state).numel) == 16


def test_optax_masked_passes_masked_out_updates_through():
    # optax.masked hands masked-out *gradients* back unchanged as updates, so
    # apply_updates moves those params by +grad: it does not freeze them.
    # Freeze with sgld(mask=...) or multi_transform(..., set_to_zero()).
    params = make_params()
    grads = make_grads(params)
    tx = optax.masked(so.sgld(1e-2, nbeta=4.0, key=2),
                      {"w": True, "b": False, "s": True})
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    np.testing.assert_array_equal(updates["b"], grads["b"])
    assert not np.allclose(optax.apply_updates(params, updates)["b"],
                           params["b"])

    frozen = so.sgld(1e-2, nbeta=4.0, key=2, mask={
        "w": np.ones((3, 4), bool), "b": np.zeros(4, bool),
        "s": np.array(True)})
    updates, _ = frozen.update(grads, frozen.init(params), params)
    np.testing.assert_array_equal(updates["b"], 0.0)


# --------------------------------------------------------------------------
# Sharding, in a subprocess with four host devices.

# Every sampler with metrics and sketches; sgld also without sketches.
SHARDED = [(name, variant) for name in SAMPLERS
           for variant in (("plain", "sketch") if name == "sgld"
                           else ("sketch",))]

SHARDING_SCRIPT = textwrap.dedent("""
    import json
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from sgld_testing import SAMPLERS

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=8), jnp.float32),
              "s": jnp.asarray(1.5, jnp.float32)}
    grads = jax.tree.map(jnp.ones_like, params)
    specs = {"w": P("x"), "b": P("x"), "s": P()}
    maxdiff = lambda a, b: max(float(jnp.max(jnp.abs(x - y)))
                               for x, y in zip(jax.tree.leaves(a),
                                               jax.tree.leaves(b)))
    results = {}
    for sampler, variant in json.loads(sys.argv[1]):
        sketch = variant == "sketch"
        tx = SAMPLERS[sampler](1e-2, nbeta=4.0, localization=1.0,
                               save_metrics=True,
                               sketch_dim=8 if sketch else None, key=0)
        step = jax.jit(tx.update)
        ref_u, ref_s = step(grads, tx.init(params), params)
        for axis in ("explicit", "auto"):
            name = f"{sampler}-{axis}-{variant}"
            try:
                mesh = jax.make_mesh((4,), ("x",), axis_types=(
                    AxisType.Explicit if axis == "explicit" else AxisType.Auto,))
                put = lambda t: {k: jax.device_put(v, NamedSharding(
                    mesh, specs[k])) for k, v in t.items()}
                sp, sg = put(params), put(grads)
                u, s = step(sg, tx.init(sp), sp)
                results[name] = dict(
                    ok=True,
                    devices=len(jax.devices()),
                    same_sharding=all(
                        u[k].sharding.is_equivalent_to(sp[k].sharding,
                                                       u[k].ndim)
                        for k in u),
                    sharded=len(u["w"].sharding.device_set) == 4
                            and not u["w"].sharding.is_fully_replicated,
                    max_diff=maxdiff(u, ref_u),
                    metrics_diff=maxdiff(s.metrics, ref_s.metrics),
                    sketch_diff=maxdiff(s.sketch, ref_s.sketch) if sketch
                                else 0.0)
            except Exception as err:
                results[name] = dict(ok=False,
                                     error=f"{type(err).__name__}: {err}")
        # Under shard_map each device samples its own rows of w and b.
        name = f"{sampler}-shard_map-{variant}"
        try:
            mesh = jax.make_mesh((4,), ("x",),
                                 axis_types=(AxisType.Explicit,))
            local_params = {k: params[k] for k in ("w", "b")}
            local_grads = {k: grads[k] for k in ("w", "b")}

            def local(p, g):
                u, s = tx.update(g, tx.init(p), p)
                return u, jax.tree.map(lambda x: x[None],
                                       (s.metrics, s.sketch))
            put = lambda t: {k: jax.device_put(v, NamedSharding(mesh, P("x")))
                             for k, v in t.items()}
            u, (m, sk) = jax.jit(jax.shard_map(
                local, mesh=mesh, in_specs=(P("x"), P("x")),
                out_specs=(P("x"), P("x"))))(put(local_params),
                                             put(local_grads))
            u, m, sk = jax.tree.map(np.asarray, (u, m, sk))
            diffs = dict(max_diff=0.0, metrics_diff=0.0, sketch_diff=0.0)
            for d in range(4):
                block = lambda t: {k: v[2 * d:2 * d + 2] for k, v in t.items()}
                ref_u, ref_s = step(block(local_grads),
                                    tx.init(block(local_params)),
                                    block(local_params))
                pick = lambda t: jax.tree.map(lambda x: x[d], t)
                for key, a, b in (("max_diff", block(u), ref_u),
                                  ("metrics_diff", pick(m), ref_s.metrics),
                                  ("sketch_diff", pick(sk) if sketch else 0,
                                   ref_s.sketch if sketch else 0)):
                    if sketch or key != "sketch_diff":
                        diffs[key] = max(diffs[key], maxdiff(a, b))
            results[name] = dict(ok=True, **diffs)
        except Exception as err:
            results[name] = dict(ok=False,
                                 error=f"{type(err).__name__}: {err}")
    print("RESULTS" + json.dumps(results))
""")


@pytest.fixture(scope="module")
def sharding_results():
    tests = str(pathlib.Path(__file__).resolve().parent)
    env = dict(os.environ,
               XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(
                   [tests] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run(
        [sys.executable, "-c", SHARDING_SCRIPT, json.dumps(SHARDED)], env=env,
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS")][-1]
    return json.loads(line[len("RESULTS"):])


@pytest.mark.parametrize("name, variant", SHARDED)
@pytest.mark.parametrize("axis", ["auto", "explicit"])
def test_sharded_params_keep_sharding_and_values(sharding_results, name,
                                                 variant, axis):
    res = sharding_results[f"{name}-{axis}-{variant}"]
    assert res["ok"], res.get("error")
    assert res["devices"] == 4
    assert res["same_sharding"] and res["sharded"]
    assert res["max_diff"] <= 1e-6
    assert res["metrics_diff"] <= 1e-5
    assert res["sketch_diff"] <= 1e-5


@pytest.mark.parametrize("name, variant", SHARDED)
def test_under_shard_map_each_device_samples_its_block(sharding_results,
                                                       name, variant):
    # Inside shard_map values are typed with the axes they vary along; the
    # sampler's platform-dependent parts (the GPU sketch) must agree on
    # those types, else tracing fails.
    res = sharding_results[f"{name}-shard_map-{variant}"]
    assert res["ok"], res.get("error")
    assert res["max_diff"] <= 1e-6
    assert res["metrics_diff"] <= 1e-5
    assert res["sketch_diff"] <= 1e-5


# --------------------------------------------------------------------------
# dtypes.


@family
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16",
                                   "float64"])
def test_params_keep_their_dtype(name, dtype):
    with jax.enable_x64(dtype == "float64"):
        check_params_keep_their_dtype(name, jnp.dtype(dtype))


def check_params_keep_their_dtype(name, dtype):
    # The step computes in float32 (float64 for float64 params) and rounds
    # the update to the params' dtype: a step of low-precision params is the
    # float32 step of the same values, rounded.
    compute = jnp.promote_types(dtype, jnp.float32)
    up = lambda t: jax.tree.map(lambda x: jnp.asarray(x, compute), t)
    params = make_params(dtype)
    tx = SAMPLERS[name](1e-2, nbeta=4.0, localization=1.0, weight_decay=0.1,
                        bounding_box_size=2.0, save_metrics=True,
                        sketch_dim=4, key=1)
    state = tx.init(params)
    for field in ("square_avg", "momentum"):
        if hasattr(state, field):
            chex.assert_trees_all_equal_shapes_and_dtypes(
                getattr(state, field), up(params))
    step = jax.jit(tx.update)
    initial = params
    for seed in range(3):
        grads = make_grads(params, seed=seed)
        updates, new_state = step(grads, state, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
        new_params = optax.apply_updates(params, updates)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_params, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
        want_updates, want_state = tx.update(
            up(grads), state._replace(initial_params=up(initial)), up(params))
        ulp = 2 * float(jnp.finfo(dtype).eps)
        for u, w in zip(jax.tree_util.tree_leaves(updates),
                        jax.tree_util.tree_leaves(want_updates)):
            u, w = np.asarray(u, np.float64), np.asarray(w, np.float64)
            np.testing.assert_allclose(u, w, rtol=max(ulp, 1e-5), atol=1e-7)
        assert_close(new_state._replace(initial_params=up(initial)),
                     want_state)
        if name == "sgld":
            assert_params_follow(
                new_params,
                rule(params, grads, state.key, lr=1e-2, nbeta=4.0, wd=0.1,
                     loc=1.0, bbox=2.0, initial=initial),
                rtol=1e-12 if dtype == jnp.float64 else None)
        params, state = new_params, new_state
    chex.assert_trees_all_equal_shapes_and_dtypes(state.initial_params,
                                                  initial)
    chex.assert_trees_all_equal(state.initial_params, initial)
    assert state.metrics.noise.dtype == jnp.float32
    assert state.sketch.noise.dtype == jnp.float32
    assert state.count.dtype == jnp.int32


# --------------------------------------------------------------------------
# Masks and the bounding box.


@family
def test_masked_elements_do_not_move(name):
    params = make_params()
    mask = {"w": np.arange(12).reshape(3, 4) % 3 == 0,
            "b": np.array([1.0, 0.0, 1.0, 0.0], np.float32),
            "s": np.array(False)}
    tx = SAMPLERS[name](1e-1, nbeta=4.0, localization=1.0, weight_decay=0.1,
                        mask=mask, save_metrics=True, key=2)
    state = tx.init(params)
    step = jax.jit(tx.update)
    start = params
    for seed in range(3):
        updates, state = step(make_grads(params, seed=seed), state, params)
        params = optax.apply_updates(params, updates)
        for k in params:
            frozen = ~np.asarray(mask[k], bool)
            np.testing.assert_array_equal(np.asarray(updates[k])[frozen], 0.0)
            if hasattr(state, "momentum"):
                np.testing.assert_array_equal(
                    np.asarray(state.momentum[k])[frozen], 0.0)
    for k in params:
        moved = np.asarray(params[k]) != np.asarray(start[k])
        np.testing.assert_array_equal(moved, np.asarray(mask[k], bool), k)
    assert int(so.get_metrics(state).numel) == 4 + 2


@family
def test_bounding_box_holds(name):
    params = make_params()
    initial = params
    bbox = 0.05
    with quiet_sgld_warnings():
        tx = SAMPLERS[name](1e-1, nbeta=4.0, noise_level=2.0,
                            bounding_box_size=bbox, key=3)
    state = tx.init(params)
    step = jax.jit(tx.update)
    on_edge = 0
    for seed in range(4):
        updates, state = step(make_grads(params, seed=seed), state, params)
        new_params = optax.apply_updates(params, updates)
        for x, w0, w in zip(jax.tree_util.tree_leaves(new_params),
                            jax.tree_util.tree_leaves(initial),
                            jax.tree_util.tree_leaves(params)):
            x, w0, w = (np.asarray(a, np.float64) for a in (x, w0, w))
            # The clamped point c is reached as w + (c - w): two roundings of
            # the size of w's and w0's last places.
            slack = 4 * EPS["float32"] * (np.abs(w0) + bbox + np.abs(w))
            assert np.all(np.abs(x - w0) <= bbox + slack)
            on_edge += int(np.sum(np.abs(x - w0) >= bbox - slack))
        if hasattr(state, "momentum"):
            # The momentum becomes the step taken.
            chex.assert_trees_all_equal(state.momentum, updates)
        params = new_params
    # Most steps would leave the box: it clamps.
    assert on_edge > 17


# --------------------------------------------------------------------------
# Metrics and sketches.


@family
def test_metrics_and_sketches_are_the_components_of_the_step(name):
    lr, nbeta = 1e-2, 4.0
    initial = make_params()
    params = make_grads(initial, seed=5)  # away from the initial params
    sampler = SAMPLERS[name](lr, nbeta=nbeta, localization=1.0,
                             save_metrics=True, sketch_dim=8, sketch_seed=3,
                             key=3)
    tx = optax.chain(optax.clip_by_global_norm(1e3),
                     optax.apply_if_finite(sampler, 3))
    state = tx.init(initial)
    step = jax.jit(tx.update)
    flat = lambda t: [np.asarray(x, np.float64).ravel()
                      for x in jax.tree_util.tree_leaves(t)]
    norm = lambda vs: np.sqrt(sum(np.sum(v ** 2) for v in vs))
    idx, sgn = so.CountSketch(17, 8, 3).buckets_and_signs(0, 17)
    sketch = lambda vs: count_sketch_reference(idx, sgn, 8, vs)
    for seed in range(3):
        grads = make_grads(initial, seed=6 + seed)
        carried = carried_over(name, state[1].inner_state)
        updates, state = step(grads, state, params)
        m, buf = so.get_metrics(state), so.get_sketches(state)
        chex.assert_trees_all_equal(m, state[1].inner_state.metrics)
        chex.assert_trees_all_equal(buf, state[1].inner_state.sketch)
        assert int(m.numel) == 17
        # Without a box, the step is what the state carries over plus
        # noise - scaled_grad - localization - weight_decay.
        rest = flat(updates)
        if carried is not None:
            rest = [r - c.ravel() for r, c in zip(rest, carried)]
        np.testing.assert_allclose(
            np.asarray(buf.noise, np.float64) - buf.scaled_grad
            - buf.localization - buf.weight_decay, sketch(rest),
            rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(buf.weight_decay, 0.0)
        np.testing.assert_allclose(
            float(m.noise) ** 2 + float(m.scaled_grad) ** 2
            + float(m.localization) ** 2 + 2 * float(m.dot_grad_prior)
            - 2 * float(m.dot_grad_noise) - 2 * float(m.dot_prior_noise),
            norm(rest) ** 2, rtol=1e-4)
        # The raw gradient and the distance need no knowledge of the sampler.
        g = [lr / 2 * nbeta * x for x in flat(grads)]
        np.testing.assert_allclose(buf.unscaled_grad, sketch(g), rtol=1e-5,
                                   atol=1e-7)
        np.testing.assert_allclose(m.unscaled_grad, norm(g), rtol=1e-5)
        np.testing.assert_allclose(
            m.distance, norm([p - w0 for p, w0 in zip(flat(params),
                                                      flat(initial))]),
            rtol=1e-5)
        assert float(m.noise) > 0 and float(m.localization) > 0
        params = optax.apply_updates(params, updates)


# --------------------------------------------------------------------------
# get_metrics through wrappers.


def sampler(name, noise_level, mask=None, inject=False, key=3):
    kwargs = dict(nbeta=4.0, noise_level=noise_level, weight_decay=0.1,
                  localization=1.0, save_metrics=True, key=key, mask=mask)
    with quiet_sgld_warnings():
        if inject:
            return inject_sampler(name, 1e-2, **kwargs)
        return SAMPLERS[name](1e-2, **kwargs)


# Each sampler of a pipeline gets its own key.
LABELS = {"w": "x", "b": "y", "s": "y"}
WRAPPERS = {
    "chain": lambda n, nl: optax.chain(optax.clip_by_global_norm(1e3),
                                       sampler(n, nl)),
    "apply_if_finite": lambda n, nl: optax.apply_if_finite(sampler(n, nl), 3),
    "inject_hyperparams": lambda n, nl: sampler(n, nl, inject=True),
    "multi_transform": lambda n, nl: optax.multi_transform(
        {"x": sampler(n, nl, key=3), "y": sampler(n, nl, key=4)}, LABELS),
    "masked": lambda n, nl: optax.chain(
        optax.masked(sampler(n, nl, key=3),
                     {"w": True, "b": False, "s": True}),
        optax.masked(sampler(n, nl, key=4),
                     {"w": False, "b": True, "s": False})),
    "nested": lambda n, nl: optax.chain(
        optax.clip_by_global_norm(1e3),
        optax.apply_if_finite(optax.multi_transform(
            {"x": sampler(n, nl, inject=True, key=3),
             "y": optax.chain(sampler(n, nl, key=4))}, LABELS), 3)),
}


# Every wrapper for sgld; the others through the nested pipeline, which has
# them all.
@pytest.mark.parametrize("name, wrapper", [
    *[("sgld", wrapper) for wrapper in WRAPPERS],
    *[(name, "nested") for name in SAMPLERS if name != "sgld"],
])
def test_get_metrics_through_wrappers(name, wrapper):
    with quiet_sgld_warnings():  # inject_hyperparams rebuilds sgld in init
        check_get_metrics_through(name, wrapper)


def check_get_metrics_through(name, wrapper):
    initial = make_params()
    params = make_grads(initial, seed=5)  # away from the initial params
    grads = make_grads(initial, seed=6)
    tx = WRAPPERS[wrapper](name, 0.0)
    state = tx.init(initial)
    _, state = jax.jit(tx.update)(grads, state, params)
    got = so.get_metrics(state)
    # Without noise, every split of the params gives the metrics of one
    # sampler over all of them.
    single = sampler(name, 0.0)
    _, s_state = single.update(grads, single.init(initial), params)
    want = s_state.metrics
    for field in so.Metrics._fields:
        np.testing.assert_allclose(getattr(got, field), getattr(want, field),
                                   rtol=1e-5, atol=1e-12, err_msg=field)
    assert int(got.numel) == 17

    # With noise, norms combine as the root of summed squares and dot
    # products and numel add up.
    tx = WRAPPERS[wrapper](name, 1.0)
    _, state = jax.jit(tx.update)(grads, tx.init(initial), params)
    parts = [s.metrics for s in find_sampler_states(state)]
    assert len(parts) == (1 if wrapper in ("chain", "apply_if_finite",
                                           "inject_hyperparams") else 2)
    got = so.get_metrics(state)
    for field in so.Metrics._fields[:6]:
        np.testing.assert_allclose(
            getattr(got, field),
            np.sqrt(sum(np.float64(getattr(p, field)) ** 2 for p in parts)),
            rtol=1e-5, err_msg=field)
    for field in so.Metrics._fields[6:]:
        np.testing.assert_allclose(
            getattr(got, field), sum(np.float64(getattr(p, field))
                                     for p in parts),
            rtol=1e-5, atol=1e-9, err_msg=field)
    assert float(got.noise) > 0


@family
def test_get_sketches_with_two_sketching_samplers_is_an_error(name):
    params = make_params()
    tx = optax.multi_transform(
        {"x": SAMPLERS[name](1e-2, nbeta=4.0, sketch_dim=4, key=0),
         "y": SAMPLERS[name](1e-2, nbeta=4.0, sketch_dim=4, key=1)}, LABELS)
    with pytest.raises(ValueError, match="2 sampler states with sketches"):
        so.get_sketches(tx.init(params))


# --------------------------------------------------------------------------
# Errors and warnings.


@family
@pytest.mark.parametrize("kwargs, error, match", [
    ({"learning_rate": 0.0}, ValueError, "learning_rate"),
    ({"learning_rate": -1e-3}, ValueError, "learning_rate"),
    ({"learning_rate": float("nan")}, ValueError, "learning_rate"),
    ({"learning_rate": True}, TypeError, "learning_rate"),
    ({"nbeta": 0.0}, ValueError, "nbeta"),
    ({"nbeta": -2.0}, ValueError, "nbeta"),
    ({"noise_level": -0.5}, ValueError, "noise_level"),
    ({"weight_decay": -0.1}, ValueError, "weight_decay"),
    ({"localization": -1.0}, ValueError, "localization"),
    ({"bounding_box_size": 0.0}, ValueError, "bounding_box_size"),
    ({"bounding_box_size": -1.0}, ValueError, "bounding_box_size"),
    ({"sketch_dim": 0}, ValueError, "sketch_dim"),
    ({"sketch_dim": 2.5}, TypeError, "sketch_dim"),
])
def test_invalid_hyperparameters_raise(name, kwargs, error, match):
    kwargs = {"learning_rate": 1e-2, "nbeta": 4.0, "key": 0, **kwargs}
    lr = kwargs.pop("learning_rate")
    with quiet_sgld_warnings(), pytest.raises(error, match=match):
        SAMPLERS[name](lr, **kwargs)


@family
@pytest.mark.parametrize("key", ["seed", 1.5, jax.random.split(
    jax.random.key(0), 2)])
def test_invalid_key_raises(name, key):
    with pytest.raises((TypeError, ValueError), match="key"):
        SAMPLERS[name](1e-2, nbeta=4.0, key=key).init(make_params())


@family
def test_mask_structure_mismatch_raises(name):
    params = make_params()
    tx = SAMPLERS[name](1e-2, nbeta=4.0, mask={"w": np.ones((3, 4), bool)},
                        key=0)
    with pytest.raises(ValueError, match="structure"):
        tx.init(params)


@family
def test_mask_shape_mismatch_names_the_leaf_and_both_shapes(name):
    params = make_params()
    mask = {"w": np.ones((3, 4), bool), "b": np.ones((3,), bool),
            "s": np.array(True)}
    tx = SAMPLERS[name](1e-2, nbeta=4.0, mask=mask, key=0)
    with pytest.raises(ValueError) as info:
        tx.init(params)
    message = str(info.value)
    assert "['b']" in message and "(3,)" in message and "(4,)" in message
    assert "['w']" not in message


@family
def test_update_without_params_raises(name):
    params = make_params()
    tx = SAMPLERS[name](1e-2, nbeta=4.0, key=0)
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))


@family
def test_get_metrics_and_get_sketches_when_disabled_raise(name):
    params = make_params()
    state = SAMPLERS[name](1e-2, nbeta=4.0, key=0).init(params)
    with pytest.raises(ValueError, match="save_metrics"):
        so.get_metrics(state)
    with pytest.raises(ValueError, match="sketch_dim"):
        so.get_sketches(state)
    with pytest.raises(ValueError, match="no sampler state"):
        so.get_metrics(optax.sgd(0.1).init(params))


@family
def test_warns_for_noise_level_and_nbeta_one(name):
    make = SAMPLERS[name]
    with pytest.warns(UserWarning, match="noise_level"):
        make(1e-2, nbeta=4.0, noise_level=0.5, key=0)
    with pytest.warns(UserWarning, match="nbeta"):
        make(1e-2, nbeta=1.0, key=0)
    with pytest.warns(UserWarning, match="nbeta"):
        make(1e-2, key=0)  # the default nbeta is 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(1e-2, nbeta=4.0, noise_level=1.0, key=0)
        make(1e-2, nbeta=lambda count: 1.0 + count, key=0)


# --------------------------------------------------------------------------
# default_nbeta.


def reference_default_nbeta():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from devinterp.utils import default_nbeta
        return default_nbeta
    except Exception:  # devinterp or torch missing: m / log m in float64.
        return lambda m, steps=1: (m * steps) / np.log(np.float64(m * steps))


@pytest.mark.parametrize("batch_size, steps", [
    (2, 1), (3, 1), (16, 1), (64, 1), (100, 4), (1000, 1), (8, 16)])
def test_default_nbeta_matches_devinterp(batch_size, steps):
    want = reference_default_nbeta()(batch_size, steps)
    assert so.default_nbeta(batch_size, steps) == pytest.approx(
        float(want), rel=1e-12)

    class Loader:
        pass

    loader = Loader()
    loader.batch_size = batch_size
    assert so.default_nbeta(loader, steps) == pytest.approx(float(want),
                                                            rel=1e-12)


@pytest.mark.parametrize("batch_size, steps", [(1, 1), (0, 1), (1, 0)])
def test_default_nbeta_warns_when_undefined(batch_size, steps):
    with pytest.warns(UserWarning, match="undefined"):
        assert so.default_nbeta(batch_size, steps) == 1.0


@family
@pytest.mark.parametrize("arg", ["learning_rate", "nbeta", "weight_decay",
                                 "localization", "bounding_box_size"])
def test_non_finite_hyperparameters_are_rejected(name, arg):
    kwargs = {"learning_rate": 0.1, "nbeta": 2.0, "key": 0,
              arg: float("inf")}
    lr = kwargs.pop("learning_rate")
    with pytest.raises(ValueError, match=f"{arg} must be finite"):
        SAMPLERS[name](lr, **kwargs)


@family
def test_mask_values_must_be_zero_or_one(name):
    make = SAMPLERS[name]
    with pytest.raises(ValueError, match="mask values must be 0 or 1"):
        make(0.1, nbeta=2.0, mask={"a": jnp.array([2.0, 0.0])}, key=0)
    # Bools and 0/1 numbers are fine.
    make(0.1, nbeta=2.0, mask={"a": jnp.array([1.0, 0.0])}, key=0)
    make(0.1, nbeta=2.0, mask={"a": jnp.array([True, False])}, key=0)


@family
def test_inject_hyperparams_without_static_key_says_how(name):
    factory, extra = FAMILY[name]
    tx = optax.inject_hyperparams(factory)(0.1, nbeta=2.0, key=0, **extra)
    params = {"a": jnp.ones(3)}
    state = tx.init(params)
    with pytest.raises(TypeError, match="static_args=\\('key',\\)"):
        jax.jit(tx.update)(params, state, params)


def test_noise_does_not_depend_on_threefry_partitionable():
    from sgld_optax._src import noise as noise_lib

    key = jax.random.key(4)
    want = noise_lib.standard_normal(key, (4, 5))
    with jax.threefry_partitionable(False):
        np.testing.assert_array_equal(
            noise_lib.standard_normal(key, (4, 5)), want)
