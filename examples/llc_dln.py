"""Estimate the LLC of deep linear networks and compare with Aoyagi's formula.

For each network (layer widths, input first, and rank r of the true product
matrix) this builds noiseless data y = P x from a true parameter at which
every layer has rank exactly r (a "deepest" point, where the local learning
coefficient equals Aoyagi's global value), runs ``so.estimate_llc`` there and
prints the estimate beside the theoretical value. It writes a plot of the
running LLC of every chain against the theory.

    python examples/llc_dln.py                  # writes llc_dln.png
    python examples/llc_dln.py --out plots/     # writes plots/llc_dln.png

Hyperparameters: full-batch gradients (n = 256), nbeta = 1e4, step size 5e-5,
localization 10, 4 chains of 1000 burn-in steps and 4000 draws. A large
nbeta keeps the estimator near its asymptotic value; the step size is small
against the posterior's curvature; the localization is weak next to nbeta,
so the flat directions of the singular set are explored rather than cut
off. The last case has multiplicity 2: at finite nbeta the estimate there is
lowered by about (m - 1) / log(nbeta) = 0.11.
"""

from __future__ import annotations

import argparse
import os
import time

import jax.numpy as jnp
import numpy as np

import sgld_optax as so

# (widths from input to output, rank of the true product).
CASES = (
    ((5, 4, 5), 0),
    ((4, 3, 8), 0),
    ((3, 3, 3), 1),
    ((5, 5, 5, 5), 2),
    ((5, 5, 5, 5), 5),
    ((5, 3, 5), 0),
)


def dln_loss(weights, batch):
    """Half the mean squared error of the network x -> W_M ... W_1 x."""
    x, y = batch
    h = x
    for w in weights:
        h = h @ w.T
    return 0.5 * jnp.mean(jnp.sum((h - y) ** 2, axis=-1))


def deepest_point(widths, rank, n=256, scale=0.5, seed=0):
    """Noiseless data and a true parameter with every layer of rank ``rank``.

    Layer i is ``scale * Q_{i+1} Q_i^T``, ``Q_i`` an orthonormal frame of
    ``rank`` columns in R^{H_i}; for rank 0 every layer is zero.
    """
    rng = np.random.default_rng(seed)
    frames = [np.linalg.qr(rng.normal(size=(h, max(rank, 1))))[0][:, :rank]
              for h in widths]
    weights = [scale * frames[i + 1] @ frames[i].T
               for i in range(len(widths) - 1)]
    product = np.eye(widths[0])
    for w in weights:
        product = w @ product
    x = rng.normal(size=(n, widths[0]))
    data = (jnp.asarray(x, jnp.float32), jnp.asarray(x @ product.T, jnp.float32))
    return [jnp.asarray(w, jnp.float32) for w in weights], data


def plot(rows, results, path):
    """Running LLC of every chain, one panel per network, against theory."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(3, len(rows))
    nrows = -(-len(rows) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(nrows, cols, squeeze=False)).ravel()
    for ax, (widths, rank, truth, estimate), result in zip(axes, rows, results):
        for c, trace in enumerate(result.llc_trace):
            ax.plot(trace, lw=0.8, color=f"C{c}")
        ax.axhline(truth, color="k", ls="--", lw=1.2, label=f"Aoyagi {truth:g}")
        ax.set_title(f"widths {list(widths)}, rank {rank}: "
                     f"estimate {estimate:.2f}", fontsize="medium")
        ax.set_xlabel("draw")
        ax.set_ylabel("running LLC")
        ax.set_ylim(0, 2 * truth + 1)
        ax.legend(fontsize="small", loc="lower right")
    for ax in axes[len(rows):]:
        ax.set_visible(False)
    fig.savefig(path, dpi=110)
    return fig


def main(out: str = "llc_dln.png", num_draws: int = 4000, seed: int = 0,
         cases=CASES):
    """Runs every case; returns rows (widths, rank, Aoyagi value, estimate)."""
    if os.path.isdir(out) or out.endswith(os.sep):
        os.makedirs(out, exist_ok=True)
        out = os.path.join(out, "llc_dln.png")
    rows, results = [], []
    print(f"{'widths':>14} {'r':>2} {'m':>2} {'Aoyagi':>7} {'estimate':>15} "
          f"{'ratio':>6} {'R-hat':>6} {'time':>6}")
    for widths, rank in cases:
        truth = so.aoyagi_learning_coefficient(widths, rank)
        weights, data = deepest_point(widths, rank, seed=seed)
        start = time.perf_counter()
        result = so.estimate_llc(
            dln_loss, weights, data, key=seed, learning_rate=5e-5, nbeta=1e4,
            localization=10.0, num_chains=4, num_draws=num_draws,
            num_burnin_steps=num_draws // 4, batch_size=data[0].shape[0],
            progress=False)
        elapsed = time.perf_counter() - start
        print(f"{str(list(widths)):>14} {rank:>2} {truth.multiplicity:>2} "
              f"{truth.value:>7.3g} {result.llc_mean:>7.2f} +/- "
              f"{result.llc_std:<5.2f} {result.llc_mean / truth.value:>6.2f} "
              f"{result.rhat:>6.3f} {elapsed:>5.1f}s")
        rows.append((tuple(widths), rank, truth.value, result.llc_mean))
        results.append(result)
    plot(rows, results, out)
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="llc_dln.png",
                        help="PNG path, or a directory to write llc_dln.png in")
    parser.add_argument("--num-draws", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(out=args.out, num_draws=args.num_draws, seed=args.seed)
