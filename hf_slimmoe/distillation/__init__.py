"""Distillation for SlimMoE: the chunked top-k KD loss, the distillation trainer and the teacher top-k cache."""

from .losses import chunked_cross_entropy, teacher_topk, topk_kl_loss

__all__ = ["chunked_cross_entropy", "teacher_topk", "topk_kl_loss"]
