"""Moving checkpoints, sampler state and count sketches between PyTorch and JAX."""
