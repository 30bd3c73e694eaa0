r"""Stochastic Gradient Langevin Dynamics (SGLD), localized."""

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
class SGLDState(NamedTuple):
    r"""State of `sgld`.

    Attributes:
      count: int32 scalar, the number of steps taken; schedules read it.
      key: PRNG key (typed `jax.random.key` or legacy uint32 `(2,)`), split
        at every step. Replace it to start an independent chain:
        `state._replace(key=k)`.
      initial_params: the parameters $w_0$ given to `init`, with the params'
        structure, shapes and dtypes; `None` where nothing needs them (no
        localization, bounding box, metrics or sketches).
      metrics: `Metrics` of the last step (float32 scalars), or `None` unless
        `save_metrics=True`.
      sketch: `SketchBuffer` of the last step (float32 `(sketch_dim,)`
        arrays), or `None` unless sketching.
    """

    count: jax.Array
    key: jax.Array
    initial_params: Any
    metrics: Optional[Metrics]
    sketch: Optional[SketchBuffer]


def sgld(
    learning_rate: base.ScalarOrSchedule,
    *,
    nbeta: base.ScalarOrSchedule = 1.0,
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
    r"""Stochastic Gradient Langevin Dynamics (SGLD), localized.

    Samples the tempered, localized posterior
    $p(w) \propto \exp(-n\beta L(w) - \tfrac{\gamma}{2}\|w - w_0\|^2
    - \tfrac{\lambda}{2}\|w\|^2)$ around the initial parameters $w_0$
    (Welling & Teh, 2011; Lau et al., 2023). With gradient $\nabla L$ of the
    mean minibatch loss, step size $\epsilon$ and mask $m$ (1 where no mask
    is given), one step is

    $$
    w \leftarrow w - \frac{\epsilon}{2}\, m \odot \left(n\beta\,
    \nabla L(w) + \lambda w + \gamma (w - w_0)\right)
    + \sqrt{\epsilon}\, \sigma\, m \odot \eta,
    \qquad \eta \sim N(0, I),
    $$

    followed, when `bounding_box_size` $b$ is set, by clamping $w$ to
    $[w_0 - b, w_0 + b]$. `update` returns the updates that
    `optax.apply_updates` adds to the params to take this step; this is the
    step of devinterp's `SGLD` and `SGMCMC.sgld` optimizers.

    Noise is drawn leaf by leaf from the key in the state, which is split
    every step. Run independent chains by giving each its own key, e.g.
    `jax.vmap(lambda k: state._replace(key=k))(jax.random.split(key, n))`
    and vmapping `update` over the states.

    Args:
      learning_rate: step size $\epsilon$ (> 0), a number or an optax
        schedule of the step count.
      nbeta: inverse temperature $n\beta$ (> 0), a number or a schedule; see
        `default_nbeta`.
      noise_level: noise scale $\sigma$ (>= 0). Anything but 1 breaks the
        sampling guarantees and warns.
      weight_decay: $\lambda$ (>= 0), a Gaussian prior centred at 0.
      localization: $\gamma$ (>= 0), a Gaussian prior centred at $w_0$.
      priors: further `GaussianPrior`s (any centre); their gradients add to
        the drift.
      bounding_box_size: half-width $b$ (> 0) of the box around $w_0$ the
        params are clamped to, or `None` for no box.
      mask: `None` or a pytree with the params' structure and shapes, of
        bools or 0/1 numbers: only elements where it is 1 move.
      save_metrics: record `Metrics` of each step in the state (read them
        with `get_metrics`).
      sketch_dim: record count sketches of dimension `sketch_dim` of each
        step's components (read them with `get_sketches`).
      sketch_seed: seed of the count sketch's hashes.
      sketch: a prebuilt `CountSketch` to use instead of `sketch_dim` and
        `sketch_seed`; its `input_dim` must be the total number of params.
      key: int seed or JAX PRNG key of the noise (required). A Threefry key
        uses a fused generator; `rbg` keys use `jax.random.normal`. Two
        samplers with the same key draw the same noise: give each sampler in
        a pipeline (e.g. each partition of `optax.multi_transform`) and each
        chain its own key.

    Returns:
      An `optax.GradientTransformationExtraArgs` whose `update` requires
      `params`; `update.hyperparams` is a read-only mapping of its
      arguments. Its state is an `SGLDState`; `initial_params` is kept only
      when localization is not a literal 0, a bounding box is set, or
      metrics or sketches are recorded.

    Raises:
      TypeError: without `key`, or for a hyperparameter of the wrong type.
      ValueError: for invalid hyperparameters, naming the argument.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import sgld_optax as so
      >>> params = {"w": jnp.ones(3)}
      >>> tx = so.sgld(1e-3, nbeta=10.0, localization=1.0, key=0)
      >>> state = tx.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Welling & Teh, "Bayesian learning via stochastic gradient Langevin
      dynamics", ICML 2011.

      Lau, Furman, Wang, Murfet & Wei, "The local learning coefficient: a
      singularity-aware complexity measure", 2023, arXiv:2308.12108.
    """
    return step.transformation(
        "sgld", SGLDState, learning_rate=learning_rate, nbeta=nbeta,
        noise_level=noise_level, weight_decay=weight_decay,
        localization=localization, priors=priors,
        bounding_box_size=bounding_box_size, mask=mask,
        save_metrics=save_metrics, sketch_dim=sketch_dim,
        sketch_seed=sketch_seed, sketch=sketch, key=key,
        preconditioner=preconditioners.identity(),
        dynamics=step.Dynamics("langevin"), hyperparams={})
