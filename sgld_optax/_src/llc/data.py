r"""Data for LLC estimation: checking it, minibatch order and dataset losses."""

from __future__ import annotations

from typing import Iterable

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from jax import lax

from sgld_optax._src import base
from sgld_optax._src import noise as noise_lib


def _is_array_like(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(
        x, "__array__")


def _to_numpy(x):
    """A host array from a NumPy/JAX/torch/TF array (torch is not imported)."""
    if isinstance(x, (np.ndarray, jax.Array)):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor
        x = x.detach().cpu()
    return np.asarray(x)


def _is_one_shot_iterator(data) -> bool:
    if _is_array_like(data) or isinstance(data, (tuple, list, dict)):
        return False
    try:
        return iter(data) is data
    except TypeError:
        return False


def _is_in_memory(data) -> bool:
    leaves = jax.tree_util.tree_leaves(data)
    return bool(leaves) and all(_is_array_like(x) for x in leaves)


def _leading_size(data, name: str = "data") -> int:
    """The common leading size of every leaf of `data`, or a clear error."""
    paths = jax.tree_util.tree_flatten_with_path(data)[0]
    sizes = {}
    for path, leaf in paths:
        shape = np.shape(leaf)
        where = jax.tree_util.keystr(path) or "<root>"
        if len(shape) == 0:
            raise ValueError(
                f"{name} leaves must have a leading (example) axis; "
                f"{name}{where} is a scalar.")
        sizes[where] = shape[0]
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{name}{k}: {v}" for k, v in sizes.items())
        raise ValueError(
            f"{name} leaves must share their leading size n, got {listing}.")
    return next(iter(sizes.values()))


def _check_loss(loss_fn, params, batch):
    try:
        out = jax.eval_shape(loss_fn, params, batch)
    except TypeError as err:
        raise TypeError(
            "loss_fn(params, batch) could not be evaluated on a batch; it must "
            f"take (params, batch) and return a scalar: {err}") from err
    if not (hasattr(out, "shape") and out.shape == ()
            and jnp.issubdtype(out.dtype, jnp.floating)):
        got = (f"shape {out.shape} and dtype {out.dtype}"
               if hasattr(out, "shape") else repr(out))
        raise ValueError(
            "loss_fn must return a floating-point scalar, the mean loss over "
            f"the batch; got {got}.")


# ---------------------------------------------------------------------------
# Minibatch order: a keyed permutation of [0, n), computed where it is needed.


_FEISTEL_ROUNDS = 8


def shuffled_index(key: jax.Array, positions: jax.Array, n: int) -> jax.Array:
    r"""Entries `positions` of a pseudo-random permutation of `[0, n)`.

    The permutation is an eight-round Feistel network on `2h`-bit integers
    ($4^h \ge n$), keyed by `key`, restricted to `[0, n)` by cycle
    walking: a value that falls outside is permuted again until it lands
    inside. This costs a few integer operations per requested entry, whatever
    `n`, where sorting `n` random keys (as `jax.random.permutation`
    does) would cost $O(n \log n)$ per epoch and an `n`-sized buffer.

    Args:
      key: a PRNG key; a new key gives a new permutation.
      positions: integer array of positions in `[0, n)`.
      n: the size of the permuted range (a Python int, `< 2**31`).

    Returns:
      int32 array shaped like `positions`: the permuted positions.

    References:
      Luby & Rackoff, "How to construct pseudorandom permutations from
      pseudorandom functions", SIAM J. Computing 17 (1988).

      Black & Rogaway, "Ciphers with arbitrary finite domains", CT-RSA 2002.
    """
    half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    low = np.uint32((1 << half) - 1)
    if noise_lib.key_words(key) is None:
        round_keys = jax.random.bits(key, (_FEISTEL_ROUNDS,), jnp.uint32)
    else:  # jax.random.bits's numbers (by default), rounds written out
        y0, y1 = noise_lib.threefry_words(key, (_FEISTEL_ROUNDS,))
        round_keys = y0 ^ y1

    def permute(x):
        left, right = x >> np.uint32(half), x & low
        for r in range(_FEISTEL_ROUNDS):
            left, right = right, left ^ (base.fmix32(right ^ round_keys[r]) & low)
        return (left << np.uint32(half)) | right

    def walk(x):
        return jnp.where(x >= np.uint32(n), permute(x), x)

    x = permute(positions.astype(jnp.uint32))
    x = lax.while_loop(lambda x: jnp.any(x >= np.uint32(n)), walk, x)
    return x.astype(jnp.int32)


def _dataset_loss(loss_fn, params, data, chunk):
    """Mean of `loss_fn` over all of `data`, evaluated `chunk` at a time.

    Returns:
      `(mean, spread, first_bad)`: the mean loss over the `n` examples
      (each weighs once, a short last chunk included), the largest
      `|chunk loss - mean|` over the chunks (the scale of a minibatch
      loss's deviation from the mean at these params), and the index of
      the first chunk whose loss is non-finite (-1 if none), all
      computed in float32.
    """
    n = _leading_size(data)
    num_full, rest = divmod(n, chunk)

    def chunk_loss(k):
        batch = jax.tree.map(
            lambda x: lax.dynamic_slice_in_dim(x, k * chunk, chunk), data)
        return loss_fn(params, batch).astype(jnp.float32)

    losses = lax.map(chunk_loss, jnp.arange(num_full))
    total = jnp.sum(losses) * chunk
    if rest:
        tail = jax.tree.map(lambda x: x[num_full * chunk:], data)
        tail_loss = loss_fn(params, tail).astype(jnp.float32)
        total = total + tail_loss * rest
        losses = jnp.concatenate([losses, tail_loss[None]])
    mean = total / n
    spread = jnp.max(jnp.abs(losses - mean))
    bad = ~jnp.isfinite(losses)
    first_bad = jnp.where(jnp.any(bad), jnp.argmax(bad), -1).astype(jnp.int32)
    return mean, spread, first_bad


def _nonfinite_rows(data, name: str = "data", limit: int = 10) -> str:
    """Where the floating-point leaves of `data` hold NaN or inf, by row.

    Args:
      data: a pytree of arrays sharing a leading (example) axis.
      name: what to call `data` in the message.
      limit: the most row indices to list per leaf.

    Returns:
      A phrase such as `"data[0] has non-finite values in rows [3, 17] (2
      of 300 rows)"`, leaves joined by `"; "`, or `""` when every value
      is finite.
    """
    parts = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(data)[0]:
        x = np.asarray(_to_numpy(leaf))
        if x.ndim == 0 or not jnp.issubdtype(x.dtype, jnp.inexact):
            continue
        rows = np.flatnonzero(
            ~np.all(np.isfinite(x.reshape(x.shape[0], -1)), axis=1))
        if rows.size:
            shown = rows[:limit].tolist()
            more = ", ..." if rows.size > limit else ""
            where = jax.tree_util.keystr(path)
            parts.append(
                f"{name}{where} has non-finite values in rows "
                f"{str(shown)[:-1]}{more}] ({rows.size} of {x.shape[0]} rows)")
    return "; ".join(parts)


def _nonfinite_params(params) -> str:
    """Which leaves of `params` hold NaN or inf, as a phrase, or `""`."""
    bad = [jax.tree_util.keystr(path) or "<root>"
           for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
           if not np.all(np.isfinite(np.asarray(leaf, np.float32)))]
    if not bad:
        return ""
    return "params has non-finite values in " + ", ".join(bad)


def nonfinite_init_loss_error(init_loss, *, params, where: str,
                              data_phrase: str) -> ValueError:
    """The error for a non-finite $L_n(w^*)$, naming what made it so.

    Args:
      init_loss: the non-finite value.
      params: $w^*$, checked for non-finite values.
      where: the part of the data whose loss is non-finite, such as
        `"rows 64 to 95"` or `"batch 3 of data"`.
      data_phrase: what `_nonfinite_rows` found in that data, or `""`.
    """
    causes = [c for c in (_nonfinite_params(params), data_phrase) if c]
    if causes:
        cause = "; ".join(causes) + "."
    else:
        cause = ("the data and params are finite, so loss_fn itself gives a "
                 "non-finite value there (a log of 0, a division by 0, an "
                 "overflow, or an index out of range, such as a token id "
                 "not below the vocabulary size: JAX fills out-of-range "
                 "gathers with NaN instead of raising).")
    return ValueError(
        f"L_n(w*), the mean loss over the data at params, is {init_loss}: "
        f"the loss on {where} is not finite, and {cause} Nothing was "
        "sampled: fix or remove these examples (or params) first.")


def _batches(data) -> Iterable:
    """Cycles through `data` pass after pass, as host arrays."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield jax.tree.map(_to_numpy, batch)
        if empty:
            raise ValueError("data yielded no batches.")


