"""Norms and dot products of the components of an SGLD update.

One SGLD step moves the parameters by

.. math::

    \\Delta w = -(g + \\ell + d) + \\xi, \\qquad
    g = \\tfrac{\\epsilon}{2} n\\beta\\, m \\odot \\nabla L, \\quad
    \\ell = \\tfrac{\\epsilon}{2} \\gamma\\, m \\odot (w - w_0), \\quad
    d = \\tfrac{\\epsilon}{2} \\lambda\\, m \\odot w, \\quad
    \\xi = \\sqrt{\\epsilon}\\, \\sigma\\, m \\odot \\eta,

with :math:`\\eta \\sim N(0, I)` and :math:`m` the mask. :class:`Metrics`
records the L2 norm of each component of the last step, of the displacement
:math:`m \\odot (w - w_0)` before that step, and the dot products between the
gradient, the prior :math:`\\ell + d` and the noise. Everything is accumulated
in float32 whatever the parameters' dtype.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import jax
import jax.numpy as jnp

NORM_FIELDS = ("scaled_grad", "unscaled_grad", "localization", "weight_decay",
               "noise", "distance")
DOT_FIELDS = ("dot_grad_prior", "dot_grad_noise", "dot_prior_noise")


class Metrics(NamedTuple):
    """Norms and dot products of the last SGLD step's components.

    Every field is a float32 scalar (an array with a leading chain axis when
    the sampler is vmapped), except ``numel``, an int32 count.

    Attributes:
      scaled_grad: :math:`\\|\\tfrac{\\epsilon}{2} n\\beta\\, m\\odot\\nabla L\\|_2`.
      unscaled_grad: the same as ``scaled_grad``: SGLD has no preconditioner.
      localization: :math:`\\|\\tfrac{\\epsilon}{2}\\gamma\\, m\\odot(w-w_0)\\|_2`.
      weight_decay: :math:`\\|\\tfrac{\\epsilon}{2}\\lambda\\, m\\odot w\\|_2`.
      noise: :math:`\\|\\sqrt{\\epsilon}\\,\\sigma\\, m\\odot\\eta\\|_2`.
      distance: :math:`\\|m\\odot(w - w_0)\\|_2`, before the step.
      dot_grad_prior: :math:`\\langle g, \\ell + d\\rangle`.
      dot_grad_noise: :math:`\\langle g, \\xi\\rangle`.
      dot_prior_noise: :math:`\\langle \\ell + d, \\xi\\rangle`.
      numel: number of sampled (unmasked) parameters.
    """

    scaled_grad: jax.Array
    unscaled_grad: jax.Array
    localization: jax.Array
    weight_decay: jax.Array
    noise: jax.Array
    distance: jax.Array
    dot_grad_prior: jax.Array
    dot_grad_noise: jax.Array
    dot_prior_noise: jax.Array
    numel: jax.Array

    @property
    def prior(self) -> jax.Array:
        """Norm of the whole prior term, :math:`\\|\\ell + d\\|` taken as
        :math:`\\sqrt{\\|\\ell\\|^2 + \\|d\\|^2}` (the reference's convention)."""
        return jnp.sqrt(jnp.square(self.localization)
                        + jnp.square(self.weight_decay))

    @classmethod
    def zeros(cls) -> "Metrics":
        """All-zero metrics, the value before the first step."""
        z = jnp.zeros((), jnp.float32)
        return cls(*([z] * (len(NORM_FIELDS) + len(DOT_FIELDS))),
                   numel=jnp.zeros((), jnp.int32))


def metrics_from_components(components, distance, numel) -> Metrics:
    """Computes :class:`Metrics` from per-leaf component arrays.

    Args:
      components: sequence over leaves of ``(scaled_grad, localization,
        weight_decay, noise)`` arrays, already masked; ``None`` stands for a
        component that is identically zero.
      distance: sequence over leaves of masked ``w - w0`` arrays (or
        ``None``).
      numel: Python int, the number of unmasked parameters.

    Returns:
      The step's :class:`Metrics`.
    """
    sums = {name: jnp.zeros((), jnp.float32)
            for name in NORM_FIELDS + DOT_FIELDS}

    def dot(a, b):
        if a is None or b is None:
            return 0.0
        return jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32))

    for (g, loc, wd, xi), dist in zip(components, distance):
        if loc is None or wd is None:
            prior = wd if loc is None else loc
        else:
            prior = loc + wd
        sums["scaled_grad"] += dot(g, g)
        sums["localization"] += dot(loc, loc)
        sums["weight_decay"] += dot(wd, wd)
        sums["noise"] += dot(xi, xi)
        sums["distance"] += dot(dist, dist)
        sums["dot_grad_prior"] += dot(g, prior)
        sums["dot_grad_noise"] += dot(g, xi)
        sums["dot_prior_noise"] += dot(prior, xi)
    sums["unscaled_grad"] = sums["scaled_grad"]
    norms = {name: jnp.sqrt(sums[name]) for name in NORM_FIELDS}
    dots = {name: sums[name] for name in DOT_FIELDS}
    return Metrics(**norms, **dots, numel=jnp.asarray(numel, jnp.int32))


def aggregate(metrics: Iterable[Metrics]) -> Metrics:
    """Combines metrics of disjoint parameter sets into one.

    Norms combine as :math:`\\sqrt{\\sum_i \\|a_i\\|^2}`; dot products and
    ``numel`` add up.

    Args:
      metrics: the metrics to combine, each possibly with leading batch axes
        (broadcast against each other).

    Returns:
      The combined :class:`Metrics`.

    Raises:
      ValueError: if ``metrics`` is empty.
    """
    metrics = list(metrics)
    if not metrics:
        raise ValueError("aggregate needs at least one Metrics.")
    if len(metrics) == 1:
        return metrics[0]
    norms = {name: jnp.sqrt(sum(jnp.square(getattr(m, name)) for m in metrics))
             for name in NORM_FIELDS}
    dots = {name: sum(getattr(m, name) for m in metrics) for name in DOT_FIELDS}
    return Metrics(**norms, **dots, numel=sum(m.numel for m in metrics))
