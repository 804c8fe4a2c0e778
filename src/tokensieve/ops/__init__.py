"""Shared, vectorised building blocks that pruning methods call: selection rules, partial attention,
statistics."""

from tokensieve.ops.attention import attention_rows, head_mean
from tokensieve.ops.clustering import density_peak_clusters, merge_by_assignment
from tokensieve.ops.diversity import greedy_max_min, greedy_sum_fusion
from tokensieve.ops.relevance import mmr
from tokensieve.ops.selection import (
    cosine_distance_matrix,
    cosine_similarity_matrix,
    facility_location,
    max_coverage,
    topk_indices,
)
from tokensieve.ops.stats import entropy, matrix_entropy_per_token, minmax_normalise

__all__ = [
    "attention_rows",
    "cosine_distance_matrix",
    "cosine_similarity_matrix",
    "density_peak_clusters",
    "entropy",
    "facility_location",
    "greedy_max_min",
    "greedy_sum_fusion",
    "head_mean",
    "matrix_entropy_per_token",
    "max_coverage",
    "merge_by_assignment",
    "minmax_normalise",
    "mmr",
    "topk_indices",
]
