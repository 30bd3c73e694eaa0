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


def metrics_from_bases(bases, scales, numel) -> Metrics:
    """Computes :class:`Metrics` from the unscaled vectors of a step.

    Every component is a scalar multiple of a masked base vector:
    :math:`g = a_g\\, m\\odot\\nabla L`, :math:`\\ell = a_\\ell\\, m\\odot(w -
    w_0)`, :math:`d = a_d\\, m\\odot w` and :math:`\\xi = a_\\xi\\, m\\odot
    \\eta`. Norms and dot products are taken from the sums of products of the
    base vectors and scaled afterwards, so no scaled component is ever
    formed: e.g. :math:`\\|g\\| = |a_g| \\sqrt{\\sum (m \\nabla L)^2}` and
    :math:`\\langle g, \\xi\\rangle = a_g a_\\xi \\sum m \\nabla L\\, \\eta`.
    The displacement's squared norm serves both ``distance`` and
    ``localization``.

    Args:
      bases: sequence over leaves of ``(grad, distance, weight, noise)``:
        the masked :math:`\\nabla L`, :math:`w - w_0`, :math:`w` and
        :math:`\\eta`; ``None`` stands for a vector that is not needed or
        identically zero (``weight`` is used only with weight decay).
      scales: ``(a_g, a_loc, a_wd, a_noise)`` scalars; ``a_loc`` and
        ``a_wd`` are ``None`` when that term is absent.
      numel: the number of unmasked parameters (int or int32 scalar).

    Returns:
      The step's :class:`Metrics`, accumulated in float32.
    """
    return metrics_from_sums(sums_of_products(bases, needed_pairs(scales)),
                             scales, numel)


def needed_pairs(scales) -> list:
    """The pairs of base vectors whose sums of products the metrics read.

    Args:
      scales: ``(a_g, a_loc, a_wd, a_noise)`` as in :func:`metrics_from_bases`.

    Returns:
      A list of pairs of names among ``"g"`` (gradient), ``"d"``
      (displacement), ``"w"`` (weight) and ``"e"`` (noise).
    """
    pairs = [("g", "g"), ("d", "d"), ("e", "e"), ("g", "e")]
    if scales[1] is not None:
        pairs += [("g", "d"), ("d", "e")]
    if scales[2] is not None:
        pairs += [("w", "w"), ("g", "w"), ("w", "e")]
    return pairs


def sums_of_products(bases, pairs) -> dict:
    """float32 sums :math:`\\sum_i a_i b_i` over all leaves, per pair ``(a, b)``.

    Args:
      bases: as in :func:`metrics_from_bases`.
      pairs: pairs of names among ``"g"``, ``"d"``, ``"w"``, ``"e"``.

    Returns:
      A dict from each pair to its float32 scalar sum (0 where a vector is
      ``None``).
    """
    sums = {pair: jnp.zeros((), jnp.float32) for pair in pairs}
    for g, d, w, e in bases:
        vec = dict(g=g, d=d, w=w, e=e)
        for a, b in pairs:
            if vec[a] is not None and vec[b] is not None:
                sums[a, b] += jnp.sum(vec[a].astype(jnp.float32)
                                      * vec[b].astype(jnp.float32))
    return sums


def metrics_from_sums(sums, scales, numel) -> Metrics:
    """:class:`Metrics` from the sums of products of the base vectors.

    Args:
      sums: a dict with a float32 scalar for each pair of
        :func:`needed_pairs` of ``scales``.
      scales: as in :func:`metrics_from_bases`.
      numel: the number of unmasked parameters (int or int32 scalar).

    Returns:
      The step's :class:`Metrics`.
    """
    a_g, a_loc, a_wd, a_xi = (None if a is None
                              else jnp.asarray(a, jnp.float32)
                              for a in scales)
    zero = jnp.zeros((), jnp.float32)

    def norm(scale, v):
        return zero if scale is None else jnp.abs(scale) * jnp.sqrt(sums[v, v])

    def prior_dot(v):  # <prior, base vector v>
        out = zero
        if a_loc is not None:
            out += a_loc * sums.get((v, "d"), sums.get(("d", v)))
        if a_wd is not None:
            out += a_wd * sums.get((v, "w"), sums.get(("w", v)))
        return out

    sg = norm(a_g, "g")
    return Metrics(
        scaled_grad=sg,
        unscaled_grad=sg,
        localization=norm(a_loc, "d"),
        weight_decay=norm(a_wd, "w"),
        noise=norm(a_xi, "e"),
        distance=jnp.sqrt(sums["d", "d"]),
        dot_grad_prior=a_g * prior_dot("g"),
        dot_grad_noise=a_g * a_xi * sums["g", "e"],
        dot_prior_noise=a_xi * prior_dot("e"),
        numel=jnp.asarray(numel, jnp.int32),
    )


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
