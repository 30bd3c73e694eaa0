"""Settings shared by the whole test suite."""

import jax

# The tests compare float32 results with float64, PyTorch and devinterp
# references. On GPUs JAX computes float32 matrix products in TF32 by default
# (relative errors near 1e-3), which would swamp the differences the tests
# look for; on CPUs "highest" is what JAX computes anyway.
jax.config.update("jax_default_matmul_precision", "highest")
