r"""Stochastic Gradient Hamiltonian Monte Carlo (Chen, Fox & Guestrin, 2014)."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import jax
import optax

from sgld_optax._src import base
from sgld_optax._src.core import preconditioners
from sgld_optax._src.core import step
from sgld_optax._src.core.terms import GaussianPrior
from sgld_optax._src.metrics import Metrics
from sgld_optax._src.sketch import CountSketch, SketchBuffer


@step.sampler_state
class SGHMCState(NamedTuple):
    r"""State of `sghmc`.

    Attributes:
      count: int32 scalar, the number of steps taken.
      key: PRNG key, split at every step.
      initial_params: $w_0$, or `None` where nothing needs it.
      momentum: $v$, the last step taken, with the params' structure and
        shapes, in their compute dtype (at least float32); zeros at first.
      metrics: `Metrics` of the last step, or `None`.
      sketch: `SketchBuffer` of the last step, or `None`.
    """

    count: jax.Array
    key: jax.Array
    initial_params: Any
    momentum: Any
    metrics: Optional[Metrics]
    sketch: Optional[SketchBuffer]


def sghmc(
    learning_rate: base.ScalarOrSchedule,
    *,
    nbeta: base.ScalarOrSchedule = 1.0,
    momentum_decay: base.Scalar = 0.1,
    noise_level: base.Scalar = 1.0,
    weight_decay: base.Scalar = 0.0,
    localization: base.Scalar = 0.0,
    priors: Sequence[GaussianPrior] = (),
    bounding_box_size: Optional[base.Scalar] = None,
    mask: Optional[base.PyTree] = None,
    save_metrics: bool = False,
    sketch_dim: Optional[int] = None,
    sketch_seed: int = 0,
    sketch: Optional[CountSketch] = None,
    key: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Stochastic Gradient Hamiltonian Monte Carlo with friction (SGHMC).

    Chen, Fox & Guestrin's discretisation (their eq. 15, with the
    gradient-noise estimate $\hat\beta = 0$) in the units of `sgld`: with
    $U(w) = n\beta L(w) + \tfrac{\gamma}{2}\|w - w_0\|^2 +
    \tfrac{\lambda}{2}\|w\|^2$, step size $\epsilon$ and per-step friction
    $\alpha$ (`momentum_decay`),

    $$
    v \leftarrow (1 - \alpha)\, v - \frac{\epsilon}{2}\, m \odot \nabla U(w)
    + \sqrt{\alpha\, \epsilon}\, \sigma\, m \odot \eta, \qquad
    w \leftarrow w + v, \qquad \eta \sim N(0, I).
    $$

    This is the paper's update with learning rate $\eta = \epsilon/2$ and
    friction $\alpha$, whose injected noise has variance $2\alpha\eta$. At
    $\alpha = 1$ the momentum is forgotten at every step and the step is
    `sgld`'s, exactly. Smaller $\alpha$ keeps momentum for about $1/\alpha$
    steps, so the chain moves further per gradient in flat directions; the
    stationary law of $w$ is the same posterior. The momentum starts at 0.
    With a bounding box, $w + v$ is clamped as in `sgld` and $v$ becomes the
    step taken.

    `Metrics` and sketches describe the terms of the momentum's update:
    `scaled_grad` is $\|\tfrac{\epsilon}{2} n\beta\, m\odot\nabla L\|$,
    `localization` and `weight_decay` the priors' terms, `noise`
    $\|\sqrt{\alpha\epsilon}\,\sigma\, m\odot\eta\|$; the friction term
    $-\alpha v$ is not among them.

    Args:
      learning_rate: step size $\epsilon$ (> 0), a number or a schedule.
      nbeta: inverse temperature $n\beta$ (> 0), a number or a schedule.
      momentum_decay: per-step friction $\alpha \in (0, 1]$.
      noise_level: noise scale $\sigma$ (>= 0); anything but 1 warns.
      weight_decay: $\lambda$ (>= 0), a Gaussian prior centred at 0.
      localization: $\gamma$ (>= 0), a Gaussian prior centred at $w_0$.
      priors: further `GaussianPrior`s.
      bounding_box_size: half-width $b$ of the box around $w_0$, or `None`.
      mask: 0/1 pytree of the params' shapes: only elements where it is 1
        move.
      save_metrics: record `Metrics` of each step.
      sketch_dim: record count sketches of each step's components.
      sketch_seed: seed of the count sketch's hashes.
      sketch: a prebuilt `CountSketch`.
      key: int seed or JAX PRNG key of the noise (required).

    Returns:
      An `optax.GradientTransformationExtraArgs` whose `update` requires
      `params`; its state is an `SGHMCState`.

    Raises:
      TypeError: without `key`, or for a hyperparameter of the wrong type.
      ValueError: for invalid hyperparameters, naming the argument.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import sgld_optax as so
      >>> params = {"w": jnp.ones(3)}
      >>> tx = so.sghmc(1e-3, nbeta=10.0, momentum_decay=0.1, key=0)
      >>> state = tx.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
      >>> updates, state = tx.update(grads, state, params)

    References:
      Chen, Fox & Guestrin, "Stochastic gradient Hamiltonian Monte Carlo",
      ICML 2014, arXiv:1402.4102.
    """
    base.check_scalar("momentum_decay", momentum_decay, positive=True)
    if (a := base.concrete_float(momentum_decay)) is not None and a > 1:
        raise ValueError(f"momentum_decay must be <= 1, got {a}.")
    return step.transformation(
        "sghmc", SGHMCState, learning_rate=learning_rate, nbeta=nbeta,
        noise_level=noise_level, weight_decay=weight_decay,
        localization=localization, priors=priors,
        bounding_box_size=bounding_box_size, mask=mask,
        save_metrics=save_metrics, sketch_dim=sketch_dim,
        sketch_seed=sketch_seed, sketch=sketch, key=key,
        preconditioner=preconditioners.identity(),
        dynamics=step.Dynamics("momentum", momentum_decay),
        hyperparams=dict(momentum_decay=momentum_decay))
