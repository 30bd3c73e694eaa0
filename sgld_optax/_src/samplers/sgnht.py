r"""Stochastic Gradient Nosé-Hoover Thermostat (Ding et al., 2014)."""

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
class SGNHTState(NamedTuple):
    r"""State of `sgnht`.

    Attributes:
      count: int32 scalar, the number of steps taken.
      key: PRNG key, split at every step.
      initial_params: $w_0$, or `None` where nothing needs it.
      momentum: $v$, the last step taken, with the params' structure and
        shapes, in their compute dtype (at least float32); zeros at first.
      thermostat: $\zeta$, a float32 scalar: the friction of the next step.
      metrics: `Metrics` of the last step, or `None`.
      sketch: `SketchBuffer` of the last step, or `None`.
    """

    count: jax.Array
    key: jax.Array
    initial_params: Any
    momentum: Any
    thermostat: jax.Array
    metrics: Optional[Metrics]
    sketch: Optional[SketchBuffer]


def sgnht(
    learning_rate: base.ScalarOrSchedule,
    *,
    nbeta: base.ScalarOrSchedule = 1.0,
    diffusion_factor: base.Scalar = 0.01,
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
    r"""Stochastic Gradient Nosé-Hoover Thermostat (SGNHT).

    Ding, Fang, Babbush, Chen, Skeel & Neven's Algorithm 2 in the units of
    `sghmc`: with step size $\epsilon$, diffusion factor $a$ and a scalar
    thermostat $\zeta$ that starts at $a$,

    $$
    v \leftarrow (1 - \zeta)\, v - \frac{\epsilon}{2}\, m \odot \nabla U(w)
    + \sqrt{a\, \epsilon}\, \sigma\, m \odot \eta, \qquad
    w \leftarrow w + v, \qquad
    \zeta \leftarrow \zeta + \frac{1}{d}\, \|v\|^2 - \sigma^2 \frac{\epsilon}{2},
    $$

    over the $d$ sampled (unmasked) elements. With the paper's step $h$ and
    momentum $p$: $v = h p$, $\epsilon/2 = h^2$, and $\zeta$ and $a$ are its
    $\xi h$ and $A h$, per-step frictions like `sghmc`'s `momentum_decay`.
    The thermostat raises the friction while the kinetic energy
    $\|v\|^2/d$ is above its value at temperature $\sigma^2$ and lowers it
    below, so the chain dissipates the unknown extra heat of stochastic
    gradients that `sgld` and `sghmc` turn into a wider posterior.
    The momentum starts at 0. With a bounding box, $w + v$ is clamped as in
    `sgld` and $v$ becomes the step taken.

    Like the paper's algorithm, the thermostat holds the kinetic energy at
    its continuous-time value $\sigma^2\epsilon/2$, while the discretised
    chain is at temperature $\sigma^2$ for $\sigma^2\epsilon/(2 - \bar\zeta)$:
    the sampled variance is low by a relative $\bar\zeta/2$ or so, for the
    thermostat's mean $\bar\zeta$ (0.5% at the default diffusion factor,
    5% at 0.1). Keep `diffusion_factor` small.

    devinterp's `SGMCMC.sgnht` never applies its thermostat (it takes SGLD
    steps with noise scaled by $\sqrt{2a}$); this one does.

    `Metrics` and sketches describe the terms of the momentum's update, as
    for `sghmc`; `noise` is $\|\sqrt{a\epsilon}\,\sigma\, m\odot\eta\|$.

    Args:
      learning_rate: step size $\epsilon$ (> 0), a number or a schedule.
      nbeta: inverse temperature $n\beta$ (> 0), a number or a schedule.
      diffusion_factor: $a > 0$: the thermostat's starting value and the
        scale of the injected noise.
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
      `params`; its state is an `SGNHTState`.

    Raises:
      TypeError: without `key`, or for a hyperparameter of the wrong type.
      ValueError: for invalid hyperparameters, naming the argument.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import sgld_optax as so
      >>> params = {"w": jnp.ones(3)}
      >>> tx = so.sgnht(1e-3, nbeta=10.0, diffusion_factor=0.01, key=0)
      >>> state = tx.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
      >>> updates, state = tx.update(grads, state, params)
      >>> state.thermostat.dtype
      dtype('float32')

    References:
      Ding, Fang, Babbush, Chen, Skeel & Neven, "Bayesian sampling using
      stochastic gradient thermostats", NeurIPS 2014.
    """
    base.check_scalar("diffusion_factor", diffusion_factor, positive=True)
    return step.transformation(
        "sgnht", SGNHTState, learning_rate=learning_rate, nbeta=nbeta,
        noise_level=noise_level, weight_decay=weight_decay,
        localization=localization, priors=priors,
        bounding_box_size=bounding_box_size, mask=mask,
        save_metrics=save_metrics, sketch_dim=sketch_dim,
        sketch_seed=sketch_seed, sketch=sketch, key=key,
        preconditioner=preconditioners.identity(),
        dynamics=step.Dynamics("thermostat", diffusion_factor),
        hyperparams=dict(diffusion_factor=diffusion_factor))
