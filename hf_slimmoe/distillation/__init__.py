"""Distillation for SlimMoE: the chunked KD losses, the distillation trainer, the teacher caches (top-k, samples)."""

from .config import DistillationConfig
from ..modeling_utils import teacher_topk, teacher_topk_from_hidden, teacher_topk_from_model
from .losses import (
    chunked_cross_entropy,
    full_kl_loss,
    sampled_kd_loss,
    teacher_samples_from_hidden,
    threshold_samples_from_hidden,
    topk_kl_loss,
    topk_tail_kl,
    topk_tail_kl_loss,
)
from .teacher_cache import (
    SamplePacking,
    cache_metadata,
    cache_teacher_samples,
    cache_teacher_topk,
    check_teacher_cache,
    input_ids_fingerprint,
    sample_packing,
    sample_uniforms,
    teacher_fingerprint,
    teacher_samples_from_model,
)
from .run import DistillScriptArguments, run_distill
from .trainer import DistillationCollator, DistillationTrainer

__all__ = [
    "DistillationCollator",
    "DistillationConfig",
    "DistillationTrainer",
    "DistillScriptArguments",
    "SamplePacking",
    "cache_metadata",
    "cache_teacher_samples",
    "cache_teacher_topk",
    "check_teacher_cache",
    "chunked_cross_entropy",
    "full_kl_loss",
    "input_ids_fingerprint",
    "run_distill",
    "sample_packing",
    "sample_uniforms",
    "sampled_kd_loss",
    "teacher_fingerprint",
    "teacher_samples_from_hidden",
    "threshold_samples_from_hidden",
    "teacher_samples_from_model",
    "teacher_topk",
    "teacher_topk_from_hidden",
    "teacher_topk_from_model",
    "topk_kl_loss",
    "topk_tail_kl",
    "topk_tail_kl_loss",
]
