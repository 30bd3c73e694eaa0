"""Learning coefficients known in closed form, to check LLC estimates against.

Two families are covered:

* regular models, whose learning coefficient is half the number of parameters;
* deep linear networks (products of weight matrices), whose learning
    coefficient was derived by Aoyagi (2024). With two layers this is reduced
    rank regression, solved earlier by Aoyagi & Watanabe (2005); that special
    case is also given here, as an independent check.

Everything in this module is plain Python arithmetic on integers; nothing
depends on JAX.
"""

from __future__ import annotations

from fractions import Fraction
from typing import NamedTuple, Sequence

__all__ = [
        "LearningCoefficient",
        "aoyagi_learning_coefficient",
        "reduced_rank_regression_learning_coefficient",
        "regular_learning_coefficient",
]


class LearningCoefficient(NamedTuple):
    r"""A learning coefficient and its multiplicity.

    Attributes:
        value: the learning coefficient $\lambda$ (a float; it is always a
            multiple of 1/8 for the models in this module).
        multiplicity: the order $m$ of the pole at $-\lambda$ of the
            zeta function, so that the free energy is
            $n L_n(w_0) + \lambda \log n - (m - 1) \log \log n + O_p(1)$.
    """

    value: float
    multiplicity: int


def _check_widths(widths: Sequence[int], rank: int) -> tuple[list[int], int]:
    try:
        widths = [int(h) for h in widths]
    except TypeError:
        raise TypeError(f"widths must be a sequence of ints, got {widths!r}.")
    if len(widths) < 2:
        raise ValueError(
                "widths must list at least an input and an output width, got "
                f"{widths!r}.")
    if any(h < 1 for h in widths):
        raise ValueError(f"widths must all be >= 1, got {widths!r}.")
    rank = int(rank)
    if not 0 <= rank <= min(widths):
        raise ValueError(
                f"rank must lie in [0, min(widths)] = [0, {min(widths)}], got {rank}.")
    return widths, rank


def regular_learning_coefficient(num_params: int) -> LearningCoefficient:
    r"""Learning coefficient of a regular (identifiable, non-degenerate) model.

    When the Fisher information is non-singular at the true parameter, the
    posterior is asymptotically Gaussian and

    $$
    \lambda = d / 2, \qquad m = 1,
    $$

    with $d$ the number of parameters. A well-specified linear regression
    $y = W x + \varepsilon$ with full-rank inputs is the standard
    example.

    Args:
        num_params: the number of parameters $d$.

    Returns:
        A `LearningCoefficient` with value `d / 2` and multiplicity 1.

    Examples:
        >>> regular_learning_coefficient(12)
        LearningCoefficient(value=6.0, multiplicity=1)

    References:
        Watanabe, "Algebraic Geometry and Statistical Learning Theory",
        Cambridge University Press, 2009.
    """
    d = int(num_params)
    if d < 0:
        raise ValueError(f"num_params must be >= 0, got {num_params}.")
    return LearningCoefficient(d / 2, 1)


def aoyagi_learning_coefficient(widths: Sequence[int],
                                                                rank: int) -> LearningCoefficient:
    r"""Learning coefficient of a deep linear network (Aoyagi, 2024).

    The network maps $x \mapsto W_M \cdots W_1 x$, with $W_i$ of
    shape $H_{i+1} \times H_i$; `widths` is
    $(H_1, \dots, H_{M+1})$ from input to output, and `rank` is the rank
    $r$ of the true product matrix. Set $\Delta_i = H_i - r$.
    Let $S$ be the set of the $\ell + 1$ smallest
    $\Delta_i$, with $\ell \geq 1$ chosen so that

    $$
    \sum_{i \in S} \Delta_i \ge \ell \max_{i \in S} \Delta_i
    \quad\text{and}\quad
    \sum_{i \in S} \Delta_i < \ell \min_{k \notin S} \Delta_k
    $$

    (the second condition is empty when $S$ is every index). With
    $s = \sum_{i\in S} \Delta_i$ and $a = s \bmod \ell$,

    $$
    \lambda = \frac{-r^2 + r (H_1 + H_{M+1})}{2}
        + \frac{a (\ell - a)}{4 \ell}
        - \frac{\ell (\ell - 1)}{4} \Bigl(\frac{s}{\ell}\Bigr)^2
        + \frac12 \sum_{i < j \in S} \Delta_i \Delta_j ,
    $$

    and the multiplicity is $m = 1$ if $a = 0$, else $m = 2$.

    The value is the smallest learning coefficient over the set of true
    parameters: the local learning coefficient at a particular true parameter
    equals it at the most singular ("deepest") points, for instance the origin
    when $r = 0$, and can be larger elsewhere.

    Args:
        widths: layer widths $H_1, \dots, H_{M+1}$, input first. Two widths
            describe a single matrix (a regular model: $\lambda = d/2$).
        rank: rank $r$ of the true product matrix,
            `0 <= rank <= min(widths)`.

    Returns:
        A `LearningCoefficient`.

    Examples:
        >>> aoyagi_learning_coefficient([5, 3, 5], rank=0)
        LearningCoefficient(value=6.5, multiplicity=2)
        >>> aoyagi_learning_coefficient([5, 5, 5, 5], rank=2).value
        11.0

    References:
        Aoyagi, "Consideration on the learning efficiency of multiple-layered
        neural networks with linear units", Neural Networks 172 (2024) 106132,
        https://doi.org/10.1016/j.neunet.2024.106132

        Aoyagi & Watanabe, "Stochastic complexities of reduced rank regression in
        Bayesian estimation", Neural Networks 18 (2005) 924-933.
    """
    widths, r = _check_widths(widths, rank)
    deltas = sorted(h - r for h in widths)
    base = Fraction(-r * r + r * (widths[0] + widths[-1]), 2)
    for ell in range(1, len(deltas)):
        chosen, rest = deltas[:ell + 1], deltas[ell + 1:]
        s = sum(chosen)
        if s < ell * max(chosen):
            continue
        if rest and not s < ell * min(rest):
            continue
        a = s % ell
        pairs = sum(chosen[i] * chosen[j]
                                for i in range(len(chosen))
                                for j in range(i + 1, len(chosen)))
        value = (base + Fraction(a * (ell - a), 4 * ell)
                          - Fraction(ell * (ell - 1), 4) * Fraction(s, ell) ** 2
                          + Fraction(pairs, 2))
        return LearningCoefficient(float(value), 1 if a == 0 else 2)
    # Not reached: with every index in S the second condition is empty and the
    # first holds for the largest ell at which the conditions were not met.
    raise AssertionError(f"no admissible set for widths={widths}, rank={r}.")


def reduced_rank_regression_learning_coefficient(
        input_dim: int, hidden_dim: int, output_dim: int,
        rank: int) -> LearningCoefficient:
    r"""Learning coefficient of reduced rank regression (Aoyagi & Watanabe, 2005).

    The model is $x \mapsto B A x$ with $A$ of shape
    $H \times M$ and $B$ of shape $N \times H$, and the true
    product has rank $r$. With $M$ inputs, $N$ outputs:

    * if $M + H < N + r$: $\lambda = (HM - Hr + Nr)/2$, $m=1$;
    * if $N + H < M + r$: $\lambda = (HN - Hr + Mr)/2$, $m=1$;
    * if $M + N < H + r$: $\lambda = MN/2$, $m=1$;
    * otherwise, with $q = 2(H+r)(M+N) - (M-N)^2 - (H+r)^2$:
        $\lambda = q/8$, $m = 1$ when $M+H+N+r$ is even, and
        $\lambda = (q+1)/8$, $m = 2$ when it is odd.

    It is the two-layer case of `aoyagi_learning_coefficient`, derived
    independently.

    Args:
        input_dim: $M$.
        hidden_dim: $H$.
        output_dim: $N$.
        rank: $r$, `0 <= r <= min(M, H, N)`.

    Returns:
        A `LearningCoefficient`.

    Examples:
        >>> reduced_rank_regression_learning_coefficient(4, 3, 8, rank=0)
        LearningCoefficient(value=6.0, multiplicity=1)

    References:
        Aoyagi & Watanabe, "Stochastic complexities of reduced rank regression in
        Bayesian estimation", Neural Networks 18 (2005) 924-933.
    """
    (m_, h, n), r = _check_widths([input_dim, hidden_dim, output_dim], rank)
    if m_ + h < n + r:
        return LearningCoefficient((h * m_ - h * r + n * r) / 2, 1)
    if n + h < m_ + r:
        return LearningCoefficient((h * n - h * r + m_ * r) / 2, 1)
    if m_ + n < h + r:
        return LearningCoefficient(m_ * n / 2, 1)
    q = 2 * (h + r) * (m_ + n) - (m_ - n) ** 2 - (h + r) ** 2
    if (m_ + h + n + r) % 2 == 0:
        return LearningCoefficient(q / 8, 1)
    return LearningCoefficient((q + 1) / 8, 2)
