"""A calibration grid in one program against the estimate_llc calls it replaces.

    python benchmarks/calibrate.py              # 8 x 8 grid, 4 chains x 500 draws
    python benchmarks/calibrate.py --quick      # seconds, a small grid

On the LLC benchmark's MLP (``bench_lib.llc_problem``), times
``so.calibrate_llc`` over an 8 x 8 grid of learning rates and nbetas (4
chains x 500 draws per point) against one warm ``so.estimate_llc`` call per
grid point, in the same process: each side is run once to compile, then
timed (median of ``--repeats`` runs). Prints a table with the ratio and the
machine; no figures are written.
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

    import warnings
    warnings.simplefilter("ignore", RuntimeWarning)  # failed chains: expected
    times = {}
    for name, fn in (("calibrate_llc", grid), ("estimate_llc calls", calls)):
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
         ("speedup", f"**{ratio:.1f}x**")]))
    return times


if __name__ == "__main__":
    main()
