"""Interoperability with PyTorch and devinterp.

Convert PyTorch checkpoints to Flax params and back (with `Rule`s for real
architectures, and ready rule sets for GPT-2, Llama-style decoders and
BERT), move the state of devinterp's `SGLD`, `SGMCMC.sgld` and
`SGMCMC.rmsprop_sgld` optimizers to `sgld_optax.sgld` and
`sgld_optax.rmsprop_sgld` state and back, and rebuild devinterp's count
sketches. PyTorch is an optional dependency
(`pip install 'sgld_optax[torch]'`); `.safetensors` files work without it.
"""

from sgld_optax._src.interop.checkpoints import params_from_torch
from sgld_optax._src.interop.checkpoints import params_to_torch
from sgld_optax._src.interop.checkpoints import save_torch_checkpoint
from sgld_optax._src.interop.devinterp import devinterp_count_sketch
from sgld_optax._src.interop.devinterp import sgld_state_from_torch
from sgld_optax._src.interop.devinterp import sgld_state_to_torch
from sgld_optax._src.interop.rules import CheckpointMismatchError
from sgld_optax._src.interop.rules import Layout
from sgld_optax._src.interop.rules import Rule
from sgld_optax._src.interop.rules import bert_rules
from sgld_optax._src.interop.rules import gpt2_rules
from sgld_optax._src.interop.rules import llama_rules

__all__ = (
    "CheckpointMismatchError",
    "Layout",
    "Rule",
    "bert_rules",
    "devinterp_count_sketch",
    "gpt2_rules",
    "llama_rules",
    "params_from_torch",
    "params_to_torch",
    "save_torch_checkpoint",
    "sgld_state_from_torch",
    "sgld_state_to_torch",
)
