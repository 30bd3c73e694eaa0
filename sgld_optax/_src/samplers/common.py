"""What the samplers share beyond the step: nbeta's default, reading metrics and sketches."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import optax

from sgld_optax._src import metrics as metrics_lib
from sgld_optax._src.core import step as step_lib
from sgld_optax._src.metrics import Metrics
from sgld_optax._src.sketch import SketchBuffer


def default_nbeta(batch_size: Any, gradient_accumulation_steps: int = 1) -> float:
    r"""The default inverse temperature $n\beta = m / \log m$.

    $m$ is the number of samples behind one gradient, `batch_size`
    times `gradient_accumulation_steps`. Where $m \le 1$ the value is
    undefined and 1 is returned with a warning.

    Args:
      batch_size: an int, or an object with an int `batch_size` attribute
        (such as a `torch.utils.data.DataLoader`).
      gradient_accumulation_steps: number of batches accumulated per step.

    Returns:
      $m / \log m$ as a Python float.

    Raises:
      TypeError: if `batch_size` is neither an int nor has `batch_size`.

    Examples:
      >>> import sgld_optax as so
      >>> round(so.default_nbeta(64), 3)
      15.389
    """
    size = getattr(batch_size, "batch_size", batch_size)
    for name, value in (("batch_size", size),
                        ("gradient_accumulation_steps",
                         gradient_accumulation_steps)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(
                f"{name} must be an int (or an object with an int batch_size "
                f"attribute), got {value!r}.")
    m = int(size) * int(gradient_accumulation_steps)
    if m <= 1:
        warnings.warn(
            f"default_nbeta is undefined for batch_size * "
            f"gradient_accumulation_steps = {m} <= 1; returning 1.",
            UserWarning, stacklevel=2)
        return 1.0
    return m / math.log(m)


def get_metrics(opt_state: optax.OptState) -> Metrics:
    """The `Metrics` of the last step, from any optax state.

    Finds the state of every sampler (`sgld`, `rmsprop_sgld`, `sghmc`,
    `sgnht`) inside `opt_state` (through
    `optax.chain`, `masked`, `multi_transform`, `apply_if_finite`,
    `inject_hyperparams`, `MultiSteps`...) and combines them as one
    parameter vector: norms as the root of summed squares, dot products and
    `numel` summed.

    Args:
      opt_state: an optax state containing at least one sampler state.

    Returns:
      The combined `Metrics`.

    Raises:
      ValueError: if there is no sampler state, or one was built without
        `save_metrics=True`.
    """
    states = step_lib.find_states(opt_state)
    if not states:
        raise ValueError("get_metrics found no sampler state (sgld, rmsprop_sgld, sghmc, "
                         "sgnht) in opt_state.")
    if any(s.metrics is None for s in states):
        raise ValueError(
            "metrics were not enabled: build the transformation with "
            "save_metrics=True (e.g. sgld(..., save_metrics=True)).")
    return metrics_lib.aggregate(s.metrics for s in states)


def get_sketches(opt_state: optax.OptState) -> SketchBuffer:
    """The `SketchBuffer` of the last step, from any optax state.

    Args:
      opt_state: an optax state containing exactly one sampler state that
        sketches.

    Returns:
      The `SketchBuffer`.

    Raises:
      ValueError: if no sampler state sketches, or several do (their sketches
        index different parameter vectors and cannot be combined).
    """
    states = step_lib.find_states(opt_state)
    if not states:
        raise ValueError("get_sketches found no sampler state (sgld, rmsprop_sgld, "
                         "sghmc, sgnht) in opt_state.")
    sketched = [s for s in states if s.sketch is not None]
    if not sketched:
        raise ValueError(
            "sketches were not enabled: build the transformation with "
            "sketch_dim=k (e.g. sgld(..., sketch_dim=k)).")
    if len(sketched) > 1:
        raise ValueError(
            f"found {len(sketched)} sampler states with sketches; their sketches "
            "cover different parameters and cannot be combined. Read each "
            "state's .sketch field.")
    return sketched[0].sketch
