r"""Standard normal noise for the sampler, fused into the update.

The bits come from Threefry-2x32 with 20 rounds (Salmon et al., 2011), JAX's
default generator. On CPU, JAX lowers it as a rolled loop, which keeps XLA
from fusing the rounds with each other and with the arithmetic that consumes
the noise; here the 20 rounds are written out, so that the bits, the
transform to a normal and the SGLD update compile into one elementwise loop.

Element $i$ (row-major flat index) of a draw of a given shape from key $k$
uses the block $(y_0, y_1) = \mathrm{threefry2x32}(k, (0, i))$ and the
cosine branch of the Box-Muller transform (Box & Muller, 1958):

$$
u = \frac{y_0 \,|\, 1}{2^{32}}, \qquad
v = \frac{y_1 \bmod 2^{31}}{2^{31}}, \qquad
z = (-1)^{\lfloor y_1 / 2^{31} \rfloor}
    \sqrt{-2 \ln u}\, \cos\!\left(\tfrac{\pi}{2} v\right),
$$

where $y_0 | 1$ is first rounded down to its 24 leading significant
bits (a float32 mantissa). With $U$ uniform on $(0, 1)$,
$\Theta$ uniform on $[0, \pi/2)$ and an independent random sign
$S$, $S \cos\Theta$ has the law of the cosine of an angle uniform
on $[0, 2\pi)$, so $z \sim N(0, 1)$ up to the discretisation of
$u$ (never 0 or 1; $|z| \le \sqrt{64 \ln 2} \approx 6.66$) and
of $v$. Blocks of different counters or keys are independent, so
elements, leaves (keys folded with the leaf index), steps (keys split every
step) and chains are too.

Only elementwise integer and float arithmetic is used: the logarithm splits
$u$ into a power of two (from the leading-zero count of $y_0$)
and a mantissa in $[\sqrt{1/2}, \sqrt{2})$, whose logarithm is a
degree-8 polynomial (absolute error below $10^{-7}$); the cosine is a
degree-5 polynomial in $v^2$ (absolute error below
$2 \times 10^{-7}$). Evaluated in float32, every draw is within
$10^{-6}$ of the formula above in float64 (tested).

Keys of other implementations (`rbg`, `unsafe_rbg`), float64 noise and
draws of $2^{32}$ or more elements use `jax.random.normal` instead.

References:
  Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3",
  SC 2011, https://doi.org/10.1145/2063384.2063405

  Box & Muller, "A note on the generation of random normal deviates", Ann.
  Math. Statist. 29(2), 1958, https://doi.org/10.1214/aoms/1177706645
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
      The two uint32 output words, shaped like `x0`.
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
    """uint32 row-major flat index of every element of `shape`."""
    if not shape:
        return jnp.zeros((), jnp.uint32)
    index = lax.broadcasted_iota(jnp.uint32, shape, 0)
    for dim in range(1, len(shape)):
        index = index * np.uint32(shape[dim]) + lax.broadcasted_iota(
            jnp.uint32, shape, dim)
    return index


def key_words(key: jax.Array):
    """The two uint32 words of a Threefry key, or `None` for other keys."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(key)) != "threefry2x32":
            return None
        data = jax.random.key_data(key)
    else:
        data = key
    return data[..., 0], data[..., 1]


def _with_words(key: jax.Array, y0, y1) -> jax.Array:
    """A key like `key` (typed or raw) holding the words `y0, y1`."""
    data = jnp.stack([y0, y1], axis=-1)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(data, impl="threefry2x32")
    return data


def fold_in(key: jax.Array, data) -> jax.Array:
    """`jax.random.fold_in(key, data)` with the Threefry rounds written out.

    For a Threefry key and `data` a non-negative int below `2**32` (a
    Python int or an integer scalar array, possibly traced) the result is the
    key `threefry2x32(key, (0, data))`, equal to JAX's own; other keys use
    `jax.random.fold_in`.
    """
    words = key_words(key)
    if words is None:
        return jax.random.fold_in(key, data)
    zero = jnp.zeros_like(words[0])
    data = (np.uint32(data) if isinstance(data, (int, np.integer))
            else jnp.asarray(data).astype(jnp.uint32))
    return _with_words(key, *threefry2x32(words[0], words[1], zero,
                                           zero + data))


def fold_in_range(key: jax.Array, n: int) -> list:
    """`[jax.random.fold_in(key, i) for i in range(n)]` in one Threefry call.

    For a Threefry key, key `i` is `threefry2x32(key, (0, i))`, JAX's
    `fold_in`; the `n` blocks are computed as one vectorised call, which
    keeps the compiled program small. Other keys use `jax.random.fold_in`.
    """
    words = key_words(key)
    if words is None:
        return [jax.random.fold_in(key, i) for i in range(n)]
    count = jnp.arange(n, dtype=jnp.uint32)
    y0, y1 = threefry2x32(words[0], words[1], jnp.zeros_like(count), count)
    return [_with_words(key, y0[i], y1[i]) for i in range(n)]


def split(key: jax.Array):
    """`jax.random.split(key)` (two keys) with the Threefry rounds written out.

    With JAX's default `jax_threefry_partitionable`, key `j` of the split
    is `threefry2x32(key, (0, j))`; this computes the same two keys without
    the rolled loop JAX lowers the rounds to on CPU. Other keys use
    `jax.random.split`.
    """
    words = key_words(key)
    if words is None or not jax.config.jax_threefry_partitionable:
        return tuple(jax.random.split(key))
    return tuple(fold_in_range(key, 2))


def threefry_words(key: jax.Array, shape):
    """The two uint32 Threefry words of every element of a draw of `shape`.

    Element `i` (row-major flat index) gets `threefry2x32(key, (0, i))`.

    Raises:
      ValueError: if `key` is not a Threefry key.
    """
    words = key_words(key)
    if words is None:
        raise ValueError("threefry_words needs a threefry2x32 key.")
    index = _flat_index(tuple(shape))
    return threefry2x32(words[0], words[1], jnp.zeros_like(index), index)


# ln(1 + t) / t on [sqrt(1/2) - 1, sqrt(2) - 1], and cos(pi v / 2) as a
# polynomial in v**2 on [0, 1]: float32 Chebyshev least-squares fits.
_LOG_COEFFS = (1.0, -0.4999999403953552, 0.33333998918533325,
               -0.2500135600566864, 0.1996299922466278, -0.1658325046300888,
               0.14908719062805176, -0.14196017384529114, 0.08632376790046692)
_COS_COEFFS = (1.0, -1.2337005138397217, 0.2536693513393402,
               -0.020862795412540436, 0.0009178587351925671,
               -2.38830762100406e-05)
_SQRT2_MANTISSA = np.uint32(0x3504F3)  # mantissa bits of float32 sqrt(2)


def _horner(x, coeffs):
    acc = np.float32(coeffs[-1])
    for c in coeffs[-2::-1]:
        acc = acc * x + np.float32(c)
    return acc


def _minus_two_log(y0: jax.Array) -> jax.Array:
    r"""$-2 \ln u$ for $u = (y_0 | 1) / 2^{32}$, in float32."""
    x = y0 | np.uint32(1)
    zeros = lax.clz(x)
    # 23 mantissa bits after the leading one.
    mantissa = ((x << zeros) >> np.uint32(8)) & np.uint32(0x7FFFFF)
    # u = m * 2**e with m in [1, 2) and e = -(zeros + 1); fold m >= sqrt(2)
    # into [sqrt(1/2), 1) so that ln m is small where u is close to 1.
    big = mantissa >= _SQRT2_MANTISSA
    exponent_bits = jnp.where(big, np.uint32(0x3F000000), np.uint32(0x3F800000))
    m = lax.bitcast_convert_type(mantissa | exponent_bits, jnp.float32)
    e = big.astype(jnp.float32) - (zeros + np.uint32(1)).astype(jnp.float32)
    t = m - np.float32(1.0)
    log_u = t * _horner(t, _LOG_COEFFS) + e * np.float32(math.log(2.0))
    return np.float32(-2.0) * log_u


def normal_from_words(y0: jax.Array, y1: jax.Array) -> jax.Array:
    """float32 standard normals from Threefry words, by Box-Muller (module doc)."""
    radius = jnp.sqrt(_minus_two_log(y0))
    v = (y1 & np.uint32(0x7FFFFFFF)).astype(jnp.float32) * np.float32(2.0**-31)
    z = radius * _horner(v * v, _COS_COEFFS)
    sign = y1 & np.uint32(0x80000000)
    return lax.bitcast_convert_type(
        lax.bitcast_convert_type(z, jnp.uint32) ^ sign, jnp.float32)


def standard_normal(key: jax.Array, shape, dtype=jnp.float32, *,
                    shared: bool = False) -> jax.Array:
    """Draws standard normal noise of `shape` in `dtype` from `key`.

    For a Threefry key, a float32 (or narrower) dtype and fewer than
    $2^{32}$ elements, the draw is the fused Box-Muller draw of the
    module docstring (computed in float32, then cast); otherwise it is
    `jax.random.normal(key, shape, dtype)`.

    Args:
      key: a PRNG key (typed, or raw `uint32[2]` Threefry key data).
      shape: the shape of the draw.
      dtype: its floating-point dtype.
      shared: whether several computations will read the draw (the update
        and the reductions of the sampler's metrics, for example). The values
        are the same either way; on CPU, a shared fused draw is computed once
        and kept in memory for its readers (see `computed_once`).
    """
    shape = tuple(shape)
    dtype = jnp.dtype(dtype)
    words = key_words(key)
    fused = (words is not None and dtype.itemsize <= 4
             and math.prod(shape) < 2**32)
    if not fused:
        if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)
        return jax.random.normal(key, shape, dtype)
    z = normal_from_words(*threefry_words(key, shape))
    if shared:
        z = computed_once(z)
    return z.astype(dtype)


# Every fused draw z has |z| < 6.67 < 16, so fmod(z, 16) == z.
_BOUND = np.float32(16.0)


def _exact_remainder(z: jax.Array) -> jax.Array:
    return lax.rem(z, _BOUND)


def computed_once(z: jax.Array) -> jax.Array:
    r"""The fused draw `z` itself, computed once on CPU whatever reads it.

    XLA fuses cheap elementwise producers into each of their consumers, and
    counts the Threefry rounds and the polynomials of the Box-Muller
    transform as cheap: on CPU, a draw read by the update and by the
    reductions of the metrics was computed again inside several of them
    (the noise then took most of a step with metrics). A floating-point
    remainder counts as expensive, and XLA does not duplicate those into
    several consumers, so on CPU this returns
    $\operatorname{fmod}(z, 16)$, which equals `z` (a remainder is
    exact in IEEE arithmetic, and $|z| < 16$): the draw is computed
    in one loop, written to memory and read by every consumer. A single
    consumer still fuses it into its own loop. (Under XLA's
    `xla_cpu_enable_fast_math` a draw of $-0$ may come back as
    $+0$; draws are never subnormal, which fast math would flush.)

    On other platforms `z` is returned unchanged, fused as their compilers
    decide: the duplication and its cure were measured on CPU only.

    Args:
      z: a fused draw from `normal_from_words` (float32, finite,
        $|z| < 16$).

    Returns:
      An array equal to `z`, element for element.
    """
    return lax.platform_dependent(z, cpu=_exact_remainder,
                                  default=lambda x: x)
