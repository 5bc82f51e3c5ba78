"""Sparse coding over a learned dictionary: Batch-OMP and the online dictionary update."""

from lasers_dist.sparse.omp import SparseCodes, batch_omp
from lasers_dist.sparse.online import (
    OnlineDictionaryStats,
    batch_statistics,
    bcd_update,
)

__all__ = ["OnlineDictionaryStats", "SparseCodes", "batch_omp", "batch_statistics", "bcd_update"]
