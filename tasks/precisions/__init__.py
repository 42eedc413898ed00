"""The precisions trtflow knows, one module each, registered on import (see ``tasks.precisions.base``).

    from tasks.precisions import precision_spec, registered
    [s.name for s in registered()]   # ['bf16', 'fp16', 'fp32', 'int8']
"""

from tasks.precisions import bf16, fp16, fp32, int8  # noqa: F401 - importing an entry registers it
from tasks.precisions.base import Emulation, PrecisionSpec, precision_spec, register_precision, registered

__all__ = ["Emulation", "PrecisionSpec", "precision_spec", "register_precision", "registered"]
