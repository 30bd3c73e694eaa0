"""sgld_optax: SGLD sampling as an optax transformation, and LLC estimation."""

from sgld_optax._src.diagnostics import effective_sample_size
from sgld_optax._src.diagnostics import split_rhat
from sgld_optax._src.llc import LLCResult
from sgld_optax._src.llc import estimate_llc
from sgld_optax._src.metrics import Metrics
from sgld_optax._src.sgld import SGLDState
from sgld_optax._src.sgld import default_nbeta
from sgld_optax._src.sgld import get_metrics
from sgld_optax._src.sgld import get_sketches
from sgld_optax._src.sgld import sgld
from sgld_optax._src.sketch import CountSketch
from sgld_optax._src.sketch import SketchBuffer
from sgld_optax._src.theory import LearningCoefficient
from sgld_optax._src.theory import aoyagi_learning_coefficient
from sgld_optax._src.theory import reduced_rank_regression_learning_coefficient
from sgld_optax._src.theory import regular_learning_coefficient
from sgld_optax._src.xla_options import compiler_options

__version__ = "0.1.0"

__all__ = (
    "CountSketch",
    "LLCResult",
    "LearningCoefficient",
    "Metrics",
    "SGLDState",
    "SketchBuffer",
    "aoyagi_learning_coefficient",
    "compiler_options",
    "default_nbeta",
    "effective_sample_size",
    "estimate_llc",
    "get_metrics",
    "get_sketches",
    "reduced_rank_regression_learning_coefficient",
    "regular_learning_coefficient",
    "sgld",
    "split_rhat",
)
