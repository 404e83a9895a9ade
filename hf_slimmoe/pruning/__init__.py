"""Structured pruning for SlimMoE: sensitivity scores (Eq. 2-4) and the tensor surgery behind `model.prune_to`."""

from .sensitivity import CRITERIA, SensitivityScores, compute_sensitivity
from .surgery import prune_model, validate_prune_target

__all__ = ["CRITERIA", "SensitivityScores", "compute_sensitivity", "prune_model", "validate_prune_target"]
