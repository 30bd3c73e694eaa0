"""Tests for the closed-form learning coefficients in ``_src/theory.py``."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgld_optax._src import theory


@pytest.mark.parametrize(
        "widths, rank, expected",
        [
                ([5, 3, 5], 0, 6.5),
                ([5, 4, 5], 0, 8.0),
                ([4, 3, 8], 0, 6.0),
                ([3, 3, 3], 1, 4.0),
                ([5, 5, 5, 5], 0, 8.5),
                ([5, 5, 5, 5], 2, 11.0),
                ([5, 5, 5, 5], 5, 12.5),
        ],
)
def test_aoyagi_published_values(widths, rank, expected):
    assert theory.aoyagi_learning_coefficient(widths, rank).value == expected


@pytest.mark.parametrize("rows, cols", [(1, 1), (3, 4), (10, 10), (7, 2)])
def test_single_layer_is_regular(rows, cols):
    # One matrix is a regular model at every rank: lambda = d / 2, m = 1.
    for rank in range(min(rows, cols) + 1):
        got = theory.aoyagi_learning_coefficient([cols, rows], rank)
        assert got == theory.regular_learning_coefficient(rows * cols)
        assert got == (rows * cols / 2, 1)


def test_two_layers_match_reduced_rank_regression_exhaustively():
    # Aoyagi (2024) with M = 2 must reproduce Aoyagi & Watanabe (2005),
    # value and multiplicity, whose four cases are coded independently.
    for m, h, n in itertools.product(range(1, 8), repeat=3):
        for r in range(min(m, h, n) + 1):
            assert theory.aoyagi_learning_coefficient([m, h, n], r) == (
                    theory.reduced_rank_regression_learning_coefficient(m, h, n, r)
            ), (m, h, n, r)


@pytest.mark.parametrize(
        "args, expected",
        [
                ((5, 3, 5, 0), (6.5, 2)),  # generic case, odd parity
                ((5, 4, 5, 0), (8.0, 1)),  # generic case, even parity
                ((4, 3, 8, 0), (6.0, 1)),  # M + H < N + r
                ((8, 3, 4, 0), (6.0, 1)),  # N + H < M + r
                ((2, 9, 3, 0), (3.0, 1)),  # M + N < H + r: as regular in B A
                ((3, 3, 3, 3), (4.5, 1)),  # full rank: (HM - Hr + Nr) / 2 branch
        ],
)
def test_reduced_rank_regression_cases(args, expected):
    assert theory.reduced_rank_regression_learning_coefficient(*args) == expected


@settings(max_examples=200, deadline=None)
@given(
        widths=st.lists(st.integers(1, 9), min_size=2, max_size=6),
        data=st.data(),
)
def test_aoyagi_properties(widths, data):
    rank = data.draw(st.integers(0, min(widths)))
    got = theory.aoyagi_learning_coefficient(widths, rank)
    # Reversing the network (transposing every matrix) changes nothing.
    assert got == theory.aoyagi_learning_coefficient(widths[::-1], rank)
    # Never above half the number of weights, never below half the dimension of
    # the set of rank-r products (a regular model in the product matrix).
    num_weights = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    assert got.value <= num_weights / 2
    h1, hout = widths[0], widths[-1]
    assert got.value >= (rank * (h1 + hout) - rank**2) / 2
    assert got.multiplicity in (1, 2)
    # A multiple of 1/8.
    assert (got.value * 8) == int(got.value * 8)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="rank"):
        theory.aoyagi_learning_coefficient([3, 2, 3], 3)
    with pytest.raises(ValueError, match="widths"):
        theory.aoyagi_learning_coefficient([3], 0)
    with pytest.raises(ValueError, match="widths"):
        theory.aoyagi_learning_coefficient([3, 0, 3], 0)
    with pytest.raises(ValueError, match="num_params"):
        theory.regular_learning_coefficient(-1)
