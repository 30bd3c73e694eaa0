"""Property tests of one SGLD step against a float64 NumPy hand computation.

The rule (devinterp's ``SGLD``), with mask ``m`` (1 where absent):

    w' = w - (lr/2) m (nbeta g + wd w + loc (w - w0)) + sqrt(lr) m sigma eta,

clamped to ``[w0 - b, w0 + b]`` when ``bounding_box_size=b``. The noise ``eta``
of leaf ``i`` (``jax.tree_util`` flatten order) is reconstructed as
the float64 reference of ``sgld_testing`` for the key
``jax.random.fold_in(step_key, i)``, with
``_, step_key = jax.random.split(state.key)``.

Examples run the update eagerly: every example has its own shapes, dtypes and
structure, and compiling each one would dominate the run time. The jitted
update is checked against the same rule in ``test_compose.py``.
"""

from __future__ import annotations


import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sgld_optax as so
from sgld_testing import SAMPLERS, quiet_sgld_warnings, reference_step_noise
from sgld_optax._src import metrics as metrics_lib

SETTINGS = settings(deadline=None, max_examples=40, derandomize=True,
                    database=None)
FEW = settings(SETTINGS, max_examples=15)

DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}
# Unit roundoff of each dtype and the smallest magnitude it resolves.
EPS = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11,
       "float64": 2.0**-53}
TINY = {"float32": 1e-30, "bfloat16": 1e-30, "float16": 6e-8, "float64": 0.0}

SHAPES = [(), (1,), (3,), (2, 3), (2, 1, 3), (4, 2)]




def as_tree(leaves):
    """A nested pytree over ``leaves`` whose flatten order is ``leaves``."""
    return {"a": leaves[0], "b": tuple(leaves[1:])}


def dtype_name(x) -> str:
    return jnp.dtype(x.dtype).name


def oracle_noise(state_key, params):
    """The standard normal draws of the next step, as float64 NumPy arrays."""
    leaves = jax.tree_util.tree_leaves(params)
    return reference_step_noise(
        state_key, leaves,
        [jnp.float64 if p.dtype == jnp.float64 else jnp.float32
         for p in leaves])


def hand_step(params, grads, initial, mask, noise, hp):
    """The rule in float64; returns per-leaf dicts of the step's pieces."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    g_leaves = treedef.flatten_up_to(grads)
    w0_leaves = treedef.flatten_up_to(initial)
    m_leaves = (treedef.flatten_up_to(mask) if mask is not None
                else [None] * len(leaves))
    lr, nb, sigma = hp["lr"], hp["nbeta"], hp["noise_level"]
    out = []
    for p, g, w0, m, eta in zip(leaves, g_leaves, w0_leaves, m_leaves, noise):
        w = np.asarray(p, np.float64)
        w0 = np.asarray(w0, np.float64)
        g = np.zeros_like(w) if g is None else np.asarray(g, np.float64)
        m = np.ones_like(w) if m is None else np.asarray(m, np.float64)
        sg = lr / 2 * nb * m * g
        loc = lr / 2 * hp["loc"] * m * (w - w0)
        wd = lr / 2 * hp["wd"] * m * w
        xi = np.sqrt(lr) * sigma * m * eta
        new = w - sg - loc - wd + xi
        bound = 0.0
        if hp["bbox"] is not None:
            new = np.clip(new, w0 - hp["bbox"], w0 + hp["bbox"])
            bound = np.abs(w0) + hp["bbox"]
        scale = (np.abs(w) + np.abs(sg) + np.abs(loc) + np.abs(wd)
                 + np.abs(xi) + np.abs(new) + bound)
        out.append(dict(new=new, sg=sg, loc=loc, wd=wd, xi=xi,
                        dist=m * (w - w0), offset=w - w0, mask=m,
                        scale=scale))
    return out


def make_tx(hp, mask=None, **kwargs):
    with quiet_sgld_warnings():
        return so.sgld(hp["lr"], nbeta=hp["nbeta"],
                       noise_level=hp["noise_level"], weight_decay=hp["wd"],
                       localization=hp["loc"],
                       bounding_box_size=hp["bbox"], mask=mask, **kwargs)


def assert_matches_rule(new_params, expected, k=8.0):
    """Leafwise |actual - expected| <= k * eps(dtype) * scale + tiny."""
    for i, (x, e) in enumerate(zip(jax.tree_util.tree_leaves(new_params),
                                   expected)):
        name = dtype_name(x)
        err = np.abs(np.asarray(x, np.float64) - e["new"])
        tol = k * EPS[name] * e["scale"] + TINY[name]
        worst = np.unravel_index(np.argmax(err - tol), err.shape)
        assert np.all(err <= tol), (
            f"leaf {i} ({name}): error {err[worst]} exceeds tolerance "
            f"{tol[worst]} at {worst}")


def norm(pieces, key):
    return np.sqrt(sum(np.sum(p[key] ** 2) for p in pieces))


def dot(pieces, fa, fb):
    return sum(np.sum(fa(p) * fb(p)) for p in pieces)


# --------------------------------------------------------------------------
# Strategies.


log_uniform = lambda lo, hi: st.floats(lo, hi).map(lambda e: float(10.0**e))


@st.composite
def hyperparams(draw):
    return dict(
        lr=draw(log_uniform(-6, -1)),
        nbeta=draw(log_uniform(-1, 2.5).filter(lambda v: v != 1.0)),
        noise_level=draw(st.sampled_from([0.0, 0.3, 1.0, 1.0, 2.0])),
        wd=draw(st.just(0.0) | log_uniform(-3, 1)),
        loc=draw(st.just(0.0) | log_uniform(-3, 2)),
        bbox=draw(st.none() | st.floats(0.01, 10.0)),
    )


@st.composite
def problems(draw, dtypes=tuple(DTYPES)):
    """Params, initial params, grads (some None) and an optional mask."""
    n = draw(st.integers(1, 4))
    shapes = [draw(st.sampled_from(SHAPES)) for _ in range(n)]
    dts = [DTYPES[draw(st.sampled_from(dtypes))] for _ in range(n)]
    none_grad = [draw(st.integers(0, 4)) == 0 for _ in range(n)]
    mask_kind = draw(st.sampled_from([None, "bool", "float"]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    w0 = [jnp.asarray(2 * rng.normal(size=s), d) for s, d in zip(shapes, dts)]
    w = [(x.astype(jnp.float32) + jnp.asarray(0.5 * rng.normal(size=s),
                                              jnp.float32)).astype(d)
         for x, s, d in zip(w0, shapes, dts)]
    g = [None if none else jnp.asarray(3 * rng.normal(size=s), d)
         for none, s, d in zip(none_grad, shapes, dts)]
    mask = None
    if mask_kind is not None:
        bits = [rng.random(size=s) < 0.6 for s in shapes]
        mask = as_tree([b if mask_kind == "bool" else b.astype(np.float32)
                        for b in bits])
    return dict(initial=as_tree(w0), params=as_tree(w), grads=as_tree(g),
                mask=mask, seed=seed)


def one_step(prob, hp, **kwargs):
    tx = make_tx(hp, mask=prob["mask"], key=prob["seed"], **kwargs)
    state = tx.init(prob["initial"])
    updates, new_state = tx.update(prob["grads"], state, prob["params"])
    noise = oracle_noise(state.key, prob["params"])
    expected = hand_step(prob["params"], prob["grads"], prob["initial"],
                         prob["mask"], noise, hp)
    return tx, state, updates, new_state, expected


# --------------------------------------------------------------------------
# One step against the rule.


@SETTINGS
@given(prob=problems(), hp=hyperparams())
def test_step_matches_float64_rule(prob, hp):
    _, state, updates, new_state, expected = one_step(prob, hp)
    new_params = optax.apply_updates(prob["params"], updates)
    assert_matches_rule(new_params, expected)
    # Params and updates keep each leaf's dtype and shape.
    chex.assert_trees_all_equal_shapes_and_dtypes(new_params, prob["params"])
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, prob["params"])
    # The state keeps its structure, shapes and dtypes; the key is split.
    chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
    assert int(new_state.count) == int(state.count) + 1
    np.testing.assert_array_equal(
        jax.random.key_data(new_state.key),
        jax.random.key_data(jax.random.split(state.key)[0]))


@SETTINGS
@given(prob=problems(), hp=hyperparams())
def test_masked_elements_do_not_move(prob, hp):
    _, _, updates, _, expected = one_step(prob, hp)
    for u, e in zip(jax.tree_util.tree_leaves(updates), expected):
        # Like devinterp, the box clamps every element, masked or not: a
        # masked element stays put only while it is inside the box.
        frozen = e["mask"] == 0
        if hp["bbox"] is not None:
            frozen &= np.abs(e["offset"]) <= hp["bbox"]
        np.testing.assert_array_equal(np.asarray(u, np.float64)[frozen], 0.0)


@FEW
@given(prob=problems(), hp=hyperparams(), steps=st.integers(2, 4))
def test_several_steps_match_rule(prob, hp, steps):
    tx = make_tx(hp, mask=prob["mask"], key=prob["seed"])
    state = tx.init(prob["initial"])
    params = prob["params"]
    rng = np.random.default_rng(prob["seed"])
    for step in range(steps):
        grads = jax.tree.map(
            lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        expected = hand_step(params, grads, prob["initial"], prob["mask"],
                             oracle_noise(state.key, params), hp)
        updates, new_state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        assert_matches_rule(params, expected)
        chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
        assert int(new_state.count) == step + 1
        state = new_state
    chex.assert_trees_all_equal_shapes_and_dtypes(params, prob["params"])


@FEW
@given(prob=problems(dtypes=("float32",)), hp=hyperparams())
def test_float64_params_match_rule(prob, hp):
    with jax.enable_x64(True):
        prob = dict(prob)
        for name in ("initial", "params", "grads"):
            prob[name] = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64),
                                      prob[name])
        _, state, updates, new_state, expected = one_step(prob, hp)
        new_params = optax.apply_updates(prob["params"], updates)
        assert all(x.dtype == jnp.float64
                   for x in jax.tree_util.tree_leaves(new_params))
        assert_matches_rule(new_params, expected)
        chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
        assert new_state.count.dtype == jnp.int32


# --------------------------------------------------------------------------
# Metrics and sketches are the components of the step.


@SETTINGS
@given(prob=problems(), hp=hyperparams())
def test_metrics_equal_float64_component_norms(prob, hp):
    _, _, _, new_state, expected = one_step(prob, hp, save_metrics=True)
    m = so.get_metrics(new_state)
    assert m.numel.dtype == jnp.int32
    assert int(m.numel) == int(sum(np.count_nonzero(e["mask"])
                                   for e in expected))
    for field, key in [("scaled_grad", "sg"), ("unscaled_grad", "sg"),
                       ("localization", "loc"), ("weight_decay", "wd"),
                       ("noise", "xi"), ("distance", "dist")]:
        got = getattr(m, field)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(float(got), norm(expected, key),
                                   rtol=1e-4, atol=1e-30, err_msg=field)
    np.testing.assert_allclose(
        float(m.prior), np.hypot(norm(expected, "loc"), norm(expected, "wd")),
        rtol=1e-4, atol=1e-30)
    prior = lambda e: e["loc"] + e["wd"]
    for field, fa, fb in [
        ("dot_grad_prior", lambda e: e["sg"], prior),
        ("dot_grad_noise", lambda e: e["sg"], lambda e: e["xi"]),
        ("dot_prior_noise", prior, lambda e: e["xi"]),
    ]:
        bound = 1e-4 * np.sqrt(dot(expected, fa, fa) * dot(expected, fb, fb))
        assert abs(float(getattr(m, field)) - dot(expected, fa, fb)) <= (
            bound + 1e-30), field


@SETTINGS
@given(prob=problems(), hp=hyperparams(), sketch_dim=st.sampled_from([1, 5]),
       sketch_seed=st.integers(0, 1000))
def test_sketches_are_sketches_of_the_components(prob, hp, sketch_dim,
                                                   sketch_seed):
    _, _, updates, new_state, expected = one_step(
        prob, hp, sketch_dim=sketch_dim, sketch_seed=sketch_seed)
    buf = so.get_sketches(new_state)
    total = sum(e["sg"].size for e in expected)
    cs = so.CountSketch(total, sketch_dim, sketch_seed)
    idx, sgn = (np.asarray(a) for a in cs.buckets_and_signs(0, total))

    def hand_sketch(key):
        out = np.zeros(sketch_dim)
        flat = np.concatenate([e[key].ravel() for e in expected])
        np.add.at(out, idx, sgn * flat)
        return out

    for field, key in [("scaled_grad", "sg"), ("unscaled_grad", "sg"),
                       ("localization", "loc"), ("weight_decay", "wd"),
                       ("noise", "xi")]:
        got = np.asarray(getattr(buf, field), np.float64)
        assert got.shape == (sketch_dim,) and getattr(buf, field).dtype == (
            jnp.float32)
        scale = np.zeros(sketch_dim)
        np.add.at(scale, idx,
                  np.concatenate([np.abs(e[key]).ravel() for e in expected]))
        np.testing.assert_array_less(np.abs(got - hand_sketch(key)),
                                     1e-5 * scale + 1e-30, err_msg=field)

    if hp["bbox"] is None:
        # The components add up to the update: S u = S(xi - g - loc - wd).
        u = np.concatenate([np.asarray(x, np.float64).ravel()
                            for x in jax.tree_util.tree_leaves(updates)])
        su = np.zeros(sketch_dim)
        np.add.at(su, idx, sgn * u)
        parts = np.asarray(buf.noise, np.float64) - np.asarray(
            buf.scaled_grad) - np.asarray(buf.localization) - np.asarray(
                buf.weight_decay)
        scale = np.zeros(sketch_dim)
        np.add.at(scale, idx, np.concatenate(
            [e["scale"].ravel() for e in expected]))
        worst = max(EPS[dtype_name(x)]
                    for x in jax.tree_util.tree_leaves(updates))
        np.testing.assert_array_less(np.abs(su - parts),
                                     8 * worst * scale + 6e-8)


# --------------------------------------------------------------------------
# get_metrics aggregates several sgld states as one parameter vector.


@FEW
@given(prob=problems(dtypes=("float32",)), hp=hyperparams(),
       labels=st.lists(st.sampled_from("xyz"), min_size=4, max_size=4))
def test_get_metrics_aggregates_like_one_sampler(prob, hp, labels):
    hp = dict(hp, noise_level=0.0, bbox=None)
    leaves = jax.tree_util.tree_leaves(prob["params"])
    labels = as_tree(labels[:len(leaves)])
    used = sorted(set(jax.tree_util.tree_leaves(labels)))
    mask = prob["mask"]

    def sub_mask(label):
        # The mask of the leaves one sub-sampler sees, MaskedNode elsewhere.
        if mask is None:
            return None
        return jax.tree.map(lambda m, lab: m if lab == label
                            else optax.MaskedNode(), mask, labels)

    grads = jax.tree.map(lambda p: jnp.ones_like(p), prob["params"])
    single = make_tx(hp, mask=mask, save_metrics=True, key=prob["seed"])
    s_state = single.init(prob["initial"])
    _, s_state = single.update(grads, s_state, prob["params"])
    # Each sub-sampler with its own key (no noise here, so keys do not
    # change the metrics).
    multi = optax.multi_transform(
        {lab: make_tx(hp, mask=sub_mask(lab), save_metrics=True, key=i)
         for i, lab in enumerate(used)}, labels)
    m_state = multi.init(prob["initial"])
    _, m_state = multi.update(grads, m_state, prob["params"])
    got, want = so.get_metrics(m_state), so.get_metrics(s_state)
    for field in so.Metrics._fields:
        np.testing.assert_allclose(np.asarray(getattr(got, field)),
                                   np.asarray(getattr(want, field)),
                                   rtol=1e-5, atol=1e-12, err_msg=field)


@SETTINGS
@given(values=st.lists(
    st.lists(st.floats(-1e3, 1e3, width=32), min_size=10, max_size=10),
    min_size=1, max_size=4))
def test_aggregate_is_root_sum_square_and_sum(values):
    parts = [so.Metrics(*[jnp.asarray(abs(v) if i < 6 else v, jnp.float32)
                          for i, v in enumerate(row[:9])],
                        numel=jnp.asarray(int(abs(row[9])), jnp.int32))
             for row in values]
    got = metrics_lib.aggregate(parts)
    rows = np.asarray(values, np.float64)
    for i, field in enumerate(so.Metrics._fields[:6]):
        np.testing.assert_allclose(float(getattr(got, field)),
                                   np.sqrt(np.sum(rows[:, i] ** 2)),
                                   rtol=1e-5, atol=1e-30, err_msg=field)
    for i, field in enumerate(so.Metrics._fields[6:9], start=6):
        np.testing.assert_allclose(float(getattr(got, field)),
                                   np.sum(rows[:, i]), rtol=1e-5,
                                   atol=1e-3, err_msg=field)
    assert int(got.numel) == sum(int(abs(v)) for v in rows[:, 9])
    assert got.numel.dtype == jnp.int32


# --------------------------------------------------------------------------
# Bounding box.


@SETTINGS
@given(prob=problems(), hp=hyperparams(), bbox=st.floats(0.01, 1.0))
def test_bounding_box_holds(prob, hp, bbox):
    hp = dict(hp, bbox=bbox, lr=0.1, noise_level=2.0)
    _, _, updates, _, expected = one_step(prob, hp)
    new_params = optax.apply_updates(prob["params"], updates)
    for x, w0, w in zip(jax.tree_util.tree_leaves(new_params),
                        jax.tree_util.tree_leaves(prob["initial"]),
                        jax.tree_util.tree_leaves(prob["params"])):
        # The clamped point c is reached as w + (c - w): two roundings of
        # the size of w's and w0's last places.
        slack = 4 * EPS[dtype_name(x)] * (
            np.abs(np.asarray(w0, np.float64)) + bbox
            + np.abs(np.asarray(w, np.float64)))
        x, w0 = np.asarray(x, np.float64), np.asarray(w0, np.float64)
        assert np.all(np.abs(x - w0) <= bbox + slack)
    assert_matches_rule(new_params, expected)


# Every sampler of the family counts the sampled elements the same way.
@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_numel_counts_unmasked_elements(name, dtype):
    params = {"w": jnp.zeros((3, 4), DTYPES[dtype]), "b": jnp.zeros((), dtype)}
    mask = {"w": np.arange(12).reshape(3, 4) % 3 == 0, "b": np.array(True)}
    tx = SAMPLERS[name](1e-2, nbeta=2.0, mask=mask, save_metrics=True, key=0)
    _, state = tx.update(params, tx.init(params), params)
    assert int(so.get_metrics(state).numel) == 5
    tx = SAMPLERS[name](1e-2, nbeta=2.0, save_metrics=True, key=0)
    _, state = tx.update(params, tx.init(params), params)
    assert int(so.get_metrics(state).numel) == 13
