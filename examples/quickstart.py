"""Sample the posterior around a trained Flax model with ``so.sgld``.

Trains a small MLP on synthetic regression data with Adam, then runs SGLD
localized at the trained weights in a jit-compiled ``lax.scan`` and prints the
metrics of the sampler along the way. ``--sampler`` picks another sampler of
the family (see docs/samplers.md).

    python examples/quickstart.py
    python examples/quickstart.py --sampler sghmc
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import sgld_optax as so

# Each sampler with the hyperparameters it adds to sgld's (their defaults).
SAMPLERS = {
    "sgld": (so.sgld, {}),
    "rmsprop_sgld": (so.rmsprop_sgld, {"alpha": 0.99, "eps": 0.1}),
    "sghmc": (so.sghmc, {"momentum_decay": 0.1}),
    "sgnht": (so.sgnht, {"diffusion_factor": 0.01}),
}


class MLP(nn.Module):
    hidden: int = 32

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(self.hidden)(x))
        return nn.Dense(1)(x)


def main(steps: int = 500, seed: int = 0, sampler: str = "sgld"):
    key_data, key_init, key_batches = jax.random.split(jax.random.key(seed), 3)
    n, batch_size = 1024, 64
    x = jax.random.normal(key_data, (n, 4))
    y = jnp.sin(x @ jnp.array([[1.0], [-0.5], [0.3], [0.0]]))

    model = MLP()
    params = model.init(key_init, x[:1])["params"]

    def loss_fn(params, xb, yb):
        return jnp.mean((model.apply({"params": params}, xb) - yb) ** 2)

    # 1. Train to a minimum with an ordinary optimizer.
    adam = optax.adam(1e-2)

    @jax.jit
    def train_step(params, opt_state, _):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = adam.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = adam.init(params)
    for i in range(300):
        params, opt_state, loss = train_step(params, opt_state, i)
    print(f"trained: loss {float(loss):.5f}")

    # 2. Sample around the trained weights.
    factory, extra = SAMPLERS[sampler]
    tx = factory(
        learning_rate=1e-4,
        nbeta=so.default_nbeta(batch_size),
        localization=100.0,
        save_metrics=True,
        key=seed,          # required: the seed of the sampler's noise
        **extra,
    )
    state = tx.init(params)

    def sample_step(carry, key):
        params, state = carry
        idx = jax.random.choice(key, n, (batch_size,), replace=False)
        loss, grads = jax.value_and_grad(loss_fn)(params, x[idx], y[idx])
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        return (params, state), (loss, so.get_metrics(state))

    @jax.jit
    def run(params, state, key):
        keys = jax.random.split(key, steps)
        return jax.lax.scan(sample_step, (params, state), keys)

    (_, state), (losses, metrics) = run(params, state, key_batches)
    print(f"sampled {steps} {sampler} steps: mean loss "
          f"{float(losses.mean()):.5f}")
    print(f"{'step':>6} {'loss':>9} {'|grad|':>9} {'|local.|':>9} "
          f"{'|noise|':>9} {'distance':>9}")
    for t in range(0, steps, max(steps // 10, 1)):
        print(f"{t:6d} {float(losses[t]):9.5f} "
              f"{float(metrics.scaled_grad[t]):9.2e} "
              f"{float(metrics.localization[t]):9.2e} "
              f"{float(metrics.noise[t]):9.2e} "
              f"{float(metrics.distance[t]):9.2e}")
    print(f"parameters sampled: {int(metrics.numel[-1])}")
    return losses, metrics, state


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default="sgld")
    args = parser.parse_args()
    main(args.steps, args.seed, args.sampler)
