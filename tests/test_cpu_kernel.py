"""The native CPU kernel behind ``sgld(..., native_cpu=True)``.

Its updates, metrics and sketches are checked against a float64 oracle (the
SGLD rule, the metric definitions and a hand-built count sketch, with the
noise of the float64 reference of ``sgld_testing``), and against the XLA
step; its noise against the XLA step's, bit for bit.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sgld_optax as so
from sgld_optax._src import cpu_kernel, xla_options
from sgld_testing import quiet_sgld_warnings, reference_step_noise

LR, NBETA = 1e-3, 8.0

# More elements than one of the kernel's ranges (32768), odd shapes, a scalar.
SHAPES = {"big": (300, 401), "odd": (7, 3, 5), "vec": (1001,), "s": ()}


def make(seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32)
              for k, s in shapes.items()}
    grads = {k: jnp.asarray(rng.normal(size=s), jnp.float32)
             for k, s in shapes.items()}
    mask = {k: jnp.asarray(rng.random(size=s) < 0.7)
            for k, s in shapes.items()}
    return params, grads, mask


def oracle(params, grads, initial, key, *, loc, wd, box, mask, sketch):
    """float64 new params, Metrics fields and SketchBuffer fields of a step."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    flat = lambda t: [np.asarray(x, np.float64).reshape(-1)
                      for x in treedef.flatten_up_to(t)]
    w, g, w0 = flat(params), flat(grads), flat(initial)
    m = flat(mask) if mask is not None else [np.ones_like(x) for x in w]
    eta = [e.reshape(-1) for e in reference_step_noise(key, leaves)]
    w, g, w0, m, eta = (np.concatenate(v) for v in (w, g, w0, m, eta))
    d = w - w0
    a_g, a_l, a_w, a_x = LR / 2 * NBETA, LR / 2 * loc, LR / 2 * wd, math.sqrt(LR)
    comp = dict(g=a_g * m * g, l=a_l * m * d, w=a_w * m * w, x=a_x * m * eta)
    new = w - comp["g"] - comp["l"] - comp["w"] + comp["x"]
    if box is not None:
        new = np.clip(new, w0 - box, w0 + box)
    prior = comp["l"] + comp["w"]
    metrics = dict(
        scaled_grad=np.linalg.norm(comp["g"]),
        localization=np.linalg.norm(comp["l"]),
        weight_decay=np.linalg.norm(comp["w"]),
        noise=np.linalg.norm(comp["x"]),
        distance=np.linalg.norm(m * d),
        dot_grad_prior=comp["g"] @ prior,
        dot_grad_noise=comp["g"] @ comp["x"],
        dot_prior_noise=prior @ comp["x"],
        numel=m.sum())
    sketches = None
    if sketch is not None:
        idx, sgn = (np.asarray(a) for a in sketch.buckets_and_signs(0, w.size))

        def hand(v):
            out = np.zeros(sketch.output_dim)
            np.add.at(out, idx, np.asarray(sgn, np.float64) * v)
            return out
        sketches = dict(scaled_grad=hand(comp["g"]),
                        localization=hand(comp["l"]),
                        weight_decay=hand(comp["w"]), noise=hand(comp["x"]))
    return new, metrics, sketches


def flat_params(tree):
    return np.concatenate([np.asarray(x, np.float64).reshape(-1)
                           for x in jax.tree_util.tree_leaves(tree)])


def step(tx, params, grads, initial=None):
    state = tx.init(initial if initial is not None else params)
    return jax.jit(tx.update)(grads, state, params), state


CONFIGS = [
    dict(loc=0.0, wd=0.0, box=None, mask=False),
    dict(loc=50.0, wd=0.0, box=None, mask=False),
    dict(loc=0.0, wd=0.3, box=None, mask=True),
    dict(loc=50.0, wd=0.3, box=None, mask=True),
    dict(loc=50.0, wd=0.3, box=2e-3, mask=False),
    dict(loc=10.0, wd=0.0, box=2e-3, mask=True),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(
    f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("sketch_dim", [1000, 1024])
def test_native_step_matches_float64_oracle_and_xla(cfg, sketch_dim):
    params, grads, mask = make()
    initial = jax.tree.map(lambda x: x - 0.01, params)
    kwargs = dict(nbeta=NBETA, localization=cfg["loc"],
                  weight_decay=cfg["wd"], bounding_box_size=cfg["box"],
                  mask=mask if cfg["mask"] else None, save_metrics=True,
                  sketch_dim=sketch_dim, key=4)
    with quiet_sgld_warnings():
        native = so.sgld(LR, native_cpu=True, **kwargs)
        xla = so.sgld(LR, **kwargs)
    (u, s), state = step(native, params, grads, initial)
    (u_x, s_x), _ = step(xla, params, grads, initial)
    cs = so.CountSketch(flat_params(params).size, sketch_dim, 0)
    new, metrics, sketches = oracle(
        params, grads, initial, state.key, loc=cfg["loc"], wd=cfg["wd"],
        box=cfg["box"], mask=mask if cfg["mask"] else None, sketch=cs)

    tol = 8 * 2.0**-24
    got = flat_params(optax.apply_updates(params, u))
    np.testing.assert_allclose(got, new, rtol=tol, atol=tol)
    np.testing.assert_allclose(
        got, flat_params(optax.apply_updates(params, u_x)), rtol=tol, atol=tol)
    for name, want in metrics.items():
        np.testing.assert_allclose(float(getattr(s.metrics, name)), want,
                                   rtol=2e-5, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(float(getattr(s.metrics, name)),
                                   float(getattr(s_x.metrics, name)),
                                   rtol=2e-5, atol=1e-7, err_msg=name)
    for name, want in sketches.items():
        scale = max(np.abs(want).max(), 1e-30)
        np.testing.assert_allclose(np.asarray(getattr(s.sketch, name)), want,
                                   rtol=0, atol=1e-5 * scale, err_msg=name)
    np.testing.assert_array_equal(s.sketch.unscaled_grad, s.sketch.scaled_grad)


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("save_metrics", [False, True])
def test_native_noise_is_the_xla_noise_bit_for_bit(use_mask, save_metrics):
    # With zero gradients and no prior the update is sqrt(lr) * m * eta, a
    # single rounding of the noise, so both must give the same bits.
    params, grads, mask = make(1)
    zeros = jax.tree.map(jnp.zeros_like, grads)
    kwargs = dict(nbeta=NBETA, mask=mask if use_mask else None,
                  save_metrics=save_metrics, key=11)
    u_native, _ = step(so.sgld(LR, native_cpu=True, **kwargs), params, zeros)[0]
    u_xla, _ = step(so.sgld(LR, **kwargs), params, zeros)[0]
    for k in params:
        np.testing.assert_array_equal(u_native[k], u_xla[k], err_msg=k)
    assert float(jnp.max(jnp.abs(u_native["big"]))) > 0


def test_metrics_and_sketches_do_not_change_native_updates():
    params, grads, mask = make(2)
    updates = []
    for extra in ({}, {"save_metrics": True}, {"sketch_dim": 64},
                  {"save_metrics": True, "sketch_dim": 3}):
        tx = so.sgld(LR, nbeta=NBETA, localization=5.0, weight_decay=0.1,
                     mask=mask, key=2, native_cpu=True, **extra)
        updates.append(step(tx, params, grads)[0][0])
    for u in updates[1:]:
        for k in params:
            np.testing.assert_array_equal(u[k], updates[0][k], err_msg=k)


def test_native_results_do_not_depend_on_the_thread_count(tmp_path):
    if shutil.which("taskset") is None:
        pytest.skip("needs taskset to run on one core")
    script = textwrap.dedent("""
        import hashlib, jax, jax.numpy as jnp, numpy as np
        import sgld_optax as so
        rng = np.random.default_rng(0)
        params = {"a": jnp.asarray(rng.normal(size=(600, 700)), jnp.float32)}
        grads = {"a": jnp.asarray(rng.normal(size=(600, 700)), jnp.float32)}
        tx = so.sgld(1e-3, nbeta=10.0, localization=1.0, save_metrics=True,
                     sketch_dim=100, key=1, native_cpu=True)
        u, s = jax.jit(tx.update)(grads, tx.init(params), params)
        out = [np.asarray(u["a"]), *map(np.asarray, s.metrics),
               *map(np.asarray, s.sketch)]
        print("DIGEST", hashlib.sha256(b"".join(x.tobytes() for x in out))
              .hexdigest())
    """)
    digests = []
    for prefix in ([], ["taskset", "-c", "0"]):
        proc = subprocess.run(prefix + [sys.executable, "-c", script],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        digests.append([l for l in proc.stdout.splitlines()
                        if l.startswith("DIGEST")][-1])
    assert digests[0] == digests[1]


@pytest.mark.parametrize("k", [1, 3, 1024, 40000, 2**16])
def test_native_sketch_equals_a_hand_sketch(k):
    params, grads, _ = make(3, {"a": (70000,), "b": (513,)})
    tx = so.sgld(LR, nbeta=NBETA, sketch_dim=k, sketch_seed=5, key=0,
                 native_cpu=True)
    (_, state), _ = step(tx, params, grads)
    cs = so.CountSketch(70513, k, 5)
    idx, sgn = (np.asarray(a) for a in cs.buckets_and_signs(0, 70513))
    want = np.zeros(k)
    np.add.at(want, idx, sgn * flat_params(grads) * (LR / 2 * NBETA))
    np.testing.assert_allclose(np.asarray(state.sketch.scaled_grad), want,
                               rtol=0, atol=2e-5 * np.abs(want).max())


def assert_updates_close(u, u_xla):
    """Updates of the kernel and of XLA agree to float32 rounding."""
    for k in u:
        np.testing.assert_allclose(u[k], u_xla[k], rtol=1e-6, atol=1e-9)


def assert_state_close(state, state_xla):
    """Metrics and sketches of the kernel and of XLA agree to rounding."""
    for a, b in zip(state.metrics, state_xla.metrics):
        np.testing.assert_allclose(a, b, rtol=2e-5)
    for a, b in zip(state.sketch, state_xla.sketch):
        np.testing.assert_allclose(a, b, rtol=0,
                                   atol=1e-5 * float(jnp.max(jnp.abs(b))))


def _kernel_leaves(tx, params, grads):
    """How many leaves each call of the kernel in the traced step takes."""
    jaxpr = jax.make_jaxpr(tx.update)(grads, tx.init(params), params)
    calls = []

    def walk(jx):
        for eqn in jx.eqns:
            if (eqn.primitive.name == "ffi_call"
                    and eqn.params.get("target_name") == cpu_kernel._TARGET):
                calls.append(len(eqn.outvars) - 2)  # sums, sketch, updates
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)
    walk(jaxpr.jaxpr)
    return calls


def test_native_kernel_takes_the_float32_leaves_only():
    params, grads, _ = make(4)
    params["half"] = jnp.ones((5, 3), jnp.bfloat16)
    grads["half"] = jnp.ones((5, 3), jnp.bfloat16)
    kwargs = dict(nbeta=NBETA, localization=1.0, save_metrics=True,
                  sketch_dim=16, key=6)
    native = so.sgld(LR, native_cpu=True, **kwargs)
    assert _kernel_leaves(native, params, grads) == [4]  # one call
    assert _kernel_leaves(so.sgld(LR, **kwargs), params, grads) == []
    # The bfloat16 leaf goes through XLA and joins the kernel's results.
    (u, s), _ = step(native, params, grads)
    (u_x, s_x), _ = step(so.sgld(LR, **kwargs), params, grads)
    np.testing.assert_array_equal(u["half"], u_x["half"])
    assert_state_close(s, s_x)


@pytest.mark.parametrize("case", ["tables", "too-large", "rbg"])
def test_native_falls_back_where_the_kernel_does_not_apply(case):
    params, grads, _ = make(5, {"a": (300, 7), "b": (11,)})
    kwargs = dict(nbeta=NBETA, localization=1.0, save_metrics=True, key=3)
    if case == "tables":
        rng = np.random.default_rng(0)
        kwargs["sketch"] = so.CountSketch.from_tables(
            rng.integers(0, 8, 2111), rng.choice([-1, 1], 2111), 8)
    elif case == "too-large":
        kwargs["sketch_dim"] = cpu_kernel.MAX_SKETCH_DIM + 1
    else:
        kwargs["key"] = jax.random.key(3, impl="rbg")
        kwargs["sketch_dim"] = 8
    native = so.sgld(LR, native_cpu=True, **kwargs)
    xla = so.sgld(LR, **kwargs)
    (u, s), _ = step(native, params, grads)
    (u_x, s_x), _ = step(xla, params, grads)
    # Update and metrics by the kernel where it can; the sketch by XLA.
    assert _kernel_leaves(native, params, grads) == ([] if case == "rbg"
                                                     else [2])
    assert_updates_close(u, u_x)
    assert_state_close(s, s_x)


@pytest.mark.parametrize("backend,kernel", [
    ("cpu", True), ("cuda", False), ("rocm", False), ("tpu", False)])
def test_native_cpu_lowers_for_other_platforms_without_the_kernel(backend,
                                                                  kernel):
    # The kernel is registered for CPU only: a program lowered for an
    # accelerator (native_cpu=True in code that also runs on a GPU) must
    # take the XLA step, or it would not compile there.
    params, grads, _ = make(9, {"a": (30, 20), "b": (20,)})
    tx = so.sgld(LR, nbeta=NBETA, localization=1.0, save_metrics=True,
                 sketch_dim=8, key=1, native_cpu=True)
    traced = jax.jit(tx.update).trace(grads, tx.init(params), params)
    text = traced.lower(lowering_platforms=(backend,)).as_text()
    assert (cpu_kernel._TARGET in text) is kernel


def test_native_takes_leaves_without_gradients():
    # optax passes None for leaves it does not train (e.g. set_to_zero).
    params, grads, _ = make(8, {"a": (300, 5), "b": (7,)})
    grads["b"] = None
    kwargs = dict(nbeta=NBETA, localization=1.0, save_metrics=True,
                  sketch_dim=8, key=0)
    (u, s), _ = step(so.sgld(LR, native_cpu=True, **kwargs), params, grads)
    (u_x, s_x), _ = step(so.sgld(LR, **kwargs), params, grads)
    assert_updates_close(u, u_x)
    assert_state_close(s, s_x)


def assert_vmapped_chains_are_single_chains(tx, params, grads, seed,
                                            chains=3):
    """Steps ``chains`` vmapped chains (keys from ``seed``) and each alone:
    bitwise the same updates, metrics and sketches. Returns the updates."""
    state = tx.init(params)
    keys = jax.random.split(jax.random.key(seed), chains)
    states = jax.vmap(lambda k: state._replace(key=k))(keys)
    u, s = jax.jit(jax.vmap(tx.update, in_axes=(None, 0, None)))(
        grads, states, params)
    for c in range(chains):
        u_c, s_c = jax.jit(tx.update)(grads, state._replace(key=keys[c]),
                                      params)
        for k in params:
            np.testing.assert_array_equal(u[k][c], u_c[k])
        for a, b in zip(jax.tree.leaves((s.metrics, s.sketch)),
                        jax.tree.leaves((s_c.metrics, s_c.sketch))):
            np.testing.assert_array_equal(a[c], b)
    return u


def test_native_vmapped_chains_are_the_single_chains():
    params, grads, _ = make(6)
    tx = so.sgld(LR, nbeta=NBETA, localization=2.0, save_metrics=True,
                 sketch_dim=32, key=0, native_cpu=True)
    u = assert_vmapped_chains_are_single_chains(tx, params, grads, seed=9)
    assert not np.array_equal(u["big"][0], u["big"][1])


def test_native_vmapped_chains_take_one_kernel_call():
    # Under vmap the chains are stepped in one call, each chain's buffers
    # read in place (not one call per chain over sliced copies).
    params, grads, _ = make(10)
    tx = so.sgld(LR, nbeta=NBETA, localization=2.0, save_metrics=True,
                 key=0, native_cpu=True)
    states = jax.vmap(lambda k: tx.init(params)._replace(key=k))(
        jax.random.split(jax.random.key(1), 4))
    jaxpr = jax.make_jaxpr(jax.vmap(tx.update, in_axes=(None, 0, None)))(
        grads, states, params)
    calls, loops = [], []

    def walk(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "ffi_call":
                calls.append(eqn)
            if eqn.primitive.name in ("while", "scan"):
                loops.append(eqn)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)
    walk(jaxpr.jaxpr)
    assert len(calls) == 1 and not loops
    # One update per leaf, with the chains in front.
    assert [v.aval.shape for v in calls[0].outvars[2:]] == [
        (4,) + p.shape for p in jax.tree.leaves(params)]


def test_native_nested_vmaps_with_mixed_batching_are_the_single_chains():
    # Outer axis: params; inner: per-chain learning rates; both: keys. The
    # initial params, gradients and mask are shared. Each (outer, inner)
    # chain must be the chain stepped alone, bit for bit.
    params, grads, mask = make(11, {"a": (70, 30), "b": (33,)})
    tx = optax.inject_hyperparams(
        so.sgld, static_args=("key", "sketch_dim", "native_cpu",
                              "save_metrics", "mask"))(
        learning_rate=LR, nbeta=NBETA, localization=3.0, weight_decay=0.1,
        mask=mask, save_metrics=True, sketch_dim=40, key=0, native_cpu=True)
    state0 = tx.init(params)

    def one(p, key, lr):
        hyper = dict(state0.hyperparams, learning_rate=lr)
        state = state0._replace(
            hyperparams=hyper,
            inner_state=state0.inner_state._replace(key=key))
        u, new = tx.update(grads, state, p)
        return u, new.inner_state.metrics, new.inner_state.sketch

    outer = jax.tree.map(lambda x: jnp.stack([x, x + 0.01]), params)
    keys = jax.random.split(jax.random.key(3), (2, 3))
    lrs = jnp.asarray([LR, 2 * LR, 0.5 * LR], jnp.float32)
    batched = jax.jit(jax.vmap(jax.vmap(one, in_axes=(None, 0, 0)),
                               in_axes=(0, 0, None)))(outer, keys, lrs)
    single = jax.jit(one)
    for i in range(2):
        for j in range(3):
            want = single(jax.tree.map(lambda x: x[i], outer), keys[i, j],
                          lrs[j])
            got = jax.tree.map(lambda x: x[i, j], batched)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                np.testing.assert_array_equal(a, b)
    assert not np.array_equal(batched[0]["a"][0, 0], batched[0]["a"][0, 1])


def test_native_vmapped_large_sketches_run_in_waves():
    # A chain's range sketches for k = 2**16 fill the kernel's sketch
    # budget, so the chains are stepped a few at a time: same results.
    params, grads, _ = make(12, {"w": (70000,)})
    tx = so.sgld(LR, nbeta=NBETA, localization=2.0, sketch_dim=1 << 16,
                 key=0, native_cpu=True)
    assert_vmapped_chains_are_single_chains(tx, params, grads, seed=4)


def test_native_with_traced_hyperparameters():
    params, grads, _ = make(7)
    make_tx = lambda native: optax.inject_hyperparams(
        so.sgld, static_args=("key", "sketch_dim", "native_cpu",
                              "save_metrics"))(
        learning_rate=LR, nbeta=NBETA, localization=3.0, save_metrics=True,
        key=1, native_cpu=native)
    outs = []
    for native in (True, False):
        tx = make_tx(native)
        state = tx.init(params)
        state.hyperparams["learning_rate"] = jnp.asarray(2 * LR)
        u, new_state = jax.jit(tx.update)(grads, state, params)
        outs.append((u, so.get_metrics(new_state)))
    assert_updates_close(outs[0][0], outs[1][0])
    np.testing.assert_allclose(outs[0][1].noise, outs[1][1].noise, rtol=1e-5)
    # The traced rate reached the kernel: noise norm ~ sqrt(2 lr * numel).
    numel = sum(int(np.size(p)) for p in params.values())
    assert abs(float(outs[0][1].noise) / math.sqrt(2 * LR * numel) - 1) < 0.02


def test_every_update_loop_vectorises(tmp_path):
    # Each instance of the update loop must vectorise. When the compiler
    # stopped inlining the noise into them, the loops ran scalar and a step
    # took 8x as long, with every value still right.
    with open(cpu_kernel._SOURCE) as f:
        source = f.read()
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines, 1)
                 if line.startswith("void UpdateBlock("))
    end = next(i for i, line in enumerate(lines, 1)
               if i > start and line == "}")
    instances = int(re.search(r"make_integer_sequence<int, (\d+)>",
                              source).group(1))
    cmd = (cpu_kernel._compiler() + list(cpu_kernel._flags())
           + ["-fopt-info-vec-optimized", "-I", jax.ffi.include_dir(),
              cpu_kernel._SOURCE, "-o", str(tmp_path / "kernel.so")])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "opt-info" in proc.stderr:
        pytest.skip("the compiler does not report vectorisation (not GCC)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    vectorised = [int(m.group(1)) for m in re.finditer(
        r"cpu_kernel\.cc:(\d+):\d+: optimized: loop vectorized", proc.stderr)]
    assert sum(start <= n <= end for n in vectorised) >= instances


@pytest.mark.skipif(not xla_options._cpu_has_avx512(),
                    reason="512-bit vectors need an AVX-512 CPU")
def test_update_loops_use_512_bit_vectors_on_avx512(tmp_path):
    # Tuned for the AVX-512 server CPUs (Skylake to Sapphire Rapids), GCC
    # vectorises for 256-bit registers unless told otherwise; the
    # kernel's loops run about 1.5x as fast in 512-bit ones. The tuning is
    # forced here so the test means the same on any AVX-512 host.
    def zmm_lines(flags):
        out = tmp_path / "kernel.s"
        cmd = (cpu_kernel._compiler() + list(flags)
               + ["-S", "-I", jax.ffi.include_dir(), cpu_kernel._SOURCE,
                  "-o", str(out)])
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0 and "mtune" in proc.stderr:
            pytest.skip("the compiler does not know -mtune=skylake-avx512")
        assert proc.returncode == 0, proc.stderr[-3000:]
        # One instance of the update loop (a plain localized step).
        asm = out.read_text()
        name = re.escape("UpdateBlockILb0ELb1ELb0ELb0ELb1ELb0E")
        body = re.search(rf"^_Z\w*{name}\w*:\n(.*?)\.size", asm,
                         re.S | re.M).group(1)
        return sum("%zmm" in line for line in body.splitlines())

    assert set(cpu_kernel._WIDE_VECTOR_FLAGS) <= set(cpu_kernel._flags())
    tuned = ("-mtune=skylake-avx512",)
    assert zmm_lines(cpu_kernel._FLAGS + tuned) == 0
    assert zmm_lines(cpu_kernel._FLAGS + tuned
                     + cpu_kernel._WIDE_VECTOR_FLAGS) > 50


def test_native_cpu_must_be_a_bool():
    with pytest.raises(TypeError, match="native_cpu must be a bool"):
        so.sgld(LR, nbeta=NBETA, native_cpu="yes")


def test_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SGLD_OPTAX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(cpu_kernel.KernelUnavailable, match=r"\$CXX"):
        cpu_kernel._build()


def test_compiler_errors_are_reported(monkeypatch, tmp_path):
    compiler = tmp_path / "broken-c++"
    compiler.write_text("#!/bin/sh\necho 'error: no such thing' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("SGLD_OPTAX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(cpu_kernel.KernelUnavailable,
                       match="(?s)compiling the native CPU kernel failed.*"
                             "no such thing"):
        cpu_kernel._build()
    assert os.listdir(tmp_path / "cache") == []  # no half-written library


def test_built_kernel_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("SGLD_OPTAX_CACHE", str(tmp_path))
    path = cpu_kernel._build()
    stamp = os.stat(path).st_mtime_ns
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler-needed"))
    # A different compiler is a different cache entry...
    with pytest.raises(cpu_kernel.KernelUnavailable):
        cpu_kernel._build()
    monkeypatch.delenv("CXX")
    # ...and the same one finds the library it built.
    assert cpu_kernel._build() == path
    assert os.stat(path).st_mtime_ns == stamp


def test_cache_key_names_the_host_cpu(monkeypatch, tmp_path):
    # The library is built with -march=native: one built on another kind of
    # CPU (a cache directory shared across a cluster) can crash here with an
    # illegal instruction, so the host's target is part of the key.
    monkeypatch.setenv("SGLD_OPTAX_CACHE", str(tmp_path))
    cxx, flags = cpu_kernel._compiler(), cpu_kernel._flags()
    here = cpu_kernel._library_path(cxx, flags)
    assert cpu_kernel._library_path(cxx, flags) == here
    monkeypatch.setattr(cpu_kernel, "_target",
                        lambda cxx, flags: "-march=another-cpu -mno-avx2")
    assert cpu_kernel._library_path(cxx, flags) != here


@pytest.mark.skipif("avx2" not in xla_options._cpu_flags(),
                    reason="reads the AVX2 flag of an x86-64 CPU")
def test_target_spells_out_march_native():
    target = cpu_kernel._target(cpu_kernel._compiler(), cpu_kernel._flags())
    # GCC writes -mavx2, Clang +avx2.
    assert re.search(r"(-m|\+)avx2\b", target), target[-2000:]
