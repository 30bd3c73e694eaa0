"""Train a Flax MLP on synthetic data, then estimate its LLC.

The same two-layer tanh network is written twice, with Flax NNX and with Flax
linen. ``so.estimate_llc`` takes a loss of a params pytree, so:

* NNX: ``graphdef, params = nnx.split(model, nnx.Param)`` separates the
  module's structure from its weights; the loss rebuilds the module with
  ``nnx.merge(graphdef, params)``.
* linen: the params are already a pytree; the loss calls
  ``model.apply({"params": params}, x)``.

The data come from a smaller teacher network plus Gaussian noise, and the
loss is half the mean squared error (the negative log-likelihood of unit
variance noise, up to a constant), so that ``nbeta`` is an inverse
temperature on the right scale.

    python examples/llc_mlp.py
    python examples/llc_mlp.py --plot llc_mlp.png   # also writes trace plots
"""

from __future__ import annotations

import argparse
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import sgld_optax as so

IN, HIDDEN, OUT = 4, 16, 1


class NNXMLP(nnx.Module):
    """A tanh MLP, Flax NNX."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(IN, HIDDEN, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, OUT, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


class LinenMLP(nn.Module):
    """The same MLP, Flax linen."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(OUT)(jnp.tanh(nn.Dense(HIDDEN)(x)))


def make_data(key, n=2048):
    """Teacher with 3 hidden units, plus N(0, 0.1^2) noise."""
    kx, k1, k2, kn = jax.random.split(key, 4)
    x = jax.random.normal(kx, (n, IN))
    w1 = jax.random.normal(k1, (IN, 3))
    w2 = jax.random.normal(k2, (3, OUT))
    y = jnp.tanh(x @ w1) @ w2 + 0.1 * jax.random.normal(kn, (n, OUT))
    return x, y


def train(loss_fn, params, data, steps, learning_rate=1e-2):
    """Full-batch Adam, to get close to a minimum of the empirical loss."""
    adam = optax.adam(learning_rate)

    @jax.jit
    def step(carry, _):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, data)
        updates, opt_state = adam.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(step, (params, adam.init(params)),
                                       None, length=steps)
    return params, float(losses[-1])


# SGLD settings. nbeta = n / log n (the papers' choice; devinterp's default
# uses the batch size instead, see so.default_nbeta). The step size is small
# enough that the estimate no longer grows when it is halved, and the
# localization weak enough not to pin the chains (at 30 the estimate drops by
# a third). Check the plot: the loss traces should be flat after burn-in.
SGLD = dict(learning_rate=3e-4, localization=10.0, num_chains=4,
            num_burnin_steps=500, batch_size=64)


def _nbeta(data):
    n = data[0].shape[0]
    return n / math.log(n)


def fit_and_estimate(apply, params, data, seed, train_steps, num_draws):
    """Trains ``apply(params, x)`` on ``data``, then estimates its LLC."""

    def loss_fn(params, batch):
        x, y = batch
        return 0.5 * jnp.mean(jnp.sum((apply(params, x) - y) ** 2, axis=-1))

    params, final = train(loss_fn, params, data, train_steps)
    result = so.estimate_llc(loss_fn, params, data, key=seed,
                             nbeta=_nbeta(data), num_draws=num_draws,
                             progress=False, **SGLD)
    return final, result


def nnx_llc(data, seed, train_steps, num_draws):
    model = NNXMLP(nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    return fit_and_estimate(
        lambda params, x: nnx.merge(graphdef, params)(x), params, data, seed,
        train_steps, num_draws)


def linen_llc(data, seed, train_steps, num_draws):
    model = LinenMLP()
    params = model.init(jax.random.key(seed), data[0][:1])["params"]
    return fit_and_estimate(
        lambda params, x: model.apply({"params": params}, x), params, data,
        seed, train_steps, num_draws)


def main(train_steps: int = 2000, num_draws: int = 12000, seed: int = 0,
         plot: str | None = None):
    """Trains both models and returns ``{"nnx": LLCResult, "linen": ...}``."""
    data = make_data(jax.random.key(seed))
    num_params = IN * HIDDEN + HIDDEN + HIDDEN * OUT + OUT
    print(f"{num_params} parameters; a regular model would have LLC "
          f"{num_params / 2:g}")
    results = {}
    for name, run in (("nnx", nnx_llc), ("linen", linen_llc)):
        start = time.perf_counter()
        final, result = run(data, seed, train_steps, num_draws)
        results[name] = result
        print(f"--- {name}: trained loss {final:.5f} "
              f"({time.perf_counter() - start:.1f}s with sampling)")
        print(result.summary())
        if plot:
            path = plot.replace(".png", f"_{name}.png")
            result.plot(path)
            print(f"wrote {path}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=2000)
    parser.add_argument("--num-draws", type=int, default=12000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None,
                        help="write trace plots, e.g. llc_mlp.png")
    args = parser.parse_args()
    main(train_steps=args.train_steps, num_draws=args.num_draws, seed=args.seed,
         plot=args.plot)
