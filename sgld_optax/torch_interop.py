"""Interoperability with PyTorch and devinterp.

Convert PyTorch checkpoints to Flax params and back, move the state of
devinterp's `SGLD`, `SGMCMC.sgld` and `SGMCMC.rmsprop_sgld` optimizers to
`sgld_optax.sgld` and `sgld_optax.rmsprop_sgld` state and back, and rebuild
devinterp's count sketches. PyTorch is an optional dependency
(`pip install 'sgld_optax[torch]'`); `.safetensors` files work without it.
"""

from sgld_optax._src.torch_interop import CheckpointMismatchError
from sgld_optax._src.torch_interop import devinterp_count_sketch
from sgld_optax._src.torch_interop import params_from_torch
from sgld_optax._src.torch_interop import params_to_torch
from sgld_optax._src.torch_interop import save_torch_checkpoint
from sgld_optax._src.torch_interop import sgld_state_from_torch
from sgld_optax._src.torch_interop import sgld_state_to_torch

__all__ = (
    "CheckpointMismatchError",
    "devinterp_count_sketch",
    "params_from_torch",
    "params_to_torch",
    "save_torch_checkpoint",
    "sgld_state_from_torch",
    "sgld_state_to_torch",
)
