r"""Choosing the step size, nbeta and localization: a calibration sweep in one program.

`calibrate_llc` runs `estimate_llc` over a grid of learning rates $\epsilon$,
inverse temperatures $n\beta$ and localizations $\gamma$ as a single compiled
program: the run's loop (`loop._run_in_memory`) is vmapped over the grid's
hyperparameters, so every grid point's chains step together, and the whole
sweep compiles once. Each grid point's chains are the chains `estimate_llc`
runs with the same key and settings.
"""

from __future__ import annotations

import math
import warnings
from typing import (TYPE_CHECKING, Any, Callable, Mapping, NamedTuple,
                    Optional, Sequence, Union)

import jax
import jax.numpy as jnp
import numpy as np
import optax

if TYPE_CHECKING:  # matplotlib is imported only when plotting
    from matplotlib.figure import Figure

from sgld_optax._src import base
from sgld_optax._src.llc import api
from sgld_optax._src.llc import data as data_lib
from sgld_optax._src.llc import loop
from sgld_optax._src.llc.result import (MALA_MIN, RHAT_MAX, LLCResult,
                                         _summarise)
from sgld_optax._src.samplers import common as common_lib


class CalibrationResult(NamedTuple):
    r"""The outcome of `calibrate_llc`.

    Arrays are indexed `[i, j, k]` for `learning_rates[i]`, `nbetas[j]` and
    `localizations[k]`.

    Attributes:
      learning_rates: float64 `(L,)`, the step sizes $\epsilon$ swept.
      nbetas: float64 `(B,)`, the inverse temperatures swept.
      localizations: float64 `(G,)`, the localizations swept.
      results: the `LLCResult` of every grid point, a nested tuple indexed
        `[i][j][k]`.
      llc_mean: `(L, B, G)`, the estimate at each grid point (NaN where
        every chain failed).
      llc_std: `(L, B, G)`, its spread over the healthy chains.
      mcse: `(L, B, G)`, the Monte Carlo standard error of `llc_mean`.
      rhat: `(L, B, G)`, rank-normalised split $\hat R$.
      ess_bulk: `(L, B, G)`, bulk effective sample size.
      mala_acceptance: `(L, B, G)`, the mean MALA acceptance (NaN unless
        recorded: first-order samplers only).
      num_failed: int `(L, B, G)`, chains that failed (non-finite loss or
        blow-up).
      llc_in_range: bool `(L, B, G)`, whether the estimate passed the
        range check (not clearly negative, not above $d/2$).
      recommended: the recommended `(learning_rate, nbeta, localization)`,
        or `None` when no grid point qualifies; see `calibrate_llc`.
      reason: why that setting, or why none.
      ess_tail: `(L, B, G)`, tail effective sample size.
      qualifies: bool `(L, B, G)`, whether the grid point qualifies for
        the recommendation (see `calibrate_llc`).
    """

    learning_rates: np.ndarray
    nbetas: np.ndarray
    localizations: np.ndarray
    results: tuple
    llc_mean: np.ndarray
    llc_std: np.ndarray
    mcse: np.ndarray
    rhat: np.ndarray
    ess_bulk: np.ndarray
    mala_acceptance: np.ndarray
    num_failed: np.ndarray
    llc_in_range: np.ndarray
    recommended: Optional[tuple]
    reason: str
    ess_tail: np.ndarray
    qualifies: np.ndarray

    def table(self) -> str:
        """The grid as a text table, one row per grid point.

        Returns:
          A string with columns learning rate, nbeta, localization, LLC
          mean and std, MCSE, R-hat, bulk and tail ESS, MALA acceptance,
          failed chains, whether the LLC is in range and whether the point
          qualifies; the recommended row is marked with `*`.
        """
        head = (f"{'':1} {'lr':>9} {'nbeta':>9} {'loc':>8} {'llc':>10} "
                f"{'std':>9} {'mcse':>8} {'rhat':>7} {'ess':>7} {'tail':>7} "
                f"{'mala':>6} {'failed':>6} {'range':>5} {'qual':>4}")
        lines = [head]
        for (i, j, k) in np.ndindex(self.llc_mean.shape):
            lr, nb = self.learning_rates[i], self.nbetas[j]
            loc = self.localizations[k]
            mark = ("*" if self.recommended == (lr, nb, loc) else " ")
            lines.append(
                f"{mark} {lr:9.3g} {nb:9.3g} {loc:8.3g} "
                f"{self.llc_mean[i, j, k]:10.4g} {self.llc_std[i, j, k]:9.3g} "
                f"{self.mcse[i, j, k]:8.3g} {self.rhat[i, j, k]:7.3f} "
                f"{self.ess_bulk[i, j, k]:7.1f} "
                f"{self.ess_tail[i, j, k]:7.1f} "
                f"{self.mala_acceptance[i, j, k]:6.3f} "
                f"{int(self.num_failed[i, j, k]):6d} "
                f"{'ok' if self.llc_in_range[i, j, k] else 'no':>5} "
                f"{'yes' if self.qualifies[i, j, k] else 'no':>4}")
        lines.append(f"recommended: {self.reason}")
        return "\n".join(lines)

    def plot(self, path: Optional[str] = None) -> "Figure":
        """The estimate and its stability over the grid.

        One column per localization. The top row shows the LLC against the
        learning rate (log scale), one line per nbeta, with a band of one
        standard deviation over chains; grid points where a chain failed
        are marked with a cross and left off the lines, and the
        recommended setting with a star. The bottom row shows, against the
        learning rate, the MALA acceptance when recorded, else $\\hat R$.

        Args:
          path: where to write a PNG, or `None` to write nothing.

        Returns:
          The `matplotlib.figure.Figure`.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        num_loc = len(self.localizations)
        fig = Figure(figsize=(5 * num_loc, 6.5), layout="constrained")
        FigureCanvasAgg(fig)
        axes = np.asarray(fig.subplots(2, num_loc, squeeze=False))
        mala = np.isfinite(self.mala_acceptance).any()
        lr = self.learning_rates
        for k, loc in enumerate(self.localizations):
            ax, ax2 = axes[0, k], axes[1, k]
            for j, nb in enumerate(self.nbetas):
                color = f"C{j % 10}"
                mean = self.llc_mean[:, j, k]
                std = self.llc_std[:, j, k]
                good = (self.num_failed[:, j, k] == 0) & np.isfinite(mean)
                ax.plot(lr[good], mean[good], "o-", color=color, ms=3,
                        label=f"nbeta {nb:.3g}")
                ax.fill_between(lr[good], (mean - std)[good],
                                (mean + std)[good], color=color, alpha=0.15)
                bad = ~good
                if bad.any():
                    ax.plot(lr[bad], np.zeros(bad.sum()), "x", color=color)
                second = (self.mala_acceptance if mala else self.rhat)[:, j, k]
                ax2.plot(lr[good], second[good], "o-", color=color, ms=3)
                if self.recommended is not None and (
                        self.recommended[1] == nb
                        and self.recommended[2] == loc):
                    i = int(np.flatnonzero(lr == self.recommended[0])[0])
                    ax.plot([lr[i]], [mean[i]], "*", color="k", ms=14,
                            label="recommended")
            ax.set_xscale("log")
            ax2.set_xscale("log")
            ax.set_title(f"localization {loc:.3g} (x: failed chains)")
            ax.set_ylabel("LLC")
            ax2.set_xlabel("learning rate")
            ax2.set_ylabel("MALA acceptance" if mala else "R-hat")
            if mala:
                ax2.axhline(MALA_MIN, color="0.5", ls="--", lw=1)
            else:
                ax2.axhline(RHAT_MAX, color="0.5", ls="--", lw=1)
            ax.legend(fontsize="x-small")
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def _grid(values, name: str, default) -> np.ndarray:
    if values is None:
        values = default
    arr = np.atleast_1d(np.asarray(values, np.float64))
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of "
                         f"numbers, got {values!r}.")
    for i, v in enumerate(arr):
        base.check_scalar(f"{name}[{i}]", float(v),
                          positive=name != "localizations",
                          non_negative=name == "localizations")
    return arr


def calibrate_llc(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: base.PyTree,
    data: Any,
    *,
    learning_rates: Optional[Sequence[float]] = None,
    nbetas: Optional[Sequence[float]] = None,
    localizations: Sequence[float] = (0.0,),
    key: Any = 0,
    sampler: Union[str, Callable[..., optax.GradientTransformation]] = "sgld",
    sampler_kwargs: Optional[Mapping[str, Any]] = None,
    weight_decay: float = 0.0,
    noise_level: float = 1.0,
    bounding_box_size: Optional[float] = None,
    mask: Optional[base.PyTree] = None,
    num_chains: int = 4,
    num_draws: int = 200,
    num_burnin_steps: int = 0,
    num_steps_bw_draws: int = 1,
    batch_size: int = 32,
    mala: Optional[bool] = None,
    target_nbeta: Optional[float] = None,
) -> CalibrationResult:
    r"""Estimates the LLC over a grid of step sizes, nbetas and localizations.

    The whole grid times the chains is one vectorised, compiled program
    (not a loop over `estimate_llc`): the sampling loop is vmapped over the
    grid's hyperparameters. Grid point $(\epsilon_i, n\beta_j, \gamma_k)$
    gives the chains `estimate_llc(..., learning_rate=` $\epsilon_i$ `,
    nbeta=` $n\beta_j$ `, localization=` $\gamma_k$ `)` gives with the same
    `key` and settings, and its `LLCResult`. The defaults are devinterp
    1.x's `EpsilonBetaAnalyzer` grid: 8 step sizes log-spaced in
    $[10^{-6}, 10^{-2}]$ and 8 nbetas log-spaced from $10^{-2}$ to $10^3$
    times `default_nbeta(batch_size)`.

    **The recommendation.** A grid point *qualifies* when its estimate
    passes `estimate_llc`'s verdict and is stable in the step size:

    1. every check of its `LLCResult.checks` passed: no chain failed
       (non-finite loss, blow-up), the estimate is in range (not clearly
       negative, not above $d/2$), the chains mixed ($\hat R < 1.01$, bulk
       and tail ESS of at least 100 per chain) and, where recorded, the
       mean MALA acceptance is at least 0.5;
    2. its estimate is precise: its MCSE is at most 10% of it (an
       imprecise estimate agrees with anything);
    3. its estimate agrees with the estimate at the next smaller step size
       of the same nbeta and localization within $3\sqrt{s_1^2 + s_2^2}$
       plus 5% of the smaller-step estimate, $s$ being their MCSEs; that
       neighbour must have no failed chain, an estimate in range and, where
       recorded, MALA acceptance of at least 0.5 (not the mixing checks: a
       smaller step mixes more slowly).

    A too-large step biases the estimate and a too-small one mixes slowly;
    the largest stable step mixes best at little bias. Among the
    qualifying points the recommendation is one at the swept nbeta nearest
    (in log) to `target_nbeta` that has any (nbeta sets the temperature,
    and so what is estimated, rather than how well it is sampled): the
    one with the largest learning rate there, then the smallest
    localization. The smallest step size of a line has no smaller
    neighbour and never qualifies, so a single learning rate gives no
    recommendation. When no point qualifies, `reason` says which
    conditions failed where: points with failed chains (lower the step
    size, widen the grid towards smaller ones), points whose chains had
    not mixed or whose MCSE is large (raise `num_draws` or
    `num_burnin_steps`), and points without an agreeing smaller step.

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar`, the mean loss over a
        batch, as for `estimate_llc`.
      params: the trained weights $w^*$.
      data: in-memory data (a pytree of arrays with a shared leading
        axis); a loader cannot be replayed for every grid point at once.
      learning_rates: step sizes to sweep.
      nbetas: inverse temperatures to sweep.
      localizations: localizations to sweep.
      key: int seed or PRNG key, as for `estimate_llc`.
      sampler: sampler name or factory, as for `estimate_llc`.
      sampler_kwargs: the sampler's own options.
      weight_decay: as for `estimate_llc`.
      noise_level: as for `estimate_llc`.
      bounding_box_size: as for `estimate_llc`.
      mask: as for `estimate_llc`.
      num_chains: chains per grid point.
      num_draws: draws per chain.
      num_burnin_steps: steps before the first draw.
      num_steps_bw_draws: steps between draws.
      batch_size: minibatch size.
      mala: record the MALA acceptance; by default, when the sampler is
        first-order (its state is `so.sgld`'s or `so.rmsprop_sgld`'s,
        however the factory is wrapped).
      target_nbeta: the nbeta the recommendation prefers (see above); by
        default `default_nbeta(batch_size)`, devinterp's choice. Pass the
        one the estimate is meant for, such as $n / \log n$.

    Returns:
      A `CalibrationResult`: arrays over the grid, each point's
      `LLCResult`, the recommendation, `table()` and `plot()`.

    Raises:
      TypeError, ValueError: for invalid arguments, naming the argument,
        and for data that is not in memory.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> import sgld_optax as so
      >>> x = np.random.default_rng(0).normal(size=(256, 2)).astype("float32")
      >>> y = x @ np.ones((2, 1), "float32")
      >>> def loss_fn(w, batch):
      ...     return jnp.mean((batch[0] @ w - batch[1]) ** 2)
      >>> cal = so.calibrate_llc(
      ...     loss_fn, jnp.ones((2, 1)), (x, y),
      ...     learning_rates=[1e-5, 1e-4, 1e-3], nbetas=[10.0, 30.0],
      ...     localizations=[10.0], num_chains=2, num_draws=50)
      >>> cal.llc_mean.shape
      (3, 2, 1)

    References:
      Lau, Furman, Wang, Murfet & Wei, "The local learning coefficient: a
      singularity-aware complexity measure", 2023, arXiv:2308.12108.
    """
    if not data_lib._is_in_memory(data):
        raise TypeError(
            "calibrate_llc needs in-memory data (a pytree of arrays with a "
            "shared leading axis): every grid point's chains read it in the "
            "same program.")
    batch_size = api._check_int("batch_size", batch_size, 1)
    default_nb = common_lib.default_nbeta(batch_size)
    target_nb = default_nb
    if target_nbeta is not None:
        base.check_scalar("target_nbeta", target_nbeta, positive=True)
        target_nb = float(target_nbeta)
    lrs = _grid(learning_rates, "learning_rates", np.logspace(-6, -2, 8))
    nbs = _grid(nbetas, "nbetas", default_nb * np.logspace(-2, 3, 8))
    locs = _grid(localizations, "localizations", (0.0,))

    # Checks every argument as estimate_llc does, at the grid's first
    # point, and builds the run; only the traced hyperparameters differ
    # from point to point.
    run = api._prepare(
        loss_fn, params, data, key=key, sampler=sampler,
        sampler_kwargs=sampler_kwargs, learning_rate=float(lrs[0]),
        nbeta=float(nbs[0]), localization=float(locs[0]),
        weight_decay=weight_decay, noise_level=noise_level,
        bounding_box_size=bounding_box_size, mask=mask,
        num_chains=num_chains, num_draws=num_draws,
        num_burnin_steps=num_burnin_steps,
        num_steps_bw_draws=num_steps_bw_draws, batch_size=batch_size,
        save_metrics=False, mala=mala, progress=False)
    grid = np.stack(np.meshgrid(lrs, nbs, locs, indexing="ij"),
                    axis=-1).reshape(-1, 3).astype(np.float32)
    hyper = run.hyper._replace(
        learning_rate=grid[:, 0], nbeta=grid[:, 1], localization=grid[:, 2])
    out = _sweep(run.static, hyper, run.mask, run.params, run.data,
                 run.key, run.chain_ids, run.reference)
    out = jax.tree.map(np.asarray, out)

    shape = (len(lrs), len(nbs), len(locs))
    results = []
    with warnings.catch_warnings():
        # Failed chains are the point of a sweep: the table reports them.
        warnings.simplefilter("ignore", RuntimeWarning)
        for g in range(grid.shape[0]):
            results.append(_summarise(
                jax.tree.map(lambda x: x[g], out),
                init_loss=run.init_loss, nbeta=float(grid[g, 1]),
                num_params=run.num_params, spread=run.spread))
    return _tabulate(results, shape, lrs, nbs, locs, target_nb)


def _run_grid(static, hyper, mask, params, data, key, chain_ids, reference):
    """Every grid point's chains: the run's loop vmapped over the entries
    of `hyper` that carry a grid axis."""
    axes = jax.tree.map(lambda x: 0 if jnp.ndim(x) == 1 else None, hyper)
    return jax.vmap(
        lambda h: loop._run_in_memory(static, h, mask, params, data, key,
                                      chain_ids, reference, np.int32(0)),
        in_axes=(axes,))(hyper)


_sweep = jax.jit(_run_grid, static_argnames=("static",))


def _passes(result: LLCResult, skip: tuple = ()) -> bool:
    """Whether every check of `result`'s verdict not named in `skip`
    passed."""
    return all(c.passed for c in result.checks if c.name not in skip)


# The verdict's checks of how well the chains mixed, which a smaller step
# size's neighbour need not pass.
_MIXING = ("R-hat", "bulk ESS", "tail ESS")
# The largest MCSE, relative to the estimate, of a recommended point.
_PRECISION = 0.1


def _tabulate(results, shape, lrs, nbs, locs, target_nb) -> CalibrationResult:
    """The grid's arrays, and the recommendation by the docstring's rule."""
    def grid_of(f, dtype=np.float64):
        return np.asarray([f(r) for r in results], dtype).reshape(shape)

    def check(name):
        return grid_of(lambda r: all(c.passed for c in r.checks
                                     if c.name == name), bool)

    mala = grid_of(lambda r: np.nan if r.mala_acceptance_mean is None
                   else r.mala_acceptance_mean)
    num_failed = grid_of(lambda r: int(np.sum(r.diverged)), np.int64)
    llc_mean = grid_of(lambda r: r.llc_mean)
    mcse = grid_of(lambda r: r.mcse)
    in_range = check("LLC range")
    healthy = (num_failed == 0) & np.isfinite(llc_mean)
    precise = mcse <= _PRECISION * np.abs(llc_mean)
    verdict = grid_of(_passes, bool)
    sound = healthy & verdict & precise
    neighbour_ok = healthy & grid_of(lambda r: _passes(r, skip=_MIXING), bool)
    has_neighbour = np.zeros(shape, bool)
    stable = np.zeros(shape, bool)
    order = np.argsort(lrs)
    for a, b in zip(order[:-1], order[1:]):  # b: the next larger step size
        tol = (3 * np.sqrt(mcse[a] ** 2 + mcse[b] ** 2)
               + 0.05 * np.abs(llc_mean[a]))
        has_neighbour[b] = neighbour_ok[a]
        stable[b] = neighbour_ok[a] & (np.abs(llc_mean[b] - llc_mean[a])
                                       <= tol)
    qualifies = sound & stable
    recommended = None
    if qualifies.any():
        cand = [(i, j, k) for (i, j, k) in zip(*np.nonzero(qualifies))]
        i, j, k = min(cand, key=lambda c: (
            abs(math.log(nbs[c[1]] / target_nb)), -lrs[c[0]], locs[c[2]]))
        recommended = (float(lrs[i]), float(nbs[j]), float(locs[k]))
        reason = (
            f"learning_rate={lrs[i]:.3g}, nbeta={nbs[j]:.4g}, "
            f"localization={locs[k]:.3g}: at the nbeta nearest the target "
            f"({target_nb:.4g}) with a qualifying point, the largest step "
            f"size whose estimate ({llc_mean[i, j, k]:.4g}) passes every "
            "check of the verdict and agrees with the next smaller step "
            "size's.")
    elif len(lrs) < 2:
        reason = ("none: with one learning rate no point has a smaller step "
                  "size to agree with; sweep two or more.")
    else:
        # Diagnostics of failed chains are consequences of the failure:
        # count the other checks only where no chain failed.
        counts = [(np.sum(~healthy), "had failed chains (non-finite or "
                   "blown-up losses: smaller learning rates)")]
        for name in ("LLC range", "MALA acceptance") + _MIXING:
            counts.append((np.sum(healthy & ~check(name)),
                           f"failed the {name} check"))
        counts.append((np.sum(healthy & verdict & ~precise),
                       f"passed, but had an MCSE above {_PRECISION:.0%} of "
                       "the estimate"))
        counts.append((np.sum(sound & ~has_neighbour), "passed, but the "
                       "next smaller step size was missing, had failed "
                       "chains or failed a check other than mixing"))
        counts.append((np.sum(sound & has_neighbour & ~stable),
                       "disagreed with the next smaller step size"))
        size = llc_mean.size
        reason = (f"none: no grid point qualifies. Of the {size} point"
                  + ("s" if size != 1 else "") + ", "
                  + "; ".join(f"{int(n)} {what}" for n, what in counts if n)
                  + ". Raise num_draws (or num_burnin_steps) where the "
                  "chains had not mixed (R-hat, ESS) or the MCSE is large, "
                  "and widen the grid towards smaller learning rates where "
                  "chains failed.")
    nested = tuple(tuple(tuple(results[np.ravel_multi_index((i, j, k), shape)]
                               for k in range(shape[2]))
                         for j in range(shape[1]))
                   for i in range(shape[0]))
    return CalibrationResult(
        learning_rates=lrs, nbetas=nbs, localizations=locs, results=nested,
        llc_mean=llc_mean, llc_std=grid_of(lambda r: r.llc_std), mcse=mcse,
        rhat=grid_of(lambda r: r.rhat), ess_bulk=grid_of(lambda r: r.ess_bulk),
        ess_tail=grid_of(lambda r: r.ess_tail), mala_acceptance=mala,
        num_failed=num_failed, llc_in_range=in_range, qualifies=qualifies,
        recommended=recommended, reason=reason)
