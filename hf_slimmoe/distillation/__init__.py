"""Distillation for SlimMoE: the chunked top-k KD loss, the distillation trainer and the teacher top-k cache."""

from .config import DistillationConfig
from ..modeling_utils import teacher_topk, teacher_topk_from_hidden, teacher_topk_from_model
from .losses import chunked_cross_entropy, topk_kl_loss, topk_tail_kl
from .teacher_cache import cache_teacher_topk, check_teacher_cache, input_ids_fingerprint
from .run import DistillScriptArguments, run_distill
from .trainer import DistillationCollator, DistillationTrainer

__all__ = [
    "DistillationCollator",
    "DistillationConfig",
    "DistillationTrainer",
    "DistillScriptArguments",
    "cache_teacher_topk",
    "check_teacher_cache",
    "chunked_cross_entropy",
    "input_ids_fingerprint",
    "run_distill",
    "teacher_topk",
    "teacher_topk_from_hidden",
    "teacher_topk_from_model",
    "topk_kl_loss",
    "topk_tail_kl",
]
