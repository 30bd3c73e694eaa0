"""Calibrate the step size and nbeta of the LLC of a Flax MLP, then estimate it.

The MLP, data and training are those of ``examples/llc_mlp.py`` (its linen
model): a two-layer tanh network trained with full-batch Adam on a noisy
teacher. Then:

1. ``so.calibrate_llc`` sweeps a small grid of step sizes and nbetas around
   that example's settings (learning rate 3e-4, nbeta n / log n,
   localization 10), every grid point's chains in one compiled program, and
   prints the table (LLC, MCSE, R-hat, ESS, MALA acceptance and failed
   chains per grid point) and the recommended setting, or why there is
   none.
2. ``so.estimate_llc(..., mala=True)`` runs longer chains at the
   recommended setting and prints their ``summary()``.
3. ``result.to_arviz()`` exports them as an ArviZ ``InferenceData``, and
   ``az.summary`` reports the per-draw LLC (ArviZ is an optional
   dependency: ``pip install sgld_optax[arviz]``).

    python examples/calibrate_mlp.py                          # about 15 s on 2 CPU cores
    python examples/calibrate_mlp.py --plot calibration.png   # also the sweep's figure
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import pathlib
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

import sgld_optax as so


def _load_llc_mlp():
    """`examples/llc_mlp.py` as a module: its data, model and training."""
    path = pathlib.Path(__file__).resolve().parent / "llc_mlp.py"
    spec = importlib.util.spec_from_file_location("llc_mlp", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


llc_mlp = _load_llc_mlp()

# The grid: the MLP example's step size (3e-4) and nbeta (n / log n), with
# steps on either side and nbetas a factor 3 away. The smallest step size of
# each line is only the reference the next one is compared with; the
# largest, at the largest nbeta, blows up, which the table reports.
LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3)
NBETA_FACTORS = (1 / 3, 1.0, 3.0)   # times n / log n
LOCALIZATION = 10.0
SWEEP = dict(num_chains=4, batch_size=64)


def loss_fn(params, batch):
    """Half the mean squared error of the linen MLP, as in `llc_mlp.py`."""
    x, y = batch
    out = llc_mlp.LinenMLP().apply({"params": params}, x)
    return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))


def main(train_steps: int = 2000, num_draws: int = 4000,
         num_burnin_steps: int = 500, final_draws: int = 10000,
         n: int = 2048, seed: int = 0,
         learning_rates: Sequence[float] = LEARNING_RATES,
         nbetas: Optional[Sequence[float]] = None,
         plot: Optional[str] = None) -> dict:
    """Trains the MLP, calibrates, and estimates at the recommended setting.

    Args:
      train_steps: full-batch Adam steps.
      num_draws: draws per chain at each grid point.
      num_burnin_steps: burn-in steps, in the sweep and the final run.
      final_draws: draws per chain of the final estimate.
      n: the number of training samples.
      seed: seeds the data, the initial weights and the chains (the sweep's
        key is `seed`, the final run's `seed + 1`).
      learning_rates: the step sizes swept.
      nbetas: the nbetas swept; by default n / log n times 1/3, 1 and 3.
      plot: where to write the sweep's figure, or `None`.

    Returns:
      A dict with `"params"` (the trained weights), `"data"`, `"loss_fn"`,
      `"calibration"` (the `CalibrationResult`), `"final"` (the
      `LLCResult` at the recommended setting, `None` when none is
      recommended) and `"idata"` (its `InferenceData`, `None` without a
      final run or without ArviZ).
    """
    data = llc_mlp.make_data(jax.random.key(seed), n)
    params = llc_mlp.LinenMLP().init(jax.random.key(seed), data[0][:1])[
        "params"]
    params, final_loss = llc_mlp.train(loss_fn, params, data, train_steps)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"trained {num_params} parameters for {train_steps} Adam steps: "
          f"loss {final_loss:.5f}")

    # 1. The sweep.
    if nbetas is None:
        nbetas = [f * n / math.log(n) for f in NBETA_FACTORS]
    start = time.perf_counter()
    # target_nbeta: the recommendation prefers the nbeta the estimate is
    # meant for, n / log n here, over devinterp's default m / log m.
    cal = so.calibrate_llc(
        loss_fn, params, data, learning_rates=learning_rates, nbetas=nbetas,
        target_nbeta=n / math.log(n),
        localizations=[LOCALIZATION], num_draws=num_draws,
        num_burnin_steps=num_burnin_steps, key=seed, **SWEEP)
    print(f"1. calibration: {cal.llc_mean.size} grid points x "
          f"{SWEEP['num_chains']} chains x {num_burnin_steps} + {num_draws} "
          f"steps in {time.perf_counter() - start:.1f}s")
    print(cal.table())
    if plot:
        cal.plot(plot)
        print(f"   wrote {plot}")

    # 2. The estimate at the recommended setting.
    if cal.recommended is None:
        print("2. no setting is recommended, so no final estimate: "
              f"{cal.reason}")
        return dict(params=params, data=data, loss_fn=loss_fn,
                    calibration=cal, final=None, idata=None)
    lr, nbeta, loc = cal.recommended
    print(f"2. estimate_llc at learning_rate={lr:.3g}, nbeta={nbeta:.4g}, "
          f"localization={loc:.3g}, {final_draws} draws, MALA acceptance "
          "recorded:")
    final = so.estimate_llc(
        loss_fn, params, data, learning_rate=lr, nbeta=nbeta,
        localization=loc, num_draws=final_draws,
        num_burnin_steps=num_burnin_steps, key=seed + 1, mala=True,
        progress=False, **SWEEP)
    print(final.summary())

    # 3. ArviZ.
    try:
        import arviz as az
    except ImportError:
        print("3. ArviZ is not installed (pip install sgld_optax[arviz]): "
              "skipping the InferenceData")
        idata = None
    else:
        idata = final.to_arviz()
        print(f"3. InferenceData with groups {list(idata.groups())}; "
              "az.summary of the per-draw LLC:")
        print(az.summary(idata, var_names=["llc"]).to_string())
    return dict(params=params, data=data, loss_fn=loss_fn, calibration=cal,
                final=final, idata=idata)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=2000)
    parser.add_argument("--num-draws", type=int, default=4000,
                        help="draws per chain at each grid point")
    parser.add_argument("--num-burnin-steps", type=int, default=500)
    parser.add_argument("--final-draws", type=int, default=10000,
                        help="draws per chain at the recommended setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None,
                        help="write the sweep's figure, e.g. calibration.png")
    args = parser.parse_args()
    main(train_steps=args.train_steps, num_draws=args.num_draws,
         num_burnin_steps=args.num_burnin_steps,
         final_draws=args.final_draws, seed=args.seed, plot=args.plot)
