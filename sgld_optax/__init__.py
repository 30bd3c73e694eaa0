"""sgld_optax: SGLD sampling as an optax transformation, and LLC estimation."""

from sgld_optax._src.metrics import Metrics
from sgld_optax._src.sgld import SGLDState
from sgld_optax._src.sgld import default_nbeta
from sgld_optax._src.sgld import get_metrics
from sgld_optax._src.sgld import get_sketches
from sgld_optax._src.sgld import sgld
from sgld_optax._src.sketch import CountSketch
from sgld_optax._src.sketch import SketchBuffer

__version__ = "0.1.0"

__all__ = (
    "CountSketch",
    "Metrics",
    "SGLDState",
    "SketchBuffer",
    "default_nbeta",
    "get_metrics",
    "get_sketches",
    "sgld",
)
