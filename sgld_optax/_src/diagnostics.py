"""Convergence diagnostics for sampler traces: split R-hat and effective sample size.

Both take a trace of shape ``(num_chains, num_draws)`` (for the LLC, the loss at
each draw of each chain) and are computed on the host with NumPy, once
sampling is done.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["split_rhat", "effective_sample_size"]


def _as_trace(trace, name: str) -> np.ndarray:
    x = np.asarray(trace, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(
            f"{name} must have shape (num_chains, num_draws), got shape "
            f"{x.shape}.")
    return x


def _split_chains(x: np.ndarray) -> np.ndarray:
    """Cuts every chain in two halves (dropping the middle draw if odd)."""
    half = x.shape[1] // 2
    return np.concatenate([x[:, :half], x[:, x.shape[1] - half:]], axis=0)


def split_rhat(trace: ArrayLike) -> float:
    """Split potential scale reduction factor :math:`\\hat R`.

    Each of the :math:`M` chains is cut into two halves, giving :math:`2M`
    sequences of length :math:`N` (a middle draw is dropped when the length is
    odd). With :math:`\\bar\\theta_j` and :math:`s_j^2` the mean and sample
    variance of sequence :math:`j`,

    .. math::
      W = \\frac{1}{2M}\\sum_j s_j^2, \\qquad
      B = \\frac{N}{2M - 1}\\sum_j (\\bar\\theta_j - \\bar\\theta)^2, \\qquad
      \\hat R = \\sqrt{\\frac{\\frac{N-1}{N} W + \\frac{1}{N} B}{W}} .

    Values near 1 mean the chains agree with each other and with themselves
    over time; values above about 1.01-1.1 signal non-convergence. Splitting
    makes a trend within a single chain visible too.

    Args:
      trace: array of shape ``(num_chains, num_draws)``, or ``(num_draws,)``
        for one chain.

    Returns:
      :math:`\\hat R` as a float; NaN when there are fewer than four draws,
      when the trace has non-finite values, or when every half-chain is
      constant.

    Example:
      >>> import numpy as np
      >>> x = np.random.default_rng(0).normal(size=(4, 1000))
      >>> round(split_rhat(x), 2)
      1.0

    References:
      Gelman, Carlin, Stern, Dunson, Vehtari & Rubin, "Bayesian Data
      Analysis", 3rd ed., 2013, section 11.4.
    """
    x = _as_trace(trace, "trace")
    if x.shape[1] < 4 or not np.all(np.isfinite(x)):
        return float("nan")
    x = _split_chains(x)
    n = x.shape[1]
    within = np.mean(np.var(x, axis=1, ddof=1))
    between = n * np.var(np.mean(x, axis=1), ddof=1)
    if within == 0:
        return float("nan")
    var_plus = (n - 1) / n * within + between / n
    return float(np.sqrt(var_plus / within))


def _autocovariance(x: np.ndarray) -> np.ndarray:
    """Biased autocovariance of every row, for lags 0..N-1, by FFT."""
    n = x.shape[-1]
    centred = x - x.mean(axis=-1, keepdims=True)
    size = 1 << (2 * n - 1).bit_length()
    spectrum = np.fft.rfft(centred, n=size, axis=-1)
    return np.fft.irfft(spectrum * np.conj(spectrum), n=size, axis=-1)[..., :n] / n


def effective_sample_size(trace: ArrayLike) -> float:
    """Effective sample size of a multi-chain trace (Geyer's monotone sequence).

    With :math:`M` chains of :math:`N` draws, :math:`W` the mean within-chain
    variance, :math:`\\widehat{\\mathrm{var}}^+` the pooled variance of
    :func:`split_rhat` (computed on whole chains here) and
    :math:`\\hat\\gamma_t` the mean over chains of the lag-:math:`t`
    autocovariance, the autocorrelation is

    .. math::
      \\hat\\rho_t = 1 - \\frac{W - \\hat\\gamma_t}{\\widehat{\\mathrm{var}}^+} .

    Pair sums :math:`P_k = \\hat\\rho_{2k} + \\hat\\rho_{2k+1}` are kept up to
    the first negative one and made non-increasing (Geyer's initial monotone
    sequence), and

    .. math::
      \\mathrm{ESS} = \\frac{M N}{\\hat\\tau}, \\qquad
      \\hat\\tau = -1 + 2 \\sum_k P_k .

    For an AR(1) chain :math:`x_t = \\phi x_{t-1} + \\varepsilon_t` the
    exact value is :math:`MN (1 - \\phi) / (1 + \\phi)`.

    Args:
      trace: array of shape ``(num_chains, num_draws)``, or ``(num_draws,)``
        for one chain.

    Returns:
      The effective number of independent draws in the whole trace, as a
      float (it can exceed :math:`MN` for anti-correlated chains); NaN when
      there are fewer than four draws, when the trace has non-finite values,
      or when it is constant.

    Example:
      >>> import numpy as np
      >>> x = np.random.default_rng(0).normal(size=(4, 1000))
      >>> 3500 < effective_sample_size(x) < 4500
      True

    References:
      Geyer, "Practical Markov chain Monte Carlo", Statistical Science 7
      (1992) 473-483.

      Vehtari, Gelman, Simpson, Carpenter & Bürkner, "Rank-normalization,
      folding, and localization: an improved R-hat for assessing convergence
      of MCMC", Bayesian Analysis 16 (2021) 667-718.
    """
    x = _as_trace(trace, "trace")
    m, n = x.shape
    if n < 4 or not np.all(np.isfinite(x)):
        return float("nan")
    acov = _autocovariance(x)
    within = np.mean(acov[:, 0]) * n / (n - 1)
    between = np.var(np.mean(x, axis=1), ddof=1) if m > 1 else 0.0
    var_plus = (n - 1) / n * within + between
    if var_plus == 0:
        return float("nan")
    rho = 1.0 - (within - np.mean(acov, axis=0)) / var_plus
    rho[0] = 1.0
    num_pairs = n // 2
    pairs = rho[:2 * num_pairs].reshape(num_pairs, 2).sum(axis=1)
    negative = np.flatnonzero(pairs < 0)
    if negative.size:
        pairs = pairs[:negative[0]]
    pairs = np.minimum.accumulate(pairs)
    tau = -1.0 + 2.0 * np.sum(pairs)
    # Guard against a vanishing tau (strongly anti-correlated draws).
    tau = max(tau, 1.0 / np.log10(m * n))
    return float(m * n / tau)
