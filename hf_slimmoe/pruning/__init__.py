"""Structured pruning for SlimMoE on any supported MoE family: sensitivity scores (Eq. 2-4), the tensor surgery behind
`prune_to` / `model.prune_to`, and the expert-dropping baselines (`drop_experts` by KD sensitivity, activation
frequency or REAP)."""

from .expert_dropping import (EXPERT_CRITERIA, drop_experts, expert_activation_frequency,
                              expert_scores_from_sensitivity, reap_scores, score_experts)
from .sensitivity import CRITERIA, SensitivityScores, compute_sensitivity
from .surgery import prune_model, prune_to, validate_prune_target

__all__ = ["CRITERIA", "EXPERT_CRITERIA", "SensitivityScores", "compute_sensitivity", "drop_experts",
           "expert_activation_frequency", "expert_scores_from_sensitivity", "prune_model", "prune_to", "reap_scores",
           "score_experts", "validate_prune_target"]
