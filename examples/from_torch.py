"""Sample around a PyTorch-trained model with sgld_optax, then hand it back.

1. Train a small PyTorch MLP on a toy regression task and save a checkpoint.
2. Load the checkpoint into the equivalent Flax module and check that both
   give the same outputs.
3. Run SGLD (``sgld_optax.sgld``) around the trained weights in a
   jit-compiled loop.
4. Save the last sampled weights as a PyTorch checkpoint and load it back
   into the PyTorch model.

Run with ``python examples/from_torch.py [--out DIR]``; it needs the
``torch`` extra (``pip install 'sgld_optax[torch]'``).
"""

import argparse
import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import sgld_optax as so
from sgld_optax import torch_interop

N, D_IN, HIDDEN, D_OUT = 512, 4, 32, 1
BATCH = 64


class TorchMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(D_IN, HIDDEN)
        self.norm = torch.nn.LayerNorm(HIDDEN)
        self.fc2 = torch.nn.Linear(HIDDEN, D_OUT)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.norm(self.fc1(x))))


class FlaxMLP(nn.Module):
    """The same network in Flax. Submodule names match the PyTorch attribute
    names, which is how parameters find each other."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(HIDDEN, name="fc1")(x)
        x = nn.LayerNorm(epsilon=1e-5, name="norm")(x)  # PyTorch's default eps
        x = nn.gelu(x, approximate=False)  # PyTorch's GELU is the exact one
        return nn.Dense(D_OUT, name="fc2")(x)


def make_data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D_IN)).astype(np.float32)
    y = (np.sin(x[:, :1] * 2.0) + 0.5 * x[:, 1:2] * x[:, 2:3]
         + 0.1 * rng.normal(size=(N, 1))).astype(np.float32)
    return x, y


def train_torch(x, y, steps=300):
    torch.manual_seed(0)
    model = TorchMLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(xt), yt)
        loss.backward()
        opt.step()
    print(f"torch: trained, final loss {loss.item():.4f}")
    return model.eval()


def main(out_dir: Path):
    x, y = make_data()
    model = train_torch(x, y)
    ckpt = out_dir / "trained.pt"
    torch.save(model.state_dict(), ckpt)

    # Load the checkpoint into Flax, using a freshly initialised model as the
    # template: every leaf must be matched, with the right shape.
    flax_model = FlaxMLP()
    like = flax_model.init(jax.random.key(0), jnp.zeros((1, D_IN)))["params"]
    params = torch_interop.params_from_torch(ckpt, like=like)

    with torch.no_grad():
        torch_out = model(torch.from_numpy(x)).numpy()
    flax_out = np.asarray(flax_model.apply({"params": params}, x))
    np.testing.assert_allclose(flax_out, torch_out, rtol=1e-5, atol=1e-5)
    print(f"flax: outputs agree with torch (max abs diff "
          f"{np.abs(flax_out - torch_out).max():.2e})")

    # Sample around the trained weights.
    xs, ys = jnp.asarray(x), jnp.asarray(y)

    def loss_fn(p, xb, yb):
        return jnp.mean((flax_model.apply({"params": p}, xb) - yb) ** 2)

    tx = so.sgld(1e-4, nbeta=so.default_nbeta(BATCH), localization=100.0,
                 save_metrics=True, key=0)

    @jax.jit
    def sample(params, state, key, num_steps=500):
        def step(carry, k):
            p, s = carry
            idx = jax.random.choice(k, N, (BATCH,), replace=False)
            loss, grads = jax.value_and_grad(loss_fn)(p, xs[idx], ys[idx])
            updates, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), loss

        keys = jax.random.split(key, num_steps)
        (params, state), losses = jax.lax.scan(step, (params, state), keys)
        return params, state, losses

    sampled, state, losses = sample(params, tx.init(params), jax.random.key(1))
    losses = np.asarray(losses)
    metrics = so.get_metrics(state)
    print(f"sgld: {losses.size} steps, loss {losses[:50].mean():.4f} -> "
          f"{losses[-50:].mean():.4f}, distance from start "
          f"{float(metrics.distance):.4f}")

    # Hand the sampled weights back to PyTorch.
    out = torch_interop.save_torch_checkpoint(
        sampled, out_dir / "sampled.pt", like=model)
    restored = TorchMLP().eval()
    restored.load_state_dict(torch.load(out, weights_only=True), strict=True)
    with torch.no_grad():
        restored_out = restored(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(
        restored_out, np.asarray(flax_model.apply({"params": sampled}, x)),
        rtol=1e-5, atol=1e-5)
    print(f"torch: loaded the sampled weights from {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the checkpoints (default: a "
                             "temporary one)")
    args = parser.parse_args()
    if args.out is None:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        main(args.out)
