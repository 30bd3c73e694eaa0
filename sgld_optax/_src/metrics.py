r"""Norms and dot products of the components of a sampler's step.

A step of any sampler of the family (see `core/step.py`) is built from
named components: for SGLD, with mask $m$ and $\eta \sim N(0, I)$,

$$
\Delta w = -(g + \ell + d) + \xi, \qquad
g = \tfrac{\epsilon}{2} n\beta\, m \odot \nabla L, \quad
\ell = \tfrac{\epsilon}{2} \gamma\, m \odot (w - w_0), \quad
d = \tfrac{\epsilon}{2} \lambda\, m \odot w, \quad
\xi = \sqrt{\epsilon}\, \sigma\, m \odot \eta;
$$

RMSprop-SGLD multiplies $g$, $\ell$ and $d$ by its preconditioner $G$ and
$\xi$ by $\sqrt{G}$; SGHMC and SGNHT use the same terms in their momentum's
update. `Metrics` records the L2 norm of each component of the last step, of
the displacement $m \odot (w - w_0)$ before that step, and the dot products
between the gradient, the prior $\ell + d$ and the noise. Everything is
accumulated in float32 whatever the parameters' dtype.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import jax
import jax.numpy as jnp

NORM_FIELDS = ("scaled_grad", "unscaled_grad", "localization", "weight_decay",
               "noise", "distance")
DOT_FIELDS = ("dot_grad_prior", "dot_grad_noise", "dot_prior_noise")


class Metrics(NamedTuple):
    r"""Norms and dot products of the last step's components.

    Every field is a float32 scalar (an array with a leading chain axis when
    the sampler is vmapped), except `numel`, an int32 count. For SGLD, with
    the components of the module docstring:

    Attributes:
      scaled_grad: $\|g\|_2 = \|\tfrac{\epsilon}{2} n\beta\, m\odot G\odot\nabla L\|_2$
        ($G = 1$ but for RMSprop-SGLD).
      unscaled_grad: $\|\tfrac{\epsilon}{2} n\beta\, m\odot\nabla L\|_2$,
        without the preconditioner: equal to `scaled_grad` but for
        RMSprop-SGLD.
      localization: $\|\ell\|_2$, the priors not centred at 0 (for SGLD
        $\|\tfrac{\epsilon}{2}\gamma\, m\odot(w-w_0)\|_2$).
      weight_decay: $\|d\|_2 = \|\tfrac{\epsilon}{2}\lambda\, m\odot G \odot w\|_2$.
      noise: $\|\xi\|_2$ (for SGLD $\|\sqrt{\epsilon}\,\sigma\, m\odot\eta\|_2$).
      distance: $\|m\odot(w - w_0)\|_2$, before the step.
      dot_grad_prior: $\langle g, \ell + d\rangle$.
      dot_grad_noise: $\langle g, \xi\rangle$.
      dot_prior_noise: $\langle \ell + d, \xi\rangle$.
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
        r"""Norm of the whole prior term, $\|\ell + d\|$ taken as
        $\sqrt{\|\ell\|^2 + \|d\|^2}$ (devinterp's convention)."""
        return jnp.sqrt(jnp.square(self.localization)
                        + jnp.square(self.weight_decay))

    @classmethod
    def zeros(cls) -> "Metrics":
        """All-zero metrics, the value before the first step."""
        z = jnp.zeros((), jnp.float32)
        return cls(*([z] * (len(NORM_FIELDS) + len(DOT_FIELDS))),
                   numel=jnp.zeros((), jnp.int32))


SKETCHED = ("scaled_grad", "unscaled_grad", "localization", "weight_decay",
            "noise")


def _sums_of_products(vectors, pairs) -> dict:
    """float32 sums over all leaves of the products of each pair of vectors.

    Args:
      vectors: per leaf, a dict from vector key to array.
      pairs: the unordered pairs of keys, as `frozenset`s (one element for a
        square).

    Returns:
      A dict from each pair to its float32 scalar sum.
    """
    sums = {pair: jnp.zeros((), jnp.float32) for pair in pairs}
    for vecs in vectors:
        for pair in pairs:
            a, b = (tuple(pair) * 2)[:2]
            sums[pair] += jnp.sum(vecs[a].astype(jnp.float32)
                                  * vecs[b].astype(jnp.float32))
    return sums


def metrics_from_components(components: dict, vectors, numel) -> Metrics:
    r"""Computes `Metrics` from a step's named components.

    Each component is a sum of scalar multiples of unscaled vectors,
    $c = \sum_i a_i v_i$. Norms and dot products are taken from the sums
    of products of the vectors over all leaves and scaled afterwards, so no
    scaled component is formed: $\langle c, c' \rangle = \sum_{i,j} a_i
    a'_j \langle v_i, v'_j \rangle$. Vectors shared by several components
    (for SGLD, the gradient of `scaled_grad` and `unscaled_grad`, the
    displacement of `localization` and `distance`) are summed once.

    Args:
      components: a dict from component name (`scaled_grad`,
        `unscaled_grad`, `localization`, `weight_decay`, `noise`,
        `distance`) to a list of `(float32 scale, vector key)`; an empty
        list is a zero component.
      vectors: per leaf, a dict from vector key to array.
      numel: the number of unmasked parameters (int or int32 scalar).

    Returns:
      The step's `Metrics`, accumulated in float32.
    """
    prior = components["localization"] + components["weight_decay"]
    wanted = [(c, c) for c in (components[n] for n in NORM_FIELDS)]
    wanted += [(components["scaled_grad"], prior),
               (components["scaled_grad"], components["noise"]),
               (prior, components["noise"])]
    pairs = list(dict.fromkeys(frozenset((ka, kb)) for ca, cb in wanted
                               for _, ka in ca for _, kb in cb))
    sums = _sums_of_products(vectors, pairs)

    def dot(ca, cb):
        out = jnp.zeros((), jnp.float32)
        for a, ka in ca:
            for b, kb in cb:
                out += (a * b) * sums[frozenset((ka, kb))]
        return out

    def norm(c):
        if len(c) == 1:  # |a| sqrt(<v, v>): no cancellation to round away
            a, k = c[0]
            return jnp.abs(a) * jnp.sqrt(sums[frozenset((k, k))])
        return jnp.sqrt(jnp.maximum(dot(c, c), 0.0))

    return Metrics(
        **{n: norm(components[n]) for n in NORM_FIELDS},
        dot_grad_prior=dot(components["scaled_grad"], prior),
        dot_grad_noise=dot(components["scaled_grad"], components["noise"]),
        dot_prior_noise=dot(prior, components["noise"]),
        numel=jnp.asarray(numel, jnp.int32),
    )


def aggregate(metrics: Iterable[Metrics]) -> Metrics:
    r"""Combines metrics of disjoint parameter sets into one.

    Norms combine as $\sqrt{\sum_i \|a_i\|^2}$; dot products and
    `numel` add up.

    Args:
      metrics: the metrics to combine, each possibly with leading batch axes
        (broadcast against each other).

    Returns:
      The combined `Metrics`.

    Raises:
      ValueError: if `metrics` is empty.
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
