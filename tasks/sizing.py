"""How many rows of real samples one pass holds: the one sizing rule of evaluation and calibration batches.

A leaf module (standard library only), so the precision entries (int8 calibration), the data layer and
PyTorch inference share it without importing each other.
"""

from __future__ import annotations


def rows_for_memory(sample_bytes: int, limit: int, budget: int = 256 << 20) -> int:
    """Rows per forward pass over real samples: up to ``limit``, fewer for large samples.

    Early layers hold about 10-20x a sample's bytes in activations (a 3×256×256 image makes 16 MB of
    conv output at 32 channels); at 256 rows that alone is gigabytes. Rows are chosen so that 16x the
    input bytes stays within ``budget``; at least 1.
    """
    return int(max(1, min(limit, budget // max(16 * sample_bytes, 1))))
