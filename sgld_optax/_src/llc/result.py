r"""The outcome of an LLC estimate: `LLCResult`, its summary and plots."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, NamedTuple, Optional

import numpy as np

from sgld_optax._src import diagnostics
from sgld_optax._src.metrics import Metrics

if TYPE_CHECKING:  # matplotlib is imported only when plotting
    from matplotlib.figure import Figure




class LLCResult(NamedTuple):
    r"""The outcome of `estimate_llc`.

    All arrays are NumPy arrays on the host.

    Attributes:
      llc_mean: mean of `llc_per_chain` over the chains that did not
        diverge (NaN if all diverged).
      llc_std: standard deviation (`ddof=0`, as devinterp) of
        `llc_per_chain` over the chains that did not diverge.
      llc_per_chain: float64 `(num_chains,)`,
        $n\beta\,(\overline{L}_c - L_n(w^*))$ with $\overline{L}_c$ the mean
        of chain $c$'s loss trace; NaN for a diverged chain.
      loss_trace: float32 `(num_chains, num_draws)`, the minibatch loss at
        each draw, evaluated at the weights before that draw's step.
      init_loss: $L_n(w^*)$, the mean loss over the whole dataset at the
        initial weights.
      nbeta: the inverse temperature $n\beta$ used.
      diverged: bool `(num_chains,)`, chains whose loss became non-finite
        at any step (burn-in included).
      rhat: split $\hat R$ of the loss traces of the chains that did not
        diverge (see `split_rhat`).
      ess: effective sample size of those loss traces (see
        `effective_sample_size`).
      metrics: with `save_metrics=True`, a `Metrics` whose fields are
        `(num_chains, num_steps)` traces over every step (burn-in
        included); otherwise `None`.
    """

    llc_mean: float
    llc_std: float
    llc_per_chain: np.ndarray
    loss_trace: np.ndarray
    init_loss: float
    nbeta: float
    diverged: np.ndarray
    rhat: float
    ess: float
    metrics: Optional[Metrics] = None

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
        """A short text report of the estimate and its diagnostics.

        Returns:
          A multi-line string: the LLC with its spread over chains, the init
          loss, the per-chain values, split R-hat, ESS and diverged chains.
        """
        ok = ~np.asarray(self.diverged)
        per_chain = ", ".join(
            f"{v:.4g}" if d else f"{v:.4g}(diverged)"
            for v, d in zip(self.llc_per_chain, ok))
        bad = np.flatnonzero(~ok).tolist()
        lines = [
            f"LLC = {self.llc_mean:.4g} +/- {self.llc_std:.3g} "
            f"({int(ok.sum())} of {self.num_chains} chains x "
            f"{self.num_draws} draws, nbeta = {self.nbeta:.4g})",
            f"init loss L_n(w*) = {self.init_loss:.6g}",
            f"LLC per chain: {per_chain}",
            f"loss trace: split R-hat = {self.rhat:.3f}, ESS = {self.ess:.1f}",
            f"diverged chains: {bad if bad else 'none'}",
        ]
        return "\n".join(lines)

    def plot(self, path: Optional[str] = None) -> Figure:
        """Plots the loss traces and the per-chain LLC.

        The left panel shows each chain's loss trace against the draw index,
        with the init loss $L_n(w^*)$ as a dashed line; the right panel
        shows each chain's LLC, with the mean and one standard deviation.
        The figure is drawn with matplotlib's Agg canvas, without touching
        pyplot's global state.

        Args:
          path: where to write a PNG, or `None` to write nothing.

        Returns:
          The `matplotlib.figure.Figure`.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 3.8), layout="constrained")
        FigureCanvasAgg(fig)
        ax_loss, ax_llc = fig.subplots(1, 2, width_ratios=(3, 1))
        colors = [f"C{i % 10}" for i in range(self.num_chains)]
        draws = np.arange(self.num_draws)
        for c in range(self.num_chains):
            label = f"chain {c}" + (" (diverged)" if self.diverged[c] else "")
            ax_loss.plot(draws, self.loss_trace[c], color=colors[c], lw=0.8,
                         alpha=0.85, label=label)
        ax_loss.axhline(self.init_loss, color="k", ls="--", lw=1,
                        label="init loss $L_n(w^*)$")
        ax_loss.set_xlabel("draw")
        ax_loss.set_ylabel("minibatch loss")
        ax_loss.set_title("loss traces")
        if self.num_chains <= 10:
            ax_loss.legend(fontsize="small", loc="upper right")

        chains = np.arange(self.num_chains)
        finite = np.isfinite(self.llc_per_chain)
        ax_llc.scatter(chains[finite], self.llc_per_chain[finite],
                       c=[colors[c] for c in chains[finite]], zorder=3)
        if np.isfinite(self.llc_mean):
            ax_llc.axhline(self.llc_mean, color="k", lw=1,
                           label=f"mean {self.llc_mean:.3g}")
            ax_llc.axhspan(self.llc_mean - self.llc_std,
                           self.llc_mean + self.llc_std, color="0.85")
            ax_llc.legend(fontsize="small")
        ax_llc.set_xticks(chains)
        ax_llc.set_xlabel("chain")
        ax_llc.set_title("LLC per chain")
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def _summarise(losses, diverged, init_loss, nbeta, metrics) -> LLCResult:
    diverged = diverged | ~np.all(np.isfinite(losses), axis=1)
    ok = ~diverged
    per_chain = nbeta * (losses.astype(np.float64).mean(axis=1) - init_loss)
    per_chain = np.where(ok, per_chain, np.nan)
    if diverged.any():
        warnings.warn(
            f"{int(diverged.sum())} of {len(diverged)} chains diverged "
            f"(non-finite loss): chains {np.flatnonzero(diverged).tolist()}. "
            "They are left out of llc_mean and llc_std; try a smaller "
            "learning_rate or a stronger localization.",
            RuntimeWarning, stacklevel=3)
    if ok.any():
        mean, std = float(per_chain[ok].mean()), float(per_chain[ok].std())
        rhat = diagnostics.split_rhat(losses[ok])
        ess = diagnostics.effective_sample_size(losses[ok])
    else:
        mean = std = rhat = ess = float("nan")
    return LLCResult(llc_mean=mean, llc_std=std, llc_per_chain=per_chain,
                     loss_trace=losses, init_loss=float(init_loss),
                     nbeta=nbeta, diverged=diverged, rhat=rhat, ess=ess,
                     metrics=metrics)
