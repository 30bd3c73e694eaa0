r"""Count sketches of a sampler's update components.

A count sketch maps a vector $v \in \mathbb{R}^d$ to $S v \in \mathbb{R}^k$
through a bucket hash $h: [d] \to [k]$ and a sign hash
$s: [d] \to \{-1, +1\}$:

$$
(S v)_j = \sum_{i:\, h(i) = j} s(i)\, v_i .
$$

With independent random signs,
$E[\langle Sv, Sw\rangle] = \langle v, w\rangle$ (Charikar et al., 2002;
Weinberger et al., 2009), so inner products, norms and cosines between update
components of different steps or runs can be estimated from $k$-dimensional
sketches.

`CountSketch` hashes each index on the fly from the seed (a murmur3
finaliser applied twice; the low 31 bits give the bucket modulo $k$,
the top bit the sign), so it stores nothing per parameter: **0 bytes per
parameter**. `CountSketch.from_tables` builds one from explicit tables
(int32 bucket and int8 sign per input, **5 bytes per parameter**), e.g. to
reproduce another implementation's sketch exactly.

References:
  Charikar, Chen & Farach-Colton, "Finding frequent items in data streams",
  ICALP 2002, https://doi.org/10.1007/3-540-45465-9_59

  Weinberger, Dasgupta, Langford, Smola & Attenberg, "Feature hashing for large
  scale multitask learning", ICML 2009, https://doi.org/10.1145/1553374.1553516
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import numpy.typing  # noqa: F401

from sgld_optax._src import base

SKETCH_FIELDS = ("scaled_grad", "unscaled_grad", "localization",
                 "weight_decay", "noise")

_fmix32 = base.fmix32


def _fmix32_np(x: int) -> np.uint32:
    with np.errstate(over="ignore"):
        return _fmix32(np.uint32(x & 0xFFFFFFFF))


def _replicated(values) -> dict:
    """Keyword arguments that make a scatter-add's result replicated.

    Under an explicitly sharded mesh the sketch of sharded values is
    replicated; elsewhere (and on JAX versions without explicit sharding)
    there is nothing to say, and nothing is passed.
    """
    if not hasattr(jax, "typeof"):
        return {}
    sharding = jax.typeof(values).sharding
    if not getattr(getattr(sharding, "mesh", None), "explicit_axes", ()):
        return {}
    return {"out_sharding": sharding.update(
        spec=jax.sharding.PartitionSpec())}


def _scatter_add_windows(buffer, index, values):
    """`buffer.at[index].add(values)` for 1-D `buffer`, `index`, `values`.

    `index` must lie in `[0, len(buffer))`. Written as a scatter of
    `(n, 1)` windows rather than of `n` scalars: XLA's CPU compiler
    rewrites a scatter of scalars into this form and copies `values` into
    the new shape on the way (a pass over memory per vector sketched); given
    the windows, it reads `values` in place.
    """
    n = values.shape[0]
    if buffer.shape[-1] <= 2**15:
        # Every index fits in 16 bits. XLA computes a leaf's buckets once
        # and keeps them in memory for the scatters of its three vectors;
        # half the bytes to write, fault in and read back made the 4M
        # sketch step about 15% faster.
        index = index.astype(jnp.int16)
    dims = lax.ScatterDimensionNumbers(
        update_window_dims=(1,), inserted_window_dims=(),
        scatter_dims_to_operand_dims=(0,))

    def scatter(buffer, index, values):
        return lax.scatter_add(
            buffer, index.reshape(n, 1), values.reshape(n, 1), dims,
            mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)

    # As in _replicated: under an explicitly sharded mesh, the sum over
    # sharded values is replicated.
    sharding = _replicated(values).get("out_sharding")
    if sharding is not None:
        scatter = jax.sharding.auto_axes(scatter, out_sharding=sharding,
                                         axes=sharding.mesh.explicit_axes)
    return scatter(buffer, index, values)


class SketchBuffer(NamedTuple):
    """Count sketches of the five components of the last step.

    Each field is a float32 array of shape `(sketch_dim,)` (with leading
    chain axes when vmapped). The components are the ones of `Metrics`;
    `unscaled_grad` equals `scaled_grad` but for preconditioned samplers
    (`rmsprop_sgld`).
    """

    scaled_grad: jax.Array
    unscaled_grad: jax.Array
    localization: jax.Array
    weight_decay: jax.Array
    noise: jax.Array

    @classmethod
    def zeros(cls, sketch_dim: int) -> "SketchBuffer":
        """An all-zero buffer of `sketch_dim` buckets."""
        z = jnp.zeros((sketch_dim,), jnp.float32)
        return cls(z, z, z, z, z)


class CountSketch:
    """A count sketch from `input_dim` to `output_dim` dimensions.

    The default construction hashes indices on the fly and stores no table
    (0 bytes per parameter). Use `from_tables` for explicit tables.

    Args:
      input_dim: dimension $d$ of the vectors sketched. Inside
        `sgld_optax.sgld` it is the total number of parameters, leaves
        concatenated in `jax.tree_util` flatten order.
      output_dim: number of buckets $k$.
      seed: integer seed of the hashes; equal seeds give equal sketches.

    Examples:
      >>> import jax.numpy as jnp
      >>> import sgld_optax as so
      >>> cs = so.CountSketch(input_dim=1000, output_dim=64, seed=0)
      >>> v = jnp.ones(1000)
      >>> cs.sketch(v).shape
      (64,)
    """

    def __init__(self, input_dim: int, output_dim: int, seed: int = 0):
        for name, value in (("input_dim", input_dim), ("output_dim", output_dim)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {value!r}.")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        if input_dim >= 2**32:
            raise ValueError(f"input_dim must be < 2**32, got {input_dim}.")
        if output_dim >= 2**30:
            # Signed buckets index 2 * output_dim int32 slots.
            raise ValueError(f"output_dim must be < 2**30, got {output_dim}.")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int, got {seed!r}.")
        self.input_dim = int(input_dim)
        self.output_dim = int(output_dim)
        self.seed = int(seed)
        self.hash_indices = None
        self.hash_signs = None
        self._salts = (_fmix32_np(2 * self.seed + 1),
                       _fmix32_np((self.seed >> 32) ^ 0x9E3779B9))

    @classmethod
    def from_tables(cls, hash_indices: np.typing.ArrayLike,
                    hash_signs: np.typing.ArrayLike, output_dim: int
                    ) -> "CountSketch":
        """Builds a count sketch from explicit bucket and sign tables.

        Args:
          hash_indices: integer array of shape `(input_dim,)` with values in
            `[0, output_dim)`; stored as int32.
          hash_signs: array of shape `(input_dim,)` with values in
            `{-1, +1}`; stored as int8.
          output_dim: number of buckets.

        Returns:
          A `CountSketch` that uses these tables (5 bytes per input).

        Raises:
          ValueError: if the shapes disagree or values are out of range.
        """
        idx = np.asarray(hash_indices)
        sgn = np.asarray(hash_signs)
        if idx.ndim != 1 or sgn.shape != idx.shape:
            raise ValueError(
                "hash_indices and hash_signs must be 1-D of one length, got "
                f"shapes {idx.shape} and {sgn.shape}.")
        if idx.shape[0] == 0:
            raise ValueError("hash_indices must not be empty.")
        self = cls(int(idx.shape[0]), output_dim)
        if not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"hash_indices must be integers, got {idx.dtype}.")
        if idx.min() < 0 or idx.max() >= output_dim:
            raise ValueError(
                f"hash_indices must lie in [0, {output_dim}), got values in "
                f"[{idx.min()}, {idx.max()}].")
        if not np.all(np.abs(sgn) == 1):
            raise ValueError("hash_signs must be -1 or +1.")
        self.hash_indices = idx.astype(np.int32)
        self.hash_signs = sgn.astype(np.int8)
        return self

    @property
    def bytes_per_param(self) -> int:
        """Bytes stored per input coordinate: 0 when hashed, 5 with tables."""
        return 0 if self.hash_indices is None else 5

    def __repr__(self):
        kind = "hashed" if self.hash_indices is None else "tables"
        return (f"CountSketch(input_dim={self.input_dim}, "
                f"output_dim={self.output_dim}, seed={self.seed}, {kind})")

    def _signed_buckets(self, offset: int, size: int) -> jax.Array:
        """int32 `bucket + output_dim * (sign < 0)` of each input.

        Scattering into `2 * output_dim` buckets by this index and
        subtracting the second half from the first applies the signs without
        multiplying the values by them.
        """
        if offset < 0 or offset + size > self.input_dim:
            raise ValueError(
                f"inputs [{offset}, {offset + size}) are outside "
                f"[0, {self.input_dim}).")
        k = self.output_dim
        if self.hash_indices is not None:
            idx = jnp.asarray(self.hash_indices[offset:offset + size])
            neg = jnp.asarray(self.hash_signs[offset:offset + size] < 0)
            return idx + k * neg.astype(jnp.int32)
        s1, s2 = self._salts
        i = jax.lax.iota(jnp.uint32, size) + np.uint32(offset)
        x = _fmix32(_fmix32(i ^ s1) + s2)
        # Bucket from the low 31 bits, sign from the top bit.
        bucket = (x & np.uint32(0x7FFFFFFF)) % np.uint32(k)
        neg = x >> np.uint32(31)
        return (bucket + np.uint32(k) * neg).astype(jnp.int32)

    def buckets_and_signs(self, offset: int, size: int):
        """Buckets (int32) and signs (float32) of inputs `offset .. offset+size-1`."""
        signed = self._signed_buckets(offset, size)
        k = self.output_dim
        neg = signed >= k
        return (jnp.where(neg, signed - k, signed),
                jnp.where(neg, np.float32(-1.0), np.float32(1.0)))

    def scatter(self, buffer: jax.Array, values: jax.Array, offset: int
                ) -> jax.Array:
        """Adds the sketch of `values` placed at `offset` into `buffer`.

        By linearity, sketching a concatenation equals summing the sketches
        of its pieces, each at its offset.

        Args:
          buffer: float32 array `(output_dim,)` or `(output_dim, c)`.
          values: array `(n,)` or `(n, c)`, inputs `offset` to
            `offset + n - 1`.
          offset: position of `values[0]` in the input vector.

        Returns:
          The updated buffer.
        """
        values = jnp.asarray(values).astype(jnp.float32)
        return buffer + self._scatter_columns(values.T, offset).T

    def _scatter_columns(self, columns: jax.Array, offset: int) -> jax.Array:
        """The sketches `(..., output_dim)` of the rows of `columns (..., n)`.

        Each row is a contiguous vector, which keeps the computation of the
        values vectorisable.
        """
        signed = self._signed_buckets(offset, columns.shape[-1])
        k = self.output_dim
        wide = jnp.zeros(columns.shape[:-1] + (2 * k,), jnp.float32)
        if columns.ndim == 1:
            wide = _scatter_add_windows(wide, signed, columns)
        else:
            wide = wide.at[..., signed].add(columns, **_replicated(columns))
        return wide[..., :k] - wide[..., k:]

    def _sketch_concatenated(self, pieces) -> list:
        """Sketches of `c` vectors, each the concatenation of its pieces.

        `pieces[i][j]` is the `i`-th piece (a flat array) of vector `j`;
        the pieces of all vectors have one length per `i`, and piece `i`
        starts where piece `i - 1` ends. Returns a list of `c` float32
        sketches of shape `(output_dim,)`.

        How the sums are formed depends on the platform the program runs on
        (`jax.lax.platform_dependent`); the sketches agree up to the
        order of float32 additions:

        - CPU (and by default): one scatter-add per piece of each vector,
          as `scatter` does. Stacking the vectors into one operand
          would need a concatenation, which XLA's CPU loops do not
          vectorise (about 8% slower at 4M params).
        - CUDA and ROCm GPUs: the scatter-adds of all `c` vectors go into
          a `(rows, 2 output_dim, c)` buffer, each contiguous run of a
          piece into its own row, which is summed over rows at the end. A
          GPU's scatter-add is an atomic addition per value, and with only
          `2 output_dim` targets the atomics queue up behind each other;
          spreading them over `rows` copies keeps the queues short.
        """
        pieces = [[jnp.asarray(v).reshape(-1) for v in piece]
                  for piece in pieces]
        if not pieces or not pieces[0]:
            return []
        return base.platform_dependent(
            pieces, default=self._sketch_pieces_one_by_one,
            cuda=self._sketch_pieces_privatized,
            rocm=self._sketch_pieces_privatized)

    def _sketch_pieces_one_by_one(self, pieces) -> list:
        zero = jnp.zeros((self.output_dim,), jnp.float32)
        sketches = [zero] * len(pieces[0])
        offset = 0
        for piece in pieces:
            sketches = [self.scatter(s, v, offset)
                        for s, v in zip(sketches, piece)]
            offset += piece[0].shape[0]
        return sketches

    # Scratch of the privatized sketch, in float32 values per vector sketched;
    # the number of rows is the largest power of two that fits, at most 256.
    # On an H100, 64 rows were 1.6 to 3x slower than 512 at 16M and 64M
    # params, and 512 rows 3% to 7% faster than 256, for twice the scratch.
    _PRIVATE_BUDGET = 1 << 21
    _PRIVATE_ROWS = 256

    def _sketch_pieces_privatized(self, pieces) -> list:
        k, c = self.output_dim, len(pieces[0])
        rows = self._PRIVATE_ROWS
        while rows > 1 and rows * 2 * k > self._PRIVATE_BUDGET:
            rows //= 2
        wide = jnp.zeros((rows, 2 * k, c), jnp.float32)
        offset = 0
        for piece in pieces:
            n = piece[0].shape[0]
            if n == 0:
                continue
            signed = self._signed_buckets(offset, n)
            run = -(-n // min(rows, n))  # values per row: ceil(n / rows)
            row = jax.lax.iota(jnp.int32, n) // np.int32(run)
            values = jnp.stack([v.astype(jnp.float32) for v in piece], axis=-1)
            wide = wide.at[row, signed].add(values, **_replicated(values))
            offset += n
        total = wide.sum(axis=0)
        return [total[:k, j] - total[k:, j] for j in range(c)]

    def sketch(self, v: jax.Array) -> jax.Array:
        """The float32 sketch $S v$ of a flat vector `v` of length `input_dim`."""
        v = jnp.asarray(v)
        if v.shape != (self.input_dim,):
            raise ValueError(
                f"sketch expects a vector of shape ({self.input_dim},), got "
                f"{v.shape}.")
        return self.scatter(jnp.zeros((self.output_dim,), jnp.float32), v, 0)
