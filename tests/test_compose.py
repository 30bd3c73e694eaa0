"""``sgld`` composed with JAX transformations and optax wrappers.

Every update is checked against the rule of devinterp's ``SGLD``, computed in
float64 with NumPy, with the noise of leaf ``i`` reconstructed by the
float64 reference of ``sgld_testing`` from the key
``jax.random.fold_in(step_key, i)`` where
``_, step_key = jax.random.split(state.key)``.
"""

from __future__ import annotations

import json
import math
import os
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
from sgld_testing import quiet_sgld_warnings, reference_step_noise

EPS = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}




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
    return reference_step_noise(state_key, jax.tree_util.tree_leaves(params))


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


def key_data(key):
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(key))
    return np.asarray(key)


def find_sgld_states(opt_state):
    is_state = lambda x: isinstance(x, so.SGLDState)
    return [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=is_state)
            if is_state(x)]


# --------------------------------------------------------------------------
# jit, schedules and lax.scan.


def test_jit_does_not_retrace_and_schedules_follow_the_count():
    lr_schedule = lambda count: 1e-2 / (1.0 + count)
    nbeta_schedule = lambda count: 2.0 + 3.0 * count
    tx = so.sgld(lr_schedule, nbeta=nbeta_schedule, localization=0.5,
                 save_metrics=True, sketch_dim=4, key=3)
    params = make_params()
    initial = params
    state = tx.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for count in range(5):
        grads = make_grads(params, seed=count)
        expected = rule(params, grads, state.key, lr=lr_schedule(count),
                        nbeta=nbeta_schedule(count), loc=0.5, initial=initial)
        new_params, new_state = step(params, state, grads)
        assert_params_follow(new_params, expected, rtol=1e-5)
        chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
        assert int(new_state.count) == count + 1
        params, state = new_params, new_state


def test_lax_scan_carries_the_state():
    tx = so.sgld(1e-2, nbeta=4.0, localization=1.0, save_metrics=True,
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
    assert int(s_state.count) == 6
    np.testing.assert_array_equal(key_data(s_state.key), key_data(l_state.key))


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
def test_vmapped_chains(kind):
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


def test_equal_seeds_give_equal_chains_and_different_seeds_differ():
    params = make_params()
    grads = make_grads(params)

    def run(key):
        tx = so.sgld(1e-2, nbeta=4.0, key=key)
        return tx.update(grads, tx.init(params), params)[0]

    chex.assert_trees_all_equal(run(7), run(7))
    chex.assert_trees_all_equal(run(7), run(jax.random.key(7)))
    chex.assert_trees_all_equal(run(7), run(jax.random.PRNGKey(7)))
    assert not np.allclose(run(7)["w"], run(8)["w"])


# --------------------------------------------------------------------------
# optax.inject_hyperparams.


@pytest.mark.parametrize("static_args", [
    # BUG (core): fails; the default int ``sketch_seed`` becomes a traced
    # hyperparameter and sgld raises under jit even without sketching.
    ("key",),
    ("key", "sketch_seed"),
])
def test_inject_hyperparams_learning_rate_in_state(static_args):
    factory = optax.inject_hyperparams(so.sgld, static_args=static_args)
    tx = factory(1e-2, nbeta=4.0, key=5)
    params = make_params()
    grads = make_grads(params)
    state = tx.init(params)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(1e-2)
    step = jax.jit(tx.update)
    updates, new_state = step(grads, state, params)
    inner = state.inner_state
    assert_params_follow(optax.apply_updates(params, updates),
                         rule(params, grads, inner.key, lr=1e-2, nbeta=4.0),
                         rtol=1e-5)
    state = new_state
    state.hyperparams["learning_rate"] = jnp.asarray(4e-2)
    updates, _ = step(grads, state, params)
    assert_params_follow(
        optax.apply_updates(params, updates),
        rule(params, grads, state.inner_state.key, lr=4e-2, nbeta=4.0),
        rtol=1e-5)


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


def test_after_clip_by_global_norm_uses_clipped_grads():
    params = make_params()
    grads = make_grads(params, scale=10.0)
    gnorm = float(optax.tree.norm(grads))
    assert gnorm > 1.0
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     so.sgld(1e-2, nbeta=4.0, key=4))
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    clipped = jax.tree.map(lambda g: np.asarray(g, np.float64) / gnorm, grads)
    assert_params_follow(optax.apply_updates(params, updates),
                         rule(params, clipped, state[1].key, lr=1e-2,
                              nbeta=4.0), rtol=1e-5)


def test_apply_if_finite_skips_a_nan_step_entirely():
    params = make_params()
    tx = optax.apply_if_finite(
        so.sgld(1e-2, nbeta=4.0, localization=1.0, save_metrics=True, key=1),
        max_consecutive_errors=5)
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
    assert int(state.inner_state.count) == 1
    np.testing.assert_array_equal(key_data(state.inner_state.key),
                                  key_data(before.key))
    chex.assert_trees_all_equal(state.inner_state.metrics, before.metrics)
    chex.assert_trees_all_equal(so.get_metrics(state), before.metrics)

    good = make_grads(params, seed=3)
    updates, state = step(good, state, params)
    assert_params_follow(
        optax.apply_updates(params, updates),
        rule(params, good, before.key, lr=1e-2, nbeta=4.0, loc=1.0,
             initial=before.initial_params), rtol=1e-5)
    assert int(state.inner_state.count) == 2


def test_multi_steps_adds_noise_once_per_k_with_the_mean_grad():
    k = 3
    params = make_params()
    tx = optax.MultiSteps(so.sgld(1e-2, nbeta=4.0, key=6), every_k_schedule=k)
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
                assert int(state.inner_opt_state.count) == cycle
                np.testing.assert_array_equal(
                    key_data(state.inner_opt_state.key), key_data(inner.key))
            else:
                mean = jax.tree.map(
                    lambda *g: np.mean([np.asarray(x, np.float64) for x in g],
                                       0), *grads)
                assert_params_follow(
                    new_params, rule(params, mean, inner.key, lr=1e-2,
                                     nbeta=4.0), rtol=1e-5)
                assert int(state.inner_opt_state.count) == cycle + 1
                moved += 1
            params = new_params
    assert moved == 2


def test_multi_transform_freezes_set_to_zero_leaves():
    params = make_params()
    grads = make_grads(params)
    labels = {"w": "sample", "b": "sample", "s": "freeze"}
    tx = optax.multi_transform(
        {"sample": so.sgld(1e-2, nbeta=4.0, localization=1.0,
                           save_metrics=True, key=2),
         "freeze": optax.set_to_zero()}, labels)
    state = tx.init(params)
    sampler = state.inner_states["sample"].inner_state
    assert isinstance(sampler.initial_params["s"], optax.MaskedNode)
    chex.assert_trees_all_equal(
        {k: sampler.initial_params[k] for k in ("w", "b")},
        {k: params[k] for k in ("w", "b")})
    updates, state = jax.jit(tx.update)(grads, state, params)
    new_params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(updates["s"], 0.0)
    np.testing.assert_array_equal(new_params["s"], params["s"])
    # The sampler sees the sampled leaves only: leaf indices 0 ("b"), 1 ("w").
    sub = {"b": params["b"], "w": params["w"]}
    expected = rule(sub, {"b": grads["b"], "w": grads["w"]}, sampler.key,
                    lr=1e-2, nbeta=4.0, loc=1.0)
    assert_params_follow({"b": new_params["b"], "w": new_params["w"]},
                         expected, rtol=1e-5)
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

SHARDING_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import sgld_optax as so

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
    for sketch, native in ((False, False), (True, False), (False, True),
                           (True, True)):
        tx = so.sgld(1e-2, nbeta=4.0, localization=1.0, save_metrics=True,
                     sketch_dim=8 if sketch else None, key=0,
                     native_cpu=native)
        step = jax.jit(tx.update)
        ref_u, ref_s = step(grads, tx.init(params), params)
        for axis in ("explicit", "auto"):
            name = (f"{axis}-{'sketch' if sketch else 'plain'}"
                    + ("-native" if native else ""))
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
        name = ("shard_map-" + ("sketch" if sketch else "plain")
                + ("-native" if native else ""))
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
    env = dict(os.environ,
               XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS")][-1]
    return json.loads(line[len("RESULTS"):])


@pytest.mark.parametrize("config", [
    "auto-plain",
    "auto-sketch",
    "explicit-plain",
    "explicit-sketch",
    # The native CPU kernel leaves leaves split over an explicit mesh to XLA.
    "explicit-plain-native",
    "explicit-sketch-native",
])
def test_sharded_params_keep_sharding_and_values(sharding_results, config):
    res = sharding_results[config]
    assert res["ok"], res.get("error")
    assert res["devices"] == 4
    assert res["same_sharding"] and res["sharded"]
    assert res["max_diff"] <= 1e-6
    assert res["metrics_diff"] <= 1e-5
    assert res["sketch_diff"] <= 1e-5


@pytest.mark.parametrize("config", ["auto-plain-native", "auto-sketch-native"])
def test_native_kernel_under_an_auto_mesh_gathers(sharding_results, config):
    # Under an Auto mesh the sharding of a leaf is unknown when tracing: the
    # kernel's operands are gathered, so the values are right and the
    # updates come back replicated (documented in sgld's docstring).
    res = sharding_results[config]
    assert res["ok"], res.get("error")
    assert not res["sharded"]
    assert res["max_diff"] <= 1e-6
    assert res["metrics_diff"] <= 1e-5
    assert res["sketch_diff"] <= 1e-5


@pytest.mark.parametrize("config", [
    "shard_map-plain", "shard_map-sketch", "shard_map-plain-native",
    "shard_map-sketch-native"])
def test_under_shard_map_each_device_samples_its_block(sharding_results,
                                                       config):
    # Inside shard_map values are typed with the axes they vary along; the
    # sampler's platform-dependent parts (the native kernel, the GPU
    # sketch) must agree on those types, else tracing fails.
    res = sharding_results[config]
    assert res["ok"], res.get("error")
    assert res["max_diff"] <= 1e-6
    assert res["metrics_diff"] <= 1e-5
    assert res["sketch_diff"] <= 1e-5


# --------------------------------------------------------------------------
# dtypes and state contents.


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_low_precision_params_keep_their_dtype(dtype):
    params = make_params(jnp.dtype(dtype))
    tx = so.sgld(1e-2, nbeta=4.0, localization=1.0, weight_decay=0.1,
                 bounding_box_size=2.0, save_metrics=True, sketch_dim=4, key=1)
    state = tx.init(params)
    step = jax.jit(tx.update)
    initial = params
    for seed in range(3):
        grads = make_grads(params, seed=seed)
        expected = rule(params, grads, state.key, lr=1e-2, nbeta=4.0, wd=0.1,
                        loc=1.0, bbox=2.0, initial=initial)
        updates, new_state = step(grads, state, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
        new_params = optax.apply_updates(params, updates)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_params, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
        assert_params_follow(new_params, expected)
        params, state = new_params, new_state
    chex.assert_trees_all_equal_shapes_and_dtypes(state.initial_params,
                                                  initial)
    assert state.metrics.noise.dtype == jnp.float32


@pytest.mark.parametrize("kwargs, kept", [
    ({}, False),
    ({"weight_decay": 0.1}, False),
    ({"localization": 0.0}, False),
    ({"localization": 1.0}, True),
    ({"bounding_box_size": 1.0}, True),
    ({"save_metrics": True}, True),
    ({"sketch_dim": 4}, True),
])
def test_initial_params_only_when_needed(kwargs, kept):
    params = make_params(jnp.bfloat16)
    state = so.sgld(1e-2, nbeta=4.0, **kwargs).init(params)
    if kept:
        chex.assert_trees_all_equal(state.initial_params, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(state.initial_params,
                                                      params)
    else:
        assert state.initial_params is None
    assert (state.metrics is not None) == kwargs.get("save_metrics", False)
    assert (state.sketch is not None) == ("sketch_dim" in kwargs)


# --------------------------------------------------------------------------
# get_metrics through wrappers.


def sampler(noise_level, mask=None, inject=False):
    kwargs = dict(nbeta=4.0, noise_level=noise_level, weight_decay=0.1,
                  localization=1.0, save_metrics=True, key=3, mask=mask)
    with quiet_sgld_warnings():
        if inject:
            return optax.inject_hyperparams(
                so.sgld, static_args=("key", "sketch_seed"))(1e-2, **kwargs)
        return so.sgld(1e-2, **kwargs)


LABELS = {"w": "x", "b": "y", "s": "y"}
WRAPPERS = {
    "chain": lambda nl: optax.chain(optax.clip_by_global_norm(1e3),
                                    sampler(nl)),
    "apply_if_finite": lambda nl: optax.apply_if_finite(sampler(nl), 3),
    "inject_hyperparams": lambda nl: sampler(nl, inject=True),
    "multi_transform": lambda nl: optax.multi_transform(
        {"x": sampler(nl), "y": sampler(nl)}, LABELS),
    "masked": lambda nl: optax.chain(
        optax.masked(sampler(nl), {"w": True, "b": False, "s": True}),
        optax.masked(sampler(nl), {"w": False, "b": True, "s": False})),
    "nested": lambda nl: optax.chain(
        optax.clip_by_global_norm(1e3),
        optax.apply_if_finite(optax.multi_transform(
            {"x": sampler(nl, inject=True),
             "y": optax.chain(sampler(nl))}, LABELS), 3)),
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_get_metrics_through_wrappers(wrapper):
    with quiet_sgld_warnings():  # inject_hyperparams rebuilds sgld in init
        check_get_metrics_through(wrapper)


def check_get_metrics_through(wrapper):
    initial = make_params()
    params = make_grads(initial, seed=5)  # away from the initial params
    grads = make_grads(initial, seed=6)
    tx = WRAPPERS[wrapper](0.0)
    state = tx.init(initial)
    _, state = tx.update(grads, state, params)
    got = so.get_metrics(state)
    # Without noise, every split of the params gives the metrics of one
    # sampler over all of them.
    single = sampler(0.0)
    _, s_state = single.update(grads, single.init(initial), params)
    want = s_state.metrics
    for field in so.Metrics._fields:
        np.testing.assert_allclose(getattr(got, field), getattr(want, field),
                                   rtol=1e-5, atol=1e-12, err_msg=field)
    assert int(got.numel) == 17

    # With noise, norms combine as the root of summed squares and dot
    # products and numel add up.
    tx = WRAPPERS[wrapper](1.0)
    _, state = tx.update(grads, tx.init(initial), params)
    parts = [s.metrics for s in find_sgld_states(state)]
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


def test_get_sketches_with_two_sketching_samplers_is_an_error():
    params = make_params()
    tx = optax.multi_transform(
        {"x": so.sgld(1e-2, nbeta=4.0, sketch_dim=4),
         "y": so.sgld(1e-2, nbeta=4.0, sketch_dim=4)}, LABELS)
    with pytest.raises(ValueError, match="2 sgld states with sketches"):
        so.get_sketches(tx.init(params))


# --------------------------------------------------------------------------
# Errors and warnings.


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
def test_invalid_hyperparameters_raise(kwargs, error, match):
    kwargs = {"learning_rate": 1e-2, "nbeta": 4.0, **kwargs}
    lr = kwargs.pop("learning_rate")
    with quiet_sgld_warnings(), pytest.raises(error, match=match):
        so.sgld(lr, **kwargs)


@pytest.mark.parametrize("key", ["seed", 1.5, jax.random.split(
    jax.random.key(0), 2)])
def test_invalid_key_raises(key):
    with pytest.raises((TypeError, ValueError), match="key"):
        so.sgld(1e-2, nbeta=4.0, key=key).init(make_params())


def test_mask_structure_mismatch_raises():
    params = make_params()
    tx = so.sgld(1e-2, nbeta=4.0, mask={"w": np.ones((3, 4), bool)})
    with pytest.raises(ValueError, match="structure"):
        tx.init(params)


def test_mask_shape_mismatch_names_the_leaf_and_both_shapes():
    params = make_params()
    mask = {"w": np.ones((3, 4), bool), "b": np.ones((3,), bool),
            "s": np.array(True)}
    tx = so.sgld(1e-2, nbeta=4.0, mask=mask)
    with pytest.raises(ValueError) as info:
        tx.init(params)
    message = str(info.value)
    assert "['b']" in message and "(3,)" in message and "(4,)" in message
    assert "['w']" not in message


def test_update_without_params_raises():
    params = make_params()
    tx = so.sgld(1e-2, nbeta=4.0)
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))


def test_get_metrics_and_get_sketches_when_disabled_raise():
    params = make_params()
    state = so.sgld(1e-2, nbeta=4.0).init(params)
    with pytest.raises(ValueError, match="save_metrics"):
        so.get_metrics(state)
    with pytest.raises(ValueError, match="sketch_dim"):
        so.get_sketches(state)
    with pytest.raises(ValueError, match="no sgld state"):
        so.get_metrics(optax.sgd(0.1).init(params))


def test_warns_for_noise_level_and_nbeta_one():
    with pytest.warns(UserWarning, match="noise_level"):
        so.sgld(1e-2, nbeta=4.0, noise_level=0.5)
    with pytest.warns(UserWarning, match="nbeta"):
        so.sgld(1e-2, nbeta=1.0)
    with pytest.warns(UserWarning, match="nbeta"):
        so.sgld(1e-2)  # the default nbeta is 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        so.sgld(1e-2, nbeta=4.0, noise_level=1.0)
        so.sgld(1e-2, nbeta=lambda count: 1.0 + count)


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


@pytest.mark.parametrize("name", ["learning_rate", "nbeta", "weight_decay",
                                  "localization", "bounding_box_size"])
def test_non_finite_hyperparameters_are_rejected(name):
    kwargs = {"learning_rate": 0.1, "nbeta": 2.0, name: float("inf")}
    lr = kwargs.pop("learning_rate")
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        so.sgld(lr, **kwargs)


def test_mask_values_must_be_zero_or_one():
    with pytest.raises(ValueError, match="mask values must be 0 or 1"):
        so.sgld(0.1, nbeta=2.0, mask={"a": jnp.array([2.0, 0.0])})
    # Bools and 0/1 numbers are fine.
    so.sgld(0.1, nbeta=2.0, mask={"a": jnp.array([1.0, 0.0])})
    so.sgld(0.1, nbeta=2.0, mask={"a": jnp.array([True, False])})


def test_inject_hyperparams_without_static_key_says_how():
    tx = optax.inject_hyperparams(so.sgld)(0.1, nbeta=2.0)
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
