"""Shared test utilities."""

import contextlib
import functools
import importlib.util
import pathlib
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import random as jax_random

import sgld_optax as so


BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name):
    """Imports ``benchmarks/<name>.py`` (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(
        f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@contextlib.contextmanager
def quiet_sgld_warnings():
    """Silences the warnings sgld gives for noise_level != 1 and nbeta == 1."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="noise_level=",
                                category=UserWarning)
        warnings.filterwarnings("ignore", message="nbeta is 1",
                                category=UserWarning)
        yield


def threefry_words_reference(key, shape):
    """Both uint32 words of ``threefry2x32(key, (0, i))`` per element, by JAX.

    Uses ``jax.extend.random.threefry_2x32``, JAX's own Threefry, which is
    independent of the written-out rounds in ``sgld_optax``.
    """
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    n = int(np.prod(shape, dtype=np.int64))
    count = jnp.concatenate([jnp.zeros(n, jnp.uint32),
                             jnp.arange(n, dtype=jnp.uint32)])
    out = np.asarray(jax_random.threefry_2x32(key, count)).astype(np.uint64)
    return out[:n].reshape(shape), out[n:].reshape(shape)


def box_muller_reference(y0, y1):
    """The sampler's standard normal of Threefry words, in float64.

    The formula of ``sgld_optax._src.noise``: ``u`` is ``y0 | 1`` rounded
    down to 24 significant bits over 2**32, ``v`` the low 31 bits of ``y1``
    over 2**31, and ``z = sign * sqrt(-2 ln u) * cos(pi v / 2)`` with the sign
    from the top bit of ``y1``.
    """
    x = np.asarray(y0, np.uint64) | np.uint64(1)
    drop = np.maximum(0, np.floor(np.log2(x)).astype(np.int64) - 23)
    x = (x >> drop.astype(np.uint64)) << drop.astype(np.uint64)
    u = x / 2.0**32
    y1 = np.asarray(y1, np.uint64)
    v = (y1 % np.uint64(2**31)) / 2.0**31
    sign = np.where(y1 >= np.uint64(2**31), -1.0, 1.0)
    return sign * np.sqrt(-2.0 * np.log(u)) * np.cos(np.pi / 2 * v)


def reference_normal(key, shape, dtype=jnp.float32):
    """The noise ``sgld`` draws from ``key`` for a leaf, as float64 NumPy.

    Threefry keys with float32 or narrower dtypes use the float64 Box-Muller
    reference above (cast through ``dtype`` like the sampler's draw); other
    keys and float64 use ``jax.random.normal``, as the sampler does.
    """
    shape = tuple(shape)
    dtype = jnp.dtype(dtype)
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    threefry = not typed or str(jax.random.key_impl(key)) == "threefry2x32"
    if threefry and dtype.itemsize <= 4:
        z = box_muller_reference(*threefry_words_reference(key, shape))
        return np.asarray(jnp.asarray(z, jnp.float32).astype(dtype), np.float64)
    if not typed:
        key = jax.random.wrap_key_data(key)
    return np.asarray(jax.random.normal(key, shape, dtype), np.float64)


def reference_step_noise(state_key, leaves, dtypes=None):
    """The standard normals of the next step for each leaf, as float64.

    ``_, step_key = jax.random.split(state_key)`` and leaf ``i`` draws from
    ``jax.random.fold_in(step_key, i)``.
    """
    _, step_key = jax.random.split(state_key)
    dtypes = dtypes or [jnp.float32] * len(leaves)
    return [reference_normal(jax.random.fold_in(step_key, i), np.shape(p), dt)
            for i, (p, dt) in enumerate(zip(leaves, dtypes))]


def reference_noise_schedule(key, leaves, steps, dtypes=None):
    """The standard normals of ``steps`` consecutive steps, as float32.

    Entry ``[t][i]`` is the noise of leaf ``i`` at step ``t`` of a sampler
    whose state holds ``key`` before its first step (the state's key becomes
    ``jax.random.split(key)[0]`` after each step).
    """
    out = []
    for _ in range(steps):
        out.append([np.asarray(eta, np.float32)
                    for eta in reference_step_noise(key, leaves, dtypes)])
        key = jax.random.split(key)[0]
    return out


def queue_torch_normal(monkeypatch, torch_module):
    """Replaces ``torch.normal`` by draws from a queue of given noise.

    Returns the (initially empty) list the fake pops its standard normals
    from, first in first out; each call returns the next array, reshaped to
    ``size`` and multiplied by ``std``, as a float32 tensor. Extend the
    list with the noise of a step before devinterp takes it.
    """
    queue = []

    def fake_normal(mean, std, size, device=None, generator=None):
        del device, generator
        z = torch_module.tensor(np.asarray(queue.pop(0), np.float32))
        return mean + z.reshape(size) * std

    monkeypatch.setattr(torch_module, "normal", fake_normal)
    return queue


def count_sketch_reference(hash_indices, hash_signs, output_dim, vectors):
    """The count sketch of the concatenated flattened ``vectors``, in float64.

    ``S[j] = sum over i with hash_indices[i] == j of hash_signs[i] * v[i]``.
    """
    v = np.concatenate([np.asarray(x, np.float64).reshape(-1)
                        for x in vectors])
    out = np.zeros(output_dim, np.float64)
    np.add.at(out, np.asarray(hash_indices, np.int64),
              np.asarray(hash_signs, np.float64) * v)
    return out


# --------------------------------------------------------------------------
# The sampler family, for tests that every member must pass.

# Each factory with the hyperparameters of its own dynamics that the shared
# tests use: a friction that forgets the momentum within a few steps, so
# that a handful of steps exercises it.
FAMILY = {
    "sgld": (so.sgld, {}),
    "rmsprop_sgld": (so.rmsprop_sgld, {}),
    "sghmc": (so.sghmc, {"momentum_decay": 0.5}),
    "sgnht": (so.sgnht, {"diffusion_factor": 0.1}),
}


def make_sampler(name, learning_rate, **kwargs):
    """``FAMILY[name]``'s factory called with its extra hyperparameters."""
    factory, extra = FAMILY[name]
    return factory(learning_rate, **extra, **kwargs)


SAMPLERS = {name: functools.partial(make_sampler, name) for name in FAMILY}


def inject_sampler(name, learning_rate, static_args=("key",), **kwargs):
    """``SAMPLERS[name]`` through ``optax.inject_hyperparams``.

    The sampler's own extra hyperparameters (``momentum_decay``,
    ``diffusion_factor``) are passed at the call, so they are injected too.
    """
    factory, extra = FAMILY[name]
    return optax.inject_hyperparams(factory, static_args=static_args)(
        learning_rate, **extra, **kwargs)


def carried_over(name, state):
    """Per leaf (flatten order), the part of the next step that the state
    carries over from the last one, as float64 NumPy arrays.

    Zero for the Langevin samplers; ``(1 - alpha) v`` for ``sghmc`` with
    friction ``alpha``; ``(1 - zeta) v`` for ``sgnht`` with its thermostat
    ``zeta``. The rest of a step without a box is ``noise - scaled_grad -
    localization - weight_decay``, the components that metrics and sketches
    record.
    """
    if name in ("sgld", "rmsprop_sgld"):
        return None
    friction = (FAMILY[name][1]["momentum_decay"] if name == "sghmc"
                else np.float64(state.thermostat))
    return [(1.0 - friction) * np.asarray(v, np.float64)
            for v in jax.tree_util.tree_leaves(state.momentum)]


def unkey(tree):
    """``tree`` with every typed PRNG key replaced by its key data, so that
    ``chex`` can compare it."""
    def data(x):
        if (isinstance(x, jax.Array)
                and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)):
            return jax.random.key_data(x)
        return x
    return jax.tree.map(data, tree)
