"""``so.compiler_options``: which options, and that they change nothing but speed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sgld_optax as so
from sgld_optax._src import xla_options

WIDE = {"xla_cpu_prefer_vector_width": 512}


def test_wide_vectors_on_an_avx512_cpu(monkeypatch):
    monkeypatch.setattr(xla_options, "_cpu_has_avx512", lambda: True)
    assert so.compiler_options("cpu") == WIDE
    # A fresh dict every call: callers may modify theirs.
    so.compiler_options("cpu")["extra"] = 1
    assert so.compiler_options("cpu") == WIDE


def test_nothing_without_avx512_or_off_cpu(monkeypatch):
    monkeypatch.setattr(xla_options, "_cpu_has_avx512", lambda: False)
    assert so.compiler_options("cpu") == {}
    monkeypatch.setattr(xla_options, "_cpu_has_avx512", lambda: True)
    assert so.compiler_options("gpu") == {}
    assert so.compiler_options("tpu") == {}


def test_an_option_this_compiler_rejects_is_left_out(monkeypatch):
    monkeypatch.setattr(xla_options, "_cpu_has_avx512", lambda: True)
    monkeypatch.setattr(xla_options, "_WIDE_VECTORS",
                        {"xla_cpu_no_such_option_anywhere": 1})
    assert so.compiler_options("cpu") == {}


def test_the_default_backend_is_used():
    options = so.compiler_options()
    assert options == so.compiler_options(jax.default_backend())
    # Whatever it returns compiles.
    assert float(jax.jit(lambda x: x * 2, compiler_options=options)(
        jnp.float32(1.5))) == 3.0


def _params():
    rng = np.random.default_rng(0)
    # Sizes that are not multiples of any vector width, so that the loops'
    # remainders are exercised too.
    return {"w": jnp.asarray(rng.normal(size=(37, 129)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(1000,)), jnp.float32),
            "h": jnp.asarray(rng.normal(size=(5,)), jnp.bfloat16)}


@pytest.mark.parametrize("kwargs", [
    {},
    {"save_metrics": True},
    {"sketch_dim": 64},
    {"weight_decay": 0.1, "save_metrics": True, "sketch_dim": 16},
])
def test_steps_are_bitwise_equal_with_wide_vectors(kwargs):
    # The options are for XLA's CPU compiler: compare on the CPU whatever
    # the default device (on a GPU a scatter-add's order of additions, and
    # so a sketch's last bits, may change from one run to the next).
    with jax.default_device(jax.devices("cpu")[0]):
        _check_bitwise_equal_with_wide_vectors(kwargs)


def _check_bitwise_equal_with_wide_vectors(kwargs):
    params = _params()
    grads = jax.tree.map(lambda x: 0.3 * x + 1, params)
    tx = so.sgld(1e-3, nbeta=10.0, localization=100.0, key=3, **kwargs)

    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    runs = []
    for options in (None, WIDE):
        f = jax.jit(step, compiler_options=options)
        p, s = params, tx.init(params)
        for _ in range(3):
            p, s = f(p, s, grads)
        runs.append((p, s))
    plain, wide = (jax.tree.leaves(r) for r in runs)
    assert len(plain) == len(wide)
    for a, b in zip(plain, wide):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The run moved the params, so the comparison compared something.
    assert not np.array_equal(np.asarray(runs[0][0]["w"]),
                              np.asarray(params["w"]))
