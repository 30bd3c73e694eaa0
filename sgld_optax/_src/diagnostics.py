r"""Convergence diagnostics for sampler traces, after Vehtari et al. (2021).

Every function takes a trace of shape `(num_chains, num_draws)` (for the LLC,
the loss at each draw of each chain; a 1-D trace is one chain) and returns a
0-d JAX array:

* `split_rhat`: the rank-normalised split $\hat R$, the larger of the bulk and
  the tail (folded) values;
* `effective_sample_size`: the bulk, tail or mean effective sample size;
* `mcse_mean`: the Monte Carlo standard error of the mean.

They are computed with `jax.numpy`, so they run on the device, inside `jax.jit`,
and under `jax.vmap` over a batch of traces (a leading grid axis, say). They
reproduce ArviZ's `az.rhat(method="rank")`, `az.ess(method="bulk" | "tail" |
"mean")` and `az.mcse(method="mean")`, conventions included: pooled fractional
ranks with ties averaged, Blom's offsets, the middle draw of an odd-length
chain dropped by the split, and Geyer's initial monotone sequence truncated as
ArviZ truncates it. The arithmetic is done in the trace's floating dtype
(float32 unless 64-bit mode is on, `jax.config.update("jax_enable_x64", True)`;
in float32, ties made by folding at the median can round differently, so the
last digits may differ from ArviZ's float64 values). The first call for a
trace shape compiles one program shared by the three functions; later calls
with that shape reuse it.

Special cases, as in ArviZ:

* a NaN anywhere in the trace gives NaN (infinities are ranked like other
  values, so the rank-based diagnostics stay finite; the mean ESS and the MCSE
  become NaN);
* fewer than 4 draws per chain gives NaN, and so does $\hat R$ of a single
  chain (ArviZ asks for at least two chains);
* a constant trace has $\hat R$ = NaN (no variance to compare), an effective
  sample size equal to the number of draws used ($2M\lfloor D/2 \rfloor$
  for $M$ chains of $D$ draws), and a Monte Carlo standard error of 0.

Reference: Vehtari, Gelman, Simpson, Carpenter & Bürkner, "Rank-normalization,
folding, and localization: an improved $\hat R$ for assessing convergence of
MCMC", Bayesian Analysis 16(2) (2021) 667-718.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri
from jax.typing import ArrayLike

__all__ = ["split_rhat", "effective_sample_size", "mcse_mean"]

# ArviZ treats a trace whose range is below float64's resolution as constant.
_CONSTANT_RANGE = 1e-15
_MIN_DRAWS = 4
_ESS_KINDS = ("bulk", "tail", "mean")
_TAIL_PROBS = (0.05, 0.95)


def _as_trace(trace) -> jax.Array:
    """The trace as a floating `(num_chains, num_draws)` array."""
    x = jnp.asarray(trace)
    if jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    else:
        x = x.astype(jnp.result_type(float))
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(
            "trace must have shape (num_chains, num_draws) or (num_draws,), "
            f"got shape {x.shape}; map over extra leading axes with jax.vmap.")
    return x


def _nan(x: jax.Array) -> jax.Array:
    return jnp.full((), jnp.nan, x.dtype)


def _split_chains(x: jax.Array) -> jax.Array:
    """Each chain's first and last $\\lfloor N/2 \\rfloor$ draws, as chains."""
    half = x.shape[1] // 2
    return jnp.concatenate([x[:, :half], x[:, x.shape[1] - half:]], axis=0)


def _z_scale(x: jax.Array) -> jax.Array:
    """Rank-normalises all values together: $\\Phi^{-1}((r-3/8)/(S+1/4))$."""
    flat = x.ravel()
    ordered = jnp.sort(flat)
    below = jnp.searchsorted(ordered, flat, side="left")
    up_to = jnp.searchsorted(ordered, flat, side="right")
    # Ties share the average of the ranks below + 1, ..., up_to.
    rank = (below + up_to + 1).astype(x.dtype) / 2
    return ndtri((rank - 3 / 8) / (flat.size + 1 / 4)).reshape(x.shape)


def _rhat(x: jax.Array) -> jax.Array:
    """The classic $\\hat R$ of the rows of `x` taken as chains."""
    n = x.shape[1]
    between = n * jnp.var(jnp.mean(x, axis=1), ddof=1)
    within = jnp.mean(jnp.var(x, axis=1, ddof=1))
    return jnp.sqrt((between / within + n - 1) / n)


def _autocovariance(x: jax.Array) -> jax.Array:
    """Biased autocovariance of every row at lags $0, \\dots, N-1$, by FFT."""
    n = x.shape[1]
    size = 1 << (2 * n - 1).bit_length()
    spectrum = jnp.fft.rfft(x - jnp.mean(x, axis=1, keepdims=True), n=size,
                            axis=1)
    power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
    return jnp.fft.irfft(power, n=size, axis=1)[:, :n] / n


def _ess(x: jax.Array) -> jax.Array:
    """ESS of the rows of `x` taken as chains (ArviZ's `_ess`)."""
    m, n = x.shape
    acov = _autocovariance(x)
    mean_var = jnp.mean(acov[:, 0]) * n / (n - 1)
    var_plus = mean_var * (n - 1) / n
    if m > 1:
        var_plus = var_plus + jnp.var(jnp.mean(x, axis=1), ddof=1)
    rho = 1 - (mean_var - jnp.mean(acov, axis=0)) / var_plus
    # Pair sums P_k = rho_2k + rho_2k+1 (rho_0 = 1). Geyer's initial positive
    # sequence keeps P_0, ..., P_{J-1}: P_J is the first pair that is not
    # positive, or the first ArviZ does not look past (lag 2J + 1 >= n - 2).
    num_pairs = n // 2
    k = jnp.arange(num_pairs)
    two = rho[:2 * num_pairs].reshape(num_pairs, 2)
    evens = jnp.where(k == 0, 1, two[:, 0])
    pairs = evens + two[:, 1]
    goes_on = (pairs > 0) & (2 * k + 1 < n - 3)  # False at k = num_pairs - 1
    num_kept = jnp.argmin(goes_on)
    # Geyer's initial monotone sequence: each kept pair capped by the previous.
    kept = jnp.sum(jnp.where(k < num_kept, jax.lax.cummin(pairs), 0))
    # ArviZ adds the even lag of P_J when it is positive or P_J >= 0.
    at_stop = k == num_kept
    next_even = jnp.sum(jnp.where(at_stop, evens, 0))
    stop_pair = jnp.sum(jnp.where(at_stop, pairs, 0))
    extra = jnp.where((stop_pair >= 0) | (next_even > 0), next_even, 0)
    size = m * n
    tau = jnp.maximum(-1 + 2 * kept + extra, 1 / math.log10(size))
    ess = jnp.where(jnp.any(jnp.isnan(rho)), jnp.nan, size / tau)
    constant = jnp.max(x) - jnp.min(x) < _CONSTANT_RANGE
    return jnp.where(constant, size, ess).astype(x.dtype)


@jax.jit
def _diagnostics(x: jax.Array) -> jax.Array:
    """R-hat, bulk, tail and mean ESS, and MCSE of the mean, in one program.

    Every public function calls this one program, so a trace shape is compiled
    once for all of them (under an outer `jax.jit` the unused outputs are
    pruned).
    """
    split = _split_chains(x)
    # Bulk and tail (folded) R-hat, on the ranks of the split draws.
    folded = jnp.abs(split - jnp.median(split))
    z = jax.vmap(_z_scale)(jnp.stack([split, folded]))
    bulk, tail = jax.vmap(_rhat)(z)
    # Python's max(bulk, tail), NaN handling included.
    rhat = jnp.where(tail > bulk, tail, bulk) if x.shape[0] > 1 else jnp.nan
    # ESS of the ranks, of the tail indicators and of the draws, together.
    low_high = jnp.quantile(x.ravel(), jnp.asarray(_TAIL_PROBS, x.dtype))
    below = (x[None] <= low_high[:, None, None]).astype(x.dtype)
    ess = jax.vmap(_ess)(jnp.stack(
        [z[0], _split_chains(below[0]), _split_chains(below[1]), split]))
    # Python's min(low, high), NaN handling included.
    ess_tail = jnp.where(ess[2] < ess[1], ess[2], ess[1])
    mcse = jnp.std(x, ddof=1) / jnp.sqrt(ess[3])
    values = jnp.stack([rhat, ess[0], ess_tail, ess[3], mcse]).astype(x.dtype)
    return jnp.where(jnp.any(jnp.isnan(x)), jnp.nan, values)


_RHAT, _ESS_INDEX, _MCSE = 0, {"bulk": 1, "tail": 2, "mean": 3}, 4


def split_rhat(trace: ArrayLike) -> jax.Array:
    r"""Rank-normalised split $\hat R$: the larger of the bulk and tail values.

    Each of the $M$ chains of $D$ draws is cut into two halves of $N =
    \lfloor D/2 \rfloor$ draws (the middle draw of an odd-length chain is
    dropped), giving $2M$ sequences. All $S = 2MN$ draws are ranked
    together (ties get the average of their ranks, $r_i$) and mapped to normal
    scores

    $$
    z_i = \Phi^{-1}\left(\frac{r_i - 3/8}{S + 1/4}\right).
    $$

    With $\bar z_j$ and $s_j^2$ the mean and sample variance of sequence $j$,

    $$
    W = \frac{1}{2M}\sum_j s_j^2, \qquad
    B = \frac{N}{2M - 1}\sum_j (\bar z_j - \bar z)^2, \qquad
    \hat R_{\text{bulk}} = \sqrt{\frac{B / W + N - 1}{N}} .
    $$

    $\hat R_{\text{tail}}$ is the same computed on the folded draws
    $|\theta_i - \operatorname{median}(\theta)|$, which exposes chains that
    agree in location but not in scale. The result is
    $\max(\hat R_{\text{bulk}}, \hat R_{\text{tail}})$, as ArviZ's
    `az.rhat(..., method="rank")`. Values near 1 mean the chains agree with
    each other and with themselves over time; Vehtari et al. recommend
    trusting a run only when $\hat R < 1.01$.

    Args:
      trace: array of shape `(num_chains, num_draws)`, or `(num_draws,)` for
        one chain.

    Returns:
      $\hat R$ as a 0-d array. NaN, as in ArviZ, when there are fewer than
      two chains or fewer than four draws, when the trace has a NaN, or when
      each half-chain is constant (a constant trace, say).

    Raises:
      ValueError: if the trace has more than two axes (use `jax.vmap` over
        extra leading axes).

    Examples:
      >>> import numpy as np
      >>> x = np.random.default_rng(0).normal(size=(4, 1000))
      >>> round(float(split_rhat(x)), 2)
      1.0
      >>> x[3] *= 4  # same location, one chain four times wider
      >>> round(float(split_rhat(x)), 2)
      1.21

    References:
      Vehtari, Gelman, Simpson, Carpenter & Bürkner, "Rank-normalization,
      folding, and localization: an improved $\hat R$ for assessing
      convergence of MCMC", Bayesian Analysis 16(2) (2021) 667-718.
    """
    x = _as_trace(trace)
    if x.shape[0] < 2 or x.shape[1] < _MIN_DRAWS:
        return _nan(x)
    return _diagnostics(x)[_RHAT]


def effective_sample_size(trace: ArrayLike, kind: str = "bulk") -> jax.Array:
    r"""Effective sample size of a trace, by Geyer's initial monotone sequence.

    The $M$ chains of $D$ draws are split in halves as in `split_rhat`,
    giving $M' = 2M$ sequences of $N = \lfloor D/2 \rfloor$ draws, and
    transformed according to `kind`:

    * `"bulk"`: the rank-normalised draws $z_i$ of `split_rhat`; it measures
      how well the centre of the distribution is explored (ArviZ's
      `method="bulk"`);
    * `"tail"`: the indicators $\mathbf{1}[\theta_i \le q]$ for $q$ the 5% and
      the 95% quantile of all draws (linear interpolation); the smaller of the
      two ESS (ArviZ's `method="tail"`);
    * `"mean"`: the draws themselves; the ESS that governs the error of the
      mean (ArviZ's `method="mean"`, used by `mcse_mean`).

    With $\hat\gamma_{j,t}$ the biased lag-$t$ autocovariance of sequence $j$
    (by FFT), $W = \frac{N}{N-1}\frac{1}{M'}\sum_j \hat\gamma_{j,0}$ and
    $\widehat{\mathrm{var}}^+ = \frac{N-1}{N} W + \operatorname{var}_j(\bar
    \theta_j)$ (the sample variance of the sequence means, divisor $M' -
    1$), the autocorrelation estimates are

    $$
    \hat\rho_0 = 1, \qquad
    \hat\rho_t = 1 - \frac{W - \frac{1}{M'}\sum_j \hat\gamma_{j,t}}
    {\widehat{\mathrm{var}}^+} .
    $$

    The pair sums $P_k = \hat\rho_{2k} + \hat\rho_{2k+1}$ are kept while
    positive (Geyer's initial positive sequence, up to lag $N - 3$), made
    non-increasing (initial monotone sequence), and

    $$
    \hat\tau = -1 + 2 \sum_{k < K} P_k + \hat\rho_{2K}^{+}, \qquad
    \mathrm{ESS} = \frac{M' N}{\max(\hat\tau, 1/\log_{10}(M' N))},
    $$

    where $P_K$ is the first pair not kept and $\hat\rho_{2K}^{+}$ is
    $\hat\rho_{2K}$ when it is positive or $P_K \ge 0$, else 0 (ArviZ's
    convention). For $M$ stationary AR(1) chains of $D$ draws, $x_t = \phi
    x_{t-1} + \varepsilon_t$, the mean ESS tends to $M D (1 - \phi) / (1 +
    \phi)$.

    Args:
      trace: array of shape `(num_chains, num_draws)`, or `(num_draws,)` for
        one chain.
      kind: `"bulk"`, `"tail"` or `"mean"`.

    Returns:
      The effective number of independent draws, as a 0-d array (it can
      exceed the number of draws for anti-correlated chains). NaN, as in
      ArviZ, when there are fewer than four draws or the trace has a NaN (and,
      for `"mean"`, an infinity); for a constant trace (or constant tail
      indicators) the number of draws used, $2MN$.

    Raises:
      ValueError: if `kind` is unknown or the trace has more than two axes.

    Examples:
      >>> import numpy as np
      >>> x = np.random.default_rng(0).normal(size=(4, 1000))
      >>> 3500 < float(effective_sample_size(x)) < 4500
      True
      >>> trend = x + np.linspace(0, 20, 1000)  # every chain drifts
      >>> float(effective_sample_size(trend)) < 100
      True

    References:
      Vehtari, Gelman, Simpson, Carpenter & Bürkner, "Rank-normalization,
      folding, and localization: an improved $\hat R$ for assessing
      convergence of MCMC", Bayesian Analysis 16(2) (2021) 667-718.

      Geyer, "Practical Markov chain Monte Carlo", Statistical Science 7
      (1992) 473-483.
    """
    if kind not in _ESS_KINDS:
        raise ValueError(
            f"kind must be one of {_ESS_KINDS}, got {kind!r}.")
    x = _as_trace(trace)
    if x.shape[1] < _MIN_DRAWS:
        return _nan(x)
    return _diagnostics(x)[_ESS_INDEX[kind]]


def mcse_mean(trace: ArrayLike) -> jax.Array:
    r"""Monte Carlo standard error of the mean of a trace.

    $$
    \mathrm{MCSE}(\bar\theta) = \frac{s}{\sqrt{\mathrm{ESS}_{\text{mean}}}},
    $$

    with $s$ the sample standard deviation of all $MD$ draws ($M$ chains of
    $D$ draws pooled, divisor $MD - 1$) and $\mathrm{ESS}_{\text{mean}}$ the
    `effective_sample_size(trace, kind="mean")`, as ArviZ's
    `az.mcse(..., method="mean")`. For the loss trace of an LLC run the
    standard error of $\hat\lambda = n\beta(\bar L - L_n(w^*))$ is $n\beta$
    times this.

    Args:
      trace: array of shape `(num_chains, num_draws)`, or `(num_draws,)` for
        one chain.

    Returns:
      The standard error as a 0-d array. NaN, as in ArviZ, when there are
      fewer than four draws or the trace has a NaN or an infinity; 0 for a
      constant trace.

    Raises:
      ValueError: if the trace has more than two axes.

    Examples:
      >>> import numpy as np
      >>> x = np.random.default_rng(0).normal(size=(4, 1000))
      >>> 0.014 < float(mcse_mean(x)) < 0.018  # about 1 / sqrt(4000)
      True

    References:
      Vehtari, Gelman, Simpson, Carpenter & Bürkner, "Rank-normalization,
      folding, and localization: an improved $\hat R$ for assessing
      convergence of MCMC", Bayesian Analysis 16(2) (2021) 667-718.
    """
    x = _as_trace(trace)
    if x.shape[1] < _MIN_DRAWS:
        return _nan(x)
    return _diagnostics(x)[_MCSE]
