"""The KD core of both trainers, [`DistillationTrainer`] and `SFTDistillationTrainer`: what a `kd_loss` reads from
the teacher (a batch's cache columns, or one forward of the teacher) and the KD sum over the student's counted tokens.

Teacher targets keep the batch's positions, `(B, T, *)`:
- `"topk"`: `(ids, logprobs)`, each `(B, T, k)`;
- `"samples"`: `(ids, weights)`, ids `(B, T, S)`, weights `(B, T, S)` for threshold samples or `None`;
- `"full"`: `(hidden, weight, bias)`, the teacher's last hidden states `(B, T, H_t)` and its LM head.

[`kd_sum`] takes the student's hidden states of the `T - 1` positions that predict a next token and slices the
targets to match. LM heads are read through [`head_tensors`], the one policy for sharded heads."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

from ..utils.distributed import full_tensor
from ..utils.modeling import teacher_topk_from_hidden
from .losses import full_kl_loss, sampled_kd_loss, teacher_samples_from_hidden, topk_kl_loss, topk_tail_kl_loss
from .settings import KDSettings
from .teacher_cache import (
    KIND_FOR_LOSS,
    SAMPLE_IDS_COLUMN,
    SAMPLE_WEIGHTS_COLUMN,
    TOPK_IDS_COLUMN,
    TOPK_LOGPROBS_COLUMN,
    sample_uniforms,
)


def target_kind(kd_loss: str) -> str:
    """The targets `kd_loss` reads: `"topk"`, `"samples"` or `"full"`."""
    return KIND_FOR_LOSS.get(kd_loss, "full")


def cached_targets(inputs: dict[str, Any], kinds: set[str], settings: KDSettings) -> dict[str, Any]:
    """The targets of `kinds` that the batch's cache columns carry (a top-k cache may hold more than `top_k` tokens
    per position; they are sorted, so the first `top_k` are kept)."""
    targets: dict[str, Any] = {}
    if "topk" in kinds and TOPK_IDS_COLUMN in inputs:
        k = settings.top_k
        targets["topk"] = inputs[TOPK_IDS_COLUMN][..., :k], inputs[TOPK_LOGPROBS_COLUMN][..., :k]
    if "samples" in kinds and SAMPLE_IDS_COLUMN in inputs:
        targets["samples"] = inputs[SAMPLE_IDS_COLUMN], inputs.get(SAMPLE_WEIGHTS_COLUMN)
    return targets


@contextmanager
def head_tensors(model: torch.nn.Module, keep: bool = False):
    """The `(weight, bias)` of `model`'s LM head as whole tensors for the duration of the block, the one policy for
    sharded heads: FSDP2 shards (`DTensor`, outside the model's forward) are gathered into a copy, DeepSpeed ZeRO-3
    partitions are gathered by TRL's `maybe_gather_lm_head_ctx`. With `keep`, tensors that must outlive the block and
    the model's forward (a teacher's head, used in the student's loss) are copies where they would otherwise be a
    view of an FSDP2 all-gather buffer, freed when the module reshards; an unsharded head is never copied."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    lm_head = model.get_output_embeddings()
    weight, bias = lm_head.weight, lm_head.bias
    copy = keep and (hasattr(weight, "ds_id") or (isinstance(model, FSDPModule) and not isinstance(weight, DTensor)))
    with maybe_gather_lm_head_ctx(weight, bias):  # ZeRO-3 only
        weight, bias = full_tensor(weight), None if bias is None else full_tensor(bias)
        if copy:
            weight, bias = weight.detach().clone(), None if bias is None else bias.detach().clone()
        yield weight, bias


@torch.no_grad()
def online_targets(teacher: torch.nn.Module, hidden: torch.Tensor, kinds: set[str], settings: KDSettings,
                   input_ids: torch.Tensor, attention_mask: torch.Tensor | None, epoch: int = 0) -> dict[str, Any]:
    """The targets of `kinds` from the teacher's last hidden states `(B, T, H_t)` and its LM head. Samples are drawn
    afresh every epoch, seeded per row (`kd_samples_seed + epoch`), so any batch, rank or resume draws alike and epoch
    0 draws what [`cache_teacher_samples`] stores."""
    s, lm_head = settings, teacher.get_output_embeddings()
    targets: dict[str, Any] = {}
    if "topk" in kinds:
        targets["topk"] = teacher_topk_from_hidden(hidden, lm_head, s.top_k, s.temperature, s.kd_chunk_size,
                                                   s.kd_chunk_bytes)
    if "samples" in kinds:
        uniforms = sample_uniforms(input_ids, attention_mask, s.kd_samples, s.kd_samples_seed + epoch)
        targets["samples"] = teacher_samples_from_hidden(hidden, lm_head, uniforms, s.temperature, s.kd_chunk_size,
                                                         s.kd_chunk_bytes), None
    if "full" in kinds:
        with head_tensors(teacher, keep=True) as (weight, bias):
            targets["full"] = hidden, weight, bias
    return targets


def kd_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: dict[str, Any],
           mask: torch.Tensor, settings: KDSettings) -> torch.Tensor:
    """The sum over the positions of `mask` `(B, T-1)` of the `settings.kd_loss` objective, from the student's hidden
    states `(B, T-1, H)` (position t predicts token t + 1) and LM head; `targets` are `(B, T, *)`."""
    s = settings
    common = {"temperature": s.temperature, "chunk_size": s.kd_chunk_size, "chunk_bytes": s.kd_chunk_bytes,
              "reduction": "sum"}
    if s.kd_loss == "sampled":
        ids, weights = targets["samples"]
        return sampled_kd_loss(hidden, weight, bias, ids[:, :-1], mask, **common,
                               teacher_sample_weights=None if weights is None else weights[:, :-1])
    if s.kd_loss == "full":
        teacher_hidden, teacher_weight, teacher_bias = targets["full"]
        return full_kl_loss(hidden, weight, bias, teacher_hidden[:, :-1], teacher_weight, teacher_bias, mask,
                            **common)
    ids, logprobs = targets["topk"]
    if s.kd_loss == "topk_tail":
        return topk_tail_kl_loss(hidden, weight, bias, ids[:, :-1], logprobs[:, :-1], mask, **common)
    return topk_kl_loss(hidden, weight, bias, ids[:, :-1], logprobs[:, :-1], mask, renormalize=s.renormalize,
                        **common)


__all__ = ["cached_targets", "head_tensors", "kd_sum", "online_targets", "target_kind"]
