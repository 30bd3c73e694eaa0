"""Type aliases and small shared helpers for argument checking."""

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
    """Returns ``value`` as a Python float when it is known now, else ``None``.

    Hyperparameters may arrive as tracers (``optax.inject_hyperparams`` calls the
    factory again inside ``update``) or as schedules; those cannot be checked at
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
    """Validates a scalar hyperparameter, naming ``name`` in the error."""
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
    if positive and not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}.")
    if non_negative and not v >= 0:
        raise ValueError(f"{name} must be >= 0, got {v}.")


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype the update is computed in: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)
