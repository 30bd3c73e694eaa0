r"""Drift terms of a stochastic-gradient MCMC step: the loss gradient and priors.

Every sampler of the family moves the parameters $w$ against the gradient of
the potential

$$
U(w) = n\beta\, L_m(w) + \sum_k \frac{\gamma_k}{2} \|w - c_k\|^2,
$$

the tempered minibatch loss $L_m$ (inverse temperature $n\beta$) plus Gaussian
priors of precision $\gamma_k$ centred at $c_k$: the initial parameters $w_0$
(localization, Lau et al. 2023), $0$ (weight decay), or any given point. Its
gradient is a sum of terms $\text{coef} \times \text{base}$, where the base
vector is one of $\nabla L_m$, $w$, $w - w_0$ or $w - c_k$; this module lists
those terms. Which component of the metrics a term belongs to follows
devinterp's `SGMCMC`: the gradient is `scaled_grad`, a prior centred at $0$ is
`weight_decay`, a prior with any other centre is `localization`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

from sgld_optax._src import base

# Base vectors, per leaf; "center{k}" is w - c_k for the k-th prior with a
# given centre.
GRAD = "grad"
WEIGHT = "weight"
DISPLACEMENT = "displacement"


class GaussianPrior(NamedTuple):
    r"""A Gaussian prior $N(c, \gamma^{-1} I)$ on the sampled parameters.

    It adds $\tfrac{\gamma}{2}\|w - c\|^2$ to the potential, so
    $\gamma (w - c)$ to its gradient. `localization=γ` of a sampler is
    `GaussianPrior(γ, "initial")` and `weight_decay=λ` is
    `GaussianPrior(λ, None)`; pass further priors as `priors=[...]`, and they
    add up as devinterp's `CompositePrior`.

    Attributes:
      precision: $\gamma \ge 0$, a number (or a traced scalar).
      center: `"initial"` for the parameters given to `init` ($w_0$), `None`
        for $0$, or a pytree with the params' structure and shapes.

    Examples:
      >>> import jax.numpy as jnp
      >>> import sgld_optax as so
      >>> params = {"w": jnp.ones(3)}
      >>> prior = so.GaussianPrior(2.0, center={"w": jnp.zeros(3)})
      >>> tx = so.sgld(1e-3, nbeta=10.0, priors=[prior], key=0)
    """

    precision: Any
    center: Any = "initial"


class Term(NamedTuple):
    """One term `coef * base` of the potential's gradient."""

    component: str  # "scaled_grad", "localization" or "weight_decay"
    coef: Any       # n*beta or a precision (number, tracer or schedule value)
    base: str       # GRAD, WEIGHT, DISPLACEMENT or "center{k}"


def priors_of(localization, weight_decay, priors: Sequence[GaussianPrior]
              ) -> list[GaussianPrior]:
    """The priors of a sampler: localization, weight decay, then `priors`.

    Terms whose precision is a literal 0 are left out, so they cost nothing.

    Raises:
      TypeError, ValueError: for a malformed prior, naming it.
    """
    out = [GaussianPrior(localization, "initial"),
           GaussianPrior(weight_decay, None)]
    if priors is None:
        priors = ()
    if isinstance(priors, GaussianPrior) or not isinstance(priors, (list, tuple)):
        raise TypeError(
            "priors must be a list of sgld_optax.GaussianPrior, got "
            f"{priors!r}.")
    for i, prior in enumerate(priors):
        if not isinstance(prior, GaussianPrior):
            raise TypeError(
                f"priors[{i}] must be a sgld_optax.GaussianPrior, got {prior!r}.")
        base.check_scalar(f"priors[{i}].precision", prior.precision,
                          non_negative=True)
        if isinstance(prior.center, str) and prior.center != "initial":
            raise ValueError(
                f"priors[{i}].center must be 'initial', None or a pytree of "
                f"the params' structure, got {prior.center!r}.")
        out.append(prior)
    return [p for p in out if not base.is_python_zero(p.precision)]


def needs_initial(priors: Sequence[GaussianPrior]) -> bool:
    """Whether a prior is centred at the initial parameters."""
    return any(_is_initial(p.center) for p in priors)


def _is_initial(center) -> bool:
    return isinstance(center, str) and center == "initial"


def given_centers(priors: Sequence[GaussianPrior]) -> list:
    """The centres of the priors with a given centre (not $w_0$, not 0), in
    the order of the `"center{k}"` bases of `drift_terms`."""
    return [p.center for p in priors
            if p.center is not None and not _is_initial(p.center)]


def drift_terms(nbeta, priors: Sequence[GaussianPrior]) -> list[Term]:
    """The terms of the potential's gradient, in the order they are summed."""
    terms = [Term("scaled_grad", nbeta, GRAD)]
    k = 0
    for prior in priors:
        if _is_initial(prior.center):
            terms.append(Term("localization", prior.precision, DISPLACEMENT))
        elif prior.center is None:
            terms.append(Term("weight_decay", prior.precision, WEIGHT))
        else:
            terms.append(Term("localization", prior.precision, f"center{k}"))
            k += 1
    return terms


def base_vector(name: str, w, g, w0, centers):
    """The base vector `name` of one leaf, in `w`'s dtype."""
    if name == GRAD:
        return g
    if name == WEIGHT:
        return w
    if name == DISPLACEMENT:
        return w - w0.astype(w.dtype)
    k = int(name[len("center"):])
    return w - centers[k].astype(w.dtype)
