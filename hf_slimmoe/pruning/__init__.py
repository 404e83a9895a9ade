"""Structured pruning for SlimMoE: sensitivity scores (Eq. 2-4), the tensor surgery behind `model.prune_to`,
and the expert-dropping ablation of the paper's Table 3 (`drop_experts` by KD sensitivity or activation frequency)."""

from .expert_dropping import (EXPERT_CRITERIA, drop_experts, expert_activation_frequency,
                              expert_scores_from_sensitivity)
from .sensitivity import CRITERIA, SensitivityScores, compute_sensitivity
from .surgery import prune_model, validate_prune_target

__all__ = ["CRITERIA", "EXPERT_CRITERIA", "SensitivityScores", "compute_sensitivity", "drop_experts",
           "expert_activation_frequency", "expert_scores_from_sensitivity", "prune_model", "validate_prune_target"]
