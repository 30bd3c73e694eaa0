r"""Diagonal preconditioners of a stochastic-gradient MCMC step.

A preconditioned Langevin step (Li, Chen, Carlson & Carin, 2016) is

$$
\Delta w = -\frac{\epsilon}{2}\, M \odot G \odot \nabla U(w)
           + \sqrt{\epsilon}\, \sigma\, M \odot \sqrt{G} \odot \eta,
\qquad \eta \sim N(0, I),
$$

with $G$ a positive diagonal preconditioner and $M$ the 0/1 mask of the
sampled elements (devinterp's `MaskPreconditioner`: it multiplies
everything). A preconditioner here gives, per leaf, the factor of the drift
($G$) and of the noise ($\sqrt G$), or `None` for 1, and keeps its own
fields in the sampler's state.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax.numpy as jnp

from sgld_optax._src import base


class Factors(NamedTuple):
    """Per leaf, the preconditioner's factor of the drift and of the noise
    (`None` for 1)."""

    drift: list
    noise: list


class Preconditioner(NamedTuple):
    """A diagonal preconditioner.

    Attributes:
      fields: names of the state fields it keeps (each a list over leaves).
      init: `init(p_leaves) -> {field: leaves}`.
      update: `update(fields, g_leaves, count) -> (new fields, Factors)`,
        with `g_leaves` the raw loss gradient (`None` for a leaf without
        one) and `count` the steps taken before this one.
    """

    fields: tuple
    init: Callable[[list], dict]
    update: Callable[[dict, list, Any], tuple]


def identity() -> Preconditioner:
    """$G = I$: plain Langevin dynamics."""
    return Preconditioner(
        fields=(),
        init=lambda p_leaves: {},
        update=lambda fields, g_leaves, count: (
            {}, Factors([None] * len(g_leaves), [None] * len(g_leaves))))


def rmsprop(alpha, eps, *, initial_square_avg=0.0,
            bias_correction: bool = False) -> Preconditioner:
    r"""RMSprop's preconditioner (Tieleman & Hinton, 2012; Li et al., 2016).

    $$
    V_t = \alpha V_{t-1} + (1 - \alpha)\, g_t \odot g_t, \qquad
    G_t = \frac{1}{\sqrt{\hat V_t} + \varepsilon},
    $$

    with $g_t$ the raw loss gradient (not scaled by $n\beta$, no prior),
    $V_0$ = `initial_square_avg` (0 in devinterp's `SGMCMC.rmsprop_sgld`) and
    $\hat V_t = V_t$, or $V_t / (1 - \alpha^t)$ with `bias_correction`. The
    state keeps $V$ as `square_avg`, in the params' compute dtype (at least
    float32).
    """

    def init(p_leaves):
        return {"square_avg": [
            jnp.full(p.shape, initial_square_avg, base.compute_dtype(p.dtype))
            for p in p_leaves]}

    def update(fields, g_leaves, count):
        new_v, drift, noise = [], [], []
        for v, g in zip(fields["square_avg"], g_leaves):
            cd = v.dtype
            g = jnp.zeros_like(v) if g is None else g.astype(cd)
            a = jnp.asarray(alpha, cd)
            v = a * v + (1 - a) * (g * g)
            v_hat = v
            if bias_correction:
                v_hat = v / (1 - a ** (count + 1).astype(cd))
            precond = 1 / (jnp.sqrt(v_hat) + jnp.asarray(eps, cd))
            new_v.append(v)
            drift.append(precond)
            noise.append(jnp.sqrt(precond))
        return {"square_avg": new_v}, Factors(drift, noise)

    return Preconditioner(("square_avg",), init, update)
