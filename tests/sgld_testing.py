"""Shared test utilities."""

import contextlib
import warnings


@contextlib.contextmanager
def quiet_sgld_warnings():
    """Silences the warnings sgld gives for noise_level != 1 and nbeta == 1."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="noise_level=",
                                category=UserWarning)
        warnings.filterwarnings("ignore", message="nbeta is 1",
                                category=UserWarning)
        yield
