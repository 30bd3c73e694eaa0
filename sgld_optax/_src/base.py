"""Type aliases and small shared helpers: argument checking, platform branches."""

from __future__ import annotations

from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any
Scalar = Union[float, int, Array, np.ndarray]
ScalarOrSchedule = Union[Scalar, Callable[[Array], Array]]


def concrete_float(value: Any) -> float | None:
    """Returns `value` as a Python float when it is known now, else `None`.

    Hyperparameters may arrive as tracers (`optax.inject_hyperparams` calls the
    factory again inside `update`) or as schedules; those cannot be checked at
    construction and are skipped.
    """
    if callable(value) or value is None:
        return None
    try:
        arr = np.asarray(value)
    except (TypeError, jax.errors.ConcretizationTypeError,
            jax.errors.TracerArrayConversionError):
        return None
    if arr.shape != () or not np.issubdtype(arr.dtype, np.number):
        return None
    return float(arr)


def check_scalar(name: str, value: Any, *, positive: bool = False,
                 non_negative: bool = False, allow_schedule: bool = False):
    """Validates a scalar hyperparameter, naming `name` in the error."""
    if callable(value):
        if not allow_schedule:
            raise TypeError(f"{name} must be a number, got a callable {value!r}.")
        return
    if isinstance(value, jax.core.Tracer):
        return
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a number, got the bool {value!r}.")
    try:
        arr = np.asarray(value)
    except (TypeError, jax.errors.ConcretizationTypeError,
            jax.errors.TracerArrayConversionError):
        return
    if arr.shape != () or not (np.issubdtype(arr.dtype, np.floating)
                               or np.issubdtype(arr.dtype, np.integer)):
        kind = "a number or a schedule" if allow_schedule else "a number"
        raise TypeError(f"{name} must be {kind}, got {value!r}.")
    v = float(arr)
    if not np.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}.")
    if positive and not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}.")
    if non_negative and not v >= 0:
        raise ValueError(f"{name} must be >= 0, got {v}.")


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype the update is computed in: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def as_key(key: Any, *, typed: bool = False) -> Array:
    """A PRNG key from an int seed, a typed key or a legacy `PRNGKey`.

    Args:
      key: an int seed, a scalar typed key (`jax.random.key`) or a legacy
        uint32 `(2,)` key (`jax.random.PRNGKey`).
      typed: return a typed key even for a legacy one (wrapped as Threefry,
        the implementation legacy keys come from).

    Raises:
      TypeError: for anything else, with a hint where the key is a tracer
        (`optax.inject_hyperparams` without `static_args=("key",)`).
    """
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.key(int(key))
    if isinstance(key, jax.core.Tracer) and not jnp.issubdtype(
            key.dtype, jax.dtypes.prng_key):
        raise TypeError(
            "key is a traced integer; with optax.inject_hyperparams pass "
            "static_args=('key',) (plus 'sketch_dim' and 'sketch_seed' when "
            "sketching).")
    if isinstance(key, (jax.Array, np.ndarray)):
        if key.shape == () and jnp.issubdtype(key.dtype, jnp.integer):
            return jax.random.key(int(key))
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            if key.shape != ():
                raise ValueError(
                    f"key must be a single PRNG key, got shape {key.shape}; "
                    "for several chains vmap over state._replace(key=k).")
            return key
        if key.dtype == np.uint32 and key.shape == (2,):
            key = jnp.asarray(key)
            return (jax.random.wrap_key_data(key, impl="threefry2x32")
                    if typed else key)
    raise TypeError(
        "key must be an int seed or a single JAX PRNG key (jax.random.key or "
        f"jax.random.PRNGKey), got {key!r}.")


def fmix32(x):
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))


def _varying_axes(aval) -> frozenset:
    """The mesh axes along which a value of type `aval` (an abstract array
    or `jax.ShapeDtypeStruct`) varies inside `jax.shard_map`."""
    manual = getattr(aval, "manual_axis_type", None)
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()) or ())


def _manual_axes() -> tuple:
    get_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
    return tuple(getattr(get_mesh(), "manual_axes", ())) if get_mesh else ()


def platform_dependent(*args, **branches):
    """`jax.lax.platform_dependent` whose branches may differ in what varies.

    Inside `jax.shard_map` every value is typed with the mesh axes along
    which it varies from device to device, and the branches of a switch must
    return the same types. Branches built differently (a custom call, a
    scatter with a sharding) can type the same output differently, so inside
    `shard_map` each output of every branch is marked as varying along the
    axes it varies along in any branch (a change of type only: each device's
    values are what it computed). Outside, this is the JAX function.
    """
    if not _manual_axes() or not hasattr(jax.lax, "pcast"):
        return jax.lax.platform_dependent(*args, **branches)
    outs = [jax.eval_shape(b, *args) for b in branches.values()]
    flat = [jax.tree.leaves(o) for o in outs]
    axes = [frozenset().union(*(_varying_axes(f[i]) for f in flat))
            for i in range(len(flat[0]))]

    def typed(branch):
        def call(*a):
            leaves, tree = jax.tree.flatten(branch(*a))
            cast = []
            for x, want in zip(leaves, axes):
                missing = tuple(sorted(want - _varying_axes(jax.typeof(x))))
                cast.append(jax.lax.pcast(x, missing, to="varying")
                            if missing else x)
            return jax.tree.unflatten(tree, cast)
        return call

    return jax.lax.platform_dependent(
        *args, **{name: typed(b) for name, b in branches.items()})


def is_python_zero(value) -> bool:
    """Whether `value` is a literal Python or NumPy 0 (so a term can be left out)."""
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, bool) and value == 0)


def value_at(hparam, count):
    """A hyperparameter's value at step `count`: schedules are called."""
    return hparam(count) if callable(hparam) else hparam


def static_int(name: str, value):
    """`value` as a Python int (`None` kept), or a TypeError naming `name`."""
    if value is None:
        return None
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a static int; with optax.inject_hyperparams pass "
            f"static_args=('key', 'sketch_dim', 'sketch_seed').")
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}.")
    arr = np.asarray(value)
    if arr.shape != () or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an int, got {value!r}.")
    return int(arr)


def check_bool(name: str, value):
    """Raises a TypeError naming `name` unless `value` is a bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}.")


def flatten_like(treedef, tree, name: str) -> list:
    """The subtrees of `tree` at the leaves of `treedef` (`None` kept)."""
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{name} must have the structure of params: params is {treedef}, "
            f"{name} is {jax.tree_util.tree_structure(tree)}.") from err


def leaf_name(path) -> str:
    """A pytree leaf's path as errors name it: `['layer']['kernel']`."""
    return jax.tree_util.keystr(tuple(path)) or "<root>"


def listed(names, most: int = 10, sep: str = ", ") -> str:
    """The first `most` of `names`, joined, and how many more there are."""
    names = list(names)
    more = len(names) - most
    return sep.join(names[:most]) + (f" and {more} more" if more > 0 else "")


def check_shapes_like(tree, params, name: str) -> list:
    """Checks that `tree` has the structure and leaf shapes of `params`.

    Returns:
      The leaves of `tree`, in the order of the params' leaves.

    Raises:
      ValueError: naming every leaf whose shape differs.
    """
    p_paths, p_def = jax.tree_util.tree_flatten_with_path(params)
    leaves = flatten_like(p_def, tree, name)
    problems = []
    for (path, p), m in zip(p_paths, leaves):
        shape = np.shape(m)
        if shape != np.shape(p):
            problems.append(f"{leaf_name(path)}: {name} "
                            f"shape {shape}, param shape {np.shape(p)}")
    if problems:
        raise ValueError(f"{name} shapes do not match params:\n  "
                         + "\n  ".join(problems))
    return leaves


def check_floating(params, sampler: str):
    """Raises a TypeError naming every leaf of params that is not a float."""
    bad = [f"{leaf_name(path)}: {jnp.result_type(x)}"
           for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
           if not jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    if bad:
        raise TypeError(f"{sampler} samples floating-point params only; these "
                        "leaves are not:\n  " + "\n  ".join(bad))


def check_mask(mask):
    """Checks a mask's leaves are bools or 0/1 numbers (shapes: at init)."""
    if mask is None:
        return
    for leaf in jax.tree_util.tree_leaves(mask):
        dt = (leaf.dtype if isinstance(leaf, jax.core.Tracer)
              else np.asarray(leaf).dtype)
        if not (dt == bool or np.issubdtype(dt, np.number)):
            raise TypeError(
                f"mask leaves must be bool or 0/1 numbers, got {dt}.")
        if (not isinstance(leaf, jax.core.Tracer)
                and not np.isin(np.asarray(leaf), (0, 1)).all()):
            raise ValueError(
                "mask values must be 0 or 1 (or bools): a mask restricts "
                "which elements move, it does not scale them.")


MISSING_KEY = (
    "{sampler} needs key=: an int seed or a JAX PRNG key for its noise. "
    "There is no default because two samplers built without one would draw "
    "the same noise (two partitions of optax.multi_transform, or two chains); "
    "give each sampler and each chain its own key.")
