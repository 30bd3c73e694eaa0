r"""An LLC estimate in the ecosystem's forms: ArviZ and devinterp.

`to_arviz` turns an `LLCResult` into an ArviZ `InferenceData`, so that
`az.summary`, `az.rhat`, `az.ess`, `az.plot_trace` and the rest apply to
it. `to_devinterp` gives a dict under the names devinterp's results use,
both 1.x's (`llc/mean`, `llc-chain/{i}`, `loss/trace`, ...) and 2.0.1's
(`llc_mean`, `llc_per_chain`, `loss_trace`, ...), so that code written
against either keeps working.
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

from sgld_optax._src.metrics import DOT_FIELDS, NORM_FIELDS

_METRIC_FIELDS = NORM_FIELDS + DOT_FIELDS


def _per_draw_llc(result) -> np.ndarray:
    r"""$n\beta\,(L_t - L_n(w^*))$ per chain and draw, in float64."""
    losses = np.asarray(result.loss_trace, np.float64)
    return result.nbeta * (losses - result.init_loss)


def _run_attrs(result) -> Dict[str, Any]:
    from sgld_optax import __version__
    failures = [str(f) for f in np.asarray(result.failures)]
    attrs = {
        "inference_library": "sgld_optax",
        "inference_library_version": __version__,
        "nbeta": float(result.nbeta),
        "init_loss": float(result.init_loss),
        "num_chains": int(result.num_chains),
        "failures": failures,
        "failed_chains": [c for c, f in enumerate(failures) if f],
    }
    if result.num_params is not None:
        attrs["num_params"] = int(result.num_params)
    return attrs


def to_arviz(result, *, include_failed: bool = False):
    r"""The run as an ArviZ `InferenceData`.

    ArviZ is an optional dependency: `pip install sgld_optax[arviz]`.

    Groups:

    - `posterior`, dims `(chain, draw)`:
        - `llc`: the LLC of each draw, $n\beta\,(L_{B_t}(w_t) - L_n(w^*))$,
          float64. Its mean over a chain is that chain's `llc_per_chain`,
          so the mean that `az.summary` reports is `llc_mean`, and `az.rhat`,
          `az.ess` and `az.mcse` of `llc` are the run's diagnostics.
        - `loss`: the minibatch loss $L_{B_t}(w_t)$ of each draw
          (`loss_trace`).
    - `sample_stats`, dims `(chain, draw)`, only when the run recorded it
      (`estimate_llc(..., mala=True)`): `mala_acceptance`, the
      Metropolis-adjusted Langevin acceptance probability of each draw's
      step.
    - `sampler_metrics`, dims `(chain, step)`, only with
      `save_metrics=True`: each field of `Metrics` (`scaled_grad`, `noise`,
      `distance`, ...) at every step. These traces cover every step, burn-in
      and the steps between draws included, so they have their own `step`
      dimension rather than `draw`: draw $d$ is step
      `num_burnin_steps + d * num_steps_bw_draws`.

    Every group carries the run's attributes: `nbeta`, `init_loss`
    ($L_n(w^*)$), `num_chains`, `failures` (the reason each chain failed,
    `""` for a healthy chain, for every chain of the run), `failed_chains`
    (their indices), `num_params` (the number $d$ of sampled parameters,
    where known) and the library's name and version.

    By default the chains that failed (`result.diverged`) are left out, as
    they are left out of `llc_mean`, `rhat` and the ESS; the `chain`
    coordinate keeps the indices of the chains that remain, so chain `c`
    of the `InferenceData` is chain `c` of the result.

    Args:
      result: an `LLCResult`.
      include_failed: keep the failed chains too (their traces hold
        non-finite or very large values, which make ArviZ's summaries
        non-finite).

    Returns:
      An `arviz.InferenceData`.

    Raises:
      ImportError: when ArviZ is not installed.
      ValueError: when every chain failed and `include_failed` is false.

    Examples:
      >>> import arviz as az  # doctest: +SKIP
      >>> idata = result.to_arviz()  # doctest: +SKIP
      >>> az.summary(idata, var_names=["llc"])  # doctest: +SKIP
    """
    try:
        import arviz as az
        import xarray as xr
    except ImportError as e:
        raise ImportError(
            "to_arviz needs ArviZ, an optional dependency: "
            "pip install sgld_optax[arviz]") from e

    diverged = np.asarray(result.diverged, bool)
    keep = np.ones_like(diverged) if include_failed else ~diverged
    if not keep.any():
        raise ValueError(
            f"Every chain of the run failed ({dict(enumerate(result.failures))}"
            "); pass include_failed=True to export them anyway.")
    chains = np.flatnonzero(keep)
    attrs = _run_attrs(result)
    coords = {"chain": chains, "draw": np.arange(result.num_draws)}

    def dataset(variables):
        return az.dict_to_dataset(variables, attrs=dict(attrs), coords=coords)

    groups = {"posterior": dataset({
        "llc": _per_draw_llc(result)[keep],
        "loss": np.asarray(result.loss_trace)[keep],
    })}
    if result.mala_acceptance is not None:
        groups["sample_stats"] = dataset({
            "mala_acceptance": np.asarray(result.mala_acceptance)[keep]})
    if result.metrics is not None:
        traces = {name: np.asarray(getattr(result.metrics, name))[keep]
                  for name in _METRIC_FIELDS}
        num_steps = next(iter(traces.values())).shape[1]
        groups["sampler_metrics"] = xr.Dataset(
            {name: (("chain", "step"), v) for name, v in traces.items()},
            coords={"chain": chains, "step": np.arange(num_steps)},
            attrs=dict(attrs))
    return az.InferenceData(**groups)


def _std(x: np.ndarray, ddof: int, axis=None):
    """`np.std` that gives NaN instead of warning when `ddof` leaves no
    degrees of freedom."""
    n = x.shape[0] if axis == 0 else x.size
    if n - ddof <= 0:
        shape = x.shape[1:] if axis == 0 else ()
        return np.full(shape, np.nan)[()] if shape else float("nan")
    return np.std(x, axis=axis, ddof=ddof)


def to_devinterp(result) -> Dict[str, Any]:
    r"""The run under devinterp's names.

    devinterp 1.x (`estimate_learning_coeff_with_summary`, whose
    `LLCEstimator` gives the first four, `OnlineLLCEstimator` the
    `llc/trace`, `llc/means`, `llc/stds` and `init_loss`, and
    `MalaAcceptanceRate` the `mala_accept/*`):

    | key | value |
    |---|---|
    | `llc/mean` | `llc_mean` (float) |
    | `llc/std` | standard deviation over chains with `ddof=1`, as 1.x's `torch.std` (float; NaN for a single chain) |
    | `llc-chain/{i}` | `llc_per_chain[i]` (float), for every chain $i$ |
    | `loss/trace` | `loss_trace`, float32 `(num_chains, num_draws)` |
    | `llc/trace` | per-draw LLC $n\beta\,(L_{B_t}(w_t) - L_n(w^*))$, float64 `(num_chains, num_draws)` (not the running mean) |
    | `llc/means`, `llc/stds` | mean and standard deviation (`ddof=1`) of `llc/trace` over chains, per draw |
    | `init_loss` | $L_n(w^*)$ (float) |
    | `mala_accept/trace` | `mala_acceptance`, `(num_chains, num_draws)`, when recorded |
    | `mala_accept/mean`, `mala_accept/std` | its mean and standard deviation (`ddof=0`), when recorded |

    devinterp 2.0.1 (the `xarray.Dataset` of `llc` / `compute_llc`):

    | key | value |
    |---|---|
    | `llc_mean` | `llc_mean` (float) |
    | `llc_std` | `llc_std`, `ddof=0` as xarray's `std` (float) |
    | `llc_per_chain` | `llc_per_chain`, float64 `(num_chains,)` |
    | `llc_scalar` | $n\beta$ times (the mean loss over every chain and draw minus $L_n(w^*)$): `llc_mean` again, as every chain has the same number of draws |
    | `loss_trace` | `loss_trace`, float32 `(num_chains, num_draws)` |
    | `init_loss` | $L_n(w^*)$ (float) |

    Means, standard deviations and `llc_scalar` are over the chains that
    did not fail, like `llc_mean`; a failed chain's `llc-chain/{i}` and
    `llc_per_chain[i]` are NaN.

    Two differences in meaning remain. devinterp 2.0.1's `loss_trace` has a
    `step` axis: `compute_llc` averages the loss of every step, burn-in
    and the steps between draws included, where this library (and
    devinterp 1.x) averages the draws only; with `num_burnin_steps=0` and
    `num_steps_bw_draws=1` the two agree. And devinterp estimates
    $L_n(w^*)$ from a few minibatches (1.x: `num_chains` batches; 2.0.1:
    `num_init_loss_batches` batches per chain), where `init_loss` here is
    the loss on the whole dataset.

    Args:
      result: an `LLCResult`.

    Returns:
      A dict of floats and NumPy arrays.
    """
    ok = ~np.asarray(result.diverged, bool)
    per_chain = np.asarray(result.llc_per_chain, np.float64)
    losses = np.asarray(result.loss_trace)
    per_draw = _per_draw_llc(result)
    healthy = per_chain[ok]
    llc_mean = float(result.llc_mean)
    out: Dict[str, Any] = {
        # devinterp 1.x, LLCEstimator.get_results
        "llc/mean": llc_mean,
        "llc/std": float(_std(healthy, ddof=1)),
        **{f"llc-chain/{i}": float(v) for i, v in enumerate(per_chain)},
        "loss/trace": losses,
        # devinterp 1.x, OnlineLLCEstimator.get_results
        "llc/trace": per_draw,
        "llc/means": (per_draw[ok].mean(axis=0) if ok.any()
                      else np.full(result.num_draws, np.nan)),
        "llc/stds": _std(per_draw[ok], ddof=1, axis=0),
        "init_loss": float(result.init_loss),
        # devinterp 2.0.1, compute_llc
        "llc_mean": llc_mean,
        "llc_std": float(result.llc_std),
        "llc_per_chain": per_chain,
        "llc_scalar": (float(result.nbeta * (
            losses[ok].astype(np.float64).mean() - result.init_loss))
            if ok.any() else float("nan")),
        "loss_trace": losses,
    }
    if result.mala_acceptance is not None:
        acc = np.asarray(result.mala_acceptance)
        out["mala_accept/trace"] = acc
        out["mala_accept/mean"] = (float(acc[ok].mean()) if ok.any()
                                   else float("nan"))
        out["mala_accept/std"] = float(_std(acc[ok], ddof=0))
    return out
