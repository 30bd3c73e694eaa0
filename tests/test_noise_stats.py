"""Statistical tests of the sampler's noise and of the count sketches.

All seeds are fixed. Bounds come from the sampling distributions of the
statistics (five standard errors, or Bonferroni-corrected quantiles), so a
correct implementation fails with negligible probability while a biased,
mis-scaled or correlated stream fails by a wide margin.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import sgld_optax as so
from sgld_optax._src import noise as noise_lib
from sgld_testing import (box_muller_reference, load_benchmark,
                          reference_step_noise, threefry_words_reference)

STEPS = 48


def sample_updates(lr, noise_level, params, steps=STEPS, key=0, chains=None):
    """Updates of ``steps`` steps with zero grads and no prior terms.

    Returns the per-leaf stacks of updates, shaped ``(steps, *leaf.shape)``
    (``(chains, steps, ...)`` when ``chains`` keys are given).
    """
    if noise_level != 1.0:
        with pytest.warns(UserWarning, match="noise_level"):
            tx = so.sgld(lr, nbeta=4.0, noise_level=noise_level, key=key)
    else:
        tx = so.sgld(lr, nbeta=4.0, key=key)
    zeros = jax.tree.map(jnp.zeros_like, params)

    def run(state):
        def body(state, _):
            updates, state = tx.update(zeros, state, params)
            return state, updates

        return jax.lax.scan(body, state, None, length=steps)[1]

    state = tx.init(params)
    if chains is None:
        return jax.jit(run)(state)
    keys = jax.random.split(jax.random.key(key), chains)
    states = jax.vmap(lambda k: state._replace(key=k))(keys)
    return jax.jit(jax.vmap(run))(states)


def corr(a, b):
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1]), a.size


PARAMS = {
    "a": jnp.zeros((2000,)),
    "b": jnp.zeros((2000,)),
    "c": jnp.zeros((10, 5, 8)),
    "s": jnp.zeros(()),
}


@pytest.fixture(scope="module", params=[(1e-2, 1.0), (0.3, 0.5)],
                ids=["lr1e-2", "lr0.3-noise0.5"])
def standardized(request):
    lr, noise_level = request.param
    ups = sample_updates(lr, noise_level, PARAMS)
    scale = math.sqrt(lr) * noise_level
    return {k: np.asarray(v, np.float64) / scale for k, v in ups.items()}


def test_noise_mean_and_variance(standardized):
    z = np.concatenate([v.reshape(STEPS, -1) for v in standardized.values()],
                       axis=1)
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1.0) < 5 * math.sqrt(2.0 / n)
    # Per element over the steps: means ~ N(0, 1/T), (T-1) s^2 ~ chi2(T-1).
    elems = z.shape[1]
    alpha = 1e-3 / elems
    assert np.max(np.abs(z.mean(0))) * math.sqrt(STEPS) < stats.norm.isf(
        alpha / 2)
    ss = (STEPS - 1) * z.var(0, ddof=1)
    assert ss.min() > stats.chi2.ppf(alpha / 2, STEPS - 1)
    assert ss.max() < stats.chi2.isf(alpha / 2, STEPS - 1)


def test_noise_is_standard_normal(standardized):
    z = np.concatenate([v.ravel() for v in standardized.values()])
    assert stats.kstest(z, "norm").pvalue > 1e-3


def test_noise_is_uncorrelated_across_steps_leaves_and_elements(standardized):
    a, b = standardized["a"], standardized["b"]
    r, n = corr(a[:-1], a[1:])  # serial, consecutive steps
    assert abs(r) < 5 / math.sqrt(n)
    r, n = corr(a, b)  # two leaves of one shape
    assert abs(r) < 5 / math.sqrt(n)
    r, n = corr(a[:, :-1], a[:, 1:])  # neighbouring elements of a leaf
    assert abs(r) < 5 / math.sqrt(n)
    c = standardized["c"].reshape(STEPS, -1)
    r, n = corr(c[:, :-1], c[:, 1:])
    assert abs(r) < 5 / math.sqrt(n)
    s = standardized["s"]  # the scalar leaf changes every step
    assert np.unique(s).size == STEPS


def test_noise_is_uncorrelated_across_vmapped_chains():
    ups = sample_updates(1e-2, 1.0, {"a": jnp.zeros((500,))}, steps=16,
                         chains=3)["a"]
    z = np.asarray(ups, np.float64) / 0.1
    assert z.shape == (3, 16, 500)
    assert abs(z.var() - 1.0) < 5 * math.sqrt(2.0 / z.size)
    for i in range(3):
        for j in range(i):
            r, n = corr(z[i], z[j])
            assert abs(r) < 5 / math.sqrt(n), (i, j, r)


def test_noise_scales_with_sqrt_learning_rate_and_noise_level():
    params = {"a": jnp.zeros((4000,))}
    base = np.asarray(sample_updates(1e-2, 1.0, params, steps=4)["a"])
    scaled = np.asarray(sample_updates(0.16, 0.5, params, steps=4)["a"])
    # Same key, so the same eta: sqrt(0.16) * 0.5 / sqrt(0.01) = 2.
    np.testing.assert_allclose(scaled, 2.0 * base, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------
# The fused generator: JAX's Threefry words through Box-Muller.

SHAPES = [(), (1,), (7,), (3, 5), (2, 3, 4), (2, 1, 3), (129,)]
KEYS = {
    "typed0": lambda: jax.random.key(0),
    "typed123": lambda: jax.random.key(123),
    "legacy42": lambda: jax.random.PRNGKey(42),
}


@pytest.mark.parametrize("key", list(KEYS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fused_words_equal_jax_threefry_and_normals_the_formula(key, shape):
    key = KEYS[key]()
    y0, y1 = noise_lib.threefry_words(key, shape)
    r0, r1 = threefry_words_reference(key, shape)
    np.testing.assert_array_equal(y0, r0.astype(np.uint32))
    np.testing.assert_array_equal(y1, r1.astype(np.uint32))
    z = noise_lib.standard_normal(key, shape)
    assert z.shape == shape and z.dtype == jnp.float32
    np.testing.assert_allclose(z, box_muller_reference(r0, r1), rtol=0,
                               atol=1e-6)


def test_fused_normals_match_float64_formula_over_many_draws():
    # 2**21 draws reach deep into both tails and close to u = 1 (radius 0).
    for seed in (1, 2):
        key = jax.random.key(seed)
        z = np.asarray(jax.jit(
            lambda k: noise_lib.standard_normal(k, (1 << 21,)))(key))
        want = box_muller_reference(*threefry_words_reference(key, (1 << 21,)))
        assert np.max(np.abs(z - want)) < 1e-6
        assert np.max(np.abs(want)) > 4.5


def test_shared_draw_is_the_same_draw():
    # Keeping a draw in memory for several readers changes no value.
    key = jax.random.key(5)
    for dtype in (jnp.float32, jnp.bfloat16):
        f = jax.jit(lambda k, shared: noise_lib.standard_normal(
            k, (1 << 20,), dtype, shared=shared), static_argnums=1)
        np.testing.assert_array_equal(f(key, True), f(key, False))
    z = np.asarray(f(key, True).astype(jnp.float32))
    assert np.isfinite(z).all() and np.abs(z).max() > 4.0


@pytest.mark.parametrize("platform,remainder", [
    ("cpu", True), ("cuda", False), ("rocm", False), ("tpu", False)])
def test_shared_draw_goes_through_a_remainder_on_cpu_only(platform,
                                                           remainder):
    traced = jax.jit(lambda k: noise_lib.standard_normal(
        k, (8,), shared=True)).trace(jax.random.key(0))
    text = traced.lower(lowering_platforms=(platform,)).as_text()
    assert ("stablehlo.remainder" in text) is remainder


def entry_kernels(hlo_text):
    """The kernels of a compiled program, by name (bench_lib's HLO reader)."""
    return load_benchmark("bench_lib").entry_instructions(hlo_text)


def threefry_kernels(hlo_text):
    """Kernels of a compiled step that compute Threefry rounds."""
    return [name for name, kernel in entry_kernels(hlo_text).items()
            if "threefry" in kernel.tags]


def compiled_step_text(params, **kwargs):
    tx = so.sgld(1e-3, nbeta=10.0, localization=100.0, key=0, **kwargs)

    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return jax.tree.map(jnp.add, p, updates), s

    jitted = jax.jit(step, donate_argnums=(0, 1))
    with jax.default_device(jax.devices("cpu")[0]):
        return jitted.lower(params, tx.init(params), params).compile().as_text()


STEP_PARAMS = {"w": jnp.ones((256, 192)), "b": jnp.ones(192),
               "v": jnp.ones((64, 32))}


@pytest.mark.parametrize("kwargs", [dict(save_metrics=True),
                                    dict(sketch_dim=64)],
                         ids=["metrics", "sketch"])
def test_compiled_step_computes_the_noise_once_per_leaf(kwargs):
    # The update and the reductions (or scatters) all read the noise; on
    # CPU each leaf's noise is drawn by one kernel, as in the plain step,
    # rather than recomputed inside each reader.
    plain = threefry_kernels(compiled_step_text(STEP_PARAMS))
    with_readers = threefry_kernels(compiled_step_text(STEP_PARAMS, **kwargs))
    assert len(plain) >= len(STEP_PARAMS)
    assert len(with_readers) == len(plain), with_readers


def test_fused_words_under_jit_and_vmap():
    keys = jax.random.split(jax.random.key(9), 3)
    got = jax.jit(jax.vmap(lambda k: noise_lib.threefry_words(k, (2, 3, 4))))(
        keys)
    for i, k in enumerate(keys):
        want = threefry_words_reference(k, (2, 3, 4))
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g[i], w.astype(np.uint32))


def test_other_generators_and_float64_use_jax_random_normal():
    with pytest.raises(ValueError, match="threefry"):
        noise_lib.threefry_words(jax.random.key(0, impl="rbg"), (3,))
    key = jax.random.key(0, impl="rbg")
    np.testing.assert_array_equal(noise_lib.standard_normal(key, (5,)),
                                  jax.random.normal(key, (5,)))
    with jax.enable_x64(True):
        key = jax.random.key(0)
        got = noise_lib.standard_normal(key, (5,), jnp.float64)
        assert got.dtype == jnp.float64
        np.testing.assert_array_equal(got,
                                      jax.random.normal(key, (5,), jnp.float64))


@pytest.fixture(scope="module")
def many_draws():
    """4M draws of the fused generator (one leaf of a 4M-parameter model)."""
    f = jax.jit(lambda k: noise_lib.standard_normal(k, (2048, 2048)))
    return np.asarray(f(jax.random.key(2024)), np.float64).ravel()


def test_many_draws_have_normal_moments_and_distribution(many_draws):
    z = many_draws
    n = z.size
    # Moments against their sampling standard errors under N(0, 1).
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1.0) < 5 * math.sqrt(2.0 / n)
    assert abs(stats.skew(z)) < 5 * math.sqrt(6.0 / n)
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24.0 / n)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    # Tails: counts beyond 2, 3, 4 and 4.5 sigma are binomial.
    for t in (2.0, 3.0, 4.0, 4.5):
        p = 2 * stats.norm.sf(t)
        count = np.count_nonzero(np.abs(z) > t)
        assert abs(count - n * p) < 5 * math.sqrt(n * p * (1 - p)) + 1, t
    # Chi-square over 200 equiprobable bins.
    edges = stats.norm.ppf(np.linspace(0, 1, 201)[1:-1])
    counts = np.bincount(np.searchsorted(edges, z), minlength=200)
    assert stats.chisquare(counts).pvalue > 1e-3


def test_many_draws_are_uncorrelated_and_symmetric(many_draws):
    z = many_draws
    for lag in (1, 2, 3, 64, 2048):
        r, n = corr(z[:-lag], z[lag:])
        assert abs(r) < 5 / math.sqrt(n), lag
    # Squares too: Box-Muller pairs radius and angle within a block only.
    r, n = corr(z[:-1] ** 2, z[1:] ** 2)
    assert abs(r) < 5 / math.sqrt(n)
    # Sign and magnitude are independent.
    pos = z > 0
    assert abs(pos.mean() - 0.5) < 5 * 0.5 / math.sqrt(z.size)
    assert stats.ks_2samp(np.abs(z[pos]), np.abs(z[~pos])).pvalue > 1e-3


# --------------------------------------------------------------------------
# Count sketches.


def hand_sketch(indices, signs, v, k):
    out = np.zeros(k)
    np.add.at(out, np.asarray(indices), np.asarray(signs, np.float64)
              * np.asarray(v, np.float64))
    return out


def test_sketch_inner_products_are_unbiased():
    d, k, seeds = 200, 16, 200
    rng = np.random.default_rng(0)
    # Vectors with a common mean: without random signs, collisions would add
    # a bias of about (sum v)(sum w)/k, far outside the error bound.
    v = 1.0 + 0.5 * rng.normal(size=d)
    w = 1.0 + 0.5 * rng.normal(size=d)
    vj, wj = jnp.asarray(v, jnp.float32), jnp.asarray(w, jnp.float32)
    dots, sq = [], []
    for seed in range(seeds):
        cs = so.CountSketch(d, k, seed)
        sv, sw = np.asarray(cs.sketch(vj), np.float64), np.asarray(
            cs.sketch(wj), np.float64)
        dots.append(sv @ sw)
        sq.append(sv @ sv)
    for est, exact in ((np.asarray(dots), v @ w), (np.asarray(sq), v @ v)):
        stderr = est.std(ddof=1) / math.sqrt(seeds)
        assert abs(est.mean() - exact) < 5 * stderr, (est.mean(), exact)
        # The spread is the count sketch's: Var ~ (|v|^2|w|^2 + <v,w>^2)/k.
        assert est.std() < 3 * math.sqrt((v @ v * (w @ w) + exact**2) / k)
    assert np.std(dots) > 0  # seeds give different hashes


def test_hashed_buckets_are_uniform_and_signs_balanced():
    d, k = 64_000, 64
    cs = so.CountSketch(d, k, seed=5)
    idx, sgn = (np.asarray(a) for a in cs.buckets_and_signs(0, d))
    assert idx.dtype == np.int32 and idx.min() >= 0 and idx.max() < k
    assert set(np.unique(sgn)) == {-1.0, 1.0}
    assert stats.chisquare(np.bincount(idx, minlength=k)).pvalue > 1e-3
    assert abs(sgn.mean()) < 5 / math.sqrt(d)
    # Equal seeds give equal hashes; other seeds other hashes.
    idx2, sgn2 = (np.asarray(a) for a in so.CountSketch(d, k, 5)
                  .buckets_and_signs(0, d))
    np.testing.assert_array_equal(idx, idx2)
    np.testing.assert_array_equal(sgn, sgn2)
    idx3, _ = so.CountSketch(d, k, 6).buckets_and_signs(0, d)
    assert np.mean(idx != np.asarray(idx3)) > 0.9


def random_tables(d, k, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, k, size=d), rng.choice([-1, 1], size=d)


@pytest.mark.parametrize("kind", ["hashed", "tables"])
def test_sketch_of_concatenation_is_sum_at_offsets(kind):
    sizes, k = [5, 1, 12, 7], 6
    d = sum(sizes)
    cs = (so.CountSketch(d, k, seed=3) if kind == "hashed"
          else so.CountSketch.from_tables(*random_tables(d, k), output_dim=k))
    rng = np.random.default_rng(1)
    pieces = [rng.normal(size=n).astype(np.float32) for n in sizes]
    whole = np.asarray(cs.sketch(jnp.asarray(np.concatenate(pieces))))
    buf, offset = jnp.zeros((k,), jnp.float32), 0
    for piece in pieces:
        buf = cs.scatter(buf, jnp.asarray(piece), offset)
        offset += piece.size
    np.testing.assert_allclose(np.asarray(buf), whole, rtol=1e-5, atol=1e-6)
    # Several columns at once sketch each column.
    cols = rng.normal(size=(d, 3)).astype(np.float32)
    got = np.asarray(cs.scatter(jnp.zeros((k, 3), jnp.float32),
                                jnp.asarray(cols), 0))
    for c in range(3):
        np.testing.assert_allclose(got[:, c],
                                   np.asarray(cs.sketch(jnp.asarray(
                                       cols[:, c]))), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["hashed", "tables", "one-row"])
def test_gpu_sketch_formulation_sums_the_same(kind):
    # On CUDA and ROCm the sampler sketches through per-row copies of the
    # buckets (fewer colliding atomic adds); it must sum what the CPU's
    # one-scatter-per-piece form sums. Pieces shorter than, equal to and
    # longer than the number of rows, with an uneven last row, and an empty
    # one.
    sizes = [1, 7, 0, 256, 2000, 1299]
    d = sum(sizes)
    k = 2**21 if kind == "one-row" else 13  # the scratch budget allows 1 row
    if kind == "tables":
        idx, sgn = random_tables(d, k, seed=6)
        cs = so.CountSketch.from_tables(idx, sgn, output_dim=k)
    else:
        cs = so.CountSketch(d, k, seed=9)
        idx, sgn = (np.asarray(a) for a in cs.buckets_and_signs(0, d))
    rng = np.random.default_rng(2)
    vectors = [rng.normal(size=d).astype(np.float32) for _ in range(3)]
    ends = np.cumsum(sizes)[:-1]
    pieces = list(zip(*[np.split(v, ends) for v in vectors]))
    private = cs._sketch_pieces_privatized(
        [[jnp.asarray(p) for p in piece] for piece in pieces])
    one_by_one = cs._sketch_pieces_one_by_one(
        [[jnp.asarray(p) for p in piece] for piece in pieces])
    for got, ref, v in zip(private, one_by_one, vectors):
        want = hand_sketch(idx, sgn, v.astype(np.float64), k)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("platform,private", [
    ("cuda", True), ("rocm", True), ("cpu", False), ("tpu", False)])
def test_sampler_sketches_through_rows_on_gpus_only(platform, private):
    # Lowered for each platform without running: the program for a GPU
    # holds the (rows, 2 k, 3) buffer, the others scatter into 2 k buckets.
    # Every platform's formulation is traced, an empty leaf's too.
    tx = so.sgld(1e-2, nbeta=4.0, localization=1.0, sketch_dim=8, key=1)
    params = {"w": jnp.ones((30, 20)), "e": jnp.ones((0, 3)),
              "b": jnp.ones(20)}
    traced = jax.jit(tx.update).trace(params, tx.init(params), params)
    text = traced.lower(lowering_platforms=(platform,)).as_text()
    assert ("tensor<256x16x3xf32>" in text) is private
    assert ("tensor<16xf32>" in text) is not private


def test_cpu_sketch_reads_the_vectors_in_place():
    # XLA's CPU compiler turns a scatter-add of n scalars into one of n
    # windows of shape (1,) and copies the values into an (n, 1) array on
    # the way; the sketch scatters (n, 1) windows, read where they lie.
    kernels = entry_kernels(compiled_step_text(STEP_PARAMS, sketch_dim=64))
    assert any(" scatter(" in k.called for k in kernels.values())
    n = 256 * 192
    copies = [name for name, k in kernels.items()
              if re.search(rf"f32\[{n},1\]\S* copy\(", k.called)]
    assert not copies, copies


def test_cpu_sketch_keeps_buckets_in_16_bits():
    # Indices into 2 x 64 buckets fit in 16 bits: the buckets XLA keeps in
    # memory for the three scatters of a leaf are int16, never int32.
    kernels = entry_kernels(compiled_step_text(STEP_PARAMS, sketch_dim=64))
    n = 256 * 192
    results = [k.result.split("{", 1)[0] for k in kernels.values()]
    assert f"s16[{n},1]" in results
    assert not [r for r in results if r.startswith(f"s32[{n}")]


@pytest.mark.parametrize("k", [2**14, 2**14 + 1, 40000])
def test_sketches_with_many_buckets_match_hand_sketch(k):
    # 2 k signed buckets: 16-bit indices up to k = 2**14, 32-bit beyond.
    d = 3000
    cs = so.CountSketch(d, k, seed=4)
    idx, sgn = (np.asarray(a) for a in cs.buckets_and_signs(0, d))
    assert idx.max() >= k // 2 and idx.max() < k
    v = np.random.default_rng(5).normal(size=d).astype(np.float32)
    got = np.asarray(jax.jit(cs.sketch)(jnp.asarray(v)))
    np.testing.assert_allclose(got, hand_sketch(idx, sgn, v, k), rtol=1e-5,
                               atol=1e-6)


def test_from_tables_reproduces_hand_computed_sketch():
    d, k = 300, 7
    idx, sgn = random_tables(d, k, seed=2)
    cs = so.CountSketch.from_tables(idx, sgn, output_dim=k)
    assert cs.input_dim == d and cs.output_dim == k
    assert cs.hash_indices.dtype == np.int32 and cs.hash_signs.dtype == np.int8
    np.testing.assert_array_equal(cs.hash_indices, idx)
    np.testing.assert_array_equal(cs.hash_signs, sgn)
    v = np.random.default_rng(3).normal(size=d).astype(np.float32)
    got = cs.sketch(jnp.asarray(v))
    assert got.shape == (k,) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), hand_sketch(idx, sgn, v, k),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        so.CountSketch.from_tables(idx, sgn, output_dim=int(idx.max()))
    with pytest.raises(ValueError):
        so.CountSketch.from_tables(idx, sgn * 2, output_dim=k)
    with pytest.raises(ValueError):
        so.CountSketch.from_tables(idx, sgn[:-1], output_dim=k)


def test_bytes_per_param():
    assert so.CountSketch(1000, 8, seed=1).bytes_per_param == 0
    assert so.CountSketch(1000, 8).hash_indices is None
    idx, sgn = random_tables(1000, 8)
    assert so.CountSketch.from_tables(idx, sgn, 8).bytes_per_param == 5


def sgld_components(params, grads, initial, mask, key, *, lr, nbeta, wd, loc):
    """Per-component flat float64 vectors of one step, by hand."""
    comps = {"scaled_grad": [], "localization": [], "weight_decay": [],
             "noise": []}
    leaves, treedef = jax.tree_util.tree_flatten(params)
    for p, g, w0, m, eta in zip(
            leaves, treedef.flatten_up_to(grads),
            treedef.flatten_up_to(initial), treedef.flatten_up_to(mask),
            reference_step_noise(key, leaves)):
        w, w0, g, m = (np.asarray(x, np.float64) for x in (p, w0, g, m))
        comps["scaled_grad"].append((lr / 2 * nbeta * m * g).ravel())
        comps["localization"].append((lr / 2 * loc * m * (w - w0)).ravel())
        comps["weight_decay"].append((lr / 2 * wd * m * w).ravel())
        comps["noise"].append((math.sqrt(lr) * m * eta).ravel())
    return {k: np.concatenate(v) for k, v in comps.items()}


@pytest.mark.parametrize("kind", ["dim", "prebuilt-hashed", "prebuilt-tables"])
def test_sgld_sketches_are_sketches_of_the_components(kind):
    rng = np.random.default_rng(4)
    shapes = {"w": (6, 5), "b": (5,), "s": ()}
    initial = {n: jnp.asarray(rng.normal(size=s), jnp.float32)
               for n, s in shapes.items()}
    params = jax.tree.map(
        lambda x: x + jnp.asarray(rng.normal(size=x.shape), jnp.float32),
        initial)
    grads = jax.tree.map(
        lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), initial)
    mask = {n: rng.random(size=s) < 0.7 for n, s in shapes.items()}
    d, k = 36, 8
    hp = dict(lr=1e-2, nbeta=5.0, wd=0.3, loc=2.0)
    if kind == "dim":
        cs, kwargs = so.CountSketch(d, k, seed=11), dict(sketch_dim=k,
                                                           sketch_seed=11)
    elif kind == "prebuilt-hashed":
        cs = so.CountSketch(d, k, seed=4)
        kwargs = dict(sketch=cs)
    else:
        cs = so.CountSketch.from_tables(*random_tables(d, k, 5), output_dim=k)
        kwargs = dict(sketch=cs)
    tx = so.sgld(hp["lr"], nbeta=hp["nbeta"], weight_decay=hp["wd"],
                 localization=hp["loc"], mask=mask, key=8, **kwargs)
    state = tx.init(initial)
    _, new_state = jax.jit(tx.update)(grads, state, params)
    buf = so.get_sketches(new_state)
    comps = sgld_components(params, grads, initial, mask, state.key, **hp)
    for field, vec in comps.items():
        assert np.linalg.norm(vec) > 0, field
        want = np.asarray(cs.sketch(jnp.asarray(vec, jnp.float32)))
        np.testing.assert_allclose(np.asarray(getattr(buf, field)), want,
                                   rtol=1e-5, atol=1e-6, err_msg=field)
    np.testing.assert_array_equal(buf.unscaled_grad, buf.scaled_grad)
    if kind == "prebuilt-tables":
        np.testing.assert_allclose(
            np.asarray(buf.noise),
            hand_sketch(cs.hash_indices, cs.hash_signs, comps["noise"], k),
            rtol=1e-5, atol=1e-6)


def test_prebuilt_sketch_must_match_the_number_of_params():
    tx = so.sgld(1e-2, nbeta=4.0, sketch=so.CountSketch(10, 4), key=0)
    with pytest.raises(ValueError, match="input_dim"):
        tx.init({"a": jnp.zeros((3, 4))})
    with pytest.raises(ValueError, match="sketch_dim"):
        so.sgld(1e-2, nbeta=4.0, sketch=so.CountSketch(12, 4), sketch_dim=5, key=0)
    with pytest.raises(ValueError, match="output_dim must be < 2"):
        so.CountSketch(12, 2**30)


@pytest.mark.parametrize("make_key", [lambda s: jax.random.key(s),
                                      lambda s: jax.random.PRNGKey(s)])
def test_written_out_split_and_fold_in_equal_jax(make_key):
    """The sampler derives its keys without JAX's rolled loop, same values."""

    def data(k):
        if jnp.issubdtype(k.dtype, jax.dtypes.prng_key):
            return np.asarray(jax.random.key_data(k))
        return np.asarray(k)

    for seed in (0, 1, 2**31 + 5):
        key = make_key(seed)
        ours, theirs = noise_lib.split(key), jax.random.split(key)
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(data(a), data(b))
            assert a.dtype == b.dtype
        for i in (0, 1, 17, 2**20 + 3):
            np.testing.assert_array_equal(data(noise_lib.fold_in(key, i)),
                                          data(jax.random.fold_in(key, i)))
        # All leaf keys of a step in one call; data traced under jit.
        for i, k in enumerate(noise_lib.fold_in_range(key, 7)):
            np.testing.assert_array_equal(data(k),
                                          data(jax.random.fold_in(key, i)))
        traced = jax.jit(lambda k, i: noise_lib.fold_in(k, i))(
            key, jnp.int32(12345))
        np.testing.assert_array_equal(data(traced),
                                      data(jax.random.fold_in(key, 12345)))
    # Batched keys, as in vmapped chains.
    keys = jax.random.split(jax.random.key(9), 5)
    got = jax.vmap(lambda k: jax.random.key_data(noise_lib.split(k)[1]))(keys)
    want = jax.vmap(lambda k: jax.random.key_data(jax.random.split(k)[1]))(keys)
    np.testing.assert_array_equal(got, want)
    got = jax.vmap(lambda k: jax.random.key_data(
        noise_lib.fold_in_range(k, 3)[2]))(keys)
    want = jax.vmap(lambda k: jax.random.key_data(
        jax.random.fold_in(k, 2)))(keys)
    np.testing.assert_array_equal(got, want)
