r"""RMSprop-preconditioned SGLD (Li, Chen, Carlson & Carin, 2016)."""

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
class RMSpropSGLDState(NamedTuple):
    r"""State of `rmsprop_sgld`.

    Attributes:
      count: int32 scalar, the number of steps taken.
      key: PRNG key, split at every step.
      initial_params: $w_0$, or `None` where nothing needs it.
      square_avg: $V$, the running mean of the squared loss gradient, with
        the params' structure and shapes, in their compute dtype (at least
        float32).
      metrics: `Metrics` of the last step, or `None`.
      sketch: `SketchBuffer` of the last step, or `None`.
    """

    count: jax.Array
    key: jax.Array
    initial_params: Any
    square_avg: Any
    metrics: Optional[Metrics]
    sketch: Optional[SketchBuffer]


def rmsprop_sgld(
    learning_rate: base.ScalarOrSchedule,
    *,
    nbeta: base.ScalarOrSchedule = 1.0,
    alpha: base.Scalar = 0.99,
    eps: base.Scalar = 0.1,
    initial_square_avg: base.Scalar = 0.0,
    bias_correction: bool = False,
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
    r"""SGLD preconditioned by RMSprop's running mean of squared gradients.

    With $g_t$ the raw gradient of the mean minibatch loss (not scaled by
    $n\beta$, without priors), one step is

    $$
    V_t = \alpha V_{t-1} + (1 - \alpha)\, g_t \odot g_t, \qquad
    G_t = \frac{1}{\sqrt{\hat V_t} + \varepsilon},
    $$

    $$
    w \leftarrow w - \frac{\epsilon}{2}\, m \odot G_t \odot \left(n\beta\,
    g_t + \lambda w + \gamma (w - w_0)\right)
    + \sqrt{\epsilon}\, \sigma\, m \odot \sqrt{G_t} \odot \eta,
    \qquad \eta \sim N(0, I),
    $$

    then the bounding box, as in `sgld`. By default $V_0 = 0$ and
    $\hat V_t = V_t$: the step of devinterp's `SGMCMC.rmsprop_sgld`, step
    for step. `initial_square_avg` sets $V_0$, and `bias_correction=True`
    takes $\hat V_t = V_t / (1 - \alpha^t)$ as Adam does; these are the
    options in which implementations of RMSprop-SGLD differ, such as the
    RMSPropSGLD of Hitchcock & Hoogland's local sampling benchmark (2025),
    which found it the most faithful sampler of local posteriors of deep
    linear networks.

    `Metrics` read as for `sgld`, with the preconditioner applied:
    `scaled_grad` is $\|\tfrac{\epsilon}{2} n\beta\, m \odot G \odot
    g\|$ and `unscaled_grad` $\|\tfrac{\epsilon}{2} n\beta\, m \odot g\|$
    (devinterp leaves it unmasked), `localization` and `weight_decay` are
    preconditioned, `noise` is $\|\sqrt{\epsilon}\sigma\, m \odot \sqrt{G}
    \odot \eta\|$ and `distance` is $\|m \odot (w - w_0)\|$ (devinterp
    leaves it unmasked).

    Args:
      learning_rate: step size $\epsilon$ (> 0), a number or a schedule.
      nbeta: inverse temperature $n\beta$ (> 0), a number or a schedule.
      alpha: decay $\alpha \in [0, 1)$ of the running mean.
      eps: $\varepsilon > 0$, added to $\sqrt{\hat V}$; it bounds the
        preconditioner by $1/\varepsilon$.
      initial_square_avg: $V_0 \ge 0$.
      bias_correction: divide $V_t$ by $1 - \alpha^t$.
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
      `params`; its state is an `RMSpropSGLDState`.

    Raises:
      TypeError: without `key`, or for a hyperparameter of the wrong type.
      ValueError: for invalid hyperparameters, naming the argument.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import sgld_optax as so
      >>> params = {"w": jnp.ones(3)}
      >>> tx = so.rmsprop_sgld(1e-3, nbeta=10.0, localization=1.0, key=0)
      >>> state = tx.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
      >>> updates, state = tx.update(grads, state, params)
      >>> state.square_avg["w"].shape
      (3,)

    References:
      Li, Chen, Carlson & Carin, "Preconditioned stochastic gradient
      Langevin dynamics for deep neural networks", AAAI 2016.

      Hitchcock & Hoogland, "From global to local: a scalable benchmark for
      local posterior sampling", 2025, arXiv:2507.21449.
    """
    base.check_scalar("alpha", alpha, non_negative=True)
    if (a := base.concrete_float(alpha)) is not None and not a < 1:
        raise ValueError(f"alpha must be < 1, got {a}.")
    base.check_scalar("eps", eps, positive=True)
    base.check_scalar("initial_square_avg", initial_square_avg,
                      non_negative=True)
    base.check_bool("bias_correction", bias_correction)
    return step.transformation(
        "rmsprop_sgld", RMSpropSGLDState, learning_rate=learning_rate,
        nbeta=nbeta, noise_level=noise_level, weight_decay=weight_decay,
        localization=localization, priors=priors,
        bounding_box_size=bounding_box_size, mask=mask,
        save_metrics=save_metrics, sketch_dim=sketch_dim,
        sketch_seed=sketch_seed, sketch=sketch, key=key,
        preconditioner=preconditioners.rmsprop(
            alpha, eps, initial_square_avg=initial_square_avg,
            bias_correction=bool(bias_correction)),
        dynamics=step.Dynamics("langevin"),
        hyperparams=dict(alpha=alpha, eps=eps,
                         initial_square_avg=initial_square_avg,
                         bias_correction=bias_correction))
