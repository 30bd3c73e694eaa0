"""sgld_optax: stochastic-gradient MCMC samplers as optax transformations, and LLC estimation."""

from sgld_optax._src.core.terms import GaussianPrior
from sgld_optax._src.diagnostics import effective_sample_size
from sgld_optax._src.diagnostics import mcse_mean
from sgld_optax._src.diagnostics import split_rhat
from sgld_optax._src.llc.calibrate import CalibrationResult
from sgld_optax._src.llc.calibrate import calibrate_llc
from sgld_optax._src.llc.result import Check
from sgld_optax._src.llc.result import LLCResult
from sgld_optax._src.llc.series import LLCSeriesResult
from sgld_optax._src.llc.series import estimate_llc_series
from sgld_optax._src.llc.api import estimate_llc
from sgld_optax._src.lm import causal_lm_loss
from sgld_optax._src.lm import token_data
from sgld_optax._src.metrics import Metrics
from sgld_optax._src.samplers.common import default_nbeta
from sgld_optax._src.samplers.common import get_metrics
from sgld_optax._src.samplers.common import get_sketches
from sgld_optax._src.samplers.rmsprop_sgld import RMSpropSGLDState
from sgld_optax._src.samplers.rmsprop_sgld import rmsprop_sgld
from sgld_optax._src.samplers.sghmc import SGHMCState
from sgld_optax._src.samplers.sghmc import sghmc
from sgld_optax._src.samplers.sgld import SGLDState
from sgld_optax._src.samplers.sgld import sgld
from sgld_optax._src.samplers.sgnht import SGNHTState
from sgld_optax._src.samplers.sgnht import sgnht
from sgld_optax._src.sketch import CountSketch
from sgld_optax._src.sketch import SketchBuffer
from sgld_optax._src.theory import LearningCoefficient
from sgld_optax._src.theory import aoyagi_learning_coefficient
from sgld_optax._src.theory import reduced_rank_regression_learning_coefficient
from sgld_optax._src.theory import regular_learning_coefficient

__version__ = "0.1.0"

__all__ = (
    "CalibrationResult",
    "Check",
    "CountSketch",
    "GaussianPrior",
    "LLCResult",
    "LLCSeriesResult",
    "LearningCoefficient",
    "Metrics",
    "RMSpropSGLDState",
    "SGHMCState",
    "SGLDState",
    "SGNHTState",
    "SketchBuffer",
    "aoyagi_learning_coefficient",
    "calibrate_llc",
    "causal_lm_loss",
    "default_nbeta",
    "effective_sample_size",
    "estimate_llc",
    "estimate_llc_series",
    "get_metrics",
    "get_sketches",
    "mcse_mean",
    "reduced_rank_regression_learning_coefficient",
    "regular_learning_coefficient",
    "rmsprop_sgld",
    "sghmc",
    "sgld",
    "sgnht",
    "split_rhat",
    "token_data",
)
