r"""Figures of an LLC estimate."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

import numpy as np

if TYPE_CHECKING:  # matplotlib is imported only when plotting
    from matplotlib.figure import Figure

_MAX_LEGEND_CHAINS = 10
_MAX_REASON_CHARS = 60
_MAX_NAMED_REASONS = 3


def _limits(values: np.ndarray) -> Optional[Tuple[float, float]]:
    """The span of the finite `values`, padded by 5% on each side."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    lo, hi = float(finite.min()), float(finite.max())
    pad = 0.05 * (hi - lo) if hi > lo else max(abs(lo), 1.0) * 0.05
    return lo - pad, hi + pad


def _clip(values: np.ndarray, limits: Tuple[float, float]) -> np.ndarray:
    """Clips `values` to just beyond `limits` (NaN stays NaN), so that a
    failed chain runs off the axes without setting their scale."""
    lo, hi = limits
    span = hi - lo
    return np.clip(values, lo - span, hi + span)


def _short(reason: str) -> str:
    reason = str(reason)
    if len(reason) <= _MAX_REASON_CHARS:
        return reason
    return reason[:_MAX_REASON_CHARS - 3] + "..."


def plot(result, path: Optional[str] = None) -> Figure:
    r"""Plots the traces of an LLC estimate, one panel above the other.

    - **Loss traces**: each chain's minibatch loss $L_{B_t}(w_t)$ against
      the draw index, with $L_n(w^*)$ as a dashed line.
    - **Running LLC**: each chain's
      $\hat\lambda_t = n\beta\,(\frac1t\sum_{s\le t} L_{B_s}(w_s) -
      L_n(w^*))$ (`result.llc_trace`), whose last value is the chain's
      `llc_per_chain`, with `llc_mean` as a black line and
      `llc_mean` $\pm$ `llc_std` shaded.
    - **MALA acceptance**, only when the run recorded it
      (`result.mala_acceptance` is not `None`): each chain's acceptance
      probability per draw, on $[0, 1]$, with its mean over the chains
      that did not fail in the title.

    Chains that failed (`result.diverged`, the reason in `result.failures`)
    do not set the scale: each panel's axes span the values of the chains
    that did not fail, and a failed chain is drawn dashed and clipped to
    just beyond them, so that its non-finite or very large values run off
    the panel. The legend marks each failed chain as failed, and the
    figure's title counts the chains left out of the estimate and gives
    the reasons (up to three chains; beyond that, their indices). When
    every chain failed, the panels use a symmetric-log scale that shows
    all the finite values. With more than ten chains the per-chain legend
    is left out.

    The figure is drawn with matplotlib's Agg canvas, without touching
    pyplot's global state.

    Args:
      result: an `LLCResult`.
      path: where to write a PNG, or `None` to write nothing.

    Returns:
      The `matplotlib.figure.Figure`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    num_chains, num_draws = result.num_chains, result.num_draws
    failed = np.asarray(result.diverged, bool)
    ok = ~failed
    reasons = [str(f) for f in np.asarray(result.failures)]
    mala = result.mala_acceptance
    panels = 3 if mala is not None else 2

    fig = Figure(figsize=(10, 2.7 * panels + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    ax_loss, ax_llc = axes[0], axes[1]
    colors = [f"C{i % 10}" for i in range(num_chains)]
    draws = np.arange(num_draws)
    legend = num_chains <= _MAX_LEGEND_CHAINS

    def label(c: int) -> str:
        if not failed[c]:
            return f"chain {c}"
        return f"chain {c}: failed"

    def traces(ax, values, limits, labelled):
        """Draws each chain's row of `values`; failed ones dashed, clipped
        to `limits` (or as they are when `limits` is `None`)."""
        for c in range(num_chains):
            row = np.asarray(values[c], np.float64)
            style = dict(color=colors[c], lw=0.8, alpha=0.85)
            if failed[c]:
                if limits is not None:
                    row = _clip(row, limits)
                style.update(ls="--", lw=1.0)
            ax.plot(draws, row, label=label(c) if labelled else None,
                    **style)

    def healthy_limits(values, extra=()):
        """The span of the chains that did not fail, and `extra`."""
        if not ok.any():
            return None
        return _limits(np.concatenate(
            [np.asarray(values, np.float64)[ok].ravel(),
             np.asarray(extra, np.float64)]))

    def set_scale(ax, limits, values, extra=()):
        if limits is not None:
            ax.set_ylim(*limits)
            return
        # Every chain failed: a symmetric-log scale over the finite values.
        ax.set_yscale("symlog")
        ax.yaxis.get_major_locator().set_params(numticks=8)
        finite = np.concatenate([np.asarray(values, np.float64).ravel(),
                                 np.asarray(extra, np.float64)])
        finite = finite[np.isfinite(finite)]
        if finite.size:
            lo, hi = min(finite.min(), 0.0), max(finite.max(), 0.0)
            ax.set_ylim(lo * 10 if lo < -1 else lo - 1,
                        hi * 10 if hi > 1 else hi + 1)

    # Loss traces.
    loss = np.asarray(result.loss_trace)
    loss_limits = healthy_limits(loss, [result.init_loss])
    traces(ax_loss, loss, loss_limits, labelled=True)
    ax_loss.axhline(result.init_loss, color="k", ls="--", lw=1,
                    label="init loss $L_n(w^*)$")
    set_scale(ax_loss, loss_limits, loss, [result.init_loss])
    ax_loss.set_ylabel("minibatch loss")
    ax_loss.set_title("loss traces")

    # Running LLC.
    llc = np.asarray(result.llc_trace)
    band = ([result.llc_mean - result.llc_std,
             result.llc_mean + result.llc_std]
            if np.isfinite(result.llc_mean) else [])
    llc_limits = healthy_limits(llc, band)
    traces(ax_llc, llc, llc_limits, labelled=False)
    if band:
        ax_llc.axhline(result.llc_mean, color="k", lw=1,
                       label=f"llc_mean {result.llc_mean:.4g}")
        ax_llc.fill_between([0, max(num_draws - 1, 1)], band[0], band[1],
                            color="0.85", zorder=0,
                            label=f"$\\pm$ llc_std {result.llc_std:.3g}")
        ax_llc.legend(fontsize="small", loc="upper left",
                      bbox_to_anchor=(1.01, 1.0))
    set_scale(ax_llc, llc_limits, llc, band)
    ax_llc.set_ylabel("running LLC")
    ax_llc.set_title("running LLC per chain")

    # MALA acceptance.
    if mala is not None:
        ax_mala = axes[2]
        mala = np.asarray(mala, np.float64)
        traces(ax_mala, mala, (0.0, 1.0), labelled=False)
        ax_mala.set_ylim(-0.02, 1.02)
        title = "MALA acceptance probability"
        healthy = mala[ok][np.isfinite(mala[ok])]
        if healthy.size:
            title += f" (mean {healthy.mean():.3f})"
        ax_mala.set_title(title)
        ax_mala.set_ylabel("acceptance")

    axes[-1].set_xlabel("draw")
    if legend:
        ax_loss.legend(fontsize="small", loc="upper left",
                       bbox_to_anchor=(1.01, 1.0))

    head = (f"LLC = {result.llc_mean:.4g} +/- {result.llc_std:.3g} "
            f"over {int(ok.sum())} of {num_chains} chains, "
            f"nbeta = {result.nbeta:.4g}")
    bad = np.flatnonzero(failed).tolist()
    if not ok.any():
        head += ("\nevery chain failed (symmetric-log scale); "
                 "see result.failures")
    elif len(bad) > _MAX_NAMED_REASONS:
        head += f"\nfailed, left out and drawn clipped: chains {bad}"
    elif bad:
        head += "\nfailed, left out and drawn clipped: " + "; ".join(
            f"chain {c} ({_short(reasons[c]) or 'diverged'})" for c in bad)
    fig.suptitle(head, fontsize="medium")
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
