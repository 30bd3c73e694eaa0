r"""The outcome of an LLC estimate: `LLCResult`, its summary and plots."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, NamedTuple, Optional, Tuple

import jax
import numpy as np

from sgld_optax._src import diagnostics
from sgld_optax._src.metrics import Metrics

if TYPE_CHECKING:  # matplotlib is imported only when plotting
    from matplotlib.figure import Figure


class Check(NamedTuple):
    """One check of an LLC estimate's verdict (`LLCResult.checks`).

    Attributes:
      name: what is checked, such as `"R-hat"`.
      value: the measured value (a count of chains for the failure checks).
      threshold: the condition for passing, in words.
      passed: whether the value meets it.
      advice: what to try when it does not (`""` when it passed).
    """

    name: str
    value: float
    threshold: str
    passed: bool
    advice: str


class LLCResult(NamedTuple):
    r"""The outcome of `estimate_llc`.

    All arrays are NumPy arrays on the host. A chain *fails* when its loss
    becomes non-finite, or finite but above the blow-up bound, at any step
    (burn-in included); failed chains are left out of the estimate and of
    its diagnostics. The checks, their thresholds and what to do when one
    fails are on the "Can I trust this estimate?" page of the docs.

    Attributes:
      llc_mean: mean of `llc_per_chain` over the chains that did not fail
        (NaN if all failed).
      llc_std: standard deviation (`ddof=0`, as devinterp) of
        `llc_per_chain` over the chains that did not fail.
      llc_per_chain: float64 `(num_chains,)`,
        $n\beta\,(\overline{L}_c - L_n(w^*))$ with $\overline{L}_c$ the mean
        of chain $c$'s loss trace; NaN for a chain that failed.
      loss_trace: float32 `(num_chains, num_draws)`, the minibatch loss at
        each draw, evaluated at the weights before that draw's step.
      init_loss: $L_n(w^*)$, the mean loss over the whole dataset at the
        initial weights.
      nbeta: the inverse temperature $n\beta$ used.
      diverged: bool `(num_chains,)`, the chains that failed:
        `failures != ""`.
      rhat: rank-normalised split $\hat R$ (the larger of the bulk and the
        folded one, Vehtari et al. 2021; see `split_rhat`) of the per-draw
        LLC $n\beta\,(L_t - L_n(w^*))$ of the chains that did not fail.
      ess_bulk: bulk effective sample size of that trace, all those chains
        together (see `effective_sample_size`).
      ess_tail: its tail effective sample size (the smaller of those of
        the 5% and 95% quantiles).
      mcse: Monte Carlo standard error of `llc_mean`: that of the mean of
        the per-draw LLC trace of the chains that did not fail, which is
        $n\beta$ times the MCSE of the mean of their loss traces (see
        `mcse_mean`).
      failures: str `(num_chains,)`: `""` for a chain that did not fail,
        else the reason, such as `"non-finite loss at step 37"` or
        `"blow-up: loss 3.2e+05 above the bound 410 at step 12"` (steps
        counted from 0 over every step, burn-in included).
      checks: the verdict, a tuple of `Check`s: non-finite losses,
        blow-ups, the LLC's range, R-hat, bulk and tail ESS, and the MALA
        acceptance when recorded.
      mala_acceptance: with `estimate_llc(..., mala=True)`, float32
        `(num_chains, num_draws)`: the MALA acceptance probability of the
        step taken from each draw; otherwise `None`.
      metrics: with `save_metrics=True`, a `Metrics` whose fields are
        `(num_chains, num_steps)` traces over every step (burn-in
        included); otherwise `None`.
      num_params: $d$, the number of sampled (unmasked) parameters, or
        `None` where unknown.
    """

    llc_mean: float
    llc_std: float
    llc_per_chain: np.ndarray
    loss_trace: np.ndarray
    init_loss: float
    nbeta: float
    diverged: np.ndarray
    rhat: float
    ess_bulk: float
    ess_tail: float
    mcse: float
    failures: np.ndarray
    checks: Tuple[Check, ...] = ()
    mala_acceptance: Optional[np.ndarray] = None
    metrics: Optional[Metrics] = None
    num_params: Optional[int] = None

    @property
    def ess(self) -> float:
        """The bulk effective sample size, `ess_bulk` (an older name)."""
        return self.ess_bulk

    @property
    def trustworthy(self) -> bool:
        """Whether every check of the verdict (`checks`) passed."""
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def mala_acceptance_mean(self) -> Optional[float]:
        """The mean of `mala_acceptance` over the draws of the chains that
        did not fail (NaN if none has a finite one), or `None` when it was
        not recorded; the value the verdict's MALA check compares."""
        if self.mala_acceptance is None:
            return None
        return _mala_mean(self.mala_acceptance, ~np.asarray(self.diverged))

    @property
    def num_chains(self) -> int:
        """Number of chains."""
        return int(self.loss_trace.shape[0])

    @property
    def num_draws(self) -> int:
        """Number of draws per chain."""
        return int(self.loss_trace.shape[1])

    @property
    def llc_trace(self) -> np.ndarray:
        """Running LLC per chain: `nbeta * (cumulative mean loss - init_loss)`,
        float64 `(num_chains, num_draws)`; its last column is
        `llc_per_chain`."""
        trace = np.asarray(self.loss_trace, np.float64)
        running = np.cumsum(trace, axis=1) / np.arange(1, trace.shape[1] + 1)
        return self.nbeta * (running - self.init_loss)

    def summary(self) -> str:
        """A short text report of the estimate, its diagnostics and its verdict.

        Returns:
          A multi-line string: the LLC with its spread over chains and its
          Monte Carlo standard error, the init loss, the per-chain values,
          R-hat and the bulk and tail ESS, the mean MALA acceptance (when
          recorded), the chains that failed and why, and the verdict: each
          check with its value, threshold, pass or fail and what to try.
        """
        ok = ~np.asarray(self.diverged)
        per_chain = ", ".join(
            f"{v:.4g}" if good else f"{v:.4g}(failed)"
            for v, good in zip(self.llc_per_chain, ok))
        lines = [
            f"LLC = {self.llc_mean:.4g} +/- {self.llc_std:.3g} "
            f"(MCSE {self.mcse:.2g}; {int(ok.sum())} of {self.num_chains} "
            f"chains x {self.num_draws} draws, nbeta = {self.nbeta:.4g})",
            f"init loss L_n(w*) = {self.init_loss:.6g}",
            f"LLC per chain: {per_chain}",
            f"per-draw LLC: R-hat = {self.rhat:.3f}, ESS bulk = "
            f"{self.ess_bulk:.1f}, tail = {self.ess_tail:.1f}",
        ]
        if self.mala_acceptance is not None:
            lines.append(
                f"MALA acceptance: mean {self.mala_acceptance_mean:.3f}")
        bad = np.flatnonzero(~ok).tolist()
        if bad:
            lines.append("diverged chains: " + "; ".join(
                f"{c}: {self.failures[c]}" for c in bad))
        else:
            lines.append("diverged chains: none")
        if self.checks:
            failed = sum(not c.passed for c in self.checks)
            lines.append(
                f"verdict: all {len(self.checks)} checks passed" if not failed
                else f"verdict: {failed} of {len(self.checks)} checks failed; "
                "do not trust the estimate until they pass")
            for c in self.checks:
                value = (f"{c.value:.4f}" if c.name == "R-hat"
                         else _fmt(c.value))
                line = (f"  [{'pass' if c.passed else 'FAIL'}] {c.name}: "
                        f"{value} (threshold: {c.threshold})")
                if not c.passed:
                    line += f": {c.advice}"
                lines.append(line)
        return "\n".join(lines)

    def plot(self, path: Optional[str] = None) -> Figure:
        """Plots the run: see `sgld_optax._src.llc.plot.plot`.

        Args:
          path: where to write a PNG, or `None` to write nothing.

        Returns:
          The `matplotlib.figure.Figure`.
        """
        from sgld_optax._src.llc import plot as plot_lib
        return plot_lib.plot(self, path)

    def to_arviz(self):
        """The run as an ArviZ `InferenceData`: see `export.to_arviz`."""
        from sgld_optax._src.llc import export
        return export.to_arviz(self)

    def to_devinterp(self) -> dict:
        """The run under devinterp's names: see `export.to_devinterp`."""
        from sgld_optax._src.llc import export
        return export.to_devinterp(self)


def _fmt(value) -> str:
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{float(value):.4g}"


def _mala_mean(mala, ok) -> float:
    """Mean MALA acceptance over the draws of the chains that did not fail."""
    rows = np.asarray(mala, np.float64)[ok]
    if rows.size == 0 or not np.any(np.isfinite(rows)):
        return float("nan")
    return float(np.nanmean(rows))


# The thresholds of the verdict (docs/trust.md justifies them).
RHAT_MAX = 1.01             # Vehtari et al. (2021)
ESS_PER_CHAIN = 100         # bulk and tail, Vehtari et al. (2021)
LLC_MCSE_MULTIPLE = 3.0     # "clearly" outside the range: beyond 3 MCSE
LLC_STEP_ALLOWANCE = 0.1    # a small step's inflation of d/2
LLC_ROUNDING = 1e-5         # float32 rounding of the losses, relative
MALA_MIN = 0.5              # mean MALA acceptance

_STEP_ADVICE = ("lower learning_rate (the step is too large for the "
                "posterior's curvature), strengthen localization, or set "
                "bounding_box_size")


def _llc_range(mcse, nbeta, init_loss, num_params):
    r"""The range an LLC estimate may take: `(lo, hi)`.

    $[-(3\,\mathrm{MCSE} + \tau),\ 1.1\, d/2 + 3\,\mathrm{MCSE} +
    \tau]$ with $\tau = 10^{-5} n\beta\, |L_n(w^*)|$ the effect of
    float32 rounding of the losses.
    """
    slack = LLC_MCSE_MULTIPLE * (mcse if np.isfinite(mcse) else 0.0)
    slack += LLC_ROUNDING * nbeta * abs(init_loss)
    return -slack, (1 + LLC_STEP_ALLOWANCE) * num_params / 2 + slack


def _checks(*, failure, llc_mean, mcse, rhat, ess_bulk, ess_tail, mala,
            ok, nbeta, init_loss, num_params, bound) -> tuple:
    num_ok = int(ok.sum())
    out = [
        Check("non-finite loss", int(np.sum(failure == "non-finite")),
              "0 chains", not np.any(failure == "non-finite"),
              _STEP_ADVICE + "; a NaN from the first steps can also come "
              "from loss_fn itself (a log of 0)"),
        Check("blow-up", int(np.sum(failure == "blow-up")),
              f"0 chains above the bound {bound:.4g}",
              not np.any(failure == "blow-up"), _STEP_ADVICE),
    ]
    lo, hi = _llc_range(mcse, nbeta, init_loss, num_params)
    if np.isfinite(llc_mean) and llc_mean > hi:
        advice = (f"an LLC cannot exceed d/2 = {num_params / 2:g} for "
                  f"d = {num_params} sampled parameters: the estimate is "
                  "inflated; " + _STEP_ADVICE + ", and check that nbeta "
                  "matches the loss's scale")
    elif np.isfinite(llc_mean) and llc_mean < lo:
        advice = ("the chains found losses below L_n(w*): params is not a "
                  "local minimum of the loss; train it further, or "
                  "strengthen localization so that the chains stay near it")
    else:
        advice = "no chain is left to estimate from; see the failures"
    out.append(Check(
        "LLC range", llc_mean,
        f"{lo:.4g} to {hi:.4g}, i.e. not clearly below 0 nor above "
        f"d/2 = {num_params / 2:g} (3 MCSE and 10% of d/2 allowed)",
        bool(np.isfinite(llc_mean) and lo <= llc_mean <= hi), advice))
    out.append(Check(
        "R-hat", rhat, f"< {RHAT_MAX}", bool(rhat < RHAT_MAX),
        "the chains disagree or drift: add burn-in (num_burnin_steps) and "
        "draws, and check the loss traces for a trend (result.plot())"
        if num_ok >= 2 else
        "R-hat compares chains: run at least two (four is usual) that do "
        "not fail"))
    need = ESS_PER_CHAIN * max(num_ok, 1)
    for name, value in (("bulk ESS", ess_bulk), ("tail ESS", ess_tail)):
        out.append(Check(
            name, value, f">= {need} ({ESS_PER_CHAIN} per chain)",
            bool(value >= need),
            "too few effective draws: raise num_draws (or num_chains); a "
            "larger learning_rate mixes faster if the other checks allow it"))
    if mala is not None:
        mean = _mala_mean(mala, ok)
        out.append(Check(
            "MALA acceptance", mean, f">= {MALA_MIN}", bool(mean >= MALA_MIN),
            "most of each step is discretisation error: lower "
            "learning_rate (an acceptance near 0.9 is a common aim); with "
            "minibatches the batch-to-batch change of the loss lowers it "
            "too, so compare settings at the same batch_size"))
    return tuple(out)


def _summarise(out, *, init_loss, nbeta, num_params, spread) -> LLCResult:
    """The `LLCResult` of a run's outputs (`loop._Outputs`, on the host)."""
    from sgld_optax._src.llc import loop

    losses = np.asarray(out.losses)
    kinds = np.asarray(out.failure)
    steps = np.asarray(out.failure_step)
    values = np.asarray(out.failure_loss)
    bound = loop.blowup_bound(
        loop._Reference(init_loss=init_loss, spread=spread,
                        num_params=num_params), nbeta)
    failures, kind_names = [], []
    for kind, step, value in zip(kinds, steps, values):
        if kind == loop.NON_FINITE:
            failures.append(f"non-finite loss at step {step} ({value})")
            kind_names.append("non-finite")
        elif kind == loop.BLOW_UP:
            failures.append(f"blow-up: loss {value:.3g} above the bound "
                            f"{bound:.3g} at step {step}")
            kind_names.append("blow-up")
        else:
            failures.append("")
            kind_names.append("")
    failures = np.asarray(failures, dtype=str)
    diverged = failures != ""
    ok = ~diverged
    with np.errstate(invalid="ignore", over="ignore"):
        draws = nbeta * (losses.astype(np.float64) - init_loss)
    per_chain = np.where(ok, draws.mean(axis=1), np.nan)
    if diverged.any():
        bad = np.flatnonzero(diverged).tolist()
        reasons = "; ".join(f"chain {c}: {failures[c]}" for c in bad)
        warnings.warn(
            f"{len(bad)} of {len(diverged)} chains diverged (chains {bad}): "
            f"{reasons}. They are left out of llc_mean and llc_std; try a "
            "smaller learning_rate, a stronger localization or a "
            "bounding_box_size.",
            RuntimeWarning, stacklevel=3)
    nan = float("nan")
    mean = std = rhat = ess_bulk = ess_tail = mcse = nan
    if ok.any():
        good = draws[ok]
        mean, std = float(per_chain[ok].mean()), float(per_chain[ok].std())
        rhat = float(diagnostics.split_rhat(good))
        ess_bulk = float(diagnostics.effective_sample_size(good, kind="bulk"))
        ess_tail = float(diagnostics.effective_sample_size(good, kind="tail"))
        mcse = float(diagnostics.mcse_mean(good))
    mala = None if out.mala is None else np.asarray(out.mala)
    checks = _checks(
        failure=np.asarray(kind_names), llc_mean=mean, mcse=mcse, rhat=rhat,
        ess_bulk=ess_bulk, ess_tail=ess_tail, mala=mala, ok=ok, nbeta=nbeta,
        init_loss=init_loss, num_params=num_params, bound=bound)
    llc_check = next(c for c in checks if c.name == "LLC range")
    if ok.any() and not llc_check.passed:
        lo, hi = _llc_range(mcse, nbeta, init_loss, num_params)
        warnings.warn(
            f"The LLC estimate {mean:.4g} is not to be trusted: it lies "
            f"outside {lo:.4g} to {hi:.4g}. {llc_check.advice[0].upper()}"
            f"{llc_check.advice[1:]}.", RuntimeWarning, stacklevel=3)
    metrics = out.metrics
    if metrics is not None:
        metrics = jax.tree.map(np.asarray, metrics)
    return LLCResult(
        llc_mean=mean, llc_std=std, llc_per_chain=per_chain,
        loss_trace=losses, init_loss=float(init_loss), nbeta=nbeta,
        diverged=diverged, rhat=rhat, ess_bulk=ess_bulk, ess_tail=ess_tail,
        mcse=mcse, failures=failures, checks=checks, mala_acceptance=mala,
        metrics=metrics, num_params=int(num_params))
