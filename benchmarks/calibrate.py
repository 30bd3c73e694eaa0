"""Sweeps in one program against the estimate_llc calls they replace.

    python benchmarks/calibrate.py              # 8 x 8 grid, 8 checkpoints
    python benchmarks/calibrate.py --quick      # seconds, small sizes

On the LLC benchmark's MLP (``bench_lib.llc_problem``), times, against one
warm ``so.estimate_llc`` call per point, in the same process:
``so.calibrate_llc`` over an 8 x 8 grid of learning rates and nbetas, and
``so.estimate_llc_series`` over 8 checkpoints (the teacher's weights
scaled), each 4 chains x 500 draws per point. Beside them, the floor any
sweep pays: the same number of the MLP's gradients on batches of the same
size, chain ``i`` of every point on the same batches as in the sweeps, all
in one ``lax.scan`` with nothing else (no noise, prior or checks). Each side is run once to compile, then timed (median of
``--repeats`` runs). Prints a table with the ratios and the machine; no
figures are written.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_lib as bl  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="a 3 x 2 grid, 2 chains x 50 draws")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    import jax.numpy as jnp
    import sgld_optax as so

    if args.quick:
        num_lr, num_nb, chains, draws, n = 3, 2, 2, 50, 1024
    else:
        num_lr, num_nb, chains, draws, n = 8, 8, 4, 500, 4096
    batch = 64
    layers, x, y = bl.llc_problem(n)
    params = [{k: jnp.asarray(v) for k, v in layer.items()}
              for layer in layers]
    data = (x, y)
    lrs = np.logspace(-6, -2, num_lr)
    nbs = so.default_nbeta(batch) * np.logspace(-2, 3, num_nb)
    common = dict(num_chains=chains, num_draws=draws, batch_size=batch,
                  key=0)

    def grid():
        so.calibrate_llc(bl.mlp_loss, params, data, learning_rates=lrs,
                         nbetas=nbs, localizations=[bl.LLC_LOCALIZATION],
                         mala=False, **common)

    def calls():
        for lr in lrs:
            for nb in nbs:
                so.estimate_llc(bl.mlp_loss, params, data, learning_rate=lr,
                                nbeta=nb, localization=bl.LLC_LOCALIZATION,
                                progress=False, **common)

    num_ck = 2 if args.quick else 8
    checkpoints = [[{k: jnp.asarray(v) * (0.8 + 0.2 * c / num_ck)
                     for k, v in layer.items()} for layer in layers]
                   for c in range(num_ck)]
    single = dict(learning_rate=bl.LLC_LR, nbeta=so.default_nbeta(batch),
                  localization=bl.LLC_LOCALIZATION, **common)

    def series():
        so.estimate_llc_series(bl.mlp_loss, checkpoints, data, **single)

    def series_calls():
        for ck in checkpoints:
            so.estimate_llc(bl.mlp_loss, ck, data, progress=False, **single)

    def gradients_only(num_points):
        """``num_points`` x ``chains`` chains of ``draws`` plain gradient
        steps; chain ``i`` of every point reads the same batches, as in the
        sweeps."""
        import jax
        from jax import lax

        xs, ys = jnp.asarray(x), jnp.asarray(y)
        grad = jax.vmap(jax.value_and_grad(bl.mlp_loss))  # over chains

        @jax.jit
        def run(params, key):
            points = jax.tree.map(
                lambda a: jnp.broadcast_to(a, (num_points, chains) + a.shape),
                params)

            def step(points, t):
                index = jax.random.randint(jax.random.fold_in(key, t),
                                           (chains, batch), 0, n)
                loss, grads = jax.vmap(grad, in_axes=(0, None))(
                    points, (xs[index], ys[index]))
                points = jax.tree.map(lambda w, g: w - 1e-6 * g, points, grads)
                return points, loss

            return lax.scan(step, points, jnp.arange(draws))[1]

        return lambda: run(params, jax.random.key(0)).block_until_ready()

    import warnings
    warnings.simplefilter("ignore", RuntimeWarning)  # failed chains: expected
    times = {}
    for name, fn in (("calibrate_llc", grid), ("estimate_llc calls", calls),
                     ("grid gradients", gradients_only(num_lr * num_nb)),
                     ("estimate_llc_series", series),
                     ("checkpoint calls", series_calls),
                     ("series gradients", gradients_only(num_ck))):
        bl.log(f"{name}: compiling")
        fn()
        samples = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        times[name] = float(np.median(samples))
        bl.log(f"{name}: {times[name]:.2f} s")

    ratio = times["estimate_llc calls"] / times["calibrate_llc"]
    ratio_series = times["checkpoint calls"] / times["estimate_llc_series"]
    ceiling = times["estimate_llc calls"] / times["grid gradients"]
    ceiling_series = times["checkpoint calls"] / times["series gradients"]
    print(f"\nMLP {'-'.join(map(str, bl.LLC_WIDTHS))} "
          f"({bl.llc_num_params():,} params), {n} points, batch {batch}; "
          f"{num_lr} x {num_nb} grid, {chains} chains x {draws} draws; "
          f"warm, median of {args.repeats}.")
    print(f"Machine: {bl.cpu_model()}, {os.cpu_count()} cores. "
          f"Load average: {', '.join(f'{v:.2f}' for v in os.getloadavg())}.\n")
    print(bl.md_table(
        ("run", "seconds"),
        [("`so.calibrate_llc`, one program", f"{times['calibrate_llc']:.2f}"),
         (f"{num_lr * num_nb} warm `so.estimate_llc` calls",
          f"{times['estimate_llc calls']:.2f}"),
         ("speedup", f"**{ratio:.1f}x**"),
         ("the gradients alone, one program", f"{times['grid gradients']:.2f}"),
         ("calls / gradients alone: a sweep's ceiling here",
          f"{ceiling:.1f}x"),
         (f"`so.estimate_llc_series`, {num_ck} checkpoints",
          f"{times['estimate_llc_series']:.2f}"),
         (f"{num_ck} warm `so.estimate_llc` calls",
          f"{times['checkpoint calls']:.2f}"),
         ("speedup", f"**{ratio_series:.1f}x**"),
         ("the gradients alone, one program",
          f"{times['series gradients']:.2f}"),
         ("calls / gradients alone: a sweep's ceiling here",
          f"{ceiling_series:.1f}x")]))
    return times


if __name__ == "__main__":
    main()
