"""Standard normal noise for the sampler, fused into the update.

JAX's default generator is Threefry-2x32 with 20 rounds (Salmon et al., 2011).
On CPU, ``jax.random.normal`` lowers it as a rolled loop, which keeps XLA from
fusing the rounds with each other and with the arithmetic that consumes the
noise. Here the same 20 rounds are written out, so that the bits, the
transform to a normal and the SGLD update compile into one elementwise loop.

The stream is the one ``jax.random.bits`` draws for a Threefry key with
``jax_threefry_partitionable`` (the default; with it off, the noise comes
from ``jax.random.normal``): element ``i`` (row-major flat
index) is the XOR of the two words of ``threefry2x32(key, (0, i))``. The bits
are then mapped to a float32 uniform on ``[-1, 1)`` and through
:math:`\\sqrt{2}\\,\\mathrm{erf}^{-1}`, as ``jax.random.normal`` does. Keys of
other implementations (``rbg``, ``unsafe_rbg``) and float64 noise fall back
to ``jax.random.normal``.

References:
  Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3",
  SC 2011, https://doi.org/10.1145/2063384.2063405
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotl(x, d: int):
    return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def threefry2x32(k0, k1, x0, x1):
    """Threefry-2x32 with 20 rounds, written out for fusion.

    Args:
      k0, k1: uint32 scalars, the key words.
      x0, x1: uint32 arrays of one shape, the counter words.

    Returns:
      The two uint32 output words, shaped like ``x0``.
    """
    ks = (k0, k1, k0 ^ k1 ^ _PARITY)
    x0 = x0 + ks[0]
    x1 = x1 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = _rotl(x1, r)
            x1 = x0 ^ x1
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def _flat_index(shape) -> jax.Array:
    """uint32 row-major flat index of every element of ``shape``."""
    if not shape:
        return jnp.zeros((), jnp.uint32)
    index = lax.broadcasted_iota(jnp.uint32, shape, 0)
    for dim in range(1, len(shape)):
        index = index * np.uint32(shape[dim]) + lax.broadcasted_iota(
            jnp.uint32, shape, dim)
    return index


def key_words(key: jax.Array):
    """The two uint32 words of a Threefry key, or ``None`` for other keys."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(key)) != "threefry2x32":
            return None
        data = jax.random.key_data(key)
    else:
        data = key
    return data[..., 0], data[..., 1]


def _with_words(key: jax.Array, y0, y1) -> jax.Array:
    """A key like ``key`` (typed or raw) holding the words ``y0, y1``."""
    data = jnp.stack([y0, y1], axis=-1)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(data, impl="threefry2x32")
    return data


def fold_in(key: jax.Array, data: int) -> jax.Array:
    """``jax.random.fold_in(key, data)`` with the Threefry rounds written out.

    For a Threefry key the result is the key ``threefry2x32(key, (0, data))``,
    equal to JAX's own; other keys use ``jax.random.fold_in``.
    """
    words = key_words(key)
    if words is None:
        return jax.random.fold_in(key, data)
    zero = jnp.zeros_like(words[0])
    return _with_words(key, *threefry2x32(words[0], words[1], zero,
                                           zero + np.uint32(data)))


def split(key: jax.Array):
    """``jax.random.split(key)`` (two keys) with the Threefry rounds written out.

    With JAX's default ``jax_threefry_partitionable``, key ``j`` of the split
    is ``threefry2x32(key, (0, j))``; this computes the same two keys without
    the rolled loop JAX lowers the rounds to on CPU. Other keys use
    ``jax.random.split``.
    """
    words = key_words(key)
    if words is None or not jax.config.jax_threefry_partitionable:
        return tuple(jax.random.split(key))
    return fold_in(key, 0), fold_in(key, 1)


def random_bits(key: jax.Array, shape) -> jax.Array:
    """uint32 bits equal to ``jax.random.bits(key, shape)`` for a Threefry key."""
    words = key_words(key)
    if words is None:
        raise ValueError("random_bits needs a threefry2x32 key.")
    index = _flat_index(tuple(shape))
    y0, y1 = threefry2x32(words[0], words[1], jnp.zeros_like(index), index)
    return y0 ^ y1


def _normal_from_bits(bits: jax.Array) -> jax.Array:
    one = np.array(1.0, np.float32).view(np.uint32)
    floats = lax.bitcast_convert_type((bits >> np.uint32(9)) | one,
                                      jnp.float32) - np.float32(1.0)
    lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
    u = lax.max(lo, floats * (np.float32(1.0) - lo) + lo)
    return np.float32(np.sqrt(2.0)) * lax.erf_inv(u)


def standard_normal(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """Draws standard normal noise of ``shape`` in ``dtype`` from ``key``.

    For a Threefry key and a float32 (or narrower) dtype the draw is computed
    by the fused generator above; otherwise by ``jax.random.normal``.
    """
    shape = tuple(shape)
    dtype = jnp.dtype(dtype)
    words = key_words(key)
    fused = (words is not None and dtype.itemsize <= 4
             and math.prod(shape) < 2**32
             and jax.config.jax_threefry_partitionable)
    if not fused:
        if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)
        return jax.random.normal(key, shape, dtype)
    return _normal_from_bits(random_bits(key, shape)).astype(dtype)
